"""The CUDA training path: bf16 autocast, fused AdamW, pinned-memory batches, torch.compile,
exact resume, and NCCL (DDP / FSDP2) under torchrun. Marked ``gpu``; skipped without CUDA.

Not yet executed: this project has had no GPU to run them on (docs/training.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer
from vlmexport.models import get_architecture, seeded_init
from vlmexport.training.batching import ModelLayoutInfo
from vlmexport.data import SyntheticVQA
from vlmexport.training.datasets import SyntheticTrainData
from vlmexport.training.device import make_optimizer, move_batch
from vlmexport.training.trainer import Callbacks, TrainConfig, autocast_dtype, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
WORKER = Path(__file__).with_name("fsdp_worker.py")


def tiny():
    A = get_architecture("cogvlm")
    return seeded_init(A(A.tiny_config(max_position_embeddings=512)), 0)


def data_for(model, tokenizer_path):
    return SyntheticTrainData(SyntheticVQA(image_size=32), Tokenizer(tokenizer_path), model.default_chat_template(),
                              ModelLayoutInfo.of(model), PreprocessConfig(image_size=32))


def cfg(**kw):
    base = dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, save_every=100, log_every=1)
    return TrainConfig(**{**base, **kw})


def _train(model, data, config, run_dir, **kw):
    losses = []
    res = train(model, data, config, run_dir, device="cuda",
                callbacks=Callbacks(on_step=lambda s: losses.append(s.loss)), **kw)
    return losses, res


def test_bf16_autocast_and_fused_adamw_on_cuda():
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    p = torch.nn.Parameter(torch.zeros(8, 8, device="cuda"))
    opt = make_optimizer([{"params": [p]}], "adamw", 1e-3, (0.9, 0.95), torch.device("cuda"), sharded=False)
    assert opt.param_groups[0]["fused"] is True


def test_batches_reach_the_gpu_from_pinned_memory(tokenizer_path):
    model = tiny()
    batch = data_for(model, tokenizer_path).batch(0, 2)
    moved = move_batch(batch, torch.device("cuda"))
    torch.cuda.synchronize()
    assert moved.input_ids.is_cuda and moved.pixel_values.is_cuda
    assert torch.equal(moved.input_ids.cpu(), batch.input_ids)


def test_cuda_training_falls_and_resumes(tmp_path, tokenizer_path):
    model = tiny()
    data = data_for(model, tokenizer_path)
    straight, _ = _train(model, data, cfg(), tmp_path / "a")
    assert straight[-1] < straight[0]
    assert next(model.parameters()).is_cuda
    _train(tiny(), data, cfg(), tmp_path / "b", stop_after_s=0)  # one step, then a checkpoint
    rest, res = _train(seeded_init(tiny(), 123), data, cfg(), tmp_path / "b")
    assert res.steps_done == 6 and len(rest) == 5
    for a, b in zip(rest, straight[1:]):  # GPU kernels may reorder sums: not bitwise
        assert abs(a - b) <= 1e-3 * abs(b), (rest, straight)


def test_cuda_compile(tmp_path, tokenizer_path):
    model = tiny()
    data = data_for(model, tokenizer_path)
    eager, _ = _train(model, data, cfg(steps=3), tmp_path / "eager")
    compiled, _ = _train(tiny(), data, cfg(steps=3, compile=True), tmp_path / "compiled")
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 2e-2 * abs(a), (eager, compiled)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_nccl_two_gpus_match_one(tmp_path, tokenizer_path, shard):
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def run(out, nproc, accum, shard_):
        args = [str(WORKER), str(out), str(tokenizer_path), "3", shard_, str(accum), "bf16", "1", "-1", "cuda"]
        cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args] if nproc > 1
               else [sys.executable, *args])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]

    one = run(tmp_path / "one", 1, 2, "ddp")[0]
    for r in run(tmp_path / "two", 2, 1, shard):
        for step, loss in one["losses"].items():
            assert abs(r["losses"][step] - loss) <= 5e-3 * abs(loss), (r["losses"], one["losses"])
        if shard == "fsdp":
            assert 0.45 <= r["local_bytes"] / r["total_bytes"] <= 0.55
