"""Test helper: one quickstart chain (the +SEA arm of seed 0) on the session world with oracle
labels, and its rows preprocessed in this process as the quickstart's ingest does."""

from __future__ import annotations

from sea_ray.config.loading import validate


def world_chain(world_dir, tmp_path, **quickstart) -> tuple[dict, dict]:
    """``(chain, data)`` for :func:`sea_ray.quickstart.run_chain`: the chain's configs pointed at the
    session world and at oracle labels written for its tower; ``quickstart``: the quickstart's keys."""
    from sea_ray.checks import tower_image_size
    from sea_ray.model.vision import build_vision_tower
    from sea_ray.quickstart import build_configs
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.feed import materialize
    from sea_ray.world.oracle import write_oracle_labels

    plan = build_configs(validate({"job": "quickstart", "output": str(tmp_path), "seeds": [0], **quickstart}))
    chain = plan["chains"][1]
    labels = str(tmp_path / "oracle")
    tower = build_vision_tower(chain["align"].model.vision, chain["align"].data.image_aspect)
    write_oracle_labels(world_dir, labels, 8, tower.transform_spec())
    world = str(world_dir)
    chain["align"] = chain["align"].model_copy(update={"data": chain["align"].data.model_copy(update={
        "labels": labels, "manifest": f"{world}/train/pretrain.json", "image_root": f"{world}/images"})})
    chain["instruct"] = chain["instruct"].model_copy(update={"data": chain["instruct"].data.model_copy(update={
        "manifest": f"{world}/train/instruct.json", "image_root": f"{world}/images"})})
    for key in ("eval", "eval_align"):
        chain[key] = chain[key].model_copy(update={"world": world, "vocab": None, "audit": None})
    (image_size, _), _ = tower_image_size(chain["align"].model.vision)
    data = {}
    for stage in ("align", "instruct"):  # the quickstart's ingest, in this process
        source = source_of(chain[stage], shared=False)
        data[stage] = materialize(source, preprocess_kwargs(chain[stage], image_size), in_process=True)
        data[f"{stage}_rows"] = source.num_rows
    return chain, data
