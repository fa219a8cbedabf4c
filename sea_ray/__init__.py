"""sea_ray: SEA (Supervised Embedding Alignment) for LLaVA-style multimodal LLMs, on Ray.

Importing the package does nothing but define names; every heavy import (torch, ray,
transformers, open_clip) happens inside the submodule that needs it.
"""

__version__ = "0.1.0"
