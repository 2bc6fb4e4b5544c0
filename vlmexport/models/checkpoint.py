"""Model directories in the Hugging Face layout: save, load, and lazy tensor access.

    config.json                 the architecture's own keys (THUDM's / transformers')
    model.safetensors           or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    tokenizer.json              (tokenizers) and/or tokenizer.model (SentencePiece), tokenizer_config.json
    preprocessor_config.json    image size, mean, std, resampling (transformers 5: inside processor_config.json;
                                THUDM's CogVLM: none, its transform follows from config.json)
    chat_template.jinja         or chat_template.json / processor_config.json / tokenizer_config.json's
                                chat_template; else the architecture's own template

Weights are read with safetensors only (memory-mapped, lazily, tensor by tensor);
pickled ``*.bin`` checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.atomic import atomic_directory
from ..core.errors import CheckpointError, ConfigError
from ..core.preprocess import PreprocessConfig
from ..core.prompt import CHAT_TEMPLATE_FILE, ChatTemplate, TemplateError
from ..core.tokenizer import TOKENIZER_JSON, TOKENIZER_MODEL, Tokenizer, tokenizer_file
from .base import VLM, VLMConfig, architecture_for_hf
from .layers import rope_inv_freq

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
PREPROCESSOR = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE_JSON = "chat_template.json"
MODEL_DIR_HINT = ("point to a model directory in the Hugging Face layout (config.json, model.safetensors, "
                  "tokenizer.json or tokenizer.model, preprocessor_config.json)")


def _err(path: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


# ------------------------------------------------------------------- lazy weights
class SafetensorsCheckpoint:
    """Lazy, memory-mapped access to the tensors of a (possibly sharded) checkpoint."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        single = self.dir / WEIGHTS
        self.files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise _err(index, f"not a valid safetensors index ({exc}); re-save the checkpoint") from None
            for name, fname in weight_map.items():
                self.files[name] = self.dir / fname
        elif single.is_file():
            for name in self._keys(single):
                self.files[name] = single
        else:
            pickled = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
            if pickled:
                raise _err(self.dir, f"holds only pickled weights ({', '.join(pickled)}); vlmexport reads safetensors "
                           "only: re-save with save_pretrained(..., safe_serialization=True)")
            raise _err(self.dir, f"has no {WEIGHTS}; {MODEL_DIR_HINT}")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise _err(index, f"names shard files that are missing: {', '.join(missing)}")

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises several error types for a bad header
            raise _err(path, f"is not a valid safetensors file ({str(exc).splitlines()[0]}); the file is truncated or "
                       "corrupt: copy or re-save it") from None

    def keys(self) -> list[str]:
        return list(self.files)

    def _handle(self, path: Path):
        # safe_open is cheap (mmap); opening per call keeps memory bounded for huge models
        return safe_open(str(path), framework="pt")

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.files[name]
        try:
            with self._handle(path) as f:
                return tuple(f.get_slice(name).get_shape())
        except Exception as exc:  # a shard of a sharded checkpoint is opened here first
            raise _err(path, f"cannot read tensor {name} ({str(exc).splitlines()[0]}); the file is truncated or "
                       "corrupt: copy or re-save it") from None

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        try:
            with self._handle(path) as f:
                return f.get_tensor(name)
        except Exception as exc:
            raise _err(path, f"cannot read tensor {name} ({str(exc).splitlines()[0]}); the file is truncated or "
                       "corrupt: copy or re-save it") from None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for name, path in self.files.items():
            by_file.setdefault(path, []).append(name)
        for path, names in by_file.items():
            with self._handle(path) as f:
                for name in names:
                    yield name, f.get_tensor(name)


# -------------------------------------------------------------------- name table
def canonical_name(arch: type[VLM], name: str) -> str | None:
    """Map a checkpoint spelling to the module's name; None for tensors we recompute."""
    for pattern in arch.checkpoint_ignored:
        if re.fullmatch(pattern, name):
            return None
    for pattern, repl in arch.checkpoint_aliases:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return name


class CanonicalTensors:
    """A checkpoint's tensors under the module names of its architecture (the names
    ``part_specs`` use), read lazily: the view exporters stream from."""

    def __init__(self, ckpt: SafetensorsCheckpoint, arch: type[VLM]):
        self.ckpt = ckpt
        self.names: dict[str, str] = {}
        for name in ckpt.keys():
            target = canonical_name(arch, name)
            if target is not None:
                self.names[target] = name

    def keys(self) -> list[str]:
        return list(self.names)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.ckpt.get(self.names[name])
        except KeyError:
            raise CheckpointError(f"{self.ckpt.dir}: the checkpoint has no tensor {name}; it is incomplete or of "
                                  "another architecture") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(self.names[name])

    def num_parameters(self) -> int:
        import math

        return sum(math.prod(self.ckpt.shape(n)) for n in self.names.values())


# ------------------------------------------------------------------------ config
def read_config(model_dir: str | os.PathLike) -> tuple[type[VLM], VLMConfig, dict]:
    d = Path(model_dir)
    if not d.exists():
        raise CheckpointError(f"{d}: no such directory; {MODEL_DIR_HINT}")
    path = d / CONFIG
    if not path.is_file():
        raise _err(d, f"has no {CONFIG}; {MODEL_DIR_HINT}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _err(path, f"is not valid JSON ({exc}); fix or regenerate it") from None
    if not isinstance(hf, dict):
        raise _err(path, "is not a JSON object of model settings; fix or regenerate it")
    arch = architecture_for_hf(hf, source=str(path))
    try:
        config = arch.config_from_hf(hf)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: missing or invalid key {exc} for {arch.arch_name}; fix config.json") from None
    return arch, config, hf


# ------------------------------------------------- tokenizer, image processor, template
def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _err(path, f"is not valid JSON ({exc}); fix or regenerate it") from None
    if not isinstance(d, dict):
        raise _err(path, "is not a JSON object; fix or regenerate it")
    return d


def read_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """``tokenizer.json`` (tokenizers) where it exists, else ``tokenizer.model`` (SentencePiece)."""
    d = Path(model_dir)
    if tokenizer_file(d) is None:
        raise _err(d, "has no tokenizer.json or tokenizer.model; copy the model's tokenizer files there (THUDM's "
                   "CogVLM uses lmsys/vicuna-7b-v1.5's)")
    return Tokenizer(d)


def read_preprocess(model_dir: str | os.PathLike, arch: type[VLM] | None = None,
                    config: VLMConfig | None = None) -> PreprocessConfig:
    """preprocessor_config.json, else processor_config.json's image_processor (transformers 5),
    else the architecture's own transform (THUDM's CogVLM ships none)."""
    d = Path(model_dir)
    if (d / PREPROCESSOR).is_file():
        return PreprocessConfig.load(d / PREPROCESSOR)
    if (d / PROCESSOR_CONFIG).is_file():
        proc = _json(d / PROCESSOR_CONFIG)
        if "image_processor" in proc:
            return PreprocessConfig.from_processor_config(proc, source=str(d / PROCESSOR_CONFIG))
    if arch is not None and config is not None:
        pre = arch.default_preprocess(config)
        if pre is not None:
            return pre
    raise ConfigError(f"{d}: no {PREPROCESSOR} (nor an image_processor in {PROCESSOR_CONFIG}); every model "
                      "directory needs its image processor's settings")


def _template_text(d: Path) -> tuple[str, str] | None:
    """(jinja, file) from the places transformers keeps a chat template, in its order."""
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return (d / CHAT_TEMPLATE_FILE).read_text(), CHAT_TEMPLATE_FILE
    for name in (CHAT_TEMPLATE_JSON, PROCESSOR_CONFIG, "tokenizer_config.json"):
        if not (d / name).is_file():
            continue
        t = _json(d / name).get("chat_template")
        if isinstance(t, list):  # tokenizer_config.json: [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        if isinstance(t, str) and t.strip():
            return t, name
    return None


def read_chat_template(model_dir: str | os.PathLike, arch: type[VLM], config: VLMConfig) -> ChatTemplate:
    """The model's own chat template (jinja), else the architecture's. An older vlmexport
    chat_template.json (format strings) is read as the template it described."""
    d = Path(model_dir)
    family = arch.default_chat_template(config)
    found = _template_text(d)
    if found is None:
        if (d / CHAT_TEMPLATE_JSON).is_file():
            old = _json(d / CHAT_TEMPLATE_JSON)
            if "user" in old:
                return ChatTemplate.from_dict(old)
        return family
    jinja, name = found
    image_token = family.image_token
    if (d / PROCESSOR_CONFIG).is_file():
        image_token = _json(d / PROCESSOR_CONFIG).get("image_token") or image_token
    try:
        return ChatTemplate(jinja=jinja, image_token=image_token, encode_runs_apart=family.encode_runs_apart,
                            source=name)
    except TemplateError as exc:
        raise TemplateError(f"{d / name}: {exc}") from None


@dataclass
class LoadedModel:
    model: VLM
    tokenizer: Tokenizer | None
    preprocess: PreprocessConfig
    path: Path
    template: ChatTemplate | None = None


def load_pretrained(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    require_tokenizer: bool = True) -> LoadedModel:
    """Load a model directory; every mismatch is a one-line error naming the file."""
    d = Path(model_dir)
    arch, config, _ = read_config(d)
    ckpt = SafetensorsCheckpoint(d)
    with torch.device("meta"):
        model = arch(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"lm_head.weight", "language_model.lm_head.weight"} if config.tie_word_embeddings else set()
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.keys():
        target = canonical_name(arch, name)
        if target is None:
            continue
        if target not in expected:
            raise _err(ckpt.files[name], f"holds tensor {name} that a {arch.arch_name} model with this config.json has "
                       "no place for; the config contradicts the weights (wrong number of layers?)")
        shape = ckpt.shape(name)
        if shape != expected[target]:
            raise _err(ckpt.files[name], f"tensor {name} has shape {list(shape)} but config.json implies "
                       f"{list(expected[target])}; the config contradicts the weights: fix config.json")
        state[target] = ckpt.get(name).to(dtype)
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise _err(d, f"the weights lack {', '.join(missing[:3])}{more}; the checkpoint is incomplete or "
                   "config.json describes a bigger model")
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=False, assign=False)
    # non-persistent buffers were created on the meta device: rebuild them
    model.rope_inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, device=device)
    if config.tie_word_embeddings:
        model.lm_head_module().weight = model.token_embedding().weight
    model.to(dtype).eval()
    tok = None
    if tokenizer_file(d) is not None or require_tokenizer:
        tok = read_tokenizer(d)
        if tok.vocab_size > config.vocab_size:
            raise _err(tok.path, f"has {tok.vocab_size} pieces but config.json vocab_size is "
                       f"{config.vocab_size}; they must come from the same model")
    pre = read_preprocess(d, arch, config)
    if pre.image_size != config.vision_config.image_size:
        raise _err(d / PREPROCESSOR, f"image size {pre.image_size} differs from config.json's vision image_size "
                   f"{config.vision_config.image_size}; make them agree")
    return LoadedModel(model=model, tokenizer=tok, preprocess=pre, path=d,
                       template=read_chat_template(d, arch, config))


def save_pretrained(model: VLM, out_dir: str | os.PathLike, tokenizer: str | os.PathLike | Tokenizer | None,
                    preprocess: PreprocessConfig, dtype: torch.dtype | None = None,
                    metadata: dict | None = None, template: ChatTemplate | None = None) -> Path:
    """Write a model directory atomically (an old copy survives until the new one is complete).
    ``template`` (the one the model was trained with) is written as chat_template.jinja."""
    with atomic_directory(out_dir) as tmp:
        hf = type(model).config_to_hf(model.config)
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        save_file(state_dict_for_saving(model, dtype), str(tmp / WEIGHTS),
                  metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
        if tokenizer is not None:
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
            shutil.copyfile(tok.path, tmp / (TOKENIZER_JSON if tok.kind == "tokenizers" else TOKENIZER_MODEL))
            for src in tok.files()[1:]:
                shutil.copyfile(src, tmp / src.name)
        preprocess.save(tmp / PREPROCESSOR)
        if template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(template.jinja)
    return Path(out_dir)


def state_dict_for_saving(model: VLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors under checkpoint names; a tied lm_head is stored once."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        t = t.detach().to("cpu")
        state[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    return state
