"""tools/convert_to_hf.py and megatron/hf: the exported model computes what ours computes.

Tiny models trained a few Adam steps in-process on the synthetic corpus of
tests/test_pretrain_gpt.py (with its trained tiny BPE), saved with megatron.checkpointing's
save_checkpoint, exported, and loaded back with transformers: logits equal ours in fp32 and
greedy generation gives our tokens, for a dense model (stock GPT2LMHeadModel) and for every
router (remote code), with routing overrides at load time. The slow test runs the whole path
from a pretrain_gpt.py run through the command-line tool.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # nothing may download (all loads are local)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from megatron.checkpoint_model import load_model, model_config_from_checkpoint  # noqa: E402
from megatron.checkpoint_check import MODEL_FILENAME, TRACKER_FILENAME  # noqa: E402
from megatron.checkpointing import save_checkpoint  # noqa: E402
from megatron.config import GPTConfig, MoEConfig  # noqa: E402
from megatron.model import GPTModel  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402
from tests.test_pretrain_gpt import run_pretrain, synthetic_corpus, write_dataset  # noqa: E402
from tests.tokenizer.gpt2_reference import train_tiny_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import convert_to_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore::FutureWarning", "ignore::UserWarning")
PROMPTS = ["The sparse router", "A dense kernel picks 4", "The"]


# ----------------------------------------------------------------------------------------------
# tiny trained checkpoints


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """{"vocab", "merges", "tokenizer", "tokens": the corpus as one id tensor}."""
    root = tmp_path_factory.mktemp("vocab")
    docs = synthetic_corpus(120)
    files = train_tiny_bpe(docs[:40], 120, root)
    tokenizer = build_tokenizer("GPT2BPETokenizer", *files)
    ids = [i for d in docs for i in tokenizer.tokenize(d) + [tokenizer.eod]]
    return {"vocab": files[0], "merges": files[1], "tokenizer": tokenizer,
            "tokens": torch.tensor(ids)}


def tiny_config(vocab: dict, router: str = "threshold", dense: bool = False,
                activation: str = "gelu_tanh", **moe: object) -> GPTConfig:
    """4 layers, hidden 32; MoE (4 experts) at layers 2 and 4 unless dense."""
    moe_config = MoEConfig(**{**dict(router=router, ffn_hidden_size=32, threshold=0.6, topk=2,
                                     vocab_size=vocab["tokenizer"].padded_vocab_size,
                                     eval_capacity_factor=1.0), **moe})
    return GPTConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                     padded_vocab_size=vocab["tokenizer"].padded_vocab_size,
                     max_position_embeddings=64, ffn_hidden_size=64, hidden_dropout=0.0,
                     attention_dropout=0.0, num_experts=(1,) if dense else (4,),
                     expert_interval=2, moe=moe_config, activation=activation,
                     layernorm_epsilon=1e-6)


def train(config: GPTConfig, tokens: torch.Tensor, steps: int = 120, seed: int = 0) -> GPTModel:
    """GPTModel after `steps` Adam steps on random windows of `tokens` (eval mode)."""
    torch.manual_seed(seed)
    model = GPTModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    seq, batch = 32, 8
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,)).tolist()
        x = torch.stack([tokens[s:s + seq] for s in starts])
        y = torch.stack([tokens[s + 1:s + seq + 1] for s in starts])
        out = model(x, labels=y)
        loss = out.loss.mean() + out.moe_aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class StubEngine:
    """What save_checkpoint needs of a DeepSpeed engine: the module, and a save writing the
    model file as DeepSpeed does ("module" beside the client state)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"module": self.module.state_dict(), **client_state},
                   os.path.join(save_dir, tag, MODEL_FILENAME))


def save(model: GPTModel, vocab: dict, directory: Path, iteration: int = 25) -> str:
    """A checkpoint as pretrain_gpt.py writes it (run args with the model and the data files)."""
    args = {"model": dataclasses.asdict(model.config),
            "data": {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab["vocab"],
                     "merge_file": vocab["merges"], "make_vocab_size_divisible_by": 128}}
    save_checkpoint(StubEngine(model), iteration, iteration * 8, None, args, str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def moe_model(vocab):
    return train(tiny_config(vocab), vocab["tokens"])


@pytest.fixture(scope="module")
def dense_model(vocab):
    return train(tiny_config(vocab, dense=True), vocab["tokens"])


def with_routing(model: GPTModel, vocab: dict, **moe: object) -> GPTModel:
    """A copy of the trained model under other routing settings (hash: a fresh hash table in
    place of the gate)."""
    config = tiny_config(vocab, **moe)
    other = GPTModel(config).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not (config.moe.router == "hash" and k.endswith("gate_weight"))}
    missing, unexpected = other.load_state_dict(state, strict=False)
    assert all(k.endswith("hash_table") for k in missing) and not unexpected
    return other


def export(ckpt: str, out: Path, *extra: str) -> int:
    return convert_to_hf.main(["--load", ckpt, "--out", str(out), *extra])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def prompt_ids(vocab: dict) -> torch.Tensor:
    """[3, 12]: the corpus' first 36 tokens as three rows."""
    return vocab["tokens"][:36].view(3, 12)


def dropless(model: GPTModel) -> GPTModel:
    if any(layer.is_moe for layer in model.transformer.layers):
        model.set_routing(drop_tokens=False)
    return model


# ----------------------------------------------------------------------------------------------
# dense: stock GPT-2


def test_dense_model_exports_to_stock_gpt2(dense_model, vocab, tmp_path, capsys):
    ckpt = save(dense_model, vocab, tmp_path / "ckpt")
    assert export(ckpt, tmp_path / "hf") == 0
    printed = capsys.readouterr().out
    assert "as GPT2LMHeadModel (stock transformers, no remote code)" in printed
    names = sorted(os.listdir(tmp_path / "hf"))
    assert not [n for n in names if n.endswith(".py")], names
    assert {"config.json", "model.safetensors", "generation_config.json", "vocab.json",
            "merges.txt", "tokenizer_config.json", "tokenizer.json"} <= set(names)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["activation_function"]) == ("gpt2", "gelu_new")
    assert config["vocab_size"] == dense_model.config.padded_vocab_size
    assert config["layer_norm_epsilon"] == 1e-6 and config["n_inner"] == 64
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model) is GPT2LMHeadModel
    ids = prompt_ids(vocab)
    torch.testing.assert_close(logits(model, ids), logits(dense_model, ids), rtol=0, atol=2e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in PROMPTS + [" spaces  and\ttabs\n", "ünïcödé 🙂"]:
        assert tokenizer(text)["input_ids"] == vocab["tokenizer"].tokenize(text)
    assert tokenizer.eos_token_id == vocab["tokenizer"].eod


@pytest.mark.parametrize("activation,model_class", [("gelu", "GPT2LMHeadModel"),
                                                    ("gelu_erf_onnx", "XMoEForCausalLM")])
def test_other_gelu_forms(activation, model_class, vocab, tmp_path, capsys):
    """Exact erf GeLU is GPT-2's "gelu"; Megatron's --onnx-safe erf(x / 1.41421) has no
    transformers name, so it goes through the remote code, exactly."""
    model = train(tiny_config(vocab, dense=True, activation=activation), vocab["tokens"], 5)
    assert export(save(model, vocab, tmp_path / "ckpt"), tmp_path / "hf") == 0
    assert f"as {model_class}" in capsys.readouterr().out
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert type(theirs).__name__ == model_class
    ids = prompt_ids(vocab)
    torch.testing.assert_close(logits(theirs.eval(), ids), logits(model, ids), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# MoE: remote code, every router


@pytest.mark.parametrize("router", ["threshold", "topk", "switch", "hash"])
def test_every_router_equals_ours_dropless(router, moe_model, vocab, tmp_path, capsys):
    ours = with_routing(moe_model, vocab, router=router)
    assert export(save(ours, vocab, tmp_path / "ckpt"), tmp_path / "hf") == 0
    printed = capsys.readouterr().out
    assert "as XMoEForCausalLM (remote code, load with trust_remote_code=True: MoE layers " \
           f"[2, 4] ({router} routing))" in printed and "dropless (drop_tokens=false)" in printed
    assert sorted(n for n in os.listdir(tmp_path / "hf") if n.endswith(".py")) == [
        "configuration_xmoe.py", "modeling_xmoe.py"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["router"], config["drop_tokens"], config["num_experts"]) == (
        router, False, [1, 4, 1, 4])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert type(theirs).__name__ == "XMoEForCausalLM"
    ids = prompt_ids(vocab)
    torch.testing.assert_close(logits(theirs.eval(), ids), logits(dropless(ours), ids),
                               rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def moe_export(moe_model, vocab, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_export")
    assert export(save(moe_model, vocab, root / "ckpt"), root / "hf") == 0
    return root / "hf"


def test_routing_overrides_at_load_equal_set_routing(moe_model, moe_export, vocab):
    """threshold / top-k / capacity given to from_pretrained (or in the config) equal our model
    after set_routing; each override changes the logits (so the comparison can fail)."""
    ids = prompt_ids(vocab)
    ours = with_routing(moe_model, vocab)
    as_trained = logits(dropless(ours), ids)
    cases = [({"threshold": 0.95}, {"threshold": 0.95}),
             ({"router": "topk", "topk": 3}, {"router": "topk", "topk": 3}),
             ({"threshold_max_experts": 1}, {"threshold_max_experts": 1}),
             ({"drop_tokens": True, "capacity_factor": 0.5, "min_capacity": 0},
              {"drop_tokens": True, "eval_capacity_factor": 0.5, "min_capacity": 0})]
    for hf_kwargs, our_kwargs in cases:
        theirs = AutoModelForCausalLM.from_pretrained(moe_export, trust_remote_code=True,
                                                      **hf_kwargs).eval()
        ours.set_routing(**{"drop_tokens": False, **our_kwargs})
        expected = logits(ours, ids)
        assert not torch.allclose(expected, as_trained, atol=1e-3), hf_kwargs
        torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=2e-5)
        ours.set_routing(router="threshold", threshold=0.6, threshold_max_experts=None,
                         drop_tokens=False, eval_capacity_factor=1.0, min_capacity=4)
    config = AutoConfig.from_pretrained(moe_export, trust_remote_code=True)
    config.threshold = 0.95
    theirs = AutoModelForCausalLM.from_pretrained(moe_export, config=config,
                                                  trust_remote_code=True).eval()
    ours.set_routing(threshold=0.95)
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=2e-5)
    theirs.set_routing(threshold=0.6)
    torch.testing.assert_close(logits(theirs, ids), as_trained, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
        AutoModelForCausalLM.from_pretrained(moe_export, trust_remote_code=True, threshold=1.5)
    with pytest.raises(ValueError, match="hash routing reads a frozen token table"):
        theirs.set_routing(router="hash")


def test_expert_parallel_checkpoint_exports_whole(moe_model, moe_export, vocab, tmp_path):
    """A checkpoint saved over 2 expert-parallel ranks (experts in shard files) exports the
    same tensors as the one-rank checkpoint."""
    from safetensors.torch import load_file

    from megatron.expert_checkpoint import convert_checkpoint

    ckpt = save(moe_model, vocab, tmp_path / "ckpt")
    convert_checkpoint(ckpt, "iter_0000025", str(tmp_path / "ep2"), 2)
    assert "expert_parallel_rank_001_of_002.pt" in os.listdir(tmp_path / "ep2" / "iter_0000025")
    assert export(str(tmp_path / "ep2"), tmp_path / "hf") == 0
    whole, merged = (load_file(d / "model.safetensors") for d in (moe_export, tmp_path / "hf"))
    assert sorted(whole) == sorted(merged)
    assert all(torch.equal(whole[k], merged[k]) for k in whole)


# ----------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_generation_equals_ours(kind, dense_model, moe_model, moe_export, vocab,
                                       tmp_path):
    """transformers' generate(do_sample=False), with and without its cache, gives the tokens of
    megatron.generation.generate(greedy=True)."""
    from megatron.generation import generate

    ours = dense_model if kind == "dense" else dropless(with_routing(moe_model, vocab))
    out = moe_export
    if kind == "dense":
        assert export(save(ours, vocab, tmp_path / "ckpt"), tmp_path / "hf") == 0
        out = tmp_path / "hf"
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    theirs.generation_config.eos_token_id = None        # exactly n tokens from both
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    expected = []
    for prompt in PROMPTS:
        ids = vocab["tokenizer"].tokenize(prompt)
        expected.append(generate(ours, ids, 20, greedy=True).tokens)
        assert len(expected[-1]) == 20
        for use_cache in (True, False):
            got = theirs.generate(**tokenizer(prompt, return_tensors="pt"), do_sample=False,
                                  max_new_tokens=20, use_cache=use_cache)
            assert got[0, len(ids):].tolist() == expected[-1], (prompt, use_cache)
    assert len({t for tokens in expected for t in tokens}) > 4      # not one repeated token
    # one left-padded batch of all prompts (positions and attention follow the padding mask)
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    got = theirs.generate(**batch, do_sample=False, max_new_tokens=20,
                          pad_token_id=tokenizer.eos_token_id)
    assert got[:, batch["input_ids"].shape[1]:].tolist() == expected


# ----------------------------------------------------------------------------------------------
# bad input: one line, nothing written


def only_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert_to_hf.py: error: "), err
    return err[0]


def assert_nothing_written(parent: Path, keep: set) -> None:
    assert set(os.listdir(parent)) == keep, os.listdir(parent)


def test_bad_input_gets_one_line_and_nothing_written(dense_model, vocab, tmp_path, capsys):
    out = tmp_path / "out"
    assert export(str(tmp_path / "nope"), out) == 2
    assert f"--load {tmp_path / 'nope'} does not exist" in only_line(capsys)
    # another program's layout: Megatron-LM's release/mp_rank_00/model_optim_rng.pt
    other = tmp_path / "megatron_lm"
    (other / "release" / "mp_rank_00").mkdir(parents=True)
    torch.save({"model": {}}, other / "release" / "mp_rank_00" / "model_optim_rng.pt")
    (other / TRACKER_FILENAME).write_text("release\n")
    assert export(str(other), out) == 2
    assert f"{MODEL_FILENAME} is missing" in only_line(capsys)
    # our file names, another program's content
    (other / "release" / MODEL_FILENAME).write_bytes(b"not a torch file")
    assert export(str(other), out) == 2
    assert "not a torch file" in only_line(capsys)
    torch.save({"weights": {}}, other / "release" / MODEL_FILENAME)
    assert export(str(other), out) == 2
    assert "is not an xmoe checkpoint" in only_line(capsys)
    assert_nothing_written(tmp_path, {"megatron_lm"})

    ckpt = save(dense_model, vocab, tmp_path / "ckpt")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export(ckpt, out) == 2
    assert f"--out {out} exists and is not empty: give --force" in only_line(capsys)
    assert os.listdir(out) == ["keep.txt"]
    assert export(ckpt, Path(ckpt), "--force") == 2
    assert "holds the input" in only_line(capsys)
    assert export(ckpt, out, "--force", "--vocab-file", str(tmp_path / "missing.json")) == 2
    assert f"--vocab-file {tmp_path / 'missing.json'} (given) does not exist" in only_line(
        capsys)
    assert os.listdir(out) == ["keep.txt"]       # --force replaces only a complete export
    assert_nothing_written(tmp_path, {"megatron_lm", "ckpt", "out"})
    assert export(ckpt, out, "--force") == 0
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert_nothing_written(tmp_path, {"megatron_lm", "ckpt", "out"})


def test_a_failing_export_leaves_nothing(dense_model, vocab, tmp_path, capsys, monkeypatch):
    """A failure after files were written (here: the logits check) removes the staged
    directory; the run's recorded vocabulary, moved away, is named with the flag to give."""
    from megatron.hf import convert

    ckpt = save(dense_model, vocab, tmp_path / "ckpt")
    monkeypatch.setattr(convert, "logit_difference", lambda *a: 0.5)
    assert export(ckpt, tmp_path / "hf") == 2
    assert "logits differ from xmoe's by 0.5" in only_line(capsys)
    assert_nothing_written(tmp_path, {"ckpt"})
    args = {"model": dataclasses.asdict(dense_model.config),
            "data": {"vocab_file": str(tmp_path / "gone.json"), "merge_file": vocab["merges"]}}
    save_checkpoint(StubEngine(dense_model), 30, 0, None, args, str(tmp_path / "ckpt2"))
    assert export(str(tmp_path / "ckpt2"), tmp_path / "hf") == 2
    assert (f"--vocab-file {tmp_path / 'gone.json'} (the run's, recorded in the checkpoint) "
            "does not exist: pass --vocab-file") in only_line(capsys)
    assert_nothing_written(tmp_path, {"ckpt", "ckpt2"})


# ----------------------------------------------------------------------------------------------
# --from-hf


def test_from_hf_round_trip_and_stock_gpt2(dense_model, vocab, tmp_path, capsys):
    """export -> --from-hf gives back our tensors bit for bit; a GPT-2 made by transformers
    imports with its logits; what our GPT cannot express is refused."""
    assert export(save(dense_model, vocab, tmp_path / "ckpt"), tmp_path / "hf") == 0
    assert convert_to_hf.main(["--from-hf", str(tmp_path / "hf"), "--out",
                               str(tmp_path / "back")]) == 0
    assert "--make-vocab-size-divisible-by 128 to get" in capsys.readouterr().out
    back, iteration = load_model(str(tmp_path / "back"),
                                 model_config_from_checkpoint(str(tmp_path / "back")), "cpu")
    assert iteration == 0       # (the MoE settings of a dense model are the defaults)
    assert dataclasses.replace(back.config, moe=dense_model.config.moe) == dense_model.config
    for name, tensor in dense_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab["tokenizer"].vocab_size, n_positions=48,
                                      n_embd=24, n_layer=2, n_head=3,
                                      activation_function="gelu_pytorch_tanh")).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert convert_to_hf.main(["--from-hf", str(tmp_path / "gpt2"), "--out",
                               str(tmp_path / "imported")]) == 0
    assert "has no vocab.json/merges.txt" in capsys.readouterr().out
    config = model_config_from_checkpoint(str(tmp_path / "imported"))
    ours, _ = load_model(str(tmp_path / "imported"), config, "cpu")
    ids = torch.randint(0, vocab["tokenizer"].vocab_size, (2, 16))
    torch.testing.assert_close(logits(ours, ids), logits(gpt2, ids), rtol=0, atol=2e-5)

    hf_config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    for change, message in ((dict(activation_function="relu"), "activation_function 'relu'"),
                            (dict(scale_attn_by_inverse_layer_idx=True),
                             "scale_attn_by_inverse_layer_idx true"),
                            (dict(model_type="llama"), "model_type 'llama'")):
        (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**hf_config, **change}))
        assert convert_to_hf.main(["--from-hf", str(tmp_path / "gpt2"), "--out",
                                   str(tmp_path / "refused")]) == 2
        assert message in only_line(capsys)
    assert not (tmp_path / "refused").exists()


# ----------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_pretrain_then_convert_cli_then_transformers(vocab, tmp_path):
    """pretrain_gpt.py (a tiny XMoE, 6 iterations) -> tools/convert_to_hf.py -> transformers:
    the same logits and the same greedy continuation as the checkpoint loaded by xmoe."""
    from megatron.generation import generate

    tokenizer = vocab["tokenizer"]
    ids = [tokenizer.tokenize(d) + [tokenizer.eod] for d in synthetic_corpus(200)]
    prefix = write_dataset(str(tmp_path / "corpus"), ids)
    run_pretrain([
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--num-experts", "4", "--expert-interval", "2",
        "--moe-ffn-hidden-size", "32", "--use-threshold", "--threshold", "0.6",
        "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "3e-3",
        "--train-iters", "6", "--seed", "1", "--data-path", prefix, "--split", "98,1,1",
        "--vocab-file", vocab["vocab"], "--merge-file", vocab["merges"],
        "--num-workers", "0", "--eval-interval", "100", "--eval-iters", "1",
        "--save", str(tmp_path / "ckpt"), "--save-interval", "6"])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_hf.py"),
                           "--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(iteration 6)" in proc.stdout and "checked: transformers' logits" in proc.stdout
    ours, _ = load_model(str(tmp_path / "ckpt"),
                         model_config_from_checkpoint(str(tmp_path / "ckpt"),
                                                      drop_tokens=False), "cpu")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    theirs.eval().generation_config.eos_token_id = None
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    prompt = "The sparse router"
    batch = hf_tokenizer(prompt, return_tensors="pt")
    torch.testing.assert_close(logits(theirs, batch["input_ids"]),
                               logits(ours, batch["input_ids"]), rtol=0, atol=2e-5)
    got = theirs.generate(**batch, do_sample=False, max_new_tokens=16)[0].tolist()
    expected = generate(ours, tokenizer.tokenize(prompt), 16, greedy=True).tokens
    assert got[batch["input_ids"].shape[1]:] == expected
