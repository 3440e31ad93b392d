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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention in ``compute_dtype``.

    Returns (out in the layout of q, in compute_dtype; lse (B, H, Mq) in compute_dtype).
    Causal masking is bottom-right aligned: query i sees key j iff j <= i + Mkv - Mq.
    A row that sees no key gives out 0 and lse -inf.
    """
    qh, kh, vh = (_to_bhsd(t, layout).to(compute_dtype) for t in (q, k, v))
    H, Hkv, Mq, Mkv = qh.shape[1], kh.shape[1], qh.shape[2], kh.shape[2]
    if Hkv != H:  # GQA/MQA: query head h reads key/value head h // (H // Hkv)
        kh = kh.repeat_interleave(H // Hkv, dim=1)
        vh = vh.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
    if causal:
        i = torch.arange(Mq, device=q.device)[:, None]
        j = torch.arange(Mkv, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (Mkv - Mq), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows that see no key: lse is -inf; subtract 0 instead so exp gives 0, not NaN.
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
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


class ReferenceBackend(Backend):
    name = "reference"
    vendors = ("nvidia", "amd", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    deterministic = True

    def available(self, device: DeviceInfo) -> list[str]:
        return []  # plain PyTorch ops: wherever torch runs (meta tensors give meta results)

    def forward(self, problem: AttentionProblem, q, k, v, config: Config | None):
        out, lse = attention_math(
            q, k, v, causal=problem.causal, softmax_scale=problem.softmax_scale, layout=problem.layout
        )
        return out.to(problem.dtype).contiguous(), lse.float().contiguous()

    def backward(self, problem: AttentionProblem, dout, q, k, v, out, lse, config: Config | None, dlse=None):
        with torch.enable_grad():
            leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = attention_math(
                *leaves, causal=problem.causal, softmax_scale=problem.softmax_scale, layout=problem.layout
            )
            outputs, grads_in = [ref_out], [dout.float()]
            if dlse is not None:
                # lse of a row with no visible key is -inf and has no gradient.
                outputs.append(torch.where(torch.isneginf(ref_lse), 0.0, ref_lse))
                grads_in.append(dlse.float())
            grads = torch.autograd.grad(outputs, leaves, grads_in)
        return tuple(g.to(problem.dtype) for g in grads)

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> Config | None:
        return None
