"""Parsing of `--split` and `--data-path`, with Megatron's semantics and clear errors."""

from __future__ import annotations

import math


def _parse_float(text: str, flag: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{flag}: {what} {text!r} is not finite")
    return value


def parse_split(splits_string: str, size: int) -> list[int]:
    """Boundaries [0, train_end, valid_end, size] of Megatron's get_train_valid_test_split_.

    "97,2,1", "0.97,0.02,0.01", "98,2" or "98/2" (padded with zeros to three parts) are normalised
    to fractions f; boundary k+1 = boundary k + round(f_k * size) (Python's round: half to even);
    the rounding excess diff = boundary_3 - size is then subtracted from boundaries 1..3, as
    Megatron does, so the test split ends at `size`. One deviation: boundaries are clamped at 0,
    where Megatron would produce a negative index for a tiny first split whose rounding overshoots.
    """
    flag = "--split"
    text = splits_string.strip()
    separator = "," if "," in text else "/" if "/" in text else None
    parts = text.split(separator) if separator else [text]
    if len(parts) > 3:
        raise ValueError(f"{flag}: {splits_string!r} has {len(parts)} parts; at most 3 "
                         "(train, valid, test)")
    fractions = [_parse_float(p.strip(), flag, "part") for p in parts]
    if any(f < 0 for f in fractions):
        raise ValueError(f"{flag}: {splits_string!r} has a negative part")
    total = sum(fractions)
    if total <= 0:
        raise ValueError(f"{flag}: {splits_string!r} sums to zero")
    if size < 0:
        raise ValueError(f"cannot split {size} documents")
    fractions = [f / total for f in fractions] + [0.0] * (3 - len(fractions))
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * float(size))))
    diff = bounds[-1] - size
    bounds = [bounds[0]] + [max(0, b - diff) for b in bounds[1:]]
    assert bounds[-1] == size and all(a <= b for a, b in zip(bounds, bounds[1:]))
    return bounds


def parse_data_path(values: list[str]) -> tuple[list[str], list[float]]:
    """(prefixes, weights summing to 1) from `--data-path PREFIX` or `--data-path W1 P1 W2 P2 ...`.

    Weights are relative (Megatron normalises them: "0.7 a 0.3 b" == "7 a 3 b").
    """
    flag = "--data-path"
    values = [str(v).strip() for v in values]
    if not values or any(not v for v in values):
        raise ValueError(f"{flag}: expected PREFIX or WEIGHT PREFIX pairs, got {values!r}")
    if len(values) == 1:
        return [values[0]], [1.0]
    if len(values) % 2:
        raise ValueError(f"{flag}: {len(values)} values; weighted data needs WEIGHT PREFIX "
                         f"pairs, got {values!r}")
    weights = [_parse_float(w, flag, "weight") for w in values[0::2]]
    prefixes = values[1::2]
    for w, p in zip(weights, prefixes):
        if w <= 0:
            raise ValueError(f"{flag}: weight {w} of {p!r} must be > 0")
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def blended_num_samples(weights: list[float], num_samples: int) -> list[int]:
    """Samples to build per blended dataset: ceil(weight * num_samples * 1.005).

    Megatron's 0.5% margin, so the greedy blending (which may take a few more samples than
    weight * n from one dataset) never runs past the end of a component.
    """
    return [int(math.ceil(num_samples * w * 1.005)) for w in weights]
