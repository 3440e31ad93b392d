"""attention_varlen on PyTorch's ragged FlashAttention-2 op (torch-sdpa-flash); cuDNN's is refused.

CPU: what each SDPA backend takes or refuses for a varlen call, with the reason text, on
simulated devices, and the log-sum-exp conversions between the op's forms and ours.
GPU (``gpu``): forward, lse and backward against the float64 per-sequence reference under the
STYLE.md rule, and refused calls running on Triton instead.
"""

from __future__ import annotations

import pytest
import torch
from fa2dispatch.backends import BACKENDS, torch_sdpa
from helpers import check_close, max_magnitude
from test_varlen import packed, per_sequence

from fa2dispatch import dispatch
from fa2dispatch.hardware import simulated_device
from fa2dispatch.varlen import make_varlen_problem

H100, A100 = simulated_device("h100"), simulated_device("a100")
SDPA = ("torch-sdpa-cudnn", "torch-sdpa-flash")


def problem_of(lens_q, lens_k, H=4, Hkv=4, D=64, dtype=torch.float16, grad=False, **kw):
    q, k, v, _, cq, ck = packed(lens_q, lens_k, H=H, Hkv=Hkv, D=D, dtype=dtype)
    with torch.set_grad_enabled(grad):
        return make_varlen_problem(q, k, v, cq, ck, max(lens_q), max(lens_k), **kw)


def select(problem, device=H100):
    return dispatch.select(problem, device=device)


# ------------------------------------------------------------------ CPU: capability and refusals


def test_per_call_length_facts_are_recorded_and_hashable():
    equal = problem_of([5, 9], [5, 9])
    assert equal.varlen and equal.varlen_equal and not equal.varlen_empty
    unequal = problem_of([5, 9], [9, 5])
    assert not unequal.varlen_equal and unequal.Mq == unequal.Mkv == 9
    assert problem_of([5, 0], [5, 3]).varlen_empty
    assert hash(equal) != hash(unequal) and len({equal, unequal, problem_of([5, 9], [5, 9])}) == 2


def test_equal_lengths_make_the_alignment_canonical():
    """q length == k length in every sequence: top-left and bottom-right causal are one mask."""
    top = problem_of([5, 9], [5, 9], causal=True, causal_alignment="top_left")
    assert top == problem_of([5, 9], [5, 9], causal=True)
    assert problem_of([5, 9], [9, 5], causal=True, causal_alignment="top_left").causal_alignment == "top_left"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_on_h100_runs_on_triton_then_flash(causal, dtype):
    """Priority order: Triton's varlen beat the ragged FlashAttention-2 op in the forward on the
    H100 (tools/bench_varlen.py); cuDNN's ragged op is refused with the measurement."""
    decision = select(problem_of([97, 33, 255], [97, 33, 255], D=128, dtype=dtype, causal=causal, grad=True))
    assert decision.backend.name == "triton" and decision.source == "default"
    assert "torch-sdpa-flash" in decision.fallbacks and "torch-sdpa-flash" not in decision.rejected
    assert any("ragged op is not used" in r for r in decision.rejected["torch-sdpa-cudnn"])
    assert "ragged op is not used" in str(decision)
    assert "varlen" in BACKENDS["torch-sdpa-flash"].capabilities()["features"]
    assert "varlen" not in BACKENDS["torch-sdpa-cudnn"].capabilities()["features"]


def test_non_causal_unequal_lengths_are_taken_by_flash():
    problem = problem_of([97, 40, 130], [50, 200, 129])
    assert not BACKENDS["torch-sdpa-flash"].not_supported_reasons(problem, H100)


def test_ampere_keeps_triton_first_for_varlen():
    decision = select(problem_of([97, 33], [97, 33]), A100)
    assert decision.backend.name == "triton" and "torch-sdpa-flash" in decision.fallbacks


def test_bottom_right_causal_unequal_lengths_are_flash_own_alignment():
    decision = select(problem_of([40, 130], [100, 130], causal=True))
    assert decision.backend.name == "triton" and "torch-sdpa-flash" not in decision.rejected


def test_top_left_causal_unequal_lengths_refused_by_flash_with_the_reason():
    decision = select(problem_of([40, 100], [100, 130], causal=True, causal_alignment="top_left"))
    assert decision.backend.name == "triton"
    reason = "; ".join(decision.rejected["torch-sdpa-flash"])
    assert "q length != k length" in reason and "ragged causal mask is bottom_right" in reason
    assert "causal_alignment='top_left'" in reason and "ragged causal mask is bottom_right" in str(decision)


def test_bottom_right_causal_with_one_query_row_per_sequence_needs_no_mask():
    problem = problem_of([1, 1, 1], [7, 30, 12], causal=True)
    assert not BACKENDS["torch-sdpa-flash"].not_supported_reasons(problem, H100)
    assert not torch_sdpa._is_causal(problem)


@pytest.mark.parametrize("kw,backend,reason", [
    (dict(), "torch-sdpa-cudnn", "varlen (packed sequences with cu_seqlens) is not supported"),
    (dict(dtype=torch.float32), "torch-sdpa-flash", "dtype=float32"),
    (dict(window_size=(8, -1)), "torch-sdpa-flash", "sliding window"),
    (dict(softcap=2.0), "torch-sdpa-flash", "softcap"),
    (dict(alibi_slopes=torch.ones(4)), "torch-sdpa-flash", "alibi_slopes"),
    (dict(dropout_p=0.1), "torch-sdpa-flash", "dropout_p=0.1"),
    (dict(return_lse=True, grad=True), "torch-sdpa-flash", "gradient through the returned lse"),
    (dict(deterministic=True, grad=True), "torch-sdpa-flash", "deterministic=True"),
])
def test_varlen_refusals_name_the_limit(kw, backend, reason):
    decision = select(problem_of([33, 17], [33, 17], **kw))
    assert decision.backend.name == "triton"
    assert any(reason in r for r in decision.rejected[backend]), decision.rejected[backend]


def test_flash_takes_gqa_and_head_dim_256_varlen():
    for kw in (dict(Hkv=2), dict(D=256)):
        assert not BACKENDS["torch-sdpa-flash"].not_supported_reasons(problem_of([33, 17], [33, 17], **kw), H100)


def test_empty_sequences_are_refused_by_the_ragged_op():
    decision = select(problem_of([5, 0, 9], [5, 4, 9]))
    assert decision.backend.name == "triton"
    assert any("empty sequence" in r for r in decision.rejected["torch-sdpa-flash"])


def test_forced_sdpa_varlen_that_cannot_run_raises_with_the_reason(no_kernel_launch):
    import fa2dispatch

    q, k, v, _, cq, ck = packed([40, 100], [100, 130], H=4, Hkv=4, D=64, dtype=torch.float16)
    with pytest.raises(ValueError, match="ragged causal mask is bottom_right"):
        fa2dispatch.attention_varlen(q, k, v, cq, ck, 100, 130, causal=True, causal_alignment="top_left",
                                     backend="torch-sdpa-flash")
    with pytest.raises(ValueError, match="ragged op is not used"):
        fa2dispatch.attention_varlen(q, k, v, cq, ck, 100, 130, backend="torch-sdpa-cudnn")


def test_lse_forms_convert_to_ours_and_back():
    """(H, total_q) passes through; a padded (B, H, max_seqlen_q) lse is packed and unpacked."""
    from fa2dispatch.features import FeatureArgs

    cq = torch.tensor([0, 3, 3 + 7, 3 + 7 + 1], dtype=torch.int32)
    problem = problem_of([3, 7, 1], [3, 7, 1])
    feats = FeatureArgs(cu_seqlens_q=cq, cu_seqlens_k=cq)
    ours = torch.randn(4, 11)
    padded = torch.full((3, 4, 7), float("nan"))
    for b in range(3):
        padded[b, :, :cq[b + 1] - cq[b]] = ours[:, cq[b]:cq[b + 1]]
    for lse in (ours.clone(), padded):
        got = torch_sdpa._lse_to_varlen("flash", lse, problem, feats, 11)
        assert got.shape == (4, 11) and got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, ours)
        back = torch_sdpa._lse_from_varlen("flash", got, problem, feats)
        assert back.shape == lse.shape
        rows = ~torch.isnan(lse)
        assert torch.equal(back[rows], lse[rows])
    with pytest.raises(RuntimeError, match="unexpected varlen log-sum-exp shape"):
        torch_sdpa._lse_to_varlen("flash", torch.zeros(11, 4), problem, feats, 11)


# ------------------------------------------------------------------ GPU: numerics


CASES = [  # (lens_q, lens_k, kw): odd lengths, B > 1, unequal lengths
    ([97, 33, 255], [97, 33, 255], dict(causal=False)),
    ([97, 40, 130], [50, 200, 129], dict(causal=False)),
    ([97, 256, 31, 1], [97, 256, 31, 1], dict(causal=True)),
    ([97, 256, 31, 1], [97, 256, 31, 1], dict(causal=True, causal_alignment="top_left")),  # = bottom-right
    ([40, 130], [100, 130], dict(causal=True)),  # bottom-right, q length != k length
]


def _check_varlen(backend, lens_q, lens_k, kw, dtype, D, Hkv=4):
    import fa2dispatch

    q, k, v, dout, cq, ck = packed(lens_q, lens_k, H=4, Hkv=Hkv, D=D, dtype=dtype, seed=3)
    q, k, v = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    dout, cqd, ckd = dout.cuda(), cq.cuda(), ck.cuda()
    mq, mk = max(lens_q), max(lens_k)
    with torch.no_grad():
        _, lse = fa2dispatch.attention_varlen(q, k, v, cqd, ckd, mq, mk, return_lse=True, backend=backend, **kw)
    out = fa2dispatch.attention_varlen(q, k, v, cqd, ckd, mq, mk, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (4, sum(lens_q)) and lse.dtype == torch.float32
    grads = torch.autograd.grad(out, (q, k, v), dout)
    truth = per_sequence(q, k, v, dout, cq, ck, torch.float64, **kw)
    low = per_sequence(q, k, v, dout, cq, ck, dtype, **kw)
    magnitude = max_magnitude(truth[0], *truth[2:])
    check_close("out", out, truth[0], low[0], magnitude)
    check_close("lse", lse, truth[1], low[1].float())
    for name, ours, t, lp in zip(("dq", "dk", "dv"), grads, truth[2:], low[2:]):
        check_close(name, ours, t, lp, magnitude)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_flash_varlen_matches_the_reference(case, dtype, D):
    lens_q, lens_k, kw = case
    _check_varlen("torch-sdpa-flash", lens_q, lens_k, kw, dtype, D)


@pytest.mark.gpu
def test_flash_varlen_gqa_matches_the_reference():
    _check_varlen("torch-sdpa-flash", [97, 40], [50, 129], dict(causal=False), torch.float16, 128, Hkv=2)


@pytest.mark.gpu
def test_auto_varlen_runs_on_triton_and_refused_calls_compute_there():
    dispatch.clear_memo()
    lens_q, lens_k, kw = [40, 100], [100, 130], dict(causal=True, causal_alignment="top_left")
    q, k, v, _, cq, ck = (t.cuda() for t in packed(lens_q, lens_k, H=4, Hkv=4, D=128, dtype=torch.float16))
    decision = dispatch.select(make_varlen_problem(q, k, v, cq, ck, 100, 130, **kw))
    assert decision.backend.name == "triton", str(decision)
    assert any("ragged causal mask is bottom_right" in r for r in decision.rejected["torch-sdpa-flash"])
    assert any("ragged op is not used" in r for r in decision.rejected["torch-sdpa-cudnn"])
    _check_varlen("auto", lens_q, lens_k, kw, torch.float16, 128)


def test_dense_flash_refuses_top_left_causal_with_mq_ne_mkv():
    """The raw FlashAttention-2 op's causal diagonal is bottom-right (the GPU test below found
    top-left answers wrong by 2.96), so top-left with Mq != Mkv goes elsewhere, with the reason."""
    from fa2dispatch.problem import make_problem

    q = torch.randn(1, 64, 4, 64, dtype=torch.float16)
    k = v = torch.randn(1, 128, 4, 64, dtype=torch.float16)
    decision = select(make_problem(q, k, v, causal=True, causal_alignment="top_left"))
    assert decision.backend.name == "torch-sdpa-cudnn"
    assert any("causal_alignment='top_left'" in r for r in decision.rejected["torch-sdpa-flash"])


@pytest.mark.gpu
def test_dense_flash_top_left_causal_with_mq_ne_mkv():
    """Forced flash with top-left causal and Mq != Mkv: refused, or (should its capability ever
    claim it) right. Before the refusal it gave bottom-right answers (error 2.96, bound 6e-3)."""
    from helpers import Case, feature_math, make_inputs

    import fa2dispatch

    case = Case(1, 4, 4, 64, 128, 64, torch.float16, True)
    q, k, v, dout = make_inputs(case, "cuda")
    try:
        out = fa2dispatch.attention(q, k, v, causal=True, causal_alignment="top_left", backend="torch-sdpa-flash")
    except ValueError as exc:  # refused: nothing to check
        pytest.skip(str(exc))
    truth = feature_math(q, k, v, dout, case, torch.float64, dict(causal_alignment="top_left"))
    low = feature_math(q, k, v, dout, case, torch.float16, dict(causal_alignment="top_left"))
    check_close("out", out, truth[0], low[0])
