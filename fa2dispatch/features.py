"""FlashAttention-2's feature set beyond plain (causal) attention: validation and the per-call data.

The problem (``AttentionProblem``) carries what decides the kernel: the window bounds, the
softcap, whether ALiBi slopes are given and their shape, the dropout probability, the causal
alignment, the determinism request, varlen. The tensors and numbers that change from call to
call without changing the kernel (the slopes themselves, the dropout seed, cu_seqlens) travel
beside it in ``FeatureArgs``, as the fp8 descales travel in ``FP8Args``.

One visibility rule, shared by every kernel and the reference (``visible``): with
``shift = Mkv - Mq`` for ``causal_alignment="bottom_right"`` (FlashAttention-2) or 0 for
``"top_left"`` (PyTorch SDPA's ``is_causal``), query i sees key j iff

    j <= i + shift              (causal)
    j >= i + shift - left       (window left >= 0)
    j <= i + shift + right      (window right >= 0)

The scores are ``s = softmax_scale * q.k``; then ``softcap * tanh(s / softcap)`` when
``softcap > 0``; then ``- slope[b, h] * |i + shift - j|`` with ALiBi; then the mask; softmax;
dropout (keep with probability 1 - p, kept values scaled by 1 / (1 - p)) on the probabilities
that multiply v. The returned lse is the row log-sum-exp before dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGNMENTS = ("bottom_right", "top_left")


@dataclass(frozen=True)
class FeatureArgs:
    """Per-call data of a feature call (the kernel is fixed by the problem; these are its inputs).

    alibi_slopes: float32 (H,) or (B, H) on q's device, or None.
    seed, offset: the dropout RNG state drawn once in the forward (``fa2dispatch.rng.draw_seed``)
        and reused by the backward, which regenerates the mask instead of storing it.
    cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths of a varlen call, or None.
    attn_mask: an arbitrary mask in PyTorch SDPA's convention (bool: True keeps; float: added to
        the scores), broadcastable to (B, H, Mq, Mkv); only ``fa2dispatch.compat``'s
        ``scaled_dot_product_attention`` passes one, and only backends that declare
        ``supports_attn_mask`` take it.
    """

    alibi_slopes: torch.Tensor | None = None
    seed: int = 0
    offset: int = 0
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None  # PyTorch SDPA's attn_mask (fa2dispatch.compat only)

    def __hash__(self) -> int:  # tensors are not hashable by value; identity is enough
        return id(self)


def check_window(window_size) -> tuple[int, int]:
    """``window_size=(left, right)``: two ints >= -1 (-1: unbounded on that side)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    out = []
    for side, value in zip(("left", "right"), window_size):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window_size={tuple(window_size)!r}: {side} must be an int, "
                            f"got {type(value).__name__}")
        if value < -1:
            raise ValueError(f"window_size={tuple(window_size)!r}: {side}={value} must be >= -1 "
                             "(-1 means unbounded)")
        out.append(value)
    return out[0], out[1]


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap={softcap!r} must be finite and >= 0 (0 disables soft-capping)")
    return float(softcap)


def check_alignment(causal_alignment) -> str:
    if not isinstance(causal_alignment, str) or causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment={causal_alignment!r} is not supported "
                         f"(supported: {', '.join(map(repr, ALIGNMENTS))})")
    return causal_alignment


def check_deterministic(deterministic) -> bool:
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    return deterministic


def alibi_kind(alibi_slopes, B: int, H: int, device: torch.device) -> str | None:
    """Validate ``alibi_slopes`` for a call with B sequences and H query heads: None, or the
    shape kind "h" ((H,)) / "bh" ((B, H)) the problem records."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    where = f"alibi_slopes (shape {tuple(alibi_slopes.shape)}, dtype {alibi_slopes.dtype}, device {alibi_slopes.device})"
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"{where}: dtype must be float32")
    if alibi_slopes.device != device:
        raise ValueError(f"{where}: must be on q's device {device}")
    if tuple(alibi_slopes.shape) == (H,):
        return "h"
    if tuple(alibi_slopes.shape) == (B, H):
        return "bh"
    raise ValueError(f"{where}: expected shape ({H},) or ({B}, {H}) (H,) / (B, H)")


def shift_of(Mq: int, Mkv: int, causal_alignment: str) -> int:
    """Diagonal offset: query i's own position among the keys is i + shift."""
    return Mkv - Mq if causal_alignment == "bottom_right" else 0


def normalize_window(window: tuple[int, int], causal: bool, Mq: int, Mkv: int, shift: int) -> tuple[int, int]:
    """The window in canonical form: with causal the right side is the causal bound itself
    (FlashAttention-2 sets right = 0), so it is stored as -1 beside ``causal``; a side that
    cannot mask any key of these lengths becomes -1, so equivalent calls share one problem (and
    other backends can take a window that masks nothing)."""
    left, right = window
    if causal:
        right = -1
    if left >= 0 and left >= Mq - 1 + shift:  # i + shift - left <= 0 for every row
        left = -1
    if right >= 0 and right >= Mkv - 1 - shift:  # i + shift + right >= Mkv - 1 for every row
        right = -1
    return left, right


def visible(Mq: int, Mkv: int, *, causal: bool, window: tuple[int, int], shift: int,
            device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean (Mq, Mkv) mask of the keys each query sees, or None when every key is visible."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    i = torch.arange(Mq, device=device)[:, None] + shift
    j = torch.arange(Mkv, device=device)[None, :]
    keep = torch.ones(Mq, Mkv, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def alibi_bias(slopes: torch.Tensor, B: int, H: int, Mq: int, Mkv: int, shift: int,
               dtype: torch.dtype) -> torch.Tensor:
    """(B or 1, H, Mq, Mkv) bias ``-slope * |i + shift - j|`` in ``dtype``."""
    i = torch.arange(Mq, device=slopes.device, dtype=dtype)[:, None] + shift
    j = torch.arange(Mkv, device=slopes.device, dtype=dtype)[None, :]
    dist = (i - j).abs()
    s = slopes.to(dtype)
    s = s[None, :, None, None] if s.dim() == 1 else s[:, :, None, None]
    return -s * dist


def attn_mask_kind(attn_mask, B: int, H: int, Mq: int, Mkv: int, dtype: torch.dtype,
                   device: torch.device) -> str | None:
    """Validate an SDPA-style ``attn_mask``: None, or "bool" / "float" for the problem."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    where = f"attn_mask (shape {tuple(attn_mask.shape)}, dtype {attn_mask.dtype}, device {attn_mask.device})"
    if attn_mask.device != device:
        raise ValueError(f"{where}: must be on query's device {device}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
        raise TypeError(f"{where}: dtype must be torch.bool or the query's dtype {dtype}")
    try:
        # the mask broadcasts *to* the scores: (Mq + 1, Mkv) fails, and so does (2, 2) against
        # Mq = Mkv = 1, which broadcast_shapes alone would widen
        if attn_mask.dim() > 4 or torch.broadcast_shapes(tuple(attn_mask.shape), (B, H, Mq, Mkv)) != (B, H, Mq, Mkv):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{where}: must broadcast to (B, H, Mq, Mkv) = ({B}, {H}, {Mq}, {Mkv})") from None
    return "bool" if attn_mask.dtype == torch.bool else "float"
