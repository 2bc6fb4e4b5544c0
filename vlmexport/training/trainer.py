"""The training loop: AdamW + warmup/cosine, gradient accumulation and checkpointing,
bf16 autocast, safetensors checkpoints with exact resume, and DDP or FSDP2 under torchrun.

Data is addressed by a global example index (``TrainData.examples(first, n)``; the
micro-batch of step s, micro-step m, rank r starts at ((s * accum + m) * world + r) * n),
so a resumed run sees exactly the batches the interrupted one would have seen; with the
saved optimizer and RNG state this makes resume bit-exact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from ..core.errors import CheckpointError, ConfigError
from ..models.base import VLM
from . import run_state
from .device import OPTIMIZERS, compile_blocks, make_optimizer, move_batch, rank_device
from .fsdp import local_storage_bytes, set_gradient_sync, shard_blocks, unshard_into
from .memory import MemoryEstimate, estimate_memory
from .objectives import Objective, objective_for
from .run_state import CHECKPOINT_DIR
from .stages import Stage, apply_stage

log = logging.getLogger(__name__)


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
    # exactly these parameter roles train, in place of the stage's set (stages.apply_stage); e.g. a
    # first stage that aligns one of two connectors alone. Empty: the stage decides.
    train_roles: tuple[str, ...] = ()
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    shard: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2: weights, grads and AdamW state sharded)
    optimizer: str = "adamw"  # "adamw" (fused where torch has it) or "adamw8bit" (bitsandbytes)
    compile: bool = False  # torch.compile each transformer block
    # build the next micro-batch on a background thread while this one computes (batches are pure
    # functions of their index, so the data are the same either way). None: on CUDA only; on a
    # 2-vCPU CPU the thread competes with torch's for the cores (demo recipe: 6-16% slower per step)
    prefetch: bool | None = None

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("steps, batch_size and grad_accum must be positive")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError("precision must be auto, bf16 or fp32")
        if self.shard not in ("ddp", "fsdp"):
            raise ConfigError(f"shard must be ddp or fsdp, not {self.shard!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")

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
    # trainable parameters' storage: this process's tensors (its shards under FSDP), and the whole
    trainable_bytes_local: int = 0
    trainable_bytes: int = 0


# ------------------------------------------------------------------ environment
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA, and on CPUs with AMX or AVX512-BF16 (a demo-recipe step: ~2x faster on
    an AMX Xeon, 1.35x on an AVX512-BF16 EPYC)."""
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
    return "amx_bf16" in flags or "avx512_bf16" in flags


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


@dataclass
class _Run:
    """What one stage's loop works with, set up by ``_prepare``."""

    env: DistEnv
    device: torch.device
    objective: Objective
    runner: torch.nn.Module  # the objective, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    params: list
    amp: torch.dtype | None
    per_rank: int
    sharded: bool
    start_step: int
    history: list[dict]
    memory: MemoryEstimate
    batches: "Prefetcher | None" = None


class Prefetcher:
    """``data.batch(first, n)``, with the batch asked for next already being built on one
    background thread (rendering, labels and tokenization are Python and numpy; the step's
    torch kernels release the GIL). A batch asked for out of order is built in place."""

    def __init__(self, data: TrainData, n: int, enabled: bool = True):
        self.data, self.n = data, n
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vlmexport-prefetch") if enabled else None
        self._pending: tuple[int, Future] | None = None

    def get(self, first: int, next_first: int | None):
        if self._pending is not None and self._pending[0] == first:
            batch = self._pending[1].result()
        else:
            if self._pending is not None:
                self._pending[1].cancel()
            batch = self.data.batch(first, self.n)
        self._pending = None
        if self._pool is not None and next_first is not None:
            self._pending = (next_first, self._pool.submit(self.data.batch, next_first, self.n))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _prepare(model: VLM, data: TrainData, cfg: TrainConfig, run_dir: Path, stage: Stage, train_language: bool,
             train_vision: bool, device: torch.device, dense_weight: float,
             objective_init: dict[str, torch.Tensor] | None, attention_weight: float = 0.0,
             label_sets: dict[str, int] | None = None, word_attention_weight: float = 0.0) -> _Run:
    env = init_distributed(device)
    device = rank_device(device, env.local_rank)
    per_rank = cfg.batch_size // (env.world * cfg.grad_accum)
    if per_rank * env.world * cfg.grad_accum != cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by world size {env.world} x grad_accum "
                          f"{cfg.grad_accum}")
    torch.manual_seed(cfg.seed)
    model.to(device)
    resuming = run_state.exists(run_dir)
    apply_stage(model, stage, train_language, train_vision, init_experts=None if not resuming else False,
                roles=cfg.train_roles)
    model.gradient_checkpointing = cfg.grad_checkpointing
    objective = objective_for(stage, model, dense_weight, attention_weight, label_sets,
                              word_attention_weight).to(device)
    snap = run_state.read(run_dir) if resuming else None
    if snap is not None:
        if snap.state.get("stage") != stage.value:
            raise CheckpointError(f"{run_dir / CHECKPOINT_DIR}: holds a {snap.state.get('stage')} checkpoint, not "
                                  f"{stage.value}; use another run directory")
        run_state.restore_weights(objective, snap)
        log.info("resuming %s from step %d", stage.value, int(snap.state["step"]))
    elif objective_init:  # e.g. the dense heads trained by the previous stage
        objective.load_extra_state(objective_init)
    amp = autocast_dtype(cfg.precision, device)
    mem = estimate_memory(model, per_rank, sequence_length_of(data, per_rank), amp is not None,
                          cfg.grad_checkpointing, world=env.world, shard=cfg.shard if env.world > 1 else "none",
                          optimizer=cfg.optimizer)
    if cfg.compile:
        log.info("torch.compile: %d blocks", compile_blocks(objective))
    sharded = cfg.shard == "fsdp" and env.world > 1
    runner: torch.nn.Module = objective
    if sharded:
        shard_blocks(objective, device, env.world, amp)
    elif env.world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.has_experts)  # a batch without images leaves the visual experts idle
    optimizer = make_optimizer(param_groups(objective, cfg), cfg.optimizer, cfg.lr, cfg.betas, device, sharded)
    if snap is not None:
        run_state.restore_optimizer(objective, optimizer, snap)
    params = [p for p in objective.parameters() if p.requires_grad]
    return _Run(env, device, objective, runner, optimizer, params, amp, per_rank, sharded,
                int(snap.state["step"]) if snap else 0, list(snap.state.get("history", [])) if snap else [], mem)


def sequence_length_of(data: TrainData, per_rank: int) -> int:
    """Sequence length for the memory estimate: the first batch's (0: batches without text)."""
    ids = getattr(data.batch(0, per_rank), "input_ids", None)
    return int(ids.shape[1]) if ids is not None else 0


def _optimizer_step(run: _Run, data: TrainData, cfg: TrainConfig, step: int) -> tuple[float, int, float]:
    """One optimizer step (all micro-batches); returns (mean loss over ranks, tokens, lr)."""
    lr = cfg.lr_at(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    total_loss = torch.zeros((), device=run.device)
    total_tokens = 0

    def first_of(k: int) -> int:  # micro-batch k of the run (k = step * grad_accum + micro)
        return (k * run.env.world + run.env.rank) * run.per_rank

    for micro in range(cfg.grad_accum):
        k = step * cfg.grad_accum + micro
        nxt = first_of(k + 1) if step + 1 < cfg.steps or micro + 1 < cfg.grad_accum else None
        if run.batches is not None:
            batch = run.batches.get(first_of(k), nxt)
        else:
            batch = data.batch(first_of(k), run.per_rank)
        batch = move_batch(batch, run.device)
        sync = micro == cfg.grad_accum - 1
        if run.sharded:
            set_gradient_sync(run.runner, sync)
        ctx = run.runner.no_sync() if (run.env.world > 1 and not run.sharded and not sync) else contextlib.nullcontext()
        with ctx, attention_kernel(run.device):
            with torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
                loss, ntok = run.runner(batch)
            (loss / cfg.grad_accum).backward()
        total_loss += loss.detach() / cfg.grad_accum
        total_tokens += ntok
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.env.world > 1:
        dist.all_reduce(total_loss)
        total_loss /= run.env.world
    return float(total_loss), total_tokens, lr


def train(model: VLM, data: TrainData, cfg: TrainConfig, run_dir: str | os.PathLike,
          stage: Stage | str = Stage.SCRATCH, train_language: bool = False, train_vision: bool = False,
          device: str | torch.device = "cpu", callbacks: Callbacks | None = None,
          eval_fn: Callable[[VLM], dict] | None = None, eval_every: int = 0,
          stop_after_s: float | None = None, dense_weight: float = 0.0,
          objective_init: dict[str, torch.Tensor] | None = None, attention_weight: float = 0.0,
          label_sets: dict[str, int] | None = None, word_attention_weight: float = 0.0) -> TrainResult:
    """Train one stage; resumes from ``run_dir/checkpoint`` when it exists. ``label_sets``: the
    dense heads' label sets when the data carries more than colour/shape/character."""
    cb = callbacks or Callbacks()
    stage, run_dir = Stage(stage), Path(run_dir)
    run = _prepare(model, data, cfg, run_dir, stage, train_language, train_vision, torch.device(device),
                   dense_weight, objective_init, attention_weight, label_sets, word_attention_weight)
    if run.env.is_main:
        log.info("%s", run.memory.describe())
    if run.sharded and eval_fn is not None and eval_every:
        log.warning("no evaluation during FSDP training (the model is sharded); evaluate the saved model after it")
        eval_fn = None
    cb.on_start(cfg.steps, run.start_step, run.memory)
    t_start = time.perf_counter()
    last_loss, step, history = float("nan"), run.start_step, run.history
    model.train()
    prefetch = cfg.prefetch if cfg.prefetch is not None else run.device.type == "cuda"
    run.batches = Prefetcher(data, run.per_rank, prefetch)
    with _StopFlag() as flag, contextlib.closing(run.batches):
        while step < cfg.steps:
            t0 = time.perf_counter()
            last_loss, tokens, lr = _optimizer_step(run, data, cfg, step)
            step += 1
            dt = time.perf_counter() - t0
            cb.on_step(StepLog(step, last_loss, lr, tokens, dt, cfg.batch_size / dt))
            if step % cfg.log_every == 0 or step == cfg.steps:
                history.append({"step": step, "loss": last_loss, "lr": lr, "elapsed_s": time.perf_counter() - t_start})
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == cfg.steps) and run.env.is_main:
                model.eval()
                metrics = eval_fn(model)
                model.train()
                history.append({"step": step, "eval": metrics, "elapsed_s": time.perf_counter() - t_start})
                cb.on_eval(step, metrics)
            out_of_time = stop_after_s is not None and time.perf_counter() - t_start >= stop_after_s
            if step % cfg.save_every == 0 or step == cfg.steps or flag.stop or out_of_time:
                _save(run, run_dir, step, stage, cfg, history, cb)
            if flag.stop or out_of_time:
                reason = "interrupted" if flag.stop else "time_budget"
                break
        else:
            reason = "completed"
    local = local_storage_bytes(run.params)
    whole = sum(p.numel() * p.element_size() for p in run.params)
    if run.sharded:
        unshard_into(model)  # the caller gets a plain model back, as after any other run
    model.eval()
    return TrainResult(stage.value, step, last_loss, time.perf_counter() - t_start, run_dir / CHECKPOINT_DIR, history,
                       reason, local, whole)


def _save(run: _Run, run_dir: Path, step: int, stage: Stage, cfg: TrainConfig, history: list, cb: Callbacks) -> None:
    state = {"step": step, "stage": stage.value, "config": asdict(cfg), "world": run.env.world, "history": history}
    snap = run_state.collect(run.objective, run.optimizer, state)  # collective under FSDP
    if run.env.is_main:
        cb.on_save(step, run_state.write(run_dir, snap))
    if run.env.world > 1:
        dist.barrier()
