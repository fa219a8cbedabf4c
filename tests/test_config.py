"""Config loading and the one validation pass."""

from pathlib import Path

import pytest
import yaml

from sea_ray.checks import job_problems, tower_grid
from sea_ray.config.loading import load_config, to_dict, validate
from sea_ray.config.schema import AlignConfig, InstructConfig
from sea_ray.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "workflows" / "configs").glob("*.yaml"))


def _align(**extra):
    raw = {"job": "align", "model": {"preset": "tiny-openclip-llama"},
           "data": {"manifest": "m.json", "labels": "labels"}, "batch": {"global_size": 16, "per_worker": 8}}
    for key, value in extra.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.job == yaml.safe_load(path.read_text())["job"]
    assert job_problems(cfg) == []


def test_shipped_configs_exist_for_every_job():
    jobs = {yaml.safe_load(p.read_text())["job"] for p in CONFIGS}
    assert jobs == {"labels", "align", "instruct", "tune", "eval", "pipeline", "benchmark", "study"}


def test_broken_config_lists_every_error():
    raw = _align(**{"optim.lrr": 0.1, "optim.warmup_ratio": 2.0, "sea.negatives": "everywhere",
                    "scaling.num_workers": 3, "sea.init_temperature": 5.0, "bogus": 1})
    with pytest.raises(ConfigError) as info:
        validate(raw)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "optim.lrr: unknown key; did you mean 'optim.lr'?" in text
    assert any(p.startswith("optim.warmup_ratio:") for p in problems)
    assert any(p.startswith("sea.negatives:") for p in problems)
    assert any(p.startswith("bogus: unknown key") for p in problems)
    # cross-field rules still run beside the field errors
    assert any("not divisible by batch.per_worker x scaling.num_workers" in p for p in problems)
    assert any(p.startswith("sea.init_temperature:") for p in problems)
    assert len(problems) == 6


def test_overrides_are_typed_and_dotted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_align()))
    cfg = load_config(path, ["optim.lr=3e-4", "sea.enabled=false", "data.max_length=99", "sea.window=3"])
    assert isinstance(cfg, AlignConfig)
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.sea.enabled is False and cfg.data.max_length == 99
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["optim.lr"])


def test_preset_expands_and_keys_beside_it_override():
    cfg = validate(_align(**{"model.adapter": {"type": "mlp3x_gelu"}}))
    assert cfg.model.adapter.type == "mlp3x_gelu"
    assert cfg.model.vision.custom["vision_cfg"]["patch_size"] == 8
    with pytest.raises(ConfigError, match="did you mean 'tiny-openclip-llama'"):
        validate(_align(**{"model.preset": "tiny-openclip-lama"}))


def test_stage_defaults_differ_only_where_the_paper_does():
    instruct = validate({"job": "instruct", "model": {"preset": "tiny-openclip-llama"},
                         "data": {"manifest": "m"}, "batch": {"per_worker": 16}})
    align = validate(_align())
    assert isinstance(instruct, InstructConfig)
    assert (align.optim.lr, instruct.optim.lr) == (1e-3, 2e-5)
    assert instruct.batch.global_size == 128 and AlignConfig.model_fields["batch"].default.global_size == 256


def test_sea_requires_labels_and_adapter_ids_are_checked():
    raw = _align(**{"model.adapter": {"type": "mlp0x_gelu"}})
    raw["data"].pop("labels")
    with pytest.raises(ConfigError) as info:
        validate(raw)
    text = "\n".join(info.value.problems)
    assert "data.labels: required" in text and "mlpNx_gelu needs N >= 1" in text
    raw["sea"] = {"enabled": False}
    raw["model"]["adapter"]["type"] = "mlp4x_gelu"
    assert validate(raw).sea.enabled is False


def test_label_grid_must_equal_tower_grid(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "_meta.json").write_text('{"grid": [7, 7], "top_n": 10}')
    cfg = validate(_align(**{"data.labels": str(labels)}))
    assert tower_grid(cfg.model.vision)[0] == (8, 8)
    problems = job_problems(cfg)
    assert len(problems) == 1 and "[7, 7] grid but the vision tower gives [8, 8]" in problems[0]
    assert "data.label_grid: resample" in problems[0]
    assert job_problems(validate(_align(**{"data.labels": str(labels), "data.label_grid": "resample"}))) == []
    (labels / "_meta.json").write_text('{"grid": [8, 8], "top_n": 10}')
    assert job_problems(cfg) == []
    assert any("sea.window" in p for p in job_problems(validate(_align(**{"data.labels": str(labels),
                                                                           "sea.window": 9}))))


def test_instruct_adapter_must_match_the_align_checkpoint(tmp_path):
    from sea_ray.config.loading import to_dict
    from sea_ray.train.checkpoint import step_dir_name, write_checkpoint

    run = tmp_path / "align-run"
    raw = {"job": "instruct", "model": {"preset": "tiny-openclip-llama"}, "data": {"manifest": "m.json"},
           "batch": {"global_size": 8, "per_worker": 8}, "init_adapter": str(run)}
    assert job_problems(validate(raw)) == []  # no checkpoint yet (a pipeline plans before align runs)
    aligned = validate(_align(**{"model.adapter.type": "mlp3x_gelu", "model.adapter.hidden_size": 24}))
    write_checkpoint(str(run / step_dir_name(4)), {}, None, {"step": 4}, to_dict(aligned), "align")
    problems = job_problems(validate(raw))
    assert len(problems) == 1 and problems[0].startswith("init_adapter:") and "mlp3x_gelu" in problems[0]
    raw["model"]["adapter"] = {"type": "mlp3x_gelu", "hidden_size": 24}
    assert job_problems(validate(raw)) == []


def test_named_tower_grid_and_unknown_arch():
    cfg = validate(_align(**{"model.preset": "clip-l336-vicuna7b"}))
    assert tower_grid(cfg.model.vision)[0] == (24, 24)
    bad = validate(_align(**{"model.vision": {"name": "ViT-L-14-3366"}}))
    grid, problems = tower_grid(bad.model.vision)
    assert grid is None and "did you mean 'ViT-L-14-336'" in problems[0]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dotted_keys_have_one_home():
    """get/set/flatten by dotted key (sea_ray.config.loading), the rule behind overrides, a search's
    parameters, and a pipeline's ``set`` (the quickstart's is the same)."""
    from sea_ray.config.loading import apply_overrides, flatten_dotted, get_dotted, set_dotted
    from sea_ray.pipeline import _apply_set

    raw = {"a": {"b": {"c": 1}, "n": None}, "d": 2}
    assert get_dotted(raw, "a.b.c") == 1 and get_dotted(raw, "a.n") is None
    assert get_dotted(raw, "a.x", "?") == "?" and get_dotted(raw, "d.e", "?") == "?" and get_dotted(raw, "a.n.x") is None
    assert set_dotted(raw, "a.b.e", [3]) is raw and raw["a"]["b"] == {"c": 1, "e": [3]}
    set_dotted(raw, "d.f.g", 4)  # a value on the way becomes a mapping
    assert raw["d"] == {"f": {"g": 4}}
    assert flatten_dotted({"a": {"b": 1, "c": {}, "x.y": 2}, "d": [1]}) == {"a.b": 1, "a.x.y": 2, "d": [1]}
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2", "e.f=[1, 2]"]) == {"a": {"b": 1, "c": 2}, "e": {"f": [1, 2]}}
    base = {"optim": {"lr": 1.0, "wd": 0.0}, "model": {"adapter": {"type": "mlp2x_gelu", "hidden_size": 8}}}
    # a pipeline's (and the quickstart's) set: nested mappings merge, a dotted key replaces its value
    out = _apply_set(base, {"optim": {"lr": 2.0}, "model.adapter": {"type": "linear"}})
    assert out == {"optim": {"lr": 2.0, "wd": 0.0}, "model": {"adapter": {"type": "linear"}}}


def test_local_paths_become_absolute_by_their_markers(tmp_path, monkeypatch):
    """sea_ray.paths.absolute_paths: every marked input/output absolute, a model value only when
    it is an existing local path; what Ray Train workers and Tune trials see."""
    from sea_ray.config.loading import path_fields
    from sea_ray.paths import absolute, absolute_paths
    from sea_ray.train import driver

    monkeypatch.chdir(tmp_path)
    assert [absolute(v) for v in (None, "", "s3://b/x", "hf://m", "rel/x", "/abs")] == \
        [None, "", "s3://b/x", "hf://m", str(tmp_path / "rel/x"), "/abs"]
    assert absolute("file://rel/x") == str(tmp_path / "rel/x") and absolute("file:///abs/x") == "/abs/x"
    for name in ("tok", "custom", "world"):
        (tmp_path / name).mkdir()
    cfg = validate({"job": "instruct", "model": {"preset": "tiny-openclip-llama", "llm": {"tokenizer": "tok"}},
                    "init_adapter": "runs/a", "run": {"storage": "runs"},
                    "data": {"manifest": "w/i.json", "image_root": "s3://b/images"}, "batch": {"per_worker": 16}})
    out = absolute_paths(cfg)
    assert out.data.manifest == str(tmp_path / "w/i.json") and out.data.image_root == "s3://b/images"
    assert out.init_adapter == str(tmp_path / "runs/a") and out.run.storage == str(tmp_path / "runs")
    assert out.model.llm.tokenizer == str(tmp_path / "tok") and out.model.vision.name == "custom"
    assert cfg.data.manifest == "w/i.json" and [k for k, _, _ in path_fields(out)] == [k for k, _, _ in path_fields(cfg)]
    world_tok = validate({**cfg.model_dump(mode="json"), "model": {"preset": "tiny-openclip-llama",
                          "llm": {"tokenizer": "world", "name_or_path": "org/hub-llm", "config": None}}})
    kept = absolute_paths(world_tok).model.llm
    assert kept.tokenizer == "world" and kept.name_or_path == "org/hub-llm"  # ./world exists: still the name
    ev = validate({"job": "eval", "checkpoint": "runs/a", "world": "w", "curves": ["c1", "s3://b/c2"]})
    assert absolute_paths(ev).curves == [str(tmp_path / "c1"), "s3://b/c2"]
    assert absolute_paths(ev).output == str(tmp_path / "eval")
    assert driver.absolute_paths is absolute_paths  # what Ray Train workers see


# --------------------------------------------------------------------------- user presets, --print-config


def _user_preset(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "my-vlm.yaml").write_text(
        "preset: tiny-openclip-llama\nadapter: {type: mlp2x_gelu, hidden_size: 96}\nllm: {dtype: float32}\n")
    (tmp_path / "align.yaml").write_text("job: align\nmodel: {preset: models/my-vlm.yaml, llm: {attn_implementation: "
                                         "eager}}\ndata: {manifest: x.json}\nsea: {enabled: false}\n")
    return tmp_path / "align.yaml"


def test_a_model_block_in_its_own_file_is_a_preset_next_to_the_config(tmp_path, monkeypatch):
    config = _user_preset(tmp_path)
    monkeypatch.chdir("/")  # the file is found next to the config, not in the working directory
    cfg = load_config(config)
    assert cfg.model.adapter.hidden_size == 96  # from the file
    assert cfg.model.llm.attn_implementation == "eager"  # the config's own key wins
    builtin = validate({"job": "align", "model": {"preset": "tiny-openclip-llama"}, "data": {"manifest": "x"},
                        "sea": {"enabled": False}})
    assert cfg.model.vision == builtin.model.vision  # the built-in preset the file names
    assert cfg.model.preset == str(tmp_path / "models" / "my-vlm.yaml")


def test_a_missing_or_bad_preset_file_is_a_config_error(tmp_path):
    config = _user_preset(tmp_path)
    with pytest.raises(ConfigError, match="preset file not found: .*nope.yaml"):
        load_config(config, ["model.preset=nope.yaml"])
    (tmp_path / "models" / "my-vlm.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a model block"):
        load_config(config)


def test_print_config_shows_every_default_and_reads_back_as_the_same_config(tmp_path, capsys):
    from sea_ray import cli

    config = _user_preset(tmp_path)
    assert cli.main(["align", "--config", str(config), "--print-config", "optim.lr=3e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 3e-4 and printed["stall_timeout_s"] == 1800  # a default, spelled out
    assert printed["model"]["adapter"]["hidden_size"] == 96
    assert to_dict(validate(printed)) == printed


# --------------------------------------------------------------------------- LoRA (model.llm.lora)


def _instruct(lora: dict, preset="tiny-openclip-llama", **extra):
    raw = {"job": "instruct", "model": {"preset": preset, "llm": {"lora": {"enabled": True, **lora}}},
           "data": {"manifest": "m.json"}, "batch": {"global_size": 8, "per_worker": 8}}
    raw.update(extra)
    return raw


def _problems(raw) -> list[str]:
    try:
        return job_problems(validate(raw))
    except ConfigError as exc:
        return exc.problems


def test_lora_rank_and_target_modules_are_checked_against_the_llm():
    assert _problems(_instruct({"rank": 8, "target_modules": ["q_proj", "v_proj"]})) == []
    assert _problems(_instruct({})) == []  # all-linear
    assert _problems(_instruct({"rank": 0})) == ["model.llm.lora.rank: Input should be greater than or equal to 1 "
                                                 "(got 0)"]
    assert _problems(_instruct({"target_modules": []}))[0].startswith("model.llm.lora.target_modules: give at least")
    # a misspelt name is refused with the LLM's linear layers, though PEFT takes a list one name of which matches
    [misspelt] = _problems(_instruct({"target_modules": ["q_proj", "v_prj"]}))
    assert misspelt.startswith("model.llm.lora.target_modules: 'v_prj' (did you mean 'v_proj'?) names no module "
                               "of the LLM (LlamaForCausalLM)") and "q_proj, up_proj, v_proj" in misspelt
    # a module PEFT cannot put LoRA on (a norm), found by PEFT itself on the LLM's meta-device skeleton
    [norm] = _problems(_instruct({"target_modules": ["input_layernorm"]}))
    assert norm.startswith("model.llm.lora.target_modules: Target module LlamaRMSNorm") and "not supported" in norm
    # a loaded LLM (a folder with weights) is checked from its config.json alone
    assert _problems(_instruct({"target_modules": ["qkv_proj"]}, preset="world-clip-llama"))[0].startswith(
        "model.llm.lora.target_modules: 'qkv_proj' (did you mean 'v_proj'?) names no module")
    # align keeps the LLM frozen: LoRA there is a mistake, not a no-op
    assert _problems(_align(**{"model.llm.lora.enabled": True})) == [
        "model.llm.lora.enabled: align keeps the LLM frozen, so there is nothing to train with LoRA: set it in the "
        "instruct config"]


def test_qlora_on_a_cpu_is_a_config_error_naming_the_field_before_ray_starts(tmp_path, monkeypatch, capsys):
    from sea_ray import cli
    from sea_ray.train import driver

    raw = _instruct({"qlora": True}, preset="world-clip-llama")
    [cpu] = _problems(raw)
    assert cpu.startswith("model.llm.lora.qlora: QLoRA's 4-bit base runs on CUDA GPUs only (bitsandbytes); this "
                          "config trains on CPUs (scaling.use_gpu=false)")
    path = tmp_path / "qlora.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(driver, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    assert cli.main(["instruct", "--config", str(path)]) == 2
    assert "model.llm.lora.qlora: QLoRA's 4-bit base runs on CUDA GPUs only" in capsys.readouterr().err
    # on GPUs, without bitsandbytes (never installed on the CPU machines): the pre-flight check names the extra
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        real(name, *a))
    gpu = _problems(dict(raw, scaling={"use_gpu": True}))
    assert gpu == ["model.llm.lora.qlora: the 4-bit base needs the bitsandbytes package, which is not installed here "
                   "(and QLoRA runs on CUDA GPUs only): install the qlora extra, pip install -c constraints.txt -e "
                   "'.[qlora]', or set model.llm.lora.qlora=false for LoRA on the full-precision base"]
    assert _problems(dict(raw, scaling={"use_gpu": True}, strategy="fsdp"))[0].startswith(
        "model.llm.lora.qlora: not with strategy fsdp")
    assert _problems(_instruct({"qlora": True}, scaling={"use_gpu": True}))[0].startswith(
        "model.llm.lora.qlora: needs model.llm.name_or_path")  # a random-init LLM has no weights to quantize
    assert any(p.startswith("model.llm.lora.qlora: QLoRA trains LoRA weights")
               for p in _problems(_instruct({"enabled": False, "qlora": True}, preset="world-clip-llama")))


def test_an_elastic_worker_range_needs_a_global_batch_that_divides_at_every_size():
    cfg = validate(_align(**{"scaling.num_workers": [1, 2], "batch.global_size": 8, "batch.per_worker": 4}))
    assert cfg.scaling.elastic and list(cfg.scaling.world_sizes) == [1, 2]
    assert not validate(_align(**{"scaling.num_workers": 2})).scaling.elastic
    with pytest.raises(ConfigError) as info:
        validate(_align(**{"scaling.num_workers": [2, 3], "batch.global_size": 8, "batch.per_worker": 4}))
    assert info.value.problems == ["batch.global_size: 8 is not divisible by batch.per_worker x scaling.num_workers "
                                   "= 4 x 3 (of the range [2, 3]) = 12"]
    for bad in ([2, 1], [0, 2], 0, [1, 2, 3]):
        with pytest.raises(ConfigError, match="scaling.num_workers"):
            validate(_align(**{"scaling.num_workers": bad}))
    with pytest.raises(ConfigError, match="scaling.resources_per_worker: .*custom resources"):
        validate(_align(**{"scaling.resources_per_worker": {"CPU": 1}}))
