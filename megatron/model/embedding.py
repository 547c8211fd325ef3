"""GPT input embedding: learned token + learned absolute position embeddings, then dropout.

Shapes: the letters of megatron/model/__init__.py.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.config import GPTConfig
from megatron.model.init_methods import torch_dtype


class Embedding(nn.Module):
    """word_embeddings [V, D] (also the tied output layer) + position_embeddings
    [max_position_embeddings, D].

    Dropout uses --hidden-dropout, as Megatron's `embedding_dropout`.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        dtype = torch_dtype(config.params_dtype)
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size,
                                            dtype=dtype)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size, dtype=dtype)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        with torch.no_grad():
            nn.init.normal_(self.word_embeddings.weight, mean=0.0, std=config.init_method_std)
            nn.init.normal_(self.position_embeddings.weight, mean=0.0,
                            std=config.init_method_std)

    def forward(self, input_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = self.word_embeddings(input_ids_BS) + self.position_embeddings(position_ids_BS)
        return self.embedding_dropout(x_BSD)
