"""`vlmexport serve` driven by the real `openai` client over loopback HTTP (no mocked transport)."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
from PIL import Image
from typer.testing import CliRunner

from serve_helpers import data_url, png_bytes
from vlmexport.cli import app

QUESTION = "What colour is the circle?"


def run_cli(bundle, images, prompt, *extra) -> str:
    """What `vlmexport run` prints for the same input (greedy)."""
    args = ["run", str(bundle), "--backend", "onnxruntime", "--prompt", prompt, *extra]
    for img in images:
        args += ["--image", str(img)]
    r = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    return r.output.strip()


def user(*parts: str) -> list[dict]:
    """One user message; a part that looks like an image URL or path is an image_url part."""
    is_image = lambda p: p.startswith(("data:", "/", "file:", "http:"))  # noqa: E731
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": p}} if is_image(p)
                                         else {"type": "text", "text": p} for p in parts]}]


def img_url(path) -> str:
    return data_url(path.read_bytes())


# ------------------------------------------------------------------ answers
def test_models_health_and_metrics(demo_server):
    health = demo_server.request("GET", "/health").json()
    assert health["status"] == "ok" and health["model"] == "demo-bundle" and health["backend"] == "onnxruntime-fp32"
    models = demo_server.client().models.list()
    assert [m.id for m in models.data] == ["demo-bundle"]
    metrics = demo_server.request("GET", "/metrics")
    assert metrics.status == 200 and "text/plain" in metrics.headers["content-type"]
    for name in ("vlmexport_time_to_first_token_seconds_bucket", "vlmexport_time_per_output_token_seconds_bucket",
                 "vlmexport_queue_depth", "vlmexport_completion_tokens_total"):
        assert name in metrics.text, name


def test_answer_equals_vlmexport_run_and_usage_counts_the_prompt(demo_server, demo_bundle, scenes):
    import vlmexport
    from vlmexport.core.prompt import Turn

    before = demo_server.metric("vlmexport_requests_total", 'outcome="ok"')
    r = demo_server.client().chat.completions.create(
        model="demo-bundle", temperature=0, messages=user(img_url(scenes["red"]), QUESTION))
    expected = run_cli(demo_bundle, [scenes["red"]], QUESTION)
    assert r.choices[0].message.content.strip() == expected and expected
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    layout, _ = vlmexport.load(demo_bundle, backend="onnxruntime").prepare([Turn(QUESTION, images=1)],
                                                                           [scenes["red"]])
    assert r.usage.prompt_tokens == len(layout)
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == len(layout) + r.usage.completion_tokens
    assert demo_server.metric("vlmexport_requests_total", 'outcome="ok"') == before + 1
    assert demo_server.metric("vlmexport_time_to_first_token_seconds_count") >= 1


def test_streaming_chunks_join_to_the_same_answer_and_end_with_done(demo_server, scenes):
    client = demo_server.client()
    messages = user(img_url(scenes["red"]), QUESTION)
    plain = client.chat.completions.create(model="demo-bundle", messages=messages)
    chunks = list(client.chat.completions.create(model="demo-bundle", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # on the wire: SSE `data:` lines ending with [DONE]
    body = {"model": "demo-bundle", "messages": messages, "stream": True}
    resp = demo_server.request("POST", "/v1/chat/completions", body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in resp.text.splitlines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_two_images_in_one_message_equal_vlmexport_run(demo_server, demo_bundle, scenes):
    q = "How many shapes are there?"
    r = demo_server.client().chat.completions.create(
        model="demo-bundle", messages=user(img_url(scenes["red"]), img_url(scenes["blue"]), q))
    assert r.choices[0].message.content.strip() == run_cli(demo_bundle, [scenes["red"], scenes["blue"]], q)
    # placeholders where the text puts them, also as `run` reads them
    q2 = "<image> and <image>: how many shapes are there?"
    r2 = demo_server.client().chat.completions.create(
        model="demo-bundle", messages=user(q2, img_url(scenes["red"]), img_url(scenes["blue"])))
    assert r2.choices[0].message.content.strip() == run_cli(demo_bundle, [scenes["red"], scenes["blue"]], q2)


def test_local_image_path_under_the_allowed_directory(demo_server, demo_bundle, scenes):
    r = demo_server.client().chat.completions.create(
        model="demo-bundle", messages=user(str(scenes["red"]), QUESTION))
    assert r.choices[0].message.content.strip() == run_cli(demo_bundle, [scenes["red"]], QUESTION)
    r = demo_server.client().chat.completions.create(
        model="demo-bundle", messages=user("file://" + str(scenes["blue"]), "What colour is the square?"))
    assert r.choices[0].message.content.strip() == run_cli(demo_bundle, [scenes["blue"]],
                                                           "What colour is the square?")


def test_max_tokens_stop_and_seed(demo_server, scenes):
    client = demo_server.client()
    # a question the demo model answers with a word (a prompt it is not trained on may end at once)
    messages = user(img_url(scenes["red"]), "What colour is the circle?")
    r = client.chat.completions.create(model="demo-bundle", messages=messages, max_tokens=1)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"
    full = client.chat.completions.create(model="demo-bundle", messages=messages, max_tokens=12).choices[0]
    text = full.message.content
    if len(text.strip()) > 1:
        cut = text.strip()[1]
        stopped = client.chat.completions.create(model="demo-bundle", messages=messages, max_tokens=12,
                                                 stop=[cut]).choices[0]
        assert stopped.message.content == text[:text.index(cut)] and stopped.finish_reason == "stop"
    sampled = [client.chat.completions.create(model="demo-bundle", messages=messages, temperature=1.5, top_p=0.9,
                                              seed=11, max_tokens=8).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


# ------------------------------------------------------------------- errors
def _status(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    err = info.value
    assert set(err.body) >= {"message", "type"}, err.body  # OpenAI's error object
    assert "Traceback" not in err.body["message"]
    return err


def test_client_mistakes_get_openai_errors_and_the_server_keeps_serving(demo_server, scenes, noise_png, tmp_path):
    client = demo_server.client()
    make = lambda **kw: (lambda: client.chat.completions.create(**{"model": "demo-bundle", **kw}))  # noqa: E731
    bomb = Image.new("1", (9000, 8000))  # 72 M pixels: over the 64 M-pixel limit, ~10 kB as PNG
    outside = tmp_path / "outside.png"
    outside.write_bytes(scenes["red"].read_bytes())
    link = scenes["red"].parent / "escape.png"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    cases = [
        ("unknown model", make(model="gpt-4o", messages=user("hi")), 404, "model_not_found"),
        ("broken image", make(messages=user(data_url(b"\x89PNG\r\n\x1a\nnot really"), QUESTION)), 400, None),
        ("oversized image", make(messages=user(data_url(noise_png), QUESTION)), 413, "image_too_large"),
        ("decompression bomb", make(messages=user(data_url(png_bytes(bomb)), QUESTION)), 413, "image_too_large"),
        ("prompt over the context", make(messages=user("tell me more " * 300)), 400, None),
        ("more images than the model takes", make(messages=user(*[img_url(scenes["red"])] * 5, QUESTION)), 400,
         "too_many_images"),
        ("more placeholders than images", make(messages=user("<image><image> which?", img_url(scenes["red"]))),
         400, None),
        ("remote image URL", make(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]), 400, None),
        ("path outside the allowed directory", make(messages=user(str(outside), QUESTION)), 400, None),
        ("symlink out of the allowed directory", make(messages=user(str(link), QUESTION)), 400, None),
        ("content of the wrong type", make(messages=[{"role": "user", "content": 123}]), 422, None),
        ("unknown role", make(messages=[{"role": "robot", "content": "hi"}]), 422, None),
        ("temperature out of range", make(messages=user("hi"), temperature=7), 422, None),
        ("n > 1", make(messages=user("hi"), n=2), 400, None),
        ("image in an assistant message", make(messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": img_url(scenes["red"])}}]},
            {"role": "user", "content": "and?"}]), 400, None),
    ]
    for name, call, status, code in cases:
        err = _status(call)
        assert err.status_code == status, (name, err.status_code, err.body)
        if code:
            assert err.body.get("code") == code, (name, err.body)
    raw = [(b"{not json", 400), (b"[1, 2]", 400), (json.dumps({"model": "demo-bundle"}).encode(), 422),
           (json.dumps({"model": "demo-bundle", "messages": []}).encode(), 422)]
    for body, status in raw:
        resp = demo_server.request("POST", "/v1/chat/completions", body)
        assert resp.status == status and "error" in resp.json(), (body, resp.text)
    huge = demo_server.request("POST", "/v1/chat/completions", b"x" * (4 << 20))
    assert huge.status == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert demo_server.request("GET", "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert demo_server.alive()
    ok = client.chat.completions.create(model="demo-bundle", messages=user(img_url(scenes["red"]), QUESTION))
    assert ok.choices[0].message.content
    assert "Traceback" not in demo_server.log()


# ------------------------------------------------------------ load control
def _stream_first_chunk(server, max_tokens=4000):
    """Open a long stream (the endless model never stops early) and read its first content chunk."""
    stream = server.client().chat.completions.create(model="endless-bundle", stream=True, max_tokens=max_tokens,
                                                     messages=[{"role": "user", "content": "count"}])
    it = iter(stream)
    next(it)  # role chunk
    next(it)  # first token
    return stream, it


def _wait_for(cond, seconds=30.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_over_the_queue_limit_is_429_with_retry_after(endless_server):
    running, it = _stream_first_chunk(endless_server)
    queued: dict = {}
    t = threading.Thread(target=lambda: queued.update(r=endless_server.request(
        "POST", "/v1/chat/completions",
        {"model": "endless-bundle", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})))
    t.start()
    assert _wait_for(lambda: endless_server.metric("vlmexport_queue_depth") == 1)
    err = _status(lambda: endless_server.client().chat.completions.create(
        model="endless-bundle", messages=[{"role": "user", "content": "y"}], max_tokens=4))
    assert err.status_code == 429 and int(err.response.headers["retry-after"]) >= 1
    running.close()
    t.join(60)
    assert queued["r"].status in (200, 504), queued["r"].text  # served, or timed out waiting
    assert _wait_for(lambda: endless_server.metric("vlmexport_running_requests") == 0)
    ok = endless_server.client().chat.completions.create(model="endless-bundle", max_tokens=3,
                                                         messages=[{"role": "user", "content": "z"}])
    assert ok.usage.completion_tokens == 3 and ok.choices[0].finish_reason == "length"


def test_client_disconnect_mid_stream_frees_the_slot(endless_server):
    cancelled = endless_server.metric("vlmexport_requests_total", 'outcome="cancelled"')
    stream, it = _stream_first_chunk(endless_server)
    for _ in range(3):
        next(it)
    stream.close()  # the client goes away mid-stream
    assert _wait_for(lambda: endless_server.metric("vlmexport_requests_total", 'outcome="cancelled"')
                     == cancelled + 1)
    assert endless_server.metric("vlmexport_running_requests") == 0
    ok = endless_server.client().chat.completions.create(model="endless-bundle", max_tokens=2,
                                                         messages=[{"role": "user", "content": "again"}])
    assert ok.usage.completion_tokens == 2


def test_request_timeout_is_504_and_the_slot_is_freed(endless_server):
    err = _status(lambda: endless_server.client(timeout=60).chat.completions.create(
        model="endless-bundle", max_tokens=4000, messages=[{"role": "user", "content": "go on"}]))
    assert err.status_code == 504 and err.body["code"] == "generation_timeout"
    # a stream that times out ends with an error event, which the client raises
    with pytest.raises(openai.APIError):
        for _ in endless_server.client().chat.completions.create(
                model="endless-bundle", max_tokens=4000, stream=True, messages=[{"role": "user", "content": "go"}]):
            pass
    assert _wait_for(lambda: endless_server.metric("vlmexport_running_requests") == 0)
    assert endless_server.metric("vlmexport_requests_total", 'outcome="timeout"') >= 2
