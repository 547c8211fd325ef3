"""A minimal plain-PyTorch GPT and its training step: the `plain` reference config of
benchmarks/train_throughput.py, i.e. what the dense GPT-125M would cost written the short way.

Model: learned position embeddings, pre-LN blocks (LayerNorm -> causal self-attention through
torch's scaled_dot_product_attention -> dropout -> residual; LayerNorm -> tanh-GeLU FFN ->
dropout -> residual), a final LayerNorm and an output layer tied to the word embedding. Init as
Megatron's: weights N(0, std), the two output projections of each block N(0, std / sqrt(2 L)),
biases 0.

Step: the usual minimal mixed-precision recipe: fp32 parameters, forward under
torch.autocast(bfloat16) (matmuls and attention in bf16), cross-entropy in fp32 on
logits.float(), backward, clip_grad_norm_ (foreach), torch's fused AdamW on the fp32 parameters
(weight decay on the matrices, not on biases and LayerNorms), zero_grad(set_to_none). No
DeepSpeed, no logging, no host sync inside the step. With compile the model (loss included) is
torch.compile'd; the optimizer and clipping stay eager.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    def __init__(self, vocab: int, positions: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(positions, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        positions_S = torch.arange(ids_BS.shape[1], device=ids_BS.device)
        return self.drop(self.wte(ids_BS) + self.wpe(positions_S))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2)
                   for t in self.qkv(x_BSD).split(D, dim=2))
        ctx_BHSA = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(ctx_BHSA.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, ffn)
        self.proj = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, attention_dropout)
        self.mlp = MLP(hidden, ffn)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class PlainGPT(nn.Module):
    """forward(ids [B, S], labels [B, S]) -> mean fp32 cross-entropy."""

    def __init__(self, vocab: int, positions: int, layers: int, hidden: int, heads: int,
                 ffn: int, dropout: float = 0.1, attention_dropout: float = 0.1,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.embedding = Embedding(vocab, positions, hidden, dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn, dropout, attention_dropout)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        output_std = init_std / math.sqrt(2.0 * layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 2:
                    std = output_std if name.endswith("proj.weight") else init_std
                    p.normal_(0.0, std)

    def forward(self, ids_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = self.embedding(ids_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD)
        logits_BSV = F.linear(self.ln_f(x_BSD), self.embedding.wte.weight)
        return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten())


class PlainTrainer:
    """One optimizer step per train_step over `micro_steps` micro-batches {"text": [b, s+1]}.

    The step calls self.forward, self.backward, self.clip_gradients and self.optimizer.step
    through their attributes (a profiler may wrap them); after_step (e.g. an LR schedule) runs
    after the optimizer step. Returns the mean loss, a device tensor (no sync).
    """

    def __init__(self, model: PlainGPT, batches: Iterator[Dict[str, torch.Tensor]], lr: float,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 clip_grad: float = 1.0, micro_steps: int = 1, compile: bool = False,
                 after_step: Optional[Callable[[], None]] = None) -> None:
        self.model, self.batches, self.clip_grad = model, batches, clip_grad
        self.micro_steps, self.after_step = micro_steps, after_step
        self.device_type = next(model.parameters()).device.type
        self.call = torch.compile(model) if compile else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.dim() >= 2],
                   "weight_decay": weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["text"]
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.call(tokens[:, :-1], tokens[:, 1:])

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_gradients(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=True)

    def train_step(self) -> torch.Tensor:
        total = None
        for _ in range(self.micro_steps):
            loss = self.forward(next(self.batches))
            self.backward(loss / self.micro_steps if self.micro_steps > 1 else loss)
            total = loss.detach() if total is None else total + loss.detach()
        if self.clip_grad > 0:
            self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        return total / self.micro_steps if self.micro_steps > 1 else total
