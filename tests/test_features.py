"""FlashAttention-2's features in the Triton kernels (CPU interpreter) against the float64
reference, forward and backward, under the STYLE.md tolerance rule; their validation; and how
dispatch treats them (capability data: other backends refuse with a reason)."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, check_feature_case, make_inputs

import fa2dispatch
from fa2dispatch import rng
from fa2dispatch.backends import BACKENDS
from fa2dispatch.hardware import simulated_device
from fa2dispatch.problem import make_problem

SLOPES4 = torch.tensor([0.5, 0.25, 0.125, 0.0625])

# (case, features): every feature alone and in combination, odd lengths, Mq != Mkv both ways,
# GQA, both layouts, the three dtypes (bf16 through the harness's interpreter fixes).
CASES = [
    (Case(1, 4, 2, 37, 53, 32, torch.float32, False), dict(window_size=(8, 4))),
    (Case(1, 4, 2, 53, 37, 32, torch.float16, True), dict(window_size=(6, -1))),
    (Case(2, 2, 2, 40, 40, 16, torch.float32, False, "bhsd"), dict(window_size=(-1, 0))),
    (Case(1, 2, 1, 33, 70, 24, torch.float32, False), dict(window_size=(0, 0))),  # a diagonal band of one key
    (Case(1, 4, 2, 37, 53, 32, torch.bfloat16, True), dict(softcap=2.5)),
    (Case(1, 4, 4, 29, 29, 64, torch.float32, False, "bhsd"), dict(softcap=0.7)),
    (Case(2, 4, 2, 37, 53, 32, torch.float16, False), dict(alibi_slopes=SLOPES4)),
    (Case(2, 4, 1, 53, 37, 32, torch.float32, True), dict(alibi_slopes=torch.rand(2, 4))),
    (Case(1, 4, 2, 37, 53, 32, torch.float32, True), dict(causal_alignment="top_left")),
    (Case(1, 2, 2, 53, 37, 40, torch.float16, True, "bhsd"), dict(causal_alignment="top_left")),
    (Case(1, 4, 2, 37, 53, 32, torch.float32, False), dict(dropout_p=0.2)),
    (Case(2, 2, 1, 33, 33, 16, torch.float16, True), dict(dropout_p=0.5)),
    (Case(1, 4, 2, 45, 61, 32, torch.float32, True),
     dict(window_size=(9, -1), softcap=3.0, alibi_slopes=SLOPES4, dropout_p=0.1)),
    (Case(1, 4, 2, 61, 45, 32, torch.bfloat16, True),
     dict(window_size=(5, -1), alibi_slopes=SLOPES4, causal_alignment="top_left")),
]


def _id(item) -> str:
    case, features = item
    return case.id + "-" + "-".join(f"{k}{'' if isinstance(v, torch.Tensor) else v}" for k, v in features.items())


@pytest.mark.interpreter
@pytest.mark.parametrize("item", CASES, ids=[_id(c) for c in CASES])
def test_feature_matches_reference(item):
    case, features = item
    check_feature_case(case, features)


@pytest.mark.interpreter
def test_window_that_masks_every_key_of_some_rows_gives_zero():
    """Rows whose window holds no key get out 0 and lse -inf, never NaN, and no NaN gradient.
    Bottom-right, Mq=40 > Mkv=8: shift = -32, row i sees keys [i - 34, i - 30], so rows 0..29
    see none."""
    case = Case(1, 2, 2, 40, 8, 16, torch.float32, False)
    q, k, v, dout = make_inputs(case)
    out, lse = fa2dispatch.attention(q, k, v, window_size=(2, 2), return_lse=True, backend="triton")
    empty = torch.isneginf(lse)
    assert empty[0, :, :30].all() and not empty[0, :, 30:].any()
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert not any(torch.isnan(g).any() for g in grads)
    check_feature_case(case, dict(window_size=(2, 2)))


@pytest.mark.interpreter
def test_dropout_is_reproducible_and_regenerated_in_backward():
    """The same seed gives the same output and gradients (generator= and torch.manual_seed);
    another seed gives another mask; the backward's mask is the forward's (checked against the
    reference built from the same draw in test_feature_matches_reference)."""
    case = Case(1, 2, 2, 24, 24, 16, torch.float32, True)
    q, k, v, dout = make_inputs(case)

    def run(**kw):
        out = fa2dispatch.attention(q, k, v, causal=True, dropout_p=0.3, backend="triton", **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    a = run(generator=torch.Generator().manual_seed(7))
    b = run(generator=torch.Generator().manual_seed(7))
    c = run(generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(11)
    d = run()
    torch.manual_seed(11)
    e = run()
    assert all(torch.equal(x, y) for x, y in zip(d, e))
    # the fraction of dropped weights is what was asked for (5 sigma over the visible pairs)
    seed, offset = rng.draw_seed(torch.Generator().manual_seed(7))
    keep = rng.attention_dropout_mask(seed, offset, 1, 2, 256, 256, 0.3)
    assert abs((~keep).float().mean().item() - 0.3) < 5 * (0.3 * 0.7 / keep.numel()) ** 0.5


@pytest.mark.interpreter
def test_deterministic_backward_is_bitwise_repeatable():
    case = Case(1, 4, 1, 45, 61, 32, torch.float32, True)
    q, k, v, dout = make_inputs(case)
    runs = []
    for _ in range(2):
        out = fa2dispatch.attention(q, k, v, causal=True, deterministic=True, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


# ------------------------------------------------------------------ validation and dispatch

BAD = [
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(window_size=(3,)), TypeError, "window_size"),
    (dict(window_size=(1.5, 2)), TypeError, "window_size"),
    (dict(window_size="wide"), TypeError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap="1"), TypeError, "softcap"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    (dict(dropout_p=True), TypeError, "dropout_p"),
    (dict(generator=123), TypeError, "generator"),
    (dict(causal_alignment="top"), ValueError, "causal_alignment"),
    (dict(deterministic=1), TypeError, "deterministic"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
@pytest.mark.parametrize("fn", ["attention", "explain"])
def test_bad_feature_arguments_name_the_argument(kwargs, exc, name, fn, no_kernel_launch):
    q = torch.randn(1, 8, 4, 16)
    k = v = torch.randn(1, 8, 2, 16)
    with pytest.raises(exc, match=name):
        getattr(fa2dispatch, fn)(q, k, v, **kwargs)


def test_window_normal_form():
    """A window that masks nothing is no window (other backends may take the call); with
    causal the right side is the causal bound; the alignment of a call it cannot change is
    bottom_right."""
    q, k = torch.randn(1, 16, 2, 16), torch.randn(1, 24, 2, 16)
    assert make_problem(q, k, k, window_size=(40, 40)).window == (-1, -1)
    assert make_problem(q, k, k, window_size=(3, 40)).window == (3, -1)
    assert make_problem(q, k, k, causal=True, window_size=(3, 5)).window == (3, -1)
    assert make_problem(q, k, k, causal_alignment="top_left").causal_alignment == "bottom_right"
    assert make_problem(q, k, k, causal=True, causal_alignment="top_left").causal_alignment == "top_left"
    assert make_problem(q, q, q, causal=True, causal_alignment="top_left").causal_alignment == "bottom_right"


@pytest.mark.parametrize("features,reason", [
    (dict(window_size=(4, 4)), "sliding window"),
    (dict(softcap=1.0), "softcap"),
    (dict(alibi_slopes=torch.ones(4)), "alibi"),
    (dict(dropout_p=0.1), "dropout"),
])
def test_other_backends_refuse_features_with_a_reason(features, reason):
    """On a simulated H100, cuDNN / flash / CuPy / fp8 refuse each feature by capability data,
    and the Triton backend takes the call."""
    q = torch.randn(1, 64, 4, 64, dtype=torch.float16)
    k = v = torch.randn(1, 64, 4, 64, dtype=torch.float16)
    problem = make_problem(q, k, v, **features)
    decision = fa2dispatch.dispatch.select(problem, device=simulated_device("h100"))
    assert decision.backend.name == "triton"
    for name in ("torch-sdpa-cudnn", "torch-sdpa-flash", "cupy"):
        assert any(reason in r for r in decision.rejected[name]), decision.rejected[name]
    assert BACKENDS["triton"].capabilities()["features"][:4] == ["window", "softcap", "alibi", "dropout"]


def test_top_left_causal_goes_to_sdpa_when_it_can():
    """SDPA's is_causal is top-left: with causal_alignment='top_left' and Mq != Mkv, SDPA's
    kernels can take the call (bottom-right they refuse)."""
    q = torch.randn(1, 64, 4, 64, dtype=torch.float16)
    k = v = torch.randn(1, 128, 4, 64, dtype=torch.float16)
    h100 = simulated_device("h100")
    bottom = fa2dispatch.dispatch.select(make_problem(q, k, v, causal=True), device=h100)
    top = fa2dispatch.dispatch.select(make_problem(q, k, v, causal=True, causal_alignment="top_left"), device=h100)
    assert "torch-sdpa-cudnn" in bottom.rejected and "torch-sdpa-cudnn" not in top.rejected


def test_features_under_torch_compile_match_eager(monkeypatch):
    """window, softcap, ALiBi and the alignment reach the custom op (fullgraph, with autograd);
    dropout under torch.compile is refused with the reason."""
    case = Case(1, 4, 2, 24, 40, 16, torch.float32, True)
    q, k, v, dout = make_inputs(case)
    kw = dict(causal=True, window_size=(6, -1), softcap=2.0, alibi_slopes=SLOPES4, causal_alignment="top_left")

    def fn(q, k, v):
        return fa2dispatch.attention(q, k, v, **kw)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = fn(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    plain = fa2dispatch.attention(q, k, v, causal=True)
    assert not torch.allclose(out, plain)  # the features were not dropped on the way
    # the refusal itself, as the traced code meets it (under fullgraph dynamo re-raises it as Unsupported)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(NotImplementedError, match="dropout"):
        fa2dispatch.attention(q, k, v, dropout_p=0.1)


def test_hopper_forward_is_the_default_for_plain_calls_only():
    """On sm_90 the sm_90 forwards are the default for plain fp16/bf16 calls with D <= 128: the
    Gluon kernels at D 64 and 128 (ping-pong at D=128), the Hopper kernel (tensor descriptors, register cap) at the
    other head dims; feature calls, D > 128 and float32 keep the plain kernel, which has every
    feature."""
    h100, a100 = simulated_device("h100"), simulated_device("a100")
    triton = BACKENDS["triton"]

    def config(device, dtype=torch.float16, D=128, **features):
        q = torch.empty(1, 4096, 8, D, dtype=dtype, device="meta")
        return triton.default_config(make_problem(q, q, q, causal=True, **features), device)

    assert config(h100).fwd_kernel == "gluon-pp" and config(h100, torch.bfloat16, 64).fwd_kernel == "gluon"
    assert config(h100, D=96).fwd_kernel == "hopper" and config(h100, D=96).fwd_maxnreg == 128
    assert config(h100, window_size=(256, -1)).fwd_kernel == ""
    assert config(h100, softcap=5.0).fwd_kernel == ""
    assert config(h100, D=256).fwd_kernel == "" and config(h100, torch.float32).fwd_kernel == ""
    assert config(a100).fwd_kernel == ""
