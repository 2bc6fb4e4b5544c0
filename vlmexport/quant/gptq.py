"""GPTQ onto MatMulNBits' symmetric grid (the ``gptq`` weight-only algorithm).

Why not onnxruntime's own ``GPTQWeightOnlyQuantConfig``: in onnxruntime 1.31 its vendored
Intel Neural Compressor code (``quantization/neural_compressor/weight_only.py``, ``gptq``)
keeps the weight as ``[in, out]`` but indexes the upper Cholesky factor of H^-1 by column
(``Hinv1[i:, i]``, ``Hinv[i2:, i1:i2]``), which is zero below the diagonal: no rounding error
is ever carried to the later inputs, so the result is round-to-nearest whatever the Hessian
(checked: identical output for the real H and for the identity). It then re-rounds that
result onto the packing grid (``quant_tensor``), whose symmetric scale (2·max/15) is not the
one it rounded with, so the "gptq" file is *less* faithful than plain RTN (demo model:
minimum logit cosine 0.83 against RTN's 0.97, docs/quantization.md).

This module keeps onnxruntime for everything but the rounding: :class:`GPTQNodeQuantizer`
is its ``DefaultWeightOnlyQuantizer`` (node rewrite, initializer names, ``MatMulNBits``
attributes) with the block quantization replaced by :func:`gptq` for the nodes that have a
Hessian. :func:`gptq` is the algorithm of Frantar et al. (2022, lazy batch updates, Cholesky
of H^-1) in torch, rounding onto exactly the grid onnxruntime's RTN packs (``MlasQuantizeBlockwise``,
symmetric): per block of ``block`` inputs and per output column, scale = the block's
largest-magnitude value / qmin (qmin = -8 for 4 bits, -128 for 8), codes clip(round-half-up(w / scale),
qmin, qmax) stored as code - qmin, two 4-bit codes per byte, low nibble first.
:func:`pack` is checked against onnxruntime's own packing in the tests (RTN codes, bit for bit).

The Hessian of each MatMul is ``sum x x^T`` over the rows that MatMul sees on the
calibration feeds (:func:`~vlmexport.quant.calib.input_hessians`); the decoder routes rows by
expert, so the visual expert's H is built from image-token rows only and the language
expert's from text-token rows only.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (GPTQ's percdamp)
LAZY_COLUMNS = 128  # GPTQ's lazy-batch width (a multiple of the quantization block)


def _grid(bits: int) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"GPTQ writes 4- or 8-bit MatMulNBits weights, not {bits}-bit")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def block_scales(w: torch.Tensor, qmin: int) -> torch.Tensor:
    """MatMulNBits' symmetric scale of each row of ``w`` [N, block]: the signed value of
    largest magnitude / qmin (the minimum when |min| >= |max|, as onnxruntime picks it),
    rounded to float32 (the stored precision)."""
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    return (torch.where(lo.abs() >= hi.abs(), lo, hi) / qmin).float().to(w.dtype)


def _padded_rows(weight: np.ndarray, block: int) -> torch.Tensor:
    """A MatMul weight ``[K, N]`` as float64 rows ``[N, K_pad]``, zero-padded to whole blocks."""
    k, n = weight.shape
    W = torch.zeros(n, -(-k // block) * block, dtype=torch.float64)
    W[:, :k] = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float64))
    return W


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round half up, as onnxruntime does (it rounds in the unsigned domain): -1.5 -> -1, 0.5 -> 1."""
    return torch.floor(x + 0.5)


def gptq(weight: np.ndarray, hessian: np.ndarray, bits: int = 4, block: int = 32,
         damp: float = DEFAULT_DAMP) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of a MatMul weight ``[K, N]`` (``y = x @ W``) given ``hessian`` = sum x x^T ``[K, K]``.

    Returns ``(codes, scales)``: ``codes`` ``[N, K_pad]`` int8 in [qmin, qmax], ``scales``
    ``[N, K_pad / block]`` float32, with ``K_pad`` = K rounded up to a whole block (padding
    inputs are zero). Dequantized, ``W[k, n] ≈ scales[n, k // block] * codes[n, k]``.
    Inputs the calibration never excites (zero diagonal) are rounded to nearest.
    """
    qmin, qmax = _grid(bits)
    k, n = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian {hessian.shape} does not match a weight of {k} inputs")
    W = _padded_rows(weight, block)
    k_pad = W.shape[1]
    H = torch.zeros(k_pad, k_pad, dtype=torch.float64)
    H[:k, :k] = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    if not torch.isfinite(H).all():
        raise ValueError("the calibration Hessian holds NaN/inf")
    diag = torch.arange(k_pad)
    dead = H[diag, diag] <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1.0  # a never-excited input is independent of the others: plain rounding
    live = H[diag, diag][~dead]
    mean = float(live.mean()) if len(live) else 1.0
    for d in (damp, damp * 10, damp * 100):  # more damping if rounding leaves H numerically singular
        try:
            L = torch.linalg.cholesky(H + d * mean * torch.eye(k_pad, dtype=H.dtype))
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor of H^-1
            break
        except torch.linalg.LinAlgError:
            log.info("GPTQ: Hessian not positive definite with damping %g; retrying with more", d)
    else:
        raise ValueError("the calibration Hessian is not positive definite even with 100x damping")

    # the sweep in float32 (as the reference GPTQ runs it; 2x faster than float64 here), H^-1 from float64
    W, Hinv = W.float(), Hinv.float()
    codes = torch.zeros(n, k_pad, dtype=torch.int8)
    scales = torch.zeros(n, k_pad // block, dtype=torch.float32)
    lazy = max(LAZY_COLUMNS // block, 1) * block
    for i1 in range(0, k_pad, lazy):
        i2 = min(i1 + lazy, k_pad)
        W1 = W[:, i1:i2].clone()
        E = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % block == 0:  # the block's scale from its current (error-updated) values
                s = block_scales(W1[:, i:i + block], qmin)
                scales[:, (i1 + i) // block] = s
                safe = torch.where(s == 0, torch.ones_like(s), s)
            w = W1[:, i]
            q = torch.clamp(_round(w / safe), qmin, qmax)
            codes[:, i1 + i] = q.to(torch.int8)
            err = (w - q * s) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E[:, i] = err
        W[:, i2:] -= E @ Hinv[i1:i2, i2:]
    return codes.numpy(), scales.numpy()


def rtn(weight: np.ndarray, bits: int = 4, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest codes and scales on the same grid (what onnxruntime's RTN writes)."""
    qmin, qmax = _grid(bits)
    W = _padded_rows(weight, block)
    n, k_pad = W.shape
    blocks = W.view(n, k_pad // block, block)
    s = block_scales(blocks.reshape(-1, block), qmin).view(n, -1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(_round(blocks / safe[..., None]), qmin, qmax).to(torch.int8)
    return q.view(n, k_pad).numpy(), s.float().numpy()


def dequantize(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The ``[K, N]`` weight MatMulNBits computes with."""
    n, k_pad = codes.shape
    block = k_pad // scales.shape[1]
    w = codes.reshape(n, -1, block).astype(np.float32) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, k_pad)[:, :k].T)


def pack(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """MatMulNBits' ``B`` input ``[N, K_pad / block, block * bits / 8]`` uint8 from signed codes."""
    qmin, _ = _grid(bits)
    n, k_pad = codes.shape
    u = (codes.astype(np.int16) - qmin).astype(np.uint8).reshape(n, k_pad // block, block)
    if bits == 8:
        return u
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """Relative error of ``x @ W`` on the calibration rows: sqrt(tr(D^T H D) / tr(W^T H W)), D = W - approx."""
    h = hessian.astype(np.float32)
    quad = lambda m: float(np.sum((h @ m) * m, dtype=np.float64))  # noqa: E731  tr(m^T H m), one float32 GEMM
    return float(np.sqrt(quad(weight - approx) / max(quad(weight.astype(np.float32)), 1e-30)))


def node_quantizer(config, hessians: Mapping[str, np.ndarray], damp: float = DEFAULT_DAMP):
    """onnxruntime's ``DefaultWeightOnlyQuantizer`` for ``config`` (symmetric, QOperator) whose
    block quantization is :func:`gptq` for the MatMul nodes named in ``hessians`` (others: RTN).
    Each node's Hessian is dropped once that node is quantized (nodes reading one tensor share
    the array, which goes when the last of them is done), so memory falls as the sweep runs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    if not config.is_symmetric:
        raise ValueError("GPTQ here writes the symmetric MatMulNBits grid (no zero points)")

    pending = dict(hessians)

    class GPTQNodeQuantizer(DefaultWeightOnlyQuantizer):
        def __init__(self, cfg):
            super().__init__(cfg)
            self._node = None
            self.errors: dict[str, tuple[float, float]] = {}  # node -> (rtn, gptq) relative output error

        def quantize(self, node, graph_stack):
            self._node = node.name
            try:
                return super().quantize(node, graph_stack)
            finally:
                self._node = None

        def qbits_block_quant(self, fp32weight):
            h = pending.pop(self._node, None)
            if h is None:
                return super().qbits_block_quant(fp32weight)
            bits, blk = self.config.bits, self.config.block_size
            w = np.asarray(fp32weight, np.float32)
            codes, scales = gptq(w, h, bits, blk, damp)
            base = rtn(w, bits, blk)
            self.errors[self._node] = (output_error(w, dequantize(*base, w.shape[0]), h),
                                       output_error(w, dequantize(codes, scales, w.shape[0]), h))
            zero_points = np.zeros((w.shape[1], 0), np.uint8)  # symmetric: no zero-point input is written
            return pack(codes, bits, blk), scales.astype(w.dtype), zero_points

    return GPTQNodeQuantizer(config)
