"""`vlmexport serve --batch N`: the decode steps of concurrent requests run together, answers unchanged."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serve_helpers import Server, data_url
from test_openai_client import QUESTION, run_cli, user


@pytest.fixture(scope="module")
def batch_server(demo_bundle, tmp_path_factory):
    server = Server(demo_bundle, "--backend", "onnxruntime", "--batch", "4", "--threads", "1",
                    log=tmp_path_factory.mktemp("logs") / "batch.log")
    yield server
    server.close()


def test_concurrent_batched_answers_equal_vlmexport_run(batch_server, demo_bundle, scenes):
    asks = [(scenes["red"], QUESTION), (scenes["blue"], "What colour is the square?"),
            (scenes["red"], "What shape is it?"), (scenes["blue"], "What shape is it?")] * 3
    client = batch_server.client()

    def ask(item):
        path, q = item
        r = client.chat.completions.create(model="demo-bundle", messages=user(data_url(path.read_bytes()), q))
        return r.choices[0].message.content.strip()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, asks))
    expected = {item: run_cli(demo_bundle, [item[0]], item[1]) for item in set(asks)}
    assert answers == [expected[item] for item in asks]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="demo-bundle", stream=True, messages=user(data_url(scenes["red"].read_bytes()), QUESTION))
        if c.choices)
    assert streamed.strip() == expected[(scenes["red"], QUESTION)]


def test_batched_requests_run_together_and_a_leaver_frees_its_row(endless_bundle, tmp_path):
    server = Server(endless_bundle, "--batch", "2", "--max-queue", "0", "--request-timeout", "30", "--threads", "1",
                    log=tmp_path / "endless-batch.log")
    try:
        client = server.client()
        streams = [client.chat.completions.create(model="endless-bundle", stream=True, max_tokens=3000,
                                                  messages=[{"role": "user", "content": f"go {k}"}]) for k in range(2)]
        its = [iter(s) for s in streams]
        for it in its:  # both produce tokens at the same time: two rows of one batch
            next(it), next(it)
        assert server.metric("vlmexport_running_requests") == 2
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="endless-bundle", max_tokens=2, messages=[{"role": "user",
                                                                                           "content": "x"}])
        streams[0].close()
        deadline = time.time() + 30
        while time.time() < deadline and server.metric("vlmexport_requests_total", 'outcome="cancelled"') < 1:
            time.sleep(0.05)
        assert server.metric("vlmexport_requests_total", 'outcome="cancelled"') == 1
        next(its[1])  # the other sequence goes on
        ok = client.chat.completions.create(model="endless-bundle", max_tokens=5,
                                            messages=[{"role": "user", "content": "again"}])
        assert ok.usage.completion_tokens == 5
        streams[1].close()
    finally:
        server.close()
