"""Bad data fails loudly, and the papercuts around labels.

A labels job or an import whose error rows exceed ``max_error_fraction`` ends non-zero with an
error summary and no ``_SUCCESS`` (a labels job then resumes once the data is fixed); pre-flight
refuses a labels dataset with no labelled row or too many error rows, names a missing labels
dataset apart from an unfinished one, refuses a ``select_layer`` the tower does not have and
warns about labels made by another tower; jobs use the image root the importer recorded; the
labels job needs no LLM. The labels runs use the session's local Ray (``ray_local``).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from sea_ray import cli, jobs
from sea_ray.checks import job_problems
from sea_ray.config.loading import validate
from sea_ray.data import budget
from sea_ray.data.importer import ERRORS_FILE, import_manifest
from sea_ray.data.manifest import image_root_for, import_record
from sea_ray.errors import ConfigError, DataError, TooManyErrors
from sea_ray.labels import dataset as D
from sea_ray.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
TINY_VISION = PRESETS["tiny-openclip-llama"]["vision"]  # 64 px, 8 px patches (8 x 8), 3 blocks
ROWS_PER_SHARD = 16


def _labels_raw(manifest, output, image_root=None, **data) -> dict:
    """A labels config with the tiny tower and no LLM (the labels job uses only the tower)."""
    return {"job": "labels", "output": str(output), "model": {"vision": copy.deepcopy(TINY_VISION)},
            "data": {"manifest": str(manifest), "image_root": str(image_root) if image_root else None, **data},
            "vocab": {"min_count": 1}, "labeler": {"top_n": 3, "batch_size": 16},
            "compute": {"num_actors": 1, "cpus_per_actor": 1, "rows_per_shard": ROWS_PER_SHARD}}


def _align(labels, **extra):
    raw = {"job": "align", "model": {"preset": "tiny-openclip-llama"},
           "data": {"manifest": "m.json", "labels": str(labels)}, "batch": {"global_size": 16, "per_worker": 8}}
    for key, value in extra.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def _write_labels_meta(folder: Path, labelled: int, errors: int, rows: int = 48, vision=None, transform=None,
                       complete: bool = True) -> Path:
    """A labels folder as the labels job leaves it (``_meta.json`` and ``_SUCCESS``), without shards."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = validate(_align(folder)).model.vision.model_dump(mode="json") if vision is None else vision
    meta = {"grid": [8, 8], "top_n": 10, "transform": transform or {"image_size": 64, "patch_size": 8, "grid": [8, 8]},
            "model": {"vision": vision},
            "counts": {"manifest_rows": rows, "valid_rows": rows, "labelled": labelled, "errors": errors,
                       "errors_by_stage": {"manifest": 0, "read": errors}, "shards": 3}}
    (folder / "_meta.json").write_text(json.dumps(meta))
    if complete:
        (folder / "_SUCCESS").write_text("")
    return folder


# --------------------------------------------------------------------------- the rule


def test_the_budget_rule_and_reason_kinds():
    assert not budget.over_budget(2, 48, 0.05) and budget.over_budget(3, 48, 0.05)  # 2.4 rows allowed
    assert not budget.over_budget(5, 100, 0.05) and budget.over_budget(6, 100, 0.05)  # exactly 5 % is allowed
    assert budget.over_budget(1, 1000, 0.0) and not budget.over_budget(0, 0, 0.0)
    assert not budget.over_budget(48, 48, 1.0)
    assert budget.reason_kind("missing file: /data/images/x.jpg") == "missing file"
    assert budget.reason_kind("cannot read s3://b/x.jpg: ClientError: denied") == "cannot read ..."
    assert budget.reason_kind("duplicate id 'abc'") == "duplicate id '...'"
    assert budget.reason_kind("truncated or corrupt image data (OSError: broken)") == "truncated or corrupt image data"
    text = budget.describe([{"row": i, "image_id": f"id{i}", "image": f"{i}.png", "stage": "read",
                             "reason": f"missing file: /x/{i}.png"} for i in range(5)], "data.image_root", None)
    assert "by stage: read 5" in text and "5  read: missing file" in text
    assert "row 0, id id0, image 0.png: missing file: /x/0.png" in text and "id3" not in text  # a few examples
    assert "hint: data.image_root is not set" in text
    assert "hint" not in budget.describe([{"stage": "read", "reason": "missing file: /x"}], "data.image_root", "/x")


def test_max_error_fraction_is_a_fraction():
    with pytest.raises(ConfigError, match="max_error_fraction"):
        validate(_labels_raw("m.json", "out", max_error_fraction=1.5))
    assert validate(_labels_raw("m.json", "out")).data.max_error_fraction == 0.05


# --------------------------------------------------------------------------- the labels job


@pytest.mark.ray
def test_an_all_bad_labels_job_fails_without_success_then_resumes_once_fixed(ray_local, world_dir, tmp_path,
                                                                               capsys):
    """data.image_root forgotten: every image is missing. The job stops at the first shard over the
    budget, exits 1 with the summary and writes no _SUCCESS; run again with the root, it redoes
    the shard that holds errors and labels the rest."""
    from sea_ray.labels.job import run

    manifest = world_dir / "train" / "pretrain.json"  # 48 rows, image paths relative to <world>/images
    out = tmp_path / "labels"
    cfg_path = tmp_path / "labels.yaml"
    cfg_path.write_text(json.dumps(_labels_raw(manifest, out)))
    assert cli.main(["labels", "--config", str(cfg_path)]) == 1
    err = capsys.readouterr().err
    assert ("error: labels: at least 16 of 48 manifest rows are error rows (33.3%), more than "
            "data.max_error_fraction = 0.05") in err and "stopped early" in err
    assert "by stage: read 16" in err and "16  read: missing file" in err
    assert ", id world_0000" in err and "image world_0000" in err  # example ids and paths
    assert "hint: data.image_root is not set" in err
    assert not (out / "_SUCCESS").exists() and not (out / D.META_FILE).exists()
    ldir = D.LabelsDir(str(out))
    done = ldir.markers()
    assert len(done) == 1 and all(m["labelled"] == 0 and m["errors"] == m["rows"] for m in done.values())
    assert "labels dataset not complete (no _SUCCESS; 1 of 3 shards done, 0 rows labelled and 16 error rows" \
        in ldir.incomplete()
    with pytest.raises(FileNotFoundError, match="not complete"):
        D.read_labels(str(out))

    summary = run(validate(_labels_raw(manifest, out, world_dir / "images")))
    assert summary["shards_redone"] == 1 and summary["shards_written"] == 3
    assert summary["counts"]["labelled"] == 48 and summary["counts"]["errors"] == 0
    assert (out / "_SUCCESS").exists() and D.read_errors(str(out)).num_rows == 0
    assert D.read_labels(str(out)).num_rows == 48


@pytest.mark.ray
def test_a_mostly_good_job_succeeds_and_counts_its_errors(ray_local, world_dir, tmp_path):
    """One missing image among 49 rows (2 %) is within the default budget: labelled, counted, listed.
    The manifest is an import whose recorded image root the job uses (its config gives none).
    Tightened to 1 %, the same output fails, judged over every shard of the dataset."""
    from sea_ray.labels.job import run

    rows = json.loads((world_dir / "train" / "pretrain.json").read_text())
    rows.insert(20, {"id": "gone", "image": "no_such_image.png", "conversations": rows[0]["conversations"]})
    src = tmp_path / "pretrain.json"
    src.write_text(json.dumps(rows))
    imported = tmp_path / "imported"
    import_manifest(str(src), str(imported), image_root=str(world_dir / "images"))  # paths kept, root recorded
    out = tmp_path / "labels"
    cfg = validate(_labels_raw(imported, out))
    assert cfg.data.image_root is None and cfg.model.llm.name_or_path is None and cfg.model.llm.config is None
    assert jobs.problems(cfg) == []
    summary = run(cfg)
    counts = summary["counts"]
    assert counts["labelled"] == 48 and counts["errors"] == 1 and counts["errors_by_stage"] == {"manifest": 0,
                                                                                                 "read": 1}
    meta = json.loads((out / D.META_FILE).read_text())
    assert meta["image_root"] == str(world_dir / "images") and meta["max_error_fraction"] == 0.05
    assert (out / "_SUCCESS").exists()
    [error] = D.read_errors(str(out)).to_pylist()
    assert error["image_id"] == "gone" and error["stage"] == "read" and "missing file" in error["reason"]

    with pytest.raises(TooManyErrors, match=r"1 of 49 manifest rows are error rows \(2.0%\), more than "
                                            r"data.max_error_fraction = 0.01 allows; .* not complete") as info:
        run(validate(_labels_raw(imported, out, max_error_fraction=0.01)))
    assert "stopped early" not in str(info.value) and "id gone, image no_such_image.png" in str(info.value)
    assert isinstance(info.value, DataError) and (info.value.errors, info.value.rows) == (1, 49)
    assert not (out / "_SUCCESS").exists() and not (out / D.META_FILE).exists()
    assert len(D.LabelsDir(str(out)).markers()) == 4  # the shards and markers stay for a re-run


def test_malformed_manifest_rows_alone_fail_before_ray(tmp_path, world_dir):
    from sea_ray.labels.job import run

    rows = json.loads((world_dir / "train" / "pretrain.json").read_text())[:10]
    lines = [json.dumps(r) for r in rows] + ["{not json"] * 3
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "labels"
    with pytest.raises(TooManyErrors, match=r"(?s)3 of 13 manifest rows are error rows .*manifest: malformed JSON"):
        run(validate(_labels_raw(manifest, out, world_dir / "images")))
    assert not out.exists()  # nothing written, Ray never started


# --------------------------------------------------------------------------- pre-flight of labels datasets


def test_preflight_refuses_labels_with_no_labelled_row(tmp_path, world_dir, capsys):
    labels = _write_labels_meta(tmp_path / "labels", labelled=0, errors=48)
    problems = job_problems(validate(_align(labels)))
    assert problems == [f"data.labels: {labels} holds no labelled row (48 error rows of 48 manifest rows: read 48); "
                        "fix the data (e.g. the labels job's data.image_root) and re-make the labels (the labels "
                        f"job's errors table: {labels}/errors/)"]
    # through the command line: exit 2 before anything starts
    code = cli.main(["validate", "--config", str(REPO / "workflows/configs/tiny_align.yaml"),
                     f"data.manifest={world_dir}/train/pretrain.json", f"data.image_root={world_dir}/images",
                     f"data.labels={labels}"])
    assert code == 2 and "holds no labelled row" in capsys.readouterr().err
    # tune reads the same labels (its base config)
    tune = validate({"job": "tune", "base": _align(labels),
                     "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}})
    assert any("holds no labelled row" in p for p in jobs.job_problems(tune))


def test_preflight_refuses_labels_with_too_many_error_rows(tmp_path):
    labels = _write_labels_meta(tmp_path / "labels", labelled=40, errors=8)
    problems = job_problems(validate(_align(labels)))
    assert len(problems) == 1 and "16.7% of the rows" in problems[0] and "data.max_error_fraction = 0.05" in problems[0]
    assert job_problems(validate(_align(labels, **{"data.max_error_fraction": 0.2}))) == []
    assert job_problems(validate(_align(labels, **{"sea.enabled": False}))) == []  # no SEA: labels unused
    _write_labels_meta(tmp_path / "labels", labelled=47, errors=1)
    assert job_problems(validate(_align(labels))) == []


def test_a_pipeline_whose_labels_exist_refuses_them_when_planned(tmp_path):
    from sea_ray import pipeline

    out = tmp_path / "pipe"
    _write_labels_meta(out / "labels", labelled=0, errors=300, rows=300)
    cfg = validate({"job": "pipeline", "output": str(out), "steps": ["labels", "align"],
                    "data": {"world": str(tmp_path / "world")},
                    "labels": {"recipe": "tiny_labels.yaml"}, "align": {"recipe": "tiny_align.yaml"}})
    with pytest.raises(ConfigError, match="align: data.labels: .* holds no labelled row"):
        pipeline.plan(cfg, REPO / "workflows/configs/tiny_pipeline.yaml")


def test_a_missing_labels_dataset_is_not_found_and_an_unfinished_one_not_complete(tmp_path, world_dir, capsys):
    from sea_ray.train.data import label_shards

    missing = tmp_path / "no-labels"
    assert D.LabelsDir(str(missing)).incomplete().startswith(f"{missing}: labels dataset not found")
    with pytest.raises(DataError, match="labels dataset not found"):
        label_shards(str(missing))
    with pytest.raises(FileNotFoundError, match="labels dataset not found"):
        D.read_labels(str(missing))
    code = cli.main(["validate", "--config", str(REPO / "workflows/configs/tiny_align.yaml"),
                     f"data.manifest={world_dir}/train/pretrain.json", f"data.image_root={world_dir}/images",
                     f"data.labels={missing}"])
    err = capsys.readouterr().err
    assert code == 2 and f"data.labels: {missing}: labels dataset not found" in err and "not complete" not in err

    unfinished = _write_labels_meta(tmp_path / "unfinished", labelled=0, errors=0, complete=False)
    why = D.LabelsDir(str(unfinished)).incomplete()
    assert why == (f"{unfinished}: labels dataset not complete (no _SUCCESS; 0 of 3 shards done — re-run sea-ray "
                   "labels to finish)")
    with pytest.raises(DataError, match="not complete"):
        label_shards(str(unfinished))
    assert D.LabelsDir(str(_write_labels_meta(tmp_path / "done", 48, 0))).incomplete() is None


# --------------------------------------------------------------------------- the tower


@pytest.mark.parametrize("preset", ["tiny-openclip-llama", "tiny-hfclip-llama"])
def test_select_layer_out_of_range_is_refused(preset):
    def problems(layer):
        raw = _align("labels", **{"model.preset": preset, "model.vision": {"select_layer": layer}})
        return [p for p in job_problems(validate(raw)) if p.startswith("model.vision.select_layer")]

    for layer in (-4, -2, 0, 3):  # 3 blocks: hidden states -4 (embeddings) .. 3 (the last block)
        assert problems(layer) == [], layer
    for layer in (-5, 4, 24):
        [found] = problems(layer)
        assert f"select_layer {layer} is out of range for a 3-block tower (valid: -4 .. 3" in found
    # the labels job's config is checked the same way
    raw = _labels_raw("m.json", "out")
    raw["model"]["vision"]["select_layer"] = -5
    assert any(p.startswith("model.vision.select_layer") for p in job_problems(validate(raw)))


def test_the_tower_applies_the_same_select_layer_rule():
    import torch

    from sea_ray.model.vision import build_vision_tower

    vision = validate(_align("labels")).model.vision
    images = torch.zeros(1, 3, 64, 64)
    assert build_vision_tower(vision.model_copy(update={"select_layer": -4}), "crop").patch_tokens(images).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="out of range for a 3-block tower"):
        build_vision_tower(vision.model_copy(update={"select_layer": -5}), "crop").patch_tokens(images)


def test_labels_of_another_tower_warn_and_another_transform_is_refused(tmp_path, caplog):
    same = validate(_align(tmp_path)).model.vision.model_dump(mode="json")
    labels = _write_labels_meta(tmp_path / "same", 48, 0, vision=dict(same, select_layer=-1))
    with caplog.at_level(logging.WARNING, logger="sea_ray.checks"):
        assert job_problems(validate(_align(labels))) == []
    assert "another tower" not in caplog.text  # select_layer does not change the labels

    other = dict(same, weights="/elsewhere/clip.safetensors")
    labels = _write_labels_meta(tmp_path / "other", 48, 0, vision=other)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sea_ray.checks"):
        assert job_problems(validate(_align(labels))) == []  # a warning, not a refusal
    assert f"data.labels: {labels} was labelled by another tower than model.vision (differs in weights" in caplog.text

    labels = _write_labels_meta(tmp_path / "bigger", 48, 0, transform={"image_size": 128, "patch_size": 16})
    [problem] = job_problems(validate(_align(labels)))  # same 8 x 8 grid, another transform
    assert "computed on 128 px images with 16 px patches but the vision tower takes 64 px images" in problem


def test_the_labels_job_needs_no_llm():
    cfg = validate(_labels_raw("m.json", "out"))
    assert cfg.model.llm.name_or_path is None and job_problems(cfg) == []
    raw = _labels_raw("m.json", "out")
    raw["model"]["llm"] = {"config": {"hidden_size": 8}}  # an LLM that is given is still checked
    with pytest.raises(ConfigError, match="llm.config: needs model_type"):
        validate(raw)
    with pytest.raises(ConfigError, match="give exactly one of name_or_path"):
        validate(_align("labels", **{"model": {"vision": copy.deepcopy(TINY_VISION)}}))  # training needs one


# --------------------------------------------------------------------------- the importer


def test_an_all_bad_import_fails_without_success(world_dir, tmp_path, capsys):
    src = world_dir / "train" / "pretrain.json"
    out = tmp_path / "imported"
    code = cli.main(["import-manifest", "--input", str(src), "--output", str(out), "--embed-images",
                     "--rows-per-shard", "16"])  # --image-root forgotten
    err = capsys.readouterr().err
    assert code == 1
    assert (f"error: import-manifest: at least 16 of 48 rows of {src} are bad (33.3%), more than "
            "--max-error-fraction 0.05") in err
    assert "stopped early" in err and "16  decode: missing file" in err and "hint: --image-root is not set" in err
    assert not (out / "_SUCCESS").exists() and (out / ERRORS_FILE).exists()
    assert import_record(str(out)) is None
    with pytest.raises(TooManyErrors):
        import_manifest(str(src), str(out), embed_images=True, max_error_fraction=0.3)
    # within the budget it completes; rows without an image skipped by require_image are no errors
    summary = import_manifest(str(world_dir / "train" / "instruct.json"), str(out), require_image=True,
                              max_error_fraction=0.0)
    assert summary["rows_skipped"] == 2 and (out / "_SUCCESS").exists()


def test_jobs_use_the_image_root_the_importer_recorded(world_dir, tmp_path, monkeypatch):
    from sea_ray.train.data import preprocess_kwargs

    out = tmp_path / "imported"
    monkeypatch.chdir(world_dir)
    import_manifest(str(world_dir / "train" / "pretrain.json"), str(out), image_root="images")  # relative
    root = str(world_dir / "images")
    assert import_record(str(out))["image_root"] == root  # recorded absolute
    assert image_root_for(str(out), None) == root
    assert image_root_for(str(out), "/other") == "/other"  # the config's wins
    assert image_root_for(str(world_dir / "train" / "pretrain.json"), None) is None  # a plain manifest
    assert image_root_for(str(tmp_path / "nothing-here"), None) is None
    cfg = validate(_align("labels", **{"data.manifest": str(out)}))
    assert preprocess_kwargs(cfg, 64)["image_root"] == root
    cfg = validate(_align("labels", **{"data.manifest": str(out), "data.image_root": "/given"}))
    assert preprocess_kwargs(cfg, 64)["image_root"] == "/given"
