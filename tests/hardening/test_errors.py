"""One-line errors for bad input (CLI exit 2, API VlmexportError subclasses), the build lock,
stale work directories, racing renames, and folders that are not bundles."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmexport.cli import app
from vlmexport.core import atomic
from vlmexport.core.atomic import AtomicWriteError, atomic_directory, clean_stale, output_lock, replace_dir
from vlmexport.core.errors import BundleError, ImageError, VlmexportError
from vlmexport.core.generation import GenerationConfig, GenerationError

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    r.plain = ANSI.sub("", r.output)
    return r


def one_line_exit_2(r, *needles: str) -> None:
    assert r.exit_code == 2, r.plain
    assert "Traceback" not in r.plain, r.plain
    text = " ".join(r.plain.split())  # rich wraps long lines on narrow terminals
    for n in needles:
        assert n in text, text


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The demo model as a small ONNX bundle (no validation: these tests are about its inputs)."""
    from vlmexport.pipeline.build import build

    out = tmp_path_factory.mktemp("hardening") / "bundle"
    build(None, out, formats=("onnx",), precisions=("fp32",), reference=False, validate=False)
    return out


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(p)
    return p


# ---------------------------------------------------------------------- sampling values
@pytest.mark.parametrize("kw, needle", [
    ({"max_new_tokens": -1}, "max_new_tokens -1 must be a whole number >= 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens 2.5"), ({"max_new_tokens": True}, "max_new_tokens True"),
    ({"max_new_tokens": 10**9}, "at most 1,048,576"),
    ({"temperature": math.nan}, "temperature nan must be a finite number"),
    ({"temperature": math.inf}, "temperature inf"), ({"temperature": -0.5}, "temperature -0.5"),
    ({"temperature": "hot"}, "temperature 'hot'"),
    ({"top_p": 0}, "top_p 0 must be in (0, 1]"), ({"top_p": 1.5}, "top_p 1.5"), ({"top_p": math.nan}, "top_p nan"),
    ({"top_k": -3}, "top_k -3"), ({"seed": -1}, "seed -1"),
    ({"stop_strings": "###"}, "must be a list of strings"), ({"stop_token_ids": [1, -2]}, "stop_token_id -2"),
])
def test_generation_config_refuses_nonsense(kw, needle):
    with pytest.raises(GenerationError) as info:
        GenerationConfig(**kw)
    assert needle in str(info.value) and isinstance(info.value, (VlmexportError, ValueError))


@pytest.mark.parametrize("args, needle", [
    (("--temperature", "nan"), "temperature nan"), (("--top-p", "0"), "top_p 0.0 must be in (0, 1]"),
    (("--temperature", "-1"), "temperature -1.0"), (("--max-new-tokens", "-1"), "Invalid value for '--max-new-tokens'"),
    (("--top-k", "-2"), "Invalid value for '--top-k'"),
])
def test_cli_run_sampling_values(args, needle, png):
    one_line_exit_2(cli("run", "--image", png, "--prompt", "What colour?", *args), needle)


def test_cli_run_invalid_utf8_prompt(bundle, png):
    # what Python makes of the argv bytes b"caf\xe9" (latin-1) under surrogateescape
    prompt = b"caf\xe9?".decode("utf-8", "surrogateescape")
    one_line_exit_2(cli("run", bundle, "--image", png, "--prompt", prompt), "is not valid UTF-8", "re-encode")


@pytest.mark.slow
def test_cli_invalid_utf8_prompt_in_a_real_process(bundle, png):
    env = {**os.environ, "COLUMNS": "300", "PYTHONPATH": str(Path(__file__).parents[2])}
    r = subprocess.run([sys.executable.encode(), b"-m", b"vlmexport.cli", b"run", str(bundle).encode(), b"--image",
                        str(png).encode(), b"--prompt", b"caf\xe9"], capture_output=True, env=env, timeout=300)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and "not valid UTF-8" in err and "Traceback" not in err, err


# ---------------------------------------------------------------------- API misuse
@pytest.fixture(scope="module")
def pipe(bundle):
    from vlmexport.runtimes.loader import load

    return load(bundle, backend="onnxruntime")


@pytest.mark.parametrize("call, needle", [
    (lambda p, img: p.generate(None), "prompt must be a str, not NoneType"),
    (lambda p, img: p.generate(b"bytes"), "prompt must be a str, not bytes"),
    (lambda p, img: p.generate("<image>Colour?", images=str(img)), "wrap the one image in a list"),
    (lambda p, img: p.generate("<image>Colour?", images=np.zeros((8, 8, 3), np.uint8)), "not a ndarray"),
    (lambda p, img: p.generate("<image>Colour?", images=Image.open(img)), "wrap the one image in a list"),
    (lambda p, img: p.generate("<image>Colour?", images=42), "pass a list of images"),
    (lambda p, img: p.generate("Colour?", max_tokens=4), "unknown generation option(s) ['max_tokens']"),
    (lambda p, img: p.generate("Colour?", max_new_tokens=-4), "max_new_tokens -4"),
    (lambda p, img: p.generate("Colour?", temperature=float("nan")), "temperature nan"),
    (lambda p, img: p.generate("caf\udce9"), "not valid UTF-8"),
    (lambda p, img: p.generate("<image>Colour?", images=[123]), "not int"),
    (lambda p, img: p.chat("hello"), "messages must be a list"),
    (lambda p, img: p.chat([{"role": "user"}]), "message 1 content must be a str"),
    (lambda p, img: p.chat([{"role": "system", "content": "x"}]), "role 'system'"),
    (lambda p, img: p.chat([{"role": "user", "content": "x", "image": "a.png"}]), "unknown key(s) ['image']"),
])
def test_api_misuse_is_one_line(pipe, png, call, needle):
    with pytest.raises(VlmexportError) as info:
        call(pipe, png)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_api_still_works(pipe, png):
    assert isinstance(pipe.generate("<image>What colour?", [png], max_new_tokens=2), str)
    assert isinstance(pipe.chat([{"role": "user", "content": "<image>Colour?", "images": [png]}], max_new_tokens=2),
                      str)


@pytest.mark.parametrize("kw, needle", [
    ({"threads": -1}, "threads=-1"), ({"threads": 0}, "threads=0"), ({"precision": 16}, "precision=16"),
    ({"backend": "tensorflow"}, "unknown backend"), ({"device": "tpu"}, "unknown device"),
    ({"precision": "int3"}, "has no int3 onnx text_decoder"),
])
def test_load_arguments(bundle, kw, needle):
    from vlmexport.runtimes.loader import load

    with pytest.raises(VlmexportError, match=re.escape(needle)):
        load(bundle, **kw)


# ---------------------------------------------------------------------- eval options / paths
@pytest.mark.parametrize("args, needle", [
    (("--n-per-category", "-3"), "--n-per-category -3"), (("--n-per-category", "3"), "even number"),
    (("--n-per-category", "0"), "from 2 to"), (("--split", "bogus"), "--split 'bogus'"),
    (("--data", "/nonexistent.jsonl"), "no such file"),
])
def test_cli_eval_options(args, needle):
    one_line_exit_2(cli("eval", *args), needle)


def test_cli_output_file_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_exit_2(cli("eval", "--json", blocker / "sub" / "eval.json"), "--json", "cannot write into")
    one_line_exit_2(cli("bench", "--json", blocker / "b.json"), "cannot write into")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_cli_read_only_output_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_exit_2(cli("eval", "--json", ro / "eval.json"), "Permission denied")
        one_line_exit_2(cli("build", "--out", ro / "bundle", "--no-validate"), "cannot write there")
    finally:
        ro.chmod(0o755)


def test_build_into_a_path_below_a_file(tmp_path):
    from vlmexport.pipeline.build import build

    (tmp_path / "file").write_text("x")
    with pytest.raises(AtomicWriteError, match="cannot create the output directory"):
        build(None, tmp_path / "file" / "bundle", validate=False)


@pytest.mark.parametrize("make, needle", [
    (lambda p: None, "no such directory"),
    (lambda p: p.mkdir(), "is neither a bundle (no manifest.json) nor a model directory (no config.json)"),
    (lambda p: (p / "onnx").mkdir(parents=True), "looks like a bundle but has no manifest.json"),
    (lambda p: p.write_text("x"), "is a file"),
])
def test_folder_without_manifest(tmp_path, png, make, needle):
    target = tmp_path / "thing"
    make(target)
    one_line_exit_2(cli("run", target, "--image", png, "--prompt", "x"), needle)


# ---------------------------------------------------------------------- tampered bundles
def copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_inspect_hashes_by_default(bundle, tmp_path):
    b = copy_bundle(bundle, tmp_path / "b")
    data = b / "onnx" / "connector.fp32.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    one_line_exit_2(cli("inspect", b), "sha256 mismatch")
    assert cli("inspect", b, "--verify", "size").exit_code == 0  # asked for explicitly


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["model"].update(max_length=100_000), "differs from the checkpoint's max_position_embeddings"),
    (lambda m: m["model"].update(image_tokens=10**8), "image_tokens"),
    (lambda m: m["model"].update(vocab_size=4096), "embedding table"),
    (lambda m: m.pop("chat_template"), "has no chat_template section"),
])
def test_edited_manifest_is_refused_by_inspect_and_run(bundle, tmp_path, png, edit, needle):
    b = copy_bundle(bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))
    r = cli("inspect", b)
    one_line_exit_2(r, needle)
    assert "NOT RUNNABLE" in r.plain
    one_line_exit_2(cli("run", b, "--image", png, "--prompt", "x"), needle)


def test_run_allocates_nothing_for_a_huge_context(bundle, tmp_path, png):
    """The reproduction of issue 20: max_length 10^6 without the checkpoint's copy passes the
    schema but not the memory check when the machine is small; 2^21 is refused outright."""
    b = copy_bundle(bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["model"]["max_length"] = 1 << 21
    (b / "manifest.json").write_text(json.dumps(m))
    t0 = time.perf_counter()
    one_line_exit_2(cli("run", b, "--image", png, "--prompt", "x"), "max_length", "less than or equal to 1048576")
    assert time.perf_counter() - t0 < 120


def test_memory_check(bundle):
    from vlmexport.bundle.schema import ModelSection, check_memory, physical_memory_bytes

    m = ModelSection.model_validate(json.loads((bundle / "manifest.json").read_text())["model"])
    assert check_memory(m) == 2 * 2 * 4 * 64 * 320 * 4
    big = m.model_copy(update={"num_layers": 1024, "num_kv_heads": 1024, "head_dim": 4096, "max_length": 1 << 20})
    if physical_memory_bytes() is not None:
        with pytest.raises(BundleError, match="of KV cache but this machine has"):
            check_memory(big)


# ---------------------------------------------------------------------- lock, leftovers, races
HOLD = ("import sys, time; from vlmexport.core.atomic import output_lock\n"
        "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")


def hold_lock(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_second_build_fails_clearly(tmp_path):
    out = tmp_path / "bundle"
    proc = hold_lock(out)
    try:
        r = cli("build", "--out", out, "--format", "onnx", "--precision", "fp32", "--no-validate", "--no-reference")
        one_line_exit_2(r, "another build is writing it", ".bundle.lock")
        assert not out.exists()
    finally:
        proc.kill()
        proc.wait()
    with output_lock(out):  # released with its process, however it ended (SIGKILL here)
        pass


def test_stale_work_directories_are_cleaned(tmp_path):
    out = tmp_path / "bundle"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = atomic._owner_tag().rsplit("-", 1)[0]
    stale = [tmp_path / f".bundle.tmp-{tag}-{dead.pid}-abc", tmp_path / f".bundle.old-{tag}-{dead.pid}-0"]
    kept = [tmp_path / f".bundle.tmp-{tag}-{os.getpid()}-live", tmp_path / f".bundle.tmp-otherhost-{dead.pid}-x",
            tmp_path / ".bundle.tmp-legacy123", tmp_path / f".other.tmp-{tag}-{dead.pid}-x"]
    for d in stale + kept:
        d.mkdir()
        (d / "half.onnx").write_bytes(b"x" * 10)
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("a")
    assert [d.exists() for d in stale] == [False, False] and all(d.exists() for d in kept)
    assert clean_stale(out) == []


def test_sigkilled_build_leftover_is_removed_by_the_next_one(tmp_path):
    out = tmp_path / "bundle"
    code = ("import sys, time; from vlmexport.core.atomic import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as t:\n    (t / 'x').write_text('x'); print('in', flush=True); "
            "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"in"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(tmp_path.glob(".bundle.tmp-*"))) == 1  # what SIGKILL leaves
    with atomic_directory(out) as tmp:
        (tmp / "y").write_text("y")
    assert list(tmp_path.glob(".bundle.tmp-*")) == [] and (out / "y").is_file()


def test_racing_commits_both_succeed_and_the_last_wins(tmp_path, monkeypatch):
    """Another commit lands between our move-aside and our rename (ENOTEMPTY): we retry."""
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "v").write_text("0")
    ours = tmp_path / ".ours"
    ours.mkdir()
    (ours / "v").write_text("ours")
    real = os.replace
    raced = []

    def racing_replace(src, dst):
        if Path(src) == ours and not raced:  # the other writer's commit lands first
            raced.append(1)
            other = tmp_path / ".other"
            other.mkdir()
            (other / "v").write_text("other")
            real(other, out)
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", racing_replace)
    replace_dir(ours, out)
    assert (out / "v").read_text() == "ours" and raced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # every moved-aside version removed


def test_open_image_refuses_wrong_types():
    from vlmexport.core.preprocess import open_image

    for bad in (None, 3, [1, 2], {"a": 1}):
        with pytest.raises(ImageError, match="an image must be a file path, bytes"):
            open_image(bad)


@pytest.mark.parametrize("content", ["[]", '{"text_decoder": 5}', '"int4"'])
def test_recipe_of_the_wrong_shape(tmp_path, content):
    from vlmexport.core.errors import ConfigError
    from vlmexport.quant.recipe import QuantRecipe as Recipe

    (tmp_path / "r.json").write_text(content)
    with pytest.raises(ConfigError, match="a recipe is a JSON object of rule lists"):
        Recipe.load(tmp_path / "r.json")


def test_preprocessor_file_must_agree_with_the_manifest(bundle, tmp_path):
    """With hashing off (verify='none') an edited preprocessor_config.json is still caught."""
    from vlmexport.runtimes.loader import load

    b = copy_bundle(bundle, tmp_path / "b")
    cfg = json.loads((b / "preprocessor_config.json").read_text())
    cfg["vlmexport"]["image_size"] = 4000
    (b / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="says image size 4000 but the manifest says 96"):
        load(b, backend="onnxruntime", verify="none")


@pytest.mark.llamacpp
def test_llamacpp_context_past_the_trained_one_is_refused(tmp_path):
    """The GGUF header (a hashed file) bounds the context llama.cpp allocates, whatever the manifest says."""
    from vlmexport.runtimes.llamacpp_backend import GGUFFileError, LlamaCppSession, llamacpp_available

    if not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed")
    from vlmexport.pipeline.build import build

    out = tmp_path / "b"
    build(None, out, formats=("gguf",), precisions=("f16",), reference=False, validate=False, imatrix_pairs=0)
    with pytest.raises(GGUFFileError, match="up to the model's trained context \\(320\\)"):
        LlamaCppSession(out / "gguf" / "model.f16.gguf", out / "gguf" / "mmproj-model.f16.gguf", n_ctx=100_000)


def test_writer_never_writes_what_the_reader_refuses(tmp_path):
    from vlmexport.bundle import BundleWriter

    with pytest.raises(BundleError, match="artifact 1 is malformed: part"):
        with BundleWriter(tmp_path / "b") as w:
            w.path("x.onnx").write_bytes(b"x")
            w.add_artifact("vision encoder", "onnx", "fp32", "x.onnx")  # a space: not a part name
    assert not (tmp_path / "b").exists()


def test_control_characters_stay_on_one_line(tmp_path):
    """Found by the long fuzz run: a path with a newline made a two-line ImageError."""
    from vlmexport.core.preprocess import open_image

    with pytest.raises(ImageError) as info:
        open_image("/nonexistent/a\nb.png")
    assert "\n" not in str(info.value) and "a\\nb.png" in str(info.value)
    one_line_exit_2(cli("run", "--image", tmp_path / "x\ny.png", "--prompt", "x"), "x\\ny.png: no such image file")
