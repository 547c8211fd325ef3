"""A trained checkpoint as a Hugging Face directory (tools/convert_to_hf.py).

    result = export_checkpoint(load_dir, out_dir, force=False, vocab_file=None, merge_file=None)

DIR gets config.json, model.safetensors, generation_config.json and the GPT-2 tokenizer files of
the vocabulary the model was trained with (the checkpoint's saved --vocab-file/--merge-file, or
the ones given). Which model class:

- a dense model whose architecture GPT-2 expresses exactly (gpt2.not_stock_gpt2_reason: every
  dense model except Megatron's --onnx-safe GeLU) -> transformers' own GPT2LMHeadModel, no
  remote code (weights permuted by gpt2.py);
- anything else (MoE layers of any router; the onnx-safe GeLU) -> XMoEForCausalLM, whose code
  (configuration_xmoe.py, modeling_xmoe.py, copied into DIR) loads with trust_remote_code=True;
  its weights are our state dict unchanged. MoE inference there is dropless by default
  (drop_tokens=false; the checkpoint's evaluation capacity is kept in the config for
  drop_tokens=True).

Before DIR appears, the export is checked: the tokenizer written encodes a probe text as ours
does, and the model transformers loads from it gives our logits (dropless routing) on a probe
sequence. Everything is written into a hidden sibling directory renamed to DIR at the end, so a
failure leaves nothing that looks like an export (the sibling is removed). An existing non-empty
DIR is replaced only with force.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from megatron.checkpoint_check import check_intact, pointed_tag_dir, saved_model_args
from megatron.config import GPTConfig
from megatron.hf.gpt2 import (gpt2_config_kwargs, is_dense, not_stock_gpt2_reason,
                              to_gpt2_state_dict)

HF_DIR = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE = ("configuration_xmoe.py", "modeling_xmoe.py")
EOD_TOKEN = "<|endoftext|>"
PROBE_TEXT = "The router sends 3 tokens to 2 experts.\n  Dropless: ünïcödé, tabs\tand émojis 🙂!"
PROBE_TOKENS = 32
VERIFY_TOLERANCE = 1e-3         # fp32; a wrong permutation or a lost expert differs by O(1)


@dataclass(frozen=True)
class ExportResult:
    out_dir: str
    model_class: str                # "GPT2LMHeadModel" or "XMoEForCausalLM"
    remote_code_reason: Optional[str]   # why not stock GPT-2 (None: stock)
    iteration: int
    max_logit_difference: Optional[float]   # the check's (None: not checked)
    notes: Tuple[str, ...]          # lines for the user (dropless routing, ...)


# ----------------------------------------------------------------------------- output directory

def check_out_dir(out_dir: str, force: bool, sources: List[str]) -> None:
    """ValueError unless `out_dir` may be (re)written: absent, an empty directory, or, with
    force, a non-empty one that holds none of `sources` (the inputs, never deleted)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    real = os.path.realpath(out_dir)
    for src in sources:
        src_real = os.path.realpath(src)
        if src_real == real or src_real.startswith(real + os.sep):
            raise ValueError(f"--out {out_dir} holds the input {src}: choose another --out")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ValueError(f"--out {out_dir} exists and is not empty: give --force to replace "
                         "it, or another directory")


@contextlib.contextmanager
def staged_directory(out_dir: str) -> Iterator[str]:
    """Yield a hidden sibling directory of `out_dir`; when the block succeeds it replaces
    `out_dir` (the old one, if any, is removed after the rename), else it is removed."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None:         # put the previous directory back
                os.rename(os.path.join(old, name), out_dir)
                os.rmdir(old)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- the checkpoint

def read_checkpoint(load_dir: str) -> Tuple[GPTConfig, Dict[str, Any]]:
    """(model config, saved run arguments) of the checkpoint `load_dir`'s pointer names;
    ValueError when it is missing, incomplete or not one of ours."""
    from megatron.checkpoint_model import model_config_from_saved, saved_run_args

    tag_dir = pointed_tag_dir(load_dir)
    check_intact(load_dir, os.path.basename(tag_dir))
    args = saved_run_args(load_dir)         # ValueError: a file torch cannot read
    saved = saved_model_args(tag_dir)
    if not isinstance(saved, dict):
        raise ValueError(f"{tag_dir} is not an xmoe checkpoint (no saved model flags): its "
                         "architecture is unknown")
    return model_config_from_saved(saved), args


# ----------------------------------------------------------------------------- writing

def xmoe_config_kwargs(config: GPTConfig, eod: int) -> Dict[str, Any]:
    """XMoEConfig keyword arguments (remote code) of any model of ours; dropless routing."""
    moe = config.moe
    return dict(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.ffn_hidden_size,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_epsilon=config.layernorm_epsilon, activation=config.activation,
        hidden_dropout=config.hidden_dropout, attention_dropout=config.attention_dropout,
        initializer_range=config.init_method_std,
        num_experts=[config.experts_for_layer(L) for L in range(1, config.num_layers + 1)],
        moe_ffn_hidden_size=moe.ffn_hidden_size, expert_bias=moe.expert_bias,
        router=moe.router, threshold=moe.threshold,
        threshold_max_experts=moe.threshold_max_experts, topk=moe.topk, drop_tokens=False,
        capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
        bos_token_id=eod, eos_token_id=eod, architectures=["XMoEForCausalLM"],
        auto_map={"AutoConfig": "configuration_xmoe.XMoEConfig",
                  "AutoModelForCausalLM": "modeling_xmoe.XMoEForCausalLM"})


def write_model(model: Any, config: GPTConfig, eod: int, out: str) -> str:
    """config.json, model.safetensors, generation_config.json (+ the remote code); returns the
    model class name."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    state = model.state_dict()
    if not_stock_gpt2_reason(config) is None:
        from transformers import GPT2Config

        GPT2Config(**gpt2_config_kwargs(config, eod)).save_pretrained(out)
        tensors, name = to_gpt2_state_dict(state, config), "GPT2LMHeadModel"
    else:
        from megatron.hf.configuration_xmoe import XMoEConfig

        XMoEConfig(**xmoe_config_kwargs(config, eod)).save_pretrained(out)
        for filename in REMOTE_CODE:
            shutil.copyfile(os.path.join(HF_DIR, filename), os.path.join(out, filename))
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        name = "XMoEForCausalLM"
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(bos_token_id=eod, eos_token_id=eod).save_pretrained(out)
    return name


def write_tokenizer(vocab: str, merges: str, max_length: int, out: str, ours: Any) -> None:
    """GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer.json, configs); ValueError if
    transformers' tokenizer loaded from them encodes PROBE_TEXT otherwise than ours."""
    from transformers import AutoTokenizer

    shutil.copyfile(vocab, os.path.join(out, "vocab.json"))
    shutil.copyfile(merges, os.path.join(out, "merges.txt"))
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                   "add_bos_token": False, "model_max_length": max_length,
                   "errors": "replace", **special}, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    backend = getattr(AutoTokenizer.from_pretrained(out), "backend_tokenizer", None)
    if backend is not None:     # the fast tokenizer's one file, read by tokenizers alone
        backend.save(os.path.join(out, "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(out)(PROBE_TEXT)["input_ids"]
    if list(theirs) != ours.tokenize(PROBE_TEXT):
        raise ValueError(f"transformers' GPT-2 tokenizer built from {vocab} and {merges} "
                         "encodes differently from xmoe's: not exported")


def logit_difference(model: Any, out: str, model_class: str) -> float:
    """Max |logit difference| between our model (dropless routing) and the model transformers
    loads from `out`, on PROBE_TOKENS deterministic token ids."""
    if model_class == "GPT2LMHeadModel":
        from transformers import GPT2LMHeadModel as cls
    else:       # the class of the code copied into `out` (imported from here, not from `out`)
        from megatron.hf.modeling_xmoe import XMoEForCausalLM as cls
    theirs = cls.from_pretrained(out).eval()
    n = min(PROBE_TOKENS, model.config.max_position_embeddings)
    ids = (torch.arange(n) * 7919 % model.config.padded_vocab_size).unsqueeze(0)
    with torch.no_grad():
        diff = (model(ids).logits - theirs(ids).logits).abs().max()
    return float(diff)


def export_checkpoint(load_dir: str, out_dir: str, *, force: bool = False,
                      vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                      verify: bool = True) -> ExportResult:
    """Write the Hugging Face directory `out_dir` of checkpoint `load_dir` (module docstring)."""
    from megatron.checkpoint_model import checkpoint_tokenizer, load_model

    check_out_dir(out_dir, force, [load_dir])
    config, args = read_checkpoint(load_dir)
    vocab, merges, tokenizer = checkpoint_tokenizer(args, config.padded_vocab_size, vocab_file,
                                                    merge_file)
    model, iteration = load_model(load_dir, config, "cpu")
    notes: List[str] = []
    if not is_dense(config):
        if config.moe.drop_tokens:
            model.set_routing(drop_tokens=False)       # the export's default, for the check
        notes.append(f"MoE inference is dropless (drop_tokens=false); xmoe evaluated this "
                     f"checkpoint with capacity factor {config.moe.eval_capacity_factor}: "
                     f"load with drop_tokens=True to apply it")
    diff = None
    with staged_directory(out_dir) as tmp:
        # The tokenizer first: transformers reads config.json, if present, to load it.
        write_tokenizer(vocab, merges, config.max_position_embeddings, tmp, tokenizer)
        model_class = write_model(model, config, tokenizer.eod, tmp)
        if verify:
            diff = logit_difference(model, tmp, model_class)
            if not diff <= VERIFY_TOLERANCE:
                raise ValueError(f"the exported {model_class}'s logits differ from xmoe's by "
                                 f"{diff:.3g} (> {VERIFY_TOLERANCE}): not exported")
    return ExportResult(out_dir, model_class, not_stock_gpt2_reason(config), iteration, diff,
                        tuple(notes))
