"""The quickstart: its configs (the two arms differ only in SEA), one seed x arm chain without
Ray, and the whole command at reduced size on the session's local Ray."""

from __future__ import annotations

import json

import pytest

from sea_ray.config.loading import to_dict, validate
from sea_ray.errors import ConfigError


def _diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    out = set()
    for k in keys:
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.add(f"{prefix}{k}")
    return out


def test_arms_differ_only_in_sea_and_names(tmp_path):
    from sea_ray.quickstart import build_configs

    plan = build_configs(validate({"job": "quickstart", "output": str(tmp_path), "seeds": [0, 1]}))
    chains = plan["chains"]
    assert [(c["seed"], c["arm"]) for c in chains] == [(0, "baseline"), (0, "+SEA"), (1, "baseline"), (1, "+SEA")]
    base, sea = chains[0], chains[1]
    assert _diff(to_dict(base["align"]), to_dict(sea["align"])) == {"sea.enabled", "run.name"}
    assert _diff(to_dict(base["instruct"]), to_dict(sea["instruct"])) == {"run.name", "init_adapter"}
    assert base["align"].data.labels == sea["align"].data.labels == plan["labels"].output
    assert sea["instruct"].init_adapter.endswith("align-sea-s0")
    assert _diff(to_dict(chains[0]["align"]), to_dict(chains[2]["align"])) == {"run.seed", "run.name"}
    assert plan["labels"].labeler.features == "dense"
    assert sea["align"].sea.top_n <= plan["labels"].labeler.top_n  # valid again once the labels exist
    assert plan["audit"].data.manifest.endswith("test/pretrain.json")


def test_bad_settings_are_listed_per_job_before_anything_runs(tmp_path):
    from sea_ray.quickstart import build_configs

    with pytest.raises(ConfigError) as exc:
        build_configs(validate({"job": "quickstart", "output": str(tmp_path), "seeds": [0],
                                "set": {"align": {"optim": {"lr": -1}}, "eval": {"top_k": 0}}}))
    text = str(exc.value)
    assert "align[baseline-s0]: optim.lr" in text and "align[sea-s0]: optim.lr" in text
    assert "eval[baseline-s0]: top_k" in text
    with pytest.raises(ConfigError, match="seeds"):
        validate({"job": "quickstart", "seeds": []})


def test_a_model_folder_that_is_not_there_stops_the_quickstart_before_anything_runs(tmp_path, capsys):
    from sea_ray.cli import main

    typo = ["set.instruct.model.llm.name_or_path=" + str(tmp_path / "my-llm"), f"output={tmp_path / 'qs'}"]
    assert main(["quickstart", *typo]) == 2
    assert f"instruct.model.llm.name_or_path: {tmp_path / 'my-llm'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()  # no world made, no Ray started
    (tmp_path / "config.yaml").write_text(json.dumps({"job": "quickstart", "set": {"align": {
        "model.vision.weights": str(tmp_path / "clip.safetensors")}}}))
    assert main(["validate", "--config", str(tmp_path / "config.yaml")]) == 2
    assert f"align.model.vision.weights: {tmp_path / 'clip.safetensors'} does not exist" in capsys.readouterr().err
    assert main(["validate", "--config", str(tmp_path / "config.yaml"), "--skip-inputs"]) == 0  # settings only


def test_one_chain_in_process_without_ray(tmp_path, world_dir):
    """align -> instruct -> eval of the +SEA arm with oracle labels, on the session world."""
    from sea_ray.quickstart import run_chain
    from tests.chains import world_chain

    chain, data = world_chain(world_dir, tmp_path, align={"max_steps": 2, "global_batch": 4},
                              instruct={"max_steps": 2, "global_batch": 4}, eval_max_samples=2)
    assert data["align_rows"] == 48 == len(data["align"]["sample_id"]) and data["instruct_rows"] > 48
    assert data["align"]["image"].shape == (48, 64, 64, 3) and len(data["align"]["label_ids"][0]) == 64 * 3
    metrics = run_chain(chain, data, 1, None)
    for key in ("nw_align", "nw_final", "tacs", "modality_gap", "qa", "ppl_before", "ppl_after", "ppl_english_before",
                "ppl_english_after"):
        assert metrics[key] is not None, key
    assert 0 <= metrics["qa"] <= 1 and metrics["ppl_before"] != metrics["ppl_after"]
    report = json.loads((tmp_path / "eval" / "sea-s0" / "report.json").read_text())
    assert report["stage"] == "instruct" and report["step"] == 2
    # finished: a re-run with the same job configs takes its metrics; any other setting runs it again
    from sea_ray.quickstart import finished_chain

    assert finished_chain(chain) == metrics
    import torch

    kept = json.loads((tmp_path / "eval" / "sea-s0" / "chain.json").read_text())
    assert kept["machine"]["cpu"] and kept["machine"]["torch"] == torch.__version__  # where it was made
    other = dict(chain, instruct=chain["instruct"].model_copy(update={"init_adapter": str(tmp_path / "elsewhere")}))
    assert finished_chain(other) is None


@pytest.mark.ray
@pytest.mark.slow
def test_quickstart_end_to_end_at_reduced_size(ray_local, tmp_path, capsys, monkeypatch):
    from sea_ray.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", f"output={out}", "seeds=[0]", "world.num_images=40", "align.max_steps=2",
                 "align.global_batch=4", "instruct.max_steps=2", "instruct.global_batch=4",
                 "eval_max_samples=3"]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5] world", "[2/5] labels", "[3/5] ingest", "[4/5] train + eval", "[5/5] report"):
        assert step in printed
    assert "| baseline |" in printed and "| +SEA |" in printed and "step    2/2" in printed
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in results["results"]} == {"baseline", "+SEA"}
    assert results["label_audit"]["images"] == 4 and results["timings_s"]["total"] > 0
    md = (out / "report.md").read_text()
    assert "| model |" in md and "label audit" in md.lower()
    for name in ("qa_by_type.png", "alignment.png", "loss_curves.png", "label_audit.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    assert (out / "labels" / "_SUCCESS").exists() and (out / "eval" / "sea-s0" / "report.md").exists()
    # the same command again: both chains are finished, their metrics reused, nothing trained; the
    # labels and their audit are reused too
    def no_audit(*args, **kwargs):
        raise AssertionError("the label audit ran again on complete labels")

    monkeypatch.setattr("sea_ray.world.audit.audit", no_audit)
    assert main(["quickstart", f"output={out}", "seeds=[0]", "world.num_images=40", "align.max_steps=2",
                 "align.global_batch=4", "instruct.max_steps=2", "instruct.global_batch=4",
                 "eval_max_samples=3"]) == 0
    again = capsys.readouterr().out
    assert "2 of 2 chains finished already" in again and "step    2/2" not in again
    again_results = json.loads((out / "results.json").read_text())
    assert again_results["results"] == results["results"] and again_results["label_audit"] == results["label_audit"]
    # one chain left unfinished: only it runs (from its complete checkpoints), the other is reused
    (out / "eval" / "sea-s0" / "chain.json").unlink()
    assert main(["quickstart", f"output={out}", "seeds=[0]", "world.num_images=40", "align.max_steps=2",
                 "align.global_batch=4", "instruct.max_steps=2", "instruct.global_batch=4",
                 "eval_max_samples=3"]) == 0
    assert "1 of 2 chains finished already" in capsys.readouterr().out
    partly = json.loads((out / "results.json").read_text())["results"]
    assert [r["arm"] for r in partly] == ["baseline", "+SEA"] and partly[0] == results["results"][0]
    assert partly[1]["qa"] == results["results"][1]["qa"]  # evaluated again: the same model, the same answers
    assert (out / "eval" / "sea-s0" / "chain.json").exists()
    # a second run with other settings is refused, not mixed in
    assert main(["quickstart", f"output={out}", "seeds=[0]", "world.num_images=41"]) == 1


def test_complete_labels_keep_their_audit(tmp_path, monkeypatch):
    """Labels reused as complete (a re-run, or a study's shared labels) reuse the audit written with
    them; only labels made now are audited."""
    from sea_ray.quickstart import _audit

    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "_meta.json").write_text(json.dumps({"vocab": {"words": ["red", "cube"]}}))
    (labels / "_audit.json").write_text(json.dumps({"images": 7}))
    fresh = {"images": 9}
    monkeypatch.setattr("sea_ray.world.audit.audit", lambda *a, **k: fresh)
    monkeypatch.setattr("sea_ray.world.audit.to_markdown", lambda report: "")
    assert _audit({"audit": None}, str(tmp_path / "world"), str(labels), reuse=True) == {"images": 7}
    assert _audit({"audit": None}, str(tmp_path / "world"), str(labels), reuse=False) == fresh
    assert (labels / "vocab_words.txt").read_text() == "red\ncube\n"
    assert json.loads((labels / "_audit.json").read_text()) == fresh
