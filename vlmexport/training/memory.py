"""Memory estimate printed before training.

Mixed-precision AdamW keeps, per *trainable* parameter, fp32 weights (4 B), fp32
gradients (4 B) and two fp32 moments (8 B): 16 B, plus ~2 B for the bf16 copy autocast
makes of each matmul weight, so 16-18 B. Frozen parameters cost their weights only.
Activations follow Korthikanti et al. (2022): per transformer layer and token about
``h * (34 + 5 * a * s / h)`` bytes with 16-bit activations (x2 in fp32); with gradient
checkpointing only each layer's input (2 h bytes/token) is kept, plus one layer's worth.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.base import VLM

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    trainable_params: int
    total_params: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"memory estimate: {self.total / GIB:.2f} GiB = weights {self.weights / GIB:.2f} + gradients "
                f"{self.gradients / GIB:.2f} + AdamW state {self.optimizer / GIB:.2f} + activations "
                f"{self.activations / GIB:.2f} ({self.trainable_params:,} of {self.total_params:,} parameters train)")


def estimate_memory(model: VLM, micro_batch: int, seq_len: int, mixed_precision: bool,
                    grad_checkpointing: bool) -> MemoryEstimate:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = 4 * total + (2 * total if mixed_precision else 0)
    gradients = 4 * trainable
    optimizer = 8 * trainable
    act_bytes = 1 if mixed_precision else 2  # multiplier on the 16-bit formula
    c = model.config
    vc = c.vision_config

    def per_layer(tokens: int, hidden: int, heads: int) -> float:
        return tokens * hidden * (34 + 5 * heads * tokens / hidden) * act_bytes

    text_tokens = seq_len
    vis_tokens = vc.num_positions
    if grad_checkpointing:
        text = micro_batch * (c.num_hidden_layers * 2 * text_tokens * c.hidden_size * act_bytes
                              + per_layer(text_tokens, c.hidden_size, c.num_attention_heads))
    else:
        text = micro_batch * c.num_hidden_layers * per_layer(text_tokens, c.hidden_size, c.num_attention_heads)
    vision = micro_batch * vc.num_hidden_layers * per_layer(vis_tokens, vc.hidden_size, vc.num_heads)
    logits = micro_batch * seq_len * c.vocab_size * 4 // 8  # LM head runs on supervised tokens only
    return MemoryEstimate(weights=int(weights), gradients=int(gradients), optimizer=int(optimizer),
                          activations=int(text + vision + logits), trainable_params=trainable, total_params=total)
