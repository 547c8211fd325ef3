"""Model code: GPT (gpt_model), transformer layers and MoE placement (transformer), attention,
embeddings, the dense MLP, routers (mlp_gating), the MoE layer (moe/) and the output layer's
fused cross-entropy (lm_loss).

`from megatron.model import GPTModel, GPTOutput` resolves lazily (PEP 562), so importing a leaf
such as `megatron.model.mlp_gating` does not build the whole model import graph (and the MoE
package can import the routers without an import cycle through this file).

Shape letters: one meaning each, in every module of megatron/model/ and megatron/model/moe/
(tensor names end in them: x_BSD is [batch, sequence, hidden]).

    B  batch (sequences)                   S  sequence positions of this call
    M  key positions (cached + this call)  T  tokens: B * S flattened (an MoE layer's rows)
    D  hidden size, the model width        V  padded vocabulary
    H  attention heads                     A  attention head size (D = H * A)
    F  FFN hidden size (dense MLP or one expert)
    E  experts of an MoE layer             L  experts held by one rank: E / W
    W  ranks of an expert-parallel group   R  rows one rank receives from them
    K  choice slots per token (an upper bound: threshold routing wants a prefix of them)
    N  flat (token, slot) pairs, n = t * K + k: T * K of them
    C  capacity: the most pairs an expert keeps
    P  dispatch rows, sorted by expert: the kept pairs (a static bound in the sync-free plan,
       its rows past the kept pairs padding)
    J  entries of the token bags: the dispatch rows regrouped by token (as many as P)
    G  token bags: the T tokens' bags, then the sync-free plan's scratch bags
    I, O  input and output width of one of an expert's GEMMs (D and F, or F and D)
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
