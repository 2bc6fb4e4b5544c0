"""OpenAI chat-completions request bodies (pydantic) and the response / chunk objects.

Only what the model can honour is accepted: text and ``image_url`` content parts,
``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``,
``seed``, ``stream`` and ``stream_options.include_usage``. Fields OpenAI defines that
do not change a greedy/sampled answer here (``user``, ``metadata``, ``store``...) are
ignored; ones that would (``n`` > 1, tools, logprobs, penalties) are refused with 400
rather than silently dropped.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import BadRequest


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def parts(self) -> list[TextPart | ImagePart]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(type="text", text=self.content)]
        return list(self.content)


class StreamOptions(_Model):
    include_usage: bool = False


# fields that would change what is generated but that this server cannot honour
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "logit_bias",
                "response_format", "audio", "prediction")


class ChatCompletionRequest(_Model):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    extra: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _collect_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            data["extra"] = {k: data[k] for k in _UNSUPPORTED if data.get(k) not in (None, False, [], {})}
        return data

    def check_supported(self) -> None:
        """Refuse (400) what the server would otherwise silently ignore."""
        if self.n not in (None, 1):
            raise BadRequest(f"n={self.n}: this server returns one choice per request; send n=1 or leave it out",
                             param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise BadRequest(f"{name} is not supported by this server; leave it out", param=name)
        if self.extra:
            name = next(iter(self.extra))
            raise BadRequest(f"{name} is not supported by this server; leave it out", param=name)
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise BadRequest("stop takes up to 4 non-empty strings", param="stop")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def completion_id() -> str:
    import uuid

    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
          usage_: dict[str, int] | None = None, with_choice: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}] if with_choice else []}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def model_card(model: str, created: int, backend: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "vlmexport", "backend": backend}
