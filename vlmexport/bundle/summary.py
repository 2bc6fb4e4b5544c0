"""Summaries of a manifest for people: headline model facts and the validation count.

Pure python (no torch, no numpy), shared by the model card and ``vlmexport inspect``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def _bfs(d: Any, keys: Sequence[str]) -> Any:
    """First value under any of ``keys``, searching nested dicts breadth first."""
    queue = [d]
    while queue:
        cur = queue.pop(0)
        if not isinstance(cur, dict):
            continue
        for k in keys:
            if cur.get(k) is not None:
                return cur[k]
        queue.extend(v for v in cur.values() if isinstance(v, dict))
    return None


def model_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The headline facts of the model section (whatever its nesting): arch, params, semantics."""
    model = manifest.get("model") or {}
    pre = manifest.get("preprocessing") or {}
    facts = {
        "arch": _bfs(model, ("arch", "architecture", "arch_name", "model_type")),
        "params": _bfs(model, ("params", "num_parameters", "parameters")),
        "image_size": _bfs(model, ("image_size",)) or _bfs(pre, ("image_size",)),
        "image_tokens": _bfs(model, ("image_tokens",)),
        "hidden_size": _bfs(model, ("hidden_size",)),
        "num_hidden_layers": _bfs(model, ("num_hidden_layers", "num_layers")),
        "vocab_size": _bfs(model, ("vocab_size",)),
        "expert_routing": _bfs(model, ("expert_routing",)),
        "position_ids": _bfs(model, ("position_ids",)),
    }
    return {k: v for k, v in facts.items() if v is not None}


def validation_summary(validation: Any) -> dict[str, Any]:
    """Count every row with a boolean ``passed`` anywhere in the validation section."""
    rows: list[dict[str, Any]] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if isinstance(v.get("passed"), bool):
                rows.append(v)
            for x in v.values():
                if isinstance(x, (dict, list)):
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(validation)
    end_to_end = validation.get("end_to_end") if isinstance(validation, dict) else None
    return {"checks": len(rows), "passed": sum(r["passed"] for r in rows),
            "failed": [r for r in rows if not r["passed"]], "end_to_end": end_to_end}



def format_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
