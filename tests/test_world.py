"""The synthetic world: determinism, LLaVA manifest layout, correct QA, exact patch ground truth."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sea_ray.world import generator as W

SEED = 7
N = 200
SIZE = 64


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    W.generate_world(out, N, SEED, image_size=SIZE)
    return out


@pytest.fixture(scope="module")
def records(world) -> dict[str, dict]:
    return {r["id"]: r for r in W.load_ground_truth(world / "ground_truth.parquet")}


def _load(world: Path, split: str, name: str):
    if name == "qa.jsonl":
        return [json.loads(line) for line in (world / split / name).read_text().splitlines()]
    with open(world / split / name) as f:
        return json.load(f)


# --------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_files(world, tmp_path):
    summary = W.generate_world(tmp_path, N, SEED, image_size=SIZE)
    first, second = _hashes(world), _hashes(tmp_path)
    assert len(first) == N + 3 * 3 + 2
    assert first == second
    assert summary["out_dir"] == str(tmp_path)


def test_different_seed_gives_different_world(world, tmp_path):
    W.generate_world(tmp_path, N, SEED + 1, image_size=SIZE)
    first, second = _hashes(world), _hashes(tmp_path)
    assert first.keys() == second.keys()
    differing = [k for k in first if first[k] != second[k]]
    assert sum(k.startswith("images/") for k in differing) > N * 0.9
    assert "ground_truth.parquet" in differing and "train/pretrain.json" in differing


def test_image_does_not_depend_on_world_size_or_splits(world, records, tmp_path):
    W.generate_world(tmp_path, 12, SEED, image_size=SIZE, splits=(0.5, 0.25, 0.25))
    for record in W.load_ground_truth(tmp_path):
        big = dict(records[record["id"]])
        assert {**record, "split": None} == {**big, "split": None}
        assert (tmp_path / "images" / record["image"]).read_bytes() == \
            (world / "images" / record["image"]).read_bytes()


def test_stored_record_rerenders_the_png_exactly(world, records):
    for record in list(records.values())[:20]:
        png = np.asarray(Image.open(world / "images" / record["image"]))
        assert png.shape == (SIZE, SIZE, 3) and png.dtype == np.uint8
        np.testing.assert_array_equal(png, W.render_image(record))
        sampled = W.sample_record(SEED, int(record["id"].split("_")[1]), SIZE)
        assert {**sampled, "split": record["split"]} == record


# --------------------------------------------------------------------------- splits and files


def test_split_counts_add_up(world, records):
    meta = json.loads((world / "world.json").read_text())
    assert meta["counts"] == {"train": 160, "val": 20, "test": 20}
    assert sum(meta["counts"].values()) == N == meta["num_images"]
    assert meta["seed"] == SEED and meta["image_size"] == SIZE and meta["words"] == W.world_words()
    for split in W.SPLITS:
        ids = [s["id"] for s in _load(world, split, "pretrain.json")]
        assert len(ids) == meta["counts"][split]
        assert all(records[i]["split"] == split for i in ids)
        assert len(_load(world, split, "qa.jsonl")) == meta["num_qa"][split]
    assert Counter(r["split"] for r in records.values()) == meta["counts"]
    assert len(list((world / "images").glob("*.png"))) == N
    for n in (1, 2, 3, 10, 11, 999):
        counts = W.split_counts(n, (0.8, 0.1, 0.1))
        assert sum(counts.values()) == n and min(counts.values()) >= 0
    assert W.split_counts(10, (1, 0, 0)) == {"train": 10, "val": 0, "test": 0}


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        W.generate_world(tmp_path, 10, 0, image_size=SIZE, splits=(0.5, 0.5))
    with pytest.raises(ValueError, match="seed"):
        W.generate_world(tmp_path, 10, -1, image_size=SIZE)
    with pytest.raises(ValueError, match="image_size"):
        W.generate_world(tmp_path, 10, 0, image_size=16)
    with pytest.raises(ValueError, match="grid"):
        W.patch_owner(W.sample_record(0, 0, SIZE), SIZE + 1, 4)


def test_ensure_world_reuses_a_matching_world(tmp_path):
    first = W.ensure_world(tmp_path, 10, 3, image_size=SIZE)
    marker = tmp_path / "world.json"
    stamp = marker.stat().st_mtime_ns
    assert W.ensure_world(tmp_path, 10, 3, image_size=SIZE) == first
    assert marker.stat().st_mtime_ns == stamp
    regenerated = W.ensure_world(tmp_path, 6, 3, image_size=SIZE)
    assert regenerated["num_images"] == 6
    assert len(list((tmp_path / "images").glob("*.png"))) == 6  # stale images removed


# --------------------------------------------------------------------------- LLaVA layout


def test_pretrain_manifest_has_llava_558k_layout(world, records):
    for split in W.SPLITS:
        samples = _load(world, split, "pretrain.json")
        assert isinstance(samples, list) and samples
        for s in samples:
            assert list(s) == ["id", "image", "conversations"]
            human, gpt = s["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert human["value"][len("<image>\n"):] in W.PRETRAIN_INSTRUCTIONS
            assert gpt["value"] == records[s["id"]]["caption"] and "<image>" not in gpt["value"]
            assert (world / "images" / s["image"]).is_file()


def test_instruct_manifest_has_llava_665k_layout(world, records):
    text_only = 0
    for split in W.SPLITS:
        for s in _load(world, split, "instruct.json"):
            conv = s["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert len(conv) % 2 == 0
            if "image" in s:
                assert list(s) == ["id", "image", "conversations"]
                assert 2 <= len(conv) // 2 <= 4
                assert conv[0]["value"].startswith("<image>\n")
                assert sum(t["value"].count("<image>") for t in conv) == 1
                assert s["id"] in records and (world / "images" / s["image"]).is_file()
            else:
                text_only += 1
                assert list(s) == ["id", "conversations"]
                assert all("<image>" not in t["value"] for t in conv)
            assert all(t["value"].strip() for t in conv)
    assert text_only >= 3


def test_qa_file_matches_instruct_conversations(world):
    for split in W.SPLITS:
        from_instruct = []
        for s in _load(world, split, "instruct.json"):
            if "image" in s:
                conv = s["conversations"]
                for q, a in zip(conv[::2], conv[1::2]):
                    from_instruct.append((s["id"], s["image"], q["value"].removeprefix("<image>\n"),
                                          a["value"]))
        qa = _load(world, split, "qa.jsonl")
        assert [(q["id"], q["image"], q["question"], q["answer"]) for q in qa] == from_instruct
        assert all(q["type"] in W.QA_TYPES for q in qa)
        assert len({q["question_id"] for q in qa}) == len(qa)


# --------------------------------------------------------------------------- words and answers


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.replace("<image>", " ").lower())


def test_every_text_word_is_a_world_word(world, records):
    vocab = set(W.world_words())
    assert W.world_words() == sorted(vocab)
    assert {*W.COLORS, *W.SHAPES, *W.SIZES, *W.POSITIONS, *W.BACKGROUNDS} <= vocab
    assert not set(W.COLORS) & set(W.BACKGROUNDS)
    for record in records.values():
        assert set(_words(record["caption"])) <= vocab, record["caption"]
    for split in W.SPLITS:
        for name in ("pretrain.json", "instruct.json"):
            for s in _load(world, split, name):
                for turn in s["conversations"]:
                    assert set(_words(turn["value"])) <= vocab, turn["value"]


def test_caption_names_every_object_and_the_background(records):
    for record in records.values():
        caption = record["caption"]
        assert caption == caption.lower() and record["background"] + " background" in caption
        for obj in record["objects"]:
            assert f"a {obj['size']} {obj['color']} {obj['shape']} " in caption
        assert len(re.findall(r"\ba (?:small|large) ", caption)) == len(record["objects"])


_POSITION_PHRASES = {"on the left": "left", "on the right": "right", "at the top": "top",
                     "at the bottom": "bottom", "in the center": "center"}


def _referenced(question: str, objects: list[dict], keys: list[str]) -> list[dict]:
    """Objects matching every attribute of ``keys`` the question names (and its position phrase)."""
    words = set(_words(question))
    matches = []
    for obj in objects:
        named = [obj[k] for k in keys if any(v in words for v in getattr(W, k.upper() + "S"))]
        ok = all(v in words for v in named)
        for phrase, position in _POSITION_PHRASES.items():
            if phrase in question:
                ok = ok and obj["position"] == position
        if ok:
            matches.append(obj)
    return matches


def _check_qa(qa: dict, objects: list[dict]) -> None:
    answer, kind = qa["answer"], qa["type"]
    assert re.fullmatch(r"[a-z]+", answer)
    if kind == "count":
        assert W.NUMBER_WORDS.index(answer) == len(objects)
    elif kind == "existence":
        color = next(c for c in W.COLORS if c in _words(qa["question"]))
        shape = next(s for s in W.SHAPES if s in _words(qa["question"]))
        present = any(o["color"] == color and o["shape"] == shape for o in objects)
        assert answer == ("yes" if present else "no")
    else:
        keys = {"color": ["shape"], "shape": ["color"], "position": ["color", "shape", "size"]}[kind]
        match = _referenced(qa["question"], objects, keys)
        assert len(match) == 1, qa
        assert answer == match[0][kind], qa


def test_qa_answers_are_true_and_unambiguous(world, records):
    seen_types = Counter()
    for split in W.SPLITS:
        for qa in _load(world, split, "qa.jsonl"):
            seen_types[qa["type"]] += 1
            _check_qa(qa, records[qa["id"]]["objects"])
    assert set(seen_types) == set(W.QA_TYPES)


def test_qa_disambiguates_look_alike_objects():
    def obj(color, shape, size, position):
        return {"color": color, "shape": shape, "size": size, "position": position,
                "cx": 0.0, "cy": 0.0, "radius": 1.0}

    scenes = [
        [obj("red", "circle", "small", "left"), obj("red", "circle", "large", "right")],
        [obj("red", "circle", "small", "left"), obj("red", "circle", "small", "right"),
         obj("blue", "circle", "large", "top")],
        [obj("green", "cross", "large", "top"), obj("green", "square", "large", "bottom"),
         obj("orange", "square", "small", "center")],
    ]
    seen = Counter()
    for objects in scenes:
        record = {"background": "teal", "objects": objects}
        for s in range(60):
            qas = W.make_qa(record, np.random.default_rng(s))
            assert 2 <= len(qas) <= 4 and len({q["type"] for q in qas}) == len(qas)
            for qa in qas:
                seen[qa["type"]] += 1
                _check_qa(qa, objects)
    assert set(seen) == set(W.QA_TYPES)


def test_existence_answers_are_balanced(world):
    answers = Counter(qa["answer"] for split in W.SPLITS for qa in _load(world, split, "qa.jsonl")
                      if qa["type"] == "existence")
    assert set(answers) == {"yes", "no"}
    assert 0.3 < answers["yes"] / sum(answers.values()) < 0.7


def test_scenes_are_varied_and_objects_do_not_overlap(records):
    recs = list(records.values())
    assert {len(r["objects"]) for r in recs} == {1, 2, 3}
    assert {o["shape"] for r in recs for o in r["objects"]} == set(W.SHAPES)
    assert {o["color"] for r in recs for o in r["objects"]} == set(W.COLORS)
    assert {r["background"] for r in recs} == set(W.BACKGROUNDS)
    for record in recs:
        assert len({o["position"] for o in record["objects"]}) == len(record["objects"])
        owner = W.render_owner_map(record)
        for k, obj in enumerate(record["objects"]):
            alone = W.render_owner_map({**record, "objects": [obj]})
            assert (owner == k).sum() == (alone == 0).sum() > 0  # nothing drawn over it


# --------------------------------------------------------------------------- patch ground truth


def _square_record(cx=80.0, cy=144.0, radius=48.0, size=224) -> dict:
    # a square covers the pixels whose centres lie within radius: here columns 32..127 and
    # rows 96..191
    return {"id": "hand", "image": "hand.png", "split": "test", "image_size": size,
            "background": "gray", "texture_seed": 1, "caption": "",
            "objects": [{"color": "red", "shape": "square", "size": "large", "position": "left",
                         "cx": cx, "cy": cy, "radius": radius}]}


def _expected_owner(grid: int, size=224, x=(32, 128), y=(96, 192)) -> np.ndarray:
    """Owner grid of an axis-aligned pixel rectangle, by interval arithmetic."""
    bounds = [(i * size) // grid for i in range(grid + 1)]
    out = np.full((grid, grid), -1)
    for i in range(grid):
        for j in range(grid):
            r0, r1, c0, c1 = bounds[i], bounds[i + 1], bounds[j], bounds[j + 1]
            inside = max(0, min(r1, y[1]) - max(r0, y[0])) * max(0, min(c1, x[1]) - max(c0, x[0]))
            if inside * 2 > (r1 - r0) * (c1 - c0):
                out[i, j] = 0
    return out


def test_square_pixels_are_where_expected():
    owner = W.render_owner_map(_square_record())
    rows, cols = np.nonzero(owner == 0)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (96, 191, 32, 127)
    assert (owner == 0).sum() == 96 * 96


def test_patch_owner_of_a_hand_built_square():
    record = _square_record()
    expected_7 = np.full((7, 7), -1)
    expected_7[3:6, 1:4] = 0  # 32 px patches: the square is exactly 3 x 3 patches
    expected_4 = np.full((4, 4), -1)
    expected_4[2, 1] = 0  # 56 px patches: only one patch is more than half square
    expected_8 = np.full((8, 8), -1)  # 28 px patches: partial patches decide by area
    expected_8[3, 2:4] = 0
    expected_8[4:6, 1:5] = 0
    expected_8[6, 1:4] = 0
    for grid, expected in ((7, expected_7), (4, expected_4), (8, expected_8)):
        got = W.patch_owner(record, grid, grid)
        assert got.shape == (grid, grid)
        np.testing.assert_array_equal(got, expected, err_msg=f"grid {grid}")
        np.testing.assert_array_equal(got, _expected_owner(grid))
    for grid in (1, 3, 5, 9, 13, 14, 16, 224):  # also grids that do not divide 224
        np.testing.assert_array_equal(W.patch_owner(record, grid, grid), _expected_owner(grid))


def test_patch_ground_truth_words():
    record = _square_record()
    truth = W.patch_ground_truth(record, 7, 7)
    assert len(truth) == 49
    owner = W.patch_owner(record, 7, 7).reshape(-1)
    for k, words in zip(owner, truth):
        assert words == (["red", "square"] if k == 0 else ["gray"])
    assert truth[3 * 7 + 1] == ["red", "square"] and truth[0] == ["gray"]
    assert sum(w == ["red", "square"] for w in truth) == 9


def test_non_square_grid_and_bounds():
    assert W.patch_bounds(224, 5) == [0, 44, 89, 134, 179, 224]
    assert W.patch_bounds(64, 8) == list(range(0, 65, 8))
    record = _square_record()
    owner = W.patch_owner(record, 7, 4)
    expected = np.full((7, 4), -1)
    expected[3:6, 1] = 0
    np.testing.assert_array_equal(owner, expected)
    cover = W.patch_coverage(record, 7, 7)
    np.testing.assert_allclose(cover.sum(axis=2), 1.0)
    assert cover[4, 2, 1] == 1.0 and cover[0, 0, 0] == 1.0


def test_patch_ground_truth_agrees_with_pixels(world, records):
    grid = 8  # 8 x 8 px patches of the 64 px images
    rgb_to_word = {v: k for k, v in W.COLOR_RGB.items()}
    for record in list(records.values())[:40]:
        png = np.asarray(Image.open(world / "images" / record["image"]))
        truth = W.patch_ground_truth(record, grid, grid)
        for idx, words in enumerate(truth):
            i, j = divmod(idx, grid)
            patch = png[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8].reshape(-1, 3)
            colors = Counter(rgb_to_word.get(tuple(p), "background") for p in patch.tolist())
            word, count = colors.most_common(1)[0]
            if len(words) == 2:
                assert words[0] == word and count > 32, (record["id"], idx)
            else:
                assert words == [record["background"]]
                assert all(n <= 32 for c, n in colors.items() if c != "background")
