"""The GeLU forms of megatron/model/activations.py inside Triton kernels: a constexpr ACT.

rows.py (the GeLU row kernel) calls `gelu_parts(x, ACT)` for the value and the derivative, in
fp32; tests compare both with the formulas written out in tests/model/gelu_reference.py, forward
and backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron.config import ACTIVATIONS

# The constexpr ACT of each form, in megatron.config.ACTIVATIONS order.
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
assert ACT_CODES == {"gelu_tanh": 0, "gelu": 1, "gelu_erf_onnx": 2}

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_K = tl.constexpr(0.79788456)             # Megatron's sqrt(2 / pi)
_TANH_A = tl.constexpr(0.044715)
_TANH_3A = tl.constexpr(0.134145)              # 3 a (Megatron's 0.1070322243 = k * 3a)
_ONNX_SQRT2 = tl.constexpr(1.41421)            # erf_gelu's rounded sqrt(2)
_ONNX_PHI = tl.constexpr(0.3989432853308606)   # 1 / (1.41421 * sqrt(pi))


def act_code(activation: str) -> int:
    """The constexpr ACT of a GeLU form name (one of megatron.config.ACTIVATIONS)."""
    if activation not in ACT_CODES:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACT_CODES[activation]


@triton.jit
def gelu_parts(x, ACT: tl.constexpr):
    """(gelu(x), gelu'(x)) of GeLU form ACT, in fp32 (the compiler drops the derivative where
    only the value is used).

    tanh (ACT 0): 0.5 x (1 + tanh(u)) = x s with s = sigmoid(2u), u = k x (1 + a x^2): tanh
    from exp (not every triton has tl.math.tanh), of -2|u| only, so exp never overflows:
    e = exp(-2|u|), r = 1 / (1 + e), s = r (u >= 0) or e r (u < 0), s (1 - s) = e r^2; no
    cancellation in 1 + tanh(u) for negative x, and the tails are exact (e underflows to 0).
    gelu' = s + 2 x s (1 - s) u' (Megatron's bias_gelu_back, as 1 + tanh = 2 s and
    1 - tanh^2 = 4 s (1 - s)). s (1 - s) is exactly 0 for |x| > 30, where x is clamped in
    that term: x u' ~ x^3 overflows fp32 past ~1e12, and 0 * inf would be NaN.
    erf (ACT 1): x Phi(x); gelu' = Phi(x) + x phi(x).
    erf, ONNX-safe (ACT 2): x * 0.5 * (erf(x / 1.41421) + 1); gelu' = cdf + x exp(-w^2) /
    (1.41421 sqrt(pi)) with w = x / 1.41421.
    """
    if ACT == 0:
        u = _TANH_K * x * (1.0 + _TANH_A * x * x)
        e = tl.exp(-2.0 * tl.abs(u))
        r = 1.0 / (1.0 + e)
        s = tl.where(u >= 0.0, r, e * r)
        xc = tl.minimum(tl.maximum(x, -30.0), 30.0)
        value = x * s
        grad = s + (2.0 * e * r * r) * xc * (_TANH_K * (1.0 + _TANH_3A * xc * xc))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))
        value = x * cdf
        grad = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    else:
        w = x / _ONNX_SQRT2
        cdf = 0.5 * (tl.math.erf(w) + 1.0)
        value = x * cdf
        grad = cdf + x * tl.exp(-w * w) * _ONNX_PHI
    return value, grad
