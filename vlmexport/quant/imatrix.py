"""A multimodal importance matrix for llama.cpp's quantizer, computed in PyTorch.

llama.cpp's ``llama-imatrix`` tool runs text only, so the ``blk.N.vis_*`` visual-expert
weights of a ``cogvlm`` text GGUF never see an activation and would be quantized
without importance data. Here the reference model runs image+prompt calibration pairs
(prompt prefill with the image, then the reference answer teacher-forced token by
token) and a forward hook on every ``nn.Linear`` of the text decoder accumulates the
per-column sum of squared inputs and the number of rows it saw. The model routes by
gather/scatter (``models.layers.Route``), so a visual-expert linear only ever receives
image-position rows (boi..eoi) and a language-expert linear only text-position rows:
the two statistics are kept apart by construction.

The result is keyed by the GGUF tensor names of our writer (``blk.N.attn_qkv.weight``,
``blk.N.vis_attn_qkv.weight``, ``output.weight``...): the hooked module's weight is found
in the text plan (:func:`vlmexport.exporter.gguf_writer.plan_text`) through its checkpoint name,
so nothing here names an architecture.

File format: llama.cpp's GGUF imatrix (``tools/imatrix/imatrix.cpp`` ``save_imatrix``,
read by ``common/imatrix-loader.cpp``): ``general.type = "imatrix"``,
``imatrix.datasets`` (strings), ``imatrix.chunk_count`` / ``imatrix.chunk_size`` (u32),
and per weight two F32 tensors ``<name>.in_sum2`` (shape [n_mat, ne0]) and ``<name>.counts``
(shape [n_mat, 1]); the quantizer uses ``in_sum2 / counts`` (the mean squared input per
column). ``llama-quantize --imatrix FILE`` reads it as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError, DataError, require

gguf = require("gguf", "gguf")

log = logging.getLogger(__name__)

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2, SUFFIX_COUNTS = ".in_sum2", ".counts"


@dataclass
class ImatrixEntry:
    """Per-column sum of squared inputs of one weight, and how many rows (tokens) fed it."""

    sum2: np.ndarray  # float64 [ne0]
    count: int = 0

    @property
    def mean(self) -> np.ndarray:
        """What llama.cpp's quantizer uses (in_sum2 / counts); ones where no row was seen."""
        if self.count == 0:
            return np.ones_like(self.sum2, dtype=np.float32)
        # float32 / float32, as llama-quantize computes it from the file (bit-identical inputs)
        return self.sum2.astype(np.float32) / np.float32(self.count)


@dataclass(frozen=True)
class Imatrix:
    entries: dict[str, ImatrixEntry]  # GGUF tensor name -> statistics
    datasets: tuple[str, ...] = ()
    chunks: int = 0  # calibration pairs run

    def means(self) -> dict[str, np.ndarray]:
        return {k: e.mean for k, e in self.entries.items()}


def linear_names(model: nn.Module, plan: Iterable) -> dict[str, nn.Linear]:
    """GGUF tensor name -> the ``nn.Linear`` whose weight it stores, for every linear of the
    text plan (``PlannedTensor.source`` is the checkpoint name ``<module>.weight``)."""
    by_source = {t.source: t.name for t in plan if t.name.endswith(".weight")}
    out: dict[str, nn.Linear] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and f"{mod_name}.weight" in by_source:
            out[by_source[f"{mod_name}.weight"]] = mod
    return out


class ImatrixCollector:
    """Forward hooks that accumulate sum(x**2) per input column and the row count."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.entries = {n: ImatrixEntry(np.zeros(m.in_features, dtype=np.float64)) for n, m in modules.items()}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        entry = self.entries[name]

        def hook(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            if x.shape[0] == 0:
                return
            if not bool(torch.isfinite(x).all()):
                raise DataError(f"imatrix: NaN/inf activations at the input of {name} during calibration; the model "
                                "overflows or holds NaN/inf weights on this data: check the checkpoint's weights, or "
                                "build without an imatrix (--imatrix-pairs 0)")
            entry.sum2 += (x * x).sum(0).cpu().numpy()
            entry.count += int(x.shape[0])

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def compute_imatrix(model: nn.Module, plan: Sequence, pairs: Iterable[tuple[object, int]],
                    dataset: str = "", progress: Callable[[int], None] = lambda i: None) -> Imatrix:
    """Run ``pairs`` through ``model`` with hooks on the text decoder's linears.

    ``pairs`` yields ``(run, n)`` where ``run()`` performs one calibration forward (prefill +
    teacher-forced answer) on ``model``; see :func:`calibration_runs`.
    """
    modules = linear_names(model, plan)
    if not modules:
        raise ConfigError("no linear layer of the model matches a tensor of the text GGUF; the importance matrix "
                          "would be empty")
    col = ImatrixCollector(modules)
    n = 0
    try:
        with torch.inference_mode():
            for run in pairs:
                run()
                n += 1
                progress(n)
    finally:
        col.close()
    unseen = sorted(k for k, e in col.entries.items() if e.count == 0)
    if unseen:
        log.warning("imatrix: %d weights saw no activation (e.g. %s)", len(unseen), unseen[0])
    return Imatrix(col.entries, (dataset,) if dataset else (), n)


def calibration_runs(model, tokenizer, preprocess, template, items: Sequence, max_length: int | None = None
                     ) -> Iterable[Callable[[], None]]:
    """One closure per item: prefill ``question`` with its image (the pipeline's own
    templating and layout), then decode the reference ``answer`` tokens one at a time."""
    from ..core.prompt import Turn
    from ..runtimes.torch_session import TorchSession
    from ..runtimes.torch_backend import pipeline_from_model

    pipe = pipeline_from_model(model, tokenizer, preprocess, template)
    sess = TorchSession(model, max_length=max_length)
    for it in items:
        def run(it=it):
            sess.reset()
            layout, pixels = pipe.prepare([Turn(user=it.question, images=1)], [it.image])
            sess.prefill(layout, sess.encode_images(pixels))
            pos = layout.next_position
            for tok in tokenizer.encode(it.answer)[: 32] + [tokenizer.eos_id]:
                if pos >= sess.max_length:
                    break
                sess.decode(tok, pos)
                pos += 1
        yield run


def synthetic_items(image_size: int, n: int, split: str = "val", seed: int = 0) -> list:
    """``n`` balanced calibration items from the synthetic set's ``split`` (never ``test``,
    which the validation uses)."""
    from ..data import SyntheticVQA

    gen = SyntheticVQA(image_size=image_size, seed=seed)
    per_cat = max(2, -(-n // 7))
    per_cat += per_cat % 2  # existence questions come in yes/no pairs
    by_cat: dict[str, list] = {}
    for it in gen.eval_items(split, per_cat):  # grouped by category: interleave them
        by_cat.setdefault(it.category, []).append(it)
    mixed = [it for row in zip(*by_cat.values()) for it in row]
    return mixed[:n]


# ---------------------------------------------------------------------------- files
def write_imatrix(path: str | os.PathLike, im: Imatrix, chunk_size: int = 1) -> Path:
    """Write llama.cpp's GGUF imatrix format (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    w = gguf.GGUFWriter(str(tmp), arch="imatrix", use_temp_file=False)
    # GGUFWriter writes general.architecture; llama.cpp's writer has only general.type, which is what it checks
    w.add_type("imatrix")
    w.add_array(KEY_DATASETS, list(im.datasets) or ["vlmexport"])
    w.add_uint32(KEY_CHUNK_COUNT, im.chunks)
    w.add_uint32(KEY_CHUNK_SIZE, chunk_size)
    for name in sorted(im.entries):
        e = im.entries[name]
        w.add_tensor(name + SUFFIX_SUM2, e.sum2.astype(np.float32).reshape(1, -1))
        w.add_tensor(name + SUFFIX_COUNTS, np.array([[float(e.count)]], dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)
    return path


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF imatrix (ours or llama-imatrix's); a one-line error if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such imatrix file; check the path (`vlmexport build --format gguf` writes one "
                          "into the bundle's gguf/ folder)")
    try:
        r = gguf.GGUFReader(p)
    except Exception as exc:  # noqa: BLE001 - the reader raises assorted errors on non-GGUF input
        raise ConfigError(f"{p}: not a GGUF imatrix ({exc.__class__.__name__}); legacy .dat files are not read here: "
                          "convert them with `llama-imatrix --in-file X.dat -o X.gguf`") from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors}
    entries: dict[str, ImatrixEntry] = {}
    for name, data in tensors.items():
        if not name.endswith(SUFFIX_SUM2):
            continue
        base = name[: -len(SUFFIX_SUM2)]
        counts = tensors.get(base + SUFFIX_COUNTS)
        if counts is None:
            raise ConfigError(f"{p}: {name} has no {base + SUFFIX_COUNTS}; the imatrix file is damaged")
        if counts.size != 1:
            raise ConfigError(f"{p}: {base} holds {counts.size} expert matrices; only dense weights are supported")
        entries[base] = ImatrixEntry(data.reshape(-1), int(round(float(counts.reshape(-1)[0]))))
    if not entries:
        raise ConfigError(f"{p}: holds no *.in_sum2 tensors; it is not an imatrix file")
    ds = r.fields.get(KEY_DATASETS)
    chunks = r.fields.get(KEY_CHUNK_COUNT)
    return Imatrix(entries, tuple(ds.contents()) if ds is not None else (),
                   int(chunks.contents()) if chunks is not None else 0)
