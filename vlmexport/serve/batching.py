"""Batched serving for the onnxruntime backend (``vlmexport serve --batch N``).

One model copy, one worker thread, up to N sequences at once: a new request is prefilled
alone into a free row of the batched KV cache
(:class:`~vlmexport.runtimes.onnxruntime_batch.BatchedOrtSession`), then every running
request advances by one token per decoder run. Sampling, stop rules and text deltas are
the shared ones (:class:`~vlmexport.core.generation.Sampler`, ``TextStream``). Admission,
429, timeouts, cancel-at-the-next-token and metrics behave as in :class:`Engine`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from ..core.generation import Sampler, TextStream
from ..runtimes.onnxruntime_batch import BatchedOrtSession
from ..runtimes.pipeline import Pipeline
from .engine import Delta, Done, Engine, Failed, Prepared
from .errors import Overloaded, Timeout
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class _Seq:
    job: Prepared
    deadline: float
    cancel: threading.Event
    emit: Callable[[object], None]
    admitted: float
    slot: int = -1
    sampler: Sampler | None = None
    text: TextStream | None = None
    position: int = 0
    last: float = 0.0
    count: int = 0
    token: int = 0
    finished: bool = field(default=False)


class BatchEngine(Engine):
    """The :class:`Engine` interface over one pipeline whose decode steps are batched."""

    def __init__(self, pipeline: Pipeline, slots: int, metrics: Metrics, max_queue: int):
        if not pipeline.backend.startswith("onnxruntime"):
            raise ValueError("batched decode needs the onnxruntime backend")
        super().__init__([pipeline], metrics, max_queue)
        self.batch = BatchedOrtSession(pipeline.session, slots)
        self.capacity = slots + max_queue
        self.slots = slots
        metrics.slots.set(slots)
        self._incoming: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vlmexport-batch", daemon=True)
        self._thread.start()

    def retry_after(self) -> int:
        return max(1, min(60, round(self._mean_s * max(1, self.inflight - self.slots + 1) / self.slots)))

    async def generate(self, job: Prepared, deadline: float, cancel: threading.Event,
                       disconnected: asyncio.Event | None = None) -> AsyncIterator[Delta | Done | Failed]:
        if self.inflight >= self.capacity:
            self.metrics.requests.labels("rejected").inc()
            raise Overloaded(f"the server is busy ({self.slots} running, {self.max_queue} queued); retry after "
                             f"{self.retry_after()} s", headers={"Retry-After": str(self.retry_after())})
        self.inflight += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seq = _Seq(job, deadline, cancel, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                   time.monotonic())
        self.metrics.queue_depth.inc()
        self._incoming.put(seq)
        gone = asyncio.ensure_future(disconnected.wait()) if disconnected is not None else None
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                waits = {get} | ({gone} if gone is not None and not gone.done() else set())
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    cancel.set()  # the client left: the worker drops it at its next step
                    return
                ev = get.result()
                if isinstance(ev, Failed) and isinstance(ev.error, Timeout) and seq.count == 0:
                    raise ev.error  # nothing was sent yet: an HTTP 504
                yield ev
                if isinstance(ev, (Done, Failed)):
                    return
        finally:
            cancel.set()
            self.inflight -= 1
            if gone is not None and not gone.done():
                gone.cancel()

    # ------------------------------------------------------------ worker thread
    def _loop(self) -> None:
        active: dict[int, _Seq] = {}
        while not self._stop.is_set():
            try:
                self._admit(active)
                if active:
                    self._step(active)
            except Exception as exc:  # noqa: BLE001 - a backend failure ends the running requests with a 500
                log.exception("batched generation failed")
                for seq in list(active.values()):
                    self._finish(active, seq, None, exc)

    def _admit(self, active: dict[int, _Seq]) -> None:
        free = [s for s in range(self.slots) if s not in active]
        while free:
            try:
                seq = self._incoming.get(timeout=0.05) if not active else self._incoming.get_nowait()
            except queue.Empty:
                return
            self.metrics.queue_depth.dec()
            if seq.cancel.is_set():
                self.metrics.requests.labels("cancelled").inc()
                continue
            if time.monotonic() > seq.deadline:
                self.metrics.requests.labels("timeout").inc()
                seq.emit(Failed(Timeout("no slot became free within the request timeout; retry later",
                                        code="queue_timeout")))
                continue
            seq.slot = free.pop(0)
            active[seq.slot] = seq
            self.metrics.running.inc()
            try:
                self._start(active, seq)
            except Exception as exc:  # noqa: BLE001 - this request fails (500), the others go on
                log.exception("prefill failed")
                self._finish(active, seq, None, exc)

    def _start(self, active: dict[int, _Seq], seq: _Seq) -> None:
        job = seq.job
        embeds = self.batch.encode_images(job.pixels) if job.pixels is not None else None
        seq.sampler = Sampler(job.config)
        seq.text = TextStream(self.pipeline.tokenizer, job.config.stop_strings)
        seq.position = job.layout.next_position
        seq.last = seq.admitted
        if job.config.max_new_tokens == 0:
            self._finish(active, seq, "length")
            return
        logits = self.batch.prefill(seq.slot, job.layout, embeds)
        self._token(active, seq, seq.sampler(logits))

    def _step(self, active: dict[int, _Seq]) -> None:
        out = self.batch.decode({slot: (seq.token, seq.position) for slot, seq in active.items()})
        for slot, logits in out.items():
            seq = active[slot]
            seq.position += 1
            self._token(active, seq, seq.sampler(logits))

    def _token(self, active: dict[int, _Seq], seq: _Seq, tok: int) -> None:
        m = self.metrics
        now = time.monotonic()
        if tok in set(seq.job.config.stop_token_ids):
            self._finish(active, seq, "stop")
            return
        (m.ttft if seq.count == 0 else m.token_latency).observe(now - seq.last)
        seq.last, seq.token = now, tok
        seq.count += 1
        piece = seq.text.push(tok)
        if piece:
            seq.emit(Delta(piece))
        cfg = seq.job.config
        if seq.text.stopped:
            self._finish(active, seq, "stop")
        elif seq.count >= cfg.max_new_tokens or len(seq.job.layout) + seq.count >= self.batch.max_length:
            self._finish(active, seq, "length")
        elif seq.cancel.is_set():
            self._finish(active, seq, "cancelled")
        elif now > seq.deadline:
            self._finish(active, seq, None, Timeout(f"the request ran past its timeout after {seq.count} tokens; "
                                                    "ask for fewer max_tokens or raise --request-timeout",
                                                    code="generation_timeout"))

    def _finish(self, active: dict[int, _Seq], seq: _Seq, reason: str | None, error: Exception | None = None) -> None:
        m = self.metrics
        active.pop(seq.slot, None)
        self.batch.release(seq.slot)
        m.running.dec()
        m.prompt_tokens.inc(seq.job.prompt_tokens)
        m.completion_tokens.inc(seq.count)
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - seq.admitted)
        if error is not None:
            m.requests.labels("timeout" if isinstance(error, Timeout) else "server_error").inc()
            seq.emit(Failed(error))
            return
        if reason != "cancelled" and seq.text is not None:
            tail = seq.text.finish()
            if tail:
                seq.emit(Delta(tail))
        m.requests.labels("cancelled" if reason == "cancelled" else "ok").inc()
        m.duration.observe(time.monotonic() - seq.admitted)
        seq.emit(Done(reason or "stop", seq.job.prompt_tokens, seq.count))

    def close(self) -> None:
        self._stop.set()
