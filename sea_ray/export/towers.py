"""A sea_ray vision tower as the vision tower of ``transformers.LlavaForConditionalGeneration``.

- :func:`hf_vision` -> ``(vision_config, state_dict)`` for ``CLIPVisionModel(vision_config)``
  (or ``SiglipVisionModel`` for a SigLIP tower), keyed as that model's own ``state_dict()``.
  With transformers 5 a ``CLIPVisionModel`` has no ``vision_model.`` level: its keys are
  ``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.N.*``, ``post_layernorm.*`` (inside a
  Llava model they sit under ``model.vision_tower.``).
- :func:`image_processor` -> the Hugging Face image processor giving ``tower.transform``'s tensor
  (CLIP's for ``image_aspect`` crop, LLaVA's padding one for pad).
- :func:`select_strategy` -> LLaVA's ``vision_feature_select_strategy`` and the processor's
  ``num_additional_image_tokens``.

A Hugging Face tower (``HFTower``) is exported as it is: its ``vision_model``'s config and
weights (the text tower and the projections are left out). An open_clip ViT is converted:

==========================================  ================================================
open_clip ``visual.``                        Hugging Face ``CLIPVisionModel``
==========================================  ================================================
``conv1.weight`` (no bias)                  ``embeddings.patch_embedding.weight`` (no bias)
``class_embedding``                         ``embeddings.class_embedding``
``positional_embedding``                    ``embeddings.position_embedding.weight``
``ln_pre``                                  ``pre_layrnorm``
``transformer.resblocks.N.ln_1``            ``encoder.layers.N.layer_norm1``
``...attn.in_proj_{weight,bias}`` (q;k;v)   ``...self_attn.{q,k,v}_proj.{weight,bias}``
``...attn.out_proj``                        ``...self_attn.out_proj``
``...ln_2``                                 ``...layer_norm2``
``...mlp.c_fc`` / ``...mlp.c_proj``         ``...mlp.fc1`` / ``...mlp.fc2``
``ln_post``                                 ``post_layernorm``
``proj``                                    left out (LLaVA reads hidden states)
==========================================  ================================================

Hidden state 0 is the embedding output after ``ln_pre`` / ``pre_layrnorm`` on both sides, and
hidden state i the output of block i, so LLaVA's ``vision_feature_layer`` is the tower's
``select_layer``. What a ``CLIPVisionModel`` cannot compute is refused with a ``ValueError``:
LayerScale, an attentional pooler, a pooling other than the class token, no ``ln_pre``,
norms other than LayerNorm (or LayerNorms of differing eps), the custom block (qk-norm, scaled
cosine attention, head / inner / fc scaling), active patch dropout, non-square images or patches.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sea_ray.data.images import PAD_RULE, RESIZE_RULE



# --------------------------------------------------------------------------- checks (open_clip)


def _refuse(what: str) -> None:
    raise ValueError(f"cannot export this open_clip tower to a Hugging Face CLIPVisionModel: {what} is not "
                     "supported")


def _square(value, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            _refuse(f"a non-square {what} {tuple(value)}")
        value = value[0]
    return int(value)


def _layer_norms(visual) -> list[nn.Module]:
    blocks = visual.transformer.resblocks
    return [visual.ln_pre, *(n for b in blocks for n in (b.ln_1, b.ln_2)), visual.ln_post]


def _layer_norm_eps(visual) -> float:
    """The one eps of every norm of the tower; each must be a LayerNorm over the width."""
    from open_clip.transformer import LayerNorm, LayerNormFp32

    width = visual.transformer.width
    eps = set()
    for norm in _layer_norms(visual):
        if isinstance(norm, nn.Identity):
            _refuse("a tower without ln_pre (no_ln_pre)")
        if type(norm) not in (nn.LayerNorm, LayerNorm, LayerNormFp32) or tuple(norm.normalized_shape) != (width,):
            _refuse(f"the norm {type(norm).__name__} (only LayerNorm over the width)")
        eps.add(norm.eps)
    if len(eps) != 1:
        _refuse(f"LayerNorms with differing eps {sorted(eps)}")
    return eps.pop()


def _activation(visual) -> str:
    """``hidden_act`` for the MLP activation of the blocks (one for all)."""
    from open_clip.transformer import QuickGELU

    names = set()
    for block in visual.transformer.resblocks:
        act = block.mlp.gelu
        if type(act) is QuickGELU:
            names.add("quick_gelu")
        elif type(act) is nn.GELU:
            names.add("gelu" if act.approximate == "none" else "gelu_pytorch_tanh")
        elif type(act) in (nn.SiLU, nn.ReLU):
            names.add(type(act).__name__.lower())
        else:
            _refuse(f"the MLP activation {type(act).__name__}")
    if len(names) != 1:
        _refuse(f"blocks with differing activations {sorted(names)}")
    return names.pop()


def _check_block(i: int, block: nn.Module) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    if type(block) is not ResidualAttentionBlock:
        _refuse(f"block {i} of type {type(block).__name__} (qk-norm, scaled cosine attention, head / inner / fc "
                "scaling)")
    if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
        _refuse(f"LayerScale (ls_1 / ls_2) in block {i}")
    if hasattr(block, "ln_1_kv"):
        _refuse(f"cross-attention in block {i}")
    if list(dict(block.mlp.named_children())) != ["c_fc", "gelu", "c_proj"]:
        _refuse(f"the MLP layout {list(dict(block.mlp.named_children()))} of block {i}")
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.bias_k is not None \
            or attn.add_zero_attn or not attn.batch_first:
        _refuse(f"the attention of block {i} (only a batch-first nn.MultiheadAttention with a fused in_proj, "
                "no bias_k/bias_v, no zero attention)")


def _check_visual(visual) -> None:
    if getattr(visual, "class_embedding", None) is None:
        _refuse("a tower without a class token")
    if getattr(visual, "attn_pool", None) is not None:
        _refuse("an attentional pooler")
    if getattr(visual, "pool_type", "tok") != "tok":
        _refuse(f"pool_type {visual.pool_type!r} (CLIPVisionModel pools the class token)")
    dropout = visual.patch_dropout
    if not isinstance(dropout, nn.Identity) and dropout.training and dropout.prob > 0:
        _refuse("active patch dropout (put the tower in eval mode)")
    for i, block in enumerate(visual.transformer.resblocks):
        _check_block(i, block)


# --------------------------------------------------------------------------- conversion (open_clip)


def _open_clip_config(visual):
    from transformers import CLIPVisionConfig

    _check_visual(visual)
    blocks = visual.transformer.resblocks
    image_size = _square(visual.image_size, "image size")
    patch_size = _square(visual.patch_size, "patch size")
    grid = image_size // patch_size
    if visual.positional_embedding.shape[0] != grid * grid + 1:
        _refuse(f"a positional embedding of {visual.positional_embedding.shape[0]} rows for a {grid}x{grid} grid")
    return CLIPVisionConfig(
        hidden_size=visual.transformer.width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        num_channels=visual.conv1.in_channels,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=_activation(visual),
        layer_norm_eps=_layer_norm_eps(visual),
        projection_dim=visual.output_dim,
    )


def _norm(prefix: str, norm: nn.LayerNorm) -> dict[str, torch.Tensor]:
    """A LayerNorm's weight and bias (ones / zeros where it has none)."""
    width = norm.normalized_shape[0]
    weight = norm.weight if norm.weight is not None else torch.ones(width)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(weight)
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}


def _linear(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias if bias is not None else weight.new_zeros(len(weight))}


def _block(prefix: str, block: nn.Module) -> dict[str, torch.Tensor]:
    attn = block.attn
    weights = attn.in_proj_weight.chunk(3)
    biases = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    out = {}
    for name, weight, bias in zip("qkv", weights, biases):
        out.update(_linear(f"{prefix}.self_attn.{name}_proj", weight, bias))
    out.update(_linear(f"{prefix}.self_attn.out_proj", attn.out_proj.weight, attn.out_proj.bias))
    out.update(_norm(f"{prefix}.layer_norm1", block.ln_1))
    out.update(_linear(f"{prefix}.mlp.fc1", block.mlp.c_fc.weight, block.mlp.c_fc.bias))
    out.update(_linear(f"{prefix}.mlp.fc2", block.mlp.c_proj.weight, block.mlp.c_proj.bias))
    out.update(_norm(f"{prefix}.layer_norm2", block.ln_2))
    return out


def _open_clip_state_dict(visual) -> dict[str, torch.Tensor]:
    if visual.conv1.bias is not None:
        _refuse("a patch embedding with a bias")
    out = {
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        **_norm("pre_layrnorm", visual.ln_pre),
    }
    for i, block in enumerate(visual.transformer.resblocks):
        out.update(_block(f"encoder.layers.{i}", block))
    out.update(_norm("post_layernorm", visual.ln_post))
    # own, contiguous copies: the q / k / v slices would otherwise share the fused tensor's storage
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


# --------------------------------------------------------------------------- public


def hf_vision(tower) -> tuple:
    """``(vision_config, state_dict)`` of the Hugging Face vision model equal to ``tower``.

    ``vision_config`` is a ``CLIPVisionConfig`` (a SigLIP tower's own ``SiglipVisionConfig``), and
    ``CLIPVisionModel(vision_config).load_state_dict(state_dict, strict=True)`` loads; its hidden
    state k equals the tower's hidden state k.
    """
    if tower.backend == "hf":
        vision_model = tower.vision_model
        state = {key: value.detach().clone() for key, value in vision_model.state_dict().items()}
        return copy.deepcopy(vision_model.config), state
    if tower.backend != "open_clip":
        raise ValueError(f"cannot export a vision tower of backend {tower.backend!r}")
    visual = tower.clip.visual
    config = _open_clip_config(visual)
    return config, _open_clip_state_dict(visual)


# the geometry a tower's transform records (transform_spec()["resize"]) -> the processor class with it
PROCESSORS = {RESIZE_RULE: "CLIPImageProcessor", PAD_RULE: "LlavaImageProcessor"}


def image_processor(tower, backend: str = "pil"):
    """The Hugging Face image processor whose ``pixel_values`` for a PIL image are
    ``tower.transform(image)``: shortest side resized to ``image_size`` (bicubic), centre crop,
    rescale by 1/255, the tower's mean and std (SigLIP's too: sea_ray crops for every tower).
    A tower of ``image_aspect`` ``pad`` gets LLaVA's ``LlavaImageProcessor`` with ``do_pad``: the
    image first pasted centred on a square of ``int(mean * 255)``, as
    :class:`sea_ray.data.images.PadSquareResizeCenterCrop` pads; ``crop`` gets CLIP's processor.

    ``backend="pil"`` (``CLIPImageProcessorPil`` / ``LlavaImageProcessorPil``) resizes with PIL, as
    sea_ray's transform does, and matches it exactly; ``"torchvision"`` (the default of
    transformers 5's ``AutoImageProcessor``) resizes tensors and may differ by a grey level or two
    where it resizes (measured: one at 64 px, two at 224 and 336 px, padded or not).
    """
    import transformers
    from transformers.image_utils import PILImageResampling

    rule = tower.transform_spec()["resize"]
    if rule not in PROCESSORS:
        raise ValueError(f"cannot export the transform {rule!r} (only {', '.join(PROCESSORS)})")
    if backend not in ("pil", "torchvision"):
        raise ValueError(f"image processor backend must be 'pil' or 'torchvision', not {backend!r}")
    name = PROCESSORS[rule] + ("Pil" if backend == "pil" else "")
    size = tower.image_size
    pad = {"do_pad": True} if rule == PAD_RULE else {}  # background: int(x * 255) of image_mean, LLaVA's
    return getattr(transformers, name)(
        do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(tower.mean), image_std=list(tower.std),
        do_convert_rgb=True, **pad,
    )


def select_strategy(tower) -> tuple[str, int]:
    """``(vision_feature_select_strategy, num_additional_image_tokens)`` for LLaVA: ``("default", 1)``
    when the tower has a class token that sea_ray drops, ``("full", 0)`` otherwise."""
    return ("default", 1) if tower.has_cls else ("full", 0)
