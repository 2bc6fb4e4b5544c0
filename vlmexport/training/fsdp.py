"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``TrainConfig(shard="fsdp")`` under torchrun.

Every block of every ``nn.ModuleList`` in the model (the decoder layers and the ViT
layers, whatever the architecture) becomes its own FSDP unit, and the objective (the
embeddings, norms, LM head, connector and training-only heads) the root unit. Each rank
then stores 1/world of every parameter, its gradient and its optimizer state (ZeRO-3);
a unit's full weights exist only while it runs. Composes with activation checkpointing
(``torch.utils.checkpoint`` calls the block, whose hooks gather it) and with bf16 mixed
precision (``MixedPrecisionPolicy``: bf16 compute and all-gathers, fp32 master weights
and fp32 gradient reduction).

Checkpoints are *gathered*: every tensor is all-gathered and rank 0 writes the same
safetensors files a single-process run writes, so a run resumes on any number of
processes (or none). Resume loads the full weights before sharding and distributes the
optimizer state to the shards (``distribute_tensor``).

Measured on torch 2.13 CPU with gloo (tests/training/test_fsdp.py): fp32 and bf16
policies, frozen and trainable parameters in one unit, fused AdamW on the sharded
(DTensor) parameters and ``clip_grad_norm_`` all work; nothing needed a fallback.
bitsandbytes' 8-bit AdamW works on plain tensors only, so ``optimizer="adamw8bit"``
with FSDP is refused with a message (see ``device.make_optimizer``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_blocks(objective: nn.Module, device: torch.device, world: int,
                 param_dtype: torch.dtype | None) -> list[nn.Module]:
    """Apply ``fully_shard`` in place (blocks first, then the root); returns the units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
              if param_dtype is not None else MixedPrecisionPolicy())
    units: list[nn.Module] = []
    for module in objective.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(True for _ in block.parameters()):
                    fully_shard(block, mesh=mesh, mp_policy=policy)
                    units.append(block)
    fully_shard(objective, mesh=mesh, mp_policy=policy)
    units.append(objective)
    log.info("FSDP2: %d units over %d ranks (%s compute)", len(units), world,
             "fp32" if param_dtype is None else str(param_dtype).replace("torch.", ""))
    return units


def is_sharded(t) -> bool:
    return isinstance(t, _dtensor())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a sharded one)."""
    return t.full_tensor() if is_sharded(t) else t


def distribute_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like`` is (this rank's shard of it when ``like`` is sharded)."""
    if is_sharded(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device)


def local_storage_bytes(params) -> int:
    """Bytes this rank stores for ``params`` (its shards, measured from the local tensors)."""
    total = 0
    for p in params:
        t = p.to_local() if is_sharded(p) else p
        total += t.numel() * t.element_size()
    return total


def gathered_state_dict(module: nn.Module, drop_tied: bool = False) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every sharded tensor gathered (collective: every rank calls
    it in the same order); a parameter registered twice (tied embeddings) is kept once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in module.state_dict(keep_vars=True).items():  # the Parameter objects: tied ones share one
        if drop_tied and id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = full_tensor(t).detach().to("cpu").contiguous()
    return out


def set_gradient_sync(runner: nn.Module, sync: bool) -> None:
    """FSDP2's ``no_sync``: skip the reduce-scatter on all but the last micro-batch."""
    runner.set_requires_gradient_sync(sync)


def unshard_into(model: nn.Module) -> None:
    """Give ``model`` plain, whole parameters again after sharded training (collective).

    FSDP2 shards modules in place and has no inverse, so the weights are gathered into a
    fresh instance of the model's class built on the meta device (``assign=True``: no
    copy), and the fresh instance's submodules, parameters and buffers replace the
    sharded ones. Non-persistent buffers (RoPE tables), which FSDP never shards, are kept.
    """
    device = next(model.parameters()).device  # a DTensor's device is its local shard's
    full = gathered_state_dict(model, drop_tied=False)
    buffers = {n: b.detach().to("cpu") for n, b in model.named_buffers()}
    with torch.device("meta"):
        fresh = type(model)(model.config)
    shared: dict[int, list[str]] = {}  # tied parameters: one Parameter under several names
    for name, p in fresh.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    fresh.load_state_dict(full, strict=False, assign=True)
    for names in shared.values():
        for other in names[1:]:
            owner, _, leaf = other.rpartition(".")
            setattr(fresh.get_submodule(owner) if owner else fresh, leaf, fresh.get_parameter(names[0]))
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        target = fresh.get_submodule(owner) if owner else fresh
        persistent = leaf not in target._non_persistent_buffers_set
        target.register_buffer(leaf, buf, persistent=persistent)
    missing = [n for n, p in fresh.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathering the sharded model left {len(missing)} parameters unset, e.g. {missing[:3]}")
    fresh.to(device)
    for attr in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        setattr(model, attr, getattr(fresh, attr))
