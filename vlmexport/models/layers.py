"""Building blocks shared by the architectures: norms, RoPE, attention with a
preallocated KV cache, SwiGLU, expert routing by gather/scatter, and the ViT blocks.

Architecture files compose these under the module names of their checkpoint layout,
so a module's ``state_dict`` keys are the checkpoint's tensor names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, as torch.nn.GELU()
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """LLaMA RMSNorm, computed in float32 like the reference implementations."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the LLaMA MLP."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for ``position_ids`` [B, S] -> [B, S, head_dim] (rotate-half layout)."""
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos/sin: [B, S, D]."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


# ------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated key/value cache: [layers][B, kv_heads, max_len, head_dim].

    ``update(layer, start, k, v)`` writes the new keys/values at slots
    ``start:start+L`` and returns views of slots ``0:start+L``. Slots are cache
    indices, not position ids (under ``hf_cogvlm`` positions repeat inside an image).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # slots filled (advanced by the decoder after all layers ran)

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write ``k``/``v`` at slots ``start:start+L``; return the keys/values attention reads.

        ``start`` an int: views of slots ``0:start+L`` (shapes grow with the sequence).
        ``start`` a 0-d tensor (static decoding): the writes are ``index_copy_`` at tensor
        slots and the whole buffers come back, so every step has the same shapes and no
        host sync (what a CUDA graph needs); :func:`attention` masks the unwritten slots.
        """
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were requested")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """Causal attention. q: [B, H, L, D] for slots start..start+L; k/v: [B, Hkv, start+L, D],
    or the whole cache [B, Hkv, max_len, D] when ``start`` is a tensor (static decoding)."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    L = q.shape[2]
    if isinstance(start, torch.Tensor):  # static shapes: mask the slots not yet written
        q_slot = (start + torch.arange(L, device=q.device))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.arange(k.shape[2], device=q.device) <= q_slot)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
    if L == 1:
        return F.scaled_dot_product_attention(q, k, v)
    q_slot = torch.arange(start, start + L, device=q.device)[:, None]
    k_slot = torch.arange(k.shape[2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=k_slot <= q_slot)


# -------------------------------------------------------------------- expert routing
@dataclass
class Route:
    """Flat indices of the positions each expert runs (gather/scatter routing).

    Each expert only ever sees its own tokens, which keeps calibration statistics of
    the two experts apart. ``None`` means "all positions use the language expert".
    """

    language: torch.Tensor  # int64 indices into the flattened [B*S] positions
    vision: torch.Tensor

    @staticmethod
    def from_token_type(token_type: torch.Tensor | None) -> "Route | None":
        if token_type is None:
            return None
        flat = token_type.reshape(-1)
        vision = torch.nonzero(flat == 1).flatten()
        if vision.numel() == 0:
            return None
        language = torch.nonzero(flat != 1).flatten()
        return Route(language=language, vision=vision)

    def apply(self, x: torch.Tensor, f_language: nn.Module, f_vision: nn.Module) -> torch.Tensor:
        """Run f_language on language positions and f_vision on vision positions of x [B,S,D]."""
        B, S, D = x.shape
        flat = x.reshape(B * S, D)
        out_v = f_vision(flat.index_select(0, self.vision))
        out = flat.new_empty(B * S, out_v.shape[-1])
        if self.language.numel():
            out = out.index_copy(0, self.language, f_language(flat.index_select(0, self.language)))
        out = out.index_copy(0, self.vision, out_v)
        return out.reshape(B, S, -1)


def routed(route: Route | None, x: torch.Tensor, f_language: nn.Module, f_vision: nn.Module | None):
    if route is None or f_vision is None:
        return f_language(x)
    return route.apply(x, f_language, f_vision)


# ----------------------------------------------------------------- cross-attention
@dataclass
class CrossAttention:
    """Images a decoder attends to instead of reading them in its sequence (image_placement
    ``cross_attend``, e.g. Flamingo's gated cross-attention).

    ``memory`` [Bm, M, W] (Bm is 1, shared by every row, or the batch): the images' tokens, image
    ``i`` at rows ``i * tokens_per_image`` to ``(i + 1) * tokens_per_image``. ``media`` [B, S] int64:
    the image each position attends to, -1 for none (``SequenceLayout.media``). What a memory row
    holds is the architecture's (``DecoderSpec.cross_attention``: e.g. every block's keys and
    values, computed once per image by the connector).
    """

    memory: torch.Tensor
    media: torch.Tensor
    tokens_per_image: int

    def with_media(self, media: torch.Tensor) -> "CrossAttention":
        """The same memory for other positions (e.g. the tokens generated after the prompt)."""
        return CrossAttention(self.memory, media, self.tokens_per_image)

    def mask(self) -> torch.Tensor:
        """[B, S, M] bool: position s attends memory row m (m belongs to its image)."""
        image_of_row = torch.arange(self.memory.shape[1], device=self.media.device) // self.tokens_per_image
        return image_of_row[None, None, :] == self.media[:, :, None]

    def gate(self) -> torch.Tensor:
        """[B, S] bool: the position attends to an image at all."""
        return self.media >= 0


# ----------------------------------------------------------------------- ViT pieces
def vit_self_attention(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       num_heads: int) -> torch.Tensor:
    B, N, _ = x.shape
    q, k, v = (t.reshape(B, N, num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, -1)


class ViTMLP(nn.Module):
    """The ViT block's MLP (EVA and CLIP alike): fc1 -> activation -> fc2."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] 2-D sine-cosine position table, row-major (y, x); half the
    channels encode y, half x (MAE's ``get_2d_sincos_pos_embed``). ``dim`` % 4 == 0."""
    if dim % 4:
        raise ValueError(f"sin-cos position table needs a width divisible by 4, got {dim}")
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coord = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coord, coord, indexing="ij")

    def enc(c: torch.Tensor) -> torch.Tensor:
        a = c.reshape(-1, 1) * freq
        return torch.cat((a.sin(), a.cos()), dim=1)

    return torch.cat((enc(ys), enc(xs)), dim=1).float()


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Seeded-friendly initialisation used for models trained from scratch."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
