"""What an export stage wrote: one :class:`ExportedPart` per file (with its data files and
IO), the typed result the orchestration adds to the bundle manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ExportedPart:
    part: str
    format: str
    precision: str
    file: str  # relative to the bundle
    data_files: tuple[str, ...]
    inputs: tuple[dict, ...]
    outputs: tuple[dict, ...]
    seconds: float
    extra: dict = field(default_factory=dict)


def exported_part(part: str, precision: str, rel: str, g, root: Path, seconds: float) -> ExportedPart:
    if isinstance(g, Path):  # a plain table (token embedding): described by its one tensor
        from safetensors import safe_open

        with safe_open(str(g), framework="numpy") as f:
            sl = f.get_slice("weight")
            table = {"name": "weight", "dtype": {"F32": "float32", "F16": "float16"}.get(sl.get_dtype(), sl.get_dtype()),
                     "shape": list(sl.get_shape())}
        return ExportedPart(part, "onnx", precision, rel, (), (), (table,), seconds)
    files = [Path(f) for f in g.files]
    data = tuple(str(f.relative_to(root)) for f in files if f.resolve() != (root / rel).resolve())
    io = lambda specs: tuple(x.to_dict() if hasattr(x, "to_dict") else asdict(x) for x in specs)  # noqa: E731
    return ExportedPart(part, "onnx", precision, rel, data, io(getattr(g, "inputs", ())), io(getattr(g, "outputs", ())),
                        seconds)
