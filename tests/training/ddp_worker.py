"""Run by tests/training/test_ddp.py under torchrun: train a tiny model with DDP (gloo)
and save this rank's final weights, so the test can compare the ranks."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer
from vlmexport.models import get_architecture, seeded_init
from vlmexport.training.batching import ModelLayoutInfo
from vlmexport.data import SyntheticVQA
from vlmexport.training.datasets import SyntheticTrainData
from vlmexport.training.trainer import TrainConfig, train

out, tokenizer_path, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
A = get_architecture("cogvlm")
model = seeded_init(A(A.tiny_config(max_position_embeddings=512)), 0)
tok = Tokenizer(tokenizer_path)
pre = PreprocessConfig(image_size=32)
data = SyntheticTrainData(SyntheticVQA(image_size=32), tok, model.default_chat_template(), ModelLayoutInfo.of(model), pre)
cfg = TrainConfig(steps=steps, batch_size=8, grad_accum=2, lr=3e-3, warmup_steps=1, save_every=100, precision="fp32")
res = train(model, data, cfg, out / "run")
rank = dist.get_rank() if dist.is_initialized() else 0
save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(out / f"rank{rank}.safetensors"))
if dist.is_initialized():
    dist.destroy_process_group()
