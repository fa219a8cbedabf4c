"""The composed model on tiny real architectures (random weights, CPU)."""

import copy

import pytest
import torch

from sea_ray.config.loading import validate
from sea_ray.model.adapters import get_adapter
from sea_ray.model.vlm import IGNORE_INDEX, IMAGE_TOKEN_INDEX, build_vlm
from sea_ray.presets import get_preset

TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256}


def _cfg(preset="tiny-openclip-llama", llm_type=None, **sea):
    model = get_preset(preset)
    if llm_type:
        model["llm"] = {"config": dict(TINY_LLM, model_type=llm_type), "tokenizer": "world"}
        if llm_type == "gemma":
            model["llm"]["config"]["head_dim"] = 16
    raw = {"job": "align", "model": model, "data": {"manifest": "m", "labels": "l"},
           "batch": {"global_size": 2, "per_worker": 2}, "sea": sea}
    return validate(raw)


def _batch(model, texts, with_image):
    tok = model.tokenizer
    rows = []
    for text, img in zip(texts, with_image):
        ids = tok(text, add_special_tokens=False).input_ids
        rows.append(([IMAGE_TOKEN_INDEX] if img else []) + ids)
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = input_ids.masked_fill((mask == 0) | (input_ids == IMAGE_TOKEN_INDEX), IGNORE_INDEX)
    size = model.vision.image_size
    images = torch.randn(sum(with_image), 3, size, size)
    return input_ids, mask, labels, images


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = _cfg()
    return build_vlm(cfg.model, cfg.data.image_aspect)


@pytest.mark.parametrize("preset", ["tiny-openclip-llama", "tiny-openclip-qwen2", "tiny-hfclip-llama",
                                    "tiny-hfclip-qwen2"])
def test_forward_backward_for_each_tower_and_llm(preset):
    torch.manual_seed(0)
    cfg = _cfg(preset)
    model = build_vlm(cfg.model, cfg.data.image_aspect)
    model.freeze("instruct")
    ids, mask, labels, images = _batch(model, [" a red circle", " is there a blue square ? yes"], [True, True])
    out = model(ids, mask, labels, images)
    assert out["visual"].shape == (2, 64, model.llm_width)
    assert torch.isfinite(out["loss_lm"])
    out["loss_lm"].backward()
    assert model.adapter[0].weight.grad is not None and model.adapter[0].weight.grad.abs().sum() > 0
    assert model.llm.get_input_embeddings().weight.grad is not None


@pytest.mark.parametrize("llm_type", ["gemma", "phi3"])
def test_other_llm_families_build_and_run(llm_type):
    torch.manual_seed(0)
    cfg = _cfg(llm_type=llm_type)
    model = build_vlm(cfg.model, cfg.data.image_aspect)
    ids, mask, labels, images = _batch(model, [" a green star on the left"], [True])
    out = model(ids, mask, labels, images)
    assert torch.isfinite(out["loss_lm"]) and model.llm.config.model_type == llm_type


def test_align_gradients_reach_only_adapter_and_temperature(tiny):
    from sea_ray.sea import pair_loss
    from sea_ray.train.loop import build_sea_loss, trained_modules

    model = copy.deepcopy(tiny)
    plan = model.freeze("align")
    assert plan == {"vision": False, "adapter": True, "llm": False}
    sea_loss = build_sea_loss(_cfg().sea)  # the loss is not part of the model
    assert not any(n.startswith("sea_head.") for n, _ in model.named_parameters())
    ids, mask, labels, images = _batch(model, [" a red circle", " a blue square"], [True, True])
    out = model(ids, mask, labels, images)
    assert set(out) == {"loss_lm", "logits", "visual", "image_offsets", "labels"}
    image_index = torch.tensor([0, 0, 1, 1])
    patch_index = torch.tensor([0, 5, 2, 7])
    targets = model.input_embedding_table()[torch.arange(3, 7)]
    sea = pair_loss(sea_loss, out["visual"], (image_index, patch_index, targets))
    assert sea["num_pairs"] == 4
    (out["loss_lm"] + 0.5 * sea["loss"]).backward()
    trained = trained_modules(model, sea_loss)  # what the optimizer steps and a checkpoint holds
    got = {n for n, p in trained.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(n.startswith(("adapter.", "sea_head.")) for n in got)
    assert "sea_head.log_inv_temperature" in got  # the key every align checkpoint has held
    assert set(model.trainable_state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(k.startswith("adapter.") for k in model.trainable_state_dict())


def test_instruct_freezes_vision_unless_asked(tiny):
    model = copy.deepcopy(tiny)
    assert model.freeze("instruct") == {"vision": False, "adapter": True, "llm": True}
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert model.freeze("instruct", train_vision=True)["vision"] is True
    assert all(p.requires_grad for p in model.vision.parameters())
    with pytest.raises(ValueError, match="valid: align, instruct"):
        model.freeze("pretrain")


def test_splice_places_visual_tokens_and_never_supervises_them(tiny):
    model = tiny
    ids, mask, labels, images = _batch(model, [" a red circle on the left", " yes"], [True, False])
    visual = model.encode_images(images)
    embeds, new_mask, new_labels, offsets = model.splice(ids, mask, labels, visual)
    n_text0 = int(mask[0].sum()) - 1
    assert offsets.tolist() == [0, -1]
    assert embeds.shape[1] == n_text0 + 64
    assert torch.allclose(embeds[0, :64], visual[0])
    assert (new_labels[0, :64] == IGNORE_INDEX).all()
    # the text after the image keeps its labels, shifted by the visual tokens
    assert torch.equal(new_labels[0, 64: 64 + n_text0], labels[0, 1: 1 + n_text0])
    # the text-only sample is unchanged, padded on the right
    n1 = int(mask[1].sum())
    assert new_mask[1].sum() == n1 and torch.equal(new_labels[1, :n1], labels[1, :n1])
    text_rows = model.llm.get_input_embeddings()(ids[1, :n1])
    assert torch.allclose(embeds[1, :n1], text_rows)
    with pytest.raises(ValueError, match="image placeholders"):
        model.splice(ids, mask, labels, None)


def test_open_clip_hidden_states_match_open_clip(tiny):
    tower = tiny.vision
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = tower._hidden_states(images, tower.num_layers)[-1]
        pooled = tower.clip.visual.ln_post(last[:, 0]) @ tower.clip.visual.proj
        ref = tower.clip.encode_image(images)
        assert torch.allclose(pooled, ref, atol=1e-5)
        tokens = tower.patch_tokens(images)  # penultimate block, CLS dropped
        penultimate = tower._hidden_states(images, tower.num_layers - 1)[-1][:, 1:]
        assert tokens.shape == (2, 64, tower.width) and torch.allclose(tokens, penultimate)
        joint = tower.joint_patch_features(images)
        dense = tower.joint_patch_features(images, dense=True)
        assert joint.shape == dense.shape == (2, 64, tower.embed_dim)
        assert not torch.allclose(joint, dense)
        assert tower.encode_text(["a red circle", "blue"]).shape == (2, tower.embed_dim)


def test_hf_tower_drops_cls_and_uses_projection():
    cfg = _cfg("tiny-hfclip-llama")
    model = build_vlm(cfg.model, cfg.data.image_aspect)
    tower = model.vision
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = tower.vision_model(pixel_values=images, output_hidden_states=True)
        assert torch.allclose(tower.patch_tokens(images), out.hidden_states[-2][:, 1:])
        pooled = tower.model.visual_projection(out.pooler_output)
        cls_joint = tower.model.visual_projection(tower.vision_model.post_layernorm(out.last_hidden_state[:, 0]))
        assert torch.allclose(pooled, cls_joint, atol=1e-5)
        assert tower.joint_patch_features(images).shape == (1, 64, tower.embed_dim)


def test_adapter_registry():
    assert isinstance(get_adapter("linear", 8, 16), torch.nn.Linear)
    mlp2 = get_adapter("mlp2x_gelu", 8, 16)
    mlp4 = get_adapter("mlp4x_gelu", 8, 16)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp2) == 2
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp4) == 4
    assert mlp4(torch.randn(3, 8)).shape == (3, 16)
    # LLaVA-1.5's layout by default; a given width changes only the hidden layers
    assert [tuple(m.weight.shape) for m in mlp2 if isinstance(m, torch.nn.Linear)] == [(16, 8), (16, 16)]
    narrow = get_adapter("mlp3x_gelu", 8, 16, hidden=4)
    assert [tuple(m.weight.shape) for m in narrow if isinstance(m, torch.nn.Linear)] == [(4, 8), (4, 4), (16, 4)]
    assert narrow(torch.randn(3, 8)).shape == (3, 16)
    assert isinstance(get_adapter("linear", 8, 16, hidden=4), torch.nn.Linear)  # no hidden layer to size
    with pytest.raises(KeyError, match="valid: linear"):
        get_adapter("qformer", 8, 16)


def test_world_tokenizer_keeps_world_words_whole(tiny):
    from sea_ray.world.generator import world_words

    tok = tiny.tokenizer
    whole = [w for w in world_words() if len(tok(" " + w, add_special_tokens=False).input_ids) == 1]
    assert len(whole) == len(world_words())


def test_frozen_modules_stay_in_eval_mode(tiny):
    model = copy.deepcopy(tiny)
    model.freeze("align")
    model.train()
    assert model.adapter.training and not model.llm.training and not model.vision.training
    model.freeze("instruct")
    model.train()
    assert model.llm.training and not model.vision.training


# --------------------------------------------------------------------------- LoRA (model.llm.lora)


def _lora_cfg(**lora):
    raw = {"job": "instruct", "model": {"preset": "tiny-openclip-llama",
                                        "llm": {"lora": {"enabled": True, "rank": 4, **lora}}},
           "data": {"manifest": "m"}, "batch": {"global_size": 2, "per_worker": 2}}
    return validate(raw)


def test_lora_trains_only_its_weights_and_the_adapter(tiny):
    """instruct with LoRA: gradients reach the LoRA weights of the target modules and the adapter,
    never a base weight of the LLM; the tower only with train_vision; a checkpoint (the trainable
    state dict) holds exactly those."""
    torch.manual_seed(0)
    cfg = _lora_cfg(target_modules=["q_proj", "v_proj"])
    model = build_vlm(cfg.model, cfg.data.image_aspect)
    assert model.freeze("instruct") == {"vision": False, "adapter": True, "llm": True}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if n.startswith("llm.")}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"}
    assert trainable - lora == {n for n, _ in model.adapter.named_parameters(prefix="adapter")}
    assert set(model.trainable_state_dict()) == trainable
    ids, mask, labels, images = _batch(model, [" a red circle", " is there a blue square ? yes"], [True, True])
    model(ids, mask, labels, images)["loss_lm"].backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n in trainable if ".lora_A." not in n}  # lora_B starts at zero: A's gradient is 0
    assert model.base_llm is model.llm.get_base_model() and type(model.base_llm).__name__ == "LlamaForCausalLM"
    model.train()
    assert model.llm.training and not model.vision.training  # LoRA dropout is on while training
    plan = model.freeze("instruct", train_vision=True)
    assert plan["vision"] and all(p.requires_grad for p in model.vision.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm.")} == lora
    model.freeze("align")
    assert not any(p.requires_grad for p in model.llm.parameters())


def test_merging_lora_keeps_the_logits_and_gives_a_plain_llm():
    torch.manual_seed(0)
    cfg = _lora_cfg()
    model = build_vlm(cfg.model, cfg.data.image_aspect).eval()
    with torch.no_grad():  # move LoRA off its init (lora_B = 0 makes it the identity)
        for name, p in model.llm.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    ids, mask, _, images = _batch(model, [" a red circle on the left"], [True])
    with torch.no_grad():
        ours = model(ids, mask, images=images)["logits"]
        with model.llm.disable_adapter():
            base = model(ids, mask, images=images)["logits"]
        assert (ours - base).abs().max() > 1e-3  # the LoRA weights change what the model computes
        assert model.merge_lora() and not model.merge_lora()
        merged = model(ids, mask, images=images)["logits"]
    assert type(model.llm).__name__ == "LlamaForCausalLM" and model.base_llm is model.llm
    assert not any("lora" in k for k in model.llm.state_dict())
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-5)
