"""Model directories: bit-identical round trips, atomic saves, the config.json layout, and a
one-line error naming the file for every kind of bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmexport.core.errors import CheckpointError, ConfigError, VlmexportError
from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer, train_tokenizer
from vlmexport.models import architectures, get_architecture
from vlmexport.models import checkpoint as ckpt_mod
from vlmexport.models.checkpoint import load_pretrained, read_config, save_pretrained

ARCHS = sorted(architectures())


def logits_of(model, seed: int = 0) -> torch.Tensor:
    n = model.image_tokens()
    c = model.config
    lay = build_layout([TextPiece((1, 5, 6)), ImagePiece(n), TextPiece((7, 8, 9))], c.expert_routing, c.position_ids)
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(torch.as_tensor(lay.input_ids)[None], torch.as_tensor(lay.position_ids)[None],
                     torch.as_tensor(lay.token_type)[None], torch.as_tensor(lay.is_image)[None], px)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def edit_config(d: Path, **changes) -> None:
    path = d / "config.json"
    hf = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    path.write_text(json.dumps(hf))


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_identical(tiny_model, tiny_model_dir, arch):
    model = tiny_model(arch, seed=3, jitter=True)
    d = tiny_model_dir(arch, model=model)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.model"]
    loaded = load_pretrained(d)
    assert type(loaded.model) is type(model)
    assert loaded.model.config == model.config
    a, b = model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(logits_of(model), logits_of(loaded.model))
    assert not loaded.model.training
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 320
    assert loaded.preprocess == PreprocessConfig(image_size=32)
    # the safetensors keys are the module names (the checkpoint layout)
    assert set(load_file(str(d / "model.safetensors"))) == set(a)


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_word_embeddings_round_trip(tiny_model, tiny_model_dir, arch):
    model = tiny_model(arch, seed=4, jitter=True, tie_word_embeddings=True)
    assert model.lm_head_module().weight is model.token_embedding().weight
    d = tiny_model_dir(arch, model=model)
    head = [n for n, p in model.named_parameters(remove_duplicate=False) if p is model.lm_head_module().weight]
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert len(set(head) & stored) == 1  # the shared matrix is stored once
    loaded = load_pretrained(d).model
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head_module().weight is loaded.token_embedding().weight
    assert torch.equal(logits_of(model), logits_of(loaded))


@pytest.mark.parametrize("arch", ARCHS)
def test_reduced_precision_save(tiny_model, tmp_path, tokenizer_path, arch):
    model = tiny_model(arch, seed=5, jitter=True)
    d = save_pretrained(model, tmp_path / "bf16", tokenizer_path, PreprocessConfig(32), dtype=torch.bfloat16)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = load_pretrained(d, dtype=torch.float32).model
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_checkpoint_loads(tiny_model, tiny_model_dir, arch):
    model = tiny_model(arch, seed=6, jitter=True)
    d = tiny_model_dir(arch, model=model)
    state = load_file(str(d / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(logits_of(load_pretrained(d).model), logits_of(model))

    # a truncated shard is named
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_pretrained(d)
    # a shard the index names but that is missing
    shard.unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_pretrained(d)
    (d / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_pretrained(d)


# ------------------------------------------------------------------- atomic
def test_failed_save_leaves_the_previous_directory_untouched(tiny_model, tiny_model_dir, monkeypatch):
    arch = ARCHS[0]
    d = tiny_model_dir(arch, seed=1)
    before = snapshot(d)

    def broken_save_file(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", broken_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(tiny_model(arch, seed=2), d, None, PreprocessConfig(32))
    assert snapshot(d) == before
    assert sorted(p.name for p in d.parent.iterdir()) == [d.name], "a temporary directory was left behind"
    # a failure with nothing at the path leaves nothing
    with pytest.raises(OSError):
        save_pretrained(tiny_model(arch, seed=2), d.parent / "fresh", None, PreprocessConfig(32))
    assert sorted(p.name for p in d.parent.iterdir()) == [d.name]


def test_save_over_an_existing_directory_replaces_it(tiny_model, tiny_model_dir):
    arch = ARCHS[0]
    d = tiny_model_dir(arch, seed=1)
    (d / "stale.txt").write_text("from an older save")
    m2 = tiny_model(arch, seed=2, jitter=True)
    save_pretrained(m2, d, None, PreprocessConfig(32))
    assert not (d / "stale.txt").exists() and not (d / "tokenizer.model").exists()
    assert torch.equal(logits_of(load_pretrained(d, require_tokenizer=False).model), logits_of(m2))
    assert sorted(p.name for p in d.parent.iterdir()) == [d.name]


# ----------------------------------------------------------- config layout
def test_cogvlm_config_uses_thudm_keys(tiny_model_dir):
    d = tiny_model_dir("cogvlm")
    hf = json.loads((d / "config.json").read_text())
    assert hf["architectures"] == ["CogVLMForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "template_version"):
        assert key in hf, key
    assert hf["expert_routing"] == "image_chunk" and hf["position_ids"] == "sequential"
    vc = hf["vision_config"]
    assert vc == {**vc, "image_size": 32, "patch_size": 8, "hidden_size": 48, "intermediate_size": 96,
                  "num_hidden_layers": 2, "num_heads": 4, "num_positions": 17}
    assert "layer_norm_eps" in vc
    pre = json.loads((d / "preprocessor_config.json").read_text())
    assert len(pre["image_mean"]) == 3 and len(pre["image_std"]) == 3
    assert PreprocessConfig.load(d / "preprocessor_config.json").image_size == 32


def test_thudm_config_without_semantics_fields_loads_as_hf_cogvlm(tiny_model, tiny_model_dir):
    model = tiny_model("cogvlm", seed=7, jitter=True)
    d = tiny_model_dir("cogvlm", model=model)
    assert load_pretrained(d).model.config.expert_routing == "image_chunk"
    assert load_pretrained(d).model.config.position_ids == "sequential"
    # an original THUDM config.json: no semantics fields, no num_key_value_heads
    edit_config(d, expert_routing=None, position_ids=None, num_key_value_heads=None)
    # THUDM checkpoints also carry RoPE tables, which are recomputed
    state = load_file(str(d / "model.safetensors"))
    for i in range(model.config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(model.config.head_dim // 2)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_pretrained(d).model
    assert loaded.config.expert_routing == "hf_cogvlm"
    assert loaded.config.position_ids == "hf_cogvlm"
    assert loaded.config.num_key_value_heads == loaded.config.num_attention_heads
    reference = tiny_model("cogvlm", seed=7, jitter=True, expert_routing="hf_cogvlm", position_ids="hf_cogvlm")
    assert torch.equal(logits_of(loaded), logits_of(reference))


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_semantics_survive_a_round_trip(tiny_model_dir, arch):
    for routing, positions in (("image_chunk", "sequential"), ("hf_cogvlm", "hf_cogvlm")):
        try:
            d = tiny_model_dir(arch, expert_routing=routing, position_ids=positions)
        except ConfigError:
            continue  # semantics the architecture does not accept
        c = load_pretrained(d).model.config
        assert (c.expert_routing, c.position_ids) == (routing, positions)


# -------------------------------------------------------------- bad inputs
def test_error_classes():
    assert issubclass(CheckpointError, VlmexportError) and issubclass(ConfigError, VlmexportError)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: no such directory"):
        load_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("arch", ARCHS)
def test_missing_or_invalid_config(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    cfg = d / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"config.json: is not valid JSON"):
        load_pretrained(d)
    cfg.write_text("[1, 2, 3]")
    with pytest.raises(VlmexportError, match="config.json"):
        load_pretrained(d)
    cfg.unlink()
    with pytest.raises(CheckpointError, match=f"{d}: has no config.json"):
        load_pretrained(d)


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_architecture_in_config(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    edit_config(d, architectures=["BlipForConditionalGeneration"])
    with pytest.raises(ConfigError, match=r"config.json: architectures \['BlipForConditionalGeneration'\] is not "
                                          r"supported.*CogVLMForCausalLM"):
        load_pretrained(d)
    edit_config(d, architectures=None)
    with pytest.raises(ConfigError, match=r"config.json: architectures \(missing\)"):
        load_pretrained(d)


def test_config_with_missing_or_invalid_keys(tiny_model_dir):
    d = tiny_model_dir("cogvlm")
    edit_config(d, vocab_size=None)
    with pytest.raises(ConfigError, match="config.json: missing or invalid key 'vocab_size'"):
        load_pretrained(d)
    d = tiny_model_dir("cogvlm")
    edit_config(d, hidden_size=66)
    with pytest.raises(ConfigError, match="config.json: hidden_size 66 is not divisible"):
        load_pretrained(d)
    d = tiny_model_dir("cogvlm")
    edit_config(d, expert_routing="sometimes")
    with pytest.raises(ConfigError, match="config.json: expert_routing"):
        read_config(d)


@pytest.mark.parametrize("arch", ARCHS)
def test_missing_weights(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{d}: has no model.safetensors"):
        load_pretrained(d)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "last_byte"])
def test_corrupt_weights(tiny_model_dir, arch, damage):
    d = tiny_model_dir(arch)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b"",
                   "last_byte": data[:-1]}[damage])
    with pytest.raises(CheckpointError, match=r"model.safetensors: is not a valid safetensors file.*truncated or "
                                              r"corrupt"):
        load_pretrained(d)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key, value, match", [
    ("num_hidden_layers", 1, r"model.safetensors: holds tensor .*layers\.1\..* no place for"),
    ("num_hidden_layers", 3, r"the weights lack .*layers\.2\..*config.json describes a bigger model"),
    ("hidden_size", 32, r"model.safetensors: tensor .* has shape \[.*\] but config.json implies"),
    ("intermediate_size", 256, r"model.safetensors: tensor .* has shape \[.*\] but config.json implies"),
])
def test_config_that_contradicts_the_weights(tiny_model_dir, arch, key, value, match):
    d = tiny_model_dir(arch)
    hf = json.loads((d / "config.json").read_text())
    section = hf.get("text_config", hf)  # llava nests the decoder's keys
    section[key] = value
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(d)


@pytest.mark.parametrize("arch", ARCHS)
def test_pickled_weights_are_refused_unread(tiny_model_dir, tmp_path, arch):
    d = tiny_model_dir(arch)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*safetensors only"):
        load_pretrained(d)
    assert not marker.exists(), "the pickle was loaded"


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_problems(tiny_model_dir, tmp_path, arch):
    d = tiny_model_dir(arch)
    (d / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer.json or tokenizer.model; copy the model's "):
        load_pretrained(d)
    assert load_pretrained(d, require_tokenizer=False).tokenizer is None
    (d / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="tokenizer.model: not a SentencePiece model"):
        load_pretrained(d)
    words = [f"{a}{b}{c}" for a in "bcdfghjklm" for b in "aeiou" for c in "nprst"]
    big = Tokenizer(train_tokenizer([" ".join(words[i:i + 9]) for i in range(len(words))], tmp_path / "big.model",
                                    vocab_size=400))
    vocab = get_architecture(arch).tiny_config().vocab_size  # (an architecture may reserve ids past the tokenizer's)
    assert big.vocab_size > vocab
    (d / "tokenizer.model").write_bytes(big.serialized())
    vocab = get_architecture(arch).tiny_config().vocab_size  # 320; a tiny flamingo adds its own image token
    with pytest.raises(CheckpointError, match=rf"tokenizer.model: has {big.vocab_size} pieces but config.json "
                                              rf"vocab_size is {vocab}"):
        load_pretrained(d)


@pytest.mark.parametrize("arch", ARCHS)
def test_preprocessor_problems(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    PreprocessConfig(image_size=64).save(d / "preprocessor_config.json")
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json: image size 64 differs from config.json's "
                                              r"vision image_size 32"):
        load_pretrained(d)
    (d / "preprocessor_config.json").unlink()
    if arch == "cogvlm":  # THUDM's checkpoints ship none: its transform follows from config.json
        assert load_pretrained(d).preprocess == PreprocessConfig(image_size=32)
        return
    with pytest.raises(ConfigError, match=r"no preprocessor_config.json \(nor an image_processor in "
                                          r"processor_config.json\)"):
        load_pretrained(d)
