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
