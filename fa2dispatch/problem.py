"""AttentionProblem: the normalized, validated description of one attention call.

Everything downstream (dispatch, backends, the autotune cache) sees this object, never the
raw arguments. Validation happens here, once, before any kernel can launch: every bad input
raises ``ValueError``/``TypeError`` naming the argument with its shape, dtype or device.

Vocabulary (fixed project-wide): B batch, H query heads, Hkv key/value heads, Mq and Mkv
sequence lengths, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

LAYOUTS = ("bshd", "bhsd")
# float8_e4m3fn is a valid call (FlashAttention-3's fp8 inputs); which backend can run it is the
# dispatcher's question, so an fp8 call gets each backend's reason rather than a blanket TypeError.
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)
HEAD_DIM_MIN, HEAD_DIM_MAX, HEAD_DIM_MULTIPLE = 8, 256, 8


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


@dataclass(frozen=True)
class AttentionProblem:
    """One attention call in canonical terms. Hashable; shapes in the (B, H, M, D) sense."""

    B: int
    H: int
    Hkv: int
    Mq: int
    Mkv: int
    D: int
    dtype: torch.dtype
    device: torch.device
    layout: str
    causal: bool
    softmax_scale: float
    requires_grad: bool = False
    return_lse: bool = False  # the caller receives lse (and may differentiate through it)

    def __hash__(self) -> int:
        # Computed once: a problem keys the dispatcher's memo on every call (dataclass's own
        # __hash__ would rebuild the field tuple each time).
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def is_fp8(self) -> bool:
        return self.dtype.itemsize == 1

    @property
    def group(self) -> int:
        """Query heads per key/value head (1: MHA, H: MQA, otherwise GQA)."""
        return self.H // self.Hkv

    def describe(self) -> str:
        return (
            f"B={self.B} H={self.H} Hkv={self.Hkv} Mq={self.Mq} Mkv={self.Mkv} D={self.D} "
            f"dtype={str(self.dtype).removeprefix('torch.')} causal={self.causal} "
            f"layout={self.layout} device={self.device}"
            + (" backward" if self.requires_grad else "")
            + (" return_lse" if self.return_lse else "")
        )


def _split_dims(name: str, t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """Return (B, heads, M, D) of one input in the given layout."""
    if t.dim() != 4:
        expected = "(B, M, H, D)" if layout == "bshd" else "(B, H, M, D)"
        raise ValueError(f"{_describe(name, t)}: expected a 4-d tensor {expected} for layout={layout!r}")
    if layout == "bshd":
        b, m, h, d = t.shape
    else:
        b, h, m, d = t.shape
    return b, h, m, d


def make_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
) -> AttentionProblem:
    """Validate one call and describe it. Raises ValueError/TypeError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported (supported: {', '.join(map(repr, LAYOUTS))})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if q.dtype not in DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise TypeError(f"{_describe('q', q)}: dtype not supported (supported: {supported})")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_describe(name, t)}: dtype differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_describe(name, t)}: device differs from q's {q.device}")

    B, H, Mq, D = _split_dims("q", q, layout)
    Bk, Hkv, Mkv, Dk = _split_dims("k", k, layout)
    Bv, Hv, Mv, Dv = _split_dims("v", v, layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() == 0:
            raise ValueError(f"{_describe(name, t)}: every dimension must be >= 1")
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: {_describe('q', q)}, {_describe('k', k)}, {_describe('v', v)}")
    if (Hv, Mv) != (Hkv, Mkv):
        raise ValueError(f"k and v must agree in heads and length: {_describe('k', k)}, {_describe('v', v)}")
    if Dk != D or Dv != D:
        raise ValueError(
            f"head dims differ: {_describe('q', q)}, {_describe('k', k)}, {_describe('v', v)} "
            "(q, k and v must share D)"
        )
    if H % Hkv != 0:
        raise ValueError(
            f"number of query heads H={H} ({_describe('q', q)}) must be a multiple of the key/value "
            f"heads Hkv={Hkv} ({_describe('k', k)})"
        )
    if not (HEAD_DIM_MIN <= D <= HEAD_DIM_MAX and D % HEAD_DIM_MULTIPLE == 0):
        raise ValueError(
            f"head dim D={D} of {_describe('q', q)} is not supported "
            f"(supported: {HEAD_DIM_MIN}..{HEAD_DIM_MAX}, multiple of {HEAD_DIM_MULTIPLE})"
        )
    if softmax_scale is None:
        softmax_scale = D**-0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    elif not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale={softmax_scale!r} must be finite")

    return AttentionProblem(
        B=B,
        H=H,
        Hkv=Hkv,
        Mq=Mq,
        Mkv=Mkv,
        D=D,
        dtype=q.dtype,
        device=q.device,
        layout=layout,
        causal=causal,
        softmax_scale=float(softmax_scale),
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        return_lse=return_lse,
    )
