"""DDP through torchrun: two CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, out: Path, tokenizer_path: Path, steps: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(WORKER), str(out), str(tokenizer_path), str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_ddp_two_ranks_identical(tmp_path, tokenizer_path):
    _run(2, tmp_path, tokenizer_path, steps=4)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    # the run really trained, and rank 0 wrote the checkpoint
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.json").is_file()
    from vlmexport.models import get_architecture, seeded_init

    A = get_architecture("cogvlm")
    init = dict(seeded_init(A(A.tiny_config(max_position_embeddings=512)), 0).named_parameters())
    assert any(not torch.equal(init[n], r0[n]) for n in r0)  # it really trained
