"""Run by tests/training/test_fsdp.py, under torchrun or as a plain process: train a tiny
cogvlm and write this rank's per-step losses and parameter storage to JSON.

argv: out_dir tokenizer steps shard grad_accum precision grad_ckpt(0/1) stop_after_s(-1: none) [device]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer
from vlmexport.models import get_architecture, seeded_init
from vlmexport.training.batching import ModelLayoutInfo
from vlmexport.data import SyntheticVQA
from vlmexport.training.datasets import SyntheticTrainData
from vlmexport.training.trainer import Callbacks, TrainConfig, train

out, tokenizer_path, steps, shard, accum, precision, gc, stop = sys.argv[1:9]
device = sys.argv[9] if len(sys.argv) > 9 else "cpu"
out = Path(out)
torch.set_num_threads(1)
A = get_architecture("cogvlm")
model = seeded_init(A(A.tiny_config(max_position_embeddings=512)), 0)
pre = PreprocessConfig(image_size=32)
data = SyntheticTrainData(SyntheticVQA(image_size=32), Tokenizer(tokenizer_path), model.default_chat_template(),
                          ModelLayoutInfo.of(model), pre)
cfg = TrainConfig(steps=int(steps), batch_size=8, grad_accum=int(accum), lr=3e-3, warmup_steps=1, save_every=100,
                  precision=precision, grad_checkpointing=gc == "1", shard=shard)
losses = {}
res = train(model, data, cfg, out / "run", stage="scratch", device=device,
            callbacks=Callbacks(on_step=lambda s: losses.__setitem__(s.step, s.loss)),
            stop_after_s=None if float(stop) < 0 else float(stop))
rank = dist.get_rank() if dist.is_initialized() else 0
# after training the model is whole again on every rank: its weights must agree
weights_sum = float(sum(p.detach().double().sum() for p in model.parameters()))
(out / f"rank{rank}.json").write_text(json.dumps({
    "losses": losses, "local_bytes": res.trainable_bytes_local, "total_bytes": res.trainable_bytes,
    "weights_sum": weights_sum, "reason": res.reason, "steps_done": res.steps_done}))
if dist.is_initialized():
    dist.destroy_process_group()
