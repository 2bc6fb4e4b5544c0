"""Graph-building helpers shared by the ONNX writers, with streaming external data.

The ONNX writers build graphs directly from checkpoint tensors (see
``vlmexport.models.spec``) instead of tracing a module, so a part larger than RAM
exports: every weight is converted and appended to one ``<file>.onnx.data`` file the
moment it is handed to :meth:`GraphBuilder.weight` / :meth:`GraphBuilder.linear_weight`,
and the ``ModelProto`` only references it (``data_location=EXTERNAL`` with offset and
length). Peak memory is about one checkpoint tensor (one fused q/k/v group) plus a
conversion chunk of :data:`CHUNK_BYTES`. Every checkpoint tensor goes to the data file,
however small, so all exported parts have the same layout; only tiny constants built
here (shapes, scalars such as 1/sqrt(2)) are stored inline.

    with GraphBuilder("vision_encoder.fp16.onnx", "vision_encoder", "fp16") as g:
        x = g.input("pixel_values", ("num_images", 3, 224, 224))
        w = g.linear_weight("fc.weight", [tensors.get("fc.weight")])   # written now, [in, out]
        b = g.weight("fc.bias", tensors.get("fc.bias"))
        y = g.activation(g.linear(x, w, b), "gelu")
        g.output(y, "features", ("num_images", 256, 1024))
        exported = g.finish()     # ExportedGraph: files written + IO for the manifest

Conventions:

- Values are named by strings (ONNX value names); every helper takes value names and
  returns the name of its result.
- ``GraphBuilder.dtype`` is the float type of the graph ("fp32" -> float32, "fp16" ->
  float16): weights, float constants and the float graph inputs/outputs use it.
- Linear layers are ``MatMul(x, W)`` with ``W`` stored transposed as [in, out]
  (plus ``Add`` for a bias): no ``Transpose`` at run time, and the layout that
  per-channel INT8 / block-wise INT4 quantizers expect for MatMul weights.
- Opset 17 (``LayerNormalization`` exists, ``Gelu`` does not) and IR version 8, the
  newest pair every target reads (onnxruntime >= 1.14, TensorRT 8.6+ / 10.3 on Jetson
  JetPack 6). No ``com.microsoft`` contrib ops: onnxruntime fuses the plain-op GELU and
  LayerNorm patterns itself at session creation, and TensorRT reads plain ops only.
- Writes are atomic per file: the graph and its data file are written under temporary
  names and renamed in :meth:`GraphBuilder.finish`; an error (or leaving the ``with``
  block without ``finish``) removes them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; onnx >= 1.21 would write 10+ by default
CHUNK_BYTES = 16 << 20  # conversion / transposition chunk when streaming a weight
ALIGN = 64  # byte alignment of every tensor in the data file
LARGE_ALIGN = 1 << 16  # tensors >= LARGE_THRESHOLD start on a 64 KiB boundary (mmap granularity)
LARGE_THRESHOLD = 1 << 20

PRECISIONS = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}

Dim = int | str  # a static size or a named dynamic axis
Shape = tuple[Dim, ...]


# ---------------------------------------------------------------------------- tensors
class TensorSource(Protocol):
    """Anything that hands out checkpoint tensors by name (``SafetensorsCheckpoint`` does)."""

    def get(self, name: str) -> torch.Tensor: ...

    def keys(self) -> Iterable[str]: ...


class StateDictTensors:
    """A :class:`TensorSource` over an in-memory module (tests, freshly trained models).

    Names are the module's ``state_dict`` keys, which are the checkpoint names for every
    architecture in :mod:`vlmexport.models`.
    """

    def __init__(self, module: torch.nn.Module | Mapping[str, torch.Tensor]):
        self._state = dict(module.state_dict() if isinstance(module, torch.nn.Module) else module)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name].detach()

    def keys(self) -> list[str]:
        return list(self._state)


def fused_name(names: str | Sequence[str]) -> str:
    """Initializer name for a projection given as one name or a (q, k, v) tuple.

    ``("a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight")`` -> ``"a.qkv_proj.weight"``.
    """
    if isinstance(names, str):
        return names
    prefix = os.path.commonprefix(list(names))
    return f"{prefix}{'qkv' if len(names) == 3 else 'fused'}_proj.weight" if prefix else "+".join(names)


# ------------------------------------------------------------------------ the IO record
@dataclass(frozen=True)
class IOSpec:
    """One graph input or output, as the bundle manifest records it."""

    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    shape: Shape  # ints for static sizes, strings for named dynamic axes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ExportedGraph:
    """What one ONNX export wrote: the graph file, its external data file and its IO."""

    path: Path
    data_path: Path
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    precision: str
    data_bytes: int = 0  # bytes of checkpoint tensors in the data file (alignment padding excluded)
    opset: int = OPSET

    @property
    def files(self) -> tuple[Path, Path]:
        return (self.path, self.data_path)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{io_name: {axis_index: axis_name}}`` for every named (dynamic) dimension."""
        axes: dict[str, dict[int, str]] = {}
        for io in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(io.shape) if isinstance(d, str)}
            if named:
                axes[io.name] = named
        return axes


# ----------------------------------------------------------------- streaming the data
class ExternalDataFile:
    """Append-only writer of one ONNX external-data file.

    :meth:`append` writes a tensor's bytes (given as chunks) at the next aligned offset
    and returns ``(offset, length)`` for the tensor's ``external_data`` entries.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.size = 0

    def append(self, chunks: Iterable[bytes | np.ndarray], nbytes: int) -> tuple[int, int]:
        align = LARGE_ALIGN if nbytes >= LARGE_THRESHOLD else ALIGN
        pad = -self.size % align
        if pad:
            self._f.write(b"\0" * pad)
            self.size += pad
        offset, written = self.size, 0
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk)).cast("B") if isinstance(chunk, np.ndarray) else chunk
            self._f.write(data)
            written += len(data)
        if written != nbytes:
            raise RuntimeError(f"{self.path}: wrote {written} bytes for a tensor of {nbytes} bytes")
        self.size += written
        return offset, written

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _to_numpy_dtype(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A torch tensor (any float dtype, bf16 included) as a numpy array of ``dtype``."""
    if t.dtype == torch.bfloat16 or (t.is_floating_point() and dtype.kind == "f"):
        t = t.to(torch.float32)
    return t.detach().cpu().numpy().astype(dtype, copy=False)


def _row_chunks(t: torch.Tensor, dtype: np.dtype) -> Iterator[np.ndarray]:
    """``t`` converted to ``dtype`` in chunks of leading-dimension rows."""
    flat = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)
    row_bytes = max(1, flat.shape[1] * dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    for r in range(0, flat.shape[0], step):
        yield _to_numpy_dtype(flat[r: r + step], dtype)


def _transposed_concat_chunks(parts: Sequence[torch.Tensor], dtype: np.dtype) -> Iterator[np.ndarray]:
    """``cat(parts, dim=0).T`` (parts are [out_i, in]) in chunks of rows of the result."""
    n_in = parts[0].shape[1]
    row_bytes = sum(p.shape[0] for p in parts) * dtype.itemsize
    step = max(1, CHUNK_BYTES // row_bytes)
    for c in range(0, n_in, step):
        yield np.concatenate([_to_numpy_dtype(p[:, c: c + step].T, dtype) for p in parts], axis=1)


# ---------------------------------------------------------------------- the builder
class GraphBuilder:
    """Builds one ONNX graph whose weights stream into ``<out_path>.data``.

    ``precision`` ("fp32" | "fp16") sets :attr:`dtype`, the float type of weights,
    constants and float IO. Use as a context manager; call :meth:`finish` to write.
    """

    def __init__(self, out_path: str | os.PathLike, graph_name: str, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.dtype: np.dtype = PRECISIONS[precision]
        self.onnx_type = _ONNX_TYPES[self.dtype]
        self.path = Path(out_path)
        self.data_path = self.path.with_name(self.path.name + ".data")
        self.graph_name = graph_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_onnx = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self._tmp_data = self.data_path.with_name(f".{self.data_path.name}.{os.getpid()}.partial")
        self._data = ExternalDataFile(self._tmp_data)
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[TensorProto] = []
        self._inputs: list[IOSpec] = []
        self._outputs: list[IOSpec] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._counter = 0
        self._finished = False
        self.weight_bytes = 0  # bytes of checkpoint tensors written to the data file

    # ----------------------------------------------------------- context / lifecycle
    def __enter__(self) -> "GraphBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            self.abort()

    def abort(self) -> None:
        """Close and delete the partial files (nothing is left behind)."""
        self._data.close()
        for p in (self._tmp_data, self._tmp_onnx):
            p.unlink(missing_ok=True)

    def finish(self, metadata: Mapping[str, str] | None = None) -> ExportedGraph:
        """Check the graph, write ``<out>.onnx`` and ``<out>.onnx.data`` and return what was written."""
        if not self._outputs:
            raise ValueError(f"graph {self.graph_name} has no outputs")
        self._data.close()
        graph = helper.make_graph(
            self._nodes, self.graph_name,
            [helper.make_tensor_value_info(io.name, _ONNX_TYPES[np.dtype(io.dtype)], list(io.shape))
             for io in self._inputs],
            [helper.make_tensor_value_info(io.name, _ONNX_TYPES[np.dtype(io.dtype)], list(io.shape))
             for io in self._outputs],
            initializer=self._initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                  producer_name="vlmexport")
        for k, v in (metadata or {}).items():
            model.metadata_props.add(key=str(k), value=str(v))
        try:
            os.replace(self._tmp_data, self.data_path)
            self._tmp_onnx.write_bytes(model.SerializeToString())
            # checked from the file so that the data file's name resolves; it is not read
            onnx.checker.check_model(str(self._tmp_onnx))
            os.replace(self._tmp_onnx, self.path)
        except BaseException:
            self.abort()
            self.data_path.unlink(missing_ok=True)
            raise
        self._finished = True
        return ExportedGraph(self.path, self.data_path, tuple(self._inputs), tuple(self._outputs),
                             self.precision, self.weight_bytes)

    # -------------------------------------------------------------------- naming
    def fresh(self, prefix: str) -> str:
        """A value name not used yet in this graph."""
        self._counter += 1
        name = f"{prefix}_{self._counter}"
        while name in self._names:
            self._counter += 1
            name = f"{prefix}_{self._counter}"
        self._names.add(name)
        return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"value name {name!r} is used twice in graph {self.graph_name}")
        self._names.add(name)
        return name

    # ------------------------------------------------------------------ graph IO
    def input(self, name: str, shape: Sequence[Dim], dtype: np.dtype | str | None = None) -> str:
        """Declare a graph input (float inputs default to the graph's dtype)."""
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        self._inputs.append(IOSpec(self._claim(name), dt.name, tuple(shape)))
        return name

    def output(self, value: str, name: str, shape: Sequence[Dim], dtype: np.dtype | str | None = None) -> str:
        """Declare ``value`` as a graph output called ``name``."""
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        if value != name:
            self.node("Identity", [value], outputs=[self._claim(name)])
        self._outputs.append(IOSpec(name, dt.name, tuple(shape)))
        return name

    # ---------------------------------------------------------------- initializers
    def _external(self, name: str, shape: Sequence[int], dtype: np.dtype, chunks: Iterable[np.ndarray]) -> str:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset, length = self._data.append(chunks, nbytes)
        t = TensorProto(name=self._claim(name), data_type=_ONNX_TYPES[dtype], dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        self._initializers.append(t)
        self.weight_bytes += length
        return name

    def weight(self, name: str, tensor: torch.Tensor, shape: Sequence[int] | None = None,
               dtype: np.dtype | str | None = None) -> str:
        """Write a checkpoint tensor to the data file now (optionally reshaped); returns its name.

        Converts to ``dtype`` (default: the graph's float type) chunk by chunk.
        """
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        shape = tuple(tensor.shape) if shape is None else tuple(shape)
        if int(np.prod(shape, dtype=np.int64)) != tensor.numel():
            raise ValueError(f"tensor {name} of shape {tuple(tensor.shape)} cannot be viewed as {shape}")
        chunks = _row_chunks(tensor.contiguous(), dt) if tensor.numel() else iter(())
        return self._external(name, shape, dt, chunks)

    def linear_weight(self, name: str, parts: Sequence[torch.Tensor], dtype: np.dtype | str | None = None) -> str:
        """Write ``cat(parts, dim=0).T`` ([in, sum(out_i)]) for ``MatMul(x, W)``; returns its name.

        ``parts`` are nn.Linear-style ``[out_i, in]`` weights (one, or q, k, v to fuse);
        the transposition and concatenation happen chunk by chunk while writing.
        """
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        if len({p.shape[1] for p in parts}) != 1 or any(p.ndim != 2 for p in parts):
            raise ValueError(f"{name}: cannot fuse weights of shapes {[tuple(p.shape) for p in parts]}")
        shape = (parts[0].shape[1], sum(p.shape[0] for p in parts))
        return self._external(name, shape, dt, _transposed_concat_chunks(parts, dt))

    def bias(self, name: str, parts: Sequence[torch.Tensor], dtype: np.dtype | str | None = None) -> str:
        """Write ``cat(parts)`` (the biases of the fused projections) to the data file."""
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        return self.weight(name, torch.cat([p.reshape(-1) for p in parts]), dtype=dt)

    def const(self, value: Any, dtype: np.dtype | str | None = None) -> str:
        """A small inline constant (shapes, scalars). Floats default to the graph's dtype.

        Equal constants are shared. Never use this for checkpoint weights.
        """
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        elif arr.dtype.kind == "f":
            arr = arr.astype(self.dtype)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self._initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    # ----------------------------------------------------------------------- nodes
    def node(self, op_type: str, inputs: Sequence[str], n_outputs: int = 1, outputs: Sequence[str] | None = None,
             domain: str = "", **attrs: Any) -> str | tuple[str, ...]:
        """Append a node; returns its output name (a tuple when it has several outputs).

        An empty string in ``inputs`` is an omitted optional input.
        """
        outs = list(outputs) if outputs is not None else [self.fresh(op_type.lower()) for _ in range(n_outputs)]
        self._nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"n_{op_type}"),
                                            domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def cast(self, x: str, dtype: np.dtype | str) -> str:
        return self.node("Cast", [x], to=_ONNX_TYPES[np.dtype(dtype)])

    # ---------------------------------------------------------------------- layers
    def linear(self, x: str, weight: str, bias: str | None = None) -> str:
        """``x @ W (+ b)`` with ``W`` an initializer from :meth:`linear_weight` ([in, out])."""
        y = self.node("MatMul", [x, weight])
        return self.node("Add", [y, bias]) if bias else y

    def layer_norm(self, x: str, weight: str, bias: str | None, eps: float) -> str:
        """LayerNorm over the last axis (opset 17 ``LayerNormalization``).

        ``stash_type=1`` keeps the mean and variance in float32 even in an fp16 graph
        (onnxruntime and TensorRT honour it), so no Casts are needed.
        """
        return self.node("LayerNormalization", [x, weight, bias or ""], axis=-1, epsilon=float(eps), stash_type=1)

    def rms_norm(self, x: str, weight: str, eps: float, fp32: bool = True) -> str:
        """LLaMA RMSNorm ``w * x / sqrt(mean(x^2) + eps)``, computed in float32 when ``fp32``.

        Opset 17 has no ``RMSNormalization``; this is the Pow/ReduceMean pattern that
        onnxruntime fuses into ``SimplifiedLayerNormalization``.
        """
        h = self.cast(x, np.float32) if fp32 and self.dtype != np.float32 else x
        dt = np.float32 if fp32 else self.dtype
        var = self.node("ReduceMean", [self.node("Pow", [h, self.const(2.0, dt)])], axes=[-1], keepdims=1)
        h = self.node("Div", [h, self.node("Sqrt", [self.node("Add", [var, self.const(eps, dt)])])])
        if dt != self.dtype:
            h = self.cast(h, self.dtype)
        return self.node("Mul", [weight, h])

    # ----------------------------------------------------------------- activations
    def gelu(self, x: str) -> str:
        """Exact GELU ``0.5 x (1 + erf(x / sqrt 2))`` (the pattern onnxruntime fuses into Gelu)."""
        e = self.node("Erf", [self.node("Div", [x, self.const(math.sqrt(2.0))])])
        return self.node("Mul", [self.node("Mul", [x, self.node("Add", [e, self.const(1.0)])]), self.const(0.5)])

    def gelu_tanh(self, x: str) -> str:
        """GELU, tanh form: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
        x3 = self.node("Mul", [self.node("Mul", [x, x]), x])
        inner = self.node("Add", [x, self.node("Mul", [x3, self.const(0.044715)])])
        t = self.node("Tanh", [self.node("Mul", [inner, self.const(math.sqrt(2.0 / math.pi))])])
        return self.node("Mul", [self.node("Mul", [x, self.node("Add", [t, self.const(1.0)])]), self.const(0.5)])

    def quick_gelu(self, x: str) -> str:
        """CLIP's quick-GELU ``x * sigmoid(1.702 x)``."""
        return self.node("Mul", [x, self.node("Sigmoid", [self.node("Mul", [x, self.const(1.702)])])])

    def silu(self, x: str) -> str:
        return self.node("Mul", [x, self.node("Sigmoid", [x])])

    def activation(self, x: str, kind: str) -> str:
        """The activation named like ``vlmexport.models.layers.ACTIVATIONS``."""
        fns = {"gelu": self.gelu, "gelu_pytorch_tanh": self.gelu_tanh, "quick_gelu": self.quick_gelu,
               "silu": self.silu, "relu": lambda v: self.node("Relu", [v])}
        if kind not in fns:
            raise ValueError(f"activation {kind!r} has no ONNX form; choose one of {sorted(fns)}")
        return fns[kind](x)

    # ------------------------------------------------------------------- attention
    def split_heads(self, x: str, num_heads: int, head_dim: int) -> str:
        """[B, S, H*hd] -> [B, H, S, hd]."""
        y = self.node("Reshape", [x, self.const([0, 0, num_heads, head_dim])])
        return self.node("Transpose", [y], perm=[0, 2, 1, 3])

    def merge_heads(self, x: str, width: int) -> str:
        """[B, H, S, hd] -> [B, S, H*hd]."""
        y = self.node("Transpose", [x], perm=[0, 2, 1, 3])
        return self.node("Reshape", [y, self.const([0, 0, width])])

    def sdpa(self, q: str, k: str, v: str, head_dim: int, mask: str | None = None,
             softmax_fp32: bool = False) -> str:
        """``softmax(q k^T / sqrt(hd) + mask) v`` on [B, H, S, hd] tensors (plain ops).

        ``q`` is scaled before the product (keeps fp16 scores in range); ``mask`` is an
        additive float mask broadcastable to [B, H, Sq, Sk]; ``softmax_fp32`` computes
        the softmax in float32 in an fp16 graph.
        """
        qs = self.node("Mul", [q, self.const(1.0 / math.sqrt(head_dim))])
        scores = self.node("MatMul", [qs, self.node("Transpose", [k], perm=[0, 1, 3, 2])])
        if mask is not None:
            scores = self.node("Add", [scores, mask])
        if softmax_fp32 and self.dtype != np.float32:
            probs = self.cast(self.node("Softmax", [self.cast(scores, np.float32)], axis=-1), self.dtype)
        else:
            probs = self.node("Softmax", [scores], axis=-1)
        return self.node("MatMul", [probs, v])

    def self_attention(self, x: str, qkv_weight: str, qkv_bias: str | None, o_weight: str, o_bias: str | None,
                       num_heads: int, head_dim: int, softmax_fp32: bool = False) -> str:
        """Bidirectional multi-head self-attention with a fused [D, 3D] QKV projection (ViTs)."""
        qkv = self.linear(x, qkv_weight, qkv_bias)
        q, k, v = (self.split_heads(t, num_heads, head_dim) for t in self.node("Split", [qkv], n_outputs=3, axis=-1))
        out = self.merge_heads(self.sdpa(q, k, v, head_dim, softmax_fp32=softmax_fp32), num_heads * head_dim)
        return self.linear(out, o_weight, o_bias)

    # ---------------------------------------------------------------- shape helpers
    def batch_expand(self, param: str, like: str, tail: Sequence[int]) -> str:
        """Broadcast ``param`` ([1, *tail]) to [B, *tail] with B the first dim of ``like``."""
        batch = self.node("Shape", [like], start=0, end=1)
        shape = self.node("Concat", [batch, self.const(list(tail))], axis=0)
        return self.node("Expand", [param, shape])
