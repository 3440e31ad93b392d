"""Triton FlashAttention-2 forward and backward on CPU under TRITON_INTERPRET=1, against the
float64 reference with the STYLE.md tolerance rule."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, check_case, check_close, make_inputs, math_with_grads, max_magnitude

import fa2dispatch
from fa2dispatch.backends.triton_fa2 import launch
from fa2dispatch.backends.triton_fa2.config import TritonConfig
from fa2dispatch.problem import make_problem

pytestmark = pytest.mark.interpreter

# (B, H, Hkv, Mq, Mkv, D): odd lengths (1, 17, 97, 130), Mq != Mkv both ways, MHA/GQA/MQA,
# head dims across 8..256 including ones that are not powers of two (padded inside).
SHAPES = [
    (1, 2, 2, 1, 1, 8),
    (2, 4, 4, 17, 17, 64),
    (1, 8, 2, 97, 130, 40),
    (1, 4, 1, 130, 97, 128),
    (2, 2, 2, 1, 130, 256),
    (1, 2, 1, 130, 17, 72),
    (1, 3, 3, 64, 128, 16),
    (1, 2, 2, 97, 1, 136),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _matrix():
    cases = []
    for i, shape in enumerate(SHAPES):
        for dtype in DTYPES:
            for causal in (False, True):
                layout = "bshd" if (i + causal) % 2 == 0 else "bhsd"
                cases.append(Case(*shape, dtype=dtype, causal=causal, layout=layout))
    # non-contiguous inputs (strided views) in both layouts
    cases.append(Case(1, 4, 2, 33, 65, 32, torch.float16, True, "bshd", contiguous=False))
    cases.append(Case(2, 2, 1, 65, 33, 24, torch.float32, False, "bhsd", contiguous=False))
    return cases


MATRIX = _matrix()


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_forward_backward_matches_reference(case):
    check_case(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gradient_through_lse(dtype):
    """attention(..., return_lse=True): a loss that uses lse gets its gradient too (d lse / d S = P)."""
    case = Case(1, 4, 2, 37, 53, 32, dtype, causal=True)
    q, k, v, dout = make_inputs(case, seed=3)
    dlse = torch.randn(case.B, case.H, case.Mq, generator=torch.Generator().manual_seed(4))
    out, lse = fa2dispatch.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))

    def math_grads(compute_dtype):
        from fa2dispatch.backends.reference import attention_math

        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        o, l = attention_math(*leaves, causal=True, softmax_scale=case.D**-0.5, compute_dtype=compute_dtype)
        return torch.autograd.grad((o, l), leaves, (dout.to(compute_dtype), dlse.to(compute_dtype)))

    truth, low = math_grads(torch.float64), math_grads(dtype)
    for name, g, t, lp in zip(("dq", "dk", "dv"), grads, truth, low):
        check_close(name, g, t, lp, max_magnitude(*truth))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_output_element_written(nan_poison, causal):
    """Outputs start as NaN (nan_poison); any element the kernels skip stays NaN and fails."""
    case = Case(2, 4, 2, 97, 70, 40, torch.float16, causal)
    out, lse, dq, dk, dv = check_case(case, seed=5)
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize(
    "blocks", [(16, 32, 16, 64, 64, 16), (64, 64, 32, 32, 32, 32), (16, 16, 16, 16, 16, 16)],
    ids=lambda b: "fwd{}x{}-dkdv{}x{}-dq{}x{}".format(*b),
)
def test_block_sizes_do_not_change_the_result(blocks):
    """Other block shapes move the causal band and ragged edges; the result must not move."""
    bm, bn, dkm, dkn, dqm, dqn = blocks
    config = TritonConfig(block_m=bm, block_n=bn, num_stages=1, dkdv_block_m=dkm, dkdv_block_n=dkn,
                          dq_block_m=dqm, dq_block_n=dqn, bwd_num_stages=1)
    for causal, (mq, mkv) in ((True, (70, 45)), (True, (45, 70)), (False, (33, 50))):
        case = Case(1, 4, 2, mq, mkv, 48, torch.float32, causal)
        q, k, v, dout = make_inputs(case, seed=7, requires_grad=False)
        problem = make_problem(q, k, v, causal=causal)
        from fa2dispatch.hardware import CPU

        out, lse = launch.forward(problem, q, k, v, config, CPU)
        dq, dk, dv = launch.backward(problem, dout, q, k, v, out, lse, None, config, CPU)
        truth = math_with_grads(q, k, v, dout, case, torch.float64)
        low = math_with_grads(q, k, v, dout, case, torch.float32)
        expected, lowprec = truth[:1] + truth[2:], low[:1] + low[2:]
        for name, ours, t, lp in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected, lowprec):
            check_close(f"{name} causal={causal} Mq={mq} Mkv={mkv}", ours, t, lp, max_magnitude(*expected))


def test_rows_without_visible_keys_give_zero_and_neg_inf():
    """Causal with Mq > Mkv, bottom-right: the first Mq - Mkv query rows see no key."""
    case = Case(1, 2, 2, 40, 9, 16, torch.float16, causal=True)
    q, k, v, _ = make_inputs(case, requires_grad=False)
    out, lse = fa2dispatch.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert torch.all(out[:, :31] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :31]))
    assert torch.isfinite(lse[:, :, 31:]).all() and not torch.isnan(out).any()


def test_backward_is_bitwise_repeatable():
    case = Case(1, 4, 1, 50, 70, 32, torch.float16, causal=True)
    q, k, v, dout = make_inputs(case, seed=9)
    runs = []
    for _ in range(2):
        out = fa2dispatch.attention(q, k, v, causal=True, backend="triton")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_forward_without_grad_matches_with_grad():
    case = Case(1, 2, 2, 33, 33, 64, torch.float16, causal=False)
    q, k, v, _ = make_inputs(case, requires_grad=False)
    with torch.no_grad():
        plain = fa2dispatch.attention(q, k, v, backend="triton")
    tracked = fa2dispatch.attention(q.requires_grad_(), k, v, backend="triton")
    assert tracked.requires_grad and torch.equal(plain, tracked.detach())


def test_torch_compile_fullgraph_forward_and_backward():
    """A model calling attention traces with fullgraph=True (custom op + fake + autograd)."""
    case = Case(1, 4, 2, 24, 40, 32, torch.float32, causal=True)
    q, k, v, dout = make_inputs(case, seed=11)

    def model(q, k, v):
        return fa2dispatch.attention(q * 2.0, k, v, causal=True, backend="triton").sin()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out = model(q, k, v)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
