"""The ``torch`` backend: the PyTorch reference model behind the shared pipeline."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from ..core.prompt import ChatTemplate
from ..models.base import VLM
from ..models.checkpoint import load_pretrained, read_chat_template
from .pipeline import Pipeline
from .spec import ModelSpec
from .torch_session import TorchSession



def model_spec(model: VLM) -> ModelSpec:
    c = model.config
    return ModelSpec(image_tokens=model.image_tokens(), expert_routing=c.expert_routing, position_ids=c.position_ids,
                     pad_token_id=c.pad_token_id, max_length=c.max_position_embeddings,
                     image_placement=model.image_placement, image_token_id=model.image_placeholder_id())


def chat_template_for(model: VLM, model_dir: str | os.PathLike | None = None) -> ChatTemplate:
    """The model directory's own chat template if it has one, else the architecture's."""
    if model_dir is not None:
        return read_chat_template(model_dir, type(model), model.config)
    return model.default_chat_template(model.config)


def pipeline_from_model(model: VLM, tokenizer, preprocess, template: ChatTemplate | None = None,
                        max_length: int | None = None) -> Pipeline:
    session = TorchSession(model, max_length=max_length)
    # the prompt-length check must use the session's context, which ``max_length`` may shorten
    spec = replace(model_spec(model), max_length=session.max_length)
    return Pipeline(session, tokenizer, template or model.default_chat_template(model.config), preprocess, spec,
                    backend="torch")


def pipeline_from_model_dir(model_dir: str | os.PathLike, device: str = "cpu",
                            dtype: torch.dtype = torch.float32) -> Pipeline:
    loaded = load_pretrained(model_dir, dtype=dtype, device=device)
    return pipeline_from_model(loaded.model, loaded.tokenizer, loaded.preprocess, loaded.template)
