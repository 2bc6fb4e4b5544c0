"""Image decoding (inputs, limits, errors), resize modes, normalisation and the config file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from vlmexport.core import preprocess as pp
from vlmexport.core.errors import ConfigError, ImageError
from vlmexport.core.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    PreprocessConfig,
    open_image,
    preprocess,
    resize,
    to_pixels,
)


def rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------- decoding
def test_every_input_kind_decodes_to_the_same_rgb(tmp_path):
    arr = rgb(20, 12)
    pil = Image.fromarray(arr)
    path = tmp_path / "a.png"
    pil.save(path)
    for src in (arr, pil, path, str(path), png_bytes(pil)):
        img = open_image(src)
        assert img.mode == "RGB" and img.size == (20, 12)
        np.testing.assert_array_equal(np.asarray(img), arr)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_other_modes_are_converted_to_rgb(mode):
    img = Image.fromarray(rgb(8, 8)).convert(mode)
    out = open_image(png_bytes(img) if mode != "CMYK" else img)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_missing_file_names_the_path(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png.*no such image"):
        open_image(p)


def test_garbage_bytes_and_files_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(b"definitely not a picture")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)  # a JPEG header and nothing else
    with pytest.raises(ImageError, match="bad.jpg"):
        open_image(bad)
    # a truncated PNG
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(png_bytes(Image.fromarray(rgb(64, 64)))[:60])
    with pytest.raises(ImageError, match="trunc.png"):
        open_image(trunc)


@pytest.mark.parametrize("arr", [  # grey HxW and RGBA HxWx4 are accepted (tests/hardening/test_images.py)
    np.zeros((8, 8, 3), np.float32), np.zeros((3, 8, 8, 1), np.uint8), np.zeros((8, 8, 2), np.uint8),
])
def test_bad_arrays(arr):
    with pytest.raises(ImageError, match="HxWx3 or HxWx4 .* of uint8 or uint16"):
        open_image(arr)


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_too_small_images(size):
    with pytest.raises(ImageError, match="at least 2 pixels"):
        open_image(Image.new("RGB", size))


def test_decompression_bomb_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", 100)
    before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "big.png"
    Image.fromarray(rgb(12, 12)).save(path)  # 144 px: over the limit (Pillow warns)
    with pytest.raises(ImageError, match="decompression-bomb"):
        open_image(path)
    Image.fromarray(rgb(40, 40)).save(path)  # 1600 px: over twice the limit (Pillow raises)
    with pytest.raises(ImageError, match="decompression-bomb"):
        open_image(path)
    # already-decoded inputs are checked too
    with pytest.raises(ImageError, match="decompression-bomb"):
        open_image(rgb(12, 12))
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global limit is restored
    assert open_image(rgb(10, 10)).size == (10, 10)  # exactly at the limit is fine


# ---------------------------------------------------------------------- resize
def test_squash_resizes_straight_to_the_square():
    cfg = PreprocessConfig(image_size=16)
    img = Image.fromarray(rgb(40, 20))
    out = resize(img, cfg)
    assert out.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC)))
    same = Image.fromarray(rgb(16, 16))
    assert resize(same, cfg) is same  # no resampling when already at size


@pytest.mark.parametrize("w, h", [(64, 32), (32, 64), (33, 17), (16, 16)])
def test_shortest_edge_center_crop(w, h):
    cfg = PreprocessConfig(image_size=16, resize_mode="shortest_edge_center_crop", resample="bilinear")
    img = Image.fromarray(rgb(w, h))
    out = resize(img, cfg)
    assert out.size == (16, 16)
    # transformers' get_resize_output_image_size: the long side is int(16 * long / short) (floored)
    nw, nh = (16, int(16 * h / w)) if w <= h else (int(16 * w / h), 16)
    big = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR))
    top, left = (nh - 16) // 2, (nw - 16) // 2
    np.testing.assert_array_equal(np.asarray(out), big[top:top + 16, left:left + 16])


def test_to_pixels_normalises_to_chw_float32():
    cfg = PreprocessConfig(image_size=2)
    arr = np.array([[[255, 0, 128], [0, 0, 0]], [[10, 20, 30], [255, 255, 255]]], dtype=np.uint8)
    px = to_pixels(arr, cfg)
    assert px.shape == (3, 2, 2) and px.dtype == np.float32 and px.flags["C_CONTIGUOUS"]
    for c in range(3):
        expected = (arr[..., c].astype(np.float32) / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        np.testing.assert_allclose(px[c], expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["squash", "shortest_edge_center_crop"])
@pytest.mark.parametrize("shape", [(48, 40), (20, 60), (32, 32)])
def test_matches_transformers_clip_image_processor(mode, shape):
    """External reference: transformers' (PIL) CLIPImageProcessor with the keys we write."""
    transformers = pytest.importorskip("transformers")
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    cfg = PreprocessConfig(image_size=16, resize_mode=mode)
    hf = {k: v for k, v in cfg.to_hf().items() if k not in ("vlmexport", "image_processor_type")}
    arr = rgb(*shape, seed=3)
    theirs = proc_cls(**hf)(images=Image.fromarray(arr), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(arr, cfg), theirs, atol=1e-6)


# ----------------------------------------------------------------- the config
@pytest.mark.parametrize("cfg", [
    PreprocessConfig(image_size=32),
    PreprocessConfig(image_size=336, resize_mode="shortest_edge_center_crop", resample="bilinear",
                     image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.5, 1.0)),
])
def test_config_file_round_trip(cfg, tmp_path):
    path = tmp_path / "preprocessor_config.json"
    cfg.save(path)
    d = json.loads(path.read_text())
    # the Hugging Face keys that transformers and llama.cpp's converter read
    assert d["image_mean"] == list(cfg.image_mean) and d["image_std"] == list(cfg.image_std)
    assert d["crop_size"] == {"height": cfg.image_size, "width": cfg.image_size}
    assert PreprocessConfig.load(path) == cfg


@pytest.mark.parametrize("hf, expected", [
    ({"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}, "do_center_crop": True,
      "resample": 3}, PreprocessConfig(336, resize_mode="shortest_edge_center_crop", rescale="float64_mul")),
    ({"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5, 0.5, 0.5],
      "image_std": [0.5, 0.5, 0.5]}, PreprocessConfig(224, resample="bilinear", image_mean=(0.5,) * 3,
                                                       image_std=(0.5,) * 3, rescale="float64_mul")),
    ({"image_size": 490}, PreprocessConfig(490, rescale="float64_mul")),
])
def test_plain_hf_image_processor_configs(hf, expected):
    assert PreprocessConfig.from_hf(hf) == expected


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="resample"):
        PreprocessConfig(image_size=8, resample="magic")
    with pytest.raises(ConfigError, match="resize_mode"):
        PreprocessConfig(image_size=8, resize_mode="letterbox")
    missing = tmp_path / "preprocessor_config.json"
    with pytest.raises(ConfigError, match="preprocessor_config.json is missing"):
        PreprocessConfig.load(missing)
    missing.write_text("{not json")
    with pytest.raises(ConfigError, match=r"preprocessor_config.json is not valid JSON"):
        PreprocessConfig.load(missing)
    missing.write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(ConfigError, match="preprocessor_config.json.*image size"):
        PreprocessConfig.load(missing)


def test_preprocess_end_to_end(tmp_path):
    cfg = PreprocessConfig(image_size=32)
    arr = rgb(50, 30)
    px = preprocess(arr, cfg)
    assert px.shape == (3, 32, 32) and px.dtype == np.float32
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    np.testing.assert_array_equal(preprocess(path, cfg), px)
