"""Tests for the synthetic VQA generator and the LLaVA-style JSONL reader/writer."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from vlmexport.core.errors import DataError, ImageError
from vlmexport.data import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    WORDS,
    ConversationRecord,
    SyntheticVQA,
    load_image,
    read_llava_jsonl,
    write_llava_jsonl,
)
from vlmexport.data import render
from vlmexport.data.synthetic import GRID, questions, spec_digest, split_of_digest

VOCAB = SyntheticVQA.answer_vocabulary()


@pytest.fixture(scope="module")
def gen96():
    return SyntheticVQA(image_size=96, seed=0)


@pytest.fixture(scope="module")
def gen64():
    return SyntheticVQA(image_size=64, seed=0)


@pytest.fixture(scope="module")
def train_samples(gen64):
    return list(gen64.samples("train", 400))


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_samples():
    a, b = SyntheticVQA(96, seed=3), SyntheticVQA(96, seed=3)
    for i in (0, 1, 7, 123):
        for split in ("train", "test"):
            sa, sb = a.sample(split, i), b.sample(split, i)
            assert sa.image_id == sb.image_id
            assert np.array_equal(sa.image, sb.image)
            assert sa.qas == sb.qas
            assert sa == sb


def test_different_seed_differs():
    a, b = SyntheticVQA(96, seed=0), SyntheticVQA(96, seed=1)
    differ = sum(not np.array_equal(a.sample("train", i).image, b.sample("train", i).image)
                 for i in range(20))
    assert differ == 20


def test_index_and_split_change_sample(gen64):
    assert not np.array_equal(gen64.sample("train", 0).image, gen64.sample("train", 1).image)
    assert gen64.sample("train", 5).image_id != gen64.sample("test", 5).image_id


@pytest.mark.parametrize("size", [64, 96])
def test_image_shape_dtype(size):
    gen = SyntheticVQA(image_size=size, seed=0)
    kinds = set()
    for s in gen.samples("val", 30):
        assert s.image.shape == (size, size, 3)
        assert s.image.dtype == np.uint8
        assert s.split == "val"
        assert re.fullmatch(r"val-(scene|text|chart)-\d{6}", s.image_id)
        kinds.add(s.image_id.split("-")[1])
        assert s.qas, s.image_id
    assert kinds == {"scene", "text", "chart"}


def test_same_scene_at_every_resolution():
    # The spec is resolution independent: 64 px and 96 px show the same scene.
    a, b = SyntheticVQA(64, seed=0), SyntheticVQA(96, seed=0)
    for i in range(10):
        assert a.spec("train", i) == b.spec("train", i)
        assert a.sample("train", i).qas == b.sample("train", i).qas


def test_invalid_arguments(gen64):
    with pytest.raises(ValueError):
        gen64.sample("dev", 0)
    with pytest.raises(ValueError):
        gen64.sample("train", -1)
    with pytest.raises(ValueError):
        SyntheticVQA(image_size=8)
    with pytest.raises(ValueError):
        gen64.eval_items("test", 3)  # existence pairs need an even count


# --------------------------------------------------------------------------- splits


def test_splits_disjoint(gen64):
    train_hashes, train_pixels = set(), set()
    for i in range(2000):
        spec, digest = gen64._spec("train", i)
        assert split_of_digest(digest) == "train"
        train_hashes.add(digest)
        train_pixels.add(gen64.sample("train", i).image.tobytes())
    for split in ("test", "val"):
        for i in range(300 if split == "test" else 100):
            digest = gen64.spec_hash(split, i)
            assert split_of_digest(digest) == split
            assert digest not in train_hashes
            assert gen64.sample(split, i).image.tobytes() not in train_pixels


def test_spec_hash_is_canonical(gen64):
    spec = gen64.spec("test", 4)
    reordered = json.loads(json.dumps(dict(reversed(list(spec.items())))))
    assert spec_digest(reordered) == gen64.spec_hash("test", 4)


# --------------------------------------------------------------------------- content


def test_every_category_with_advertised_answers(train_samples):
    seen = defaultdict(set)
    for s in train_samples:
        for qa in s.qas:
            assert qa.category in CATEGORIES
            assert qa.answer in VOCAB[qa.category], qa
            assert qa.kind == ("yesno" if qa.category == "existence" else "open")
            if qa.category != "reading":
                assert qa.answer == qa.answer.lower()
            seen[qa.category].add(qa.answer)
    assert set(seen) == set(CATEGORIES)
    assert seen["colour"] == set(COLOURS)
    assert seen["shape"] == set(SHAPES)
    assert seen["count"] == {"1", "2", "3", "4", "5"}
    assert seen["position"] == {"left", "right", "above", "below"}
    assert seen["existence"] == {"yes", "no"}
    assert seen["chart"] == set(COLOURS)


def test_image_kind_mix(gen64):
    kinds = Counter(gen64.spec("train", i)["kind"] for i in range(2000))
    share = {k: v / 2000 for k, v in kinds.items()}
    assert abs(share["scene"] + share["count"] - 0.6) < 0.05
    assert abs(share["text"] - 0.2) < 0.04
    assert abs(share["chart"] - 0.2) < 0.04


def _objects_by_name(spec):
    return {f"{o['colour']} {o['shape']}": o for o in spec["objects"]}


def test_scene_questions_are_correct(gen64):
    for i in range(300):
        spec = gen64.spec("train", i)
        if spec["kind"] not in ("scene", "count"):
            continue
        objs = spec["objects"]
        assert 1 <= len(objs) <= 6
        for o in objs:  # inside the canvas, 12-22 % of the side
            assert 0.12 * GRID <= o["s"] <= 0.22 * GRID
            assert o["x"] - o["s"] / 2 >= 0 and o["x"] + o["s"] / 2 <= GRID
            assert o["y"] - o["s"] / 2 >= 0 and o["y"] + o["s"] / 2 <= GRID
        for a in range(len(objs)):  # non-overlapping boxes
            for b in range(a + 1, len(objs)):
                p, q = objs[a], objs[b]
                half = (p["s"] + q["s"]) / 2
                assert abs(p["x"] - q["x"]) >= half or abs(p["y"] - q["y"]) >= half
        shapes = Counter(o["shape"] for o in objs)
        colours = Counter(o["colour"] for o in objs)
        names = _objects_by_name(spec)
        combos = Counter(f"{o['colour']} {o['shape']}" for o in objs)
        for qa in questions(spec):
            if qa.category == "colour":
                shape = re.fullmatch(r"What colour is the (\w+)\?", qa.question).group(1)
                assert shapes[shape] == 1
                assert qa.answer == next(o["colour"] for o in objs if o["shape"] == shape)
            elif qa.category == "shape":
                colour = re.fullmatch(r"What shape is the (\w+) object\?", qa.question).group(1)
                assert colours[colour] == 1
                assert qa.answer == next(o["shape"] for o in objs if o["colour"] == colour)
            elif qa.category == "count":
                plural = re.fullmatch(r"How many (\w+) are there\?", qa.question).group(1)
                shape = next(s for s in SHAPES if render.SHAPE_PLURALS[s] == plural)
                assert qa.answer == str(shapes[shape])
            elif qa.category == "position":
                m = re.fullmatch(r"Is the (\w+ \w+) (?:to the left or to the right of|above or "
                                 r"below) the (\w+ \w+)\?", qa.question)
                a, b = m.group(1), m.group(2)
                assert combos[a] == 1 and combos[b] == 1
                axis = "x" if "left" in qa.question else "y"
                pa, pb = names[a][axis], names[b][axis]
                assert abs(pa - pb) >= 0.25 * GRID
                expected = {("x", True): "left", ("x", False): "right",
                            ("y", True): "above", ("y", False): "below"}[(axis, pa < pb)]
                assert qa.answer == expected
            elif qa.category == "existence":
                m = re.fullmatch(r"Is there an? (\w+ \w+) in the image\? Please answer yes or no\.",
                                 qa.question)
                assert qa.answer == ("yes" if combos[m.group(1)] else "no")


def test_existence_pair_per_scene(gen64, train_samples):
    n_hard = n_pairs = 0
    for i, s in enumerate(train_samples):
        ex = [qa for qa in s.qas if qa.category == "existence"]
        if s.image_id.split("-")[1] != "scene":
            assert not ex
            continue
        assert sorted(qa.answer for qa in ex) == ["no", "yes"]
        n_pairs += 1
        objs = gen64.spec("train", i)["objects"]
        no = next(qa.question for qa in ex if qa.answer == "no")
        colour, shape = re.search(r"Is there an? (\w+) (\w+)", no).groups()
        n_hard += any(o["colour"] == colour or o["shape"] == shape for o in objs)
    assert n_pairs > 100
    assert n_hard / n_pairs > 0.7  # hard negatives preferred


def test_position_answers_balanced(train_samples):
    counts = Counter(qa.answer for s in train_samples for qa in s.qas if qa.category == "position")
    total = sum(counts.values())
    assert total > 200
    for ans in ("left", "right", "above", "below"):
        assert 0.18 < counts[ans] / total < 0.32, counts


def test_reading_answers(gen64):
    n_words = n_numbers = 0
    for i in range(400):
        spec = gen64.spec("train", i)
        if spec["kind"] != "text":
            continue
        (qa,) = questions(spec)
        assert qa.category == "reading" and qa.answer == spec["text"]
        if "number" in qa.question:
            n_numbers += 1
            assert qa.answer.isdigit() and 0 <= int(qa.answer) <= 999 and str(int(qa.answer)) == qa.answer
        else:
            n_words += 1
            assert qa.answer in WORDS
        assert spec["size"] >= 0.3 * GRID  # font size >= 30 % of the image height
    assert n_words > 20 and n_numbers > 20
    assert all(3 <= len(w) <= 6 and w == w.lower() for w in WORDS) and len(set(WORDS)) >= 45


def test_text_is_dark_and_inside(gen64):
    checked = 0
    for s in gen64.samples("train", 150):
        if "-text-" not in s.image_id:
            continue
        lum = s.image.astype(np.float32).mean(axis=2)
        dark = lum < 120
        assert dark.sum() > 40, s.image_id  # legible amount of ink
        assert not dark[:2].any() and not dark[-2:].any()
        assert not dark[:, :2].any() and not dark[:, -2:].any()
        rows = np.nonzero(dark.any(axis=1))[0]
        assert rows[-1] - rows[0] + 1 >= 0.15 * 64  # glyphs are not tiny
        checked += 1
    assert checked > 10


def test_objects_visible_against_background(gen64):
    for i in range(100):
        spec = gen64.spec("train", i)
        if spec["kind"] not in ("scene", "count"):
            continue
        img = gen64.sample("train", i).image.astype(int)
        bg = np.array(spec["bg"])
        for o in spec["objects"]:
            x, y = int(o["x"] / GRID * 64), int(o["y"] / GRID * 64)
            assert np.abs(img[y, x] - bg).max() > 60, (i, o)


def test_chart_margins(gen64):
    n = 0
    for i in range(300):
        spec = gen64.spec("train", i)
        if spec["kind"] != "chart":
            continue
        n += 1
        heights = sorted(h for _, h in spec["bars"])
        colours = [c for c, _ in spec["bars"]]
        assert 3 <= len(heights) <= 5 and len(set(colours)) == len(colours)
        assert heights[-1] - heights[-2] >= 0.12 * heights[-1]
        assert heights[1] - heights[0] >= 0.12 * heights[-1]
        qas = {qa.question: qa.answer for qa in questions(spec)}
        assert qas["Which bar is the tallest?"] == max(spec["bars"], key=lambda b: b[1])[0]
        assert qas["Which bar is the shortest?"] == min(spec["bars"], key=lambda b: b[1])[0]
    assert n > 30


# --------------------------------------------------------------------------- eval items


@pytest.fixture(scope="module")
def eval_items(gen64):
    return gen64.eval_items("test", 40)


def test_eval_items_sizes_and_balance(eval_items):
    cats = Counter(it.category for it in eval_items)
    assert cats == {c: 40 for c in CATEGORIES}
    by_cat = defaultdict(Counter)
    for it in eval_items:
        key = ("number" if "number" in it.question else "word") if it.category == "reading" else it.answer
        by_cat[it.category][key] += 1
        assert it.image.shape == (64, 64, 3) and it.image_id.startswith("test-")
    assert by_cat["count"] == {str(k): 8 for k in range(1, 6)}
    assert by_cat["position"] == {a: 10 for a in ("left", "right", "above", "below")}
    assert by_cat["colour"] == {c: 5 for c in COLOURS}
    assert by_cat["existence"] == {"yes": 20, "no": 20}
    assert by_cat["reading"] == {"word": 20, "number": 20}
    assert by_cat["chart"] == {c: 5 for c in COLOURS}
    assert Counter(it.question for it in eval_items if it.category == "chart") == {
        "Which bar is the tallest?": 20, "Which bar is the shortest?": 20}
    assert max(by_cat["shape"].values()) - min(by_cat["shape"].values()) <= 1


def test_eval_items_one_open_question_per_image(eval_items):
    seen = Counter((it.image_id, it.category) for it in eval_items if it.kind == "open")
    assert max(seen.values()) == 1
    assert all(it.pair_id is None for it in eval_items if it.kind == "open")


def test_eval_items_existence_pairs(eval_items):
    pairs = defaultdict(list)
    for it in eval_items:
        if it.category == "existence":
            assert it.kind == "yesno" and it.pair_id
            pairs[it.pair_id].append(it)
    assert len(pairs) == 20
    for items in pairs.values():
        assert len(items) == 2
        assert sorted(it.answer for it in items) == ["no", "yes"]
        assert items[0].image_id == items[1].image_id
        assert np.array_equal(items[0].image, items[1].image)
        assert items[0].question != items[1].question


def test_eval_items_deterministic_and_match_samples(gen64, eval_items):
    again = gen64.eval_items("test", 40)
    assert again == eval_items
    it = eval_items[0]
    index = int(it.image_id.rsplit("-", 1)[1])
    sample = gen64.sample("test", index)
    assert np.array_equal(sample.image, it.image)
    assert any(qa.question == it.question and qa.answer == it.answer for qa in sample.qas)


def test_corpus_and_vocabulary(gen64):
    corpus = gen64.corpus(50)
    assert corpus and all(isinstance(t, str) and t for t in corpus)
    assert any("colour" in t for t in corpus) and any(t in COLOURS for t in corpus)
    assert corpus == gen64.corpus(50)
    vocab = SyntheticVQA.answer_vocabulary()
    assert set(vocab) == set(CATEGORIES)
    assert vocab["count"] == ["1", "2", "3", "4", "5"]
    assert len(vocab["reading"]) == len(WORDS) + 1000


# --------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path, gen64):
    samples = list(gen64.samples("train", 12))
    jsonl = write_llava_jsonl(samples, tmp_path / "ds")
    assert jsonl == tmp_path / "ds" / "data.jsonl"
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    first = json.loads(lines[0])
    assert first["image"] == f"images/{samples[0].image_id}.png"
    conv = first["conversations"]
    assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
    assert all("<image>" not in t["value"] for t in conv[1:])
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)

    records = list(read_llava_jsonl(jsonl))
    assert len(records) == 12
    for sample, rec in zip(samples, records):
        assert isinstance(rec, ConversationRecord)
        assert rec.id == sample.image_id
        assert rec.turns == tuple((qa.question, qa.answer) for qa in sample.qas)
        assert rec.categories == tuple(qa.category for qa in sample.qas)
        assert np.array_equal(load_image(rec.image_path, 64), sample.image)
        assert np.array_equal(rec.load_image(64), sample.image)
        assert load_image(rec.image_path, 32).shape == (32, 32, 3)


def test_jsonl_questions_per_image(tmp_path, gen64):
    samples = [s for s in gen64.samples("train", 20) if len(s.qas) > 3]
    write_llava_jsonl(samples, tmp_path, questions_per_image=2)
    records = list(read_llava_jsonl(tmp_path / "data.jsonl"))
    for sample, rec in zip(samples, records):
        assert len(rec.turns) == 2
        pairs = [(qa.question, qa.answer) for qa in sample.qas]
        assert all(t in pairs for t in rec.turns)


def test_jsonl_image_root_and_rgba(tmp_path):
    imgs = tmp_path / "elsewhere"
    imgs.mkdir()
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :10, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(imgs / "a.png")
    jsonl = tmp_path / "d.jsonl"
    rec = {"id": 1, "image": "a.png", "conversations": [
        {"from": "user", "value": "What?\n<image>"}, {"from": "assistant", "value": "red"}]}
    jsonl.write_text(json.dumps(rec) + "\n\n", encoding="utf-8")
    (r,) = read_llava_jsonl(jsonl, image_root=imgs)
    assert r.id == "1" and r.turns == (("What?", "red"),)
    img = r.load_image(16)
    assert img.shape == (16, 16, 3)
    assert tuple(img[8, 2]) == (200, 0, 0) and tuple(img[8, 14]) == (255, 255, 255)


def _good_line(image="img.png"):
    return json.dumps({"id": "x", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]})


@pytest.fixture()
def data_dir(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "img.png")
    return tmp_path


def _write(data_dir, lines, name="broken.jsonl"):
    path = data_dir / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_LINES = {
    "invalid_json": '{"id": "x", "image": ',
    "not_object": '["a", "b"]',
    "no_image": json.dumps({"id": "x", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}),
    "no_conversations": json.dumps({"id": "x", "image": "img.png"}),
    "odd_turns": json.dumps({"image": "img.png", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"}]}),
    "wrong_roles": json.dumps({"image": "img.png", "conversations": [
        {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}),
    "non_string_value": json.dumps({"image": "img.png", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": 3}]}),
    "empty_list": json.dumps({"image": "img.png", "conversations": []}),
    "missing_image_file": _good_line("nope/missing.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_jsonl_errors_name_file_and_line(data_dir, case):
    path = _write(data_dir, [_good_line(), BAD_LINES[case]])
    with pytest.raises(DataError) as info:
        list(read_llava_jsonl(path))
    msg = str(info.value)
    assert "broken.jsonl" in msg and "line 2" in msg, msg
    assert "\n" not in msg
    if case == "missing_image_file":
        assert isinstance(info.value, ImageError) and "missing.png" in msg


def test_jsonl_file_missing(tmp_path):
    with pytest.raises(DataError, match="absent.jsonl"):
        list(read_llava_jsonl(tmp_path / "absent.jsonl"))


def test_undecodable_image(data_dir):
    (data_dir / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    path = _write(data_dir, [_good_line(), _good_line("garbage.png")])
    with pytest.raises(ImageError) as info:
        list(read_llava_jsonl(path))
    assert "broken.jsonl" in str(info.value) and "line 2" in str(info.value)
    assert "garbage.png" in str(info.value)
    with pytest.raises(ImageError, match="garbage.png"):
        load_image(data_dir / "garbage.png", 32)


def test_truncated_image_fails_on_load(data_dir):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        data_dir / "big.png")
    data = (data_dir / "big.png").read_bytes()
    (data_dir / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"trunc\.png"):
        load_image(data_dir / "trunc.png", 32, source="set.jsonl:7")
    with pytest.raises(ImageError, match=r"set\.jsonl:7"):
        load_image(data_dir / "trunc.png", 32, source="set.jsonl:7")
    with pytest.raises(ImageError, match=r"missing\.png"):
        load_image(data_dir / "missing.png", 32)


@pytest.mark.parametrize("limit", [1000, 3000])  # 64x64 = 4096 px: error (> 2x limit) / warning
def test_decompression_bomb(data_dir, monkeypatch, limit):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data_dir / "bomb.png")
    path = _write(data_dir, [_good_line(), _good_line("bomb.png")])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError) as info:
        list(read_llava_jsonl(path))
    msg = str(info.value)
    assert "broken.jsonl" in msg and "line 2" in msg and "bomb.png" in msg
    assert "decompression-bomb" in msg
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(data_dir / "bomb.png", 32)


def test_jsonl_images_are_decoded_as_the_runtime_decodes_them(tmp_path):
    """Training reads a record's image with core.preprocess.open_image: a 16-bit PNG is scaled
    (not clipped to white), transparency lands on white, an animation is refused."""
    from vlmexport.core.preprocess import open_image

    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 63).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # uint16 -> a 16-bit greyscale PNG
    got = load_image(tmp_path / "deep.png", 32)
    assert np.array_equal(got, np.asarray(open_image(tmp_path / "deep.png")))
    assert 0 < got.mean() < 255 and len(np.unique(got)) > 100  # a ramp, not a white square
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png", 32) == 255).all()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="anim.gif"):
        load_image(tmp_path / "anim.gif", 32, source="data.jsonl:3")
