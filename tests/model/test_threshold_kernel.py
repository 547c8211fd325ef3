"""The threshold router's ranking kernel (megatron/model/moe/kernels/threshold.py): the same
slots, exactly, as the torch path (router.torch_threshold_slots: stable descending sort, fp64
prefix sums, fp32 comparison). On CPU this module runs under triton's interpreter in its own
process (test_moe_kernels_interpreted.py); on CUDA it runs compiled."""

import pytest
import torch

from megatron.model.moe.router import torch_threshold_slots

from tests.model.triton_kernels import CUDA_OR_INTERPRETER, DEVICE, NEEDS_TRITON, kernel_module

pytestmark = [NEEDS_TRITON, CUDA_OR_INTERPRETER]


@pytest.fixture(scope="module")
def th():
    return kernel_module("kernels.threshold", "threshold_slots_kernel")


def check(th, probs, threshold, num_slots):
    probs = probs.to(DEVICE)
    want = torch_threshold_slots(probs, threshold, num_slots)
    got = th.threshold_slots(probs, threshold, num_slots)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.bool
    assert got[0].shape == got[1].shape == (probs.shape[0], num_slots)
    assert torch.equal(got[0], want[0]), (threshold, num_slots)
    assert torch.equal(got[1], want[1]), (threshold, num_slots)


def mixed_rows(T, E, gen):
    """Softmax rows from flat to peaked (a logit scale per row)."""
    scale = torch.logspace(-1, 1.5, T)[:, None]
    return torch.softmax(scale * torch.randn(T, E, generator=gen), dim=-1)


@pytest.mark.parametrize("E", [1, 6, 8])
def test_random_rows_match_torch(th, E):
    probs = mixed_rows(37, E, torch.Generator().manual_seed(E))
    for threshold in (0.3, 0.9, 1.0):
        for num_slots in sorted({E, min(3, E)}):
            check(th, probs, threshold, num_slots)


def test_xmoe_shape_matches_torch(th):
    """64 experts (XMoE-small's layer; one program of 16 tokens: the interpreter is slow)."""
    probs = mixed_rows(16, 64, torch.Generator().manual_seed(64))
    check(th, probs, 0.9, 64)
    check(th, probs, 0.5, 3)


def test_ties_go_to_the_lower_expert(th):
    """Equal probabilities (uniform rows, repeated values, zeros, -0.0, a NaN row) rank as
    torch's stable sort ranks them, and a row whose prefix sums cross the threshold on a tie
    still matches."""
    E = 8
    rows = [torch.full((E,), 1.0 / E),
            torch.tensor([0.1, 0.3, 0.1, 0.3, 0.1, 0.05, 0.05, 0.0]),
            torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
            torch.tensor([0.25, 0.25, 0.25, 0.25, -0.0, 0.0, -0.0, 0.0]),
            torch.softmax(torch.full((E,), float("nan")), dim=-1)]      # slot 0 wanted still
    probs = torch.stack(rows)
    for threshold in (0.25, 0.5, 0.75, 1.0):
        for num_slots in (E, 2):
            check(th, probs, threshold, num_slots)


def test_no_tokens(th):
    experts, wanted = th.threshold_slots(torch.zeros(0, 5, device=DEVICE), 0.9, 5)
    assert experts.shape == wanted.shape == (0, 5)
