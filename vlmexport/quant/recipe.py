"""Quantization recipes: ordered rules matched against node and weight names.

A rule is ``(pattern, precision)``; the first rule whose ``fnmatch`` pattern matches
the node name or its weight (initializer) name decides; ``precision=None`` keeps that
node in full precision. A node no rule matches keeps full precision too. Recipes are
per part (``vision_encoder``, ``connector``, ``text_decoder``) and backend-agnostic;
they load from JSON (``--recipe FILE``)::

    {"text_decoder": [["lm_head", null], ["layers.0.*", "int8"], ["*", "int4"]],
     "vision_encoder": [["*", "int8"]]}

Defaults: the LM head is never 4-bit: it decides every token and is one matrix, so 4-bit
error there moves top-1 directly. It is 8-bit weight-only instead (llama.cpp keeps its
``output.weight`` at 6-8 bits in its 4-bit types; onnxruntime-genai's builder, 0.18, puts
it in int4 unless told otherwise). Every other MatMul takes the requested precision. The
LM head is read whole for every token, so its precision weighs on decode speed: on bench-s
(2 cores) an fp32 head is 131 MB of the int4 decoder's 0.26 GB per token; with the int8
head int4 decode went from 2.1-2.2x to 2.6x fp32 (docs/results.md), and no answer of the
demo model changed (docs/quantization.md). ``["lm_head", null]`` keeps it fp32.
An architecture may override with a ``default_quant_recipe`` class attribute (a dict in
the JSON form above) in its registry file.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..core.errors import ConfigError
from ..core.names import ONNX_QUANTIZED, Part

PRECISIONS = tuple(p.value for p in ONNX_QUANTIZED)
PARTS = (Part.VISION_ENCODER, Part.CONNECTOR, Part.TEXT_DECODER)


@dataclass(frozen=True)
class Rule:
    pattern: str
    precision: str | None  # None: keep full precision

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"recipe rule {self.pattern!r}: precision {self.precision!r} is not one of "
                             f"{list(PRECISIONS)} or null")

    def matches(self, names: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, self.pattern) for n in names if n)


@dataclass(frozen=True)
class QuantRecipe:
    """Per-part ordered rules; the first match wins."""

    rules: Mapping[str, tuple[Rule, ...]]

    def precision_of(self, part: str, *names: str) -> str | None:
        """The precision for a node known by ``names`` (node name, weight name); None: full precision."""
        for r in self.rules.get(part, ()):
            if r.matches(names):
                return r.precision
        return None

    def select(self, part: str, nodes: Sequence[tuple[str, str]]) -> dict[str, str | None]:
        """``{node name: precision or None}`` for (node name, weight name) pairs."""
        return {n: self.precision_of(part, n, w) for n, w in nodes}

    def to_dict(self) -> dict:
        return {part: [[r.pattern, r.precision] for r in rules] for part, rules in self.rules.items()}

    def over(self, base: "QuantRecipe") -> "QuantRecipe":
        """This recipe's parts, and ``base``'s rules for the parts it does not name (a user
        recipe that only changes the decoder keeps the default INT8 vision parts)."""
        return QuantRecipe({**dict(base.rules), **dict(self.rules)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[Sequence]]) -> "QuantRecipe":
        if not isinstance(d, Mapping) or not all(isinstance(rs, (list, tuple)) for rs in d.values()):
            raise ConfigError('a recipe is a JSON object of rule lists, like {"text_decoder": [["lm_head", null], '
                              '["*", "int4"]]}')
        unknown = sorted(set(d) - set(PARTS))
        if unknown:
            raise ConfigError(f"recipe names unknown part(s) {unknown}; use {list(PARTS)}")
        rules = {}
        for part, rs in d.items():
            out = []
            for r in rs:
                if not (isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)):
                    raise ConfigError(f"recipe rule {r!r} for {part}: write [pattern, precision or null]")
                out.append(Rule(r[0], r[1]))
            rules[part] = tuple(out)
        return cls(rules)

    @classmethod
    def load(cls, path: str | Path) -> "QuantRecipe":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the recipe ({e}); give a JSON file like "
                             '{"text_decoder": [["lm_head", null], ["*", "int4"]]}') from None


def default_recipe(arch: type | None = None) -> QuantRecipe:
    """Vision parts INT8 everywhere; decoder: LM head int8, int4 elsewhere (int8 builds ask for
    int8 instead: see :func:`for_precision`)."""
    custom = getattr(arch, "default_quant_recipe", None) if arch is not None else None
    if custom:
        return QuantRecipe.from_dict(custom)
    return QuantRecipe.from_dict({Part.VISION_ENCODER: [["*", "int8"]], Part.CONNECTOR: [["*", "int8"]],
                             Part.TEXT_DECODER: [["lm_head", "int8"], ["lm_head.*", "int8"], ["*", "int4"]]})


def for_precision(recipe: QuantRecipe, part: str, precision: str) -> QuantRecipe:
    """The recipe as used for a build of ``precision``: a rule asking for a quantized precision
    that is lower than the build's is raised to the build's (an int8 build never writes int4)."""
    order = {"int4": 0, "int8": 1}
    rules = dict(recipe.rules)
    rules[part] = tuple(Rule(r.pattern, r.precision if r.precision is None or order[r.precision] >= order[precision]
                             else precision) for r in recipe.rules.get(part, ()))
    return QuantRecipe(rules)
