"""The bundle's README.md: a model card generated from its manifest.

``render_model_card(manifest)`` is pure: a manifest dict in, markdown out. Sections
that hold results (validation, calibration, benchmarks, and whatever later stages
add) are rendered generically: a list of rows becomes a table, a map of scalars a
two-column table, nested maps sub-headings. So a new result section needs no change
here.

Pure python on purpose (no torch, no numpy): :mod:`vlmexport.bundle.format` imports this
module to write a bundle's README, also on a runtime-only install.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .names import SCHEMA_VERSION
from .summary import format_size, model_facts, validation_summary

ROUTING = {
    "image_chunk": "every image position (boi and eoi included) uses the visual expert, text the language "
                   "expert (llama.cpp's behaviour)",
    "hf_cogvlm": "as THUDM's CogVLMForCausalLM: eoi is routed to the language expert",
}
POSITIONS = {
    "sequential": "one position per token, image tokens included (llama.cpp's behaviour)",
    "hf_cogvlm": "as THUDM's CogVLMForCausalLM: boi gets p, every patch p+1, eoi p+2",
}
# result sections rendered generically, in this order (any other section is not shown)
RESULT_SECTIONS = ("validation", "calibration", "benchmarks")


def render_model_card(manifest: Mapping[str, Any]) -> str:
    facts = model_facts(manifest)
    title = _name(manifest, facts)
    out = [f"# {title}", "",
           f"A vlmexport bundle (schema {manifest.get('schema_version', SCHEMA_VERSION)}): everything a device "
           f"needs to run this model without the training code. Generated from `manifest.json`; do not edit, "
           f"rebuild the bundle instead.", ""]
    out += _architecture(facts)
    deviations = manifest.get("semantics_deviations") or []
    if deviations:
        out += ["## Semantics deviations", "",
                "> **Warning:** some artifacts cannot reproduce the model's semantics exactly:", ">"]
        out += [f"> - {_deviation(d)}" for d in deviations] + [""]
    out += _artifacts(manifest.get("artifacts") or [])
    for name in RESULT_SECTIONS:
        value = manifest.get(name)
        if value in (None, {}, []):
            continue
        out += [f"## {_title(name)}", ""]
        if name == "validation":
            out += _validation_headline(value)
        out += _body(value, level=2)
    out += _how_to_run(manifest)
    tools = manifest.get("tool_versions") or {}
    if tools:
        out += ["## Tool versions", ""] + _kv_table(tools) + [""]
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------- sections
def _name(manifest: Mapping[str, Any], facts: Mapping[str, Any]) -> str:
    model = manifest.get("model") or {}
    name = model.get("name") if isinstance(model, dict) else None
    return str(name or facts.get("arch") or "vlmexport model")


def _architecture(facts: Mapping[str, Any]) -> list[str]:
    rows: dict[str, Any] = {}
    if "arch" in facts:
        rows["Architecture"] = f"`{facts['arch']}`"
    if "params" in facts:
        rows["Parameters"] = _count(facts["params"])
    if "image_size" in facts:
        s = facts["image_size"]
        rows["Image size"] = f"{s}x{s} px" if isinstance(s, int) else s
    for key, label in (("image_tokens", "Image tokens"), ("num_hidden_layers", "Decoder layers"),
                       ("hidden_size", "Hidden size"), ("vocab_size", "Vocabulary")):
        if key in facts:
            rows[label] = facts[key]
    for key, label, table in (("expert_routing", "Expert routing", ROUTING), ("position_ids", "Position ids",
                                                                               POSITIONS)):
        if key in facts:
            v = facts[key]
            rows[label] = f"`{v}`: {table[v]}" if v in table else f"`{v}`"
    if not rows:
        return []
    return ["## Architecture", ""] + _kv_table(rows, header=("", "")) + [""]


def _artifacts(artifacts: list[Mapping[str, Any]]) -> list[str]:
    if not artifacts:
        return ["## Artifacts", "", "None.", ""]
    lines = ["## Artifacts", "", "| part | format | precision | size (MB) | file |", "|---|---|---|---:|---|"]
    total = 0
    for a in artifacts:
        size = int(a.get("size_bytes") or 0) + sum(int(d.get("size_bytes") or 0) for d in a.get("data_files") or [])
        total += size
        files = f"`{a.get('file')}`" + "".join(f" + `{d.get('file')}`" for d in a.get("data_files") or [])
        lines.append(f"| {_cell(a.get('part'))} | {_cell(a.get('format'))} | {_cell(a.get('precision'))} | "
                     f"{_mb(size)} | {files} |")
    return lines + ["", f"Total: {format_size(total)} in {len(artifacts)} artifacts.", ""]


def _validation_headline(validation: Any) -> list[str]:
    s = validation_summary(validation)
    if not s["checks"]:
        return []
    if s["passed"] == s["checks"]:
        return [f"**All {s['checks']} checks passed.**", ""]
    return [f"**{s['checks'] - s['passed']} of {s['checks']} checks FAILED.**", ""]


def _how_to_run(manifest: Mapping[str, Any]) -> list[str]:
    return [
        "## How to run", "",
        "`BUNDLE` is this directory.", "",
        "```bash",
        'vlmexport run BUNDLE --image photo.jpg --prompt "Describe the image."',
        "```", "",
        "```python",
        "import vlmexport",
        "",
        'pipe = vlmexport.load("BUNDLE")  # backend="auto": the best backend installed here',
        "# images without an <image> placeholder go where the model's chat template puts them",
        'print(pipe.generate("Describe the image.", images=["photo.jpg"]))',
        "```", "",
    ]


# ----------------------------------------------------------------------- generic rendering
def _body(value: Any, level: int) -> list[str]:
    """Render any JSON value under a heading of ``level``."""
    if _is_rows(value):
        return _table(value) + [""]
    if isinstance(value, dict):
        if value and all(isinstance(v, dict) and _is_flat(v) for v in value.values()):
            return _table([{"name": k, **v} for k, v in value.items()]) + [""]
        flat = {k: v for k, v in value.items() if _is_scalar_like(v)}
        out = _kv_table(flat) + [""] if flat else []
        for k, v in value.items():
            if k in flat or v in (None, {}, []):
                continue
            out += [f"{'#' * min(level + 1, 6)} {_title(k)}", ""] + _body(v, level + 1)
        return out
    if isinstance(value, list):
        return [f"- {_text(v)}" for v in value] + [""]
    return [_cell(value), ""]


def _is_scalar_like(v: Any) -> bool:
    return not isinstance(v, (dict, list)) or (isinstance(v, list) and all(not isinstance(x, (dict, list))
                                                                          for x in v))


def _is_flat(d: Mapping[str, Any]) -> bool:
    return all(_is_scalar_like(v) for v in d.values())


def _is_rows(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)


def _table(rows: list[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if _numeric(rows, c) else "---" for c in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), c) for c in cols) + " |")
    return lines


def _kv_table(d: Mapping[str, Any], header: tuple[str, str] = ("key", "value")) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {_cell(k)} | {_cell(v, k)} |" for k, v in d.items()]


def _numeric(rows: list[Mapping[str, Any]], col: str) -> bool:
    vals = [r.get(col) for r in rows if r.get(col) is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def _cell(v: Any, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        if key == "passed":
            return "pass" if v else "**FAIL**"
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6) else f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_cell(x) for x in v)
    if isinstance(v, dict):
        v = json.dumps(v, separators=(",", ":"))
    return str(v).replace("|", "\\|").replace("\n", " ")


def _deviation(d: Any) -> str:
    """A recorded deviation: what differs, then what was measured (pipeline/deviations.py's record)."""
    if isinstance(d, dict) and "summary" in d:
        what = d.get("what") or []
        return _cell("; ".join(what) if isinstance(what, list) else str(what)) + f". **{_cell(d['summary'])}**"
    return _text(d)


def _text(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_cell(x, k)}" for k, x in v.items())
    return _cell(v)


def _title(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _count(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit} ({int(n):,})"
    return f"{int(n):,}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}" if n >= 100_000 else f"{n / 1e6:.3f}"
