"""The router study's configurations and the pretrain_gpt.py command line of each.

Every configuration trains the same GPT (shape, data, seed, batch, LR schedule, token budget: the
`StudySettings`) and differs only in its FFN layers. With the dense FFN F = 4 x hidden (3072 at
hidden 768), the default set, in the XMoE paper's terms (Yang et al. 2024, section 4):

    dense           FFN F in every layer
    topk2-16xF/2    16 experts of F/2, top-2       the paper's top-k baseline (coarser experts)
    topk8-64xF/8    64 experts of F/8, top-8       XMoE's small experts under top-k (the fork's
                                                   TOPK launch script: 8 x F/8 = F per token)
    switch-8xF      8 experts of F, top-1          Switch Transformer
    xmoe-64xF/8-tT  64 experts of F/8, threshold T XMoE (T = 0.9 by default)
    d2s-64xF/8-t1.0 64 experts of F/8, threshold 1.0, dropless: every expert on every token;
                    swept afterwards at lower thresholds ("dense-to-sparse" inference)

Expert sizes follow --hidden-size, so a smaller shape keeps the paper's ratios; names carry the
actual sizes (topk2-16x1536 at hidden 768). MoE layers are every --expert-interval-th layer
with the capacity factors of examples_deepspeed/MoE/ds_pretrain_gpt_xmoe_small.sh (8 in training
and evaluation, minimum 4) for every router: at 64 experts that is C = T/8 per expert, exactly
top-8's even share and ~2.7x the share of ~3 threshold-routed experts per token. The d2s run is
dropless (--disable-moe-token-dropping): at threshold 1.0 each token wants every expert, and any
capacity below T per expert would drop most pairs, so "trained with all small experts" would not
hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

# kind -> (experts, expert FFN as a fraction (num, den) of F, router, k, description)
KINDS = {
    "dense": (1, (1, 1), "dense", 1, "dense GPT"),
    "topk2": (16, (1, 2), "topk", 2, "top-2 of 16 coarse experts (the paper's top-k baseline)"),
    "topk8": (64, (1, 8), "topk", 8, "top-8 of XMoE's 64 small experts"),
    "switch": (8, (1, 1), "switch", 1, "switch (top-1) of 8 experts of the dense FFN's size"),
    "xmoe": (64, (1, 8), "threshold", 1, "XMoE threshold routing of 64 small experts"),
    "d2s": (64, (1, 8), "threshold", 1, "dense-to-sparse: 64 small experts trained at threshold "
                                        "1.0 (dropless), swept at lower thresholds"),
}
DEFAULT_KINDS = ("dense", "topk2", "topk8", "switch", "xmoe", "d2s")
D2S_THRESHOLD = 1.0


@dataclass(frozen=True)
class StudyConfig:
    """One configuration of the study: its FFN layers (everything else is shared)."""

    kind: str
    name: str
    num_experts: int            # 1: dense
    expert_ffn: int             # FFN hidden size of one expert (dense: the dense FFN)
    dense_ffn: int
    router: str                 # dense | topk | switch | threshold
    topk: int
    threshold: Optional[float]
    dropless: bool
    description: str

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def is_threshold(self) -> bool:
        return self.router == "threshold"

    def moe_flags(self, s: "StudySettings") -> List[str]:
        """pretrain_gpt.py's MoE flags of this configuration ([] for dense)."""
        if not self.is_moe:
            return []
        flags = ["--expert-interval", str(s.expert_interval),
                 "--moe-ffn-hidden-size", str(self.expert_ffn),
                 "--moe-train-capacity-factor", str(s.capacity_factor),
                 "--moe-eval-capacity-factor", str(s.eval_capacity_factor),
                 "--moe-min-capacity", str(s.min_capacity),
                 "--moe-loss-coeff", str(s.moe_loss_coeff), "--create-moe-param-group"]
        if self.router == "topk":
            flags += ["--use-topk", "--topk", str(self.topk)]
        elif self.router == "switch":
            flags += ["--topk", "1"]
        else:
            flags += ["--use-threshold", "--threshold", str(self.threshold)]
        if self.dropless:
            flags.append("--disable-moe-token-dropping")
        return flags


def make_config(kind: str, hidden_size: int, threshold: float) -> StudyConfig:
    """The configuration `kind` (a key of KINDS) at this hidden size."""
    experts, (num, den), router, k, description = KINDS[kind]
    dense_ffn = 4 * hidden_size
    ffn = dense_ffn * num // den
    t = D2S_THRESHOLD if kind == "d2s" else threshold if kind == "xmoe" else None
    if kind == "dense":
        name = "dense"
    elif router == "threshold":
        name = f"{kind}-{experts}x{ffn}-t{t}"
    else:
        name = f"{kind}-{experts}x{ffn}"
    return StudyConfig(kind=kind, name=name, num_experts=experts, expert_ffn=ffn,
                       dense_ffn=dense_ffn, router=router, topk=k, threshold=t,
                       dropless=kind == "d2s", description=description)


def select_configs(names: Optional[Sequence[str]], hidden_size: int, threshold: float
                   ) -> List[StudyConfig]:
    """The configurations named (full names at this shape, or their kind: `topk2`), in the order
    given; all by default. ValueError listing the known names for an unknown one."""
    table = [make_config(kind, hidden_size, threshold) for kind in DEFAULT_KINDS]
    if not names:
        return table
    by_name = {c.name: c for c in table} | {c.kind: c for c in table}
    chosen: List[StudyConfig] = []
    for name in names:
        if name not in by_name:
            raise ValueError(f"--configs: unknown configuration {name!r}; known at hidden size "
                             f"{hidden_size}: {', '.join(c.name for c in table)} (or their "
                             f"first part: {', '.join(DEFAULT_KINDS)})")
        if by_name[name] in chosen:
            raise ValueError(f"--configs: {by_name[name].name} given twice")
        chosen.append(by_name[name])
    return chosen


@dataclass(frozen=True)
class StudySettings:
    """What every configuration shares; OUT/study.json records it (see COMPARED)."""

    data_path: Tuple[str, ...]          # absolute prefixes (blend weights kept)
    vocab_file: str
    merge_file: str
    split: str
    seed: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    expert_interval: int
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    warmup_iters: int
    capacity_factor: float
    eval_capacity_factor: float
    min_capacity: int
    moe_loss_coeff: float
    threshold: float                    # of the xmoe configuration
    sweep_thresholds: Tuple[float, ...]
    eval_interval: int
    eval_iters: int
    test_iters: int
    log_interval: int
    save_interval: int
    num_workers: int
    extra_args: Tuple[str, ...]         # after `--`: passed to every run

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def train_tokens(self) -> int:
        return self.train_iters * self.tokens_per_iteration


# Settings that make two studies' runs different experiments: a study directory holding one
# with other values is refused (router_study.check_study_file). Not compared: the launcher and
# world size, the micro-batch size (accumulation reaches the same global batch), logging, save
# and data-loader settings.
COMPARED = ("data_path", "vocab_file", "merge_file", "split", "seed", "num_layers",
            "hidden_size", "num_attention_heads", "seq_length", "expert_interval",
            "global_batch_size", "train_iters", "lr", "min_lr", "warmup_iters",
            "capacity_factor", "eval_capacity_factor", "min_capacity", "moe_loss_coeff",
            "threshold", "sweep_thresholds", "eval_interval", "eval_iters", "test_iters",
            "extra_args")


def training_flags(s: StudySettings, config: StudyConfig, checkpoint_dir: str,
                   tensorboard_dir: str) -> List[str]:
    """pretrain_gpt.py's arguments for `config`: the same schedule for all, Adam, clipping and
    init as ds_pretrain_gpt_xmoe_small.sh, --save and --load the same directory (a rerun
    resumes), then the user's extra arguments."""
    h = s.hidden_size
    return [
        "--num-layers", str(s.num_layers), "--hidden-size", str(h),
        "--ffn-hidden-size", str(4 * h), "--num-attention-heads", str(s.num_attention_heads),
        "--seq-length", str(s.seq_length), "--max-position-embeddings", str(s.seq_length),
        "--init-method-std", "0.014", "--num-experts", str(config.num_experts),
        *config.moe_flags(s),
        "--micro-batch-size", str(s.micro_batch_size),
        "--global-batch-size", str(s.global_batch_size), "--train-iters", str(s.train_iters),
        "--lr", str(s.lr), "--min-lr", str(s.min_lr), "--lr-decay-style", "cosine",
        "--lr-decay-iters", str(s.train_iters), "--lr-warmup-iters", str(s.warmup_iters),
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--seed", str(s.seed),
        "--data-path", *s.data_path, "--vocab-file", s.vocab_file, "--merge-file", s.merge_file,
        "--split", s.split, "--num-workers", str(s.num_workers),
        "--log-interval", str(s.log_interval), "--eval-interval", str(s.eval_interval),
        "--eval-iters", str(s.eval_iters), "--test-iters", str(s.test_iters),
        "--save", checkpoint_dir, "--load", checkpoint_dir,
        "--save-interval", str(s.save_interval), "--tensorboard-dir", tensorboard_dir,
        *s.extra_args]


def eval_only_flags(s: StudySettings, config: StudyConfig, checkpoint_dir: str) -> List[str]:
    """pretrain_gpt.py --eval-only of the configuration's final checkpoint: its training flags
    without --save, --save-interval and --tensorboard-dir (nothing is written)."""
    flags = training_flags(s, config, checkpoint_dir, "") + ["--eval-only"]
    for flag in ("--save", "--save-interval", "--tensorboard-dir"):
        k = flags.index(flag)
        del flags[k:k + 2]
    return flags


# Flags the study sets itself: given after `--` they would break the comparison or the layout.
CONTROLLED_FLAGS = {
    "--num-layers": "--num-layers", "--hidden-size": "--hidden-size",
    "--ffn-hidden-size": "--hidden-size (FFN = 4 x hidden)",
    "--num-attention-heads": "--num-attention-heads", "--seq-length": "--seq-length",
    "--max-position-embeddings": "--seq-length", "--num-experts": "--configs",
    "--expert-interval": "--expert-interval", "--moe-ffn-hidden-size": "--configs",
    "--use-threshold": "--configs", "--use-topk": "--configs", "--topk": "--configs",
    "--threshold": "--threshold", "--disable-moe-token-dropping": "--configs",
    "--moe-train-capacity-factor": "--capacity-factor",
    "--moe-eval-capacity-factor": "--eval-capacity-factor",
    "--micro-batch-size": "--micro-batch-size", "--global-batch-size": "--global-batch-size",
    "--train-iters": "--train-iters", "--train-tokens": "--train-tokens", "--lr": "--lr",
    "--min-lr": "--min-lr", "--seed": "--seed", "--data-path": "--data-path",
    "--vocab-file": "--vocab-file", "--merge-file": "--merge-file", "--split": "--split",
    "--save": "--out-dir", "--load": "--out-dir", "--tensorboard-dir": "--out-dir",
    "--eval-interval": "--eval-interval", "--eval-iters": "--eval-iters",
    "--test-iters": "--test-iters", "--log-interval": "--log-interval",
    "--save-interval": "--save-interval", "--eval-only": "(nothing: the study trains)",
    "--exit-interval": "(nothing: the study stops runs itself)",
    "--no-log-moe-stats": "(nothing: the study reads the MoE statistics from the log)",
}


def check_extra_args(extra: Sequence[str]) -> None:
    """ValueError for an argument after `--` that the study sets itself."""
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in CONTROLLED_FLAGS:
            raise ValueError(f"{arg} after `--`: the study sets {flag} itself; use the study's "
                             f"{CONTROLLED_FLAGS[flag]}")


# ----------------------------------------------------------------------------------------------
# parameters and FLOPs


def active_parameters(total: int, expert: int, num_experts: int, used_per_layer: Sequence[float]
                      ) -> float:
    """Parameters one token uses: every non-expert parameter (embeddings, attention, dense FFNs,
    layer norms, routers) plus, per MoE layer, the experts it actually used (after capacity)
    times one expert's parameters (weights and biases). `expert`, from pretrain_gpt.py's
    `number of parameters: N (experts M)`, is split evenly over the MoE layers and their
    experts (every MoE layer of the study has the same experts)."""
    if num_experts <= 1 or not used_per_layer:
        return float(total)
    per_expert = expert / (len(used_per_layer) * num_experts)
    return (total - expert) + per_expert * sum(used_per_layer)


def moe_layer_count(num_layers: int, expert_interval: int) -> int:
    """MoE layers of the study's models (Megatron-DeepSpeed placement, no --no-moe-layer-num)."""
    return num_layers // expert_interval


def iterations_for_tokens(tokens: int, global_batch_size: int, seq_length: int) -> int:
    """Iterations that train at least `tokens` tokens (as the launch scripts compute it)."""
    return math.ceil(tokens / (global_batch_size * seq_length))
