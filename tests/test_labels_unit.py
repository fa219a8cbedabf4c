"""Labels without Ray: the vocabulary, the patch labeler (hand-made features and real towers),
the decode/label stages called directly, and the audit."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from sea_ray.config.loading import validate
from sea_ray.config.schema import VocabConfig
from sea_ray.labels import labeler as L
from sea_ray.labels.labeler import PatchLabeler, select_top_n, word_embeddings
from sea_ray.labels.vocab import STOPWORDS, build_vocab, tokenize, vocab_hash

# --------------------------------------------------------------------------- vocabulary


def test_vocab_rules(tmp_path):
    captions = ["A red circle on the left.", "a RED square, and a red circle!", "Blue-ish circle; don't stop",
                "x y z red"]
    vocab = build_vocab(captions, VocabConfig(min_count=2, max_size=100))
    assert vocab.words == ["circle", "red"]  # alphabetical; "left"/"square"/"blue" seen once; stop-words out
    assert vocab.counts == {"circle": 3, "red": 4}
    assert tokenize("Don't x-ray 3D café") == ["don", "t", "x", "ray", "d", "café"]
    # min_count=1: single letters are out (min_length 2), stop-words out, everything else in
    vocab = build_vocab(captions, VocabConfig(min_count=1, max_size=100))
    assert "ish" in vocab.words and "x" not in vocab.words and not set(vocab.words) & STOPWORDS
    # max_size keeps the most frequent, ties broken alphabetically
    vocab = build_vocab(captions, VocabConfig(min_count=1, max_size=3))
    assert vocab.words == ["blue", "circle", "red"]  # red 4, circle 3, then the first of the 1-count ties
    # extra words: kept whatever their count, even beyond max_size; comments and blanks skipped
    extra = tmp_path / "extra.txt"
    extra.write_text("# my words\nZebra\n\ntriangle  # a shape\nzebra\n")
    vocab = build_vocab(captions, VocabConfig(min_count=1, max_size=3, extra_words=str(extra)))
    assert vocab.words == ["red", "triangle", "zebra"] and vocab.extra == ["zebra", "triangle"]
    # a stop-word file replaces the built-in list
    stop = tmp_path / "stop.txt"
    stop.write_text("red\ncircle\n")
    vocab = build_vocab(captions, VocabConfig(min_count=1, max_size=100, stopwords=str(stop)))
    assert "red" not in vocab.words and "the" in vocab.words


def test_vocab_hash_is_sha256_of_sorted_words_and_order_independent():
    a = build_vocab(["red circle", "blue square", "red square"], VocabConfig(min_count=1))
    b = build_vocab(["red square", "blue square", "red circle"], VocabConfig(min_count=1))
    assert a.words == b.words and a.hash == b.hash
    assert a.hash == hashlib.sha256("\n".join(sorted(a.words)).encode()).hexdigest() == vocab_hash(reversed(a.words))
    assert build_vocab(["red"], VocabConfig(min_count=1)).hash != a.hash


# --------------------------------------------------------------------------- labeler on hand-made features


class FakeTower(torch.nn.Module):
    """encode_text from a table (per template); patch features given by the test."""

    def __init__(self, table: dict[str, torch.Tensor], feats: torch.Tensor, dense_feats=None):
        super().__init__()
        self.table, self.feats, self.dense_feats = table, feats, dense_feats
        self.calls = 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, texts):
        self.calls += 1
        return torch.stack([self.table[t] for t in texts])

    def joint_patch_features(self, images, dense=False):
        src = self.dense_feats if dense else self.feats
        return src[: len(images)]


def _basis(d=4):
    return torch.eye(d)


def test_top_n_keeps_positive_scores_in_order_and_pads():
    scores = torch.tensor([[[0.9, -0.2, 0.3, 0.5, 0.0]],     # 3 positive
                           [[-0.1, -0.2, -0.3, -0.4, -0.5]]])  # none positive
    ids, vals = select_top_n(scores, 4)
    assert ids.dtype == torch.int32 and vals.dtype == torch.float16 and ids.shape == (2, 1, 4)
    assert ids[0, 0].tolist() == [0, 3, 2, -1]
    assert torch.allclose(vals[0, 0].float(), torch.tensor([0.9, 0.5, 0.3, 0.0]), atol=1e-3)
    assert ids[1, 0].tolist() == [-1] * 4 and vals[1, 0].tolist() == [0.0] * 4
    # top_n larger than the vocabulary: padded
    ids, vals = select_top_n(scores, 7)
    assert ids.shape == (2, 1, 7) and ids[0, 0, 3:].tolist() == [-1] * 4
    # a tiny positive score stays > 0 in float16
    ids, vals = select_top_n(torch.tensor([[1e-9, -1.0]]), 2)
    assert ids.tolist() == [[0, -1]] and vals[0, 0].item() > 0


def test_labeler_scores_sign_and_padding():
    words = ["a", "b", "c", "d"]
    table = {f"{w}!": v for w, v in zip(words, _basis())}
    # patch 0 leans to a then b; patch 1 is the opposite of c
    feats = torch.tensor([[[2.0, 1.0, -1.0, 0.0], [0.0, 0.0, -3.0, 0.5]]])
    tower = FakeTower(table, feats)
    raw = PatchLabeler(tower, words, ["{}!"], top_n=3, score_sign="raw")
    ids, vals = raw.label(torch.zeros(1, 3, 8, 8))
    assert ids.shape == (1, 2, 3) and vals.dtype == torch.float16
    assert ids[0, 0].tolist() == [0, 1, -1]  # c is negative, d is 0: not kept
    unit = F.normalize(feats, dim=-1)
    assert torch.allclose(vals[0, 0, :2].float(), unit[0, 0, :2], atol=1e-3)
    assert ids[0, 1].tolist() == [3, -1, -1]
    neg = PatchLabeler(tower, words, ["{}!"], top_n=3, score_sign="negate")
    ids, vals = neg.label(torch.zeros(1, 3, 8, 8))
    assert ids[0, 1].tolist() == [2, -1, -1] and vals[0, 1, 0].item() > 0  # -cos(c) > 0
    assert ids[0, 0].tolist() == [2, -1, -1]
    assert tower.calls == 2  # the vocabulary was embedded once per labeler


def test_template_ensemble_is_renormalised_mean_of_unit_embeddings():
    torch.manual_seed(0)
    words = ["red", "blue", "green"]
    templates = ["a {}.", "the {} thing", "{}"]
    table = {t.format(w): torch.randn(5) * (i + 1) for i, t in enumerate(templates) for w in words}
    emb = word_embeddings(lambda texts: torch.stack([table[t] for t in texts]), words, templates, batch_size=2)
    for j, w in enumerate(words):
        expected = F.normalize(torch.stack([F.normalize(table[t.format(w)], dim=0) for t in templates]).mean(0),
                               dim=0)
        assert torch.allclose(emb[j], expected, atol=1e-6)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3))


def test_dense_variant_and_chunked_scoring(monkeypatch):
    torch.manual_seed(0)
    words = [f"w{i}" for i in range(7)]
    table = {w: torch.randn(6) for w in words}
    feats, dense = torch.randn(5, 9, 6), torch.randn(5, 9, 6)
    tower = FakeTower(table, feats, dense)
    joint = PatchLabeler(tower, words, ["{}"], top_n=3)
    dens = PatchLabeler(tower, words, ["{}"], top_n=3, features="dense")
    ids_j, _ = joint.label(torch.zeros(5, 3, 4, 4))
    ids_d, _ = dens.label(torch.zeros(5, 3, 4, 4))
    ref = select_top_n(F.normalize(dense, dim=-1) @ dens.text.T, 3)[0]
    assert torch.equal(ids_d, ref) and not torch.equal(ids_j, ids_d)
    monkeypatch.setattr(L, "_SIM_BUDGET", 9 * 7 * 2)  # two images per chunk
    ids_c, vals_c = joint.label(torch.zeros(5, 3, 4, 4))
    assert torch.equal(ids_c, ids_j)


def test_bad_labeler_arguments():
    tower = FakeTower({"a": torch.ones(2)}, torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="score_sign"):
        PatchLabeler(tower, ["a"], ["{}"], score_sign="neg")
    with pytest.raises(ValueError, match="features"):
        PatchLabeler(tower, ["a"], ["{}"], features="maskclip")
    with pytest.raises(ValueError, match="empty"):
        PatchLabeler(tower, [], ["{}"])


# --------------------------------------------------------------------------- labeler on real towers


def _labels_cfg(tmp_path, **model):
    raw = {"job": "labels", "output": str(tmp_path / "out"), "model": {"preset": "tiny-openclip-llama", **model},
           "data": {"manifest": str(tmp_path / "m.json")}, "vocab": {"min_count": 1},
           "labeler": {"top_n": 5}}
    return validate(raw)


def test_open_clip_tower_labels_match_a_direct_computation(tmp_path):
    from sea_ray.model.vision import build_vision_tower

    cfg = _labels_cfg(tmp_path)
    torch.manual_seed(0)
    tower = build_vision_tower(cfg.model.vision, cfg.data.image_aspect).eval()
    words = ["red", "circle", "gray", "square"]
    labeler = PatchLabeler(tower, words, ["a photo of a {}.", "a {}."], top_n=5)
    images = torch.randn(3, 3, 64, 64)
    ids, vals = labeler.label(images)
    assert ids.shape == (3, 64, 5) and vals.shape == (3, 64, 5)
    with torch.no_grad():
        text = sum(F.normalize(tower.encode_text([t.format(w) for w in words]), dim=-1)
                   for t in ["a photo of a {}.", "a {}."])
        text = F.normalize(text, dim=-1)
        sim = F.normalize(tower.joint_patch_features(images), dim=-1) @ text.T
    ref_ids, ref_vals = select_top_n(sim, 5)
    assert torch.equal(ids, ref_ids) and torch.allclose(vals.float(), ref_vals.float())
    assert ((ids >= 0) == (vals > 0)).all() and (ids < len(words)).all()


def _clip_bpe_tokenizer(out_dir):
    """The real CLIP BPE vocabulary (shipped inside open_clip) as a Hugging Face CLIPTokenizer, offline."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    encoder = {names.get(k, k): v for k, v in simple.encoder.items()}
    (out_dir / "vocab.json").write_text(json.dumps(encoder))
    merges = sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    return CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"))


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A saved tiny Hugging Face CLIPModel (random weights) with a real CLIP tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("hfclip")
    tok_dir = root / "bpe"
    tok_dir.mkdir()
    tokenizer = _clip_bpe_tokenizer(tok_dir)
    config = CLIPConfig(
        projection_dim=32,
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": 64, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2})
    torch.manual_seed(0)
    model_dir = root / "model"
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(model_dir)
    return model_dir


def test_hf_clip_tower_labels_with_a_saved_model_and_tokenizer(tmp_path, hf_clip_dir):
    from transformers import CLIPModel

    from sea_ray.model.vision import build_vision_tower

    cfg = _labels_cfg(tmp_path, vision={"backend": "hf", "name": str(hf_clip_dir), "custom": None})
    tower = build_vision_tower(cfg.model.vision, cfg.data.image_aspect).eval()
    assert tower.grid == (4, 4) and tower._tokenizer is not None
    words = ["red", "circle", "gray"]
    labeler = PatchLabeler.from_config(tower, words, cfg.labeler)
    ids, vals = labeler.label(torch.randn(2, 3, 64, 64))
    assert ids.shape == (2, 16, 5) and ((ids >= 0) == (vals > 0)).all()
    # the text side equals the Hugging Face model's own text features, tokenized with the real CLIP BPE
    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    batch = tower._tokenizer(["a photo of a red.", "a photo of a circle.", "a photo of a gray."],
                             padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0].item() == 49406  # <|startoftext|>
    with torch.no_grad():
        feats = model.get_text_features(**batch)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    assert torch.allclose(labeler.text, F.normalize(feats, dim=-1), atol=1e-5)
    # the dense variant runs too
    dense = PatchLabeler(tower, words, ["{}"], top_n=2, features="dense")
    assert dense.label(torch.randn(1, 3, 64, 64))[0].shape == (1, 16, 2)


def test_an_hf_folder_without_tokenizer_files_is_refused_for_labeling(tmp_path, hf_clip_dir):
    """transformers 5 builds an empty CLIPTokenizer (special tokens only) from a CLIP folder without
    tokenizer files; it counts as no tokenizer: validation names the folder, the tower has none."""
    import shutil

    from sea_ray import checks
    from sea_ray.model.vision import build_vision_tower, text_tokenizer

    bare = tmp_path / "clip-no-tokenizer"
    shutil.copytree(hf_clip_dir, bare)
    for f in bare.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    assert text_tokenizer(str(hf_clip_dir)) is not None and text_tokenizer(str(bare)) is None
    cfg = _labels_cfg(tmp_path, vision={"backend": "hf", "name": str(bare), "custom": None})
    assert build_vision_tower(cfg.model.vision, cfg.data.image_aspect)._tokenizer is None
    problems = checks.job_problems(cfg)
    assert any(p.startswith(f"model.vision.name: {bare} holds no tokenizer for its text tower") for p in problems)
    good = _labels_cfg(tmp_path, vision={"backend": "hf", "name": str(hf_clip_dir), "custom": None})
    assert checks.job_problems(good) == []


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
def test_the_labels_probe_reads_no_weights_and_gives_the_real_towers_transform_and_grid(tmp_path, hf_clip_dir,
                                                                                        backend):
    """The labels job plans from :func:`probe_vision_tower`: the tower on the meta device, equal to
    the real build in what planning reads, with a weights file that would not load."""
    import shutil

    from sea_ray.model.vision import build_vision_tower, probe_vision_tower

    if backend == "hf":
        good = {"backend": "hf", "name": str(hf_clip_dir), "custom": None}
        broken = tmp_path / "clip-broken-weights"
        shutil.copytree(hf_clip_dir, broken)
        (weights,) = broken.glob("model.safetensors")
        weights.write_bytes(b"not a checkpoint")
        bad = dict(good, name=str(broken))
    else:
        good = _labels_cfg(tmp_path).model.vision.model_dump()
        weights = tmp_path / "tower.safetensors"
        weights.write_bytes(b"not a checkpoint")
        bad = dict(good, weights=str(weights))
    real = build_vision_tower(_labels_cfg(tmp_path, vision=good).model.vision, "pad")
    cfg = _labels_cfg(tmp_path, vision=bad).model.vision
    with pytest.raises(Exception):
        build_vision_tower(cfg, "pad")
    probe = probe_vision_tower(cfg, "pad")
    assert {p.device.type for p in probe.parameters()} == {"meta"}
    assert probe.transform_spec() == real.transform_spec() and probe.transform_spec()["resize"].startswith("pad")
    assert (probe.grid, probe.embed_dim, probe.width) == (real.grid, real.embed_dim, real.width)
    assert (probe._tokenizer is None) == (real._tokenizer is None)
    x = torch.rand(3, 80, 48).mul(255).byte().permute(1, 2, 0).numpy()
    from PIL import Image

    image = Image.fromarray(x)
    assert torch.equal(probe.transform(image), real.transform(image))


def test_a_vision_only_hf_folder_gives_a_tower_with_its_processors_mean(tmp_path, hf_clip_dir):
    """A saved CLIPVisionModel (no text tower) with only an image processor: the tower reads the
    processor's mean and std (AutoProcessor gives the image processor itself then)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from sea_ray.model.vision import build_hf

    folder = tmp_path / "vision-only"
    CLIPVisionModel.from_pretrained(hf_clip_dir).save_pretrained(folder)
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 64},
                       crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    tower = build_hf(str(folder), None, -2, "crop")
    assert (tower.mean, tower.std) == ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert tower._tokenizer is None and tower.grid == (4, 4)
    assert tower.patch_tokens(torch.randn(1, 3, 64, 64)).shape == (1, 16, 32)


def test_random_init_hf_tower_is_refused_for_labeling(tmp_path):
    from sea_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer"):
        validate({"job": "labels", "output": "o", "model": {"preset": "tiny-hfclip-llama"},
                  "data": {"manifest": "m.json"}})


# --------------------------------------------------------------------------- pipeline stages without Ray


def test_decode_and_label_stages_called_directly(tmp_path):
    from PIL import Image

    from sea_ray.data.images import split_transform
    from sea_ray.labels.pipeline import LabelActor, decode_batch
    from sea_ray.model.vision import build_vision_tower

    cfg = _labels_cfg(tmp_path)
    tower = build_vision_tower(cfg.model.vision, cfg.data.image_aspect)
    pil_part, tensor_part = split_transform(tower.transform)
    good = tmp_path / "good.png"
    Image.new("RGB", (80, 64), (200, 10, 10)).save(good)
    (tmp_path / "text.jpg").write_text("not an image")
    strip = tmp_path / "strip.png"
    Image.new("RGB", (2000, 1), (0, 0, 255)).save(strip)  # 64 x 128000 once resized
    batch = pa.table({"row": [0, 1, 2, 3, 4], "shard": [0, 0, 0, 1, 1], "image_id": ["g", "m", "t", "b", "s"],
                      "uri": [str(good), str(tmp_path / "missing.png"), str(tmp_path / "text.jpg"), None, str(strip)],
                      "image_bytes": pa.array([None, None, None, good.read_bytes(), None], pa.binary())})
    for ship in ("uint8", "float32"):
        out = decode_batch(batch, pil_part, tensor_part, 64, ship=ship, max_pixels=1_000_000)
        assert out["ok"].tolist() == [True, False, False, True, False]
        assert out["stage"].tolist() == ["", "read", "decode", "", "decode"]
        assert "missing file" in out["reason"][1] and "not an image" in out["reason"][2]
        assert "extreme aspect ratio" in out["reason"][4]
        assert out["image"].shape == ((5, 64, 64, 3) if ship == "uint8" else (5, 3, 64, 64))
        actor = LabelActor(cfg.model.vision, cfg.data.image_aspect, cfg.labeler, ["red", "gray"], seed=0,
                           device="cpu", torch_threads=1, tensor_part=tensor_part, ship=ship)
        labelled = actor(out)
        assert "image" not in labelled and labelled["label_ids"].shape == (5, 64 * 5)
        assert (labelled["label_ids"][1] == -1).all() and (labelled["label_scores"][2] == 0).all()
        if ship == "uint8":
            first = labelled
    # both shipping modes give the same labels; the two good images (file and inline bytes) agree
    assert np.array_equal(first["label_ids"], labelled["label_ids"])
    assert np.array_equal(labelled["label_ids"][0], labelled["label_ids"][3])


def test_the_write_stage_writes_runs_of_one_shard_and_returns_no_labels(tmp_path):
    """A batch as Ray Data may bundle it: two shards, blocks out of order, an error row. Each run of
    consecutive rows of one shard becomes one part (named by its first row and rows, its rows in
    order); the records hold counts and error rows, no label, and the nodes that decoded and
    labelled the run's rows (none wrote it: outside Ray)."""
    from sea_ray.labels import dataset as D
    from sea_ray.labels.pipeline import RECORD_SCHEMA, node_id, write_parts

    grid, top_n = (2, 2), 3
    here = node_id()  # None unless this test process has joined a Ray session (another test's)
    # seq 4..5 (shard 1), then 0..3 (shard 0: rows 0-3, row 2 an error), then 7 (shard 1, after a gap)
    seq = np.array([4, 5, 0, 1, 2, 3, 7])
    batch = {"seq": seq, "row": seq + 10, "shard": np.array([1, 1, 0, 0, 0, 0, 1], np.int32),
             "image_id": np.array([f"i{s}" for s in seq], dtype=object),
             "ok": np.array([True, True, True, True, False, True, True]),
             "stage": np.array(["", "", "", "", "read", "", ""], dtype=object),
             "reason": np.array(["", "", "", "", "missing file", "", ""], dtype=object),
             "label_ids": np.repeat(seq[:, None], 12, axis=1).astype(np.int32),
             "label_scores": np.full((7, 12), 0.5, np.float16),
             "decode_node": np.array(["d1", "d1", "d1", "d2", "d2", "d1", "d2"], dtype=object),
             "label_node": np.array(["a1", "a2", "a2", "a2", "a1", "a2", "a1"], dtype=object)}
    records = write_parts(batch, str(tmp_path), grid, top_n)
    assert records.schema.equals(RECORD_SCHEMA)
    assert records.to_pylist() == [
        {"shard": 0, "first_row": 10, "rows": 4, "part": D.part_name(10, 3), "labelled": 3, "error_row": [12],
         "error_id": ["i2"], "error_stage": ["read"], "error_reason": ["missing file"],
         "decode_nodes": ["d1", "d2"], "label_nodes": ["a2"], "write_node": here},  # row 12 (a1) was not labelled
        {"shard": 1, "first_row": 14, "rows": 2, "part": D.part_name(14, 2), "labelled": 2, "error_row": [],
         "error_id": [], "error_stage": [], "error_reason": [], "decode_nodes": ["d1"], "label_nodes": ["a1", "a2"],
         "write_node": here},
        {"shard": 1, "first_row": 17, "rows": 1, "part": D.part_name(17, 1), "labelled": 1, "error_row": [],
         "error_id": [], "error_stage": [], "error_reason": [], "decode_nodes": ["d2"], "label_nodes": ["a1"],
         "write_node": here}]
    ldir = D.LabelsDir(str(tmp_path))
    assert ldir.list_tree(D.SHARDS) == ["shards/shard-00000/" + D.part_name(10, 3),
                                        "shards/shard-00001/" + D.part_name(14, 2),
                                        "shards/shard-00001/" + D.part_name(17, 1)]
    part = ldir.read_table("shards/shard-00000/" + D.part_name(10, 3))
    assert part["image_id"].to_pylist() == ["i0", "i1", "i3"]
    assert [row[0] for row in part["label_ids"].to_pylist()] == [0, 1, 3]


def test_only_the_files_a_marker_names_are_read_and_the_single_file_layout_still_reads(tmp_path):
    """A dataset written in parts (write_labels), and one of the layout before parts (a marker
    without ``parts`` naming shards/shard-K.parquet) read alike; a part that no marker names is never
    read, and a marked shard whose part is missing is not complete."""
    from sea_ray.labels import dataset as D

    n, grid, top_n = 6, (2, 2), 3
    table = D.labels_table([f"i{k}" for k in range(n)], grid, top_n, np.arange(n * 12).reshape(n, 12) % 7,
                           np.full((n, 12), 0.25, np.float16))
    parts = tmp_path / "parts"
    D.write_labels(str(parts), table, {"grid": list(grid)}, rows_per_shard=4)
    old = tmp_path / "old"
    for k, start in enumerate((0, 4)):
        ldir = D.LabelsDir(str(old))
        ldir.write_table(f"shards/{D.shard_name(k)}.parquet", table.slice(start, 4))
        ldir.write_errors(k, D.errors_table([]))
        ldir.write_marker(k, {"shard": k, "rows": min(4, n - start), "labelled": min(4, n - start), "errors": 0})
    (old / "_SUCCESS").write_text("")
    for uri in (parts, old):
        assert D.read_labels(str(uri)).equals(table)
        assert [rows for _, rows in D.completed_shard_rows(str(uri))] == [4, 2]
    assert [uri.rsplit("/", 2)[1:] for uri, _ in D.completed_shard_rows(str(parts))] == [
        ["shard-00000", D.part_name(0, 4)], ["shard-00001", D.part_name(4, 2)]]
    # a stray part beside the listed one is never read; a listed part gone makes its shard incomplete
    (parts / D.SHARDS / "shard-00001" / D.part_name(5, 1)).write_bytes(b"not parquet")
    assert D.read_labels(str(parts)).equals(table)
    (parts / D.SHARDS / "shard-00000" / D.part_name(0, 4)).unlink()
    assert D.LabelsDir(str(parts)).completed_shards() == {1}
    assert D.LabelsDir(str(parts)).remove_shard_files([1]) == 2 and D.LabelsDir(str(parts)).list_tree(D.SHARDS) == []


# --------------------------------------------------------------------------- audit (in-process)


def test_audit_table_on_the_world(world_dir, tmp_path, capsys):
    from sea_ray.cli import main

    cfg_path = tmp_path / "labels.yaml"
    cfg_path.write_text(json.dumps({"job": "labels", "output": str(tmp_path / "labels"),
                                    "model": {"preset": "tiny-openclip-llama"},
                                    "data": {"manifest": str(world_dir / "train" / "pretrain.json"),
                                             "image_root": str(world_dir / "images")},
                                    "vocab": {"min_count": 1}}))
    out = tmp_path / "audit.json"
    assert main(["audit-labels", "--config", str(cfg_path), "--world", str(world_dir), "--out", str(out),
                 "--limit", "20"]) == 0
    printed = capsys.readouterr().out
    assert "| features | sign | precision@1 |" in printed
    report = json.loads(out.read_text())
    assert [(r["features"], r["score_sign"]) for r in report["results"]] == [
        ("joint", "raw"), ("joint", "negate"), ("dense", "raw"), ("dense", "negate")]
    for r in report["results"]:
        assert r["patches"] == 20 * 64 and 0 <= r["coverage"] <= 1
        assert r["precision_at_1"] is None or 0 <= r["precision_at_1"] <= 1
        assert abs(r["hit_rate"] - (r["precision_at_1"] or 0) * r["coverage"]) < 1e-3
        assert f"| {r['features']} | {r['score_sign']} |" in printed
    assert 0 < report["chance_precision_at_1"] < 1 and (tmp_path / "audit.md").exists()
    # vocab verb: prints and saves
    assert main(["vocab", "--config", str(cfg_path), "--out", str(tmp_path / "v.json")]) == 0
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["hash"] == vocab_hash(saved["words"]) and "red" in saved["words"]


def test_audit_scores_a_perfect_labeler_as_perfect(world_dir, tmp_path, monkeypatch):
    """The audit's bookkeeping: with patch features equal to the true word's embedding, p@1 = 1."""
    from sea_ray.world.generator import load_ground_truth, patch_ground_truth
    from sea_ray.world import audit as A

    cfg = validate({"job": "labels", "output": str(tmp_path), "model": {"preset": "tiny-openclip-llama"},
                    "data": {"manifest": str(world_dir / "train" / "pretrain.json")}, "vocab": {"min_count": 1}})
    records = {r["id"]: r for r in load_ground_truth(world_dir)}
    order = [r["id"] for r in A._world_samples(str(world_dir), None, 6)]
    monkeypatch.setattr(A, "_world_samples", lambda *a, **k: [records[i] for i in order])

    import sea_ray.model.vision as V

    real_build = V.build_vision_tower

    def oracle_tower(vision_cfg, image_aspect):
        tower = real_build(vision_cfg, image_aspect)
        words = sorted({w for r in records.values() for ws in patch_ground_truth(r, 8, 8) for w in ws})
        table = {w: i for i, w in enumerate(words)}
        counter = {"i": 0}

        def encode_text(texts):
            return torch.eye(64)[[table.get(t.split()[-1].rstrip("."), 63) for t in texts]]

        def joint_patch_features(images, dense=False):
            start = counter["i"]
            counter["i"] += len(images)
            truths = [patch_ground_truth(records[order[start + b]], 8, 8) for b in range(len(images))]
            return torch.stack([torch.eye(64)[[table[ws[-1]] for ws in t]] for t in truths])

        tower.encode_text = encode_text
        tower.joint_patch_features = joint_patch_features
        return tower

    monkeypatch.setattr(V, "build_vision_tower", oracle_tower)
    report = A.audit(cfg, str(world_dir), limit=6, variants=(("joint", "raw"),))
    row = report["results"][0]
    assert row["precision_at_1"] == 1.0 and row["coverage"] == 1.0
