"""deploy/cpu/install.sh (what the CPU image runs) in a fresh venv here, then a real request to the
server it installed (no torch in that venv). Slow: it builds the project wheel and installs the
runtime (llama-cpp-python comes from pip's wheel cache when it has been built once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serve_helpers import Server
from vlmexport.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_install_script_gives_a_working_server(tmp_path):
    pytest.importorskip("openai")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(["sh", str(ROOT / "deploy/cpu/install.sh"), str(ROOT), str(venv)],
                       env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check = subprocess.run([str(venv / "bin/python"), "-c", "import llama_cpp.mtmd_cpp, vlmexport, sys; "
                            "print(vlmexport.__file__)"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0 and str(venv) in check.stdout, check.stderr

    bundle = tmp_path / "demo-bundle"
    b = CliRunner().invoke(app, ["build", "--out", str(bundle), "--format", "onnx", "--precision", "fp32",
                                 "--no-validate", "--no-reference"])
    assert b.exit_code == 0, b.output
    server = Server(bundle, "--threads", "1", log=tmp_path / "server.log", command=[str(venv / "bin/vlmexport")],
                    env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        reply = server.client().chat.completions.create(
            model="demo-bundle", messages=[{"role": "user", "content": "What colour is the star?"}], max_tokens=4)
        assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
    finally:
        server.close()
