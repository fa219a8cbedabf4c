"""The synthetic world's questions as an lmms-eval task (``world_qa``), asked and scored as
``sea-ray eval`` asks and scores them.

The task folder :func:`task_files` writes holds a YAML, a JSONL of the split's questions and a
``utils.py`` that imports the three functions below, so lmms-eval (through its ``llava_hf``
model and the exported chat template) sees the same prompt as ``sea-ray eval`` (the question;
the template puts ``<image>\\n`` before it and the roles around it), decodes greedily for the
same number of tokens, and scores with the same :func:`~sea_ray.eval.metrics.normalize_answer`
exact match, overall and per question type.
"""

from __future__ import annotations

import json
from typing import Optional

from sea_ray import storage
from sea_ray.data.images import decode_image
from sea_ray.eval.metrics import normalize_answer

TYPES = ("color", "shape", "count", "existence", "position")
DATA_FILE = "world_qa.jsonl"
DATA_PLACEHOLDER = "__SEA_RAY_DATA__"  # replaced by the data file's absolute path where the task runs


def doc_to_visual(doc: dict) -> list:
    data, reason = storage.read_many([doc["image"]])[0]
    image, why = decode_image(data) if data is not None else (None, reason)
    if image is None:
        raise ValueError(f"{doc['image']}: {why}")
    return [image]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: Optional[dict] = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list) -> dict:
    hit = float(normalize_answer(results[0] if results else "") == normalize_answer(doc["answer"]))
    return {"exact_match": hit, f"exact_match_{doc['type']}": hit}


def task_files(name: str, qa: list[dict], world: str, max_new_tokens: int) -> dict[str, str]:
    """``{file name: text}`` of the task folder over the questions ``qa`` (as
    :func:`sea_ray.eval.job.world_split` gives them); the YAML names the data file by
    :data:`DATA_PLACEHOLDER`."""
    rows = [{"question_id": q["question_id"], "question": q["question"], "answer": q["answer"], "type": q["type"],
             "image": storage.join(world, "images", q["image"])} for q in qa]
    metrics = ["exact_match"] + [f"exact_match_{t}" for t in TYPES]
    yaml = "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {DATA_PLACEHOLDER}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        "doc_to_target: answer",
        "process_results: !function utils.process_results",
        "generation_kwargs:",
        f"  max_new_tokens: {max_new_tokens}",
        "  temperature: 0",
        "  do_sample: false",
        "  num_beams: 1",
        "metric_list:",
        *[f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}" for m in metrics],
        "metadata:",
        "  version: 1.0",
        "",
    ])
    utils = ('"""lmms-eval task functions of sea_ray\'s world_qa (see sea_ray/export/lmms_world.py)."""\n\n'
             "from sea_ray.export.lmms_world import doc_to_text, doc_to_visual, process_results  # noqa: F401\n")
    return {f"{name}.yaml": yaml, "utils.py": utils, DATA_FILE: "".join(json.dumps(r) + "\n" for r in rows)}
