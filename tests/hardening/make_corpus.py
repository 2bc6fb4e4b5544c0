"""Regenerate the corpus of bad and unusual inputs in tests/hardening/corpus/ (committed).

    python tests/hardening/make_corpus.py

images/     one file per PIL mode and bit depth, plus animated, truncated, bomb and EXIF cases
manifests/  hostile manifest.json files (each a small edit of a real one, or broken JSON)
gguf/       a tiny valid GGUF and hostile / truncated variants
safetensors/ a tiny valid file and hostile / truncated variants
expected.json  for every file: the expected result (a pixel / size, or an error substring)

Deterministic: running it twice writes the same bytes (no timestamps in the files).
"""

from __future__ import annotations

import copy
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).parent / "corpus"
W, H = 16, 12  # every image's size: tiny, so the corpus stays small
EXPECTED: dict[str, dict] = {}


def expect(rel: str, **e) -> None:
    EXPECTED[rel] = e


def write(rel: str, data: bytes) -> None:
    p = ROOT / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16 bits only for greyscale)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw, 9))
            + png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------- images
def images() -> None:
    px = (W // 2, H // 2)
    red = Image.new("RGB", (W, H), (200, 30, 30))
    cases = {  # name -> (bytes, expected centre pixel)
        "mode_1.png": (save(Image.new("1", (W, H), 1), "PNG"), (255, 255, 255)),
        "mode_L.png": (save(Image.new("L", (W, H), 77), "PNG"), (77, 77, 77)),
        "mode_LA_transparent.png": (save(Image.new("LA", (W, H), (0, 0)), "PNG"), (255, 255, 255)),
        "mode_LA_half.png": (save(Image.new("LA", (W, H), (0, 128)), "PNG"), (127, 127, 127)),
        "mode_P.png": (save(red.quantize(4), "PNG"), (200, 30, 30)),
        "mode_RGB.png": (save(red, "PNG"), (200, 30, 30)),
        "mode_RGB.jpg": (save(red, "JPEG", quality=95), (200, 30, 30)),
        "mode_RGB.webp": (save(red, "WEBP", lossless=True), (200, 30, 30)),
        "mode_RGBA_transparent.png": (save(Image.new("RGBA", (W, H), (0, 0, 0, 0)), "PNG"), (255, 255, 255)),
        "mode_RGBA_opaque.png": (save(Image.new("RGBA", (W, H), (10, 200, 10, 255)), "PNG"), (10, 200, 10)),
        "mode_RGBA.webp": (save(Image.new("RGBA", (W, H), (0, 0, 0, 0)), "WEBP", lossless=True), (255, 255, 255)),
        "mode_CMYK.jpg": (save(Image.new("CMYK", (W, H), (0, 255, 255, 0)), "JPEG", quality=95), (255, 0, 0)),
        "mode_CMYK.tiff": (save(Image.new("CMYK", (W, H), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)),
        "mode_YCbCr.tiff": (save(Image.new("YCbCr", (W, H), (76, 85, 255)), "TIFF"), (254, 0, 0)),
        "mode_LAB.tiff": (save(Image.new("LAB", (W, H), (128, 128, 128)), "TIFF"), (119, 119, 119)),
        "mode_I16.png": (save(Image.fromarray(np.full((H, W), 32896, np.uint16)), "PNG"), (128, 128, 128)),
        "mode_I16_white.png": (save(Image.fromarray(np.full((H, W), 65535, np.uint16)), "PNG"), (255, 255, 255)),
        "mode_I16B.tiff": (save(Image.new("I;16B", (W, H), 16448), "TIFF"), (64, 64, 64)),
        "mode_I.tiff": (save(Image.new("I", (W, H), 51400), "TIFF"), (200, 200, 200)),
        "mode_F.tiff": (save(Image.new("F", (W, H), 0.5), "TIFF"), (128, 128, 128)),
        "rgb48.png": (png16(np.full((H, W, 3), [0x8000, 0x4000, 0xFFFF], np.uint16), 2), (128, 64, 255)),
        "rgba64_transparent.png": (png16(np.zeros((H, W, 4), np.uint16), 6), (255, 255, 255)),
        "gray16_alpha.png": (png16(np.full((H, W, 2), [0, 0], np.uint16), 4), (255, 255, 255)),
    }
    trns = Image.new("P", (W, H), 1)
    trns.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    cases["mode_P_tRNS.png"] = (save(trns, "PNG", transparency=1), (255, 255, 255))
    pa = Image.new("PA", (W, H), (1, 0))
    pa.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    cases["mode_PA.tiff"] = (save(pa, "TIFF"), (255, 255, 255))
    for name, (data, pixel) in cases.items():
        write(f"images/{name}", data)
        expect(f"images/{name}", size=[W, H], pixel=[*px, list(pixel)])

    refused = {
        "mode_I32_out_of_range.tiff": (save(Image.new("I", (W, H), 100000), "TIFF"), "outside 16 bits"),
        "mode_F_out_of_range.tiff": (save(Image.new("F", (W, H), 3.5), "TIFF"), "values in [0, 1]"),
        "mode_F_nan.tiff": (save(Image.fromarray(np.full((H, W), np.nan, np.float32)), "TIFF"), "values in [0, 1]"),
        "animated.gif": (save(red, "GIF", save_all=True, append_images=[Image.new("RGB", (W, H))], duration=100),
                         "animated or multi-page image (2 frames)"),
        "animated.png": (save(red, "PNG", save_all=True, append_images=[Image.new("RGB", (W, H))]),
                         "animated or multi-page image (2 frames)"),
        "multipage.tiff": (save(red, "TIFF", save_all=True, append_images=[red]), "(2 frames)"),
        "truncated.png": (save(red, "PNG")[:50], "not a readable image"),
        "truncated.jpg": (save(red, "JPEG")[:200], "not a readable image"),
        "empty.png": (b"", "not a readable image"),
        "garbage.bin": (bytes(range(256)) * 2, "not a readable image"),
        "one_pixel.png": (save(Image.new("RGB", (1, 1)), "PNG"), "at least 2 pixels"),
        "one_row.png": (save(Image.new("RGB", (40, 1)), "PNG"), "at least 2 pixels"),
    }
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10 G pixels claimed in 60 bytes
    bomb = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))
    refused["bomb_header.png"] = (bomb, "decompression-bomb")
    for name, (data, err) in refused.items():
        write(f"images/{name}", data)
        expect(f"images/{name}", error=err)

    # EXIF orientation 6 (rotate 90 degrees clockwise to display): a 16x12 file shows as 12x16
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.new("RGB", (W, H), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, W // 2, H))  # left half blue in the file: on top once displayed
    write("images/exif_rotate90.jpg", save(img, "JPEG", quality=95, exif=exif.tobytes()))
    expect("images/exif_rotate90.jpg", size=[H, W], pixel=[H // 2, 2, [30, 30, 200]])


# ---------------------------------------------------------------------- manifests
BASE = {  # the demo bundle's manifest (scripts/ and vlmexport build --format onnx), trimmed
    "kind": "vlmexport-bundle", "schema_version": 1,
    "model": {"arch": "cogvlm", "num_parameters": 7338432, "image_tokens": 66, "image_size": 96,
              "expert_routing": "image_chunk", "position_ids": "sequential", "hidden_size": 256,
              "intermediate_size": 768, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 64,
              "vocab_size": 1024, "max_length": 320, "has_experts": True, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0, "gguf_arch": "cogvlm", "hf_config": {"max_position_embeddings": 320}},
    "tokenizer": {"file": "tokenizer.model", "type": "sentencepiece", "vocab_size": 864, "bos_id": 1, "eos_id": 2},
    "preprocessing": {"file": "preprocessor_config.json", "image_size": 96,
                      "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": "bicubic",
                      "resize_mode": "squash", "extra": {}},
    "chat_template": {"file": "chat_template.json", "user": "Question: {content} Answer:", "assistant": " {content}",
                      "turn_separator": "\n", "add_bos": True, "eos_after_answer": True, "unplaced_images": "start",
                      "image_token": "<image>"},
    "semantics_deviations": [], "calibration": None, "validation": {"parts": []}, "benchmarks": None,
    "tool_versions": {"python": "3.11.7"},
    "artifacts": [
        {"part": "vision_encoder", "format": "onnx", "precision": "fp32", "file": "onnx/vision_encoder.fp32.onnx",
         "sha256": "9b" * 32, "size_bytes": 29507,
         "data_files": [{"file": "onnx/vision_encoder.fp32.onnx.data", "sha256": "5e" * 32, "size_bytes": 11059968}],
         "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["num_images", 3, 96, 96]}],
         "outputs": [{"name": "image_features", "dtype": "float32", "shape": ["num_images", 64, 192]}], "extra": {}},
        {"part": "text_decoder", "format": "onnx", "precision": "fp32", "file": "onnx/text_decoder.fp32.onnx",
         "sha256": "a3" * 32, "size_bytes": 17525,
         "data_files": [{"file": "onnx/text_decoder.fp32.onnx.data", "sha256": "04" * 32, "size_bytes": 14827520}],
         "inputs": [], "outputs": [], "extra": {}},
        {"part": "token_embedding", "format": "onnx", "precision": "fp32",
         "file": "onnx/token_embedding.fp32.safetensors", "sha256": "76" * 32, "size_bytes": 1048696,
         "data_files": [], "inputs": [],
         "outputs": [{"name": "weight", "dtype": "float32", "shape": [1024, 256]}], "extra": {}},
    ],
    "files": {"tokenizer.model": "8e" * 32}, "file_sizes": {"tokenizer.model": 252368},
}


def manifest_case(name: str, edit, error: str) -> None:
    m = copy.deepcopy(BASE)
    edit(m)
    write(f"manifests/{name}.json", json.dumps(m, indent=1).encode())
    expect(f"manifests/{name}.json", error=error)


def _set(path: str, value):
    def edit(m):
        *keys, last = path.split(".")
        d = m
        for k in keys:
            d = d[int(k)] if isinstance(d, list) else d[k]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return edit


def _del(path: str):
    def edit(m):
        *keys, last = path.split(".")
        d = m
        for k in keys:
            d = d[int(k)] if isinstance(d, list) else d[k]
        del d[last]
    return edit


def manifests() -> None:
    write("manifests/valid.json", json.dumps(BASE, indent=1).encode())
    expect("manifests/valid.json", ok=True)
    cases = [
        ("context_1e9", _set("model.max_length", 10**9), "max_length: Input should be less than or equal to"),
        ("context_unlike_checkpoint", _set("model.max_length", 100_000), "differs from the checkpoint's"),
        ("context_string", _set("model.max_length", "320"), "model.max_length: Input should be a valid integer"),
        ("context_bool", _set("model.max_length", True), "model.max_length: Input should be a valid integer"),
        ("context_float", _set("model.max_length", 320.0), "model.max_length: Input should be a valid integer"),
        ("context_negative", _set("model.max_length", -1), "model.max_length: Input should be greater than"),
        ("image_tokens_1e8", _set("model.image_tokens", 10**8), "model.image_tokens: Input should be less than"),
        ("image_tokens_fill_context", _set("model.image_tokens", 320), "leaves no room for text"),
        ("image_tokens_past_encoder", _set("model.image_tokens", 200), "more than the vision encoder's 64"),
        ("layers_past_weights", _set("model.num_layers", 1000), "the largest decoder file holds"),
        ("hidden_past_weights", _set("model.intermediate_size", 200000), "the largest decoder file holds"),
        ("vocab_unlike_table", _set("model.vocab_size", 4096), "holds a 1024 x 256 embedding table"),
        ("heads_not_multiple", _set("model.num_kv_heads", 3), "must be a multiple of num_kv_heads"),
        ("head_dim_odd", _set("model.head_dim", 63), "must be even"),
        ("pad_outside_vocab", _set("model.pad_token_id", 5000), "outside the vocabulary"),
        ("routing_unknown", _set("model.expert_routing", "magic"), "model.expert_routing: Input should be"),
        ("model_missing", _del("model"), "has no model section"),
        ("model_list", _set("model", []), "model: Input should be a valid dictionary"),
        ("tokenizer_no_file", _del("tokenizer.file"), "tokenizer.file: Field required"),
        ("tokenizer_bigger", _set("tokenizer.vocab_size", 5000), "do not fit the model's vocabulary"),
        ("image_size_disagrees", _set("preprocessing.image_size", 224), "differs from model.image_size 96"),
        ("image_size_huge", _set("preprocessing.image_size", 10**6), "preprocessing.image_size: Input should be"),
        ("std_zero", _set("preprocessing.image_std", [0, 0.26, 0.27]), "every image_std must be in"),
        ("mean_two", _set("preprocessing.image_mean", [0.5, 0.5]), "List should have at least 3 items"),
        ("resample_unknown", _set("preprocessing.resample", "magic"), "preprocessing.resample: Input should be"),
        ("template_positional", _set("chat_template.user", "Q: {0}"), "one placeholder {content}"),
        ("template_attribute", _set("chat_template.user", "{content.__class__}"), "one placeholder {content}"),
        ("template_lone_brace", _set("chat_template.user", "Q: {content} {"), "is not a format string"),
        ("template_no_content", _set("chat_template.assistant", "hello"), "one placeholder {content}"),
        ("artifact_size_negative", _set("artifacts.0.size_bytes", -5), "artifact 1 is malformed: size_bytes"),
        ("artifact_size_string", _set("artifacts.0.size_bytes", "12"), "artifact 1 is malformed: size_bytes"),
        ("artifact_sha_short", _set("artifacts.1.sha256", "abc"), "artifact 2 is malformed: sha256"),
        ("artifact_no_part", _del("artifacts.2.part"), "artifact 3 is malformed: part: Field required"),
        ("artifact_part_spaces", _set("artifacts.0.part", "a b"), "artifact 1 is malformed: part"),
        ("artifact_dtype", _set("artifacts.0.inputs", [{"name": "x", "dtype": "float8", "shape": [1]}]),
         "artifact 1 is malformed: inputs.0.dtype"),
        ("artifact_shape_negative", _set("artifacts.0.inputs", [{"name": "x", "dtype": "float32", "shape": [-1]}]),
         "artifact 1 is malformed: inputs.0.shape"),
        ("artifacts_missing", _del("artifacts"), "artifacts: Field required"),
        ("artifacts_dict", _set("artifacts", {}), "artifacts: Input should be a valid list"),
        ("files_list", _set("files", ["a"]), "files: Input should be a valid dictionary"),
        ("file_size_float", _set("file_sizes", {"tokenizer.model": 1.5}), "file_sizes.tokenizer.model"),
        ("kind_other", _set("kind", "something-else"), "is not a vlmexport manifest"),
        ("schema_newer", _set("schema_version", 2), "written by a newer vlmexport"),
        ("schema_string", _set("schema_version", "1"), "unknown schema_version"),
        ("tool_versions_list", _set("tool_versions", ["python"]), "tool_versions: Input should be a valid dict"),
    ]
    for name, edit, err in cases:
        manifest_case(name, edit, err)
    raw = {
        "not_json.json": (b"{not json", "is not valid JSON"),
        "empty.json": (b"", "is not valid JSON"),
        "top_level_list.json": (b"[1, 2, 3]", "is not a vlmexport manifest"),
        "nan.json": (json.dumps(BASE).replace('"max_length": 320', '"max_length": NaN').encode(), "not a JSON number"),
        "infinity.json": (json.dumps(BASE).replace('0.48145466', 'Infinity').encode(), "not a JSON number"),
        "huge_int_literal.json": (json.dumps(BASE).replace('"max_length": 320', '"max_length": ' + "9" * 5000).encode(),
                                  "is not valid JSON"),
        "latin1.json": (json.dumps(BASE).replace("Question", "Qu\u00e9stion").encode("latin-1"), "is not valid JSON"),
        "deep_nesting.json": (json.dumps(BASE)[:-1].encode() + b', "validation": ' + b"[" * 100_000
                              + b"]" * 100_000 + b"}", "nests deeper"),
        "deep_nesting_100.json": (json.dumps(BASE)[:-1].encode() + b', "benchmarks": ' + b'{"a":' * 100 + b"1"
                                  + b"}" * 100 + b"}", "nests deeper than 64"),
    }
    for name, (data, err) in raw.items():
        write(f"manifests/{name}", data)
        expect(f"manifests/{name}", error=err)


# ---------------------------------------------------------------------- gguf / safetensors
def gguf_files() -> None:
    import gguf

    b = io.BytesIO()
    path = ROOT / "gguf" / "valid.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_tensor("tok.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del b
    good = path.read_bytes()
    expect("gguf/valid.gguf", ok=True)
    n_tensors_at, n_kv_at = 8, 16  # magic(4) version(4) n_tensors(8) n_kv(8)
    cases = {
        "truncated_header.gguf": (good[:40], "cannot be read"),
        "truncated_data.gguf": (good[:-100], "truncated"),
        "not_gguf.gguf": (b"GGML" + good[4:], "not a GGUF file"),
        "empty.gguf": (b"", "not a GGUF file"),
        "n_tensors_huge.gguf": (good[:n_tensors_at] + struct.pack("<Q", 2**62) + good[n_tensors_at + 8:],
                                "cannot be read"),
        "n_kv_huge.gguf": (good[:n_kv_at] + struct.pack("<Q", 2**62) + good[n_kv_at + 8:], "cannot be read"),
        "version_99.gguf": (good[:4] + struct.pack("<I", 99) + good[8:], "cannot be read"),
    }
    # general.architecture's type turned from string (8) into array (9): an array of 5 x 2**56 int32s;
    # gguf.GGUFReader looped past the end of the file until out of memory (found by fuzz_atheris.py)
    cases["array_count_huge.gguf"] = (good[:52] + b"\x09" + good[53:], "cannot be read")
    # the first key's length field (right after the header) claims 2**62 bytes
    cases["key_length_huge.gguf"] = (good[:24] + struct.pack("<Q", 2**62) + good[32:], "cannot be read")
    for name, (data, err) in cases.items():
        write(f"gguf/{name}", data)
        expect(f"gguf/{name}", error=err)


def safetensors_files() -> None:
    from safetensors.numpy import save

    good = save({"weight": np.arange(32, dtype=np.float32).reshape(4, 8)})
    write("safetensors/valid.safetensors", good)
    expect("safetensors/valid.safetensors", ok=True)
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])

    def with_header(h: dict) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + good[8 + n:]

    big = copy.deepcopy(header)
    big["weight"]["shape"] = [2**31, 2**31]
    past = copy.deepcopy(header)
    past["weight"]["data_offsets"] = [0, 2**40]
    dtype = copy.deepcopy(header)
    dtype["weight"]["dtype"] = "F7"
    cases = {
        "truncated.safetensors": (good[:-16], "not a valid safetensors file"),
        "header_len_huge.safetensors": (struct.pack("<Q", 2**63) + good[8:], "not a valid safetensors file"),
        "header_not_json.safetensors": (struct.pack("<Q", 5) + b"{nope" + good[8 + n:], "not a valid safetensors"),
        "shape_huge.safetensors": (with_header(big), "not a valid safetensors file"),
        "offsets_past_end.safetensors": (with_header(past), "not a valid safetensors file"),
        "dtype_unknown.safetensors": (with_header(dtype), "not a valid safetensors file"),
        "empty.safetensors": (b"", "not a valid safetensors file"),
    }
    for name, (data, err) in cases.items():
        write(f"safetensors/{name}", data)
        expect(f"safetensors/{name}", error=err)


def main() -> None:
    images()
    manifests()
    gguf_files()
    safetensors_files()
    (ROOT / "expected.json").write_text(json.dumps(EXPECTED, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"{len(EXPECTED)} cases, {total:,} bytes in {ROOT}")


if __name__ == "__main__":
    main()
