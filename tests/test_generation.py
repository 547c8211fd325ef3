"""megatron/generation.py and tools/generate_text.py: sampling, the KV cache, per-token experts.

Random weights (no training): the claims are about equalities that hold for any weights. The
cache is checked against rerunning the whole text (same greedy tokens, close logits at every
step) and against one full forward; recorded experts against the routers' definition applied
to a full forward's router inputs. The CLI runs on a checkpoint written by
megatron.checkpointing.save_checkpoint (a DeepSpeed engine, as training saves) with a tokenizer
trained on a tiny corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.checkpoint_model import load_model, model_config_from_checkpoint
from megatron.checkpointing import save_checkpoint
from megatron.config import DataConfig, GPTConfig, MoEConfig, OptimizerConfig
from megatron.expert_checkpoint import convert_checkpoint
from megatron.generation import Decoder, Sampling, check_request, generate, generation_mode
from megatron.model import GPTModel
from megatron.optimizer import build_optimizer
from megatron.tokenizer import build_tokenizer
from tests.test_checkpointing import deepspeed  # noqa: F401,F811 (fixture)
from tests.test_pretrain_gpt import synthetic_corpus
from tests.tokenizer.gpt2_reference import train_tiny_bpe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import generate_text  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")

PROMPT = [5, 17, 3, 42, 8]


def make_config(router: str = "threshold", vocab: int = 64, **moe) -> GPTConfig:
    """4 layers, MoE at 2 and 4 (4 experts) unless dense; dropping on (training's default),
    so generation's dropless routing is exercised."""
    experts = (1,) if router == "dense" else (4,)
    moe_kw = dict(router="threshold" if router == "dense" else router, threshold=0.6,
                  ffn_hidden_size=16, drop_tokens=True, eval_capacity_factor=0.5,
                  min_capacity=1, vocab_size=vocab)
    moe_kw.update(moe)
    return GPTConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                     padded_vocab_size=vocab, max_position_embeddings=32, ffn_hidden_size=48,
                     num_experts=experts, expert_interval=2, init_method_std=0.5,
                     moe=MoEConfig(**moe_kw))


def make_model(config: GPTConfig, seed: int = 0) -> GPTModel:
    """Random weights; routers sharpened (x20) so tokens differ in how many experts they take."""
    torch.manual_seed(seed)
    model = GPTModel(config).eval()
    with torch.no_grad():
        for layer in model.transformer.layers:
            if layer.is_moe and layer.mlp.gate_weight is not None:
                layer.mlp.gate_weight.mul_(20.0)
    return model


def moe_inputs(model: GPTModel, ids: list) -> dict:
    """{layer number: the MoE layer's input [T, H]} of one full forward over `ids`."""
    seen, hooks = {}, []
    for layer in model.transformer.layers:
        if layer.is_moe:
            hooks.append(layer.mlp.register_forward_pre_hook(
                lambda m, args: seen.__setitem__(m.layer_number, args[0].reshape(
                    -1, args[0].shape[-1]).clone())))
    with generation_mode(model), torch.no_grad():      # dropless, as generate routes
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return seen


def threshold_reference(logits_E: torch.Tensor, threshold: float) -> list:
    """XMoE's rule, per token: experts by probability, until the cumulative reaches t."""
    probs = torch.softmax(logits_E.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda e: (-probs[e], e))
    chosen, mass = [], 0.0
    for e in order:
        chosen.append(e)
        mass += probs[e]
        if mass >= threshold:
            break
    return chosen


# ----------------------------------------------------------------------------------------------
# the cache


@pytest.mark.parametrize("router", ["dense", "threshold", "topk", "hash"])
def test_greedy_with_cache_equals_without_and_each_step_equals_the_full_forward(router):
    config = make_config(router, **({"topk": 2} if router == "topk" else {}))
    model = make_model(config)
    cached = generate(model, PROMPT, 20, greedy=True, record_experts=True)
    uncached = generate(model, PROMPT, 20, greedy=True, record_experts=True, use_cache=False)
    assert len(cached.tokens) == 20 and cached.finish_reason == "length"
    assert cached == uncached                   # tokens, and every token's experts
    assert len(set(cached.tokens)) > 3          # not a degenerate repetition

    # Teacher-forced on those tokens (dropless, as generate routes): the cached step's logits
    # equal rerunning the text and the full forward's logits at that position (fp32: logits
    # of magnitude ~10 through 4 layers differ by a few ulps of 10).
    text = PROMPT + cached.tokens
    with generation_mode(model), torch.no_grad():
        full = model(torch.tensor([text])).logits[0]
        with_cache = Decoder(model, len(text), use_cache=True)
        without = Decoder(model, len(text), use_cache=False)
        for i, fed in enumerate([PROMPT] + [[t] for t in cached.tokens[:-1]]):
            a, b = with_cache.feed(fed).logits_V, without.feed(fed).logits_V
            position = len(PROMPT) - 1 + i
            assert full[position].abs().max() > 1.0
            torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5, msg=f"step {i}")
            torch.testing.assert_close(a, full[position], rtol=1e-5, atol=5e-5, msg=f"step {i}")
    assert with_cache.cache.length == len(text) - 1


def test_recorded_experts_are_the_threshold_routers_choice_in_a_full_forward():
    """Per token and MoE layer: experts in probability order until their mass reaches the
    threshold, from the router logits of one full forward over prompt + new tokens; prompt
    tokens too. Capacity would drop some at this eval capacity factor: generation does not."""
    config = make_config("threshold")
    model = make_model(config)
    result = generate(model, PROMPT, 12, greedy=True, record_experts=True)
    recorded = result.prompt_experts + result.experts
    text = PROMPT + result.tokens
    assert len(recorded) == len(text)
    inputs = moe_inputs(model, text)
    counts = []
    for layer_number, x_TD in inputs.items():
        layer = model.transformer.layers[layer_number - 1].mlp
        with torch.no_grad():
            logits_TE = layer.router_logits(x_TD)
        for t in range(len(text)):
            expected = threshold_reference(logits_TE[t], config.moe.threshold)
            assert recorded[t][layer_number] == expected, (layer_number, t)
            counts.append(len(expected))
    assert min(counts) == 1 and max(counts) > 1
    # generate() routed dropless and gave the model back as it was
    assert model.config.moe.drop_tokens and not model.training


def test_lower_threshold_never_takes_more_experts():
    """The first MoE layer sees the same prompt states at every threshold: a token's experts at
    a lower threshold are a prefix of those at a higher one; overall the mean falls."""
    model = make_model(make_config("threshold"))
    first, means = [], []
    for threshold in (0.3, 0.6, 0.95):
        model.set_routing(threshold=threshold)
        result = generate(model, PROMPT, 10, greedy=True, record_experts=True)
        first.append([token[2] for token in result.prompt_experts])
        every = result.prompt_experts + result.experts
        means.append(sum(len(e) for token in every for e in token.values()) / len(every))
    for low, high in zip(first, first[1:]):
        assert all(h[:len(lo)] == lo for lo, h in zip(low, high))
    assert means[0] < means[1] < means[2]


def test_text_beyond_the_position_table_is_refused():
    config = make_config("dense")
    model = make_model(config)
    with pytest.raises(ValueError, match="exceeds the model's --max-position-embeddings 32 "
                                         r"\(at most 27 new tokens"):
        generate(model, PROMPT, 28)
    assert len(generate(model, PROMPT, 27, greedy=True).tokens) == 27
    with pytest.raises(ValueError, match="prompt is empty"):
        check_request(config, [], 4)
    with pytest.raises(ValueError, match="--max-new-tokens must be >= 1"):
        check_request(config, PROMPT, 0)


def test_eos_stops_and_padding_ids_are_never_chosen():
    model = make_model(make_config("dense"))
    first = generate(model, PROMPT, 5, greedy=True).tokens[0]
    stopped = generate(model, PROMPT, 5, greedy=True, eos_id=first)
    assert stopped.tokens == [first] and stopped.finish_reason == "eos"
    limited = generate(model, PROMPT, 30 - len(PROMPT), temperature=5.0, seed=0, vocab_size=10)
    assert max(limited.tokens) < 10
    assert max(generate(model, PROMPT, 27, temperature=5.0, seed=0).tokens) >= 10


# ----------------------------------------------------------------------------------------------
# sampling


def test_sampling_is_reproducible_and_top_k_1_and_tiny_top_p_are_greedy():
    model = make_model(make_config("threshold"))
    greedy = generate(model, PROMPT, 15, greedy=True).tokens
    a = generate(model, PROMPT, 15, temperature=1.5, seed=7).tokens
    assert a == generate(model, PROMPT, 15, temperature=1.5, seed=7).tokens
    assert a != generate(model, PROMPT, 15, temperature=1.5, seed=8).tokens
    assert a != greedy
    assert generate(model, PROMPT, 15, top_k=1, temperature=3.0, seed=1).tokens == greedy
    assert generate(model, PROMPT, 15, top_p=1e-6, temperature=3.0, seed=1).tokens == greedy


def test_top_k_and_top_p_keep_exactly_the_tokens_they_define():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))    # order: 1, 3, 2, 0
    g = torch.Generator().manual_seed(0)

    def support(sampling: Sampling) -> set:
        return {sampling.choose(logits, g) for _ in range(400)}

    assert support(Sampling()) == {0, 1, 2, 3}
    assert support(Sampling(top_k=2)) == {1, 3}
    assert support(Sampling(top_p=0.8)) == {1, 3}      # 0.5 + 0.3 reach 0.8
    assert support(Sampling(top_p=0.81)) == {1, 2, 3}
    assert support(Sampling(top_k=3, top_p=0.5)) == {1}
    assert support(Sampling(greedy=True, temperature=0.0)) == {1}
    counts = torch.bincount(torch.tensor([Sampling(top_k=2).choose(logits, g)
                                          for _ in range(4000)]), minlength=4)
    assert abs(counts[1].item() / 4000 - 0.5 / 0.8) < 0.03   # renormalised over the kept two


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "--temperature must be > 0"),
    (dict(temperature=-1.0), "--temperature must be > 0"),
    (dict(top_p=0.0), r"--top-p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"--top-p must be in \(0, 1\]"),
    (dict(top_k=-1), "--top-k must be >= 0"),
])
def test_bad_sampling_values_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


# ----------------------------------------------------------------------------------------------
# a real checkpoint and the CLI


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """(vocab.json, merges.txt) of a byte-level BPE trained on a tiny corpus."""
    root = tmp_path_factory.mktemp("vocab")
    return train_tiny_bpe(synthetic_corpus(60), 120, root)


def save_tiny_checkpoint(deepspeed, root: Path, vocab, router: str = "threshold") -> str:
    """A checkpoint as training writes it (save_checkpoint around a DeepSpeed engine; its run
    arguments name the tokenizer files) of a random model of make_config's shape."""
    tokenizer = build_tokenizer("GPT2BPETokenizer", *vocab)
    config = make_config(router, vocab=tokenizer.padded_vocab_size)
    model = make_model(config).train()
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": 0}})
    data = DataConfig(data_path=("unused",), vocab_file=vocab[0], merge_file=vocab[1])
    args = {"model": dataclasses.asdict(config), "data": dataclasses.asdict(data)}
    save_checkpoint(engine, 3, 3, None, args, str(root))
    return str(root)


@pytest.fixture(scope="module")
def moe_ckpt(deepspeed, vocab, tmp_path_factory):  # noqa: F811 (fixture argument)
    return save_tiny_checkpoint(deepspeed, tmp_path_factory.mktemp("moe_ckpt"), vocab)


def cli(*argv) -> int:
    return generate_text.main([str(a) for a in argv])


def test_loaded_checkpoint_generates_as_the_saved_model_and_threshold_overrides(moe_ckpt,
                                                                                  vocab):
    """The checkpoint's model (load_model) generates what the model that was saved does; a
    lower threshold override at load time routes each token to no more experts at the first
    MoE layer (the same prompt states), fewer on the whole."""
    saved = make_model(make_config(vocab=model_config_from_checkpoint(moe_ckpt)
                                   .padded_vocab_size))
    model, iteration = load_model(moe_ckpt, model_config_from_checkpoint(moe_ckpt), "cpu")
    assert iteration == 3
    a = generate(model, PROMPT, 10, greedy=True, record_experts=True)
    assert a == generate(saved, PROMPT, 10, greedy=True, record_experts=True)
    runs = {}
    for threshold in (0.3, 0.95):
        config = model_config_from_checkpoint(moe_ckpt, threshold=threshold)
        assert config.moe.threshold == threshold
        runs[threshold] = generate(load_model(moe_ckpt, config, "cpu")[0], PROMPT, 10,
                                   greedy=True, record_experts=True)
    for high, low in zip(runs[0.95].prompt_experts, runs[0.3].prompt_experts):
        assert high[2][:len(low[2])] == low[2]
    count = lambda r: sum(len(e) for t in r.prompt_experts + r.experts for e in t.values())
    assert count(runs[0.3]) < count(runs[0.95])


def test_cli_prints_and_writes_json(moe_ckpt, vocab, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sparse router\n\nThe expert picks\n", encoding="utf-8")
    out = tmp_path / "out" / "gen.json"
    assert cli("--load", moe_ckpt, "--prompt", "A token", "--prompt-file", prompts,
               "--max-new-tokens", 6, "--greedy", "--output-json", out, "--device", "cpu") == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["iteration"] == 3 and report["kv_cache"] is True
    assert report["routing"] == {"router": "threshold", "dropless": True, "threshold": 0.6,
                                 "threshold_max_experts": None}
    assert report["sampling"]["greedy"] and report["sampling"]["max_new_tokens"] == 6
    gens = report["generations"]
    assert [g["prompt"] for g in gens] == ["A token", "The sparse router", "The expert picks"]
    tokenizer = build_tokenizer("GPT2BPETokenizer", *vocab)
    model, _ = load_model(moe_ckpt, model_config_from_checkpoint(moe_ckpt), "cpu")
    for g in gens:
        assert g["prompt_ids"] == tokenizer.tokenize(g["prompt"])
        expected = generate(model, g["prompt_ids"], 6, greedy=True, eos_id=tokenizer.eod,
                            record_experts=True, vocab_size=tokenizer.vocab_size)
        assert g["completion_ids"] == expected.tokens
        shown = expected.tokens[:-1] if expected.finish_reason == "eos" else expected.tokens
        assert g["completion"] == tokenizer.detokenize(shown)
        assert g["experts"] == [{str(k): v for k, v in t.items()} for t in expected.experts]
        assert len(g["prompt_experts"]) == len(g["prompt_ids"])
        assert set(g["experts_per_token"]) == {"2", "4"}
        assert f"--- prompt {gens.index(g) + 1} ---\n{g['prompt']}\n" in stdout
        assert g["completion"] in stdout
    assert "threshold router 0.6, dropless" in stdout and "experts/token layer 2" in stdout
    assert not [p for p in os.listdir(out.parent) if p != "gen.json"]      # no temporaries


def run_bad(capsys, tmp_path, *argv) -> str:
    """main(argv) must exit 2 with one stderr line (returned) and write no --output-json."""
    out = tmp_path / "never.json"
    assert cli("--output-json", out, *argv) == 2     # (a later --output-json wins)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("generate_text.py: error: "), captured.err
    assert not out.exists() and not list(tmp_path.glob(".never.json*"))
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(moe_ckpt, vocab, tmp_path, capsys):
    ok = ["--load", moe_ckpt, "--prompt", "The router", "--max-new-tokens", "4"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    cases = [
        (["--load", tmp_path / "nowhere", "--prompt", "x"], "--load .*nowhere does not exist"),
        (["--load", moe_ckpt], "give at least one --prompt or a --prompt-file"),
        ([*ok, "--prompt", ""], "--prompt number 2 is empty"),
        (["--load", moe_ckpt, "--prompt-file", empty], "empty.txt holds no prompt"),
        (["--load", moe_ckpt, "--prompt-file", tmp_path / "no.txt"], "no.txt does not exist"),
        ([*ok, "--temperature", "0"], "--temperature must be > 0 .use --greedy"),
        ([*ok, "--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
        ([*ok, "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1.5"),
        ([*ok, "--top-k", "-2"], "--top-k must be >= 0"),
        ([*ok, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        ([*ok, "--max-new-tokens", "32"], r"prompt 1 \('The router'\): a prompt of \d tokens "
                                          r"\+ --max-new-tokens 32 exceeds the model's "
                                          r"--max-position-embeddings 32"),
        ([*ok, "--threshold", "1.5"], r"--threshold must be in \(0, 1\]"),
        ([*ok, "--topk", "2"], "--topk: .* threshold router; --topk applies to top-k"),
        ([*ok, "--vocab-file", tmp_path / "v.json"], "--vocab-file .*v.json .given. does not"),
        ([*ok, "--device", "tpu"], "--device tpu"),
        ([*ok, "--temperature", "hot"], "--temperature: invalid float value"),
        ([*ok, "--output-json", tmp_path], "--output-json .* is a directory"),
    ]
    for argv, message in cases:
        line = run_bad(capsys, tmp_path, *argv)
        assert re.search(message, line), (argv, line)


def test_tokenizer_files_moved_or_wrong(deepspeed, vocab, tmp_path, capsys):  # noqa: F811
    """The checkpoint names tokenizer files that no longer exist: one line saying to pass
    them; passed, it generates; a vocabulary of another size is refused."""
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = [str(moved / Path(f).name) for f in vocab]
    for src, dst in zip(vocab, copies):
        Path(dst).write_bytes(Path(src).read_bytes())
    ckpt = save_tiny_checkpoint(deepspeed, tmp_path / "ckpt", copies)
    for f in copies:
        os.unlink(f)
    line = run_bad(capsys, tmp_path, "--load", ckpt, "--prompt", "The router")
    assert "recorded in the checkpoint" in line and "moved/vocab.json" in line
    assert "pass --vocab-file" in line
    given = ["--vocab-file", vocab[0], "--merge-file", vocab[1]]
    assert cli("--load", ckpt, "--prompt", "The router", "--max-new-tokens", 3, *given) == 0
    bigger = train_tiny_bpe(synthetic_corpus(60), 300, tmp_path / "bigger")
    line = run_bad(capsys, tmp_path, "--load", ckpt, "--prompt", "The router",
                   "--vocab-file", bigger[0], "--merge-file", bigger[1])
    assert re.search(r"padded to 512 .*, but the model's padded vocabulary is 384", line), line


@pytest.mark.slow
def test_script_on_an_expert_parallel_checkpoint_equals_the_merged_one(moe_ckpt, tmp_path):
    """The script itself (a child process, OMP_NUM_THREADS=1) on the checkpoint re-split for
    expert-parallel size 2 (experts in two shard files) samples what the size-1 one does."""
    ep2 = convert_checkpoint(moe_ckpt, "iter_0000003", str(tmp_path / "ep2"), 2)
    assert os.path.basename(ep2) == "iter_0000003"
    argv = ["--prompt", "The sparse router", "--max-new-tokens", "8", "--temperature", "0.9",
            "--top-k", "50", "--top-p", "0.95", "--seed", "5", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate_text.py"), "--load",
                           str(tmp_path / "ep2"), *argv, "--output-json",
                           str(tmp_path / "ep2.json")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli("--load", moe_ckpt, *argv, "--output-json", tmp_path / "ep1.json") == 0
    ep1, ep2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ep1", "ep2"))
    assert ep1["generations"] == ep2["generations"]
    assert "--- completion 1: " in proc.stdout
