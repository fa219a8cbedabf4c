"""The eval job: every metric on hand-made inputs with known answers, generation against a
cache-free reference, the job end to end on a tiny checkpoint, the report, the CLI verbs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sea_ray.eval import metrics as M

# --------------------------------------------------------------------------- QA accuracy


def test_normalize_answer():
    assert M.normalize_answer("The Red.") == "red"
    assert M.normalize_answer("  a   Circle! ") == "circle"
    assert M.normalize_answer("Two") == "two"
    assert M.normalize_answer("") == ""
    assert M.normalize_answer("on the left") == "on left"


def test_qa_accuracy_overall_and_by_type():
    preds = ["red", "Circle.", "two", "yes", "the LEFT"]
    answers = ["red", "circle", "three", "no", "left"]
    types = ["color", "shape", "count", "existence", "position"]
    got = M.qa_accuracy(preds, answers, types)
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert (got["count"], got["correct"]) == (5, 3)
    assert {t: v["accuracy"] for t, v in got["by_type"].items()} == {
        "color": 1.0, "shape": 1.0, "count": 0.0, "existence": 0.0, "position": 1.0}
    assert M.qa_accuracy([], [])["accuracy"] is None
    with pytest.raises(ValueError, match="lengths differ"):
        M.qa_accuracy(["a"], ["a", "b"])


# --------------------------------------------------------------------------- nearest word, TACS, gap, perplexity


def test_nearest_word_accuracy_known_answer():
    words = torch.eye(3)  # three words along the axes
    visual = torch.tensor([[2.0, 0.1, 0.0],    # -> word 0, truth {0}: hit
                           [0.0, 0.2, 1.0],    # -> word 2, truth {2}: hit
                           [0.0, 1.0, 0.9],    # -> word 1, truth {0, 2}: miss
                           [0.5, 0.4, 0.0],    # -> word 0, truth {}: skipped
                           [-1.0, 0.0, 0.3]])  # -> word 2, truth {1}: miss
    truth = [[0], [2], [0, 2], [], [1]]
    got = M.nearest_word_accuracy(visual, words, truth, ["a", "a", "b", "b", "b"])
    assert got["predicted"] == [0, 2, 1, 0, 2]
    assert got["accuracy"] == pytest.approx(2 / 4) and got["patches"] == 4
    assert got["chance"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3 + 1 / 3) / 4)
    assert got["by_group"] == {"a": {"accuracy": 1.0, "patches": 2}, "b": {"accuracy": 0.0, "patches": 2}}


def test_tacs_and_modality_gap_known_answers():
    e = torch.eye(4)
    # identical token sets: every best cosine is 1, centroids coincide
    assert M.tacs_mean([e[:2]], [e[:2]]) == pytest.approx(1.0)
    assert M.modality_gap(e[:2], e[:2]) == pytest.approx(0.0, abs=1e-6)
    # orthogonal sets: best cosines 0; unit centroids e0 and e1 are sqrt(2) apart
    assert M.tacs_mean([e[:1].repeat(3, 1)], [e[1:2]]) == pytest.approx(0.0, abs=1e-6)
    assert M.modality_gap(e[:1].repeat(5, 1), e[1:2].repeat(2, 1)) == pytest.approx(math.sqrt(2))
    # top_k: visual tokens with best cosines 1, 0.6, 0 -> top-2 mean 0.8; two images averaged
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0]])
    assert M.tacs_mean([v], [t], top_k=2) == pytest.approx(0.8)
    assert M.tacs_mean([v, v[2:]], [t, t], top_k=2) == pytest.approx((0.8 + 0.0) / 2)


class _UniformLM(torch.nn.Module):
    """Zero logits: every next token has probability 1 / vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        class Out:
            pass

        out = Out()
        out.logits = torch.zeros(*input_ids.shape, self.vocab) + self.w * 0
        return out


def test_perplexity_of_a_uniform_lm_is_the_vocabulary_size():
    from sea_ray.world.backbones import world_tokenizer

    tok = world_tokenizer()
    nll, n = M.lm_nll(_UniformLM(len(tok)), tok, ["a red circle on a gray background", "yes", "two"], batch_size=2)
    # "yes" and "two" are single tokens: nothing to predict; the caption has its length - 1
    assert n == len(tok(" a red circle on a gray background".strip(), add_special_tokens=False)["input_ids"]) - 1
    assert M.perplexity(nll, n) == pytest.approx(len(tok), rel=1e-5)
    assert M.perplexity(3 * math.log(2), 3) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)


# --------------------------------------------------------------------------- the report table


def test_mean_std_and_paper_table():
    from sea_ray.eval.report import mean_std, paper_table

    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([None]) == (None, None)
    table = paper_table({"baseline": [{"qa": 0.5}, {"qa": 0.7}], "+SEA": [{"qa": 0.9}, {"qa": 0.9}]},
                        [("qa", "QA acc", 2)])
    assert "| baseline | 0.60 ± 0.14 |" in table and "| +SEA | 0.90 ± 0.00 |" in table


def test_read_scalars_from_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from sea_ray.eval.report import read_scalars, run_of

    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    for step, value in [(1, 3.0), (2, 2.5), (3, 2.0)]:
        writer.add_scalar("train/loss_lm", value, step)
    writer.add_scalar("other/x", 1.0, 1)
    writer.close()
    assert read_scalars(str(tmp_path)) == {"loss_lm": [(1, 3.0), (2, 2.5), (3, 2.0)]}
    assert read_scalars(str(tmp_path / "nothing")) == {}
    assert run_of("/r/align/step_00000040") == "/r/align" and run_of("/r/align") == "/r/align"


# --------------------------------------------------------------------------- the model-level metrics


class _Vision:
    grid = (8, 8)


class _StubModel:
    """encode_images returns, per patch, a chosen word's LLM target: nearest-word accuracy is then
    known from the ground truth alone."""

    def __init__(self, tokenizer, embedding, per_patch_words):
        self.tokenizer, self.embedding, self.per_patch_words = tokenizer, embedding, per_patch_words
        self.vision = _Vision()
        self.llm = torch.nn.Linear(1, 1)

    def input_embedding_table(self):
        return self.embedding

    def encode_images(self, images):
        from sea_ray.sea import word_targets

        out = []
        for i in images[:, 0, 0, 0].long().tolist():  # the image's index is stored in its first pixel
            targets, _, _ = word_targets(self.per_patch_words[i], self.tokenizer, self.embedding)
            out.append(targets)
        return torch.stack(out)


def test_alignment_metrics_known_answers(world_dir):
    from sea_ray.world.generator import load_ground_truth, patch_ground_truth, patch_words
    from sea_ray.eval.job import alignment_metrics
    from sea_ray.world.backbones import world_tokenizer

    tok = world_tokenizer()
    torch.manual_seed(0)
    embedding = torch.randn(len(tok), 32)
    records = [r for r in load_ground_truth(world_dir) if r["split"] == "test"][:4]
    images = torch.zeros(len(records), 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(len(records), dtype=torch.float32)
    words = patch_words() + ["left", "small"]
    truth = [[p[0] for p in patch_ground_truth(r, 8, 8)] for r in records]
    perfect = alignment_metrics(_StubModel(tok, embedding, truth), images, records, words)
    assert perfect["nearest_word_accuracy"] == pytest.approx(1.0)
    assert perfect["vocab_size"] == len(words) and perfect["patches"] == 64 * len(records)
    everywhere = [["left"] * 64 for _ in records]
    wrong = alignment_metrics(_StubModel(tok, embedding, everywhere), images, records, words)
    assert wrong["nearest_word_accuracy"] == 0.0 and wrong["most_predicted"] == [["left", 1.0]]
    gray = [["gray"] * 64 for _ in records]
    expected = sum(p == ["gray"] for r in records for p in patch_ground_truth(r, 8, 8)) / (64 * len(records))
    assert alignment_metrics(_StubModel(tok, embedding, gray), images, records, words)["nearest_word_accuracy"] \
        == pytest.approx(expected)


# --------------------------------------------------------------------------- generation


def _tiny_vlm():
    from sea_ray.config.loading import validate
    from sea_ray.model.vlm import build_vlm

    cfg = validate({"job": "eval", "checkpoint": "x", "world": "x", "model": {"preset": "tiny-openclip-llama"}})
    torch.manual_seed(0)
    return build_vlm(cfg.model, "crop").eval(), cfg


@torch.no_grad()
def _reference_greedy(model, prompt, image, steps, eos):
    """Full forward every step, one prompt, no cache, no padding."""
    ids = torch.tensor([prompt])
    visual = model.encode_images(image[None]) if image is not None else None
    emb, mask, _, _ = model.splice(ids, torch.ones_like(ids), None, visual)
    out = []
    for _ in range(steps):
        nxt = int(model.llm(inputs_embeds=emb, attention_mask=mask).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        emb = torch.cat([emb, model.llm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        mask = torch.ones(emb.shape[:2], dtype=torch.long)
    return out


def test_greedy_generate_matches_a_cache_free_reference_with_left_padding():
    from sea_ray.constants import IMAGE_TOKEN_INDEX
    from sea_ray.eval.generate import encode_prompt, greedy_generate, render_prompt

    model, _ = _tiny_vlm()
    tok = model.tokenizer
    questions = ["What color is the circle?", "How many objects are there in the image?", "Is there a red square?"]
    prompts = [encode_prompt(q, tok) for q in questions]
    assert all(p.count(IMAGE_TOKEN_INDEX) == 1 for p in prompts)
    assert render_prompt("Q?", tok).endswith(" USER: <image>\nQ? ASSISTANT:")
    images = torch.randn(3, 3, 64, 64)
    eos = -1  # never stop early: compare all steps
    got = greedy_generate(model, prompts, images, max_new_tokens=5, eos_id=eos)
    want = [_reference_greedy(model, p, images[i], 5, eos) for i, p in enumerate(prompts)]
    assert got == want and all(len(g) == 5 for g in got)


_QUESTIONS = ["What color is the circle?", "How many objects are there in the image?", "Is there a red square?",
              "Left?"]


def test_greedy_generate_text_only_and_mixed_batches_match_the_reference():
    """Prompts of different lengths without images, and a batch mixing prompts with and without one
    (``images`` then holds only the images of the prompts that have one, in order)."""
    from sea_ray.eval.generate import encode_prompt, greedy_generate

    model, _ = _tiny_vlm()
    tok = model.tokenizer
    text = [encode_prompt(q, tok, with_image=False) for q in _QUESTIONS]
    assert len({len(p) for p in text}) > 1
    got = greedy_generate(model, text, None, max_new_tokens=6, eos_id=-1)
    assert got == [_reference_greedy(model, p, None, 6, -1) for p in text] and all(len(g) == 6 for g in got)

    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    mixed = [encode_prompt(q, tok, with_image=i % 2 == 0) for i, q in enumerate(_QUESTIONS)]
    got = greedy_generate(model, mixed, images, max_new_tokens=6, eos_id=-1)
    want = [_reference_greedy(model, p, images[i // 2] if i % 2 == 0 else None, 6, -1) for i, p in enumerate(mixed)]
    assert got == want


def test_greedy_generate_stops_each_row_at_its_own_eos():
    """Each row ends at its first eos (not returned); the other rows go on up to max_new_tokens."""
    from sea_ray.eval.generate import encode_prompt, greedy_generate

    model, _ = _tiny_vlm()
    tok = model.tokenizer
    prompts = [encode_prompt(q, tok) for q in _QUESTIONS]
    torch.manual_seed(1)
    images = torch.randn(len(prompts), 3, 64, 64)
    free = greedy_generate(model, prompts, images, max_new_tokens=8, eos_id=-1)
    eos = free[0][3]  # a token the first row emits at step 4: stop there, others where (if) they emit it
    got = greedy_generate(model, prompts, images, max_new_tokens=8, eos_id=eos)
    want = [_reference_greedy(model, p, images[i], 8, eos) for i, p in enumerate(prompts)]
    assert got == want and got == [g[:g.index(eos)] if eos in g else g for g in free]
    assert len(got[0]) == 3 and len({len(g) for g in got}) > 1
    # a checkpoint's generation_config.json (sampling, penalties, its own eos) does not change greedy
    gc = model.llm.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.repetition_penalty, gc.no_repeat_ngram_size = True, 0.7, 5, 1.5, 2
    gc.eos_token_id = [tok.eos_token_id, free[1][0]]
    assert greedy_generate(model, prompts, images, max_new_tokens=8, eos_id=eos) == want
    assert greedy_generate(model, prompts, images, max_new_tokens=8, eos_id=-1) == free
    assert greedy_generate(model, [], None) == []
    assert greedy_generate(model, prompts[:1], images[:1], max_new_tokens=0) == [[]]


# --------------------------------------------------------------------------- the job end to end


def _fake_checkpoint(tmp_path, world_dir, stage: str, perturb_llm: bool = False) -> str:
    """A complete checkpoint of the tiny preset (as the training stages write it)."""
    from sea_ray.config.loading import to_dict, validate
    from sea_ray.model.vlm import build_vlm
    from sea_ray.train import checkpoint as ckpt

    raw = {"job": stage, "model": {"preset": "tiny-openclip-llama"}, "run": {"name": f"fake-{stage}", "seed": 5},
           "data": {"manifest": f"{world_dir}/train/{'pretrain' if stage == 'align' else 'instruct'}.json"},
           "batch": {"global_size": 8, "per_worker": 8}}
    if stage == "align":
        raw["sea"] = {"enabled": False}
    cfg = validate(raw)
    torch.manual_seed(5)
    model = build_vlm(cfg.model, cfg.data.image_aspect)
    model.freeze(stage)
    state = model.trainable_state_dict()
    if perturb_llm:
        state = {k: (v + 0.05 * torch.randn_like(v)) if k.startswith("llm.") else v for k, v in state.items()}
    uri = str(tmp_path / f"fake-{stage}" / ckpt.step_dir_name(3))
    ckpt.write_checkpoint(uri, state, None, {"step": 3}, to_dict(cfg), stage)
    return uri


def test_eval_job_end_to_end_writes_the_report(tmp_path, world_dir):
    from sea_ray.config.loading import validate
    from sea_ray.eval.job import run

    uri = _fake_checkpoint(tmp_path, world_dir, "instruct", perturb_llm=True)
    own_text = tmp_path / "notes.txt"
    own_text.write_text("a red circle\n\nthe quick brown fox jumps over the lazy dog\n")
    cfg = validate({"job": "eval", "checkpoint": str(Path(uri).parent), "world": str(world_dir),
                    "output": str(tmp_path / "eval"), "max_samples": 3, "device": "cpu",
                    "perplexity_texts": ["english", str(own_text)]})
    summary = run(cfg)
    # language retention on text that is not the world's: the shipped English sentences and a file of one's own
    english, notes = summary["perplexity_english_before"], summary["perplexity_notes_after"]
    assert english > 1 and notes > 1 and summary["perplexity_english_after"] != pytest.approx(english)
    assert summary["stage"] == "instruct" and summary["checkpoint"] == uri and summary["images"] == 3
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    from sea_ray.world.generator import load_ground_truth

    first3 = {r["id"] for r in load_ground_truth(world_dir) if r["split"] == "test"}
    first3 = set(sorted(first3)[:3])
    qa_lines = [json.loads(x) for x in (Path(world_dir) / "test" / "qa.jsonl").read_text().splitlines()]
    assert report["qa"]["count"] == len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines())
    assert report["qa"]["count"] == sum(1 for q in qa_lines if q["id"] in first3) > 0
    assert 0.0 <= report["qa"]["accuracy"] <= 1.0 and set(report["qa"]["by_type"]) <= {
        "color", "shape", "count", "existence", "position"}
    a = report["alignment"]
    assert 0.0 <= a["nearest_word_accuracy"] <= 1.0 and a["patches"] == 3 * 64 and a["vocab_size"] > 10
    assert -1.0 <= a["tacs"] <= 1.0 and 0.0 <= a["modality_gap"] <= 2.0
    p = report["perplexity"]
    assert p["llm_changed"] and p["perplexity_before"] != pytest.approx(p["perplexity_after"])
    from sea_ray.presets import SHIPPED_TEXTS

    shipped = [line for line in Path(SHIPPED_TEXTS["english"]).read_text().splitlines() if line.strip()]
    assert report["perplexity_texts"]["english"]["texts"] == len(shipped) >= 200
    assert report["perplexity_texts"]["notes"]["texts"] == 2
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| english |" in md and "| notes |" in md
    assert "nearest-word accuracy" in md and "QA accuracy" in md and (tmp_path / "eval" / "plots" /
                                                                      "qa_by_type.png").exists()


def test_eval_of_an_align_checkpoint_keeps_the_base_llm(tmp_path, world_dir):
    from sea_ray.config.loading import validate
    from sea_ray.eval.job import evaluate

    uri = _fake_checkpoint(tmp_path, world_dir, "align")
    cfg = validate({"job": "eval", "checkpoint": uri, "world": str(world_dir), "output": str(tmp_path / "e"),
                    "max_samples": 2, "metrics": ["alignment", "perplexity"], "device": "cpu"})
    report = evaluate(cfg)
    assert "qa" not in report and report["stage"] == "align"
    assert report["perplexity"]["perplexity_before"] == report["perplexity"]["perplexity_after"]
    assert not report["perplexity"]["llm_changed"]


def test_eval_and_generate_verbs(tmp_path, world_dir, capsys):
    import yaml

    from sea_ray.cli import main

    uri = _fake_checkpoint(tmp_path, world_dir, "instruct")
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"job": "eval", "checkpoint": uri, "world": str(world_dir),
                                    "output": str(tmp_path / "ev"), "metrics": ["qa"]}))
    assert main(["eval", "--config", str(path), "max_samples=2", "device=cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["qa_accuracy"] <= 1.0 and out["report"]["json"].endswith("report.json")
    image = next((Path(world_dir) / "images").glob("*.png"))
    assert main(["generate", "--checkpoint", uri, "--image", str(image), "--prompt", "What color is the circle?",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert isinstance(capsys.readouterr().out, str)
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    assert main(["eval", "--config", str(path), "metrics=[bogus]"]) == 2


def test_generate_answers_a_prompts_file_and_stdin_with_one_model_load(tmp_path, world_dir, capsys, monkeypatch):
    import io

    from sea_ray.cli import main
    from sea_ray.eval import generate as gen

    uri = _fake_checkpoint(tmp_path, world_dir, "instruct")
    images = sorted((Path(world_dir) / "images").glob("*.png"))[:2]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "What color is the circle?", "image": images[0].name},
        {"prompt": "How many shapes are there?", "image": images[1].name},
        {"prompt": "Say hi."}]) + "\n")
    loads = []
    real = gen.Generator.__init__
    monkeypatch.setattr(gen.Generator, "__init__", lambda self, *a, **k: (loads.append(1), real(self, *a, **k))[1])
    common = ["--checkpoint", uri, "--max-new-tokens", "3", "--device", "cpu"]
    assert main(["generate", *common, "--prompts", str(prompts), "--image-root", str(images[0].parent)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["a", 2, 3] and rows[2]["image"] is None and len(loads) == 1
    assert main(["generate", *common, "--image", str(images[0]), "--prompt", "What color is the circle?"]) == 0
    assert capsys.readouterr().out.strip() == rows[0]["answer"]  # the same greedy answer either way

    monkeypatch.setattr("sys.stdin", io.StringIO(f":image {images[1]}\nHow many shapes are there?\n:image\nSay hi.\n\n"))
    assert main(["generate", *common, "--interactive"]) == 0
    assert capsys.readouterr().out.splitlines() == [rows[1]["answer"], rows[2]["answer"]]

    sampled = [main(["generate", *common, "--prompt", "Say hi.", "--temperature", "1.5", "--seed", "3"]) for _ in "ab"]
    first, second = capsys.readouterr().out.splitlines()
    assert sampled == [0, 0] and first == second  # a seed makes sampling repeatable


def test_generate_checks_every_image_before_loading_a_model(tmp_path, capsys):
    from sea_ray.cli import main

    prompts = tmp_path / "prompts.jsonl"
    (tmp_path / "bad.png").write_bytes(b"not an image")
    prompts.write_text('{"prompt": "a", "image": "missing.png"}\n{"prompt": "b", "image": "bad.png"}\nnot json\n'
                       '{"image": "x.png"}\n')
    missing_checkpoint = str(tmp_path / "no-such-run")  # never reached: the prompts are read first
    assert main(["generate", "--checkpoint", missing_checkpoint, "--prompts", str(prompts),
                 "--image-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "4 bad line(s)" in err and "line 1: cannot read" in err and "line 2:" in err and "line 3: not JSON" in err
    assert "no-such-run" not in err
    assert main(["generate", "--checkpoint", missing_checkpoint, "--image", str(tmp_path / "missing.png"),
                 "--prompt", "a"]) == 1
    assert "missing.png" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", missing_checkpoint]) == 2  # no prompt at all
