"""`sea-ray eval` on your own data: a tiny folder of PNG images with a captions manifest, a
conversations manifest with reference answers and a labels dataset, evaluated with a checkpoint of
the tiny preset. The VQA normaliser on known cases, the scoring, the held-out LM loss against a
direct computation, the label-agreement diagnostics on known answers, the config rules and the
pre-flight check of a missing path, the job end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sea_ray.errors import DataError
from sea_ray.eval import metrics as M

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
WORDS = ["red", "green", "blue", "yellow", "square", "background"]


def _png(path: Path, colour: tuple[int, int, int], index: int) -> None:
    from PIL import Image

    img = Image.new("RGB", (64, 64), (128, 128, 128))
    img.paste(colour, (16, 16, 48, 48))
    img.putpixel((0, 0), (index, 0, 0))  # the image's number, for the stub model below
    img.save(path)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """A tiny "own data" folder: images/, captions.json, conversations.json (a text-only row
    included), and a labels dataset of the captions' images (8 x 8 patches, top-3 labels)."""
    from sea_ray.labels.dataset import labels_table, write_labels
    from sea_ray.labels.schema import SCHEMA_VERSION

    root = tmp_path_factory.mktemp("own")
    (root / "images").mkdir()
    names = list(COLOURS)
    for i, name in enumerate(names):
        _png(root / "images" / f"img{i}.png", COLOURS[name], i)
    captions = [{"id": f"c{i}", "image": f"img{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": f"a {name} square on a gray background"}]} for i, name in enumerate(names)]
    conversations = [{"id": f"q{i}", "image": f"img{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": name},
        {"from": "human", "value": "How many squares are there?"}, {"from": "gpt", "value": "one"}]}
        for i, name in enumerate(names[:3])]
    conversations.append({"id": "t0", "conversations": [{"from": "human", "value": "Name a color."},
                                                        {"from": "gpt", "value": "red"}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "conversations.json").write_text(json.dumps(conversations))
    # labels: patch p of image i has top-1 word i (its colour) and then "square", "background"
    grid, top_n, p = (8, 8), 3, 64
    ids = np.full((len(names), p, top_n), -1, dtype=np.int32)
    scores = np.zeros((len(names), p, top_n), dtype=np.float16)
    for i in range(len(names)):
        ids[i, :, 0], ids[i, :, 1], ids[i, :, 2] = i, WORDS.index("square"), WORDS.index("background")
        scores[i] = [0.9, 0.5, 0.2]
    ids[0, 5] = -1  # one patch without a label: not scored
    table = labels_table([c["id"] for c in captions], grid, top_n, ids.reshape(len(names), -1),
                         scores.reshape(len(names), -1))
    meta = {"schema_version": SCHEMA_VERSION, "vocab": {"words": WORDS, "hash": "test"}, "grid": list(grid),
            "top_n": top_n, "transform": _tiny_transform_spec(), "counts": {"images": len(names)}}
    write_labels(str(root / "labels"), table, meta)
    return root


def _tiny_cfg():
    from sea_ray.config.loading import validate

    return validate({"job": "eval", "checkpoint": "x", "world": "x", "model": {"preset": "tiny-openclip-llama"}})


def _tiny_transform_spec() -> dict:
    from sea_ray.model.vision import build_vision_tower

    return build_vision_tower(_tiny_cfg().model.vision, "crop").transform_spec()


def _checkpoint(tmp_path: Path, data: Path, stage: str, init_adapter: str | None = None) -> str:
    """A complete checkpoint of the tiny preset, its trained tensors moved away from their
    initial values (so the start of training and the checkpoint differ)."""
    from sea_ray.config.loading import to_dict, validate
    from sea_ray.model.vlm import build_vlm
    from sea_ray.train import checkpoint as ckpt

    raw = {"job": stage, "model": {"preset": "tiny-openclip-llama"}, "run": {"name": f"own-{stage}", "seed": 3},
           "data": {"manifest": str(data / ("captions.json" if stage == "align" else "conversations.json")),
                    "image_root": str(data / "images"), "max_length": 64},
           "batch": {"global_size": 4, "per_worker": 4}}
    if stage == "align":
        raw["sea"] = {"enabled": False}
    if init_adapter:
        raw["init_adapter"] = init_adapter
    cfg = validate(raw)
    torch.manual_seed(3)
    model = build_vlm(cfg.model, cfg.data.image_aspect)
    model.freeze(stage)
    generator = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in model.trainable_state_dict().items()}
    uri = str(tmp_path / f"own-{stage}" / ckpt.step_dir_name(2))
    ckpt.write_checkpoint(uri, state, None, {"step": 2}, to_dict(cfg), stage)
    return uri


def _eval_raw(data: Path, checkpoint: str, out: Path, **more) -> dict:
    return {"job": "eval", "checkpoint": checkpoint, "device": "cpu", "output": str(out),
            "data": {"manifest": str(data / "captions.json"), "conversations": str(data / "conversations.json"),
                     "image_root": str(data / "images"), "labels": str(data / "labels")}, **more}


# --------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize("prediction, reference", [("Two dogs.", "2 dogs"), ("the cat", "cat"), ("don't", "dont"),
                                                   ("Yes!", "yes"), ("1,000", "1000"), ("A red circle", "red circle")])
def test_vqa_normaliser_matches_known_equivalents(prediction, reference):
    assert M.normalize_vqa_answer(prediction) == M.normalize_vqa_answer(reference)
    assert M.vqa_accuracy(prediction, [reference]) == 1.0


def test_vqa_normaliser_rules():
    n = M.normalize_vqa_answer
    assert n("Two dogs.") == "2 dogs" and n("the cat") == "cat" and n("dont") == "don't" == n("don't")
    assert n("2.5") == "2.5" and n("left-hand side") == "left hand side" and n("yes, it is") == "yes it is"
    assert n("its") == "its" and n("well") == "well"  # words that are no contraction stay
    assert n("None") == "0" and n("ten") == "10" and n("eleven") == "eleven"
    assert n(" a\tcat\n") == "cat" and n("") == ""
    assert M.vqa_accuracy("cat", ["dog"]) == 0.0 and M.vqa_accuracy("two dogs", ["2 cats"]) == 0.0
    # several references: mean over each left out of min(1, matches among the others / 3)
    assert M.vqa_accuracy("2", ["2", "2", "2", "two"]) == 1.0
    assert M.vqa_accuracy("2", ["2", "3", "3", "3"]) == pytest.approx((0 + 1 / 3 * 3) / 4)
    with pytest.raises(ValueError):
        M.vqa_accuracy("a", [])


def test_a_right_answer_scores_one_and_a_wrong_one_zero(own_data, tmp_path, monkeypatch):
    """conversation_qa's scoring with the model's answers fixed: exact match and VQA accuracy per
    question, the prediction lines of predictions.jsonl."""
    from sea_ray.eval import job
    from sea_ray.eval.loading import load_model

    model, _ = load_model(_checkpoint(tmp_path, own_data, "instruct"))
    canned = {"What color is the square?": ["red", "Blue.", "Two dogs."], "How many squares are there?":
              ["1", "one", "three"], "Name a color.": ["the red"]}
    seen: list[tuple[str, int]] = []

    def fake_answer(model, tensors, questions, template, max_new_tokens, histories, has_image):
        out = []
        for q, h, with_image in zip(questions, histories, has_image):
            shown = job._shown(q)
            seen.append((shown, len(h)))
            out.append(canned[shown].pop(0))
        assert (tensors.shape[0] if tensors is not None else 0) == sum(has_image)
        return out

    monkeypatch.setattr(job, "answer", fake_answer)
    rows = job.read_rows(str(own_data / "conversations.json"), False, None, [])
    result, preds = job.conversation_qa(model, rows, str(own_data / "images"), [], batch_size=4)
    by = {(p["id"], p["turn"]): p for p in preds}
    assert (by["q0", 0]["em"], by["q0", 0]["vqa"]) == (1.0, 1.0)      # "red" vs "red"
    assert (by["q1", 0]["em"], by["q1", 0]["vqa"]) == (0.0, 0.0)      # "Blue." vs "green"
    assert (by["q0", 1]["em"], by["q0", 1]["vqa"]) == (0.0, 1.0)      # "1" vs "one": VQA maps number words
    assert (by["q1", 1]["em"], by["q1", 1]["vqa"]) == (1.0, 1.0)
    assert (by["t0", 0]["em"], by["t0", 0]["vqa"]) == (1.0, 1.0)      # "the red" vs "red", text-only
    assert set(by["q0", 0]) >= {"id", "image", "question", "reference", "prediction", "em", "vqa"}
    assert by["q0", 0]["image"] == "img0.png" and by["q0", 0]["question"] == "What color is the square?"
    assert result["count"] == 7 and result["correct"] == 3 and result["conversations"] == 4
    assert result["accuracy"] == pytest.approx(3 / 7) and result["vqa_accuracy"] == pytest.approx(4 / 7)
    assert ("How many squares are there?", 1) in seen  # a second turn comes after its history


def test_a_later_turn_is_asked_after_the_earlier_turns():
    from sea_ray.eval.generate import render_prompt

    model_cfg = _tiny_cfg().model
    from sea_ray.model.llm import load_tokenizer

    tok = load_tokenizer(model_cfg.llm.tokenizer)
    first = render_prompt("<image>\nWhat color?", tok, "llava_v1")
    assert first == render_prompt("What color?", tok, "llava_v1")  # the placeholder goes first either way
    later = render_prompt("How many?", tok, "llava_v1", history=[("<image>\nWhat color?", "red")])
    assert later.startswith(first) and later.endswith(f" red{tok.eos_token}USER: How many? ASSISTANT:")
    assert later.count("<image>") == 1


# --------------------------------------------------------------------------- held-out LM loss


def _direct_mean_nll(model, rows, pad_id, normalize) -> tuple[float, int, float]:
    """By hand on one batch of every row: (mean token NLL, tokens, the model's own loss_lm)."""
    from sea_ray.constants import IGNORE_INDEX
    from sea_ray.train.loop import to_model_batch

    b = to_model_batch(rows, pad_id, normalize, "cpu")
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["labels"], b["images"])
    logp = torch.log_softmax(out["logits"].double(), dim=-1)
    total, count = 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(1, logp.shape[1]):
            target = int(out["labels"][i, t])
            if target != IGNORE_INDEX:
                total -= float(logp[i, t - 1, target])
                count += 1
    return total / count, count, float(out["loss_lm"])


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_heldout_lm_equals_a_direct_computation(own_data, tmp_path, stage):
    from sea_ray.config.loading import validate
    from sea_ray.eval.loading import load_model
    from sea_ray.train.heldout import heldout_lm, heldout_rows, tower_normalize

    model, _ = load_model(_checkpoint(tmp_path, own_data, stage))
    manifest = own_data / ("captions.json" if stage == "align" else "conversations.json")
    raw = {"job": stage, "model": {"preset": "tiny-openclip-llama"},
           "data": {"manifest": str(manifest), "image_root": str(own_data / "images"), "max_length": 64}}
    if stage == "align":
        raw["sea"] = {"enabled": False}
    rows = heldout_rows(validate(raw), model.vision.image_size)
    assert len(rows["position"]) == 4 and bool(rows["has_image"].all()) == (stage == "align")
    pad, normalize = model.tokenizer.pad_token_id, tower_normalize(model)
    want, tokens, loss_lm = _direct_mean_nll(model, rows, pad, normalize)
    one = heldout_lm(model, rows, pad, normalize, "cpu", batch_size=len(rows["position"]))
    assert one["loss_lm"] == pytest.approx(want, abs=1e-5) and one["tokens"] == tokens and one["rows"] == 4
    assert one["loss_lm"] == pytest.approx(loss_lm, abs=1e-5)  # the training's loss_lm on this batch
    assert one["ppl"] == pytest.approx(np.exp(want), rel=1e-5)
    # in batches of 3 and 1 rows: token-weighted over all rows, the same number
    for size in (3, 1):
        assert heldout_lm(model, rows, pad, normalize, "cpu", batch_size=size)["loss_lm"] == pytest.approx(want,
                                                                                                        abs=1e-5)
    assert not model.training or all(not m.training for m in (model.vision, model.llm))
    assert heldout_rows(validate(raw), model.vision.image_size, max_rows=2)["position"].tolist() == [0, 1]


# --------------------------------------------------------------------------- label agreement


class _StubVision:
    grid = (8, 8)

    def transform(self, img):  # the image's number (its first pixel) as a tiny tensor
        return torch.full((3, 2, 2), float(img.getpixel((0, 0))[0]))

    def transform_spec(self):
        return _tiny_transform_spec()


class _StubModel:
    """encode_images gives every patch of image i the LLM target of a chosen word."""

    def __init__(self, tokenizer, embedding, word_of_image):
        self.tokenizer, self.embedding, self.word_of_image = tokenizer, embedding, word_of_image
        self.vision = _StubVision()
        self.llm = torch.nn.Linear(1, 1)

    def input_embedding_table(self):
        return self.embedding

    def encode_images(self, images):
        from sea_ray.sea import word_targets

        out = []
        patches = self.vision.grid[0] * self.vision.grid[1]
        for i in images[:, 0, 0, 0].long().tolist():
            targets, _, _ = word_targets([self.word_of_image[i]] * patches, self.tokenizer, self.embedding)
            out.append(targets)
        return torch.stack(out)


def test_label_agreement_known_answers(own_data):
    from sea_ray.eval.job import labels_alignment, read_rows
    from sea_ray.world.backbones import world_tokenizer

    tok = world_tokenizer()
    torch.manual_seed(0)
    embedding = torch.randn(len(tok), 32)
    rows = read_rows(str(own_data / "captions.json"), True, None, [])
    root, labels = str(own_data / "images"), str(own_data / "labels")
    colour = _StubModel(tok, embedding, list(COLOURS))           # = each image's top-1 label
    a = labels_alignment(colour, rows, labels, root, [], batch_size=3)
    assert a["nearest_word_accuracy"] == 1.0 and a["nearest_word_in_top_n"] == 1.0
    assert a["patches"] == 4 * 64 - 1 and a["images"] == 4 and a["vocab_size"] == len(WORDS)
    assert a["nearest_word_chance"] == pytest.approx(1 / len(WORDS))
    assert a["nearest_word_in_top_n_chance"] == pytest.approx(3 / len(WORDS))
    square = _StubModel(tok, embedding, ["square"] * 4)           # in the top-3, never the top-1
    a = labels_alignment(square, rows, labels, root, [])
    assert a["nearest_word_accuracy"] == 0.0 and a["nearest_word_in_top_n"] == 1.0
    assert a["most_predicted"] == [["square", 1.0]]
    other = _StubModel(tok, embedding, ["yellow", "red", "red", "yellow"])  # image 3 (yellow) right only
    a = labels_alignment(other, rows, labels, root, [])
    assert a["nearest_word_accuracy"] == pytest.approx(64 / 255) == a["nearest_word_in_top_n"]
    assert -1.0 <= a["tacs"] <= 1.0 and 0.0 <= a["modality_gap"] <= 2.0
    # a tower with a 9 x 9 grid: the 8 x 8 labels are refused, or resampled (data.label_grid)
    nine = _StubModel(tok, embedding, list(COLOURS))
    nine.vision.grid = (9, 9)
    nine.vision.transform_spec = lambda: dict(_tiny_transform_spec(), image_size=72, grid=[9, 9])
    with pytest.raises(DataError, match=r"8, 8\] grid but the vision tower gives \[9, 9\].*label_grid: resample"):
        labels_alignment(nine, rows, labels, root, [])
    a = labels_alignment(nine, rows, labels, root, [], label_grid="resample")
    assert a["nearest_word_accuracy"] == 1.0 and a["patches"] == 4 * 81  # 9 x 9: no patch left unlabelled
    # a missing image is skipped and recorded, the others still count
    errors: list[dict] = []
    gone = [dict(rows[0], image="missing.png")] + rows[1:]
    a = labels_alignment(colour, gone, labels, root, errors)
    assert a["images"] == 3 and len(errors) == 1 and errors[0]["image_id"] == "c0"


def test_modality_gap_over_batches_equals_the_whole_gap():
    torch.manual_seed(0)
    v, t = torch.randn(50, 8), torch.randn(30, 8) + 0.5
    gap = M.ModalityGap()
    for i in range(0, 50, 20):
        gap.add(v[i:i + 20], t[i // 20 * 10:(i // 20 + 1) * 10])
    assert gap.value() == pytest.approx(M.modality_gap(v, t), abs=1e-6)


# --------------------------------------------------------------------------- configuration


def _problems(raw: dict) -> list[str]:
    from sea_ray.config.loading import validate
    from sea_ray.errors import ConfigError

    try:
        validate(raw)
    except ConfigError as exc:
        return exc.problems
    return []


def test_config_needs_exactly_one_of_world_or_data():
    from sea_ray.config.rules import eval_metrics
    from sea_ray.config.loading import validate

    base = {"job": "eval", "checkpoint": "c"}
    assert any(p.startswith("world, data: give exactly one") for p in _problems(base))
    both = _problems(dict(base, world="w", data={"manifest": "m"}))
    assert any("exactly one" in p and "both are given" in p for p in both)
    assert any(p.startswith("data: give data.manifest") for p in _problems(dict(base, data={"image_root": "i"})))
    assert _problems(dict(base, world="w")) == []
    assert eval_metrics(validate(dict(base, world="w"))) == ["alignment", "qa", "perplexity"]
    assert eval_metrics(validate(dict(base, data={"manifest": "m"}))) == ["lm_loss"]
    assert eval_metrics(validate(dict(base, data={"manifest": "m", "labels": "l", "conversations": "c"}))) == [
        "lm_loss", "alignment", "qa"]


def test_a_metric_whose_input_is_missing_is_a_config_error():
    base = {"job": "eval", "checkpoint": "c", "data": {"conversations": "c.json"}}
    problems = _problems(dict(base, metrics=["alignment", "qa", "lm_loss", "perplexity"]))
    assert problems == ["metrics: alignment on own data needs data.manifest and data.labels"]
    assert _problems({"job": "eval", "checkpoint": "c", "data": {"manifest": "m"}, "metrics": ["qa"]}) == [
        "metrics: qa on own data needs data.conversations"]
    assert any(p.startswith("vocab: own data is decoded over its labels' vocabulary")
               for p in _problems(dict(base, vocab="v")))
    assert any("metrics.0" in p for p in _problems(dict(base, metrics=["bogus"])))


def test_a_missing_manifest_fails_validation_with_its_key(own_data, tmp_path, capsys):
    from sea_ray.cli import main

    raw = _eval_raw(own_data, _checkpoint(tmp_path, own_data, "instruct"), tmp_path / "out")
    raw["data"]["manifest"] = str(own_data / "nothing.json")
    raw["data"]["labels"] = str(own_data / "images")  # a folder, but no labels dataset
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"data.manifest: {own_data / 'nothing.json'} does not exist" in err
    assert "data.labels:" in err and "labels dataset not found" in err and "Traceback" not in err
    assert main(["eval", "--config", str(path)]) == 2  # the job verb checks before it loads anything
    assert "data.manifest" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the job end to end


def test_eval_on_own_data_end_to_end(own_data, tmp_path, capsys):
    from sea_ray.cli import main

    raw = _eval_raw(own_data, str(Path(_checkpoint(tmp_path, own_data, "instruct")).parent), tmp_path / "ev",
                    metrics=["lm_loss", "alignment", "qa", "perplexity"], max_new_tokens=3, batch_size=3)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", "--config", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", "--config", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0.0 <= summary["qa_accuracy"] <= 1.0 and 0.0 <= summary["vqa_accuracy"] <= 1.0
    assert set(summary["lm_loss"]) == {"captions", "conversations"} and summary["rows"] == {
        "captions": 4, "conversations": 4}
    for s in summary["lm_loss"].values():
        assert s["ppl"] == pytest.approx(np.exp(s["loss_lm"])) and s["before"]["loss_lm"] != s["loss_lm"]
    out = tmp_path / "ev"
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["labels"] == str(own_data / "labels") and report["errors"] == []
    lm = report["lm_loss"]["sets"]
    assert lm["captions"]["preprocessed_as"] == "align" and lm["conversations"]["preprocessed_as"] == "instruct"
    assert lm["captions"]["rows"] == 4 and lm["captions"]["tokens"] > 0 and "step 0" in report["lm_loss"]["before_is"]
    a = report["alignment"]
    assert a["truth"] == "labels" and a["patches"] == 4 * 64 - 1 and 0.0 <= a["nearest_word_accuracy"] <= 1.0
    assert a["nearest_word_accuracy"] <= a["nearest_word_in_top_n"] <= 1.0
    assert report["perplexity"]["llm_changed"] and report["qa"]["count"] == 7
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and all({"id", "image", "question", "reference", "prediction", "em", "vqa"} <= set(x)
                                   for x in lines)
    md = (out / "report.md").read_text()
    assert "Held-out LM loss" in md and "VQA accuracy" in md and "the labels' top-1" in md
    assert all((out / "plots" / name).exists() for name in ("qa_accuracy.png", "lm_loss.png"))


def test_the_model_asked_its_own_answers_scores_one(own_data, tmp_path):
    """Real generation: references set to the model's own greedy answers give exact match 1."""
    from sea_ray.config.loading import validate
    from sea_ray.eval.job import evaluate

    ckpt = _checkpoint(tmp_path, own_data, "instruct")
    cfg = validate(_eval_raw(own_data, ckpt, tmp_path / "e1", metrics=["qa"], max_new_tokens=3))
    first = evaluate(cfg)["predictions"]
    if not all(M.normalize_answer(p["prediction"]) for p in first):
        pytest.skip("the random model answered with nothing to compare")
    rows = json.loads((own_data / "conversations.json").read_text())
    answers = iter(p["prediction"] for p in first)
    for row in rows:
        for turn in row["conversations"][1::2]:
            turn["value"] = next(answers)
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(rows))
    raw = _eval_raw(own_data, ckpt, tmp_path / "e2", metrics=["qa"], max_new_tokens=3)
    raw["data"]["conversations"] = str(mine)
    again = evaluate(validate(raw))
    assert again["qa"]["accuracy"] == 1.0 and again["qa"]["vqa_accuracy"] == 1.0


def test_an_align_checkpoint_on_own_data(own_data, tmp_path):
    from sea_ray.config.loading import validate
    from sea_ray.eval.job import evaluate

    raw = _eval_raw(own_data, _checkpoint(tmp_path, own_data, "align"), tmp_path / "e")
    del raw["data"]["conversations"]
    report = evaluate(validate(raw))
    assert set(report) >= {"lm_loss", "alignment"} and "qa" not in report and "perplexity" not in report
    assert "align run's step 0" in report["lm_loss"]["before_is"]
    s = report["lm_loss"]["sets"]["captions"]
    assert s["before"]["loss_lm"] != s["after"]["loss_lm"]


def test_an_instruct_run_starts_from_its_init_adapter(own_data, tmp_path):
    """The "start" of an instruct checkpoint is the base LLM with the align adapter it started from."""
    from sea_ray.config.loading import validate
    from sea_ray.eval.job import evaluate, starting_state
    from sea_ray.eval.loading import load_model
    from sea_ray.train import checkpoint as ckpt

    align = _checkpoint(tmp_path / "a", own_data, "align")
    instruct = _checkpoint(tmp_path / "i", own_data, "instruct", init_adapter=align)
    _, info = load_model(instruct, keep_base=True)
    start, what = starting_state(info)
    assert what.startswith("the base LLM with the align adapter of") and align in what
    adapter = {k: v for k, v in ckpt.load_model_state(align).items() if k.startswith("adapter.")}
    assert adapter and all(torch.equal(start[k], v) for k, v in adapter.items())
    assert all(torch.equal(start[k], v) for k, v in info["base_state"].items() if k.startswith("llm."))
    raw = _eval_raw(own_data, instruct, tmp_path / "e", metrics=["lm_loss"])
    assert "align adapter" in evaluate(validate(raw))["lm_loss"]["before_is"]
    _, info = load_model(_checkpoint(tmp_path / "j", own_data, "instruct", init_adapter=str(tmp_path / "gone")),
                         keep_base=True)
    start, what = starting_state(info)
    assert start is None and "cannot be read" in what


def test_the_world_is_own_data_too_lm_loss_on_a_world(world_dir, tmp_path):
    """lm_loss on a world: its split's manifests and images, like any other data."""
    from sea_ray.config.loading import validate
    from sea_ray.eval.job import evaluate
    from tests.test_eval import _fake_checkpoint

    uri = _fake_checkpoint(tmp_path, world_dir, "instruct", perturb_llm=True)
    report = evaluate(validate({"job": "eval", "checkpoint": uri, "world": str(world_dir), "max_samples": 2,
                                "metrics": ["lm_loss"], "device": "cpu"}))
    sets = report["lm_loss"]["sets"]
    assert sets["captions"]["rows"] == 2 and sets["conversations"]["rows"] >= 2
    assert sets["conversations"]["before"]["loss_lm"] != sets["conversations"]["after"]["loss_lm"]


def test_imported_manifests_bring_their_image_root(own_data, tmp_path):
    """Manifests imported with --image-root need no data.image_root: every metric (held-out loss,
    alignment, QA) finds the images where sea-ray import-manifest recorded them, as the stages do."""
    from sea_ray.config.loading import validate
    from sea_ray.data.importer import import_manifest
    from sea_ray.eval.job import evaluate

    for name in ("captions", "conversations"):
        import_manifest(str(own_data / f"{name}.json"), str(tmp_path / name), image_root=str(own_data / "images"))
    raw = _eval_raw(own_data, _checkpoint(tmp_path, own_data, "instruct"), tmp_path / "ev",
                    metrics=["lm_loss", "alignment", "qa"], max_new_tokens=2)
    raw["data"].update(manifest=str(tmp_path / "captions"), conversations=str(tmp_path / "conversations"))
    del raw["data"]["image_root"]
    report = evaluate(validate(raw))
    assert report["errors"] == [] and report["qa"]["count"] == 7
    assert report["alignment"]["images"] == 4 and report["lm_loss"]["sets"]["captions"]["rows"] == 4
