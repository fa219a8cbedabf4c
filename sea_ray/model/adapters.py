"""Adapters (projectors) from vision-tower width to LLM width, in a registry keyed by id.

``linear`` (LLaVA-1), ``mlp2x_gelu`` (LLaVA-1.5) and any ``mlpNx_gelu`` (N linear layers with
GELU between them); ``identity`` for towers already in the LLM's width.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def _linear(vision_width: int, llm_width: int) -> nn.Module:
    return nn.Linear(vision_width, llm_width)


def _identity(vision_width: int, llm_width: int) -> nn.Module:
    if vision_width != llm_width:
        raise ValueError(f"identity adapter needs equal widths, got {vision_width} -> {llm_width}")
    return nn.Identity()


def mlp_gelu(depth: int, vision_width: int, llm_width: int, hidden: Optional[int] = None) -> nn.Module:
    """``depth`` linear layers with GELU between them; the hidden layers are ``hidden`` wide
    (default: the LLM's width, as in LLaVA-1.5)."""
    if depth < 1:
        raise ValueError("mlpNx_gelu needs N >= 1")
    hidden = hidden or llm_width
    widths = [vision_width] + [hidden] * (depth - 1) + [llm_width]
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


ADAPTERS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": _linear,
    "identity": _identity,
    "mlp2x_gelu": lambda v, l: mlp_gelu(2, v, l),
}


def get_adapter(kind: str, vision_width: int, llm_width: int, hidden: Optional[int] = None) -> nn.Module:
    """Build adapter ``kind``; ``mlpNx_gelu`` works for any N, with hidden layers ``hidden`` wide
    (N >= 2; ignored by the others). Unknown ids name the valid ones."""
    match = _MLP.match(kind)
    if match:
        return mlp_gelu(int(match.group(1)), vision_width, llm_width, hidden)
    if kind in ADAPTERS:
        return ADAPTERS[kind](vision_width, llm_width)
    raise KeyError(f"unknown adapter {kind!r}; valid: {', '.join(ADAPTERS)}, mlpNx_gelu (N >= 1)")
