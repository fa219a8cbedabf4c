"""`sea-ray export`: a checkpoint becomes a Hugging Face LLaVA folder that transformers loads
offline and that computes what sea_ray computes (fp32 logits within 1e-4, the same greedy tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

from sea_ray.config.loading import to_dict, validate
from sea_ray.errors import ConfigError
from sea_ray.eval.generate import encode_prompt, greedy_generate
from sea_ray.eval.loading import load_model
from sea_ray.export.llava import export
from sea_ray.train import checkpoint as ckpt

QUESTION = "What color is the circle?"
LOGIT_TOLERANCE = 1e-4


def write_checkpoint(root: Path, world_dir, stage: str, model: dict, seed: int = 3, template: str = "auto",
                     data: Optional[dict] = None) -> str:
    """A complete checkpoint as the stages write it, its trained tensors moved off their init."""
    from sea_ray.model.vlm import build_vlm

    raw = {"job": stage, "model": model, "run": {"name": f"x-{stage}", "seed": seed},
           "data": {"manifest": f"{world_dir}/train/{'pretrain' if stage == 'align' else 'instruct'}.json",
                    **(data or {})},
           "batch": {"global_size": 8, "per_worker": 8}}
    if stage == "instruct":
        raw["template"] = template
    if stage == "align":
        raw["sea"] = {"enabled": False}  # the checkpoint's tensors are what matter here, not how they were trained
    cfg = validate(raw)
    torch.manual_seed(seed)
    vlm = build_vlm(cfg.model, cfg.data.image_aspect)
    vlm.freeze(stage)
    generator = torch.Generator().manual_seed(seed + 1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in vlm.trainable_state_dict().items()}
    uri = str(root / f"x-{stage}" / ckpt.step_dir_name(7))
    ckpt.write_checkpoint(uri, state, None, {"step": 7}, to_dict(cfg), stage)
    return uri


def images(world_dir) -> list[Image.Image]:
    """A world test image and a non-square photo-like one (exercises resize and crop)."""
    world = Image.open(sorted((Path(world_dir) / "images").glob("*.png"))[-1]).convert("RGB")
    rng = np.random.default_rng(0)
    odd = Image.fromarray(rng.integers(0, 255, (61, 83, 3), dtype=np.uint8))
    return [world, odd]


def hf_inputs(processor, image, question: str, chat: bool):
    if chat:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = f"<image>{question}"
    return processor(images=image, text=text, return_tensors="pt")


def assert_parity(checkpoint: str, out: Path, world_dir, chat: bool = True):
    """The exported folder against sea_ray's model on the same images and prompt."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    export(checkpoint, str(out))
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    # PIL, as open_clip's transform resizes: the default torchvision backend can put the centre crop
    # one pixel over and resample one grey level off (test_default_image_backend_on_unresized_images)
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    model, info = load_model(checkpoint)
    image_id = hf.config.image_token_index
    worst = 0.0
    for image in images(world_dir):
        pixels = model.vision.transform(image).unsqueeze(0)
        if chat:
            ids = encode_prompt(QUESTION, model.tokenizer, info["config"].get("template", "auto"))
        else:
            ids = [-200] + model.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
        inputs = hf_inputs(processor, image, QUESTION, chat)
        hf_ids = inputs["input_ids"][0].tolist()
        collapsed = [t for i, t in enumerate(hf_ids) if t != image_id or i == hf_ids.index(image_id)]
        assert collapsed == [image_id if t == -200 else t for t in ids], "the processor's prompt differs"
        assert hf_ids.count(image_id) == model.vision.num_patches
        assert torch.allclose(inputs["pixel_values"], pixels, atol=1e-5), "the image processor differs"
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         images=pixels)["logits"]
            theirs = hf(**inputs).logits
        vocab = ours.shape[-1]
        assert theirs.shape[:2] == ours.shape[:2]
        diff = float((theirs[..., :vocab] - ours).abs().max())
        worst = max(worst, diff)
        assert diff < LOGIT_TOLERANCE, f"logits differ by {diff:.2e}"
        if chat:
            ours_tokens = greedy_generate(model, [ids], pixels, max_new_tokens=6)[0]
            out_ids = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0, len(hf_ids):].tolist()
            eos = processor.tokenizer.eos_token_id
            assert (out_ids[:out_ids.index(eos)] if eos in out_ids else out_ids) == ours_tokens
    print(f"{Path(checkpoint).parent.name}: max |logit difference| {worst:.2e}")
    return hf, processor


def test_world_instruct_checkpoint_exports_with_parity(tmp_path, world_dir):
    uri = write_checkpoint(tmp_path, world_dir, "instruct", {"preset": "world-clip-llama"})
    hf, processor = assert_parity(uri, tmp_path / "hf", world_dir)
    assert hf.config.vision_feature_select_strategy == "default" and hf.config.vision_feature_layer == -2
    assert hf.config.image_seq_length == 64 and processor.num_additional_image_tokens == 1
    assert "USER:" in processor.chat_template
    provenance = json.loads((tmp_path / "hf" / "sea_ray_export.json").read_text())
    assert provenance["stage"] == "instruct" and provenance["step"] == 7
    from transformers import AutoModelForImageTextToText, AutoProcessor

    auto = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    assert type(auto).__name__ == "LlavaForConditionalGeneration"
    assert not any("sea_head" in k for k in auto.state_dict())
    # transformers' default (torchvision) image backend: exact on an image of the tower's size
    default = AutoProcessor.from_pretrained(tmp_path / "hf")
    world = images(world_dir)[0]
    assert world.size == (64, 64)
    near = default(images=world, text="<image>", return_tensors="pt")["pixel_values"]
    assert (near - processor(images=world, text="<image>", return_tensors="pt")["pixel_values"]).abs().max() < 1e-5


def test_a_pad_checkpoint_exports_a_processor_that_pads(tmp_path, world_dir):
    """data.image_aspect=pad (LLaVA-1.5's finetuning): the exported processor pads to a square of
    the mean colour as training did, pixel for pixel on the non-square image of the parity check."""
    uri = write_checkpoint(tmp_path, world_dir, "instruct", {"preset": "tiny-openclip-llama"},
                           data={"image_aspect": "pad"})
    _, processor = assert_parity(uri, tmp_path / "hf", world_dir)
    image_processor = processor.image_processor
    assert type(image_processor).__name__ == "LlavaImageProcessorPil" and image_processor.do_pad
    assert json.loads((tmp_path / "hf" / "sea_ray_export.json").read_text())["image_aspect"] == "pad"
    # transformers' default (torchvision) backend pads too; it resizes the padded square tensor-side
    from transformers import AutoProcessor

    model, _ = load_model(uri)
    default = AutoProcessor.from_pretrained(tmp_path / "hf").image_processor
    assert type(default).__name__ == "LlavaImageProcessor" and default.do_pad
    wide = images(world_dir)[1]
    assert wide.size[0] != wide.size[1]
    near = default(images=wide, return_tensors="pt")["pixel_values"][0]
    assert (near - model.vision.transform(wide)).abs().max() <= 1 / 255 / min(model.vision.std) + 1e-5


def test_tiny_open_clip_with_tied_embeddings(tmp_path, world_dir):
    uri = write_checkpoint(tmp_path, world_dir, "instruct",
                           {"preset": "tiny-openclip-qwen2", "llm": {"config": {"tie_word_embeddings": True}}})
    hf, _ = assert_parity(uri, tmp_path / "hf", world_dir)
    assert hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()


def test_a_siglip_tower_exports_with_every_patch(tmp_path, world_dir):
    """SigLIP has no class token: LLaVA's `full` strategy, no additional image token."""
    siglip = {"backend": "hf", "name": "custom", "custom": {
        "model_type": "siglip",
        "vision_config": {"image_size": 64, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 3, "num_attention_heads": 2},
        "text_config": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 32}}}
    uri = write_checkpoint(tmp_path, world_dir, "instruct", {"preset": "tiny-hfclip-llama", "vision": siglip})
    hf, processor = assert_parity(uri, tmp_path / "hf", world_dir)
    assert hf.config.vision_feature_select_strategy == "full" and processor.num_additional_image_tokens == 0
    assert hf.config.vision_config.model_type == "siglip_vision_model"


def test_the_llms_own_chat_template_is_exported(tmp_path, world_dir):
    from sea_ray.model.llm import load_tokenizer

    tokenizer = load_tokenizer("world")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(tmp_path / "chat-tokenizer")
    model = {"preset": "tiny-openclip-llama", "llm": {"tokenizer": str(tmp_path / "chat-tokenizer")}}
    uri = write_checkpoint(tmp_path, world_dir, "instruct", model, template="chat")
    _, processor = assert_parity(uri, tmp_path / "hf", world_dir)
    assert processor.chat_template.endswith(tokenizer.chat_template)


def test_tiny_hf_clip_align_checkpoint(tmp_path, world_dir):
    uri = write_checkpoint(tmp_path, world_dir, "align", {"preset": "tiny-hfclip-llama"})
    _, processor = assert_parity(uri, tmp_path / "hf", world_dir, chat=False)
    assert processor.chat_template is None  # caption pretraining only: no conversation format


def test_adapters_without_a_llava_class_are_refused(tmp_path, world_dir):
    uri = write_checkpoint(tmp_path, world_dir, "align", {"preset": "tiny-openclip-llama", "adapter": {"type": "linear"}})
    with pytest.raises(ConfigError, match="mlp2x_gelu"):
        export(uri, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_an_existing_export_is_not_overwritten(tmp_path, world_dir):
    uri = write_checkpoint(tmp_path, world_dir, "align", {"preset": "tiny-openclip-llama"})
    export(uri, str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="--overwrite"):
        export(uri, str(tmp_path / "hf"))
    export(uri, str(tmp_path / "hf"), overwrite=True, dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_export_to_a_bucket(tmp_path, world_dir, s3_bucket):
    from transformers import LlavaForConditionalGeneration

    from sea_ray import storage

    uri = write_checkpoint(tmp_path, world_dir, "align", {"preset": "tiny-openclip-llama"})
    out = f"{s3_bucket}/exports/tiny"
    export(uri, out)
    fs, path = storage.fsspec_fs(out)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names, names
    hf = LlavaForConditionalGeneration.from_pretrained(storage.local_copy(out))
    assert hf.config.image_token_index == len(load_model(uri)[0].tokenizer)


# Loads an exported folder in a fresh interpreter in which `import peft` fails (as where peft is
# not installed), and prints its logits on a fixed prompt: an export needs no peft to load.
WITHOUT_PEFT = """
import importlib.abc, importlib.machinery, sys
class Refuse(importlib.abc.Loader):
    def create_module(self, spec): return None
    def exec_module(self, module): raise ImportError("peft is not installed here")
class NoPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "peft":
            return importlib.machinery.ModuleSpec(name, Refuse())
sys.meta_path.insert(0, NoPeft())
import torch
from transformers import LlavaForConditionalGeneration
hf = LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[5, 6, 7, 8]])
with torch.no_grad():
    print(float(hf(input_ids=ids).logits.sum()))
"""


def test_a_lora_checkpoint_exports_merged_into_a_plain_llava(tmp_path, world_dir):
    """LoRA weights merged into the LLM (PEFT's merge_and_unload): a plain LLaVA folder with no LoRA
    tensor and no adapter config, that loads where peft cannot be imported and computes what
    sea_ray's model with LoRA applied computes (the parity check)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    lora = {"enabled": True, "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    uri = write_checkpoint(tmp_path, world_dir, "instruct", {"preset": "world-clip-llama", "llm": {"lora": lora}})
    assert any(".lora_B." in k for k in ckpt.load_model_state(uri))
    hf, _ = assert_parity(uri, tmp_path / "hf", world_dir)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert saved and not any("lora" in k or "base_layer" in k for k in saved)
    provenance = json.loads((tmp_path / "hf" / "sea_ray_export.json").read_text())
    assert provenance["lora"] == {"merged": True, "rank": 4, "alpha": 8.0, "qlora": False,
                                  "target_modules": ["q_proj", "v_proj", "down_proj"]}
    # the merge changed the targeted weights of the base LLM, and only those
    model, _ = load_model(uri)
    exported = hf.state_dict()
    layer = "model.language_model.layers.0."
    base = model.base_llm.model.layers[0]
    assert not torch.equal(exported[layer + "self_attn.q_proj.weight"], base.self_attn.q_proj.base_layer.weight)
    assert torch.equal(exported[layer + "self_attn.k_proj.weight"], base.self_attn.k_proj.weight)
    out = subprocess.run([sys.executable, "-c", WITHOUT_PEFT, str(tmp_path / "hf")], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        here = float(hf(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum())
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(here, rel=1e-5)
