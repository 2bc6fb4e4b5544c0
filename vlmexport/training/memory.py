"""Memory estimate printed before training (``vlmexport train --estimate`` prints it alone).

Per process, in bytes:

- weights: fp32 master copies of every parameter (4 B); under bf16 autocast also the
  bf16 copies of the decoder weights that autograd keeps for backward (2 B each, frozen
  ones included: backward through a frozen linear still needs its weight; with gradient
  checkpointing only one block's copies exist at a time). Under FSDP each rank keeps
  1/world of the master weights plus the gathered weights of the two blocks in flight.
- gradients: fp32, trainable parameters only (4 B; /world under FSDP).
- optimizer: AdamW's two fp32 moments (8 B), or bitsandbytes' 8-bit AdamW (2 B plus one
  fp32 scale per 256-value block) (/world under FSDP). With the gradients and master
  weights: the 16 B per trainable parameter of mixed-precision AdamW (18 B with the bf16
  copies).
- activations: what autograd saves, per decoder block and token, measured with saved-tensor
  hooks on this code (``tests/training/test_memory.py`` checks it): ``50 h + 15.4 f``
  bytes in fp32, ``45 h + 7.7 f`` under bf16 autocast (RMSNorm and the residual stream
  stay fp32), plus the fp32 attention probabilities of the CPU math kernel, ``4 a s``.
  With gradient checkpointing only each block's input (4 h) is kept, plus one block's
  worth being recomputed. The ViT counts only when it trains. One more block's worth
  covers the gradients of the activations in flight during backward.
- overhead: the process itself (Python, torch, the data pipeline): measured at ~0.45 GiB
  RSS on CPU; on CUDA this is host memory, and the CUDA context (~0.5 GiB of device
  memory) is counted instead.

docs/training.md compares the estimate with measured peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..models.base import VLM

GIB = 1024**3
CPU_OVERHEAD = int(0.45 * GIB)
CUDA_CONTEXT = int(0.5 * GIB)
DEVICES = {"24 GB GPU": 24 * 10**9, "8 GB Jetson": 8 * 10**9}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    trainable_params: int
    total_params: int
    overhead: int = 0
    world: int = 1
    shard: str = "none"  # "none" | "ddp" | "fsdp"
    label: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def describe(self) -> str:
        where = f" per process ({self.shard.upper()} over {self.world})" if self.world > 1 else ""
        return f"memory estimate{where}: {self.breakdown()}"

    def breakdown(self) -> str:
        return (f"{self.total / GIB:.2f} GiB = weights {self.weights / GIB:.2f} + gradients "
                f"{self.gradients / GIB:.2f} + optimizer state {self.optimizer / GIB:.2f} + activations "
                f"{self.activations / GIB:.2f} + overhead {self.overhead / GIB:.2f} ({self.trainable_params:,} of "
                f"{self.total_params:,} parameters train)")


@dataclass(frozen=True)
class _Shape:
    """What the estimate needs of a model: counts split by part, and the block shapes."""

    total: int
    trainable: int
    decoder_params: int
    block_params: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    vision_trains: bool
    vis_layers: int
    vis_hidden: int
    vis_ffn: int
    vis_heads: int
    vis_tokens: int
    vocab: int

    @classmethod
    def of(cls, model: VLM) -> "_Shape":
        c, vc = model.config, model.config.vision_config
        blocks = list(model.decoder_layers())
        vision = model.vision_encoder_module()
        return cls(total=sum(p.numel() for p in model.parameters()),
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   decoder_params=sum(p.numel() for b in blocks for p in b.parameters()),
                   block_params=sum(p.numel() for p in blocks[0].parameters()) if blocks else 0,
                   layers=c.num_hidden_layers, hidden=c.hidden_size, ffn=c.intermediate_size,
                   heads=c.num_attention_heads, vision_trains=any(p.requires_grad for p in vision.parameters()),
                   vis_layers=vc.num_hidden_layers, vis_hidden=vc.hidden_size, vis_ffn=vc.intermediate_size,
                   vis_heads=vc.num_heads, vis_tokens=vc.num_positions, vocab=c.vocab_size)

    def scaled(self, k: float) -> "_Shape":
        """Width and depth both x k: parameters grow as k^3, activations per token as k^2."""
        p3 = lambda n: int(n * k**3)  # noqa: E731
        return replace(self, total=p3(self.total), trainable=p3(self.trainable), decoder_params=p3(self.decoder_params),
                       block_params=int(self.block_params * k * k), layers=max(1, round(self.layers * k)),
                       hidden=int(self.hidden * k), ffn=int(self.ffn * k), heads=max(1, round(self.heads * k)),
                       vis_layers=max(1, round(self.vis_layers * k)), vis_hidden=int(self.vis_hidden * k),
                       vis_ffn=int(self.vis_ffn * k), vis_heads=max(1, round(self.vis_heads * k)))


def block_activation_bytes(tokens: int, seq: int, hidden: int, ffn: int, heads: int, mixed: bool) -> float:
    """Bytes autograd saves for one transformer block over ``tokens`` tokens of ``seq``-long sequences."""
    per_token = (45 * hidden + 7.7 * ffn) if mixed else (50 * hidden + 15.4 * ffn)
    return tokens * (per_token + 4 * heads * seq)


def estimate_memory(model: VLM, micro_batch: int, seq_len: int, mixed_precision: bool, grad_checkpointing: bool,
                    world: int = 1, shard: str = "none", optimizer: str = "adamw", images_per_sequence: int = 1,
                    device: str = "cpu") -> MemoryEstimate:
    return _estimate(_Shape.of(model), micro_batch, seq_len, mixed_precision, grad_checkpointing, world, shard,
                     optimizer, images_per_sequence, device)


def _estimate(s: _Shape, micro_batch: int, seq_len: int, mixed: bool, gc: bool, world: int, shard: str,
              optimizer: str, images: int, device: str) -> MemoryEstimate:
    fsdp = shard == "fsdp" and world > 1
    div = world if fsdp else 1
    weights = 4 * s.total / div
    if fsdp:  # two gathered blocks in flight (compute dtype)
        weights += 2 * s.block_params * (2 if mixed else 4)
    if mixed:  # bf16 copies saved for backward: all blocks, or one block under checkpointing
        weights += 2 * (s.block_params if gc else s.decoder_params)
    gradients = 4 * s.trainable / div
    opt_bytes = 8.0 if optimizer == "adamw" else 2 + 4 / 256
    opt = opt_bytes * s.trainable / div
    tokens = micro_batch * seq_len  # 0: the decoder does not run (the vision stage)
    block = block_activation_bytes(tokens, seq_len, s.hidden, s.ffn, s.heads, mixed)
    text = (s.layers * 4 * s.hidden * tokens + block) if gc else s.layers * block
    text += block  # activation gradients in flight during backward
    if mixed and tokens == 0:
        weights -= 2 * (s.block_params if gc else s.decoder_params)
    vision = 0.0
    if s.vision_trains:
        vt = micro_batch * images * s.vis_tokens
        vblock = block_activation_bytes(vt, s.vis_tokens, s.vis_hidden, s.vis_ffn, s.vis_heads, mixed)
        vision = ((s.vis_layers * 4 * s.vis_hidden * vt + vblock) if gc else s.vis_layers * vblock) + vblock
    logits = 3 * 4 * tokens * s.vocab // 8  # fp32 logits, softmax and grad at the supervised tokens (~1/8)
    overhead = CUDA_CONTEXT if device == "cuda" else CPU_OVERHEAD
    label = f"{'bf16' if mixed else 'fp32'}{' + grad ckpt' if gc else ''}{' + 8-bit AdamW' if optimizer != 'adamw' else ''}"
    return MemoryEstimate(weights=int(weights), gradients=int(gradients), optimizer=int(opt),
                          activations=int(text + vision + logits), trainable_params=s.trainable, total_params=s.total,
                          overhead=overhead, world=world, shard=shard if world > 1 else "none", label=label)


def largest_fitting(model: VLM, budget_bytes: int, micro_batch: int, seq_len: int, mixed: bool, gc: bool,
                    world: int = 1, shard: str = "none", optimizer: str = "adamw", device: str = "cuda") -> int:
    """Parameters of the largest model of this one's shape family (width and depth scaled
    together, the same parts trainable) whose estimate fits ``budget_bytes`` per process;
    0 if not even a tiny one does."""
    base = _Shape.of(model)

    def fits(k: float) -> bool:
        est = _estimate(base.scaled(k), micro_batch, seq_len, mixed, gc, world, shard, optimizer, 1, device)
        return est.total <= budget_bytes

    lo, hi = 0.0, 1.0
    while fits(hi) and hi < 1e4:
        lo, hi = hi, hi * 2
    if lo == 0.0 and not fits(1e-3):
        return 0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return int(base.total * lo**3)


def settings_table(model: VLM, micro_batch: int, seq_len: int, world: int = 1, shard: str = "none",
                   optimizer: str = "adamw", devices: dict[str, int] | None = None) -> list[dict]:
    """For fp32 / bf16 x with / without gradient checkpointing: the estimate for this model
    (on CPU) and the largest model of its family that fits each device's memory (on CUDA,
    one device per process)."""
    devices = devices or DEVICES
    rows = []
    for mixed in (False, True):
        for gc in (False, True):
            est = estimate_memory(model, micro_batch, seq_len, mixed, gc, world, shard, optimizer)
            row = {"setting": est.label, "estimate_gib": est.total / GIB}
            for name, budget in devices.items():
                row[name] = largest_fitting(model, budget, micro_batch, seq_len, mixed, gc, world, shard, optimizer)
            rows.append(row)
    return rows
