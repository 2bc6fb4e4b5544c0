"""Calibration data: real image+prompt pairs, deterministic for a seed, cached on disk.

Sources (never the test split, which the accuracy gates score on):
- the model's own synthetic set, ``SyntheticVQA(seed).sample("val", i)`` (the first
  question of each validation image, prompted exactly as ``vlmexport eval`` does:
  ``Pipeline.prepare([Turn(question, images=1)], [image])``);
- a LLaVA-style JSONL (first question of each conversation), ``--calib data.jsonl``;
- a directory of images (``--calib DIR``): each image's prompt is the text of a sidecar
  ``NAME.txt`` if there is one, else :data:`DEFAULT_PROMPT`.

User data is drawn in a seeded random order. Images that cannot be read (missing,
undecodable, too large) are skipped and counted (the count is logged and stored in the
set's summary, which goes into the manifest); drawing goes on until enough readable
images are found, and if the source runs out first the build stops with the counts.

Defaults: 512 images for the INT8 vision parts (static activation ranges of a ViT need
a few hundred images to stabilise; the usual ViT PTQ recipes use 500-1000) and 64
image+prompt pairs for the decoder (GPTQ / AWQ-style weight-only INT4 converges at
32-128 sequences in the literature; each pair holds ~image_tokens + 20 positions).

A :class:`CalibrationSet` holds preprocessed pixels and the token layouts of the pairs
(input ids, position ids, token types, image mask), stored as one ``.npz`` keyed by a
hash of every setting that changes its content. :func:`activation_stats` keeps the
statistics of the image-token path and the text-token path apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..core.atomic import user_cache_dir
from ..core.errors import ConfigError, DataError, ImageError
from ..core.names import DECODER_ALL_ROWS

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 512  # INT8 vision encoder / connector
DEFAULT_PAIRS = 64  # decoder weight-only INT4/INT8 (data-driven algorithms)
CALIB_SPLIT = "val"
FORMAT_VERSION = 3  # 3: pixels for every pair when pairs > images
HESSIAN_FLUSH_ELEMENTS = 4 << 20  # rows held per MatMul input before one x^T x (16 MB of float32)
DEFAULT_PROMPT = "Describe the image."  # directory sources without a NAME.txt beside the image
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def default_cache_dir() -> Path:
    return user_cache_dir("calibration")


@dataclass(frozen=True)
class CalibrationSettings:
    images: int = DEFAULT_IMAGES
    pairs: int = DEFAULT_PAIRS
    seed: int = 0
    data: str | None = None  # a LLaVA JSONL or a directory of images; None: the synthetic validation split

    def __post_init__(self) -> None:
        if self.images < 1 or self.pairs < 0:
            raise ConfigError(f"calibration needs at least one image (images={self.images}, pairs={self.pairs}); "
                              "pass --calib-images 1 or more")
        if self.data is not None:
            p = Path(self.data)
            if not (p.is_dir() or (p.is_file() and p.suffix.lower() == ".jsonl")):
                raise ConfigError(f"--calib {self.data}: pass a directory of images or a LLaVA-style .jsonl file")


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed pixels [N, 3, S, S] and ``pairs`` token layouts (rows ``offsets[i]:offsets[i+1]``).

    N = max(images, pairs): the vision parts calibrate on the first ``images`` pixels
    (:attr:`vision_pixels`), pair ``i`` uses ``pixels[i]``.
    """

    pixels: np.ndarray
    input_ids: np.ndarray
    position_ids: np.ndarray
    token_type: np.ndarray
    is_image: np.ndarray
    offsets: np.ndarray
    key: str
    source: str
    skipped: int = 0  # unreadable images passed over while drawing the set
    images: int = -1  # how many pixels the vision parts calibrate on; -1: all of them
    media: np.ndarray | None = None  # the image each position reads (a cross-attending decoder's layouts)

    @property
    def vision_pixels(self) -> np.ndarray:
        return self.pixels if self.images < 0 else self.pixels[: self.images]

    @property
    def num_pairs(self) -> int:
        return len(self.offsets) - 1

    def pair(self, i: int) -> dict[str, np.ndarray]:
        """Layout arrays of pair ``i``; its image is ``pixels[i]``."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.input_ids[a:b], "position_ids": self.position_ids[a:b],
                "token_type": self.token_type[a:b], "is_image": self.is_image[a:b],
                "media": None if self.media is None else self.media[a:b]}

    def summary(self) -> dict:
        n_img = int(self.is_image.sum())
        return {"source": self.source, "images": int(self.vision_pixels.shape[0]), "pairs": self.num_pairs,
                "image_positions": n_img, "text_positions": int(self.is_image.size - n_img),
                "skipped_unreadable_images": self.skipped, "key": self.key}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, pixels=self.pixels, input_ids=self.input_ids, position_ids=self.position_ids,
                 token_type=self.token_type, is_image=self.is_image, offsets=self.offsets,
                 **({} if self.media is None else {"media": self.media}),
                 meta=np.frombuffer(json.dumps({"key": self.key, "source": self.source,
                                                "skipped": self.skipped, "images": self.images}).encode(), np.uint8))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "CalibrationSet":
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            return cls(z["pixels"], z["input_ids"], z["position_ids"], z["token_type"], z["is_image"].astype(bool),
                       z["offsets"], meta["key"], meta["source"], int(meta.get("skipped", 0)), int(meta.get("images", -1)),
                       z["media"] if "media" in z.files else None)


def settings_key(settings: CalibrationSettings, identity: dict) -> str:
    """Hash of everything that changes the set's content (settings, preprocessing, template, tokenizer)."""
    blob = json.dumps({"v": FORMAT_VERSION, "split": CALIB_SPLIT, **settings.__dict__, **identity},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _data_identity(data: str | None) -> dict:
    """What makes user data different from before (names, sizes, mtimes), for the cache key."""
    if data is None:
        return {}
    p = Path(data)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"data": str(p.resolve()), "data_files": h.hexdigest()[:16]}


def _questions(settings: CalibrationSettings, image_size: int) -> Iterator[tuple[Callable[[], np.ndarray], str]]:
    """(load image -> HxWx3 uint8, question) candidates in a deterministic order for (seed, data).

    The loaders of user data raise :class:`ImageError` for an unreadable image; the
    synthetic source never runs out.
    """
    if settings.data is not None and Path(settings.data).is_dir():
        files = sorted(f for f in Path(settings.data).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for j in np.random.default_rng(settings.seed).permutation(len(files)):
            f = files[j]
            side = f.with_suffix(".txt")
            q = side.read_text(encoding="utf-8").strip() if side.is_file() else ""
            yield (lambda f=f: _load_image(f, image_size)), q or DEFAULT_PROMPT
        return
    if settings.data is not None:
        from ..data import read_llava_jsonl

        recs = list(read_llava_jsonl(settings.data, check_images=False, require_images=False))
        for j in np.random.default_rng(settings.seed).permutation(len(recs)):
            yield (lambda r=recs[j]: r.load_image(image_size)), recs[j].turns[0][0]
        return
    from ..data import SyntheticVQA

    gen = SyntheticVQA(image_size=image_size, seed=settings.seed)
    i = 0
    while True:
        s = gen.sample(CALIB_SPLIT, i)
        qa = s.qas[i % len(s.qas)]
        yield (lambda img=s.image: img), qa.question
        i += 1


def _load_image(path: Path, image_size: int) -> np.ndarray:
    from ..data import load_image

    return load_image(path, image_size, source=str(path))


def build_calibration(pipeline, settings: CalibrationSettings = CalibrationSettings(),
                      cache_dir: str | os.PathLike | None = None, identity: dict | None = None,
                      progress: Callable[[int, int], None] | None = None) -> CalibrationSet:
    """The calibration set for ``pipeline``'s tokenizer, template and preprocessing (cached).

    Only ``pipeline.prepare`` (tokenize, template, layout, preprocess) is used; no model runs.
    """
    from ..core.prompt import Turn

    pre = pipeline.preprocess_config
    ident = {"preprocess": pre.as_dict(), "template": pipeline.template.to_dict(), "spec": pipeline.spec.__dict__,
             "vocab": pipeline.tokenizer.vocab_size, **(identity or {})}
    key = settings_key(settings, {**ident, **_data_identity(settings.data)})
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"calib-{key}.npz"
    if path.is_file():
        log.info("calibration set %s from cache", key)
        return CalibrationSet.load(path)
    n = max(settings.images, settings.pairs)
    pixels, layouts = [], []
    skipped = 0
    for load, q in _questions(settings, pre.image_size):
        if len(pixels) == n:
            break
        try:
            img = load()
        except ImageError as e:
            skipped += 1
            log.warning("calibration: skipping an unreadable image (%s)", e)
            continue
        layout, px = pipeline.prepare([Turn(user=q, images=1)], [img])
        pixels.append(px[0])
        if len(layouts) < settings.pairs:
            layouts.append(layout)
        if progress is not None:
            progress(len(pixels), n)
    where = settings.data or "the synthetic validation split"
    if not pixels:
        raise DataError(f"the calibration set from {where} is empty ({skipped} unreadable images skipped); "
                        "pass --calib a directory or JSONL with readable images")
    if len(pixels) < n:
        raise DataError(f"only {len(pixels)} readable calibration images in {where} ({skipped} unreadable skipped), "
                        f"{n} needed; add images or lower --calib-images/--calib-pairs to {len(pixels)} or fewer")
    if skipped:
        log.warning("calibration: %d unreadable images skipped in %s; %d used", skipped, where, len(pixels))
    cat = lambda f, dt: (np.concatenate([np.asarray(f(lo), dt) for lo in layouts])  # noqa: E731
                         if layouts else np.zeros(0, dt))
    offsets = np.cumsum([0] + [len(lo) for lo in layouts]).astype(np.int64)
    source = settings.data or f"synthetic:{CALIB_SPLIT}:seed{settings.seed}"
    cs = CalibrationSet(np.stack(pixels).astype(np.float32),  # max(images, pairs): every pair has its image
                        cat(lambda lo: lo.input_ids, np.int64), cat(lambda lo: lo.position_ids, np.int64),
                        cat(lambda lo: lo.token_type, np.int64), cat(lambda lo: lo.is_image, bool), offsets, key,
                        source, skipped, settings.images, cat(lambda lo: lo.media, np.int64))
    cs.save(path)
    return cs


# ------------------------------------------------------------------- readers
class _Reader:
    """An onnxruntime ``CalibrationDataReader`` over a list of feeds (re-iterable via ``rewind``)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def pixel_reader(cs: CalibrationSet, batch: int = 8, dtype=np.float32) -> _Reader:
    px = cs.vision_pixels.astype(dtype)
    return _Reader([{"pixel_values": px[i:i + batch]} for i in range(0, len(px), batch)])


def feature_reader(encode: Callable[[np.ndarray], np.ndarray], cs: CalibrationSet, batch: int = 8) -> _Reader:
    """Connector inputs: the (fp32) vision encoder's outputs on the calibration pixels."""
    px = cs.vision_pixels
    return _Reader([{"image_features": np.asarray(encode(px[i:i + batch]), np.float32)}
                    for i in range(0, len(px), batch)])


def decoder_feeds(cs: CalibrationSet, embedding: np.ndarray, image_embeds: Callable[[np.ndarray], np.ndarray], facts,
                  dtype=np.float32) -> _Reader:
    """Full-graph feeds (empty past) of the text decoder for every calibration pair.

    ``embedding`` is the token table; ``image_embeds(pixels)`` runs the
    (fp32) vision parts. The decoder routes rows by ``token_type`` with Gathers, so a visual
    expert's MatMul sees image-token rows only and a language expert's text-token rows only:
    a data-driven algorithm fed these feeds calibrates each expert on its own modality.
    """
    feeds = []
    for i in range(cs.num_pairs):
        p = cs.pair(i)
        emb = np.take(embedding, p["input_ids"], axis=0).astype(np.float32)
        images = np.asarray(image_embeds(cs.pixels[i:i + 1]))
        n = len(p["input_ids"])
        f = {"position_ids": p["position_ids"][None], "token_type": p["token_type"][None],
             "attention_mask": np.ones((1, n), np.int64)}
        if p["media"] is not None and not p["is_image"].any() and (p["media"] >= 0).any():
            # a cross-attending decoder: the image is its memory, the placeholder stays text
            f.update(cross_attention_memory=images.reshape(1, -1, images.shape[-1]).astype(dtype),
                     media=p["media"][None])
        else:
            emb[p["is_image"]] = images.reshape(-1, facts.hidden_size)
        f["inputs_embeds"] = emb[None].astype(dtype)
        f[DECODER_ALL_ROWS] = np.array(1, np.int64)  # the last layer's MLP sees every position, as the others do
        for layer in range(facts.num_layers):
            for kind in ("key", "value"):
                f[f"past_key_values.{layer}.{kind}"] = np.zeros((1, facts.num_kv_heads, 0, facts.head_dim), dtype)
        feeds.append(f)
    return _Reader(feeds)


def nonfinite_error(part: str, where: str, batch: int) -> DataError:
    """``where``: e.g. "the output of node 'n_MatMul_65' (MatMul on ...fc1.weight)"."""
    return DataError(f"{part}: NaN/inf activations during calibration at {where} (calibration batch {batch}); "
                     "the fp32 model overflows or holds NaN/inf weights on this data: check the checkpoint's "
                     "weights, or calibrate on other data (--calib)")


class _DeclaredInputs:
    """A session run on the feeds its graph declares: decoder calibration feeds carry every
    input a text decoder may take, and one without experts (llava, blip2) has no ``token_type``
    (nor a decoder exported before ``last_layer_all_rows``, an overridable initializer, existed)."""

    def __init__(self, sess):
        self.sess = sess
        self.inputs = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}

    def run(self, outputs, feed):
        return self.sess.run(outputs, {k: v for k, v in feed.items() if k in self.inputs})


@contextlib.contextmanager
def _session_with_outputs(model_path: str | os.PathLike, names_of: Callable, threads: int = 1):
    """An onnxruntime CPU session of ``model_path`` that also returns ``names_of(model)`` as
    outputs (a sibling file, so external data resolves; removed afterwards); ``threads`` 0:
    onnxruntime's default (one per core)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path), load_external_data=False)
    names = list(dict.fromkeys(names_of(m)))
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    tmp = Path(model_path).with_name(Path(model_path).stem + ".stats.onnx")
    onnx.save(m, str(tmp))  # external data stays where it is (same directory, same relative location)
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        yield _DeclaredInputs(ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])), names, m
    finally:
        tmp.unlink(missing_ok=True)


def first_nonfinite(model_path: str | os.PathLike, reader: _Reader) -> tuple[str, int] | None:
    """(where, batch) for the first node, in graph order, whose output holds NaN/inf on the
    calibration feeds (``where`` names the node, its weight and the tensor); None if every
    activation is finite. Used to name the layer when a quantizer meets non-finite ranges
    (it runs every node's output once)."""
    with _session_with_outputs(model_path, lambda m: [o for n in m.graph.node for o in n.output if o]) as (
            sess, names, m):
        inits = {i.name for i in m.graph.initializer}

        def label(n):  # the weight names the layer where exporters number their nodes (n_MatMul_65)
            w = next((i for i in n.input if i in inits and "weight" in i), None)
            return f"node '{n.name or n.op_type}' ({n.op_type}{f' on {w}' if w else ''})"

        producer = {o: label(n) for n in m.graph.node for o in n.output}
        reader.rewind()
        for b, feed in enumerate(reader):
            for name, v in zip(names, sess.run(names, feed)):
                v = np.asarray(v)
                if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
                    return f"the output {name} of {producer[name]}", b
    return None


def activation_stats(model_path: str | os.PathLike, reader: _Reader, token_type_of: Callable[[dict], np.ndarray]
                     | None = None) -> dict[str, dict]:
    """Per-MatMul input statistics of a routed decoder, split by modality.

    Every MatMul input is added as a graph output and the calibration feeds are run; the
    rows a MatMul sees are already one modality (routing gathers them), which is recorded
    as ``"image"`` for ``.vision.`` nodes and ``"text"`` otherwise. Returns
    ``{node: {"modality", "rows", "absmax" [in], "mean_sq" [in]}}`` (``mean_sq`` is the
    per-input-channel second moment AWQ-style scaling uses). NaN/inf inputs raise
    :class:`DataError` naming the node.
    """
    targets: dict[str, str] = {}

    def names_of(m):
        inits = {i.name for i in m.graph.initializer}
        targets.update({n.name: n.input[0] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits})
        return list(targets.values())

    acc: dict[str, list] = {}
    with _session_with_outputs(model_path, names_of) as (sess, outs, _):
        reader.rewind()
        for b, feed in enumerate(reader):  # the session reads the inputs its graph declares (_DeclaredInputs)
            vals = dict(zip(outs, sess.run(outs, feed)))
            for node, inp in targets.items():
                v = vals[inp].reshape(-1, vals[inp].shape[-1]).astype(np.float64)
                if not np.all(np.isfinite(v)):
                    raise nonfinite_error(Path(model_path).stem, f"the input {inp} of node '{node}'", b)
                a = acc.setdefault(node, [0, np.zeros(v.shape[1]), np.zeros(v.shape[1])])
                a[0] += v.shape[0]
                if v.shape[0]:
                    a[1] = np.maximum(a[1], np.abs(v).max(0))
                    a[2] += (v * v).sum(0)
    from ..core.names import onnx_is_visual_expert as is_visual_expert

    return {node: {"modality": "image" if is_visual_expert(node) else "text", "rows": int(r),
                   "absmax": mx.astype(np.float32), "mean_sq": (sq / max(r, 1)).astype(np.float32)}
            for node, (r, mx, sq) in acc.items()}


def input_hessians(model_path: str | os.PathLike, reader: _Reader, nodes: Sequence[str],
                   budget_bytes: int = 2 << 30) -> dict[str, np.ndarray]:
    """``{node: sum x x^T}`` [in, in] (float32) over the rows each named MatMul sees on the
    calibration feeds: what GPTQ weighs rounding errors with (:mod:`.gptq`, which lifts each
    matrix to float64 for its Cholesky factors).

    The decoder routes rows by expert, so a visual expert's Hessian comes from image-token
    rows only and a language expert's from text-token rows only. MatMuls reading the same
    tensor share one matrix. The feeds are run once per group of inputs whose matrices fit in
    ``budget_bytes`` (a bench-s decoder's take 1.4 GB: one pass), which bounds each pass;
    every pass's matrices are returned together, so the caller holds the sum of them all
    (~44 GB for a CogVLM-17B decoder: use rtn there). Rows are buffered and folded in by one
    float32 GEMM per ``HESSIAN_FLUSH_ELEMENTS``; a float32 sum of that few terms is far below
    GPTQ's 1% damping. NaN/inf inputs raise :class:`DataError` naming the node.
    """
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in m.graph.initializer}
    want = set(nodes)
    input_of = {n.name: n.input[0] for n in m.graph.node
                if n.name in want and n.op_type == "MatMul" and len(dims.get(n.input[1], ())) == 2}
    missing = sorted(want - set(input_of))
    if missing:
        raise ConfigError(f"no MatMul with a 2-D weight named {missing[0]!r} in {Path(model_path).name}")
    size = {n.input[0]: dims[n.input[1]][0] for n in m.graph.node if n.name in input_of}
    del m
    passes: list[list[str]] = [[]]
    used = 0
    for name in dict.fromkeys(input_of.values()):
        b = size[name] ** 2 * 4
        if passes[-1] and used + b > budget_bytes:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += b
    node_of = {inp: node for node, inp in input_of.items()}  # one node per input, to name it in errors
    acc: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for group in passes:
        with _session_with_outputs(model_path, lambda _m: group, threads=0) as (sess, outs, _):
            h = {name: np.zeros((size[name], size[name]), np.float32) for name in outs}
            held: dict[str, list[np.ndarray]] = {name: [] for name in outs}  # rows not yet in h

            def flush(name: str) -> None:  # one GEMM over several batches' rows
                if held[name]:
                    x = np.concatenate(held[name])
                    h[name] += x.T @ x
                    held[name].clear()

            reader.rewind()
            for b, feed in enumerate(reader):  # a feed may carry more (token_type): _DeclaredInputs drops it
                for name, v in zip(outs, sess.run(outs, feed)):
                    x = np.asarray(v, np.float32).reshape(-1, size[name])
                    if not np.all(np.isfinite(x)):
                        raise nonfinite_error(Path(model_path).stem, f"the input {name} of node '{node_of[name]}'", b)
                    held[name].append(x)
                    if sum(len(r) for r in held[name]) * size[name] >= HESSIAN_FLUSH_ELEMENTS:
                        flush(name)
            for name in outs:
                flush(name)
            acc.update(h)
    for name, m in acc.items():
        if not m.any():
            raise ConfigError(f"GPTQ: the MatMul '{node_of[name]}' saw no calibration rows (or only zeros); give "
                              "more --calib-pairs (with images for visual-expert layers) or use --int4-algorithm rtn")
    log.info("GPTQ Hessians: %d MatMul inputs (%.2f GB) in %d pass(es) over the calibration feeds, %.0f s",
             len(acc), sum(m.nbytes for m in acc.values()) / 1e9, len(passes), time.perf_counter() - t0)
    return {node: acc[inp] for node, inp in input_of.items()}
