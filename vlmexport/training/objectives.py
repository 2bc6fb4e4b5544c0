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

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..models.base import VLM
from ..models.layers import apply_rope, routed
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


def dense_heads(width: int, sets: dict[str, int] | None = None) -> nn.ModuleDict:
    """A linear head per label set (name -> classes; default ``data.labels.LABEL_SETS``)."""
    gen = torch.Generator().manual_seed(0)
    heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in (sets or LABEL_SETS).items()})
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

    def __init__(self, model: VLM, label_sets: dict[str, int] | None = None):
        super().__init__(model)
        self.heads = dense_heads(model.config.vision_config.hidden_size, label_sets)

    def forward(self, batch):
        feats = self.model.vision_encoder_module()(batch.pixel_values)
        n = next(iter(batch.labels.values())).numel()
        return dense_loss(self.heads, feats, batch.labels), int(n)


class AttentionProbe:
    """Reads what one decoder layer's attention does at chosen query positions.

    A forward pre-hook keeps the layer's (normed) input and RoPE tables; ``log_probs``
    recomputes that layer's queries at the chosen positions (language expert) and keys at
    every image position (visual expert) and returns, per (row, query, head), the
    log-softmax over the image tokens only. Written for cogvlm's expert attention (the one
    family whose demo recipe uses it)."""

    def __init__(self, model: VLM, layer: int = -1):
        attn = getattr(model.decoder_layers()[layer], "self_attn", None)
        if not all(hasattr(attn, n) for n in ("language_expert_query_key_value", "vision_expert_query_key_value")):
            raise ConfigError(f"the attention loss (attention_weight > 0) reads cogvlm's expert attention; "
                              f"{model.arch_name} has none: set attention_weight 0")
        self.attn = attn
        self.inputs: tuple | None = None
        attn.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        if module.training:
            self.inputs = (args[0], args[1], args[2], args[3])  # x (normed), cos, sin, expert route

    @staticmethod
    def image_positions(is_image: torch.Tensor) -> torch.Tensor:
        """[B, n_image] positions of each row's image tokens (every row holds one image)."""
        return torch.nonzero(is_image).view(is_image.shape[0], -1, 2)[..., 1]

    def image_inputs(self, is_image: torch.Tensor) -> torch.Tensor:
        """The layer's (normed) input at every image position: what its keys and values read
        [B, n_image, hidden] (boi, the patches, eoi)."""
        x = self.inputs[0]
        return x[torch.arange(x.shape[0])[:, None], self.image_positions(is_image)]

    def _queries(self, targets) -> torch.Tensor:
        """[T, head_dim]: each target's query (language expert, after RoPE) in its head."""
        x, cos, sin, _ = self.inputs
        a = self.attn
        rows, qp = targets.rows, targets.query_pos
        q = F.linear(x[rows, qp], a.language_expert_query_key_value.weight[:x.shape[-1]]).view(-1, 1, a.num_heads,
                                                                                              a.head_dim)
        q = apply_rope(q, cos[rows, qp][:, None], sin[rows, qp][:, None])[:, 0]  # [T, nh, hd]
        return q[torch.arange(len(rows)), targets.heads]

    def log_probs(self, targets, is_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities [T, n_image], key mask [T, n_image]) for ``targets``."""
        x, cos, sin, _ = self.inputs
        a = self.attn
        H, nh, hd = x.shape[-1], a.num_heads, a.head_dim
        img_pos = self.image_positions(is_image)  # [B, n_img]
        n_img = img_pos.shape[1]
        rows, heads = targets.rows, targets.heads
        q = self._queries(targets)  # [T, hd]
        b = torch.arange(x.shape[0])[:, None]
        xk = x[b, img_pos]  # [B, n_img, H]
        k = F.linear(xk, a.vision_expert_query_key_value.weight[H:2 * H]).view(x.shape[0], n_img, nh, hd)
        k = apply_rope(k, cos[b, img_pos], sin[b, img_pos])  # [B, n_img, nh, hd]
        k = k[rows, :, heads]  # [T, n_img, hd]
        scores = torch.einsum("td,tnd->tn", q.float(), k.float()) / math.sqrt(hd)
        keys = torch.gather(targets.keys, 1, img_pos[rows])  # [T, n_img]
        return F.log_softmax(scores, dim=-1), keys

    def log_probs_causal(self, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities [T, S], key mask [T, S]) over every position a query sees (causal),
        keys through the expert each position runs: the layer's attention itself."""
        x, cos, sin, route = self.inputs
        a = self.attn
        B, S, H = x.shape
        nh, hd = a.num_heads, a.head_dim
        wl, wv = a.language_expert_query_key_value.weight, a.vision_expert_query_key_value.weight
        rows, qp, heads = targets.rows, targets.query_pos, targets.heads
        q = self._queries(targets)  # [T, hd]
        k = routed(route, x, lambda t: F.linear(t, wl[H:2 * H]), lambda t: F.linear(t, wv[H:2 * H]))
        k = apply_rope(k.view(B, S, nh, hd), cos, sin)[rows, :, heads]  # [T, S, hd]
        scores = torch.einsum("td,tsd->ts", q.float(), k.float()) / math.sqrt(hd)
        scores = scores.masked_fill(torch.arange(S, device=x.device)[None] > qp[:, None], float("-inf"))
        return F.log_softmax(scores, dim=-1), targets.keys


def attention_loss(probe: AttentionProbe, targets, is_image: torch.Tensor | None) -> torch.Tensor:
    """-log(attention mass on the answer's patches), averaged over (answer, head) pairs; with
    ``is_image`` None, the mass on the target keys among all the positions a query sees. A
    ``spread`` target's loss is instead KL(the even spread over its keys || the attention)
    (least when the head averages them: a pooled count reads n / patches, not a mean of n)."""
    logp, keys = probe.log_probs(targets, is_image) if is_image is not None else probe.log_probs_causal(targets)
    loss = -torch.logsumexp(logp.masked_fill(~keys, float("-inf")), dim=-1)
    if targets.spread is not None:
        n = keys.sum(-1).clamp(min=1)
        even = -logp.masked_fill(~keys, 0.0).sum(-1) / n - n.float().log()  # KL(even || attention), 0 at best
        loss = torch.where(targets.spread, even, loss)
    return loss.mean()


class NextTokenWithDenseObjective(Objective):
    """Next-token loss plus ``weight`` x the dense per-patch loss on the same images
    (keeps training the encoder's patch features while the decoder learns to read them),
    plus ``attention_weight`` x the question-conditioned attention loss: at the position
    that predicts an answer, heads 0 and 1 of the last decoder layer should read the
    patches of the objects the question names (``data.labels.question_regions``; for a
    question of a ``pool_categories`` category head 0 spreads evenly over every patch)."""

    def __init__(self, model: VLM, weight: float, attention_weight: float = 0.0,
                 label_sets: dict[str, int] | None = None, word_attention_weight: float = 0.0):
        super().__init__(model)
        self.heads = dense_heads(model.config.vision_config.hidden_size, label_sets)
        self.weight = weight
        self.attention_weight = attention_weight
        self._probe = AttentionProbe(model) if attention_weight > 0 else None
        # the first layer's heads 0/1 read the question words that name what the answer depends on
        self.word_attention_weight = word_attention_weight
        self._word_probe = AttentionProbe(model, layer=0) if word_attention_weight > 0 else None
        if self._probe is not None and weight > 0:
            # the same per-patch labels read from what the probed layer's keys and values see: without
            # them, a demo run with the attention loss on every category dropped colour in the connector
            # (docs/training.md, "Auxiliary losses")
            self.decoder_heads = dense_heads(model.config.hidden_size, label_sets)

    def forward(self, batch):
        feats = self.model.vision_encoder_module()(batch.pixel_values)
        embeds = self.model.connector_module()(feats)
        loss, n = loss_on_batch(self.model, batch, image_embeds=embeds)
        if batch.patch_labels and self.weight > 0:
            loss = loss + self.weight * dense_loss(self.heads, feats, batch.patch_labels)
        targets = batch.attention_targets
        if self._probe is not None and self._probe.inputs is not None:
            if batch.patch_labels and self.weight > 0:
                image = self._probe.image_inputs(batch.is_image)[:, 1:-1]  # the patches (no boi/eoi)
                loss = loss + self.weight * dense_loss(self.decoder_heads, image, batch.patch_labels)
            if targets is not None and len(targets.rows):
                loss = loss + self.attention_weight * attention_loss(self._probe, targets, batch.is_image)
            self._probe.inputs = None
        words = batch.word_targets
        if self._word_probe is not None and self._word_probe.inputs is not None:
            if words is not None and len(words.rows):
                loss = loss + self.word_attention_weight * attention_loss(self._word_probe, words, None)
            self._word_probe.inputs = None
        return loss, n


def objective_for(stage: Stage, model: VLM, dense_weight: float = 0.0, attention_weight: float = 0.0,
                  label_sets: dict[str, int] | None = None, word_attention_weight: float = 0.0) -> Objective:
    """``label_sets``: the dense heads' label sets (``data.labels.label_sets``; default the
    colour/shape/character ones)."""
    if stage is Stage.VISION or dense_weight > 0 or attention_weight > 0 or word_attention_weight > 0:
        vision = type(model).part_specs(model.config).vision
        if not isinstance(vision, VisionSpec):  # the labels are one ViT's patch grid
            raise ConfigError(f"the dense per-patch loss (stage 'vision', dense_weight > 0) reads one ViT's patch "
                              f"features; {model.arch_name}'s vision part is a {type(vision).__name__}: train it "
                              "with the align/scratch stages and dense_weight 0")
    if stage is Stage.VISION:
        return DensePatchObjective(model, label_sets)
    if dense_weight > 0 or attention_weight > 0 or word_attention_weight > 0:
        return NextTokenWithDenseObjective(model, dense_weight, attention_weight, label_sets, word_attention_weight)
    return NextTokenObjective(model)
