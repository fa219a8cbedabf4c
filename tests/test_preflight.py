"""Checks before anything starts: one call per command (validate, the job verbs, pipeline, submit),
inputs included (every path exists, a model folder holds a model, a labels dataset is complete)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sea_ray import cli, jobs, submit

REPO = Path(__file__).resolve().parents[1]
ALIGN = str(REPO / "workflows/configs/world_align.yaml")


@pytest.fixture
def inputs(world_dir, tmp_path):
    """Overrides pointing an align config at inputs that exist (a complete labels dataset too)."""
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "_SUCCESS").write_text("")
    return [f"data.manifest={world_dir}/train/pretrain.json", f"data.image_root={world_dir}/images",
            f"data.labels={labels}", f"run.storage={tmp_path}/runs"]


def _validate(capsys, *overrides) -> tuple[int, str]:
    code = cli.main(["validate", "--config", ALIGN, *overrides])
    return code, capsys.readouterr().err


def test_existing_inputs_are_valid(capsys, inputs):
    code, err = _validate(capsys, *inputs)
    assert code == 0, err


def test_a_missing_llm_folder_is_named(capsys, inputs, tmp_path):
    code, err = _validate(capsys, *inputs, f"model.llm.name_or_path={tmp_path}/no-such-llm")
    assert code == 2 and f"model.llm.name_or_path: {tmp_path}/no-such-llm does not exist" in err


def test_a_folder_that_is_not_a_model_is_named(capsys, inputs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _validate(capsys, *inputs, f"model.llm.name_or_path={empty}")
    assert code == 2 and f"model.llm.name_or_path: {empty} holds no config.json" in err
    (empty / "config.json").write_text("{}")
    code, err = _validate(capsys, *inputs, f"model.llm.name_or_path={empty}")
    assert code == 2 and "holds no weights" in err
    (empty / "model.safetensors").write_bytes(b"")
    code, err = _validate(capsys, *inputs, f"model.llm.name_or_path={empty}")
    assert code == 2 and f"model.llm.name_or_path: {empty}/model.safetensors is not a readable weights file " \
        "(an empty file)" in err
    save_file({"x": torch.zeros(1)}, str(empty / "model.safetensors"))
    code, err = _validate(capsys, *inputs, f"model.llm.name_or_path={empty}")
    assert code == 2 and "model.llm.name_or_path: no tokenizer loads from" in err


@pytest.mark.parametrize("content, why", [
    (b"not a checkpoint", "16 bytes that are none of safetensors, a torch.save file or GGUF"),
    ((10**9).to_bytes(8, "little") + b"{}", "its safetensors header does not parse"),
])
def test_a_weights_file_that_would_not_load_is_named_before_anything_starts(capsys, world_dir, tmp_path,
                                                                             content, why):
    """The labels job's tower weights: a file that is not one is refused by `validate` (and every
    job verb), not by the labeler actors after Ray has started."""
    bad = tmp_path / "tower.safetensors"
    bad.write_bytes(content)
    code = cli.main(["validate", "--config", str(REPO / "workflows/configs/world_labels.yaml"),
                     f"data.manifest={world_dir}/train/pretrain.json", f"data.image_root={world_dir}/images",
                     f"output={tmp_path}/labels", f"model.vision.weights={bad}"])
    err = capsys.readouterr().err
    assert code == 2 and f"model.vision.weights: {bad} is not a readable weights file ({why}" in err, err


def test_missing_manifest_and_incomplete_labels_are_named(capsys, inputs, tmp_path):
    labels = tmp_path / "labels"
    (labels / "_SUCCESS").unlink()
    code, err = _validate(capsys, *inputs, f"data.manifest={tmp_path}/nope.json")
    assert code == 2
    assert f"data.manifest: {tmp_path}/nope.json does not exist" in err
    assert f"data.labels: {labels}: labels dataset not found" in err  # a folder no labels job wrote into
    # a labels job started here: one of its three shards done
    (labels / "_config.json").write_text(json.dumps({"fingerprint": {"valid_rows": 40, "rows_per_shard": 16}}))
    for sub, name in (("markers", "shard-00000.json"), ("shards", "shard-00000.parquet")):
        (labels / sub).mkdir()
        (labels / sub / name).write_text(json.dumps({"rows": 16, "labelled": 15, "errors": 1}))
    code, err = _validate(capsys, *inputs)
    assert code == 2 and "not found" not in err
    assert (f"data.labels: {labels}: labels dataset not complete (no _SUCCESS; 1 of 3 shards done, 15 rows "
            "labelled and 1 error rows so far — re-run sea-ray labels to finish)") in err


def test_a_hub_id_is_not_a_path(capsys, inputs):
    code, err = _validate(capsys, *inputs, "model.llm.tokenizer=HuggingFaceTB/SmolLM2-135M")
    assert "model.llm.tokenizer" not in err


def test_a_built_in_model_name_is_not_a_path_even_beside_a_folder_of_that_name(capsys, inputs, tmp_path,
                                                                                monkeypatch):
    (tmp_path / "custom").mkdir()  # the world presets' vision.name is the built-in name `custom`
    monkeypatch.chdir(tmp_path)
    code, err = _validate(capsys, *inputs)
    assert code == 0, err


def test_a_misspelt_relative_model_folder_is_named(capsys, inputs, tmp_path, monkeypatch):
    """``own/lm`` beside a folder ``own`` is a misspelt folder, not the hub id of an organisation
    ``own``: named before anything starts instead of a download attempt when the job starts."""
    (tmp_path / "own" / "llm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, err = _validate(capsys, *inputs, "model.llm.name_or_path=own/lm")
    assert code == 2 and "model.llm.name_or_path: own/lm does not exist" in err
    code, err = _validate(capsys, *inputs, "model.llm.name_or_path=elsewhere/lm")  # no folder `elsewhere`: a hub id
    assert "model.llm.name_or_path" not in err


def test_a_pipeline_names_its_missing_inputs(capsys, tmp_path):
    code = cli.main(["validate", "--config", str(REPO / "workflows/configs/tiny_pipeline.yaml"),
                     f"output={tmp_path}/out", "steps=[labels,align]", f"data.world={tmp_path}/no-world"])
    err = capsys.readouterr().err
    assert code == 2 and f"data.world: {tmp_path}/no-world does not exist" in err


@pytest.fixture
def counted(monkeypatch):
    """The align job's checks count their calls; its run does nothing."""
    calls = []

    def check(cfg):
        calls.append(cfg.job)
        return []

    job = dataclasses.replace(jobs.JOBS["align"], checks=(check,), run=lambda cfg: {"ran": True})
    monkeypatch.setitem(jobs.JOBS, "align", job)
    return calls


def test_checks_run_once_per_command(counted, inputs, capsys, monkeypatch):
    assert cli.main(["align", "--config", ALIGN, *inputs]) == 0
    assert json.loads(capsys.readouterr().out) == {"ran": True}
    assert counted == ["align"]
    counted.clear()
    assert cli.main(["validate", "--config", ALIGN, *inputs]) == 0
    assert counted == ["align"]
    counted.clear()

    class Jobs:
        def submit_job(self, **kwargs):
            return kwargs["submission_id"]

    monkeypatch.setattr(submit, "client", lambda address: Jobs())
    assert cli.main(["submit", "--address", "h:1", "--", "align", "--config", "workflows/configs/world_align.yaml",
                     *inputs]) == 0
    assert counted == ["align"]


def test_an_instruct_template_the_tokenizer_cannot_render_is_named_before_ray_starts(tmp_path):
    """`template: chat` without a chat template, or a chat template that does not render a
    conversation as a prefix of its continuation (every row would be skipped in the workers)."""
    from sea_ray import checks
    from sea_ray.config.loading import load_config
    from sea_ray.model.llm import load_tokenizer

    recipe = REPO / "workflows/configs/tiny_instruct.yaml"
    assert not any(p.startswith("template:") for p in checks.job_problems(load_config(recipe, job="instruct")))
    cfg = load_config(recipe, ["template=chat"], job="instruct")
    assert any(p.startswith("template: template 'chat' but") for p in checks.job_problems(cfg))
    tokenizer = load_tokenizer("world")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|a|>"
                               "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # drops earlier answers
    tokenizer.save_pretrained(tmp_path / "tok")
    cfg = load_config(recipe, [f"model.llm.tokenizer={tmp_path / 'tok'}"], job="instruct")
    assert any("does not render a conversation as a prefix" in p for p in checks.job_problems(cfg))
