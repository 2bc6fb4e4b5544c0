"""FSDP2 through torchrun: two CPU processes (gloo) against one process.

The two runs see the same examples at every step when world x grad_accum is the same
(one process with grad_accum=2 = two ranks with grad_accum=1), and average the same
per-micro-batch losses, so their losses may differ only by floating-point summation
order: fp32 within 1e-5 relative; bf16 (MixedPrecisionPolicy on gloo) within 2e-3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, tok: Path, *, nproc: int, shard: str = "fsdp", accum: int, precision: str = "fp32",
         gc: bool = True, stop_after_s: float = -1, steps: int = 3) -> list[dict]:
    args = [str(WORKER), str(out), str(tok), str(steps), shard, str(accum), precision, "1" if gc else "0",
            str(stop_after_s)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_hold_half(tmp_path, tokenizer_path):
    one = _run(tmp_path / "one", tokenizer_path, nproc=1, shard="ddp", accum=2)[0]
    ranks = _run(tmp_path / "fsdp", tokenizer_path, nproc=2, accum=1)
    for r in ranks:
        _close(r["losses"], one["losses"], 1e-5)
        # measured from the local shards: about half of the trainable parameters' bytes each
        assert 0.45 <= r["local_bytes"] / r["total_bytes"] <= 0.55, r
    assert sum(r["local_bytes"] for r in ranks) >= ranks[0]["total_bytes"]  # every byte stored somewhere
    assert one["local_bytes"] == one["total_bytes"]
    # the losses really fell, and after training both ranks hold the same whole model as one process
    assert one["losses"]["3"] < one["losses"]["1"]
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]
    assert abs(ranks[0]["weights_sum"] - one["weights_sum"]) < 1e-6 * abs(one["weights_sum"])
    assert (tmp_path / "fsdp" / "run" / "checkpoint" / "model.safetensors").is_file()  # gathered by rank 0


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_process(tmp_path, tokenizer_path):
    """Stop the 2-rank FSDP run after step 1 (gathered checkpoint), finish it in one process:
    steps 2-3 follow the uninterrupted one-process curve."""
    one = _run(tmp_path / "one", tokenizer_path, nproc=1, shard="ddp", accum=2)[0]
    first = _run(tmp_path / "resume", tokenizer_path, nproc=2, accum=1, stop_after_s=0)
    assert first[0]["reason"] == "time_budget" and first[0]["steps_done"] == 1
    rest = _run(tmp_path / "resume", tokenizer_path, nproc=1, shard="ddp", accum=2)[0]
    assert rest["steps_done"] == 3 and set(rest["losses"]) == {"2", "3"}
    _close(rest["losses"], {k: one["losses"][k] for k in ("2", "3")}, 1e-5)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_on_gloo(tmp_path, tokenizer_path):
    one = _run(tmp_path / "one", tokenizer_path, nproc=1, shard="ddp", accum=2, precision="bf16", gc=False)[0]
    ranks = _run(tmp_path / "fsdp", tokenizer_path, nproc=2, accum=1, precision="bf16", gc=False)
    for r in ranks:
        _close(r["losses"], one["losses"], 2e-3)
