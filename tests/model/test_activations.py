"""The GeLU forms (megatron/model/activations.py) and the dense MLP against the plainly written
Megatron formulas of gelu_reference.py: values and derivatives, fp32 and fp64, every form."""

import pytest
import torch

from megatron.config import GPTConfig
from megatron.model.mlp import MLP
from tests.model.gelu_reference import FORMS, REFERENCE, bias_gelu, exact_gelu

# A wide range, with the large |x| where tanh and exp saturate.
X = torch.cat([torch.linspace(-12.0, 12.0, 2401), torch.tensor([-1e4, -300.0, -40.0, 40.0,
                                                                300.0, 1e4])])


def activation_fn(form: str):
    from megatron.model.activations import activation_fn as fn   # (new module: local import)
    return fn(form)


def test_forms_are_the_configs_choices():
    from megatron.config import ACTIVATIONS
    assert set(FORMS) == set(ACTIVATIONS)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-9)])
def test_form_and_its_derivative_match_megatron(form, dtype, tol):
    """Against the formulas evaluated in fp64. fp32 at 1e-6: fp32 rounding (1 + tanh(u) loses
    its digits for negative x); fp64 at 1e-9: torch's tanh GeLU writes sqrt(2/pi) =
    0.7978845608..., Megatron's fused kernel 0.79788456 (openai_gelu the former), which are
    the same number in fp32."""
    x = X.to(dtype).requires_grad_(True)
    y = activation_fn(form)(x)
    value, derivative = REFERENCE[form]
    x64 = x.detach().double()
    torch.testing.assert_close(y.double(), value(x64), atol=tol, rtol=tol)
    grad, = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad.double(), derivative(x64), atol=tol, rtol=tol)


def test_forms_differ_where_megatron_differs():
    """In fp64 every pair of forms is told apart (erf_gelu's 1.41421 moves it by ~1e-7)."""
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    outs = {form: activation_fn(form)(x) for form in FORMS}
    for a in FORMS:
        for b in FORMS:
            if a != b:
                assert float((outs[a] - outs[b]).abs().max()) > 1e-8, (a, b)


def test_unknown_form_is_rejected():
    with pytest.raises(ValueError, match="gelu_tanh"):
        activation_fn("relu")


def _mlp_output(mlp: MLP, x: torch.Tensor, form_value) -> torch.Tensor:
    h = x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias
    return form_value(h) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias


def test_default_dense_mlp_is_megatrons_fused_tanh_gelu():
    """The original trained with --bias-gelu-fusion on (Megatron's default): tanh GeLU."""
    torch.manual_seed(0)
    mlp = MLP(16, 64, init_std=0.5, output_init_std=0.5)
    x = torch.randn(40, 16)
    with torch.no_grad():
        got = mlp(x)
        torch.testing.assert_close(got, _mlp_output(mlp, x, bias_gelu), atol=1e-6, rtol=1e-6)
        assert float((got - _mlp_output(mlp, x, exact_gelu)).abs().max()) > 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_dense_mlp_uses_its_form(form):
    """fp64; the tanh form at 1e-7 (torch's sqrt(2/pi) vs Megatron's 0.79788456, see above)."""
    tol = 1e-7 if form == "gelu_tanh" else 1e-9
    torch.manual_seed(0)
    mlp = MLP(16, 64, init_std=0.5, output_init_std=0.5, activation=form).double()
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    got = mlp(x)
    want = _mlp_output(mlp, x, REFERENCE[form][0])
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    g = torch.randn_like(got)
    wrt = [x] + list(mlp.parameters())
    for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_gpt_config_default_and_validation():
    cfg = GPTConfig(num_layers=2, hidden_size=8, num_attention_heads=2, padded_vocab_size=16,
                    max_position_embeddings=8)
    assert cfg.activation == "gelu_tanh"
    with pytest.raises(ValueError, match="--no-bias-gelu-fusion"):
        GPTConfig(num_layers=2, hidden_size=8, num_attention_heads=2, padded_vocab_size=16,
                  max_position_embeddings=8, activation="swish")
