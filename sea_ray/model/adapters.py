"""Adapters (projectors) from vision-tower width to LLM width, in a registry keyed by id.

``linear`` (LLaVA-1), ``mlp2x_gelu`` (LLaVA-1.5) and any ``mlpNx_gelu`` (N linear layers with
GELU between them); ``identity`` for towers already in the LLM's width.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def _linear(vision_width: int, llm_width: int) -> nn.Module:
    return nn.Linear(vision_width, llm_width)


def _identity(vision_width: int, llm_width: int) -> nn.Module:
    if vision_width != llm_width:
        raise ValueError(f"identity adapter needs equal widths, got {vision_width} -> {llm_width}")
    return nn.Identity()


def mlp_gelu(depth: int, vision_width: int, llm_width: int) -> nn.Module:
    if depth < 1:
        raise ValueError("mlpNx_gelu needs N >= 1")
    layers: list[nn.Module] = [nn.Linear(vision_width, llm_width)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(llm_width, llm_width)]
    return nn.Sequential(*layers)


ADAPTERS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": _linear,
    "identity": _identity,
    "mlp2x_gelu": lambda v, l: mlp_gelu(2, v, l),
}


def get_adapter(kind: str, vision_width: int, llm_width: int) -> nn.Module:
    """Build adapter ``kind``; ``mlpNx_gelu`` works for any N. Unknown ids name the valid ones."""
    if kind in ADAPTERS:
        return ADAPTERS[kind](vision_width, llm_width)
    match = _MLP.match(kind)
    if match:
        return mlp_gelu(int(match.group(1)), vision_width, llm_width)
    raise KeyError(f"unknown adapter {kind!r}; valid: {', '.join(ADAPTERS)}, mlpNx_gelu (N >= 1)")
