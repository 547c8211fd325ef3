"""A trained model out of a checkpoint, without DeepSpeed: for evaluation sweeps, generation and
export (tools/threshold_sweep.py, tools/generate_text.py, tools/convert_to_hf.py).

    config = model_config_from_checkpoint(load_dir, threshold=0.7)   # GPTConfig, torch-free
    model, iteration = load_model(load_dir, config, device)          # GPTModel, eval mode, fp32
    vocab, merges, tokenizer = checkpoint_tokenizer(saved_run_args(load_dir),
                                                    config.padded_vocab_size)

The model flags come from the checkpoint (its xmoe_checkpoint.json "model", or for older
checkpoints the model file's saved arguments: megatron/checkpoint_check.saved_model_config), so
a tool needs only the checkpoint directory. Routing settings may be overridden
(config.OVERRIDABLE_ROUTING, as --use-checkpoint-args allows); run settings that do not change
the function (kernels, compilation, parallelism, recomputation) are reset to the defaults of a
one-process run, and the weights are loaded in fp32 (a bf16-trained model evaluates in fp32;
the caller may cast).

The weights are DeepSpeed's model file's "module" state dict (memory-mapped: the optimizer state
of a ZeRO-0 file is not read); an expert-parallel checkpoint's shards are merged, so a model
trained on N ranks loads whole on one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

from megatron.checkpoint_args import LEGACY_ACTIVATION
from megatron.checkpoint_check import (MODEL_FILENAME, check_intact, pointed_tag_dir,
                                       saved_model_config)
from megatron.config import OVERRIDABLE_ROUTING, GPTConfig, MoEConfig

# MoEConfig fields that choose how a layer runs, not what it computes: back to the defaults.
_RUN_SETTINGS = ("backend", "sync_free", "expert_parallel_size", "compile_routing",
                 "routing_cuda_graphs")


def model_config_from_saved(saved: Dict[str, Any], **routing: Any) -> GPTConfig:
    """The GPTConfig a saved model dict (RunConfig.model as a dict, read back from JSON)
    describes, with `routing` overrides (MoEConfig fields named in config.OVERRIDABLE_ROUTING);
    ValueError naming anything else."""
    unknown = sorted(set(routing) - set(OVERRIDABLE_ROUTING))
    if unknown:
        raise ValueError(f"cannot override {unknown} of a checkpoint's model; routing settings "
                         f"that may differ: {sorted(OVERRIDABLE_ROUTING)}")
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    moe_saved = {k: v for k, v in (saved.get("moe") or {}).items()
                 if k in moe_fields and k not in _RUN_SETTINGS}
    moe = MoEConfig(**{**moe_saved, **routing})
    gpt_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    kwargs = {k: v for k, v in saved.items() if k in gpt_fields and k != "moe"}
    kwargs["num_experts"] = tuple(int(e) for e in kwargs.get("num_experts", (1,)))
    kwargs.setdefault("activation", LEGACY_ACTIVATION)      # saved before the field: exact erf
    kwargs.update(params_dtype="fp32", checkpoint_activations=False)
    return GPTConfig(**kwargs, moe=moe)


def model_config_from_checkpoint(load_dir: str, **routing: Any) -> GPTConfig:
    """model_config_from_saved of the checkpoint the pointer of `load_dir` names."""
    _, saved = saved_model_config(load_dir)
    return model_config_from_saved(saved, **routing)


def load_model(load_dir: str, model_config: GPTConfig, device: Any) -> Tuple[Any, int]:
    """(GPTModel with the weights of the checkpoint `load_dir`'s pointer names, on `device`,
    eval mode; its iteration). ValueError when the files do not fit `model_config`."""
    from megatron.expert_checkpoint import full_expert_tensors, read_layout
    from megatron.model import GPTModel

    tag_dir = pointed_tag_dir(load_dir)
    check_intact(load_dir, os.path.basename(tag_dir))
    path, state = _read_model_file(load_dir)    # memory-mapped: the optimizer state stays out
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ValueError(f"{path} holds no 'module' state dict (not a DeepSpeed model file)")
    module = dict(state["module"])
    size = int(read_layout(tag_dir)["expert_parallel_size"])
    if size > 1:                    # rank 0's experts are in the model file; all in the shards
        module.update(full_expert_tensors(tag_dir, module, size))
    model = GPTModel(model_config)
    missing, unexpected = model.load_state_dict(module, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model its saved flags describe: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    return model.float().to(device).eval(), int(state.get("iteration", 0))


def _read_model_file(load_dir: str) -> Tuple[str, Any]:
    """(path, contents) of the model file of the checkpoint `load_dir`'s pointer names, read
    memory-mapped (tensors are paged in only when used); ValueError when torch cannot read it."""
    import torch

    path = os.path.join(pointed_tag_dir(load_dir), MODEL_FILENAME)
    try:
        return path, torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:            # the legacy format cannot be memory-mapped
        pass
    except Exception as e:          # a pickle of another program, a file torch cannot read
        raise ValueError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        return path, torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def saved_run_args(load_dir: str) -> Dict[str, Any]:
    """The run's arguments (RunConfig as a dict) saved in the checkpoint's model file; {} when
    another tool wrote it."""
    _, state = _read_model_file(load_dir)
    args = state.get("args") if isinstance(state, dict) else None
    return args if isinstance(args, dict) else {}


def checkpoint_tokenizer(run_args: Dict[str, Any], padded_vocab_size: int,
                         vocab_file: Optional[str] = None, merge_file: Optional[str] = None
                         ) -> Tuple[str, str, Any]:
    """(vocab file, merge file, tokenizer): the files given (--vocab-file / --merge-file), else
    the ones the run recorded (`run_args` "data"). ValueError naming the flag when a file is
    missing or the vocabulary does not fit the model's `padded_vocab_size` embedding rows."""
    from megatron.tokenizer import TokenizerError, build_tokenizer

    data = run_args.get("data") if isinstance(run_args.get("data"), dict) else {}
    chosen = []
    for flag, key, given in (("--vocab-file", "vocab_file", vocab_file),
                             ("--merge-file", "merge_file", merge_file)):
        path = given or data.get(key)
        if path is None:
            raise ValueError(f"the checkpoint does not record its {flag}: pass {flag}")
        if not os.path.isfile(path):
            origin = "given" if given else "the run's, recorded in the checkpoint"
            raise ValueError(f"{flag} {path} ({origin}) does not exist: pass {flag}")
        chosen.append(path)
    divisor = int(data.get("make_vocab_size_divisible_by", 128))
    try:
        tokenizer = build_tokenizer(data.get("tokenizer_type", "GPT2BPETokenizer"), *chosen,
                                    make_vocab_size_divisible_by=divisor)
    except TokenizerError as e:
        raise ValueError(str(e)) from None
    if tokenizer.padded_vocab_size != padded_vocab_size:
        raise ValueError(f"--vocab-file {chosen[0]} has {tokenizer.vocab_size} tokens (padded to "
                         f"{tokenizer.padded_vocab_size} with --make-vocab-size-divisible-by "
                         f"{divisor}), but the model's padded vocabulary is {padded_vocab_size}:"
                         " not the vocabulary it was trained with")
    return chosen[0], chosen[1], tokenizer
