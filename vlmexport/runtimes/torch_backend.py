"""The ``torch`` backend: the PyTorch reference model behind the shared pipeline."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..core.prompt import ChatTemplate
from ..models.base import VLM
from ..models.checkpoint import load_pretrained
from .torch_session import TorchSession
from .pipeline import Pipeline
from .spec import ModelSpec

CHAT_TEMPLATE = "chat_template.json"


def model_spec(model: VLM) -> ModelSpec:
    c = model.config
    return ModelSpec(image_tokens=model.image_tokens(), expert_routing=c.expert_routing, position_ids=c.position_ids,
                     pad_token_id=c.pad_token_id, max_length=c.max_position_embeddings)


def chat_template_for(model: VLM, model_dir: str | os.PathLike | None = None) -> ChatTemplate:
    """The model directory's chat_template.json if present, else the architecture's default."""
    if model_dir is not None and (Path(model_dir) / CHAT_TEMPLATE).is_file():
        return ChatTemplate.from_dict(json.loads((Path(model_dir) / CHAT_TEMPLATE).read_text()))
    return model.default_chat_template()


def pipeline_from_model(model: VLM, tokenizer, preprocess, template: ChatTemplate | None = None,
                        max_length: int | None = None) -> Pipeline:
    session = TorchSession(model, max_length=max_length)
    # the prompt-length check must use the session's context, which ``max_length`` may shorten
    spec = replace(model_spec(model), max_length=session.max_length)
    return Pipeline(session, tokenizer, template or model.default_chat_template(), preprocess, spec, backend="torch")


def pipeline_from_model_dir(model_dir: str | os.PathLike, device: str = "cpu",
                            dtype: torch.dtype = torch.float32) -> Pipeline:
    loaded = load_pretrained(model_dir, dtype=dtype, device=device)
    return pipeline_from_model(loaded.model, loaded.tokenizer, loaded.preprocess,
                               chat_template_for(loaded.model, model_dir))
