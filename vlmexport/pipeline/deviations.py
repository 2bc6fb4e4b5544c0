"""What ``vlmexport build`` decides per format: which formats cannot run the model as it is
(decided before any work: refused, or built with the deviation measured and recorded), and
which failed validation (left out of the bundle, the others kept).

Orchestration helpers of ``pipeline/build.py`` (``build()`` calls them in this order:
:func:`planned_deviations` after loading, :func:`drop_failed_formats` after validation,
:func:`deviation_record` when writing the manifest). docs/export.md explains the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.errors import ConfigError
from .parity import ValidationError

# build.ExportedPart / build.SourceModel (build imports this module, so they are not imported here)
ExportedPart = SourceModel = Any


class PartialBuildError(ValidationError):
    """A format failed validation: the bundle was written with the formats that passed."""


class DeviationRefused(ConfigError):
    """A requested format cannot run the model as it is, and ``allow_deviations`` was not given."""


def planned_deviations(src: SourceModel, plan: dict, allow: bool) -> dict[str, list[str]]:
    """{format: what it runs differently from the model}, decided before any work: a refusal
    naming why and the flag that builds it anyway, unless ``allow``."""
    from ..exporter.gguf_writer import gguf_deviations

    found = {"gguf": gguf_deviations(src.specs, src.config)} if "gguf" in plan else {}
    found = {f: d for f, d in found.items() if d}
    if found and not allow:
        what = "; ".join(d.removeprefix(f"{f}: ") for f, ds in found.items() for d in ds)
        raise DeviationRefused(f"{src.path}: {' and '.join(found)} cannot run this model as it is ({what}); build it "
                               f"anyway with --allow-deviations (the deviation is then measured against PyTorch and "
                               f"recorded in the manifest and the model card), or leave {' and '.join(found)} out "
                               f"of --format")
    return found


def deviation_record(fmt: str, what: Sequence[str], report: dict | None) -> dict:
    """The manifest's ``semantics_deviations`` entry for ``fmt``: what differs and, when the build
    validated, what was measured (per precision, against PyTorch)."""
    measured = [m for m in (report or {}).get("deviations", []) if m.get("format") == fmt]
    lines = [f"measured against PyTorch ({m['precision']}): image embeddings differ by "
             f"{m['embeddings_relative']:.2g} of max|reference|, prompt logits by {m['logits_relative']:.2g} (top-1 "
             f"{'agrees' if m['top1_agrees'] else 'differs'}); greedy answers identical {m['greedy_identical']} "
             f"({m['greedy_agree_with_near_ties']} counting near-ties)" for m in measured]
    return {"format": fmt, "what": list(what),
            "measured": measured or "not measured: built with --no-validate",
            "summary": "; ".join(lines) or "not measured: built with --no-validate"}


def drop_failed_formats(report: dict, parts: list[ExportedPart], root: Path
                        ) -> tuple[list[ExportedPart], list[str]]:
    """Leave every format with a failed validation out of the bundle (its files deleted), keep the
    others; the failure stays in the report. Raises the first failure when nothing would be left."""
    failed = sorted({f["format"] for f in report.get("failed", [])})
    if not failed:
        return parts, []
    kept = [p for p in parts if p.format not in failed]
    if not [p for p in kept if p.format != "torch"]:  # the PyTorch reference copy is no export
        raise ValidationError(report["failed"][0]["error"])
    keep_files = {f for p in kept for f in (p.file, *p.data_files)}
    for p in parts:
        if p.format in failed:
            for f in (p.file, *p.data_files):
                if f not in keep_files:
                    (root / f).unlink(missing_ok=True)
    for f in report["failed"]:
        f["left_out_of_bundle"] = True
    return kept, failed
