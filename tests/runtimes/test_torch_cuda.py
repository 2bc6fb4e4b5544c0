"""The torch backend on CUDA: fp16/bf16 with the static KV cache, decode replayed as a CUDA graph.

Marked ``gpu``: skipped on machines without CUDA (this project's CI has none, so these
have not been executed there). What runs on CPU: the static decode step against a full
recompute for every architecture (tests/models/test_models.py), and the refusals below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.models import architectures
from vlmexport.runtimes.torch_session import TorchSession

ARCHS = sorted(architectures())
CUDA = torch.cuda.is_available()


def test_cuda_graphs_need_a_cuda_device(tiny_model):
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        TorchSession(tiny_model(ARCHS[0]), max_length=16, cuda_graphs=True)


def test_cpu_session_defaults_to_eager_decoding(tiny_model):
    s = TorchSession(tiny_model(ARCHS[0]), max_length=16)
    assert not s.static_decode and not s.cuda_graphs


def test_static_decode_refuses_past_the_cache(tiny_model):
    model = tiny_model(ARCHS[0])
    s = TorchSession(model, max_length=4, static_decode=True)
    s.prefill(build_layout([TextPiece((1, 2, 3))]), None)
    s.decode(5, 3)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        s.decode(6, 4)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_load_on_cuda_without_cuda_says_so(tiny_model_dir, tmp_path):
    import vlmexport
    from vlmexport.core.errors import MissingDependencyError
    from vlmexport.pipeline.build import build

    out = tmp_path / "bundle"
    build(tiny_model_dir(ARCHS[0]), out, formats=("onnx",), precisions=("fp32",), reference=True, validate=False)
    with pytest.raises(MissingDependencyError, match="device='cuda' needs a CUDA build of PyTorch"):
        vlmexport.load(out, backend="torch", device="cuda")


def _greedy(session: TorchSession, model, px: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    c = model.config
    lay = build_layout([TextPiece((1, 5, 6)), ImagePiece(model.image_tokens()), TextPiece((7, 8))],
                       c.expert_routing, c.position_ids, image_pad_id=c.pad_token_id)
    logits = [session.prefill(lay, session.encode_images(px))]
    tokens = []
    for i in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(session.decode(tokens[-1], lay.next_position + i))
    return tokens, logits


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_decode_equals_eager(tiny_model, arch, dtype):
    model = tiny_model(arch, seed=1, jitter=True).to("cuda", dtype)
    px = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    graph = TorchSession(model, max_length=64)
    assert graph.cuda_graphs and graph.static_decode
    eager = TorchSession(model, max_length=64, static_decode=False, cuda_graphs=False)
    t_graph, l_graph = _greedy(graph, model, px, 12)
    t_eager, l_eager = _greedy(eager, model, px, 12)
    assert t_graph == t_eager
    tol = 2e-2 if dtype is torch.float16 else 6e-2  # the masked full-cache softmax sums in another order
    for a, b in zip(l_graph, l_eager):
        np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=0)
    graph.reset()  # a second prompt replays the captured graph over the same buffers
    assert _greedy(graph, model, px, 12)[0] == t_graph
