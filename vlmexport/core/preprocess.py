"""Image preprocessing, written once for every backend (numpy + Pillow, no torch).

The method is declared in ``preprocessor_config.json`` and read back from it, so a
bundle carries exactly how its images must be prepared. Besides our own keys the file
holds the Hugging Face image-processor keys (``image_mean``, ``image_std``, ``size``,
``crop_size``, ``resample``) that transformers and llama.cpp's converter read.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageError

# OpenAI CLIP statistics, used by EVA-CLIP (CogVLM) and CLIP (LLaVA).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESCALE = ("float32_div", "float64_mul")
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
MIN_IMAGE_SIDE = 2  # a 1x1 "image" carries no picture
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb limit (~8000x8000)

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    # "squash": resize straight to image_size x image_size (CogVLM's transforms.Resize((s, s)))
    # "shortest_edge_center_crop": CLIPImageProcessor's resize + centre crop (LLaVA)
    resize_mode: str = "squash"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # how uint8 becomes [0, 1]: "float32_div" (x / 255 in float32: torchvision's ToTensor, THUDM's CogVLM,
    # and vlmexport's own models) or "float64_mul" (x * rescale_factor in float64, then float32:
    # transformers' image processors)
    rescale: str = "float32_div"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE:
            raise ConfigError(f"preprocessor resample {self.resample!r} is unknown; use one of {sorted(RESAMPLE)}")
        if self.resize_mode not in ("squash", "shortest_edge_center_crop"):
            raise ConfigError(f"preprocessor resize_mode {self.resize_mode!r} is unknown; use 'squash' or "
                              "'shortest_edge_center_crop'")
        if self.rescale not in RESCALE:
            raise ConfigError(f"preprocessor rescale {self.rescale!r} is unknown; use one of {list(RESCALE)}")

    def to_hf(self) -> dict[str, Any]:
        s = self.image_size
        d = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "do_center_crop": self.resize_mode != "squash",
            "size": {"height": s, "width": s} if self.resize_mode == "squash" else {"shortest_edge": s},
            "crop_size": {"height": s, "width": s},
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "resample": RESAMPLE[self.resample],
            # vlmexport's own, read back by every backend
            "vlmexport": {"image_size": s, "resample": self.resample, "resize_mode": self.resize_mode,
                          **({"rescale": self.rescale} if self.rescale != "float32_div" else {})},
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "preprocessor_config.json") -> "PreprocessConfig":
        own = d.get("vlmexport") or {}
        try:
            if own:
                size, resample, mode = own["image_size"], own["resample"], own["resize_mode"]
                rescale = own.get("rescale", "float32_div")
            else:  # a plain Hugging Face image processor
                size, resample, mode = _hf_geometry(d, source)
                rescale = "float64_mul"
                if abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12 or d.get("do_rescale") is False \
                        or d.get("do_normalize") is False:
                    raise ConfigError(f"{source}: only do_rescale with rescale_factor 1/255 and do_normalize are "
                                      "supported; re-save the image processor with them")
            return cls(image_size=int(size), image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
                       image_std=tuple(d.get("image_std", CLIP_STD)), resample=resample, resize_mode=mode,
                       rescale=rescale)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: cannot read the image size/mean/std ({exc}); "
                              "write image_size, image_mean and image_std into it") from None

    @classmethod
    def from_processor_config(cls, d: dict[str, Any], source: str = "processor_config.json") -> "PreprocessConfig":
        """transformers 5 keeps the image processor inside processor_config.json."""
        ip = d.get("image_processor")
        if not isinstance(ip, dict):
            raise ConfigError(f"{source} has no image_processor; save the processor with transformers or add a "
                              "preprocessor_config.json")
        return cls.from_hf(ip, source=f"{source} (image_processor)")

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreprocessConfig":
        try:
            return cls.from_hf(json.loads(Path(path).read_text()), source=str(path))
        except FileNotFoundError:
            raise ConfigError(f"{path} is missing; every model directory needs a preprocessor_config.json") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); fix or regenerate it") from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hf_geometry(d: dict[str, Any], source: str) -> tuple[int, str, str]:
    """(size, resample, resize_mode) of a transformers image processor's keys."""
    crop = d.get("crop_size") or {}
    sz = d.get("size") or {}
    if isinstance(sz, int):  # very old processors: size: 224
        sz = {"shortest_edge": sz} if d.get("do_center_crop") else {"height": sz, "width": sz}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    inv = {v: k for k, v in RESAMPLE.items()}
    resample = inv.get(d.get("resample", 3), "bicubic")
    if d.get("do_resize") is False:
        raise ConfigError(f"{source}: do_resize is false; vlmexport needs images resized to the model's size")
    if "shortest_edge" in sz:
        if not d.get("do_center_crop", True):
            raise ConfigError(f"{source}: a shortest_edge resize without a centre crop gives images of varying "
                              "size; set do_center_crop")
        if crop and (crop.get("height"), crop.get("width")) != (sz["shortest_edge"],) * 2:
            raise ConfigError(f"{source}: crop_size {crop} differs from size.shortest_edge {sz['shortest_edge']}; "
                              "only equal sizes are supported")
        return int(sz["shortest_edge"]), resample, "shortest_edge_center_crop"
    if "height" in sz:
        if sz.get("height") != sz.get("width"):
            raise ConfigError(f"{source}: size {sz} is not square; vlmexport models take square images")
        if d.get("do_center_crop") and crop and crop.get("height") != sz["height"]:
            raise ConfigError(f"{source}: a crop after a resize to {sz} is not supported; re-save the processor "
                              "without do_center_crop")
        return int(sz["height"]), resample, "squash"
    return int(crop.get("height") or d["image_size"]), resample, "squash"


def open_image(src: ImageInput, name: str | None = None) -> Image.Image:
    """Decode an image into 8-bit RGB, read faithfully whatever its mode, with size limits.

    Accepted: a path, bytes, a PIL image, or a uint8/uint16 array (HxW, HxWx1, HxWx3 or
    HxWx4, channels last). Every PIL mode is decided (tests/hardening/corpus holds one file
    per mode and bit depth):

    * transparency (RGBA, LA, PA, P or L/RGB with a tRNS colour, premultiplied RGBa/La)
      is composited onto **white**, as transformers' ``convert_to_rgb`` does for
      CLIPImageProcessor (``do_convert_rgb``), so transparent areas never turn black;
    * 16-bit images (I;16*, and I holding 0..65535) are **scaled** to 8 bits (v / 257,
      rounded), never clipped; I with values outside 0..65535 is refused;
    * F (float) images in [0, 1] are scaled by 255; other ranges, NaN and inf are refused;
    * 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX convert with Pillow's colour conversions;
    * animated or multi-page images (more than one frame) are **refused**: which frame
      the question is about is the caller's choice, so save that frame on its own;
    * a file's EXIF orientation is applied (as transformers' ``load_image``).
    """
    label = name or (str(src) if isinstance(src, (str, os.PathLike)) else "image")
    label = "".join(c if c.isprintable() else repr(c)[1:-1] for c in label)  # a newline in a path: still one line
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        img = _from_array(src, label)
    elif isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)):
        img = _decode(src, label)
    else:
        raise ImageError(f"{label}: an image must be a file path, bytes, a PIL image or an HxWx3 uint8 array, not "
                         f"{type(src).__name__}")
    frames = getattr(img, "n_frames", 1)
    if isinstance(frames, int) and frames > 1:
        raise ImageError(f"{label}: an animated or multi-page image ({frames} frames); save the one frame you mean "
                         "as a PNG and pass that")
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"{label}: the image is larger than {MAX_IMAGE_PIXELS:,} pixels (decompression-bomb limit); "
                         "downscale it first")
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ImageError(f"{label}: the image is {w}x{h}; images need at least {MIN_IMAGE_SIDE} pixels per side")
    try:
        return _to_rgb(img, label)
    except (OSError, ValueError) as exc:  # a lazily opened PIL image whose file went away, an exotic mode
        raise ImageError(f"{label}: cannot convert this {img.mode} image to RGB ({exc}); save it as an 8-bit "
                         "RGB PNG") from None


def _decode(src: str | os.PathLike | bytes | bytearray | memoryview, label: str) -> Image.Image:
    from PIL import ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on corrupt TIFF/EXIF tags: no log spam
            img = Image.open(io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src)
            w, h = img.size  # from the header: refuse a bomb before decoding it
            if w * h > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{w}x{h}")
            if getattr(img, "n_frames", 1) > 1:
                return img  # refused by the caller, undecoded
            img.load()
            return ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such image file; check the path") from None
    except PermissionError:
        raise ImageError(f"{label}: permission denied; make the image file readable") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory; pass an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: the image is larger than {MAX_IMAGE_PIXELS:,} pixels (decompression-bomb "
                         "limit); downscale it first") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's parsers raise OSError, SyntaxError, TypeError, KeyError,
        # IndexError, struct.error, ... on corrupt files (found by tests/hardening/test_fuzz.py): all "unreadable"
        raise ImageError(f"{label}: not a readable image ({exc.__class__.__name__}); pass a PNG/JPEG/WebP "
                         "file") from None


def _from_array(a: np.ndarray, label: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype == np.uint16:
        a = _scale16(a)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{label}: an array image must be HxW, HxWx3 or HxWx4 (channels last) of uint8 or "
                         f"uint16, got {list(a.shape)} {a.dtype}; convert it, e.g. (x * 255).round().astype('uint8')")
    return Image.fromarray(np.ascontiguousarray(a))


def _scale16(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (65535 / 257 = 255 exactly)."""
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ImageError(f"{label}: a 32-bit integer image with values {int(a.min())}..{int(a.max())} (outside "
                             "16 bits); convert it to an 8- or 16-bit image")
        return Image.fromarray(_scale16(a.astype(np.int64).astype(np.uint16))).convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 1)):
            held = "NaN or infinity" if not np.isfinite(a).all() else f"{a.min():g}..{a.max():g}"
            raise ImageError(f"{label}: a floating-point image must hold values in [0, 1] (it holds {held}); "
                             "scale it or save it as an 8-bit PNG")
        return Image.fromarray(np.round(a * 255).astype(np.uint8)).convert("RGB")
    if mode == "La":  # premultiplied grey + alpha: composite onto white directly
        a = np.asarray(img).astype(np.int16)
        return Image.fromarray(np.clip(a[..., 0] + 255 - a[..., 1], 0, 255).astype(np.uint8)).convert("RGB")
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shape(w: int, h: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) before the crop: CLIPImageProcessor's shortest-edge rule floors the long side."""
    s = cfg.image_size
    if cfg.resize_mode == "squash":
        return s, s
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)  # transformers' get_resize_output_image_size: int(), not round()
    return (s, new_long) if w <= h else (new_long, s)


def resize(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    s = cfg.image_size
    method = RESAMPLE[cfg.resample]
    nw, nh = resize_shape(*img.size, cfg)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), method)
    if cfg.resize_mode == "squash":
        return img
    left, top = (nw - s) // 2, (nh - s) // 2  # transformers' center_crop
    return img.crop((left, top, left + s, top + s))


def to_pixels(img: Image.Image | np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """An already-resized image -> normalised float32 CHW pixels, with the arithmetic (and so the
    rounding) of the checkpoint's own processor."""
    if cfg.rescale == "float64_mul":  # transformers' rescale(): float64 multiply, then float32
        arr = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)
    else:  # torchvision's ToTensor: float32 divide
        arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(src: ImageInput, cfg: PreprocessConfig, name: str | None = None) -> np.ndarray:
    """Decode, resize and normalise one image -> [3, S, S] float32."""
    return to_pixels(resize(open_image(src, name), cfg), cfg)
