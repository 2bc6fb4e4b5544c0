"""Batched decode for the ``onnxruntime`` backend: several sequences, one decoder run per step.

The exported text decoder takes a batch dimension and right-padded rows (``attention_mask``
row sums give each row's length; logits come from each row's last valid position). This
session keeps one KV buffer ``[slots, kv_heads, max_length, head_dim]`` per layer and per
key/value (numpy memory that the OrtValues share); a sequence owns one row (slot):

- ``prefill(slot, layout, image_embeds)`` runs that sequence's prompt alone (batch 1) with
  its row of the buffers bound as past and present;
- ``decode({slot: (token, position)})`` appends one token to every listed sequence in one run
  over rows ``0..max(slot)``; a row not listed runs a throw-away token written just past its
  valid slots (nothing it holds is overwritten, and its length does not change).

It reuses the sessions and the embedding table of an :class:`OrtModelSession` (nothing is
loaded twice).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..core.layout import LANGUAGE, SequenceLayout
from .onnxruntime_backend import _ORT_TO_NUMPY, SHRINK_ARENA, OrtModelSession


class BatchedOrtSession:
    def __init__(self, base: OrtModelSession, slots: int):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        if base.device != "cpu":
            raise ValueError("batched decode runs on the CPU provider only (numpy-backed KV buffers)")
        self.base = base
        self.slots = slots
        self.max_length = base.max_length
        f = base.facts
        types = {i.name: i.type for i in base.decoder.get_inputs()}
        self.kv_dtype = np.dtype(_ORT_TO_NUMPY[types["past_key_values.0.key"]])
        shape = (slots, f.num_kv_heads, self.max_length, f.head_dim)
        self.kv = [np.zeros(shape, self.kv_dtype) for _ in range(2 * f.num_layers)]
        base.kv, base._kv_arrays = [], []  # its own batch-1 buffers are not used any more
        base._bindings = {}
        self.lengths = [0] * slots
        self.sess = base.decode_graph or base.decoder
        self._routed = "token_type" in {i.name for i in base.decoder.get_inputs()}
        self._routed_decode = "token_type" in {i.name for i in self.sess.get_inputs()}
        self._bindings: dict[tuple[int, int, int], tuple[ort.IOBinding, np.ndarray]] = {}

    # ---------------------------------------------------------------- binding
    def _io(self, sess: ort.InferenceSession, rows: slice) -> tuple[ort.IOBinding, np.ndarray]:
        """The binding of ``rows`` of the KV buffers (past and present: the same memory, GQA writes
        in place) and its logits buffer; made once per (session, rows) and reused, since the
        buffers never move (at most 2 x slots bindings)."""
        key = (id(sess), rows.start, rows.stop)
        if key not in self._bindings:
            io = sess.io_binding()
            for i in range(self.base.facts.num_layers):
                for j, kind in enumerate(("key", "value")):
                    view = ort.OrtValue.ortvalue_from_numpy(self.kv[2 * i + j][rows])
                    io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", view)
                    io.bind_ortvalue_output(f"present.{i}.{kind}", view)
            logits = np.zeros((rows.stop - rows.start, 1, self.base.facts.vocab_size), np.float32)
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            self._bindings[key] = (io, logits)
        return self._bindings[key]

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.base.encode_images(pixel_values)

    # ---------------------------------------------------------------- running
    def prefill(self, slot: int, layout: SequenceLayout, image_embeds: np.ndarray | None) -> np.ndarray:
        b = self.base
        n = len(layout)
        if n > self.max_length:
            raise ValueError(f"the prompt has {n} positions; the context holds {self.max_length}")
        emb = np.take(b.embedding, layout.input_ids, axis=0).astype(b.dtype, copy=False)
        if image_embeds is not None:
            emb[layout.is_image] = np.asarray(image_embeds).reshape(-1, b.facts.hidden_size)
        io, logits = self._io(b.decoder, slice(slot, slot + 1))
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(emb[None]))
        io.bind_cpu_input("attention_mask", np.ones((1, n), np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(layout.position_ids[None], dtype=np.int64))
        if self._routed:
            io.bind_cpu_input("token_type", np.ascontiguousarray(layout.token_type[None], dtype=np.int64))
        b.decoder.run_with_iobinding(io, SHRINK_ARENA)  # a prefill's working memory goes back after it
        self.lengths[slot] = n
        return logits[0, -1].copy()

    def decode(self, steps: dict[int, tuple[int, int]]) -> dict[int, np.ndarray]:
        """``{slot: (token, position)}`` -> ``{slot: logits}``, one decoder run for all of them."""
        if not steps:
            return {}
        b = self.base
        rows = max(steps) + 1
        for s in steps:
            if self.lengths[s] >= self.max_length:
                raise ValueError(f"slot {s}: the context holds {self.max_length} positions and is full")
        tokens = np.zeros(rows, np.int64)
        positions = np.zeros((rows, 1), np.int64)
        lengths = np.array(self.lengths[:rows], np.int64)  # cache slots each row holds before this step
        if any(lengths[r] >= self.max_length for r in range(rows) if r not in steps):
            raise ValueError("a full sequence sits below a stepped slot; release it first")
        for s, (tok, pos) in steps.items():
            tokens[s], positions[s, 0], lengths[s] = tok, pos, self.lengths[s]
        total = int(lengths.max()) + 1
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)  # right-padded rows
        emb = b.embedding[tokens].astype(b.dtype, copy=False).reshape(rows, 1, -1)
        io, logits = self._io(self.sess, slice(0, rows))
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(emb))
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        if self._routed_decode:
            io.bind_cpu_input("token_type", np.full((rows, 1), LANGUAGE, np.int64))
        self.sess.run_with_iobinding(io)
        for s in steps:
            self.lengths[s] += 1
        return {s: logits[s, -1].copy() for s in steps}

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
