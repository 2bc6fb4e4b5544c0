"""Registries filled by decorator: import every module of a package once, found on disk.

The architecture registry (``vlmexport.models``) and the connector kinds
(``vlmexport.models.connectors``) use it, so adding one is adding a file, with no list of
imports to extend and no import cycle between a registry and its members.
"""

from __future__ import annotations

import importlib
import pkgutil

_DONE: set[str] = set()


def import_package_modules(package: str) -> None:
    """Import every module directly inside ``package`` (once per process)."""
    if package in _DONE:
        return
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")
    _DONE.add(package)
