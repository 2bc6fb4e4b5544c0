"""Connector kinds: registered by decorator, one file each; a kind that misses a hook
fails when its class is created; the image-token count comes from the kind alone."""

from __future__ import annotations

import pytest

from vlmexport.core.errors import ConfigError
from vlmexport.models import architectures
from vlmexport.models.connectors import ConnectorKind, connector_kinds, get_connector


def test_every_architecture_uses_a_registered_kind():
    kinds = connector_kinds()
    assert {"glu", "mlp"} <= set(kinds)
    for name, A in architectures().items():
        specs = A.part_specs(A.tiny_config())
        assert specs.connector.kind in kinds, name


def test_a_kind_missing_a_hook_fails_at_class_creation():
    with pytest.raises(TypeError, match="lacks"):
        type("NoName", (ConnectorKind,), {"patch_tokens": staticmethod(lambda s, n: n)})
    with pytest.raises(TypeError, match="gguf_refusal"):
        type("Silent", (ConnectorKind,), {"name": "silent"})


def test_unknown_kind_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown connector kind 'honeybee'; known kinds: \['glu', 'mlp'"):
        get_connector("honeybee")


def test_token_count_adds_boi_and_eoi_where_named():
    A = architectures()["cogvlm"]
    specs = A.part_specs(A.tiny_config())
    assert specs.connector.boi and specs.connector.eoi
    assert specs.image_tokens == specs.vision.num_patches + 2
    B = architectures()["llava"]
    full = B.part_specs(B.tiny_config(vision_feature_select_strategy="full"))
    assert full.image_tokens == full.vision.num_patches + 1  # CLS kept, no boi/eoi


def test_a_kind_without_a_llama_cpp_projector_refuses_gguf_in_one_line():
    class NoProjector(ConnectorKind):
        name = "test-no-projector"
        gguf_refusal = "llama.cpp has no projector for the test kind"

        @staticmethod
        def patch_tokens(spec, vision_tokens):
            return vision_tokens

        onnx = gguf_tensors = staticmethod(lambda *a: None)

    A = architectures()["llava"]
    with pytest.raises(ConfigError, match="^GGUF export: llama.cpp has no projector for the test kind; build "
                                          "--format onnx instead$"):
        NoProjector.check_gguf(A.part_specs(A.tiny_config()))
