"""Generation behind the HTTP layer: model copies (slots), a bounded queue, a worker thread per generation.

A pipeline holds one decoder session (one KV cache), so it runs one generation at a
time. The engine keeps ``max_concurrency`` pipelines (slots) and admits at most
``max_concurrency + max_queue`` requests; the next one is refused at once with
:class:`~vlmexport.serve.errors.Overloaded` (429 + Retry-After), never left hanging.

A generation runs in a worker thread and hands each text delta to the event loop.
Between two tokens the worker checks the request's cancel flag (set when the client
disconnects or stops reading) and its deadline, so a slot is freed at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

import numpy as np

from ..core.generation import GenerationConfig, generate_tokens, stream_text
from ..core.layout import SequenceLayout
from ..runtimes.pipeline import Pipeline, chat_turns
from .errors import Overloaded, Timeout
from .messages import Conversation
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A request turned into model input (done outside the slots: decoding images needs no model)."""

    layout: SequenceLayout
    pixels: np.ndarray | None
    config: GenerationConfig

    @property
    def prompt_tokens(self) -> int:
        return len(self.layout)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


class Engine:
    def __init__(self, pipelines: Sequence[Pipeline], metrics: Metrics, max_queue: int):
        if not pipelines:
            raise ValueError("the engine needs at least one pipeline")
        self.pipelines = list(pipelines)
        self.metrics = metrics
        self.max_queue = max_queue
        self.capacity = len(self.pipelines) + max_queue
        self.inflight = 0  # admitted and not finished (waiting + running); touched on the event loop only
        self._idle: asyncio.Queue | None = None
        self._executor = ThreadPoolExecutor(len(self.pipelines), thread_name_prefix="vlmexport-generate")
        self._mean_s = 1.0  # moving average of a generation's duration, for Retry-After
        metrics.slots.set(len(self.pipelines))

    # ----------------------------------------------------------------- facts
    @property
    def pipeline(self) -> Pipeline:
        return self.pipelines[0]

    @property
    def max_images(self) -> int:
        """Images whose chunks fit in the context beside BOS and one token of text."""
        spec = self.pipeline.spec
        return max(0, (spec.max_length - 2) // max(1, spec.image_tokens))

    # ------------------------------------------------------------- preparing
    def prepare(self, conversation: Conversation, **gen) -> Prepared:
        """Render the prompt and decode the images (a worker thread of the app calls this);
        raises PromptError / ImageError (both VlmexportError) for the client's mistakes."""
        turns, images = chat_turns(conversation.messages)
        pipe = self.pipeline
        layout, pixels = pipe.prepare(turns, images)
        room = pipe.spec.max_length - len(layout)
        gen["max_new_tokens"] = max(1, min(gen["max_new_tokens"], room))
        return Prepared(layout, pixels, pipe.generation_config(**gen))

    # --------------------------------------------------------------- running
    def _pool(self) -> asyncio.Queue:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for p in self.pipelines:
                self._idle.put_nowait(p)
        return self._idle

    def retry_after(self) -> int:
        waiting = max(1, self.inflight - len(self.pipelines) + 1)
        return int(min(60, max(1, math.ceil(self._mean_s * waiting / len(self.pipelines)))))

    async def generate(self, job: Prepared, deadline: float, cancel: threading.Event,
                       disconnected: asyncio.Event | None = None) -> AsyncIterator[Delta | Done | Failed]:
        """Admit, wait for a slot, run; yields deltas then one Done (or Failed). Raises Overloaded / Timeout
        before the first event. Closing the iterator (a client gone) sets ``cancel``."""
        if self.inflight >= self.capacity:
            self.metrics.requests.labels("rejected").inc()
            raise Overloaded(f"the server is busy ({len(self.pipelines)} running, {self.max_queue} queued); retry "
                             f"after {self.retry_after()} s", headers={"Retry-After": str(self.retry_after())})
        self.inflight += 1
        admitted = time.monotonic()
        started = False
        try:
            pipe = await self._acquire(deadline, disconnected)
            if pipe is None:
                return
            started = True
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
            self.metrics.running.inc()
            t0 = time.monotonic()
            fut = loop.run_in_executor(self._executor, self._work, pipe, job, deadline, cancel, emit, admitted)
            fut.add_done_callback(lambda _f: self._release(pipe, t0))
            try:
                while True:
                    ev = await events.get()
                    yield ev
                    if isinstance(ev, (Done, Failed)):
                        return
            finally:
                cancel.set()  # finished, or the consumer went away: the worker stops at its next token
        finally:
            if not started:
                self.inflight -= 1

    async def _acquire(self, deadline: float, disconnected: asyncio.Event | None) -> Pipeline | None:
        """A free pipeline; None when the client went away while waiting; Timeout past the deadline."""
        pool = self._pool()
        self.metrics.queue_depth.inc()
        get = asyncio.ensure_future(pool.get())
        gone = asyncio.ensure_future(disconnected.wait()) if disconnected is not None else None
        try:
            await asyncio.wait({get} | ({gone} if gone else set()), timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.metrics.queue_depth.dec()
            if not get.done():
                get.cancel()
            if gone is not None and not gone.done():
                gone.cancel()
        if get.done() and not get.cancelled():
            pipe = get.result()
            if gone is None or not gone.done():
                return pipe
            pool.put_nowait(pipe)  # got a slot and lost the client in the same instant: give it back
        if gone is not None and gone.done():
            self.metrics.requests.labels("cancelled").inc()
            return None
        self.metrics.requests.labels("timeout").inc()
        raise Timeout("no slot became free within the request timeout; retry later, or start the server with "
                      "a longer --request-timeout or more --max-concurrency", code="queue_timeout")

    def _release(self, pipe: Pipeline, t0: float) -> None:
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - t0)
        self.metrics.running.dec()
        self.inflight -= 1
        self._pool().put_nowait(pipe)

    # --------------------------------------------------------- worker thread
    def _work(self, pipe: Pipeline, job: Prepared, deadline: float, cancel: threading.Event,
              emit: Callable[[object], None], admitted: float) -> None:
        m = self.metrics
        ids: list[int] = []
        state = {"reason": None, "last": admitted}  # time to first token counts from admission
        try:
            session = pipe.session
            embeds = session.encode_images(job.pixels) if job.pixels is not None else None

            def tokens():
                for tok in generate_tokens(session, job.layout, embeds, job.config):
                    now = time.monotonic()
                    (m.ttft if not ids else m.token_latency).observe(now - state["last"])
                    state["last"] = now
                    ids.append(tok)
                    yield tok
                    if cancel.is_set():
                        state["reason"] = "cancelled"
                        return
                    if time.monotonic() > deadline:
                        state["reason"] = "timeout"
                        return

            for piece in stream_text(tokens(), pipe.tokenizer, job.config.stop_strings):
                emit(Delta(piece))
            m.prompt_tokens.inc(job.prompt_tokens)
            m.completion_tokens.inc(len(ids))
            if state["reason"] == "timeout":
                m.requests.labels("timeout").inc()
                emit(Failed(Timeout(f"the request ran past its timeout after {len(ids)} tokens; ask for fewer "
                                    "max_tokens or start the server with a longer --request-timeout",
                                    code="generation_timeout")))
                return
            reason = state["reason"] or self._finish_reason(pipe, job, ids)
            m.requests.labels("ok" if reason != "cancelled" else "cancelled").inc()
            m.duration.observe(time.monotonic() - admitted)
            emit(Done(reason, job.prompt_tokens, len(ids)))
        except Exception as exc:  # noqa: BLE001 - a backend failure is the server's fault: logged, answered 500
            log.exception("generation failed")
            m.requests.labels("server_error").inc()
            emit(Failed(exc))

    @staticmethod
    def _finish_reason(pipe: Pipeline, job: Prepared, ids: list[int]) -> str:
        stops = job.config.stop_strings
        if stops and any(s in pipe.tokenizer.decode(ids) for s in stops):
            return "stop"
        if len(ids) >= job.config.max_new_tokens or len(job.layout) + len(ids) >= pipe.session.max_length:
            return "length"
        return "stop"

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

