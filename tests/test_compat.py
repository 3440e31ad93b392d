"""fa2dispatch.compat: flash-attn 2.x's functions and PyTorch's scaled_dot_product_attention.

On CPU the dispatcher picks the reference backend (float32). The flash_attn_* functions are
checked against the same call through fa2dispatch's own API (bit for bit: same backend, same
problem), against flash-attn's conventions written out independently (bottom-right causal,
lse shapes), and their signatures against flash-attn 2.7's. scaled_dot_product_attention is
checked against PyTorch's own function under STYLE.md's rule (float64 PyTorch is the truth,
float32 PyTorch's error the scale).
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import check_close

import fa2dispatch
from fa2dispatch import compat
from fa2dispatch.backends import BACKENDS
from fa2dispatch.backends.reference import attention_math

# the S_dmask note is checked once, in test_return_attn_probs_warns_once_and_gives_lse
pytestmark = pytest.mark.filterwarnings("ignore:fa2dispatch.compat. return_attn_probs")

HAS_VARLEN = hasattr(fa2dispatch, "attention_varlen")
HAS_KVCACHE = importlib.util.find_spec("fa2dispatch.kvcache") is not None
needs_varlen = pytest.mark.skipif(not HAS_VARLEN, reason="fa2dispatch.attention_varlen is not in this build yet")
needs_kvcache = pytest.mark.skipif(not HAS_KVCACHE, reason="fa2dispatch.kvcache is not in this build yet")


def randn(*shape, seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)


def qkv(B=2, Mq=7, Mkv=11, H=4, Hkv=2, D=16, layout="bshd", requires_grad=False, seed=0):
    def make(m, h, s):
        shape = (B, m, h, D) if layout == "bshd" else (B, h, m, D)
        return randn(*shape, seed=seed + s, requires_grad=requires_grad)

    return make(Mq, H, 0), make(Mkv, Hkv, 1), make(Mkv, Hkv, 2)


# ------------------------------------------------------------------ signatures

FLASH_ATTN_27 = {  # flash-attn 2.7's flash_attn_interface.py: names and defaults, in order
    "flash_attn_func": "q k v dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                       "alibi_slopes=None deterministic=False return_attn_probs=False",
    "flash_attn_qkvpacked_func": "qkv dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) "
                                 "softcap=0.0 alibi_slopes=None deterministic=False return_attn_probs=False",
    "flash_attn_kvpacked_func": "q kv dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) "
                                "softcap=0.0 alibi_slopes=None deterministic=False return_attn_probs=False",
    "flash_attn_varlen_func": "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p=0.0 "
                              "softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 alibi_slopes=None "
                              "deterministic=False return_attn_probs=False block_table=None",
    "flash_attn_varlen_qkvpacked_func": "qkv cu_seqlens max_seqlen dropout_p=0.0 softmax_scale=None causal=False "
                                        "window_size=(-1, -1) softcap=0.0 alibi_slopes=None deterministic=False "
                                        "return_attn_probs=False",
    "flash_attn_varlen_kvpacked_func": "q kv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p=0.0 "
                                       "softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                                       "alibi_slopes=None deterministic=False return_attn_probs=False",
    "flash_attn_with_kvcache": "q k_cache v_cache k=None v=None rotary_cos=None rotary_sin=None cache_seqlens=None "
                               "cache_batch_idx=None cache_leftpad=None block_table=None softmax_scale=None "
                               "causal=False window_size=(-1, -1) softcap=0.0 rotary_interleaved=True "
                               "alibi_slopes=None num_splits=0 return_softmax_lse=False",
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_27))
def test_signature_is_flash_attn_27(name):
    params = inspect.signature(getattr(compat, name)).parameters.values()
    got = " ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params)
    assert got == FLASH_ATTN_27[name]


def test_sdpa_signature_is_pytorchs():
    ours = inspect.signature(compat.scaled_dot_product_attention).parameters
    theirs = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    assert list(ours) == theirs
    assert [ours[n].default for n in theirs[3:]] == [None, 0.0, False, None, False]


# ------------------------------------------------------------------ flash_attn_func and packed forms


def test_flash_attn_func_positional_order_matches_attention():
    """Every argument by position, each with a value that changes the result: a swapped pair
    would not reproduce the keyword call through fa2dispatch.attention."""
    q, k, v = qkv()
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out, lse, s = compat.flash_attn_func(q, k, v, 0.0, 0.3, True, (3, -1), 1.5, slopes, False, True)
    ref, ref_lse = fa2dispatch.attention(q, k, v, causal=True, softmax_scale=0.3, window_size=(3, -1), softcap=1.5,
                                         alibi_slopes=slopes, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse) and s is None
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32  # flash-attn: (B, H, Mq)


def test_flash_attn_func_is_bottom_right_causal():
    """flash-attn's docstring example, written out: Mq=2, Mkv=5 keeps [[1 1 1 1 0], [1 1 1 1 1]];
    truth from PyTorch's SDPA in float64 with that explicit mask."""
    q, k, v = qkv(Mq=2, Mkv=5)
    keep = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = compat.flash_attn_func(q, k, v, causal=True)

    def sdpa(dtype):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)), attn_mask=keep,
                                              enable_gqa=True).transpose(1, 2)

    check_close("out", out, sdpa(torch.float64), sdpa(torch.float32))


def test_return_attn_probs_warns_once_and_gives_lse(monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())
    q, k, v = qkv(requires_grad=True)
    with pytest.warns(UserWarning, match="S_dmask is None"):
        out, lse, s_dmask = compat.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert s_dmask is None
    truth = attention_math(q.detach(), k.detach(), v.detach(), causal=True, softmax_scale=16 ** -0.5,
                           compute_dtype=torch.float64)[1]
    low = attention_math(q.detach(), k.detach(), v.detach(), causal=True, softmax_scale=16 ** -0.5)[1]
    check_close("lse", lse, truth, low)
    (out.sum() + lse.sum()).backward()  # the lse is differentiable, as flash-attn's
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call stays quiet
        compat.flash_attn_func(q, k, v, return_attn_probs=True)


def test_qkvpacked_matches_unpacked_with_gradients():
    qkv_ = randn(2, 9, 3, 4, 16, requires_grad=True)
    out = compat.flash_attn_qkvpacked_func(qkv_, 0.0, None, True)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv_.unbind(2))
    ref = fa2dispatch.attention(q, k, v, causal=True)
    assert torch.equal(out, ref)
    dout = randn(*out.shape, seed=5)
    out.backward(dout)
    ref.backward(dout)
    assert torch.equal(qkv_.grad, torch.stack([q.grad, k.grad, v.grad], dim=2))


def test_kvpacked_matches_unpacked():
    q, kv = randn(2, 5, 4, 16), randn(2, 8, 2, 2, 16, seed=1)
    out, lse, _ = compat.flash_attn_kvpacked_func(q, kv, causal=True, softcap=2.0, return_attn_probs=True)
    ref, ref_lse = fa2dispatch.attention(q, kv[:, :, 0], kv[:, :, 1], causal=True, softcap=2.0, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_packed_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"qkv .*\(B, M, 3, H, D\)"):
        compat.flash_attn_qkvpacked_func(randn(2, 9, 2, 4, 16))
    with pytest.raises(ValueError, match=r"kv .*\(B, Mkv, 2, Hkv, D\)"):
        compat.flash_attn_kvpacked_func(randn(2, 5, 4, 16), randn(2, 8, 2, 16))


def test_dropout_repeatable_under_manual_seed():
    q, k, v = qkv()
    torch.manual_seed(7)
    a = compat.flash_attn_func(q, k, v, 0.3)
    torch.manual_seed(7)
    b = compat.flash_attn_func(q, k, v, 0.3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, compat.flash_attn_func(q, k, v))


# ------------------------------------------------------------------ varlen


def varlen_inputs(lens_q=(3, 6, 1), lens_k=(5, 6, 4), H=4, Hkv=2, D=16):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = randn(int(cu_q[-1]), H, D)
    k, v = randn(int(cu_k[-1]), Hkv, D, seed=1), randn(int(cu_k[-1]), Hkv, D, seed=2)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


@needs_varlen
def test_varlen_matches_per_sequence_flash_attn_func():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs()
    out, lse, s = compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 0.0, 0.25, True, return_attn_probs=True)
    assert s is None and out.shape == q.shape
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32  # flash-attn varlen: (H, total_q)
    for b in range(3):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref, ref_lse = fa2dispatch.attention(q[None, rows], k[None, keys], v[None, keys], causal=True,
                                             softmax_scale=0.25, return_lse=True)
        torch.testing.assert_close(out[rows], ref[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(lse[:, rows], ref_lse[0], rtol=0, atol=1e-6)


@needs_varlen
def test_varlen_packed_forms():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs()
    ref = compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=True)
    kv = torch.stack([k, v], dim=1)
    assert torch.equal(compat.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, mq, mk, causal=True), ref)
    qs, ks, vs, cu, _, m, _ = varlen_inputs(lens_q=(3, 6, 1), lens_k=(3, 6, 1), Hkv=4)
    packed = torch.stack([qs, ks, vs], dim=1)
    assert torch.equal(compat.flash_attn_varlen_qkvpacked_func(packed, cu, m, causal=True),
                       compat.flash_attn_varlen_func(qs, ks, vs, cu, cu, m, m, causal=True))


def test_varlen_block_table_refused():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs()
    with pytest.raises(NotImplementedError, match="block_table"):
        compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, block_table=torch.zeros(3, 1, dtype=torch.int32))


# ------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("arg", ["rotary_cos", "rotary_sin", "cache_batch_idx", "cache_leftpad"])
def test_kvcache_unsupported_arguments_name_themselves(arg):
    q, kc, vc = randn(2, 1, 4, 16), randn(2, 8, 2, 16), randn(2, 8, 2, 16)
    with pytest.raises(NotImplementedError, match=arg):
        compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, **{arg: torch.zeros(2, dtype=torch.int32)})


@needs_kvcache
def test_kvcache_appends_and_attends_like_attention():
    """New keys written at cache_seqlens in place; attention over each sequence's filled prefix,
    bottom-right causal; an int cache_seqlens means every sequence (flash-attn's conversion)."""
    q, k_new, v_new = randn(2, 2, 4, 16), randn(2, 2, 2, 16, seed=1), randn(2, 2, 2, 16, seed=2)
    k_cache, v_cache = randn(2, 10, 2, 16, seed=3), randn(2, 10, 2, 16, seed=4)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out, lse = compat.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=5, causal=True,
                                              return_softmax_lse=True)
    assert torch.equal(k_cache[:, 5:7], k_new) and torch.equal(v_cache[:, 5:7], v_new)
    assert torch.equal(k_cache[:, :5], k_before[:, :5]) and torch.equal(k_cache[:, 7:], k_before[:, 7:])
    assert torch.equal(v_cache[:, :5], v_before[:, :5]) and torch.equal(v_cache[:, 7:], v_before[:, 7:])
    ref, ref_lse = fa2dispatch.attention(q, k_cache[:, :7], v_cache[:, :7], causal=True, return_lse=True)
    assert lse.shape == (2, 4, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-6)


@needs_kvcache
def test_kvcache_per_sequence_lengths_and_pages():
    """cache_seqlens as int32 (B,): each sequence attends to its own prefix (decode, Mq = 1); the
    same cache split into pages behind a block_table gives the same answer."""
    q, k_cache, v_cache = randn(2, 1, 4, 16), randn(2, 8, 2, 16, seed=1), randn(2, 8, 2, 16, seed=2)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    out = compat.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
    for b, n in enumerate(lens.tolist()):
        ref = fa2dispatch.attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], causal=True)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=0, atol=1e-6)
    pages_k, pages_v = k_cache.reshape(4, 4, 2, 16), v_cache.reshape(4, 4, 2, 16)  # page p of seq b: 2b + p
    order = torch.tensor([[2, 3], [0, 1]], dtype=torch.int32)  # sequences' pages in shuffled slots
    paged_k, paged_v = torch.empty_like(pages_k), torch.empty_like(pages_v)
    paged_k[order.flatten().long()], paged_v[order.flatten().long()] = pages_k, pages_v
    paged = compat.flash_attn_with_kvcache(q, paged_k, paged_v, cache_seqlens=lens, block_table=order, causal=True)
    torch.testing.assert_close(paged, out, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ scaled_dot_product_attention


def check_sdpa(query, key, value, **kw):
    """Ours against PyTorch's own SDPA: float64 truth, float32 scale (STYLE.md)."""
    out = compat.scaled_dot_product_attention(query, key, value, **kw)

    def theirs(dtype):
        mask = kw.get("attn_mask")
        args = dict(kw, attn_mask=mask.to(dtype) if mask is not None and mask.is_floating_point() else mask)
        return F.scaled_dot_product_attention(query.to(dtype), key.to(dtype), value.to(dtype), **args)

    assert out.shape == theirs(torch.float32).shape and out.dtype == query.dtype
    check_close("out", out, theirs(torch.float64), theirs(torch.float32))
    return out


@pytest.mark.parametrize("Mq,Mkv", [(9, 9), (5, 12), (12, 5)])
def test_sdpa_causal_is_top_left(Mq, Mkv):
    q, k, v = qkv(Mq=Mq, Mkv=Mkv, Hkv=4, layout="bhsd")
    check_sdpa(q, k, v, is_causal=True)
    decision = compat.explain_sdpa(q, k, v, is_causal=True)
    assert isinstance(decision, fa2dispatch.Decision) and decision.problem.causal
    if Mq != Mkv:
        assert decision.problem.causal_alignment == "top_left"


def test_sdpa_gqa_scale_and_plain():
    q, k, v = qkv(Mq=6, Mkv=10, layout="bhsd")
    check_sdpa(q, k, v, enable_gqa=True, scale=0.7)
    check_sdpa(q, k, v, is_causal=True, enable_gqa=True)
    q, k, v = qkv(Mq=6, Mkv=10, Hkv=4, layout="bhsd")
    check_sdpa(q, k, v)


@pytest.mark.parametrize("kind", ["bool", "float", "bool-2d", "float-bcast"])
def test_sdpa_attn_mask(kind):
    q, k, v = qkv(Mq=6, Mkv=10, layout="bhsd")
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = torch.rand(2, 4, 6, 10, generator=g) > 0.3
        mask[0, 1, 2] = False  # a row that sees no key: 0, as PyTorch's math gives
    elif kind == "bool-2d":
        mask = torch.rand(6, 10, generator=g) > 0.5
    elif kind == "float":
        mask = torch.randn(2, 4, 6, 10, generator=g)
    else:
        mask = torch.randn(2, 1, 1, 10, generator=g)
    out = check_sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    if kind == "bool":
        assert torch.equal(out[0, 1, 2], torch.zeros(16))


def test_sdpa_attn_mask_gradients():
    q, k, v = qkv(Mq=5, Mkv=7, Hkv=4, layout="bhsd", requires_grad=True)
    mask = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True
    dout = randn(2, 4, 5, 16, seed=9)
    grads = []
    for fn, dtype in ((compat.scaled_dot_product_attention, torch.float32),
                      (F.scaled_dot_product_attention, torch.float64),
                      (F.scaled_dot_product_attention, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, attn_mask=mask)
        grads.append(torch.autograd.grad(out, leaves, dout.to(dtype)))
    for i, name in enumerate(("dq", "dk", "dv")):
        check_close(name, grads[0][i], grads[1][i], grads[2][i])


def test_sdpa_3d_inputs():
    q, k, v = randn(4, 6, 16), randn(4, 9, 16, seed=1), randn(4, 9, 16, seed=2)
    check_sdpa(q, k, v, is_causal=True)
    assert isinstance(compat.explain_sdpa(q, k, v), fa2dispatch.Decision)


def test_sdpa_attn_mask_decision_names_the_reference_and_why_not_the_others():
    q, k, v = qkv(Mq=6, Mkv=10, layout="bhsd")
    mask = torch.ones(6, 10, dtype=torch.bool).tril()
    decision = compat.explain_sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    assert decision.backend.name == "reference" and decision.problem.attn_mask == "bool"
    assert set(decision.rejected) | set(decision.fallbacks) | {"reference"} == set(BACKENDS)
    no_masks = [n for n in BACKENDS if not BACKENDS[n].supports_attn_mask]
    assert no_masks and set(no_masks) <= set(decision.rejected)
    for name in no_masks:
        assert any("attn_mask (bool) is not supported" in r for r in decision.rejected[name]), name
    text = str(decision)
    assert "with    reference" in text and "attn_mask(bool)" in text
    # the same call without the mask may go elsewhere; with it, only backends that declare masks
    assert all(BACKENDS[n].supports_attn_mask for n in (decision.backend.name, *decision.fallbacks))


@pytest.mark.parametrize("case", ["value-dim", "head-dim", "5d", "float64"])
def test_sdpa_falls_back_to_pytorch_for_what_we_cannot_express(case):
    q, k, v = qkv(Mq=6, Mkv=10, Hkv=4, layout="bhsd")
    if case == "value-dim":
        v = randn(2, 4, 10, 24, seed=3)
    elif case == "head-dim":
        q, k, v = (t[..., :12] for t in (q, k, v))
    elif case == "5d":
        q, k, v = (t[None] for t in (q, k, v))
    else:
        q, k, v = (t.double() for t in (q, k, v))
    why = compat.explain_sdpa(q, k, v, is_causal=True)
    assert isinstance(why, compat.TorchSDPAFallback)
    assert str(why).startswith("torch.nn.functional.scaled_dot_product_attention runs it")
    out = compat.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_sdpa_argument_errors():
    q, k, v = qkv(layout="bhsd")
    with pytest.raises(ValueError, match="enable_gqa=True"):
        compat.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        compat.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(7, 11, dtype=torch.bool), is_causal=True,
                                            enable_gqa=True)
    with pytest.raises(TypeError, match="scale"):
        compat.scaled_dot_product_attention(q, k, v, scale="0.5", enable_gqa=True)


def test_sdpa_dropout_repeatable():
    q, k, v = qkv(Hkv=4, layout="bhsd")
    torch.manual_seed(11)
    a = compat.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(11)
    b = compat.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    assert torch.equal(a, b)
    assert not torch.allclose(a, compat.scaled_dot_product_attention(q, k, v))
