"""The PyTorch reference implementation of the backend protocol (encode, prefill, decode)."""

from __future__ import annotations

import numpy as np
import torch

from ..core.layout import LANGUAGE, SequenceLayout
from ..models.base import VLM


class TorchSession:
    """Runs a :class:`VLM` with a preallocated KV cache; numpy in, numpy out."""

    def __init__(self, model: VLM, max_length: int | None = None, device: str | torch.device | None = None):
        self.model = model.eval()
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_length = max_length or model.config.max_position_embeddings
        self.cache = model.new_cache(1, self.max_length, dtype=self.dtype, device=self.device)

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
        is_image = self._t(layout.is_image[None], torch.bool)
        emb = self.model.embed(ids, is_image, None if image_embeds is None else self._t(image_embeds, self.dtype))
        logits = self.model.decode(emb, self._t(layout.token_type[None], torch.long),
                                   self._t(layout.position_ids[None], torch.long),
                                   cache=self.cache, start=0, last_only=True)
        return logits[0, -1].float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, token: int, position: int) -> np.ndarray:
        ids = torch.tensor([[token]], device=self.device)
        emb = self.model.embed(ids)
        start = self.cache.length
        logits = self.model.decode(emb, torch.full((1, 1), LANGUAGE, device=self.device),
                                   torch.tensor([[position]], device=self.device), cache=self.cache, start=start)
        return logits[0, -1].float().cpu().numpy()

    def reset(self) -> None:
        self.cache.reset()
