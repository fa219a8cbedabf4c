"""sea_ray.export.towers: a sea_ray vision tower as a Hugging Face vision tower for LLaVA, checked
hidden state by hidden state (fp32, CPU) and pixel by pixel against the tower itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sea_ray.config.schema import VisionConfig
from sea_ray.export.towers import hf_vision, image_processor, select_strategy
from sea_ray.model.vision import OpenClipTower, build_vision_tower
from sea_ray.presets import _TINY_HF_CLIP, _TINY_OPEN_CLIP, _WORLD_CLIP, WORLD_CLIP_ARCH

TOL = 1e-5


def _quick_gelu_open_clip(aspect):
    import open_clip

    arch = _TINY_OPEN_CLIP["custom"]
    model = open_clip.CLIP(embed_dim=arch["embed_dim"], vision_cfg=open_clip.CLIPVisionCfg(**arch["vision_cfg"]),
                           text_cfg=open_clip.CLIPTextCfg(**arch["text_cfg"]), quick_gelu=True)
    return OpenClipTower(model.eval(), image_aspect=aspect)


TOWERS = {  # name -> builder of the tower for a data.image_aspect
    "tiny-open-clip": lambda aspect: build_vision_tower(VisionConfig(**_TINY_OPEN_CLIP), aspect),
    "tiny-open-clip-quick-gelu": _quick_gelu_open_clip,
    "world-clip": lambda aspect: build_vision_tower(VisionConfig(**_WORLD_CLIP), aspect),
    "tiny-hf-clip": lambda aspect: build_vision_tower(VisionConfig(**_TINY_HF_CLIP), aspect),
}


def _tower(name: str, aspect: str = "crop"):
    torch.manual_seed(0)
    return TOWERS[name](aspect)


def _tower_states(tower, images: torch.Tensor) -> list[torch.Tensor]:
    if tower.backend == "open_clip":
        return tower._hidden_states(images, tower.num_layers)
    return list(tower._states(images).hidden_states)


def _hf_model(config, state):
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(config).eval()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def _max_diffs(hf, tower, images) -> list[float]:
    with torch.no_grad():
        ours = _tower_states(tower, images)
        theirs = hf(pixel_values=images, output_hidden_states=True).hidden_states
    assert len(theirs) == len(ours) == tower.num_layers + 1
    return [(a - b).abs().max().item() for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("name", list(TOWERS))
def test_hidden_states_match_the_tower(name):
    tower = _tower(name)
    config, state = hf_vision(tower)
    hf = _hf_model(config, state)
    images = torch.randn(3, 3, tower.image_size, tower.image_size)
    diffs = _max_diffs(hf, tower, images)
    assert max(diffs) <= TOL, diffs
    with torch.no_grad():
        hidden = hf(pixel_values=images, output_hidden_states=True).hidden_states
        assert (tower.patch_tokens(images) - hidden[tower.select_layer][:, 1:]).abs().max().item() <= TOL
    assert select_strategy(tower) == ("default", 1)


def test_the_parity_check_can_fail():
    """Two blocks swapped in the converted weights: the same comparison sees it."""
    tower = _tower("world-clip")
    config, state = hf_vision(tower)
    for key in [k for k in state if k.startswith("encoder.layers.1.")]:
        other = key.replace("layers.1.", "layers.2.")
        state[key], state[other] = state[other], state[key]
    diffs = _max_diffs(_hf_model(config, state), tower, torch.randn(2, 3, 64, 64))
    assert max(diffs[:2]) <= TOL and min(diffs[2:]) > 1e-2, diffs


def test_the_config_reads_the_modules():
    tower = _tower("world-clip")
    config, _ = hf_vision(tower)
    vision = WORLD_CLIP_ARCH["vision_cfg"]
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == \
        (vision["image_size"], vision["patch_size"], vision["width"], vision["layers"])
    assert config.num_attention_heads == vision["width"] // vision["head_width"]
    assert config.intermediate_size == 4 * vision["width"]
    assert (config.hidden_act, config.layer_norm_eps) == ("gelu", 1e-5)
    assert hf_vision(_tower("tiny-open-clip-quick-gelu"))[0].hidden_act == "quick_gelu"


def _images() -> list[Image.Image]:
    from sea_ray.world.generator import render_image, sample_record

    rng = np.random.default_rng(0)
    # (61, 83), (83, 61): an odd crop margin that rounding and flooring put one pixel apart
    sizes = [(60, 80), (80, 60), (97, 50), (64, 64), (61, 83), (83, 61), (64, 91)]
    noise = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    gray = Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8))  # mode L: converted to RGB
    world = [render_image(sample_record(0, i, image_size=64)) for i in range(2)]
    return [Image.fromarray(a) for a in world + noise] + [gray]


@pytest.mark.parametrize("name", ["world-clip", "tiny-hf-clip"])
@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_image_processor_matches_the_tower_transform(name, aspect):
    tower = _tower(name, aspect)
    images = _images()
    ours = torch.stack([tower.transform(img) for img in images])
    processor = image_processor(tower)
    assert type(processor).__name__ == {"crop": "CLIPImageProcessorPil", "pad": "LlavaImageProcessorPil"}[aspect]
    exact = processor(images=images, return_tensors="pt")["pixel_values"]
    diff = (exact - ours).abs().max().item()
    print(f"{name} {aspect}: max |pixel difference| {diff:.2e}")
    assert diff <= TOL
    # transformers' default (torchvision) backend resizes tensors: where it resizes, it may be one
    # grey level off PIL's bicubic, i.e. 1/255 over the smallest std after normalisation
    near = image_processor(tower, backend="torchvision")(images=images, return_tensors="pt")["pixel_values"]
    assert (near - ours).abs().max().item() <= 1 / 255 / min(tower.std) + TOL


def test_a_padding_processor_sees_a_wide_photo_whole():
    """A 2:1 photo through the exported processor of a pad tower: the pad tower's tensor, not the
    crop tower's (the comparison that passes above would see a processor that crops)."""
    pad, crop = _tower("world-clip", "pad"), _tower("world-clip", "crop")
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    processor = image_processor(pad)
    assert processor.do_pad and tuple(processor.image_mean) == tuple(pad.mean)
    pixels = processor(images=[photo], return_tensors="pt")["pixel_values"][0]
    assert (pixels - pad.transform(photo)).abs().max().item() <= TOL
    assert (pixels - crop.transform(photo)).abs().max().item() > 0.1
    assert (image_processor(crop)(images=[photo], return_tensors="pt")["pixel_values"][0] - pixels).abs().max() > 0.1


def _layer_scale(tower):
    from open_clip.transformer import LayerScale

    tower.clip.visual.transformer.resblocks[1].ls_1 = LayerScale(tower.width, 0.1)


def _attentional_pool(tower):
    tower.clip.visual.attn_pool = torch.nn.Identity()


def _no_ln_pre(tower):
    tower.clip.visual.ln_pre = torch.nn.Identity()


def _rms_norm(tower):
    tower.clip.visual.transformer.resblocks[0].ln_2 = torch.nn.RMSNorm(tower.width)


@pytest.mark.parametrize("change, message", [(_layer_scale, "LayerScale"), (_attentional_pool, "attentional pooler"),
                                             (_no_ln_pre, "ln_pre"), (_rms_norm, "RMSNorm")])
def test_unsupported_open_clip_features_are_refused(change, message):
    tower = _tower("tiny-open-clip")
    change(tower)
    with pytest.raises(ValueError, match=f"{message}.*not supported"):
        hf_vision(tower)
