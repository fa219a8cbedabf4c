"""LoRA for instruct (``model.llm.lora``, PEFT) through the stage recipe on the session world: what
trains and what a checkpoint holds, a resumed run, and eval and generate on a LoRA checkpoint
(its export: tests/test_export.py; its config rules: tests/test_config.py; under FSDP on Ray
Train: tests/test_train.py)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sea_ray import storage
from sea_ray.config.loading import validate
from sea_ray.train import checkpoint as ckpt

STEPS, EVERY = 4, 2
LORA = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.1}  # dropout on: a resume must draw the same masks
ADAPTER = {"adapter.0.weight", "adapter.0.bias", "adapter.2.weight", "adapter.2.bias"}


def _raw(world, storage_dir, name, steps=STEPS, **extra) -> dict:
    raw = {"job": "instruct", "model": {"preset": "tiny-openclip-llama", "llm": {"lora": LORA}},
           "run": {"name": name, "storage": str(storage_dir), "seed": 2},
           "data": {"manifest": f"{world}/train/instruct.json", "image_root": f"{world}/images", "max_length": 96},
           "batch": {"global_size": 4, "per_worker": 4}, "optim": {"max_steps": steps, "lr": 1e-2},
           "checkpoint": {"every_n_steps": EVERY, "num_to_keep": None}, "log_every_n_steps": 1}
    raw.update(extra)
    return raw


@pytest.fixture(scope="module")
def rows(world_dir):
    """The instruct rows preprocessed once, in this process (the feed's in-memory source)."""
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.feed import materialize

    cfg = validate(_raw(world_dir, "unused", "rows"))
    return materialize(source_of(cfg, shared=False), preprocess_kwargs(cfg, 64), in_process=True)


def _train(cfg, rows) -> str:
    """The stage recipe in this process (as the quickstart and in-process trials run it)."""
    from sea_ray.train.feed import num_rows
    from sea_ray.train.loop import LocalIO, run_stage

    uri = storage.join(cfg.run.storage, cfg.run.name)
    run_stage(cfg, LocalIO(uri, rows, num_rows(rows)))
    return uri


@pytest.fixture(scope="module")
def lora_run(world_dir, rows, tmp_path_factory) -> str:
    """An uninterrupted LoRA instruct run (checkpoints at steps 2 and 4): the yardstick."""
    return _train(validate(_raw(world_dir, tmp_path_factory.mktemp("runs"), "lora")), rows)


def test_a_lora_checkpoint_holds_the_lora_weights_and_the_adapter_and_no_base_weight(lora_run):
    from sea_ray.train.loop import build_model, parse_config

    saved = ckpt.load_checkpoint(ckpt.resolve(lora_run))
    assert saved["state"]["step"] == STEPS and saved["meta"]["stage"] == "instruct"
    model, _ = build_model(parse_config(saved["config"]))
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert lora and set(saved["model"]) == lora | ADAPTER
    base = {n for n, _ in model.llm.named_parameters(prefix="llm") if n not in lora}
    assert base and not base & set(saved["model"])  # the frozen base LLM is not checkpointed
    assert len(saved["optimizer"]["optimizer"]["state"]) == len(saved["model"])  # nor optimized
    moved = [k for k in lora if ".lora_B." in k and saved["model"][k].abs().max() > 0]
    assert len(moved) == len(lora) // 2  # every lora_B left its zero init: LoRA trained
    assert sum(v.numel() for v in saved["model"].values()) < sum(p.numel() for p in model.parameters()) / 20


def test_with_train_vision_the_tower_is_checkpointed_too(world_dir, rows, tmp_path):
    uri = _train(validate(_raw(world_dir, tmp_path, "lora-tower", steps=1, train_vision=True)), rows)
    keys = set(ckpt.load_model_state(ckpt.resolve(uri)))
    llm = {k for k in keys if k.startswith("llm.")}
    assert any(k.startswith("vision.") for k in keys) and ADAPTER <= keys
    assert llm and all(".lora_A." in k or ".lora_B." in k for k in llm)


def test_a_resumed_lora_run_ends_where_the_uninterrupted_one_does(lora_run, world_dir, rows, tmp_path, caplog):
    """The run as if stopped after its first checkpoint (a copy without the later one), run again:
    it resumes from that checkpoint and its LoRA weights, adapter and optimizer end where the
    uninterrupted run's do (dropout included: its masks are drawn per micro-batch from the seed)."""
    cut = tmp_path / "lora"
    shutil.copytree(lora_run, cut)
    shutil.rmtree(cut / ckpt.step_dir_name(STEPS))
    assert ckpt.resolve(str(cut)).endswith(ckpt.step_dir_name(EVERY))
    with caplog.at_level(logging.INFO, logger="sea_ray.train.loop"):
        resumed = _train(validate(_raw(world_dir, tmp_path, "lora")), rows)
    assert f"(step {EVERY})" in caplog.text and "resumed from" in caplog.text
    got, want = ckpt.load_checkpoint(ckpt.resolve(resumed)), ckpt.load_checkpoint(ckpt.resolve(lora_run))
    assert got["state"] == want["state"] and set(got["model"]) == set(want["model"])
    for key in want["model"]:
        torch.testing.assert_close(got["model"][key], want["model"][key], rtol=1e-5, atol=1e-7)
    got_adam, want_adam = got["optimizer"]["optimizer"]["state"], want["optimizer"]["optimizer"]["state"]
    for key in want_adam:
        torch.testing.assert_close(got_adam[key]["exp_avg_sq"], want_adam[key]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_eval_and_generate_load_a_lora_checkpoint(lora_run, world_dir, tmp_path):
    """eval builds the checkpoint's LoRA model and loads its tensors; the perplexity "before" is
    the base LLM's (LoRA off), "after" the trained one's; generate answers with the LoRA model."""
    from sea_ray.eval.generate import Generator
    from sea_ray.eval.job import perplexity_metrics
    from sea_ray.eval.job import run as run_eval
    from sea_ray.eval.loading import load_model
    from sea_ray.model.llm import is_lora

    model, info = load_model(lora_run, keep_base_llm=True)
    assert is_lora(model.llm)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ckpt.load_model_state(info["checkpoint"]).items())
    texts = ["A chat. USER: What color is the circle? ASSISTANT: red", "a blue square on the left"]
    with torch.no_grad():
        measured = perplexity_metrics(model, texts, info["base_llm_state"])
        with model.llm.disable_adapter():
            base = perplexity_metrics(model, texts, None)["perplexity_after"]
    assert measured["perplexity_before"] == pytest.approx(base, rel=1e-5)
    assert measured["perplexity_after"] != pytest.approx(base, rel=1e-3)
    summary = run_eval(validate({"job": "eval", "checkpoint": lora_run, "world": str(world_dir),
                                 "output": str(tmp_path / "eval"), "max_samples": 2,
                                 "metrics": ["qa", "perplexity"], "device": "cpu"}))
    assert summary["stage"] == "instruct" and 0.0 <= summary["qa_accuracy"] <= 1.0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["perplexity"]["llm_changed"] and report["qa"]["count"] > 0
    generator = Generator(lora_run, device="cpu", max_new_tokens=3)
    assert is_lora(generator.model.llm)
    image = Image.open(next((Path(world_dir) / "images").glob("*.png"))).convert("RGB")
    assert isinstance(generator("What color is the circle?", image), str)
