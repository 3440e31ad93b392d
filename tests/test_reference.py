"""The reference is right: ``attention_math`` (the single ground truth of every other test)
against PyTorch's own SDPA math and an explicit per-row softmax in float64, and the
``reference`` backend through the public API against ``attention_math``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, make_inputs
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa2dispatch
from fa2dispatch.backends.reference import attention_math

F64 = torch.float64


def _grads(outputs, inputs, cotangents, retain_graph=False):
    return torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain_graph)


def _kv_index(H: int, Hkv: int) -> torch.Tensor:
    """The key/value head each query head reads: h // (H // Hkv)."""
    return torch.arange(H) // (H // Hkv)


def _scores(q, k, scale, causal):
    """Scaled (B, H, Mq, Mkv) scores in bhsd, bottom-right causal mask, float64."""
    k = k[:, _kv_index(q.shape[1], k.shape[1])]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if causal:
        Mq, Mkv = q.shape[2], k.shape[2]
        visible = torch.tensor([[j <= i + Mkv - Mq for j in range(Mkv)] for i in range(Mq)])
        s = s.masked_fill(~visible, float("-inf"))
    return s


def _loop_attention(q, k, v, scale, causal):
    """Attention one query row at a time in Python floats (float64), bhsd."""
    B, H, Mq, D = q.shape
    Hkv, Mkv = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, Mq, D, dtype=F64)
    lse = torch.full((B, H, Mq), float("-inf"), dtype=F64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(Mq):
                last = i + Mkv - Mq if causal else Mkv - 1  # bottom-right: key j visible iff j <= i + Mkv - Mq
                if last < 0:
                    continue
                s = [scale * float(q[b, h, i] @ k[b, kv, j]) for j in range(last + 1)]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                z = sum(w)
                lse[b, h, i] = m + math.log(z)
                out[b, h, i] = sum(wj / z * v[b, kv, j] for j, wj in enumerate(w))
    return out, lse


# (B, H, Hkv, Mq, Mkv, D): MHA, GQA, MQA, odd lengths and head dims.
SQUARE = [(2, 3, 3, 17, 17, 8), (1, 4, 2, 33, 33, 24), (2, 6, 1, 9, 9, 40), (1, 8, 4, 1, 1, 16)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SQUARE, ids=lambda s: "B{}H{}Hkv{}-M{}-d{}".format(*s[:4], s[5]))
def test_matches_sdpa_math_float64(shape, causal):
    """Mq == Mkv (where SDPA's top-left causal mask is also bottom-right); GQA via enable_gqa."""
    B, H, Hkv, M, _, D = shape
    case = Case(B, H, Hkv, M, M, D, F64, causal, layout="bhsd")
    q, k, v, dout = make_inputs(case, seed=1)
    scale = 0.7 * D**-0.5
    out, _ = attention_math(q, k, v, causal=causal, softmax_scale=scale, layout="bhsd", compute_dtype=F64)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=Hkv != H)
    assert out.dtype == F64 and out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    for name, g, e in zip("qkv", _grads(out, (q, k, v), dout), _grads(expected, (q, k, v), dout)):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_reads_kv_head_h_over_group(causal):
    """Query head h reads key/value head h // (H // Hkv): same as MHA on explicitly gathered heads."""
    case = Case(2, 6, 2, 11, 13, 16, F64, causal, layout="bhsd")
    q, k, v, _ = make_inputs(case, seed=2, requires_grad=False)
    idx = _kv_index(case.H, case.Hkv)
    assert idx.tolist() == [0, 0, 0, 1, 1, 1]
    gqa = attention_math(q, k, v, causal=causal, softmax_scale=0.25, layout="bhsd", compute_dtype=F64)
    mha = attention_math(q, k[:, idx], v[:, idx], causal=causal, softmax_scale=0.25, layout="bhsd", compute_dtype=F64)
    for a, b in zip(gqa, mha):
        torch.testing.assert_close(a, b)


# (H, Hkv, Mq, Mkv): Mq < Mkv, Mq > Mkv (leading rows see no key), single query, single key.
RAGGED = [(2, 2, 5, 9), (4, 2, 9, 5), (2, 1, 1, 7), (2, 2, 7, 1), (2, 1, 6, 6)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", RAGGED, ids=lambda s: "H{}Hkv{}-q{}k{}".format(*s))
def test_matches_per_row_loop_float64(shape, causal):
    """Causal is bottom-right aligned when Mq != Mkv: query i sees key j iff j <= i + Mkv - Mq."""
    H, Hkv, Mq, Mkv = shape
    case = Case(2, H, Hkv, Mq, Mkv, 8, F64, causal, layout="bhsd")
    q, k, v, _ = make_inputs(case, seed=3, requires_grad=False)
    out, lse = attention_math(q, k, v, causal=causal, softmax_scale=0.4, layout="bhsd", compute_dtype=F64)
    expected_out, expected_lse = _loop_attention(q, k, v, 0.4, causal)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)


def test_rows_without_visible_key_give_zero_and_finite_gradients():
    """Causal, Mq=7 > Mkv=3: query rows 0..3 see no key (i + Mkv - Mq < 0)."""
    case = Case(1, 4, 2, 7, 3, 8, F64, causal=True, layout="bshd")
    q, k, v, dout = make_inputs(case, seed=4)
    out, lse = attention_math(q, k, v, causal=True, softmax_scale=0.5, layout="bshd", compute_dtype=F64)
    empty = slice(0, 4)
    assert torch.all(out[:, empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, empty]))
    assert torch.isfinite(lse[:, :, 4:]).all() and torch.isfinite(out).all()
    assert (out[:, 4:] != 0).any()
    # a loss through both out and lse, with nonzero cotangents on the empty rows too
    dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    dq, dk, dv = _grads((out, lse), (q, k, v), (dout, dlse))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(g).any(), f"{name} has NaN"
        assert torch.isfinite(g).all(), f"{name} is not finite"
    assert torch.all(dq[:, empty] == 0), "a query that sees no key has no gradient"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(4, 4, 13, 13), (6, 2, 13, 21), (4, 1, 21, 13)],
                         ids=lambda s: "H{}Hkv{}-q{}k{}".format(*s))
def test_lse_is_logsumexp_of_scaled_scores(shape, causal):
    H, Hkv, Mq, Mkv = shape
    case = Case(2, H, Hkv, Mq, Mkv, 24, F64, causal, layout="bhsd")
    q, k, v, _ = make_inputs(case, seed=6, requires_grad=False)
    scale = 0.3
    _, lse = attention_math(q, k, v, causal=causal, softmax_scale=scale, layout="bhsd", compute_dtype=F64)
    expected = torch.logsumexp(_scores(q, k, scale, causal), dim=-1)
    assert lse.shape == (case.B, H, Mq) and lse.dtype == F64
    torch.testing.assert_close(lse, expected)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layouts_agree(causal, dtype):
    """bshd inputs and their (1, 2) transposes in bhsd give the same out (transposed) and lse."""
    case = Case(2, 4, 2, 19, 11, 32, dtype, causal, layout="bshd")
    q, k, v, _ = make_inputs(case, seed=7, requires_grad=False)
    kw = dict(causal=causal, softmax_scale=0.2, compute_dtype=dtype)
    out_s, lse_s = attention_math(q, k, v, layout="bshd", **kw)
    out_h, lse_h = attention_math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bhsd", **kw)
    assert out_s.shape == q.shape and out_h.shape == q.transpose(1, 2).shape
    torch.testing.assert_close(out_s, out_h.transpose(1, 2))
    torch.testing.assert_close(lse_s, lse_h)


# ------------------------------------------------------------------ the reference backend

BACKEND_CASES = [
    Case(2, 4, 4, 17, 17, 32, torch.float32, causal=False, layout="bshd"),
    Case(2, 4, 4, 17, 17, 32, torch.float32, causal=True, layout="bhsd"),
    Case(1, 6, 2, 13, 29, 24, torch.float32, causal=True, layout="bshd"),
    Case(1, 4, 1, 29, 13, 40, torch.float32, causal=True, layout="bhsd"),  # 16 rows see no key
    Case(2, 4, 2, 9, 21, 16, torch.float32, causal=False, layout="bhsd", contiguous=False),
]


def _math_f32(q, k, v, case, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_math(*leaves, causal=case.causal, softmax_scale=scale, layout=case.layout)
    return leaves, out, lse


@pytest.mark.parametrize("case", BACKEND_CASES, ids=[c.id for c in BACKEND_CASES])
def test_reference_backend_matches_attention_math(case):
    q, k, v, dout = make_inputs(case, seed=8)
    scale = 0.9 * case.D**-0.5
    dlse = torch.randn(case.B, case.H, case.Mq, generator=torch.Generator().manual_seed(9))
    leaves, out_m, lse_m = _math_f32(q, k, v, case, scale)

    out, lse = fa2dispatch.attention(q, k, v, causal=case.causal, softmax_scale=scale, layout=case.layout,
                                     return_lse=True, backend="reference")
    torch.testing.assert_close(out, out_m)
    torch.testing.assert_close(lse, lse_m)

    # gradients of out alone, then of out and lse together (return_lse=True makes lse differentiable)
    for outputs, expected_outputs, cotangents in (((out,), (out_m,), (dout,)),
                                                  ((out, lse), (out_m, lse_m), (dout, dlse))):
        got = _grads(outputs, (q, k, v), cotangents, retain_graph=True)
        expected = _grads(expected_outputs, leaves, cotangents, retain_graph=True)
        for name, g, e in zip("qkv", got, expected):
            assert torch.isfinite(g).all(), f"d{name} not finite"
            torch.testing.assert_close(g, e, msg=lambda m, name=name: f"d{name}: {m}")


def test_reference_backend_default_scale_is_inverse_sqrt_d():
    case = Case(1, 2, 2, 8, 8, 16, torch.float32, causal=False)
    q, k, v, _ = make_inputs(case, seed=10, requires_grad=False)
    out = fa2dispatch.attention(q, k, v, backend="reference")
    expected, _ = attention_math(q, k, v, causal=False, softmax_scale=0.25)
    torch.testing.assert_close(out, expected)
    other, _ = attention_math(q, k, v, causal=False, softmax_scale=0.5)
    assert not torch.allclose(out, other)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["float16", "bfloat16", "float32"])
def test_reference_backend_returns_documented_dtypes_and_shapes(dtype, layout):
    """out shaped and laid out like q, in q's dtype; lse (B, H, Mq) float32; grads like inputs."""
    case = Case(2, 4, 2, 6, 10, 16, dtype, causal=True, layout=layout)
    q, k, v, dout = make_inputs(case, seed=11)
    out, lse = fa2dispatch.attention(q, k, v, causal=True, layout=layout, return_lse=True, backend="reference")
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert lse.shape == (case.B, case.H, case.Mq) and lse.dtype == torch.float32
    plain = fa2dispatch.attention(q, k, v, causal=True, layout=layout, backend="reference")
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)
    # computed in float32, rounded once to the input dtype
    expected_out, expected_lse = attention_math(q.detach(), k.detach(), v.detach(), causal=True,
                                                softmax_scale=case.D**-0.5, layout=layout)
    torch.testing.assert_close(out, expected_out.to(dtype))
    torch.testing.assert_close(lse, expected_lse)
    for t, g in zip((q, k, v), _grads(out, (q, k, v), dout)):
        assert g.shape == t.shape and g.dtype == dtype and torch.isfinite(g).all()
