"""A Hugging Face GPT-2 directory as an xmoe checkpoint (tools/convert_to_hf.py --from-hf).

    result = import_gpt2(hf_dir, out_dir, force=False)

Writes, in Megatron's layout (megatron/checkpointing.py):

    out_dir/latest_checkpointed_iteration.txt          "0"
    out_dir/iter_0000000/mp_rank_00_model_states.pt    DeepSpeed's model-file keys, our client
                                                       state (iteration 0, the model flags and
                                                       the tokenizer files' paths)
    out_dir/iter_0000000/xmoe_checkpoint.json          weights only (no optimizer state)
    out_dir/vocab.json, out_dir/merges.txt             the directory's tokenizer, if it has one

so `load_model` (generation, evaluation, export) reads it, and pretrain_gpt.py --load continues
from it with a fresh optimizer (as after tools/convert_expert_parallel_checkpoint.py). The
embedding keeps the directory's vocab_size rows; the --make-vocab-size-divisible-by whose
padding of the tokenizer gives that many rows is recorded and reported (training must use it).
Only GPT-2 (dense, model_type gpt2) is read; what our GPT cannot express is refused
(gpt2.gpt_config_from_gpt2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from megatron.checkpoint_check import MODEL_FILENAME, TRACKER_FILENAME, checkpoint_tag
from megatron.checkpointing import CHECKPOINT_VERSION
from megatron.config import GPTConfig
from megatron.hf.convert import check_out_dir, staged_directory
from megatron.hf.gpt2 import from_gpt2_state_dict, gpt_config_from_gpt2


@dataclass(frozen=True)
class ImportResult:
    out_dir: str
    config: GPTConfig
    make_vocab_size_divisible_by: Optional[int]     # None without tokenizer files
    has_tokenizer: bool


def read_hf_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    """model.safetensors, or pytorch_model.bin (tensors only); ValueError when neither."""
    path = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    path = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"--from-hf {hf_dir} holds no model.safetensors or pytorch_model.bin "
                     "(sharded weights are not read)")


def divisor_for(vocab_size: int, padded: int) -> int:
    """The largest power of two M (else `padded` itself) whose Megatron padding of the
    tokenizer's vocab_size gives `padded` rows; ValueError when padded < vocab_size."""
    if padded < vocab_size:
        raise ValueError(f"the model has {padded} embedding rows, fewer than the tokenizer's "
                         f"{vocab_size} tokens")
    for m in (2 ** k for k in range(12, -1, -1)):
        if -(-vocab_size // m) * m == padded:
            return m
    return padded


def import_gpt2(hf_dir: str, out_dir: str, *, force: bool = False) -> ImportResult:
    """Write the checkpoint `out_dir` holding the GPT-2 of Hugging Face directory `hf_dir`."""
    from megatron.expert_checkpoint import write_layout
    from megatron.tokenizer import TokenizerError, build_tokenizer

    where = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(where):
        raise ValueError(f"--from-hf {hf_dir} has no config.json: not a Hugging Face model "
                         "directory")
    check_out_dir(out_dir, force, [hf_dir])
    with open(where) as f:
        config, _ = gpt_config_from_gpt2(json.load(f), where)
    theirs = read_hf_weights(hf_dir)
    tied = theirs.get("lm_head.weight")
    if tied is not None and not torch.equal(tied, theirs.get("transformer.wte.weight",
                                                             theirs.get("wte.weight"))):
        raise ValueError(f"{hf_dir}: lm_head.weight differs from the word embedding; xmoe's "
                         "output layer is tied to it")
    try:
        module = from_gpt2_state_dict(theirs, config.num_layers, config.num_attention_heads)
    except KeyError as e:
        raise ValueError(f"{hf_dir}: GPT-2 weight {e.args[0]} is missing") from None
    files = [os.path.join(hf_dir, n) for n in ("vocab.json", "merges.txt")]
    has_tokenizer = all(os.path.isfile(p) for p in files)
    divisible_by = None
    if has_tokenizer:
        try:
            tokenizer = build_tokenizer("GPT2BPETokenizer", *files)
        except TokenizerError as e:
            raise ValueError(str(e)) from None
        divisible_by = divisor_for(tokenizer.vocab_size, config.padded_vocab_size)
    with staged_directory(out_dir) as tmp:
        data = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": None, "merge_file": None,
                "make_vocab_size_divisible_by": divisible_by}
        if has_tokenizer:
            for key, src in zip(("vocab_file", "merge_file"), files):
                shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
                data[key] = os.path.join(os.path.abspath(out_dir), os.path.basename(src))
        _write_checkpoint(tmp, module, config, data)
        write_layout(os.path.join(tmp, checkpoint_tag(0)), 1, weights_only=True,
                     model=_model_flags(config))
    return ImportResult(out_dir, config, divisible_by, has_tokenizer)


def _model_flags(config: GPTConfig) -> dict:
    """RunConfig.model as saved (JSON types)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _write_checkpoint(root: str, module: Dict[str, torch.Tensor], config: GPTConfig,
                      data: dict) -> None:
    """The model file (DeepSpeed's keys that a module-only load reads, and our client state)
    and the pointer."""
    tag_dir = os.path.join(root, checkpoint_tag(0))
    os.makedirs(tag_dir)
    state = {"module": module, "dp_world_size": 1, "mp_world_size": 1, "global_steps": 0,
             "skipped_steps": 0, "optimizer": None, "checkpoint_version": CHECKPOINT_VERSION,
             "iteration": 0, "consumed_samples": 0, "opt_param_scheduler": None, "rng_state": None,
             "args": {"model": _model_flags(config), "data": data}}
    torch.save(state, os.path.join(tag_dir, MODEL_FILENAME))
    with open(os.path.join(root, TRACKER_FILENAME), "w") as f:
        f.write("0\n")
