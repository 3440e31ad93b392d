"""attention_varlen: packed sequences through the Triton kernels (interpreter) against the
float64 reference run per sequence; its validation; lse layout (H, total_q)."""

from __future__ import annotations

import pytest
import torch
from helpers import check_close, max_magnitude

import fa2dispatch
from fa2dispatch import rng
from fa2dispatch.backends.reference import attention_math


def packed(lens_q, lens_k, H=4, Hkv=2, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), H, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(sum(lens_k), Hkv, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), Hkv, D, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(sum(lens_q), H, D, generator=g).to(dtype)
    return q, k, v, dout, cq, ck


def per_sequence(q, k, v, dout, cq, ck, compute_dtype, keep=None, **kw):
    """Ground truth: attention_math on each sequence alone (the reference's own varlen loop is
    what the backend uses; this test rebuilds it independently from dense calls)."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    outs, lses = [], []
    slopes = kw.pop("alibi_slopes", None)
    for b in range(len(cq) - 1):
        qs, ks, vs = (t[c[b]:c[b + 1]][None] for t, c in zip(leaves, (cq, ck, ck)))
        if qs.shape[1] == 0:
            continue
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b:b + 1])
        o, lse = attention_math(qs, ks, vs, softmax_scale=q.shape[-1] ** -0.5, compute_dtype=compute_dtype,
                                alibi_slopes=sl,
                                dropout_keep=None if keep is None else keep[b:b + 1, :, :qs.shape[1], :ks.shape[1]],
                                **kw)
        outs.append(o[0])
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, 1)
    grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype))
    return (out, lse, *grads)


VARIANTS = [
    dict(lens_q=[5, 17, 0, 33, 9], lens_k=[7, 17, 4, 20, 40], kw=dict(causal=True)),
    dict(lens_q=[31, 1, 40], lens_k=[31, 64, 12], kw=dict(causal=False)),
    dict(lens_q=[23, 48], lens_k=[50, 30], kw=dict(causal=True, window_size=(6, -1), softcap=2.0,
                                                     alibi_slopes=torch.tensor([0.3, 0.2, 0.1, 0.05]))),
    dict(lens_q=[20, 44], lens_k=[44, 20], kw=dict(causal=True, causal_alignment="top_left", dropout_p=0.25)),
    dict(lens_q=[19, 37], lens_k=[19, 37], kw=dict(causal=False, window_size=(3, 5)), dtype=torch.float16),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", VARIANTS, ids=[f"v{i}" for i in range(len(VARIANTS))])
def test_varlen_matches_per_sequence_reference(variant):
    dtype = variant.get("dtype", torch.float32)
    q, k, v, dout, cq, ck = packed(variant["lens_q"], variant["lens_k"], dtype=dtype)
    kw = dict(variant["kw"])
    keep = None
    mq, mk = max(variant["lens_q"]), max(variant["lens_k"])
    if kw.get("dropout_p"):
        kw["generator"] = torch.Generator().manual_seed(5)
        seed, offset = rng.draw_seed(torch.Generator().manual_seed(5))
        keep = rng.attention_dropout_mask(seed, offset, len(cq) - 1, q.shape[1], mq, mk, kw["dropout_p"])
    out, lse = fa2dispatch.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True, backend="triton", **kw)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    grads = torch.autograd.grad(out, (q, k, v), dout)
    kw.pop("generator", None)
    if "window_size" in kw:
        kw["window"] = kw.pop("window_size")
    truth = per_sequence(q, k, v, dout, cq, ck, torch.float64, keep, **dict(kw))
    low = per_sequence(q, k, v, dout, cq, ck, dtype, keep, **dict(kw))
    magnitude = max_magnitude(truth[0], *truth[2:])
    check_close("out", out, truth[0], low[0], magnitude)
    finite = ~torch.isneginf(truth[1])
    assert torch.equal(torch.isneginf(lse), ~finite)
    check_close("lse", lse[finite], truth[1][finite], low[1].float()[finite])
    for name, ours, t, lp in zip(("dq", "dk", "dv"), grads, truth[2:], low[2:]):
        check_close(name, ours, t, lp, magnitude)


def test_varlen_on_the_reference_matches_dense_calls():
    """Equal lengths: varlen gives what attention gives on the (B, M, H, D) batch."""
    q, k, v, dout, cq, ck = packed([16, 16, 16], [24, 24, 24])
    out = fa2dispatch.attention_varlen(q, k, v, cq, ck, 16, 24, causal=True, backend="reference")
    dense = fa2dispatch.attention(q.reshape(3, 16, 4, 32), k.reshape(3, 24, 2, 32), v.reshape(3, 24, 2, 32),
                                  causal=True, backend="reference")
    assert torch.allclose(out, dense.reshape(48, 4, 32), atol=1e-6, rtol=0)


def _args():
    q, k, v, _, cq, ck = packed([5, 7], [6, 8])
    return dict(q=q.detach(), k=k.detach(), v=v.detach(), cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=7,
                max_seqlen_k=8)


BAD = [
    (dict(cu_seqlens_q=torch.tensor([0, 5, 12])), TypeError, "cu_seqlens_q"),  # int64
    (dict(cu_seqlens_q=torch.tensor([0, 7, 5, 12], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([1, 5, 12], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 11], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_k=torch.tensor([0, 14], dtype=torch.int32)), ValueError, "cu_seqlens"),
    (dict(cu_seqlens_k=torch.tensor([[0, 6, 14]], dtype=torch.int32)), ValueError, "cu_seqlens_k"),
    (dict(cu_seqlens_k=[0, 6, 14]), TypeError, "cu_seqlens_k"),
    (dict(max_seqlen_q=6), ValueError, "max_seqlen_q"),
    (dict(max_seqlen_k=0), ValueError, "max_seqlen_k"),
    (dict(max_seqlen_k=8.0), TypeError, "max_seqlen_k"),
    (dict(q=torch.randn(1, 12, 4, 32)), ValueError, "q"),
    (dict(k=torch.randn(14, 3, 32), v=torch.randn(14, 3, 32)), ValueError, "heads"),
    (dict(v=torch.randn(14, 2, 16)), ValueError, "k and v"),
    (dict(q=torch.randn(12, 4, 32, dtype=torch.float16)), TypeError, "dtype"),
]


@pytest.mark.parametrize("change,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_varlen_calls_name_the_argument(change, exc, name, no_kernel_launch):
    args = _args()
    args.update(change)
    with pytest.raises(exc, match=name):
        fa2dispatch.attention_varlen(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_varlen_features_are_validated(no_kernel_launch):
    args = _args()
    with pytest.raises(ValueError, match="alibi_slopes"):
        fa2dispatch.attention_varlen(args.pop("q"), args.pop("k"), args.pop("v"), **args,
                                     alibi_slopes=torch.ones(3, 4))


def test_validated_cu_seqlens_are_checked_again_after_an_in_place_change(no_kernel_launch):
    """The per-tensor validation memo (one host sync per cu_seqlens tensor, not per call) must
    not hide a modification."""
    args = _args()
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(AssertionError, match="kernel launched"):  # valid: validated, then reaches a backend
        fa2dispatch.attention_varlen(q, k, v, **args)
    args["cu_seqlens_q"][1] = 13  # now decreasing
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        fa2dispatch.attention_varlen(q, k, v, **args)


# ------------------------------------------------------------------ uniform packs run as dense


def _uniform(B=3, S=17, Sk=None, H=4, Hkv=2, D=32, dtype=torch.float32):
    Sk = Sk or S
    return packed([S] * B, [Sk] * B, H, Hkv, D, dtype)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False, window_size=(3, 5), softcap=2.0),
                                dict(causal=True, causal_alignment="top_left",
                                     alibi_slopes=torch.tensor([0.3, 0.2, 0.1, 0.05]))],
                         ids=["causal", "window-softcap", "top-left-alibi"])
def test_uniform_pack_runs_as_the_dense_call(kw):
    """Under "auto" a pack whose sequences share one q length and one k length is the dense
    (B, S, H, D) call on views of the same memory: out, lse (in the varlen shape) and gradients
    are bit for bit those of fa2dispatch.attention on the views."""
    B, S, Sk, H = 3, 17, 23, 4
    q, k, v, dout, cq, ck = _uniform(B, S, Sk)
    out, lse = fa2dispatch.attention_varlen(q, k, v, cq, ck, S, Sk, return_lse=True, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    views = [t.detach().view(B, t.shape[0] // B, *t.shape[1:]).requires_grad_() for t in (q, k, v)]
    d_out, d_lse = fa2dispatch.attention(*views, return_lse=True, **kw)
    d_grads = torch.autograd.grad(d_out, views, dout.view(B, S, H, -1))
    assert lse.shape == (H, B * S)
    assert torch.equal(out, d_out.reshape(B * S, H, -1))
    assert torch.equal(lse, d_lse.permute(1, 0, 2).reshape(H, B * S))
    for g, d in zip(grads, d_grads):
        assert torch.equal(g, d.reshape(g.shape))


def test_which_packs_run_as_dense(monkeypatch):
    """Uniform packs under "auto" take the dense call; unequal lengths, an empty sequence, a
    forced backend, and dropout with max_seqlen above the lengths (its counters index
    (B, H, max_seqlen_q, max_seqlen_k)) keep the packed kernels."""
    from fa2dispatch import varlen

    calls = []
    real = varlen._as_dense
    monkeypatch.setattr(varlen, "_as_dense", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def runs_dense(lens_q, lens_k, mq=None, mk=None, **kw):
        calls.clear()
        q, k, v, _, cq, ck = packed(lens_q, lens_k)
        fa2dispatch.attention_varlen(q, k, v, cq, ck, mq or max(lens_q), mk or max(lens_k), **kw)
        return bool(calls)

    assert runs_dense([9, 9, 9], [5, 5, 5])
    assert not runs_dense([9, 8, 9], [5, 5, 5])
    assert not runs_dense([9, 9], [0, 0], mk=1)
    assert not runs_dense([9, 9], [5, 5], backend="reference")
    assert runs_dense([9, 9], [5, 5], dropout_p=0.2, generator=torch.Generator().manual_seed(1))
    assert not runs_dense([9, 9], [5, 5], mq=16, dropout_p=0.2, generator=torch.Generator().manual_seed(1))
    assert runs_dense([9, 9], [5, 5], mq=16)  # without dropout an upper bound changes nothing


def test_uniform_pack_with_dropout_draws_the_packed_mask():
    """Dropout through the dense route gives what the packed kernels give: the counters of a
    uniform pack with exact max_seqlen are the dense call's."""
    B, S = 2, 13
    q, k, v, dout, cq, ck = _uniform(B, S)
    kw = dict(causal=True, dropout_p=0.3)
    dense = fa2dispatch.attention_varlen(q, k, v, cq, ck, S, S, generator=torch.Generator().manual_seed(7), **kw)
    pack = fa2dispatch.attention_varlen(q, k, v, cq, ck, S, S, generator=torch.Generator().manual_seed(7),
                                        backend="reference", **kw)
    assert torch.equal(dense, pack)


@pytest.mark.gpu
def test_uniform_pack_runs_as_the_dense_call_on_gpu():
    """On the GPU the uniform pack gets the dense call's kernel (cuDNN or the Hopper forward on
    an H100): out and lse bit for bit those of the dense call on the views."""
    B, S, H = 4, 1024, 16
    q, k, v, _, cq, ck = (t.cuda() for t in _uniform(B, S, H=H, Hkv=H, D=128, dtype=torch.float16))
    with torch.no_grad():
        out, lse = fa2dispatch.attention_varlen(q, k, v, cq, ck, S, S, causal=True, return_lse=True)
        views = [t.view(B, S, *t.shape[1:]) for t in (q, k, v)]
        d_out, d_lse = fa2dispatch.attention(*views, causal=True, return_lse=True)
    assert torch.equal(out, d_out.reshape(B * S, H, -1))
    assert torch.equal(lse, d_lse.permute(1, 0, 2).reshape(H, B * S))


def test_explain_varlen_says_how_the_call_runs(no_kernel_launch):
    """explain_varlen: a uniform pack under auto is the dense call's decision, with a note; an
    unequal pack (or a forced backend) is the packed problem's decision. Nothing launches."""
    q, k, v, _, cq, ck = _uniform(3, 17, 23)
    dense = fa2dispatch.explain_varlen(q, k, v, cq, ck, 17, 23, causal=True)
    assert dense.problem.layout == "bshd" and (dense.problem.B, dense.problem.Mq, dense.problem.Mkv) == (3, 17, 23)
    assert "3 sequences of 17 queries and 23 keys each" in str(dense) and "note" in str(dense)
    views = [t.detach().view(3, t.shape[0] // 3, *t.shape[1:]) for t in (q, k, v)]
    same = fa2dispatch.explain(*views, causal=True)
    assert (dense.backend.name, dense.config) == (same.backend.name, same.config)
    packed_call = fa2dispatch.explain_varlen(q, k, v, cq, ck, 17, 23, causal=True, backend="reference")
    assert packed_call.problem.varlen and packed_call.note is None
    q, k, v, _, cq, ck = packed([5, 9], [7, 7])
    ragged = fa2dispatch.explain_varlen(q, k, v, cq, ck, 9, 7)
    assert ragged.problem.varlen and ragged.problem.layout == "thd" and ragged.note is None
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        fa2dispatch.explain_varlen(q, k, v, torch.tensor([0, 9, 5], dtype=torch.int32), ck, 9, 7)
