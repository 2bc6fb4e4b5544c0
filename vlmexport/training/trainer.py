"""The training loop: AdamW + warmup/cosine, gradient accumulation and checkpointing,
bf16 autocast, safetensors checkpoints with exact resume, and DDP under torchrun.

Data is addressed by a global example index (``TrainData.examples(first, n)``; the
micro-batch of step s, micro-step m, rank r starts at ((s * accum + m) * world + r) * n),
so a resumed run sees exactly the batches the interrupted one would have seen; with the
saved optimizer and RNG state this makes resume bit-exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..core.atomic import atomic_directory
from ..core.errors import CheckpointError, ConfigError
from ..models.base import VLM
from ..models.checkpoint import state_dict_for_saving
from .memory import MemoryEstimate, estimate_memory
from .objectives import Objective, objective_for
from .stages import Stage, apply_stage

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32
    grad_checkpointing: bool = False
    # per parameter role ("vision", "connector", "language", "visual_expert", "embedding"):
    # a from-scratch ViT + connector diverge at the decoder's learning rate (measured), so
    # the demo recipe trains them at a fraction of it
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    save_every: int = 200
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("steps, batch_size and grad_accum must be positive")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError("precision must be auto, bf16 or fp32")

    def lr_at(self, step: int) -> float:
        """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


class TrainData(Protocol):
    def batch(self, first: int, n: int):
        """The batch of examples ``first .. first+n-1`` of the run (a pure function of the
        indices) as an object with ``.to(device)`` that the stage's objective consumes."""


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    sequences_per_s: float


@dataclass
class Callbacks:
    on_start: Callable[[int, int, MemoryEstimate], None] = lambda total, start, mem: None
    on_step: Callable[[StepLog], None] = lambda log_: None
    on_eval: Callable[[int, dict], None] = lambda step, metrics: None
    on_save: Callable[[int, Path], None] = lambda step, path: None


@dataclass
class TrainResult:
    stage: str
    steps_done: int
    final_loss: float
    seconds: float
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    reason: str = "completed"  # "completed" | "time_budget" | "interrupted"


# ------------------------------------------------------------------ environment
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA, and on CPUs with AMX/AVX512-BF16 (measured ~2x faster here)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if precision == "bf16" or cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def attention_kernel(device: torch.device):
    """On CPU, train with the plain (matmul + softmax) attention kernel: for the short
    sequences of small models it is faster than the CPU flash kernel, whose backward
    dominated the profile of a demo-model step (measured: 442 vs 487 ms per step)."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def param_groups(objective: Objective, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on vectors (norms, biases, boi/eoi); per-role LR scale
    (training-only heads count as role "head")."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in objective.named_parameters():
        if not p.requires_grad:
            continue
        role = objective.model.parameter_role(name[len("model."):]) if name.startswith("model.") else "head"
        scale = cfg.lr_multipliers.get(role, 1.0)
        groups.setdefault((scale, p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0}
            for (scale, decay), ps in sorted(groups.items(), key=lambda kv: kv[0])]


# ---------------------------------------------------------------- checkpoints
def save_training_state(run_dir: Path, objective: Objective, optimizer: torch.optim.Optimizer, step: int,
                        stage: str, cfg: TrainConfig, extra: dict | None = None) -> Path:
    """model.safetensors (checkpoint names) + objective.safetensors (training-only heads) +
    optimizer.safetensors + trainer_state.json, written atomically."""
    out = run_dir / CHECKPOINT_DIR
    names = {id(p): n for n, p in objective.named_parameters()}
    opt_tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, val in optimizer.state.get(p, {}).items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                opt_tensors[f"{names[id(p)]}::{key}"] = t.detach().cpu().contiguous()
    opt_tensors["__rng__::torch"] = torch.get_rng_state()
    state = {"step": step, "stage": stage, "config": asdict(cfg), **(extra or {})}
    heads = {k: v.detach().cpu().contiguous() for k, v in objective.extra_state().items()}
    with atomic_directory(out) as tmp:
        save_file(state_dict_for_saving(objective.model), str(tmp / "model.safetensors"))
        save_file(heads or {"__none__": torch.zeros(0)}, str(tmp / "objective.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return out


def load_training_state(run_dir: Path, objective: Objective, optimizer: torch.optim.Optimizer) -> dict:
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
    objective.model.load_state_dict(weights, strict=False)
    heads.pop("__none__", None)
    if heads:
        objective.load_extra_state(heads)
    params = dict(objective.named_parameters())
    for key, val in opt.items():
        name, slot = key.split("::")
        if name == "__rng__":
            torch.set_rng_state(val)
            continue
        p = params[name]
        optimizer.state[p][slot] = val.to(p.device) if slot != "step" else val
    return state


# --------------------------------------------------------------------- the loop
class _StopFlag:
    """SIGINT/SIGTERM finish the current step, save, and stop (no finished step is lost)."""

    def __init__(self) -> None:
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # second signal: give up at once
            raise KeyboardInterrupt
        self.stop = True
        log.warning("interrupt received: finishing this step and saving a checkpoint")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(model: VLM, data: TrainData, cfg: TrainConfig, run_dir: str | os.PathLike,
          stage: Stage | str = Stage.SCRATCH, train_language: bool = False, train_vision: bool = False,
          device: str | torch.device = "cpu", callbacks: Callbacks | None = None,
          eval_fn: Callable[[VLM], dict] | None = None, eval_every: int = 0,
          stop_after_s: float | None = None, dense_weight: float = 0.0,
          objective_init: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train one stage; resumes from ``run_dir/checkpoint`` when it exists."""
    cb = callbacks or Callbacks()
    stage = Stage(stage)
    run_dir = Path(run_dir)
    device = torch.device(device)
    env = init_distributed(device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    resuming = (run_dir / CHECKPOINT_DIR / "trainer_state.json").is_file()
    apply_stage(model, stage, train_language, train_vision, init_experts=None if not resuming else False)
    model.gradient_checkpointing = cfg.grad_checkpointing
    objective = objective_for(stage, model, dense_weight).to(device)
    if objective_init and not resuming:  # e.g. the dense heads trained by the previous stage
        objective.load_extra_state(objective_init)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(objective, cfg), lr=cfg.lr, betas=cfg.betas, foreach=True)
    start_step = 0
    history: list[dict] = []
    if resuming:
        state = load_training_state(run_dir, objective, optimizer)
        if state.get("stage") != stage.value:
            raise CheckpointError(f"{run_dir / CHECKPOINT_DIR}: holds a {state.get('stage')} checkpoint, not "
                                  f"{stage.value}; use another run directory")
        start_step = int(state["step"])
        history = list(state.get("history", []))
        log.info("resuming %s from step %d", stage.value, start_step)
    runner: torch.nn.Module = objective
    if env.world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.has_experts)  # a batch without images leaves the visual experts idle
    amp = autocast_dtype(cfg.precision, device)
    per_rank = cfg.batch_size // (env.world * cfg.grad_accum)
    if per_rank * env.world * cfg.grad_accum != cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by world size {env.world} x grad_accum "
                          f"{cfg.grad_accum}")
    mem = estimate_memory(model, per_rank, model.config.max_position_embeddings, amp is not None,
                          cfg.grad_checkpointing)
    if env.is_main:
        log.info("%s", mem.describe())
    cb.on_start(cfg.steps, start_step, mem)

    t_start = time.perf_counter()
    last_loss = float("nan")
    step = start_step
    model.train()
    with _StopFlag() as flag:
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = cfg.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            total_loss = torch.zeros((), device=device)
            total_tokens = 0
            for micro in range(cfg.grad_accum):
                first = ((step * cfg.grad_accum + micro) * env.world + env.rank) * per_rank
                batch = data.batch(first, per_rank).to(device)
                sync = micro == cfg.grad_accum - 1
                ctx = runner.no_sync() if (env.world > 1 and not sync) else contextlib.nullcontext()
                with ctx, attention_kernel(device):
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        loss, ntok = runner(batch)
                    (loss / cfg.grad_accum).backward()
                total_loss += loss.detach() / cfg.grad_accum
                total_tokens += ntok
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if env.world > 1:
                dist.all_reduce(total_loss)
                total_loss /= env.world
            last_loss = float(total_loss)
            dt = time.perf_counter() - t0
            entry = StepLog(step, last_loss, lr, total_tokens, dt, cfg.batch_size / dt)
            cb.on_step(entry)
            if step % cfg.log_every == 0 or step == cfg.steps:
                history.append({"step": step, "loss": last_loss, "lr": lr, "elapsed_s": time.perf_counter() - t_start})
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == cfg.steps) and env.is_main:
                model.eval()
                metrics = eval_fn(model)
                model.train()
                history.append({"step": step, "eval": metrics, "elapsed_s": time.perf_counter() - t_start})
                cb.on_eval(step, metrics)
            out_of_time = stop_after_s is not None and time.perf_counter() - t_start >= stop_after_s
            if step % cfg.save_every == 0 or step == cfg.steps or flag.stop or out_of_time:
                _save(env, run_dir, objective, optimizer, step, stage, cfg, history, cb)
            if flag.stop or out_of_time:
                reason = "interrupted" if flag.stop else "time_budget"
                break
        else:
            reason = "completed"
    model.eval()
    return TrainResult(stage.value, step, last_loss, time.perf_counter() - t_start, run_dir / CHECKPOINT_DIR, history,
                       reason)


def _save(env: DistEnv, run_dir, objective, optimizer, step, stage, cfg, history, cb) -> None:
    if env.is_main:
        path = save_training_state(run_dir, objective, optimizer, step, stage.value, cfg, {"history": history})
        cb.on_save(step, path)
    if env.world > 1:
        dist.barrier()

