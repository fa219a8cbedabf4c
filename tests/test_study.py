"""``sea-ray study``: the paired statistics, the plan's checks, and a tiny study end to end."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from sea_ray.config.loading import validate
from sea_ray.errors import ConfigError
from sea_ray.study import llm_dir, paired, plan, run_order

TINY = {"world.num_images": 40, "align.max_steps": 2, "align.global_batch": 4, "instruct.max_steps": 2,
        "instruct.global_batch": 4, "eval_max_samples": 3, "seeds": [0, 1]}


def test_paired_statistics_by_hand():
    baseline = [0.10, 0.20, 0.30, 0.40, 0.50]
    d = np.array([0.10, 0.05, 0.20, -0.05, 0.10])
    s = paired(baseline, list(np.array(baseline) + d))
    mean, sd = d.mean(), d.std(ddof=1)
    assert s["n"] == 5 and s["diff_mean"] == pytest.approx(mean) and s["diff_std"] == pytest.approx(sd)
    # t quantile of 4 degrees of freedom at 97.5%: 2.7764451
    half = 2.7764451 * sd / math.sqrt(5)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((mean - half, mean + half), rel=1e-6)
    t = mean / (sd / math.sqrt(5))
    # p: the t density of 4 degrees of freedom integrated numerically beyond t = 1.9695 (twice)
    assert t == pytest.approx(1.96946, rel=1e-4) and s["p_t"] == pytest.approx(0.12024, abs=1e-4)
    # sign flips: of the 32, those whose |sum| reaches the observed 0.40: the identity (0.40), the -0.05
    # flipped (0.50), both 0.05s flipped (0.40), and the mirror image of each: 6 / 32
    assert s["p_sign_flip"] == pytest.approx(6 / 32)
    assert s["sea_wins"] == 4 and s["relative_gain"] == pytest.approx(mean / 0.30)


def test_paired_edge_cases():
    # every seed better: the sign-flip test's smallest p for 5 seeds, 2/32
    assert paired([0, 0, 0, 0, 0], [1, 2, 3, 4, 5])["p_sign_flip"] == pytest.approx(2 / 32)
    same = paired([0.1, 0.2, 0.3], [0.2, 0.3, 0.4])  # the same gain on every seed: no spread
    assert same["diff_std"] == pytest.approx(0) and same["ci_low"] == pytest.approx(0.1) == same["ci_high"]
    one = paired([0.5], [0.6])
    assert one["n"] == 1 and one["p_t"] is None and one["ci_low"] is None
    with pytest.raises(ValueError, match="same seeds"):
        paired([0.1, 0.2], [0.3])


def _study(tmp_path, comparisons, **extra):
    return validate({"job": "study", "output": str(tmp_path / "study"), "base": TINY, "comparisons": comparisons,
                     **extra}, job="study")


def test_the_plan_checks_every_comparison_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as err:
        plan(_study(tmp_path, [
            {"name": "main"}, {"name": "main"},
            {"name": "typo", "set": {"align.max_stepz": 3}},
            {"name": "lr", "set": {"align.lr": 0.01}, "baseline_from": "main"},   # the baseline uses the lr
            {"name": "ghost", "baseline_from": "nowhere"},
            {"name": "more-seeds", "set": {"seeds": [0, 1, 2], "sea.weight": 2.0}, "baseline_from": "main"},
            {"name": "mine", "set": {"set.align": {"model.llm.name_or_path": str(tmp_path / "my-llm")}}}]))
    text = "\n".join(err.value.problems)
    assert "'main' is named twice" in text
    assert "typo" in text and "max_stepz" in text
    assert "(lr): baseline_from 'main' differs in align" in text
    assert "(ghost): baseline_from names no valid comparison" in text
    assert "(more-seeds): baseline_from 'main' has no seeds [2]" in text
    assert f"(mine): align.model.llm.name_or_path: {tmp_path / 'my-llm'} does not exist" in text  # not in a task
    assert plan(_study(tmp_path, [{"name": "mine", "set": {"set.align": {"model.llm.name_or_path": "x/y/z"}}}]),
                inputs=False)  # validate --skip-inputs: the settings only
    # SEA's own settings may differ from the lender's: the baseline does not use them
    plans = plan(_study(tmp_path, [{"name": "main"},
                                   {"name": "w3", "set": {"sea.weight": 3.0, "labels_top_n": 3, "seeds": [1]},
                                    "baseline_from": "main"}]))
    w3, main = plans["w3"].quickstart, plans["main"].quickstart
    assert w3.arms == ["+SEA"] and w3.sea.weight == 3.0 and main.arms == ["baseline", "+SEA"]


def test_the_config_order_is_the_run_order_but_a_lender_runs_before_its_borrowers(tmp_path):
    cfg = _study(tmp_path, [{"name": "w3", "set": {"sea.weight": 3.0}, "baseline_from": "main"},
                            {"name": "other", "set": {"instruct.lr": 1.0e-4}},
                            {"name": "main"}, {"name": "last"}])
    assert [c.name for c in run_order(cfg)] == ["other", "main", "w3", "last"]


def test_llm_layers_make_the_llm_of_align_and_instruct(tmp_path):
    from sea_ray.quickstart import build_configs

    cfg = _study(tmp_path, [{"name": "deep", "llm_layers": 6}])
    planned = plan(cfg)["deep"]
    chain = build_configs(planned.quickstart)["chains"][0]
    assert chain["align"].model.llm.name_or_path == chain["instruct"].model.llm.name_or_path == llm_dir(cfg, 6)
    assert planned.llm == llm_dir(cfg, 6) == os.path.join(str(tmp_path), "study", "llms", "world-llama-6l")


@pytest.mark.parametrize("layers", [2, 8])
def test_the_shipped_world_llamas_are_used_where_their_recipe_is_the_studys(tmp_path, layers):
    """The 2- and 8-layer world Llamas ship, trained by the study's own recipe (the 4-layer one's at
    another depth): a study with the default ``llm_train`` uses them, one with another trains its own."""
    from transformers import AutoConfig, AutoTokenizer

    from sea_ray.presets import WORLD_LLM_CONFIG, world_llm_dir
    from sea_ray.study import llm_recipe, trained_by

    shipped = world_llm_dir(layers)
    assert AutoConfig.from_pretrained(shipped).num_hidden_layers == layers
    assert len(AutoTokenizer.from_pretrained(shipped)) == AutoConfig.from_pretrained(shipped).vocab_size
    recipe = json.load(open(os.path.join(shipped, "sea_ray_recipe.json")))
    reference = json.load(open(os.path.join(world_llm_dir(), "sea_ray_recipe.json")))
    assert recipe["config"] == dict(WORLD_LLM_CONFIG, num_hidden_layers=layers)
    assert {k: v for k, v in recipe["train"].items() if k != "seconds"} == \
        {k: v for k, v in reference["train"].items() if k != "seconds"}
    cfg = _study(tmp_path, [{"name": "a", "llm_layers": layers}])
    assert llm_dir(cfg, layers) == shipped and trained_by(world_llm_dir(), llm_recipe(cfg, 4))
    other = _study(tmp_path, [{"name": "a", "llm_layers": layers}], llm_train={"epochs": 1})
    assert llm_dir(other, layers) == os.path.join(str(tmp_path), "study", "llms", f"world-llama-{layers}l")
    # any recorded setting that differs (here the architecture) is another recipe
    assert not trained_by(shipped, dict(llm_recipe(cfg, layers), config=dict(WORLD_LLM_CONFIG, hidden_size=64,
                                                                            num_hidden_layers=layers)))
    assert not trained_by(str(tmp_path / "nothing"), llm_recipe(cfg, layers))


def test_the_report_counts_the_machines_that_made_the_chains(tmp_path):
    from sea_ray.study import _machines

    made = {"cpu": "AMD EPYC 9B14", "cpu_capability": "AVX512", "torch": "2.14.1"}
    records = []
    for chain, record in (("baseline-s0", {"machine": made}), ("sea-s0", {"machine": made}), ("sea-s1", {})):
        records.append(tmp_path / chain / "chain.json")
        records[-1].parent.mkdir()
        records[-1].write_text(json.dumps(dict(record, fingerprint="x", metrics={})))
    records.append(tmp_path / "before-records" / "chain.json")  # reused from before chains had records
    assert _machines(records) == {"AMD EPYC 9B14 (AVX512, torch 2.14.1)": 2, "not recorded": 2}


def test_slots_go_to_the_lowest_priority_waiting_and_come_back():
    import threading

    from sea_ray.quickstart import Slots

    slots = Slots(1)
    slots.want(2)
    assert not slots.try_take(3)  # priority 2 waits: 3 must not jump the queue
    assert slots.try_take(2) and not slots.try_take(2)  # one slot only
    slots.want(2, False)
    got: list[int] = []

    def wait(priority: int) -> None:
        with slots.hold(priority):
            got.append(priority)

    threads = [threading.Thread(target=wait, args=(p,)) for p in (5, 1)]
    for t in threads:
        t.start()
    for _ in range(50):  # both waiting before the slot comes back
        if len(slots._wanting) == 2:
            break
        threading.Event().wait(0.05)
    slots.give()
    for t in threads:
        t.join(timeout=10)
    assert got == [1, 5]


@pytest.mark.slow
def test_a_tiny_study_end_to_end(ray_local, tmp_path, capsys):
    from sea_ray.cli import main

    cfg = tmp_path / "study.yaml"
    cfg.write_text(json.dumps({"job": "study", "output": str(tmp_path / "study"), "base": TINY,
                               "llm_train": {"num_images": 40, "epochs": 1},
                               "comparisons": [
                                   {"name": "main", "question": "does SEA help"},
                                   {"name": "w3", "question": "sensitivity", "set": {"sea.weight": 3.0},
                                    "baseline_from": "main"},
                                   {"name": "llm1", "question": "llm size", "llm_layers": 1,
                                    "set": {"seeds": [0]}}]}))
    assert main(["study", "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "study"
    assert "study [3/3]" in printed and "| main |" in printed
    report = json.loads((out / "study.json").read_text())
    by = {c["name"]: c for c in report["comparisons"]}
    assert by["main"]["seeds"] == [0, 1] and by["llm1"]["seeds"] == [0]
    # w3 trained only +SEA and is paired with main's baseline arm, seed by seed
    w3 = json.loads((out / "w3" / "results.json").read_text())["results"]
    assert {r["arm"] for r in w3} == {"+SEA"}
    assert by["w3"]["per_seed"]["1"]["baseline"] == by["main"]["per_seed"]["1"]["baseline"]
    qa = by["main"]["stats"]["qa"]
    rows = by["main"]["per_seed"]
    assert qa["diff_mean"] == pytest.approx(np.mean([rows[s]["+SEA"]["qa"] - rows[s]["baseline"]["qa"]
                                                     for s in ("0", "1")]))
    assert by["main"]["stats"]["ppl_english_after"]["n"] == 2
    # one world and one labels dataset for all three (same world, preset and labels settings)
    assert len({os.path.realpath(out / c / "labels") for c in ("main", "w3", "llm1")}) == 1
    assert (out / "llms" / "world-llama-1l" / "model.safetensors").exists()
    assert by["llm1"]["llm_parameters"] < by["main"]["llm_parameters"]
    md = (out / "study.md").read_text()
    assert "## sensitivity" in md and "### w3" in md and "baseline arm from `main`" in md
    from sea_ray.quickstart import machine

    made_here = f"{machine()['cpu']} ({machine()['cpu_capability']}, torch {machine()['torch']})"
    # w3's statistics pair its +SEA chains with main's baseline chains: all four count
    assert by["main"]["machines"] == {made_here: 4} and f"| w3 | {made_here}: 4 |" in md
    assert (out / "plots" / "qa_gain.png").stat().st_size > 1000
    # the same command again trains nothing: every chain and the Llama are reused, the report is the same
    assert main(["study", "--config", str(cfg)]) == 0
    again = capsys.readouterr().out
    assert "4 of 4 chains finished already" in again and again.count("2 of 2 chains finished already") == 2
    assert "training a 1-layer" not in again and "step    2/2" not in again
    assert json.loads((out / "study.json").read_text())["comparisons"] == report["comparisons"]
