"""pytest parameters over the registry: every (architecture, routing, positions) its tiny
config accepts. A plain module (not conftest), so test modules in any folder import it
without one folder's conftest shadowing another's."""

from __future__ import annotations

import pytest

from vlmexport.models import architectures, get_architecture


def accepts_semantics(arch: str, routing: str, positions: str) -> bool:
    """Whether ``arch``'s tiny config accepts these routing / position semantics."""
    from vlmexport.core.errors import ConfigError

    try:
        get_architecture(arch).tiny_config(expert_routing=routing, position_ids=positions)
    except ConfigError:
        return False
    return True


def arch_semantics(semantics: list[tuple[str, str]]) -> list:
    """pytest params for every (architecture, routing, positions) its tiny config accepts."""
    return [pytest.param(a, r, p, id=f"{a}-{r}-{p}") for a in sorted(architectures()) for r, p in semantics
            if accepts_semantics(a, r, p)]


def cross_attending(arch: str) -> bool:
    """Whether ``arch``'s decoder cross-attends to its images (they take no embeddings in its sequence)."""
    A = get_architecture(arch)
    return A.part_specs(A.tiny_config()).decoder.cross_attention is not None


def tensorrt_archs() -> list[str]:
    """Architectures the TensorRT profile can express (it refuses cross-attending decoders)."""
    return [a for a in sorted(architectures()) if not cross_attending(a)]
