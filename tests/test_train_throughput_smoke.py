"""benchmarks/train_throughput.py on CPU at tiny shapes, so the script cannot rot: its smoke run
(every config through megatron.arguments and the training step, the --breakdown table, the
summary lines), the step profile's attribution of ops to categories and phases on small models
where each op's owner is known, and the plain-PyTorch reference against GPTModel. Its
multi-GPU form (2 ranks, EP 2) is checked on the run tests/test_multi_gpu_runs_smoke.py's
scaling test makes."""

from __future__ import annotations

import collections
import contextlib
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers
import torch

from tests.helpers import child_env

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import _step_profile as sp  # noqa: E402
import train_throughput as tt  # noqa: E402
from _plain_gpt import PlainGPT, PlainTrainer  # noqa: E402

NUMBER = r"(-?[\d.]+)"


@pytest.mark.slow
def test_train_throughput_small_cpu_run_prints_every_config_breakdown_and_goals():
    env = child_env(PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "train_throughput.py"), "--small",
         "--device", "cpu", "--iters", "1", "--breakdown"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "failed" not in out, out
    for name in ("xmoe", "topk8", "dense", "plain"):
        line = re.search(rf"^{name}\s+\| .* tokens/s \| .* ms/step \| MFU .* \| experts/token "
                         rf".* \| MoE share .* \| lm loss (\S+)", out, re.M)
        assert line, f"no result line for {name}:\n{out}"
        assert float(line.group(1)) > 0.0                      # a finite loss came back
    # XMoE's routers were sharpened to ~3 experts per token (threshold 0.9); top-8 takes 8.
    used = re.search(r"^xmoe .* experts/token ([\d.]+) used / ([\d.]+) wanted", out, re.M)
    assert used and 2.0 < float(used.group(2)) < 4.0, out
    assert re.search(r"^topk8 .* experts/token [\d.]+ used / 8\.00 wanted", out, re.M), out
    # The same parameters, hence the same FLOPs and MFU, for dense and plain.
    params = dict(re.findall(r"^(dense|plain)\s+\|.*\| params ([\d.]+)M", out, re.M))
    assert params["dense"] == params["plain"], out
    assert re.search(r"^topk8 / xmoe step time = [\d.]+.* vs expert-FLOP ratio [\d.]+", out, re.M)

    # The goals: the eager line (not the --compile one), the --compile goals without verdicts.
    assert re.search(r"^xmoe / dense \(eager\) tokens/s = [\d.]+ \[target >= 0.9: (NOT )?met\]$",
                     out, re.M), out
    assert not re.search(r"^xmoe / dense tokens/s", out, re.M), out
    assert re.search(r"^xmoe tokens/s [\d.]+k \[target >= 450k: a --compile goal", out, re.M)
    assert re.search(r"^dense / plain tokens/s = [\d.]+ \[target >= 0.95: a --compile goal",
                     out, re.M), out
    assert re.search(r"^xmoe peak memory .*information only.*14.5 GiB", out, re.M), out

    # The breakdown: a column per config, every category and phase row; each group sums to
    # the total (printed to 0.01 ms: rounding only).
    header = re.search(r"^\s+\|\s+xmoe\s+\|\s+topk8\s+\|\s+dense\s+\|\s+plain\s*$", out, re.M)
    assert header, out
    rows = {}
    for label in (*sp.CATEGORIES, *sp.PHASES, "CPU op total", "step wall time",
                  "host gap (wall - kernel)"):
        m = re.search(rf"^{re.escape(label)}\s+\|" + r"\|".join([rf"\s*{NUMBER}\s*"] * 4) + "$",
                      out, re.M)
        assert m, f"no breakdown row {label!r}:\n{out}"
        rows[label] = [float(v) for v in m.groups()]
    for column in range(4):
        total = rows["CPU op total"][column]
        assert total > 0
        for group in (sp.CATEGORIES, sp.PHASES):
            assert abs(sum(rows[g][column] for g in group) - total) <= 0.006 * len(group), out
        assert abs(rows["step wall time"][column] - total
                   - rows["host gap (wall - kernel)"][column]) <= 0.015
    xmoe, topk8, dense, plain = range(4)
    assert rows[sp.MOE][xmoe] > 0 and rows[sp.MOE][topk8] > 0
    assert rows[sp.MOE][dense] == rows[sp.MOE][plain] == 0.0
    assert rows[sp.ENGINE][plain] == 0.0 and rows["engine"][plain] == 0.0   # no DeepSpeed
    for label in (sp.EMBEDDING, sp.ATTENTION, sp.DENSE_FFN, sp.OTHER, sp.OUTPUT, sp.GRAD_NORM,
                  sp.OPTIMIZER, "forward", "backward", "grad norm/clip", "optimizer"):
        assert all(v > 0 for v in rows[label]), (label, out)


def test_parse_args_defaults_and_breakdown_needs_profiled_steps(capsys):
    assert tt.parse_args([]).configs == "xmoe,topk8,dense,plain"
    assert tt.parse_args(["--small", "--breakdown"]).profile_steps == 1
    with pytest.raises(SystemExit):
        tt.parse_args(["--breakdown", "--profile-steps", "0"])
    assert "--breakdown needs profiled steps" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# attribution on a plain model: every op's owner is known


def tiny_plain(layers: int = 1, dropout: float = 0.0) -> PlainGPT:
    torch.manual_seed(0)
    return PlainGPT(vocab=64, positions=16, layers=layers, hidden=32, heads=2, ffn=64,
                    dropout=dropout, attention_dropout=dropout, init_std=0.02)


def tiny_batches(vocab: int = 64, seq: int = 16):
    g = torch.Generator().manual_seed(1)
    return tt.cycle([{"text": torch.randint(0, vocab, (2, seq + 1), generator=g)}
                     for _ in range(2)])


def owners(events) -> dict:
    """{op name: {(category, phase)}} of the ops with self time."""
    found = collections.defaultdict(set)
    for e, us, category, phase in sp.attributed_ops(events, cuda=False):
        found[e.name].add((category, phase))
    return found


@contextlib.contextmanager
def node_numbers(modules):
    """[(first, last, category)] for every forward call of the modules: the sequence numbers
    of the autograd nodes created inside it, read off two marker nodes created at its entry and
    exit (the reference the profile's sequence-number ranges are checked against)."""
    def marker() -> int:
        return torch.zeros(1, requires_grad=True).clone().grad_fn._sequence_nr()

    calls, hooks = [], []
    for module, category in modules:
        entries = []
        hooks += [module.register_forward_pre_hook(lambda m, a, _e=entries: _e.append(marker())),
                  module.register_forward_hook(
                      lambda m, a, o, _e=entries, _c=category:
                      calls.append((_e.pop() + 1, marker() - 1, _c)))]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def check_backward_owners(events, calls) -> collections.Counter:
    """Every op run by an autograd node that a module call created is attributed to that
    module's category (the narrowest call holding the node's number); returns how many ops
    each category had."""
    checked = collections.Counter()
    for e, us, category, phase in sp.attributed_ops(events, cuda=False):
        node = e
        while node is not None and not node.name.startswith(sp.AUTOGRAD_NODE):
            node = node.cpu_parent
        if node is None:
            continue
        holding = [c for c in calls if c[0] <= node.sequence_nr <= c[1]]
        if not holding:
            continue
        expected = min(holding, key=lambda c: c[1] - c[0])[2]
        assert (category, phase) == (expected, "backward"), (e.name, node.name, category)
        checked[expected] += 1
    return checked


class Wrapper(torch.nn.Module):
    """Calls its module and nothing else (as DeepSpeed's engine forward does)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def test_plain_step_ops_land_in_their_module_and_phase():
    model = tiny_plain()
    trainer = PlainTrainer(model, tiny_batches(), lr=1e-3, clip_grad=1.0)
    # A range around a module that only calls the model holds the same nodes as the model's:
    # they belong to the inner one (nothing may land in this "engine").
    trainer.call = Wrapper(model)
    modules = [(trainer.call, sp.ENGINE), *tt.plain_modules(model)]
    trainer.train_step()                      # optimizer state exists: a steady step is profiled
    prof = sp.record(trainer.train_step, 1, torch.device("cpu"), modules,
                     tt.plain_phases(trainer))
    found = owners(prof.events())
    fwd = lambda c: {(c, "forward")}                                       # noqa: E731
    bwd = lambda c: {(c, "backward")}                                      # noqa: E731
    # Forward under the module ranges, backward by the autograd nodes' sequence numbers.
    assert found["aten::embedding"] == fwd(sp.EMBEDDING)
    assert found["aten::embedding_dense_backward"] == bwd(sp.EMBEDDING)
    assert found["aten::_scaled_dot_product_flash_attention_for_cpu"] == fwd(sp.ATTENTION)
    assert found["aten::_scaled_dot_product_flash_attention_for_cpu_backward"] == bwd(
        sp.ATTENTION)
    assert found["aten::gelu"] == fwd(sp.DENSE_FFN)
    assert found["aten::gelu_backward"] == bwd(sp.DENSE_FFN)
    assert found["aten::native_layer_norm"] == fwd(sp.OTHER)
    assert found["aten::native_layer_norm_backward"] == bwd(sp.OTHER)
    assert found["aten::_log_softmax"] == fwd(sp.OUTPUT)
    assert found["aten::nll_loss_backward"] == bwd(sp.OUTPUT)
    # Outside the model: the phases' own categories.
    assert found["aten::_foreach_norm"] == {(sp.GRAD_NORM, "grad norm/clip")}
    assert found["aten::_fused_adamw_"] == {(sp.OPTIMIZER, "optimizer")}
    # Nothing is left to the DeepSpeed engine (there is none); outside the phases only the
    # step's detach of the loss it returns.
    assert not any(c == sp.ENGINE for pairs in found.values() for c, p in pairs)
    outside = {name for name, pairs in found.items()
               if any(p == "outside phases" for _, p in pairs)}
    assert outside <= {"aten::detach", "detach"}, outside
    # Both groupings hold every op once: they sum to the same total.
    categories, phases = sp.attribute(prof.events(), cuda=False)
    total = sum(us for _, us, _, _ in sp.attributed_ops(prof.events(), cuda=False))
    assert sum(categories.values()) == pytest.approx(total)
    assert sum(phases.values()) == pytest.approx(total)

    # Node by node: marker nodes at each module call's entry and exit (a profile of its own:
    # they add ops to the ranges) say which call created each node.
    with node_numbers(modules) as calls:
        prof = sp.record(trainer.train_step, 1, torch.device("cpu"), modules,
                         tt.plain_phases(trainer))
    checked = check_backward_owners(prof.events(), calls)
    assert all(checked[c] > 0 for c in (sp.EMBEDDING, sp.ATTENTION, sp.DENSE_FFN, sp.OTHER,
                                        sp.OUTPUT)), checked


def test_phase_ranges_restore_what_they_wrap_and_skip_absent_names():
    model = tiny_plain()
    trainer = PlainTrainer(model, tiny_batches(), lr=1e-3)
    module = importlib.import_module("_plain_gpt")
    before_forward, before_f = PlainTrainer.forward, module.F
    with sp.phase_ranges([(trainer, "forward", "forward"), (module, "F", "forward"),
                          (trainer, "no_such_name", "engine")]):
        assert "forward" in vars(trainer) and module.F is not before_f
    assert "forward" not in vars(trainer) and PlainTrainer.forward is before_forward
    assert module.F is before_f and not hasattr(trainer, "no_such_name")


def test_compiled_profile_has_phases_only():
    model = tiny_plain()
    trainer = PlainTrainer(model, tiny_batches(), lr=1e-3)
    profile = sp.profile_steps(trainer.train_step, 1, torch.device("cpu"), None,
                               tt.plain_phases(trainer))
    assert profile.categories is None and profile.moe_ms is None
    assert set(profile.phases) == set(sp.PHASES)
    assert sum(profile.phases.values()) == pytest.approx(profile.kernel_ms)
    assert profile.phases["forward"] > 0 and profile.phases["optimizer"] > 0


# ----------------------------------------------------------------------------------------------
# the plain reference is the dense GPTModel


def test_plain_gpt_equals_gptmodel_with_the_same_weights():
    """PlainGPT computes what the dense GPTModel computes (fp32, no dropout): same loss and
    gradients once GPTModel's weights are copied over (its fused QKV rows are per head:
    h*3A + j*A + a, PlainGPT's j*D + h*A + a); same parameter count, hence the same FLOPs."""
    from megatron.config import GPTConfig
    from megatron.model import GPTModel
    from megatron.training_log import FlopsModel

    H, A, D, L, V, S = 2, 16, 32, 2, 64, 16
    torch.manual_seed(0)
    dense = GPTModel(GPTConfig(num_layers=L, hidden_size=D, num_attention_heads=H,
                               padded_vocab_size=V, max_position_embeddings=S, ffn_hidden_size=64,
                               hidden_dropout=0.0, attention_dropout=0.0))
    plain = tiny_plain(layers=L)
    per_head = lambda t: t.view(H, 3, A, *t.shape[1:]).transpose(0, 1).reshape(t.shape)  # noqa
    with torch.no_grad():
        plain.embedding.wte.weight.copy_(dense.embedding.word_embeddings.weight)
        plain.embedding.wpe.weight.copy_(dense.embedding.position_embeddings.weight)
        for block, layer in zip(plain.blocks, dense.transformer.layers):
            pairs = [(block.ln_1, layer.input_layernorm),
                     (block.ln_2, layer.post_attention_layernorm),
                     (block.attn.proj, layer.self_attention.dense),
                     (block.mlp.fc, layer.mlp.dense_h_to_4h),
                     (block.mlp.proj, layer.mlp.dense_4h_to_h)]
            for ours, theirs in pairs:
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
            block.attn.qkv.weight.copy_(per_head(layer.self_attention.query_key_value.weight))
            block.attn.qkv.bias.copy_(per_head(layer.self_attention.query_key_value.bias))
        plain.ln_f.weight.copy_(dense.transformer.final_layernorm.weight)
        plain.ln_f.bias.copy_(dense.transformer.final_layernorm.bias)
    ids = torch.randint(0, V, (3, S + 1), generator=torch.Generator().manual_seed(2))
    ours = plain(ids[:, :-1], ids[:, 1:])
    theirs = dense(ids[:, :-1], labels=ids[:, 1:]).loss.mean()
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain.embedding.wte.weight.grad,
                               dense.embedding.word_embeddings.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain.blocks[0].mlp.fc.weight.grad,
                               dense.transformer.layers[0].mlp.dense_h_to_4h.weight.grad,
                               rtol=1e-5, atol=1e-7)
    assert sum(p.numel() for p in plain.parameters()) == dense.num_parameters()
    assert (tt.plain_flops(plain, S).per_iteration(4, [])
            == FlopsModel.of_model(dense, S, False).per_iteration(4, []))


# ----------------------------------------------------------------------------------------------
# attribution of the Megatron step (DeepSpeed engine, our AdamW, MoE layer)


@pytest.fixture(scope="module")
def one_rank():
    """deepspeed with a gloo group of one rank (tests/helpers.py)."""
    yield from helpers.deepspeed_one_rank()


def test_megatron_step_ops_land_in_their_module_and_phase(one_rank, tmp_path):
    """XMoE at tiny shapes (layer 1 dense, layer 2 MoE) through Trainer.train_step."""
    bench = tt.parse_args(["--small", "--device", "cpu", "--configs", "xmoe"])
    subject = tt.megatron_subject("xmoe", bench, tt.placeholder_data(str(tmp_path)),
                                  torch.device("cpu"))
    subject.step()
    prof = sp.record(subject.step, 1, torch.device("cpu"), subject.modules, subject.phases)
    events = prof.events()
    found = owners(events)
    assert found["aten::embedding"] == {(sp.EMBEDDING, "forward")}
    assert found["aten::embedding_dense_backward"] == {(sp.EMBEDDING, "backward")}
    assert found["aten::native_layer_norm"] == {(sp.OTHER, "forward")}
    assert found["aten::_log_softmax"] == {(sp.OUTPUT, "forward")}
    assert found["aten::nll_loss_backward"] == {(sp.OUTPUT, "backward")}
    # GeLU: the dense MLP of layer 1 and the experts of layer 2, forward and backward.
    assert found["aten::gelu"] == {(sp.DENSE_FFN, "forward"), (sp.MOE, "forward")}
    assert found["aten::gelu_backward"] == {(sp.DENSE_FFN, "backward"), (sp.MOE, "backward")}
    # Attention's softmax (SDPA's math path with dropout) and the router's: both owners seen.
    assert found["aten::_softmax"] == {(sp.ATTENTION, "forward"), (sp.MOE, "forward")}
    # Our AdamW (foreach on CPU) in the optimizer; the norm where training.py takes it.
    assert found["aten::_foreach_lerp_"] == {(sp.OPTIMIZER, "optimizer")}
    import megatron.training
    if hasattr(megatron.training, "global_grad_norm"):
        assert found["aten::_foreach_norm"] == {(sp.GRAD_NORM, "grad norm/clip")}
    categories, phases = sp.attribute(events, cuda=False)
    assert categories[sp.MOE] > 0
    # The wrapped callables are back as they were.
    import megatron.lm_forward
    engine = subject.step.__self__.built.engine
    assert megatron.training.forward_lm is megatron.lm_forward.forward_lm
    assert not {"backward", "step"} & set(vars(engine)) and "step" not in vars(engine.optimizer)
    assert sum(categories.values()) == pytest.approx(sum(phases.values()))
    # The engine's: its own work in engine.backward / engine.step and the backward of its loss
    # scaling (a division), never a model node, though its forward range holds them all too.
    for e, _, category, phase in sp.attributed_ops(events, cuda=False):
        node = e
        while node is not None and not node.name.startswith(sp.AUTOGRAD_NODE):
            node = node.cpu_parent
        if category == sp.ENGINE:
            assert phase == "engine" or node.name.endswith(": DivBackward0"), (e.name, phase)

    # Node by node (marker nodes, a profile of its own), the MoE layer's included.
    with node_numbers(subject.modules) as calls:
        prof = sp.record(subject.step, 1, torch.device("cpu"), subject.modules, subject.phases)
    checked = check_backward_owners(prof.events(), calls)
    assert all(checked[c] > 0 for c in (sp.EMBEDDING, sp.ATTENTION, sp.DENSE_FFN, sp.MOE,
                                        sp.OTHER, sp.OUTPUT)), checked


def test_gpu_breakdown_counts_device_events_per_step_without_annotations():
    """The GPU-only rows of --breakdown: device_events keeps kernels, copies and sets and drops
    record_function ranges' GPU copies; the table prints their count per step per config."""
    from torch.autograd import DeviceType
    import _throughput_report as report

    Event = collections.namedtuple("Event", "device_type is_user_annotation")
    events = ([Event(DeviceType.CUDA, False)] * 7 + [Event(DeviceType.CUDA, True)] * 3
              + [Event(DeviceType.CPU, False)] * 5)
    assert len(sp.device_events(events)) == 7

    def result(name: str, kernels: float) -> report.Result:
        phases = {p: 1.0 for p in sp.PHASES}
        profile = sp.StepProfile(steps=2, kernel_ms=6.0, phases=phases, categories=None,
                                 all_to_all_ms=0.0, kernels_per_step=kernels)
        return report.Result(name, 7.0, 1.0, 0.0, 0.0, 0.0, None, None, None, profile, 0.0, 1,
                             [], on_gpu=True)

    lines = report.breakdown_lines({"a": result("a", 1234.0), "b": result("b", 567.5)},
                                   compiled=True)
    row = next(line for line in lines if line.startswith("GPU kernels per step"))
    assert re.findall(r"\d+", row.split("|", 1)[1]) == ["1234", "568"]
