"""Model code: GPT (gpt_model), transformer layers and MoE placement (transformer), attention,
embeddings, the dense MLP, routers (mlp_gating) and the MoE layer (moe/).

`from megatron.model import GPTModel, GPTOutput` resolves lazily (PEP 562), so importing a leaf
such as `megatron.model.mlp_gating` does not build the whole model import graph (and the MoE
package can import the routers without an import cycle through this file).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"GPTModel": "gpt_model", "GPTOutput": "gpt_model", "validate_inputs": "gpt_model"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
