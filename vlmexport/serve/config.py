"""What ``vlmexport serve`` is told: one frozen, validated settings object (no fastapi here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import VlmexportError


class ServeConfigError(VlmexportError):
    """A ``vlmexport serve`` option is out of range."""


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    backend: str = "auto"
    precision: str | None = None
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    # generations that run at once: each holds its own copy of the model (its own sessions / KV cache)
    max_concurrency: int = 1
    # requests admitted to wait for a slot; one more is answered 429 with Retry-After
    max_queue: int = 16
    request_timeout_s: float = 120.0  # queue wait + generation
    allowed_image_dir: Path | None = None  # local image paths / file:// URLs only under this directory
    allow_remote_images: bool = False  # http(s) image URLs (fetched with a size and time limit)
    max_image_bytes: int = 20 << 20  # one encoded image
    remote_timeout_s: float = 10.0
    default_max_tokens: int = 256
    model_name: str | None = None  # the id in /v1/models (default: the bundle directory's name)
    threads: int | None = None  # per model copy (default: physical cores / max_concurrency)
    # > 0: one model copy whose decode steps run this many requests together (onnxruntime only);
    # replaces max_concurrency
    batch: int = 0

    def __post_init__(self) -> None:
        checks = (
            (self.max_concurrency >= 1, f"--max-concurrency {self.max_concurrency}: give at least 1"),
            (self.max_queue >= 0, f"--max-queue {self.max_queue}: give 0 or more"),
            (self.request_timeout_s > 0, f"--request-timeout {self.request_timeout_s}: give a positive number of seconds"),
            (0 <= self.port <= 65535, f"--port {self.port}: give a port between 0 and 65535"),
            (self.max_image_bytes > 0, f"--max-image-bytes {self.max_image_bytes}: give a positive size"),
            (self.default_max_tokens >= 1, f"default max_tokens {self.default_max_tokens}: give at least 1"),
            (self.threads is None or self.threads >= 1, f"--threads {self.threads}: give at least 1"),
            (self.batch >= 0, f"--batch {self.batch}: give 0 (off) or the number of requests to batch"),
        )
        for ok, message in checks:
            if not ok:
                raise ServeConfigError(message)
        if self.allowed_image_dir is not None and not Path(self.allowed_image_dir).is_dir():
            raise ServeConfigError(f"--allowed-image-dir {self.allowed_image_dir}: no such directory; create it or "
                                   "leave the option out (then only data: URLs are accepted)")

    @property
    def served_model(self) -> str:
        return self.model_name or Path(self.bundle).resolve().name

    @property
    def max_body_bytes(self) -> int:
        """Upper bound on a request body: base64 inflates images by 4/3; 1 MiB for the rest of the JSON."""
        return self.max_image_bytes * 4 // 3 * 8 + (1 << 20)
