"""Reference backend: attention as plain PyTorch math. The single ground truth of all tests.

Materialises the (Mq, Mkv) score matrix, so it is for correctness and CPU fallback, not speed.
``attention_math`` computes in any precision: float32 (the backend), float64 (the ground
truth when inputs are float32), or the input's own low precision (what PyTorch's own math
gets, which sets test tolerances; STYLE.md).
"""

from __future__ import annotations

import torch

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from .base import Backend, Config


def _to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    layout: str = "bshd",
    compute_dtype: torch.dtype = torch.float32,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    causal_alignment: str = "bottom_right",
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention in ``compute_dtype``, with FlashAttention-2's features.

    Returns (out in the layout of q, in compute_dtype; lse (B, H, Mq) in compute_dtype).
    Masks, softcap, ALiBi and dropout follow ``fa2dispatch.features`` (the one rule): causal is
    bottom-right aligned by default (query i sees key j iff j <= i + Mkv - Mq). A row that sees
    no key gives out 0 and lse -inf. ``dropout_keep``: boolean (B, H, Mq, Mkv), the kernels'
    mask (``fa2dispatch.rng.attention_dropout_mask``); kept weights are scaled by 1/(1 - p).
    ``attn_mask``: PyTorch SDPA's (bool: True keeps; float: added to the scores), broadcast to
    (B, H, Mq, Mkv), applied after the features' own bias and masks.
    """
    from fa2dispatch import features

    qh, kh, vh = (_to_bhsd(t, layout).to(compute_dtype) for t in (q, k, v))
    B, H, Hkv, Mq, Mkv = qh.shape[0], qh.shape[1], kh.shape[1], qh.shape[2], kh.shape[2]
    if Hkv != H:  # GQA/MQA: query head h reads key/value head h // (H // Hkv)
        kh = kh.repeat_interleave(H // Hkv, dim=1)
        vh = vh.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    shift = features.shift_of(Mq, Mkv, causal_alignment)
    if alibi_slopes is not None:
        scores = scores + features.alibi_bias(alibi_slopes, B, H, Mq, Mkv, shift, compute_dtype)
    keep = features.visible(Mq, Mkv, causal=causal, window=window, shift=shift, device=q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute_dtype)
    lse = torch.logsumexp(scores, dim=-1)
    # Rows that see no key: lse is -inf; subtract 0 instead so exp gives 0, not NaN.
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    if dropout_p:
        probs = torch.where(dropout_keep, probs / (1.0 - dropout_p), torch.zeros_like(probs))
    out = torch.matmul(probs, vh)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out, lse


def dequantize_fp8(x8: torch.Tensor, descale: torch.Tensor | None, layout: str = "bshd",
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x8 * descale[b, head]`` in ``dtype``; a (B, Hkv) descale of q is shared by each group
    of query heads. None: descale 1."""
    x = x8.to(dtype)
    if descale is None:
        return x
    heads = x.shape[2] if layout == "bshd" else x.shape[1]
    d = descale.to(dtype).repeat_interleave(heads // descale.shape[1], dim=1)
    return x * (d[:, None, :, None] if layout == "bshd" else d[:, :, None, None])


def _fp8_matmul(a8: torch.Tensor, b8: torch.Tensor) -> torch.Tensor:
    """a8 @ b8^T for e4m3 (..., M, K) and (..., N, K), float32 result. On a GPU with fp8 tensor
    cores (sm_89+) through PyTorch's own fp8 matmul, ``torch._scaled_mm`` with fast accumulation:
    Hopper's fp8 MMA adds into its float32 accumulator with fewer bits than float32 (so does our
    kernel), and that is the precision PyTorch gets there too. Elsewhere exact float32."""
    if not (a8.is_cuda and torch.cuda.get_device_capability(a8.device) >= (8, 9)):
        return torch.matmul(a8.float(), b8.float().transpose(-1, -2))

    def pad(t):  # _scaled_mm wants every dim a multiple of 16; zero rows/columns add nothing
        m, k = t.shape[-2:]
        return torch.nn.functional.pad(t.float(), (0, -k % 16, 0, -m % 16)).to(a8.dtype).contiguous()

    a, b = pad(a8), pad(b8)
    one = torch.ones((), device=a8.device)
    flat_a, flat_b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = torch.stack([torch._scaled_mm(x, y.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                        use_fast_accum=True) for x, y in zip(flat_a, flat_b)])
    return out.reshape(*a.shape[:-1], b.shape[-2])[..., : a8.shape[-2], : b8.shape[-2]]


def attention_fp8_emulation(q8, k8, v8, q_descale=None, k_descale=None, v_descale=None, *, causal: bool,
                            softmax_scale: float, layout: str = "bshd", out_dtype: torch.dtype = torch.bfloat16,
                            p_scale: float = 256.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's own math in the precision of the fp8 pipeline (the tolerance side of STYLE.md's
    rule for fp8; the truth is ``attention_math`` in float64 on the dequantized inputs).

    S = (q8 k8^T) * softmax_scale * q_descale * k_descale; P = exp(S - rowmax) scaled by
    ``p_scale`` and rounded to e4m3 by torch's own cast; O = (P8 @ v8) / rowsum of the unrounded
    scaled P, times v_descale, rounded to ``out_dtype``. Both matmuls in PyTorch's fp8 matmul
    (``_fp8_matmul``). v natural layout. Returns (out in q's layout, lse float32 (B, H, Mq));
    rows that see no key give 0 and -inf."""
    qh, kh, vh = (_to_bhsd(t, layout) for t in (q8, k8, v8))
    B, H, Hkv, Mq, Mkv = qh.shape[0], qh.shape[1], kh.shape[1], qh.shape[2], kh.shape[2]

    def per_head(d, heads):  # (B, heads, 1, 1) float32
        if d is None:
            return torch.ones(B, heads, 1, 1, device=qh.device)
        return d.float().repeat_interleave(heads // d.shape[1], dim=1)[:, :, None, None]

    if H != Hkv:  # GQA: expand + reshape copies (repeat_interleave may lack fp8 kernels)
        kh, vh = (t[:, :, None].expand(B, Hkv, H // Hkv, *t.shape[2:]).reshape(B, H, *t.shape[2:]) for t in (kh, vh))
    scores = _fp8_matmul(qh, kh) * (softmax_scale * per_head(q_descale, H) * per_head(k_descale, H))
    if causal:
        i = torch.arange(Mq, device=qh.device)[:, None]
        j = torch.arange(Mkv, device=qh.device)[None, :]
        scores = scores.masked_fill(j > i + (Mkv - Mq), float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - m) * p_scale
    rowsum = p.sum(dim=-1, keepdim=True)
    pv = _fp8_matmul(p.to(torch.float8_e4m3fn), vh.transpose(-1, -2))
    out = pv / torch.where(rowsum == 0, torch.ones_like(rowsum), rowsum) * per_head(v_descale, H)
    lse = torch.where(rowsum[..., 0] == 0, float("-inf"), (m + torch.log(rowsum / p_scale))[..., 0])
    out = out.to(out_dtype)
    return (out.transpose(1, 2) if layout == "bshd" else out), lse


def _feature_kwargs(problem: AttentionProblem, features) -> dict:
    return dict(window=problem.window, softcap=problem.softcap, causal_alignment=problem.causal_alignment,
                dropout_p=problem.dropout_p,
                alibi_slopes=features.alibi_slopes if features is not None and problem.alibi else None,
                attn_mask=features.attn_mask if features is not None and problem.attn_mask else None)


def _dropout_keep(problem: AttentionProblem, features, device) -> torch.Tensor | None:
    """The kernels' dropout mask for the whole call (B, H, Mq, Mkv); varlen calls use the
    padded (max_seqlen) index space, as the kernels do."""
    if not problem.dropout_p:
        return None
    from fa2dispatch import rng

    return rng.attention_dropout_mask(features.seed, features.offset, problem.B, problem.H, problem.Mq,
                                      problem.Mkv, problem.dropout_p, device)


def problem_math(problem: AttentionProblem, q, k, v, features=None,
                 compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_math`` for a whole call as the problem describes it (features, varlen).

    Varlen (layout "thd"): q (total_q, H, D), k/v (total_k, Hkv, D); sequence b is rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]``; out (total_q, H, D) and lse (H, total_q), as
    flash-attn's varlen functions return them."""
    kwargs = _feature_kwargs(problem, features)
    keep = _dropout_keep(problem, features, q.device)
    if not problem.varlen:
        return attention_math(q, k, v, causal=problem.causal, softmax_scale=problem.softmax_scale,
                              layout=problem.layout, compute_dtype=compute_dtype, dropout_keep=keep, **kwargs)
    cu_q, cu_k = (c.tolist() for c in (features.cu_seqlens_q, features.cu_seqlens_k))
    slopes = kwargs.pop("alibi_slopes")
    outs, lses = [], []
    for b in range(problem.B):
        qs, ks, vs = (t[cu[b]:cu[b + 1]].unsqueeze(0) for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
        lq, lk = qs.shape[1], ks.shape[1]
        if lq == 0:
            continue
        if lk == 0:  # no key at all: every row sees nothing
            outs.append(qs.new_zeros((lq, problem.H, problem.D), dtype=compute_dtype))
            lses.append(torch.full((problem.H, lq), float("-inf"), dtype=compute_dtype, device=q.device))
            continue
        alibi = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b:b + 1])
        out, lse = attention_math(qs, ks, vs, causal=problem.causal, softmax_scale=problem.softmax_scale,
                                  layout="bshd", compute_dtype=compute_dtype, alibi_slopes=alibi,
                                  dropout_keep=None if keep is None else keep[b:b + 1, :, :lq, :lk], **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_zeros((0, problem.H, problem.D), dtype=compute_dtype)
    lse = torch.cat(lses, 1) if lses else q.new_zeros((problem.H, 0), dtype=compute_dtype)
    return out, lse


class ReferenceBackend(Backend):
    name = "reference"
    vendors = ("nvidia", "amd", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    deterministic = True
    supports_window = supports_softcap = supports_alibi = supports_dropout = True
    supports_top_left = supports_varlen = supports_attn_mask = True

    def available(self, device: DeviceInfo) -> list[str]:
        return []  # plain PyTorch ops: wherever torch runs (meta tensors give meta results)

    def forward(self, problem: AttentionProblem, q, k, v, config: Config | None, features=None):
        out, lse = problem_math(problem, q, k, v, features)
        return out.to(problem.dtype).contiguous(), lse.float().contiguous()

    def backward(self, problem: AttentionProblem, dout, q, k, v, out, lse, config: Config | None, dlse=None,
                 features=None):
        # torch.func.vjp, not torch.autograd.grad: under torch.compile this runs inside the custom
        # op's backward, below the autograd dispatch key, where autograd records nothing.
        def fn(q32, k32, v32):
            ref_out, ref_lse = problem_math(problem, q32, k32, v32, features)
            # lse of a row with no visible key is -inf and has no gradient
            return ref_out, torch.where(torch.isneginf(ref_lse), 0.0, ref_lse)

        primals = [t.detach().float() for t in (q, k, v)]
        (ref_out, ref_lse), vjp = torch.func.vjp(fn, *primals)
        cot_lse = torch.zeros_like(ref_lse) if dlse is None else dlse.float().reshape(ref_lse.shape)
        grads = vjp((dout.float().reshape(ref_out.shape), cot_lse))
        return tuple(g.to(problem.dtype) for g in grads)

    supports_kvcache = supports_paged_kv = True

    def forward_kvcache(self, problem: AttentionProblem, q, k_cache, v_cache, kv, config: Config | None):
        from .kvcache_reference import forward_kvcache

        return forward_kvcache(problem, q, k_cache, v_cache, kv)

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> Config | None:
        return None
