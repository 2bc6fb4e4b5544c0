"""Device-specific pieces of the training loop: the optimizer (fused AdamW where torch
offers it, or bitsandbytes' 8-bit AdamW), pinned-memory batch transfer, ``torch.compile``
of the transformer blocks, and the CUDA device of a torchrun rank.

The CUDA path (bf16 autocast, fused AdamW on the GPU, pinned host batches copied with
``non_blocking``, NCCL, compile) has tests marked ``gpu``; it has not been executed on a
GPU in this project yet (docs/training.md).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..core.errors import ConfigError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """``cuda`` under torchrun means this rank's GPU (``cuda:LOCAL_RANK``), made current."""
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def fused_adamw_available(device: torch.device) -> bool:
    """torch's fused AdamW kernel exists for CPU and CUDA float tensors (torch >= 2.4)."""
    return device.type in ("cpu", "cuda")


def make_optimizer(groups: list[dict], kind: str, lr: float, betas: tuple[float, float], device: torch.device,
                   sharded: bool) -> torch.optim.Optimizer:
    """AdamW over ``groups``: torch's fused kernel (fp32 states, 8 B per parameter) or
    bitsandbytes' block-wise 8-bit AdamW (2 B per parameter + 1/256 for the block scales)."""
    if kind == "adamw":
        fused = fused_adamw_available(device)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=None if fused else True)
    if kind == "adamw8bit":
        if sharded:
            raise ConfigError("the 8-bit optimizer (bitsandbytes) works on plain tensors, not on FSDP's sharded "
                              "parameters; use --shard ddp or --optimizer adamw")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes; pip install 'vlmexport[train8bit]'") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)
    raise ConfigError(f"unknown optimizer {kind!r}; use one of {', '.join(OPTIMIZERS)}")


def move_batch(batch, device: torch.device):
    """The batch on ``device``; to a GPU from pinned host memory, asynchronously."""
    if device.type != "cuda":
        return batch.to(device)
    return _map_tensors(batch, lambda t: t.pin_memory().to(device, non_blocking=True))


def _map_tensors(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each transformer block in place (every item of every ModuleList).

    Blocks rather than the whole objective: the routing and the supervised-token
    selection have data-dependent shapes that would break one big graph, while a block's
    graph is the same at every layer and composes with FSDP's per-block units and with
    activation checkpointing. Shapes vary between batches, hence ``dynamic=True``."""
    n = 0
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.compile(dynamic=True)
                n += 1
    return n
