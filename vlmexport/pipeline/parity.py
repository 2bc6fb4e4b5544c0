"""Strict, ordered validation of an exported ONNX part against its PyTorch reference.

The checks run in a fixed order and the first failure raises :class:`ValidationError`
(a parity failure never just prints):

1. ``output_names``  the graph's outputs are exactly the expected names, in order;
2. ``dynamic_axes``  every declared axis name is a ``dim_param`` of that input/output at
   that index, and the graph runs with two different sizes of every dynamic input axis
   (output axes of the same name follow the size);
3. ``shapes``        every output's shape equals the reference's;
4. ``values``        every output is within the precision's tolerance of the reference.

Each check yields a frozen :class:`CheckResult` (part, precision, check, max_abs_diff,
tolerance, passed) that the build writes into the bundle manifest; a failure's
results (the passed checks and the failed one) ride on the exception as ``.results``.

Tolerances live here, keyed by precision, not in callers: fp32 ``max|diff| <= 1e-4``;
fp16 ``max|diff| <= 1e-2 * max|reference|`` (relative to the fp32 scale of the output).
Quantized artifacts are scored by logit agreement and task accuracy elsewhere.

    results = validate_part("onnx/vision_encoder.fp32.onnx", reference, {"pixel_values": x},
                            ["image_features"], exported.dynamic_axes, "fp32", "vision_encoder")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, NoReturn, Sequence

import numpy as np

from ..core.errors import VlmexportError

CHECKS = ("output_names", "dynamic_axes", "shapes", "values")


class ValidationError(VlmexportError):
    """An exported part disagrees with its PyTorch reference; ``results`` holds the checks run."""

    def __init__(self, message: str, results: Sequence["CheckResult"] = ()):
        super().__init__(message)
        self.results = tuple(results)


@dataclass(frozen=True)
class Tolerance:
    """Allowed ``max|onnx - reference|``: ``atol + rel_to_scale * max|reference|``."""

    atol: float = 0.0
    rel_to_scale: float = 0.0

    def bound(self, reference: np.ndarray) -> float:
        scale = float(np.max(np.abs(reference))) if reference.size else 0.0
        return self.atol + self.rel_to_scale * scale

    def describe(self) -> str:
        parts = ([f"atol {self.atol:g}"] if self.atol else []) + (
            [f"{self.rel_to_scale:g} x max|reference|"] if self.rel_to_scale else [])
        return " + ".join(parts) or "exact"


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4),
    "fp16": Tolerance(rel_to_scale=1e-2),
}


def tolerance_for(precision: str) -> Tolerance:
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise ValueError(f"no value tolerance for precision {precision!r}; known: {sorted(TOLERANCES)} "
                         "(quantized parts are scored by logit agreement instead)") from None


@dataclass(frozen=True)
class CheckResult:
    part: str
    precision: str
    check: str  # one of CHECKS
    max_abs_diff: float | None  # values check only
    tolerance: float | None  # values check only: the largest bound over the outputs
    passed: bool

    def to_dict(self) -> dict:
        return {"part": self.part, "precision": self.precision, "check": self.check,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "passed": self.passed}


def _session(onnx_path: str | os.PathLike, providers: Sequence[str] | None, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), opts, providers=list(providers or ["CPUExecutionProvider"]))


def _declared_shapes(onnx_path: str | os.PathLike) -> dict[str, list[int | str | None]]:
    """The input/output shapes as the file declares them (dim_param names, dim_value sizes).

    Read from the file, not the session: onnxruntime reports shapes after its own
    inference, which may replace a declared axis name.
    """
    import onnx

    graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    shapes: dict[str, list[int | str | None]] = {}
    for vi in list(graph.input) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_param if d.HasField("dim_param") else
                           (d.dim_value if d.HasField("dim_value") else None) for d in dims]
    return shapes


def _resize(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``a`` with ``axis`` cut or cyclically extended to ``size``."""
    idx = np.arange(size) % a.shape[axis]
    return np.take(a, idx, axis=axis)


def _largest_diff(actual: np.ndarray, reference: np.ndarray) -> tuple[float, tuple[int, ...]]:
    diff = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    bad = ~np.isfinite(diff)
    if bad.any():
        return float("inf"), tuple(int(i) for i in np.argwhere(bad)[0])
    if diff.size == 0:
        return 0.0, ()
    flat = int(np.argmax(diff))
    return float(diff.reshape(-1)[flat]), tuple(int(i) for i in np.unravel_index(flat, diff.shape))


ReferenceFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


class _Run:
    """The results of one part's checks so far; ``fail`` records the failed check and raises."""

    def __init__(self, part: str, precision: str, onnx_path: str | os.PathLike):
        self.part, self.precision = part, precision
        self.where = f"{part} ({precision}, {os.fspath(onnx_path)})"
        self.results: list[CheckResult] = []

    def record(self, check: str, passed: bool, diff: float | None = None, bound: float | None = None) -> None:
        self.results.append(CheckResult(self.part, self.precision, check, diff, bound, passed))

    def fail(self, check: str, message: str, diff: float | None = None, bound: float | None = None) -> NoReturn:
        self.record(check, False, diff, bound)
        raise ValidationError(f"{self.where}: {message}", self.results)


def validate_part(onnx_path: str | os.PathLike, reference_fn: ReferenceFn,
                  inputs: Mapping[str, np.ndarray], expected_outputs: Sequence[str],
                  dynamic_axes: Mapping[str, Mapping[int, str]], precision: str, part: str,
                  tolerance: Tolerance | None = None, providers: Sequence[str] | None = None,
                  threads: int | None = None) -> list[CheckResult]:
    """Run the four checks in order; return one :class:`CheckResult` each, or raise :class:`ValidationError`.

    ``reference_fn(inputs)`` runs the PyTorch part on the same inputs (it converts dtypes
    itself) and returns ``{output name: array}``. ``dynamic_axes`` is
    ``{io name: {axis index: axis name}}`` (``ExportedGraph.dynamic_axes``).
    ``tolerance`` overrides the precision's default.
    """
    run = _Run(part, precision, onnx_path)
    sess = _session(onnx_path, providers, threads)
    feeds = {k: np.asarray(v) for k, v in inputs.items()}

    # 1. output names
    names = [o.name for o in sess.get_outputs()]
    if names != list(expected_outputs):
        run.fail("output_names", f"the graph's outputs are {names} but {list(expected_outputs)} were expected; "
                                 "re-export the part")
    run.record("output_names", True)
    # 2. dynamic axes: declared as dim_param, and the graph runs with two sizes of each
    _check_declared_axes(run, _declared_shapes(onnx_path), dynamic_axes)
    _check_axes_run(run, sess, names, feeds, dynamic_axes)
    run.record("dynamic_axes", True)
    # 3. shapes
    try:
        actual = dict(zip(names, sess.run(None, feeds)))
    except Exception as exc:  # onnxruntime raises several types
        run.fail("shapes", f"onnxruntime cannot run the graph on the validation inputs: {str(exc).splitlines()[0]}")
    reference = {k: np.asarray(v) for k, v in reference_fn(dict(feeds)).items()}
    for name in expected_outputs:
        if name not in reference:
            run.fail("shapes", f"the PyTorch reference returned no output {name!r} (it returned {sorted(reference)})")
        if actual[name].shape != reference[name].shape:
            run.fail("shapes", f"output {name} has shape {list(actual[name].shape)} but the PyTorch reference has "
                               f"{list(reference[name].shape)}")
    run.record("shapes", True)
    # 4. values
    _check_values(run, actual, reference, expected_outputs, tolerance or tolerance_for(precision))
    return run.results


def _check_declared_axes(run: _Run, graph_shapes: Mapping[str, list], dynamic_axes: Mapping[str, Mapping[int, str]]
                         ) -> None:
    for io_name, axes in dynamic_axes.items():
        if io_name not in graph_shapes:
            run.fail("dynamic_axes", f"dynamic axes are declared for {io_name!r}, which is no input or output of the "
                                     f"graph ({sorted(graph_shapes)})")
        shape = graph_shapes[io_name]
        for axis, axis_name in axes.items():
            if not -len(shape) <= axis < len(shape) or shape[axis] != axis_name:
                got = shape[axis] if -len(shape) <= axis < len(shape) else "no such axis"
                run.fail("dynamic_axes", f"{io_name} axis {axis} should be the dynamic axis {axis_name!r} but the "
                                         f"graph declares {got!r} (shape {shape}); export it with that axis dynamic")


def _check_axes_run(run: _Run, sess, names: list[str], feeds: dict[str, np.ndarray],
                    dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Run with two other sizes of every dynamic input axis; outputs sharing the axis name must follow."""
    by_name: dict[str, list[tuple[str, int]]] = {}
    for io_name, axes in dynamic_axes.items():
        for axis, axis_name in axes.items():
            by_name.setdefault(axis_name, []).append((io_name, axis))
    for axis_name, uses in by_name.items():
        in_uses = [(n, a) for n, a in uses if n in feeds]
        if not in_uses:
            continue  # an output-only axis (e.g. a token count that follows an input)
        base = feeds[in_uses[0][0]].shape[in_uses[0][1]]
        for size in (base + 1, max(1, base - 1) if base > 1 else base + 2):
            trial = dict(feeds)
            for n, a in in_uses:
                trial[n] = _resize(feeds[n], a, size)
            try:
                outs = dict(zip(names, sess.run(None, trial)))
            except Exception as exc:  # onnxruntime raises several types
                run.fail("dynamic_axes", f"running with {axis_name}={size} failed: {str(exc).splitlines()[0]}")
            for n, a in uses:
                if n in outs and outs[n].shape[a] != size:
                    run.fail("dynamic_axes", f"with {axis_name}={size} output {n} has shape {list(outs[n].shape)}; "
                                             f"axis {a} should follow {axis_name}")


def _check_values(run: _Run, actual: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  expected_outputs: Sequence[str], tol: Tolerance) -> None:
    worst_diff, worst_bound = 0.0, 0.0
    for name in expected_outputs:
        ref = reference[name].astype(np.float32)
        diff, index = _largest_diff(actual[name], ref)
        bound = tol.bound(ref)
        worst_diff, worst_bound = max(worst_diff, diff), max(worst_bound, bound)
        if not diff <= bound:
            got = actual[name][index]
            run.fail("values", f"output {name} differs from the PyTorch reference by {diff:.6g} at index "
                               f"{list(index)} (onnx {float(got):.6g}, reference {float(ref[index]):.6g}); "
                               f"tolerance {bound:.6g} ({tol.describe()})", diff, bound)
    run.record("values", True, worst_diff, worst_bound)
