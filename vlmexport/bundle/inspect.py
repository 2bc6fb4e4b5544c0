"""``vlmexport inspect``: a bundle summarised for people (the CLI renders it as a table)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from .format import Bundle, BundleError
from .names import MANIFEST
from .schema import validate_runtime
from .summary import format_size, model_facts, validation_summary


def inspect_bundle(path: str | os.PathLike, verify: str = "full") -> dict[str, Any]:
    """A summary of a bundle for people (the CLI renders it; :func:`format_inspection` as text).

    Hashes every file by default, and ``problems`` lists why a runtime would refuse the
    manifest (``schema.validate_runtime``): a tampered bundle is never reported fine."""
    b = Bundle.open(path, verify=verify)
    m = b.manifest
    try:
        validate_runtime(m, b.artifacts, str(b.root / MANIFEST))
        problems = []
    except BundleError as exc:
        problems = [str(exc)]
    sizes = m.get("file_sizes") or {}
    return {
        "path": str(b.root),
        "schema_version": b.schema_version,
        "verified": verify,
        "model": model_facts(m),
        "semantics_deviations": b.semantics_deviations,
        "tokenizer": b.section("tokenizer", {}),
        "preprocessing": b.section("preprocessing", {}),
        "chat_template": _chat_template_summary(b),
        "artifacts": [{"part": a.part, "format": a.format, "precision": a.precision, "file": a.file,
                       "size_bytes": a.total_size_bytes, "data_files": [d["file"] for d in a.data_files],
                       "inputs": [t.to_dict() for t in a.inputs], "outputs": [t.to_dict() for t in a.outputs]}
                      for a in b.artifacts],
        "validation": validation_summary(m.get("validation")),
        "tool_versions": b.section("tool_versions", {}),
        "file_count": len(sizes),
        "total_size_bytes": sum(int(s) for s in sizes.values()),
        "problems": problems,
    }



def _chat_template_summary(b: Bundle) -> dict[str, Any]:
    """The chat_template section with the template's jinja text (older bundles: the section alone)."""
    section = dict(b.section("chat_template", {}) or {})
    if isinstance(section.get("file"), str) and section["file"].endswith(".jinja"):
        try:
            section["jinja"] = b.file(section["file"]).read_text()
        except (OSError, UnicodeDecodeError, BundleError) as exc:
            section["jinja"] = f"(unreadable: {exc})"
    return section


def _kv(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list))) or "-"


def format_inspection(summary: Mapping[str, Any]) -> str:
    """Plain-text rendering of :func:`inspect_bundle`'s summary."""
    s, model = summary, dict(summary.get("model") or {})
    lines = [f"Bundle         {s['path']}  (schema {s['schema_version']}, {s['file_count']} files, "
             f"{format_size(s['total_size_bytes'])}, verified: {s['verified']})"]
    semantics = {k: model.pop(k) for k in ("expert_routing", "position_ids") if k in model}
    lines.append(f"Model          {_kv(model)}")
    lines.append(f"Semantics      {_kv(semantics)}")
    lines += [f"  WARNING      {w if isinstance(w, str) else _kv(w)}" for w in s.get("semantics_deviations", [])]
    lines.append(f"Tokenizer      {_kv(s.get('tokenizer') or {})}")
    lines.append(f"Preprocessing  {_kv(s.get('preprocessing') or {})}")
    tmpl = dict(s.get("chat_template") or {})
    jinja = tmpl.pop("jinja", None)
    lines.append(f"Chat template  {_kv(tmpl)}")
    lines += [f"  | {line}" for line in (jinja.splitlines() if isinstance(jinja, str) else [])]
    lines.append("Artifacts")
    for a in s.get("artifacts", []):
        lines.append(f"  {a['part']:<16} {a['format']:<12} {a['precision']:<8} {format_size(a['size_bytes']):>9}  "
                     f"{a['file']}" + (f" (+{', '.join(a['data_files'])})" if a["data_files"] else ""))
        for kind, specs in (("in ", a["inputs"]), ("out", a["outputs"])):
            for t in specs:
                shape = ", ".join(str(d) for d in t["shape"])
                lines.append(f"      {kind} {t['name']:<24} {t['dtype']:<8} [{shape}]")
    v = s.get("validation") or {}
    if v.get("checks"):
        lines.append(f"Validation     {v['passed']}/{v['checks']} checks passed")
        lines += [f"  FAILED       {_kv(r)}" for r in v.get("failed", [])]
    else:
        lines.append("Validation     none recorded")
    e2e = v.get("end_to_end")
    for row in (e2e if isinstance(e2e, list) else [e2e] if isinstance(e2e, dict) else []):
        lines.append(f"  end to end   {_kv(row)}")
    lines.append(f"Tools          {_kv(s.get('tool_versions') or {})}")
    problems = s.get("problems") or []
    lines.append("Runtime        NOT RUNNABLE: " + problems[0] if problems else
                 "Runtime        every section a runtime reads is valid")
    return "\n".join(lines)
