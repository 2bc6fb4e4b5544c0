"""The PyTorch reference implementation of the backend protocol (encode, prefill, decode).

Decoding one token has two forms. The eager form slices the KV cache to the sequence so
far (shapes grow every step). The static form (``static_decode``) writes the new key and
value at a tensor slot and attends over the whole preallocated cache with a mask, so every
step has the same shapes, the same buffers and no host synchronisation; on CUDA that step
is captured once as a CUDA graph and replayed (``cuda_graphs``, the default there), which
removes the per-kernel launch cost that dominates decoding a small batch. Both forms give
the same logits (checked on CPU for every architecture in tests/runtimes/test_torch_session.py;
the CUDA-graph replay against eager decoding is a ``gpu`` test, not executed on this
project's CPU-only machines).
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.layout import LANGUAGE, SequenceLayout
from ..models.base import VLM
from ..models.layers import KVCache


class _StaticDecodeStep:
    """One decode step with fixed input buffers: token, position and cache slot are written
    into tensors that stay put, so the step can be a CUDA graph (captured on first use)."""

    def __init__(self, model: VLM, cache: KVCache, device: torch.device, graph: bool):
        self.model, self.cache, self.use_graph = model, cache, graph
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.cross = None  # the prompt's images, for a cross-attending decoder (eager steps only)

    def _forward(self) -> torch.Tensor:
        # decode positions are all language tokens: no expert routing (token_type None is the
        # language expert), which also keeps the step free of data-dependent shapes
        emb = self.model.embed(self.token)
        kw = {} if self.cross is None else {"cross": self.cross}
        return self.model.decode(emb, None, self.position, cache=self.cache, start=self.slot, **kw)

    def _capture(self) -> None:
        # warm up on a side stream (allocator and cuBLAS workspaces), then record the step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def __call__(self, token: int, position: int, slot: int) -> torch.Tensor:
        self.token.fill_(token)
        self.position.fill_(position)
        self.slot.fill_(slot)
        if not self.use_graph:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits


class TorchSession:
    """Runs a :class:`VLM` with a preallocated KV cache; numpy in, numpy out.

    ``static_decode`` (default: on CUDA) decodes with fixed shapes over the whole cache;
    ``cuda_graphs`` (default: on CUDA) replays that step as a CUDA graph.
    """

    def __init__(self, model: VLM, max_length: int | None = None, device: str | torch.device | None = None,
                 static_decode: bool | None = None, cuda_graphs: bool | None = None):
        self.model = model.eval()
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_length = max_length or model.config.max_position_embeddings
        self.cache = model.new_cache(1, self.max_length, dtype=self.dtype, device=self.device)
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ValueError("CUDA graphs need the model on a CUDA device; pass cuda_graphs=False on "
                             f"{self.device.type}")
        self.cross_attend = model.image_placement == "cross_attend"
        if self.cross_attend and cuda_graphs:
            raise ValueError("a cross-attending decoder's images change per prompt; a CUDA graph would keep the "
                             "first prompt's: pass cuda_graphs=False")
        if self.cross_attend:
            self.cuda_graphs = False
        self.static_decode = self.cuda_graphs or (on_cuda if static_decode is None else bool(static_decode))
        self._cross = None  # the prompt's cross-attention input (keys/values computed once, at prefill)
        self._step = _StaticDecodeStep(model, self.cache, self.device, self.cuda_graphs) if self.static_decode else None

    def _t(self, a: np.ndarray, dtype=None) -> torch.Tensor:
        return torch.as_tensor(a, device=self.device, dtype=dtype)

    @torch.inference_mode()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        emb = self.model.image_embeddings(self._t(pixel_values, self.dtype))
        return emb.float().cpu().numpy()

    @torch.inference_mode()
    def prefill(self, layout: SequenceLayout, image_embeds: np.ndarray | None) -> np.ndarray:
        if len(layout) > self.max_length:
            raise ValueError(f"the prompt has {len(layout)} positions; the context holds {self.max_length}")
        ids = self._t(layout.input_ids[None], torch.long)
        embeds = None if image_embeds is None else self._t(image_embeds, self.dtype)
        media = self._t(layout.media[None], torch.long) if layout.media is not None else None
        emb, self._cross = self.model.decoder_inputs(ids, self._t(layout.is_image[None], torch.bool), embeds, media)
        logits = self.model.decode(emb, self._t(layout.token_type[None], torch.long),
                                   self._t(layout.position_ids[None], torch.long),
                                   cache=self.cache, start=0, last_only=True, cross=self._cross)
        if self._cross is not None:  # generated tokens attend to the prompt's last image (keys/values kept)
            self._cross = self._cross.with_media(self._cross.media[:, -1:])
            if self._step is not None:
                self._step.cross = self._cross
        return logits[0, -1].float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, token: int, position: int) -> np.ndarray:
        start = self.cache.length
        if self._step is not None:
            if start >= self.max_length:
                raise ValueError(f"KV cache holds {self.max_length} positions; {start + 1} were requested")
            logits = self._step(token, position, start)
            self.cache.length = start + 1
            return logits[0, -1].float().cpu().numpy()
        ids = torch.tensor([[token]], device=self.device)
        emb = self.model.embed(ids)
        kw = {} if self._cross is None else {"cross": self._cross}
        logits = self.model.decode(emb, torch.full((1, 1), LANGUAGE, device=self.device),
                                   torch.tensor([[position]], device=self.device), cache=self.cache, start=start, **kw)
        return logits[0, -1].float().cpu().numpy()

    def reset(self) -> None:
        self.cache.reset()
        self._cross = None
