"""FlashAttention-2's features in the Triton kernels on a real GPU, at realistic sizes, against
the float64 reference under the STYLE.md rule (forward and backward), plus varlen against the
dense kernels and dropout's reproducibility on the device."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, check_feature_case, make_inputs

import fa2dispatch

pytestmark = pytest.mark.gpu

SLOPES = torch.tensor([2.0 ** (-8 * (h + 1) / 8) for h in range(8)])

CASES = [
    (Case(2, 8, 2, 300, 517, 64, torch.float16, True), dict(window_size=(128, -1))),
    (Case(1, 8, 8, 511, 511, 128, torch.bfloat16, False), dict(window_size=(64, 64))),
    (Case(2, 8, 4, 333, 333, 128, torch.bfloat16, True), dict(softcap=30.0)),
    (Case(1, 8, 8, 257, 700, 96, torch.float16, False), dict(alibi_slopes=SLOPES)),
    (Case(2, 8, 1, 700, 257, 64, torch.float16, True), dict(causal_alignment="top_left")),
    (Case(1, 8, 2, 384, 512, 128, torch.float16, True), dict(dropout_p=0.1)),
    (Case(2, 8, 2, 255, 255, 256, torch.bfloat16, True),
     dict(window_size=(100, -1), softcap=20.0, alibi_slopes=SLOPES, dropout_p=0.15)),
    (Case(1, 8, 4, 129, 129, 32, torch.float32, False, "bhsd"), dict(window_size=(16, 8), softcap=5.0)),
]


def _id(item) -> str:
    case, features = item
    return case.id + "-" + "-".join(k for k in features)


@pytest.mark.parametrize("item", CASES, ids=[_id(c) for c in CASES])
def test_feature_matches_reference_on_gpu(item):
    case, features = item
    features = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
    check_feature_case(case, features, device="cuda")


def test_varlen_matches_per_sequence_reference_on_gpu():
    """Packed sequences of very different lengths (1 .. 2048) give, per sequence, the float64
    reference of that sequence alone (forward and lse; gradients through the same kernels are
    covered by the interpreter tests and by the feature cases above)."""
    from helpers import check_close, check_lse

    from fa2dispatch.backends.reference import attention_math

    torch.manual_seed(0)
    lens = [1000, 17, 513, 2048, 1]
    H, Hkv, D = 8, 2, 128
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens), H, D, device="cuda", dtype=torch.float16)
    k = torch.randn(sum(lens), Hkv, D, device="cuda", dtype=torch.float16)
    v = torch.randn(sum(lens), Hkv, D, device="cuda", dtype=torch.float16)
    out, lse = fa2dispatch.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, return_lse=True,
                                            backend="triton")
    for b, n in enumerate(lens):
        s, e = cu[b].item(), cu[b + 1].item()
        args = (q[s:e][None], k[s:e][None], v[s:e][None])
        truth, truth_lse = attention_math(*args, causal=True, softmax_scale=D**-0.5, compute_dtype=torch.float64)
        low, low_lse = attention_math(*args, causal=True, softmax_scale=D**-0.5, compute_dtype=torch.float16)
        check_close(f"out of sequence {b} (length {n})", out[s:e], truth[0], low[0])
        check_lse(lse[:, s:e], truth_lse[0], low_lse[0])


def test_dropout_reproducible_on_gpu():
    case = Case(2, 8, 2, 1024, 1024, 128, torch.bfloat16, True)
    q, k, v, dout = make_inputs(case, "cuda")

    def run(seed):
        out = fa2dispatch.attention(q, k, v, causal=True, dropout_p=0.2, backend="triton",
                                    generator=torch.Generator().manual_seed(seed))
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_sliding_window_costs_the_window_not_the_sequence():
    """A sliding window visits only the key blocks of its band: at a fixed window its time grows
    linearly with the sequence (4x the tokens: ~4x the time), where full causal attention grows
    quadratically (~16x). Measured, with a loose bound (short loops pay fixed costs)."""
    import triton.testing

    def time_of(m, **kw):
        case = Case(1, 16, 16, m, m, 128, torch.float16, True)
        q, k, v, _ = make_inputs(case, "cuda", requires_grad=False)
        return triton.testing.do_bench(lambda: fa2dispatch.attention(q, k, v, causal=True, backend="triton", **kw))

    short, long = time_of(4096, window_size=(255, -1)), time_of(16384, window_size=(255, -1))
    full = time_of(16384)
    assert long < 6 * short, f"window 256: {short:.3f} ms at 4k, {long:.3f} ms at 16k (linear: ~4x)"
    assert long < full, f"window 256 at 16k: {long:.3f} ms; full causal: {full:.3f} ms"
