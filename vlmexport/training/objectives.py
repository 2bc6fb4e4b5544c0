"""What a training stage minimises: the objectives and their losses.

``trainer`` runs whichever objective ``objective_for`` picks; ``vision_pretrain`` supplies
the dense-label data. Both import from here, neither from the other.

- ``NextTokenObjective``: mean cross-entropy over the supervised answer tokens.
- ``DensePatchObjective`` (the ``vision`` stage): a linear head per label set (colour,
  shape, character; see ``data/labels.py``) reads the encoder's patch features; the loss
  is the mean cross-entropy over patches.
- ``NextTokenWithDenseObjective``: both, the dense loss weighted.

The dense heads are training-only: checkpointed with the run, never part of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..models.base import VLM
from ..models.spec import VisionSpec
from .batching import IGNORE, Batch
from ..data.labels import LABEL_SETS
from .stages import Stage


def loss_on_batch(model: VLM, batch: Batch, image_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over supervised tokens (LM head evaluated only there)."""
    if image_embeds is None and batch.pixel_values is not None:
        image_embeds = model.image_embeddings(batch.pixel_values)
    # spliced into the sequence, or cross-attended (which image each position reads follows its placeholders)
    emb, cross = model.decoder_inputs(batch.input_ids, batch.is_image, image_embeds)
    flat_t = batch.targets.reshape(-1)
    select = torch.nonzero(flat_t != IGNORE).flatten()
    logits = model.decode(emb, batch.token_type, batch.position_ids, select=select, cross=cross)
    return F.cross_entropy(logits.float(), flat_t.index_select(0, select)), int(select.numel())


class Objective(torch.nn.Module):
    """What a stage minimises. Wraps the model (so DDP's hooks see the loss's forward)
    and owns any training-only heads, which are checkpointed but never exported."""

    def __init__(self, model: VLM):
        super().__init__()
        self.model = model

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=False)


class NextTokenObjective(Objective):
    def forward(self, batch: Batch):
        return loss_on_batch(self.model, batch)


def dense_heads(width: int) -> nn.ModuleDict:
    gen = torch.Generator().manual_seed(0)
    heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in LABEL_SETS.items()})
    for head in heads.values():
        nn.init.normal_(head.weight, std=0.02, generator=gen)
        nn.init.zeros_(head.bias)
    return heads


def dense_loss(heads: nn.ModuleDict, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    n_patches = next(iter(labels.values())).shape[1]
    feats = feats[:, -n_patches:]  # an encoder that keeps CLS puts it first
    losses = [F.cross_entropy(heads[k](feats).flatten(0, 1).float(), y.flatten()) for k, y in labels.items()]
    return sum(losses) / len(losses)


class DensePatchObjective(Objective):
    """The ``vision`` stage: dense per-patch classification only (batches are
    ``vision_pretrain.PatchBatch``)."""

    def __init__(self, model: VLM):
        super().__init__(model)
        self.heads = dense_heads(model.config.vision_config.hidden_size)

    def forward(self, batch):
        feats = self.model.vision_encoder_module()(batch.pixel_values)
        n = next(iter(batch.labels.values())).numel()
        return dense_loss(self.heads, feats, batch.labels), int(n)


class NextTokenWithDenseObjective(Objective):
    """Next-token loss plus ``weight`` x the dense per-patch loss on the same images
    (keeps training the encoder's patch features while the decoder learns to read them)."""

    def __init__(self, model: VLM, weight: float):
        super().__init__(model)
        self.heads = dense_heads(model.config.vision_config.hidden_size)
        self.weight = weight

    def forward(self, batch):
        feats = self.model.vision_encoder_module()(batch.pixel_values)
        embeds = self.model.connector_module()(feats)
        loss, n = loss_on_batch(self.model, batch, image_embeds=embeds)
        if batch.patch_labels:
            loss = loss + self.weight * dense_loss(self.heads, feats, batch.patch_labels)
        return loss, n


def objective_for(stage: Stage, model: VLM, dense_weight: float = 0.0) -> Objective:
    if stage is Stage.VISION or dense_weight > 0:
        vision = type(model).part_specs(model.config).vision
        if not isinstance(vision, VisionSpec):  # the labels are one ViT's patch grid
            raise ConfigError(f"the dense per-patch loss (stage 'vision', dense_weight > 0) reads one ViT's patch "
                              f"features; {model.arch_name}'s vision part is a {type(vision).__name__}: train it "
                              "with the align/scratch stages and dense_weight 0")
    if stage is Stage.VISION:
        return DensePatchObjective(model)
    if dense_weight > 0:
        return NextTokenWithDenseObjective(model, dense_weight)
    return NextTokenObjective(model)
