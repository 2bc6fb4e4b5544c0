"""Training checkpoints: ``run_dir/checkpoint`` holds model.safetensors (checkpoint names),
objective.safetensors (training-only heads), optimizer.safetensors and trainer_state.json,
written atomically by rank 0.

The files are the same whether the run was single-process, DDP or FSDP: sharded tensors
are gathered before writing (``collect``, a collective under FSDP) and distributed to
the shards on resume (``restore_optimizer``), so a run resumes on any number of
processes. Optimizer state is stored per parameter name and slot
(``<param>::<slot>``); a Python scalar slot (bitsandbytes' ``step``) is stored as a
0-d tensor under ``<param>::<slot>::int`` / ``::float`` and comes back as a scalar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.atomic import atomic_directory
from ..core.errors import CheckpointError
from ..models.checkpoint import state_dict_for_saving
from .fsdp import distribute_like, full_tensor, gathered_state_dict, is_sharded

CHECKPOINT_DIR = "checkpoint"
RNG_KEY = "__rng__::torch"


@dataclass
class Snapshot:
    """Everything a checkpoint holds, as whole CPU tensors."""

    weights: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict


def collect(objective, optimizer: torch.optim.Optimizer, state: dict) -> Snapshot:
    """The run's tensors, gathered when sharded (every rank must call this under FSDP)."""
    sharded = any(is_sharded(p) for p in objective.parameters())
    if sharded:
        full = gathered_state_dict(objective, drop_tied=objective.model.config.tie_word_embeddings)
        weights = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
        heads = {k: v for k, v in full.items() if not k.startswith("model.")}
    else:
        weights = state_dict_for_saving(objective.model)
        heads = {k: v.detach().cpu().contiguous() for k, v in objective.extra_state().items()}
    names = {id(p): n for n, p in objective.named_parameters()}
    opt: dict[str, torch.Tensor] = {}
    storages: set[int] = set()  # bitsandbytes shares one quantization map between parameters
    for group in optimizer.param_groups:
        for p in group["params"]:
            for slot, val in optimizer.state.get(p, {}).items():
                if torch.is_tensor(val):
                    t = full_tensor(val).detach().cpu().contiguous()
                    ptr = t.untyped_storage().data_ptr()
                    opt[f"{names[id(p)]}::{slot}"] = t.clone() if ptr in storages else t
                    storages.add(ptr)
                elif isinstance(val, (int, float)):
                    kind = "int" if isinstance(val, int) else "float"
                    opt[f"{names[id(p)]}::{slot}::{kind}"] = torch.tensor(val)
    opt[RNG_KEY] = torch.get_rng_state()
    return Snapshot(weights, heads, opt, state)


def write(run_dir: Path, snap: Snapshot) -> Path:
    out = run_dir / CHECKPOINT_DIR
    with atomic_directory(out) as tmp:
        save_file(snap.weights, str(tmp / "model.safetensors"))
        save_file(snap.heads or {"__none__": torch.zeros(0)}, str(tmp / "objective.safetensors"))
        save_file(snap.optimizer, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(snap.state, indent=2) + "\n")
    return out


def exists(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR / "trainer_state.json").is_file()


def read(run_dir: Path) -> Snapshot:
    ckpt = run_dir / CHECKPOINT_DIR
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        weights = load_file(str(ckpt / "model.safetensors"))
        heads = load_file(str(ckpt / "objective.safetensors"))
        opt = load_file(str(ckpt / "optimizer.safetensors"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{ckpt}: incomplete training checkpoint ({Path(exc.filename).name} missing); "
                              "delete the run directory to start over") from None
    except Exception as exc:
        raise CheckpointError(f"{ckpt}: unreadable training checkpoint ({str(exc).splitlines()[0]}); "
                              "delete the run directory to start over") from None
    heads.pop("__none__", None)
    return Snapshot(weights, heads, opt, state)


def restore_weights(objective, snap: Snapshot) -> None:
    """Model weights and heads, into the plain (not yet sharded) objective."""
    objective.model.load_state_dict(snap.weights, strict=False)
    if snap.heads:
        objective.load_extra_state(snap.heads)


def restore_optimizer(objective, optimizer: torch.optim.Optimizer, snap: Snapshot) -> None:
    """Optimizer state (each slot laid out like its parameter: a shard under FSDP) and the RNG."""
    params = dict(objective.named_parameters())
    on_device = {id(p) for g in optimizer.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]}
    for key, val in snap.optimizer.items():
        if key == RNG_KEY:
            torch.set_rng_state(val)
            continue
        name, slot, *scalar = key.split("::")
        p = params.get(name)
        if p is None:
            raise CheckpointError(f"the checkpoint's optimizer state names {name!r}, which this run does not train; "
                                  "resume with the same stage and options, or use another run directory")
        if scalar:
            optimizer.state[p][slot] = int(val.item()) if scalar[0] == "int" else float(val.item())
        elif slot == "step":
            optimizer.state[p][slot] = val.to(p.device) if id(p) in on_device else val
        elif tuple(val.shape) == tuple(p.shape) and val.is_floating_point():
            optimizer.state[p][slot] = distribute_like(val, p)
        else:
            optimizer.state[p][slot] = val.to(p.device)
