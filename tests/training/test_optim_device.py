"""The optimizer choices (fused AdamW, bitsandbytes' 8-bit AdamW), batch transfer and
``torch.compile`` on CPU; their CUDA counterparts are in test_cuda.py (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from vlmexport.core.errors import ConfigError
from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer
from vlmexport.models import get_architecture, seeded_init
from vlmexport.training.batching import ModelLayoutInfo
from vlmexport.data import SyntheticVQA
from vlmexport.training.datasets import SyntheticTrainData
from vlmexport.training.device import make_optimizer, move_batch
from vlmexport.training.trainer import Callbacks, TrainConfig, train


def tiny():
    A = get_architecture("cogvlm")
    return seeded_init(A(A.tiny_config(max_position_embeddings=512)), 0)


def data_for(model, tokenizer_path):
    return SyntheticTrainData(SyntheticVQA(image_size=32), Tokenizer(tokenizer_path), model.default_chat_template(),
                              ModelLayoutInfo.of(model), PreprocessConfig(image_size=32))


def cfg(**kw):
    base = dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, save_every=100, log_every=1, precision="fp32")
    return TrainConfig(**{**base, **kw})


def _losses(model, data, config, run_dir, **kw):
    losses = []
    res = train(model, data, config, run_dir, callbacks=Callbacks(on_step=lambda s: losses.append(s.loss)), **kw)
    return losses, res


def test_adamw_is_fused_on_cpu():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = make_optimizer([{"params": [p], "lr_scale": 1.0, "weight_decay": 0.0}], "adamw", 1e-3, (0.9, 0.95),
                         torch.device("cpu"), sharded=False)
    assert opt.param_groups[0]["fused"] is True


def test_unknown_optimizer_and_8bit_with_fsdp_are_refused():
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="shard must be"):
        TrainConfig(shard="zero2")
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ConfigError, match="not on FSDP's sharded parameters"):
        make_optimizer([{"params": [p]}], "adamw8bit", 1e-3, (0.9, 0.95), torch.device("cpu"), sharded=True)


def test_adamw8bit_trains_and_resumes_exactly(tmp_path, tokenizer_path):
    pytest.importorskip("bitsandbytes")
    model = tiny()
    data = data_for(model, tokenizer_path)
    straight, _ = _losses(model, data, cfg(steps=6, optimizer="adamw8bit"), tmp_path / "a")
    assert straight[-1] < straight[0]
    # the 8-bit state (uint8 codes + block scales, an int step) goes through the checkpoint
    first = tiny()
    _losses(first, data, cfg(steps=6, optimizer="adamw8bit"), tmp_path / "b", stop_after_s=0)
    resumed = seeded_init(tiny(), 123)
    rest, res = _losses(resumed, data, cfg(steps=6, optimizer="adamw8bit"), tmp_path / "b")
    assert res.steps_done == 6 and len(rest) == 5
    assert rest == straight[1:]
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    from safetensors.torch import load_file

    opt = load_file(str(tmp_path / "b" / "checkpoint" / "optimizer.safetensors"))
    assert any(k.endswith("::state1") and v.dtype == torch.uint8 for k, v in opt.items())


def test_move_batch_keeps_cpu_batches(tokenizer_path):
    model = tiny()
    batch = data_for(model, tokenizer_path).batch(0, 2)
    moved = move_batch(batch, torch.device("cpu"))
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.pixel_values is not None


@pytest.mark.slow
def test_compile_option_trains_like_eager(tmp_path, tokenizer_path):
    """``TrainConfig(compile=True)`` compiles each block (inductor: needs a C++ compiler on CPU;
    the first step's compilation takes minutes on a busy 2-core machine, so one step)."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    model = tiny()
    data = data_for(model, tokenizer_path)
    eager, _ = _losses(model, data, cfg(steps=1), tmp_path / "eager")
    compiled_model = tiny()
    compiled, _ = _losses(compiled_model, data, cfg(steps=1, compile=True), tmp_path / "compiled")
    assert any(type(b).__name__ == "OptimizedModule" or getattr(b, "_compiled_call_impl", None) is not None
               for b in compiled_model.model.layers)
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-3 * abs(a), (eager, compiled)
