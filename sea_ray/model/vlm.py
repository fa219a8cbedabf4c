"""The composed LLaVA-style model: vision tower -> adapter -> LLM (pure PyTorch, no Ray).

Text arrives as token ids in which the sentinel ``IMAGE_TOKEN_INDEX`` marks where a sample's
image goes (at most one per sample; text-only samples have none). ``forward`` replaces each
sentinel by the adapter's visual tokens in the LLM's input embeddings, extends the attention
mask, and never supervises a visual position. It returns the LM loss and the adapter output
of every patch; the SEA loss (:class:`sea_ray.sea.SeaLoss`, with its learnable temperature) is
not part of the model: the training recipe applies it to those outputs.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from sea_ray.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from sea_ray.model.adapters import get_adapter
from sea_ray.model.llm import build_llm, is_lora
from sea_ray.model.vision import VisionTower, build_vision_tower

log = logging.getLogger(__name__)

STAGES = ("align", "instruct")


class VLM(nn.Module):
    def __init__(self, vision: VisionTower, adapter: nn.Module, llm: nn.Module, tokenizer=None):
        super().__init__()
        self.vision = vision
        self.adapter = adapter
        self.llm = llm
        self.tokenizer = tokenizer

    @property
    def base_llm(self) -> nn.Module:
        """The Hugging Face causal LM itself, under PEFT's LoRA model when there is one."""
        return self.llm.get_base_model() if is_lora(self.llm) else self.llm

    def merge_lora(self) -> bool:
        """Fold the LLM's LoRA weights into its base weights (PEFT's ``merge_and_unload``): the
        LLM becomes a plain causal LM computing what the LoRA model computed. False without LoRA."""
        if not is_lora(self.llm):
            return False
        self.llm = self.llm.merge_and_unload()
        return True

    @property
    def llm_width(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim

    def input_embedding_table(self) -> torch.Tensor:
        """The LLM's input-embedding rows: SEA targets are built from them (frozen, detached)."""
        return self.llm.get_input_embeddings().weight.detach()

    # ------------------------------------------------------------------ forward

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Adapter outputs per patch, [N, P, llm_width]."""
        vision_trainable = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable):
            feats = self.vision.patch_tokens(images)
        adapter_dtype = next(self.adapter.parameters(), feats).dtype
        return self.adapter(feats.to(adapter_dtype))

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor],
               visual: Optional[torch.Tensor]):
        """Build (inputs_embeds, attention_mask, labels, image_offsets) with visual tokens spliced in.

        ``image_offsets[b]`` is where sample b's first visual token sits (-1 for text-only)."""
        embed = self.llm.get_input_embeddings()
        is_image = input_ids == IMAGE_TOKEN_INDEX
        per_sample = is_image.sum(dim=1)
        if (per_sample > 1).any():
            raise ValueError("at most one image placeholder per sample is supported")
        n_images = int(per_sample.sum())
        if n_images != (0 if visual is None else visual.shape[0]):
            raise ValueError(f"{n_images} image placeholders but {0 if visual is None else visual.shape[0]} images")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None and self.tokenizer.pad_token_id is not None else 0
        text_embeds = embed(input_ids.masked_fill(is_image, pad_id))
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        seqs, masks, labs, offsets = [], [], [], []
        img = 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids_b, emb_b, lab_b = input_ids[b][keep], text_embeds[b][keep], labels[b][keep]
            pos = (ids_b == IMAGE_TOKEN_INDEX).nonzero()
            if len(pos):
                p = int(pos[0])
                v = visual[img].to(emb_b.dtype)
                img += 1
                emb_b = torch.cat([emb_b[:p], v, emb_b[p + 1:]])
                lab_b = torch.cat([lab_b[:p], lab_b.new_full((v.shape[0],), IGNORE_INDEX), lab_b[p + 1:]])
                offsets.append(p)
            else:
                offsets.append(-1)
            seqs.append(emb_b)
            labs.append(lab_b)
            masks.append(torch.ones(emb_b.shape[0], dtype=attention_mask.dtype, device=emb_b.device))
        length = max(s.shape[0] for s in seqs)
        out_emb = text_embeds.new_zeros((len(seqs), length, text_embeds.shape[-1]))
        out_mask = attention_mask.new_zeros((len(seqs), length))
        out_lab = labels.new_full((len(seqs), length), IGNORE_INDEX)
        for b, (s, m, l) in enumerate(zip(seqs, masks, labs)):
            out_emb[b, : s.shape[0]] = s
            out_mask[b, : m.shape[0]] = m
            out_lab[b, : l.shape[0]] = l
        return out_emb, out_mask, out_lab, torch.tensor(offsets, device=input_ids.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None) -> dict:
        """The LM loss and logits, the adapter output of every patch (``visual [B, P, D]``, None
        without images), each image's offset in the spliced sequence and the spliced labels."""
        visual = self.encode_images(images) if images is not None and images.shape[0] else None
        embeds, mask, labs, offsets = self.splice(input_ids, attention_mask, labels, visual)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labs, use_cache=False)
        result = {"loss_lm": out.loss, "logits": out.logits, "visual": visual, "image_offsets": offsets,
                  "labels": labs}
        return result

    # ------------------------------------------------------------------ stages

    def freeze(self, stage: str, train_vision: bool = False) -> dict[str, bool]:
        """Set requires_grad per module for ``stage`` and log the result; returns {module: trainable}.

        align: adapter trainable; vision tower and LLM frozen (the SEA temperature is the loss's).
        instruct: adapter + LLM trainable; vision tower only with ``train_vision``. An LLM with
        LoRA (``model.llm.lora``) trains its LoRA weights only, its base staying frozen."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
        plan = {
            "vision": stage == "instruct" and train_vision,
            "adapter": True,
            "llm": stage == "instruct",
        }
        self._plan = plan
        self.train(self.training)
        for name, trainable in plan.items():
            module = getattr(self, name)
            module.requires_grad_(trainable)
            what = "trainable" if trainable else "frozen"
            if name == "llm" and trainable and is_lora(module):
                module.requires_grad_(False)
                module.set_requires_grad(module.active_adapters, True)  # PEFT's: the LoRA weights only
                what = "LoRA"
            n = sum(p.numel() for p in module.parameters())
            k = sum(p.numel() for p in module.parameters() if p.requires_grad)
            log.info("stage %s: %-8s %-9s (%s parameters%s)", stage, name, what, f"{n:,}",
                     f", {k:,} trainable" if 0 < k < n else "")
        return plan

    def train(self, mode: bool = True):
        """Frozen modules stay in eval mode (no dropout, fixed norms) whatever ``mode`` is."""
        super().train(mode)
        for name, trainable in getattr(self, "_plan", {}).items():
            if not trainable:
                getattr(self, name).eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trainable modules' tensors: what a checkpoint holds."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}


def build_vlm(model_cfg, image_aspect: str, quantized_on: Optional[torch.device] = None) -> VLM:
    """The composed model from a :class:`sea_ray.config.schema.ModelConfig`; ``image_aspect``:
    the stage's ``data.image_aspect`` (what the tower's transform does to an image);
    ``quantized_on``: where a QLoRA LLM loads its 4-bit base (:func:`sea_ray.model.llm.build_llm`)."""
    vision = build_vision_tower(model_cfg.vision, image_aspect)
    llm, tokenizer = build_llm(model_cfg.llm, quantized_on)
    llm_width = llm.get_input_embeddings().embedding_dim
    adapter = get_adapter(model_cfg.adapter.type, vision.width, llm_width, model_cfg.adapter.hidden_size)
    return VLM(vision, adapter, llm, tokenizer=tokenizer)
