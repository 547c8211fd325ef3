#!/usr/bin/env python3
"""Generate text from a checkpoint: greedy, temperature, top-k and top-p sampling, KV cache.

    python tools/generate_text.py --load CKPT --prompt "The router" [--prompt ...] \\
        [--prompt-file F] [--max-new-tokens 64] [--greedy | --temperature T --top-k K \\
        --top-p P] [--seed 1234] [--ignore-eos] [--threshold T | --topk K] \\
        [--vocab-file V --merge-file M] [--device cpu|cuda] [--output-json F] [--no-kv-cache]

The model comes from the checkpoint alone (its saved model flags; any router, any
expert-parallel size: the experts are gathered from their shards) and runs in fp32 on one
device. The tokenizer files are those the run was trained with (its saved --vocab-file and
--merge-file), unless given here. Prompts come from --prompt (repeatable) and --prompt-file
(one prompt per line, blank lines skipped), in that order; each is generated on its own, from
the same --seed, so a prompt's completion does not depend on the others.

Generation stops after <|endoftext|> (unless --ignore-eos) or --max-new-tokens; a prompt plus
--max-new-tokens beyond the checkpoint's --max-position-embeddings is refused (no sliding
window). With the KV cache (the default) each new token costs one position; --no-kv-cache
reruns the whole text every step (the same greedy tokens, slower: a check of the cache).

MoE layers route every token with the model's router; --threshold (threshold router) or
--topk (top-k / switch router) override its setting, as in evaluation. Routing in generation
is dropless: capacity (--moe-eval-capacity-factor) bounds the tokens per expert of a batch and
means nothing for one token at a time, so this tool has no capacity flag.

Prints each prompt and its completion (with experts per token per MoE layer); --output-json F
writes the prompts, completions, token ids and the experts each token used per MoE layer
(atomically, after every prompt is done). Bad input (a missing checkpoint or tokenizer file, an
empty prompt or prompt file, a bad sampling value, a text beyond the position table) ends with
one line `generate_text.py: error: ...`, exit 2, before anything is generated or written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Run as a script: import the megatron next to it (as pretrain_gpt.py does).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli import OneLineParser, error_line  # noqa: E402

PROG = "generate_text.py"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="Checkpoint directory (pretrain_gpt --save).")
    p.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable).")
    p.add_argument("--prompt-file", default=None,
                   help="UTF-8 text file, one prompt per line (blank lines skipped).")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true",
                   help="The most probable token every step (ignores the sampling flags).")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0,
                   help="Sample among the k most probable tokens (0: all). Not the router's "
                        "--topk.")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0,
                   help="Sample among the fewest most probable tokens whose probability "
                        "reaches p, in (0, 1] (1: all).")
    p.add_argument("--seed", type=int, default=1234, help="Sampling seed (every prompt).")
    p.add_argument("--ignore-eos", action="store_true",
                   help="Do not stop at <|endoftext|>.")
    routing = p.add_mutually_exclusive_group()
    routing.add_argument("--threshold", type=float, default=None,
                         help="Route at this threshold (threshold-router checkpoints).")
    routing.add_argument("--topk", type=int, default=None,
                         help="Route to this many experts (top-k / switch checkpoints).")
    p.add_argument("--vocab-file", default=None, help="Default: the one the run trained with.")
    p.add_argument("--merge-file", default=None, help="Default: the one the run trained with.")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--output-json", default=None, help="Also write the results here.")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="Rerun the whole text every step (a check of the cache; slower).")
    args = p.parse_args(argv)
    from megatron.generation import Sampling

    Sampling(args.greedy, args.temperature, args.top_k, args.top_p)   # raises naming the flag
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.output_json is not None and os.path.isdir(args.output_json):
        raise ValueError(f"--output-json {args.output_json} is a directory: name a file")
    return args


def read_prompts(args: argparse.Namespace) -> List[str]:
    """--prompt values, then --prompt-file's non-blank lines; ValueError naming the source."""
    prompts = list(args.prompt)
    for i, text in enumerate(prompts, 1):
        if not text:
            raise ValueError(f"--prompt number {i} is empty")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise ValueError(f"--prompt-file {args.prompt_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {args.prompt_file} cannot be read: {e}") from None
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise ValueError(f"--prompt-file {args.prompt_file} holds no prompt (one per line)")
        prompts += from_file
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompt-file")
    return prompts


def model_config(args: argparse.Namespace):
    """The checkpoint's GPTConfig with the --threshold / --topk routing override."""
    from megatron.checkpoint_check import saved_model_config
    from megatron.checkpoint_model import model_config_from_saved

    _, saved = saved_model_config(args.load)
    config = model_config_from_saved(saved)
    if args.threshold is None and args.topk is None:
        return config
    flag = "--threshold" if args.threshold is not None else "--topk"
    if not any(config.experts_for_layer(n) > 1 for n in range(1, config.num_layers + 1)):
        raise ValueError(f"{flag}: {args.load} is a dense model (no MoE layer to route)")
    router = config.moe.router
    if args.threshold is not None:
        if router != "threshold":
            raise ValueError(f"--threshold: {args.load} was trained with the {router} router; "
                             "--threshold applies to threshold-router checkpoints")
        return model_config_from_saved(saved, threshold=args.threshold)
    if router not in ("topk", "switch"):
        raise ValueError(f"--topk: {args.load} was trained with the {router} router; --topk "
                         "applies to top-k and switch checkpoints")
    smallest = min(config.experts_for_layer(n) for n in range(1, config.num_layers + 1)
                   if config.experts_for_layer(n) > 1)
    if not 1 <= args.topk <= smallest:
        raise ValueError(f"--topk must be in [1, {smallest}] (the experts of the smallest MoE "
                         f"layer), got {args.topk}")
    return model_config_from_saved(saved, router="topk", topk=args.topk)


def pick_device(name: Optional[str]):
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def encode_prompts(prompts: List[str], tokenizer, config, max_new_tokens: int
                   ) -> List[Tuple[str, List[int]]]:
    """(text, token ids) per prompt, each checked to fit the position table with its new
    tokens (megatron.generation.check_request), all before anything is generated."""
    from megatron.generation import check_request

    encoded = []
    for i, text in enumerate(prompts, 1):
        ids = tokenizer.tokenize(text)
        try:
            check_request(config, ids, max_new_tokens)
        except ValueError as e:
            short = text if len(text) <= 40 else text[:37] + "..."
            raise ValueError(f"prompt {i} ({short!r}): {e}") from None
        encoded.append((text, ids))
    return encoded


def routing_summary(config) -> Optional[Dict[str, Any]]:
    """How the MoE layers route in generation (None for a dense model)."""
    if not any(config.experts_for_layer(n) > 1 for n in range(1, config.num_layers + 1)):
        return None
    moe = config.moe
    summary: Dict[str, Any] = {"router": moe.router, "dropless": True}
    if moe.router == "threshold":
        summary.update(threshold=moe.threshold, threshold_max_experts=moe.threshold_max_experts)
    elif moe.router == "topk":
        summary["topk"] = moe.topk
    return summary


def run_prompts(model, tokenizer, encoded: List[Tuple[str, List[int]]],
                args: argparse.Namespace, moe: bool) -> List[Dict[str, Any]]:
    """Generate, print and return one record (output JSON's schema) per prompt."""
    from megatron.generation import generate, mean_experts_per_token

    records = []
    for i, (text, ids) in enumerate(encoded, 1):
        start = time.perf_counter()
        result = generate(model, ids, args.max_new_tokens, greedy=args.greedy,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, eos_id=None if args.ignore_eos else tokenizer.eod,
                          use_cache=not args.no_kv_cache, record_experts=moe,
                          vocab_size=tokenizer.vocab_size)
        seconds = time.perf_counter() - start
        shown = result.tokens[:-1] if result.finish_reason == "eos" else result.tokens
        record: Dict[str, Any] = {"prompt": text, "prompt_ids": ids,
                                  "completion": tokenizer.detokenize(shown),
                                  "completion_ids": result.tokens,
                                  "finish_reason": result.finish_reason}
        if moe:
            record["experts_per_token"] = {str(layer): mean for layer, mean in
                                           mean_experts_per_token(result.experts).items()}
            record["experts"] = [_json_keys(t) for t in result.experts]
            record["prompt_experts"] = [_json_keys(t) for t in result.prompt_experts]
        print("\n".join(record_lines(i, record, seconds)), flush=True)
        records.append(record)
    return records


def _json_keys(token_experts: Dict[int, List[int]]) -> Dict[str, List[int]]:
    return {str(layer): experts for layer, experts in token_experts.items()}


def record_lines(i: int, record: Dict[str, Any], seconds: float) -> List[str]:
    n = len(record["completion_ids"])
    stop = "<|endoftext|>" if record["finish_reason"] == "eos" else "--max-new-tokens"
    rate = n / max(seconds, 1e-9)
    head = f"--- completion {i}: {n} tokens, stopped at {stop}, {rate:.1f} tokens/s"
    if "experts_per_token" in record:
        head += "; experts/token " + ", ".join(
            f"layer {layer} {mean:.2f}" for layer, mean in record["experts_per_token"].items())
    return [f"--- prompt {i} ---", record["prompt"], head + " ---", record["completion"]]


def header_line(args: argparse.Namespace, iteration: int, routing: Optional[Dict[str, Any]],
                device) -> str:
    if routing is None:
        how = "dense"
    else:
        setting = {"threshold": f" {routing.get('threshold')}", "topk": f" k={routing.get('topk')}"}
        how = f"{routing['router']} router{setting.get(routing['router'], '')}, dropless"
    sampling = ("greedy" if args.greedy else
                f"sampling (temperature {args.temperature:g}, top-k {args.top_k}, top-p "
                f"{args.top_p:g}, seed {args.seed})")
    cache = "no KV cache" if args.no_kv_cache else "KV cache"
    return (f"{PROG}: {args.load} (iteration {iteration}, {how}) on {device}; {sampling}; "
            f"{cache}")


def write_json(path: str, args: argparse.Namespace, iteration: int,
               routing: Optional[Dict[str, Any]], records: List[Dict[str, Any]]) -> None:
    from megatron.fileio import atomic_write

    report = {"checkpoint": args.load, "iteration": iteration, "routing": routing,
              "sampling": {"greedy": args.greedy, "temperature": args.temperature,
                           "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
                           "max_new_tokens": args.max_new_tokens,
                           "stop_at_eos": not args.ignore_eos},
              "kv_cache": not args.no_kv_cache, "generations": records}
    with atomic_write(path, "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        prompts = read_prompts(args)
        config = model_config(args)
        from megatron.checkpoint_model import checkpoint_tokenizer, load_model, saved_run_args

        *_, tokenizer = checkpoint_tokenizer(saved_run_args(args.load), config.padded_vocab_size,
                                             args.vocab_file, args.merge_file)
        encoded = encode_prompts(prompts, tokenizer, config, args.max_new_tokens)
        device = pick_device(args.device)

        model, iteration = load_model(args.load, config, device)
        routing = routing_summary(config)
        print(header_line(args, iteration, routing, device), flush=True)
        records = run_prompts(model, tokenizer, encoded, args, routing is not None)
        if args.output_json is not None:
            write_json(args.output_json, args, iteration, routing, records)
            print(f"wrote {args.output_json}", flush=True)
    except (ValueError, OSError) as e:
        print(error_line(PROG, e), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
