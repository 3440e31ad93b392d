"""``attention_varlen``: packed variable-length sequences (FlashAttention-2's varlen interface).

q is (total_q, H, D): the B sequences one after another, sequence b being rows
``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``; k and v likewise with ``cu_seqlens_k``. No padding is
stored or computed: each kernel program looks up its sequence's bounds. The problem records
B, and Mq / Mkv as the maximum lengths (what sizes the launch grid).
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from fa2dispatch import rng
from fa2dispatch.dispatch import AUTO_IGNORING_ENV, Decision, check_backend_name, decide
from fa2dispatch.ops import attention_eager
from fa2dispatch.problem import (
    DTYPES,
    HEAD_DIM_MAX,
    HEAD_DIM_MIN,
    HEAD_DIM_MULTIPLE,
    AttentionProblem,
    _describe,
    check_like_q,
    resolve_softmax_scale,
    with_features,
)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    causal_alignment: str = "bottom_right",
    deterministic: bool = False,
):
    """Attention over packed sequences of different lengths; the keywords are ``attention``'s.

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D); float16, bfloat16 or float32; H % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) on q's device, starting at 0, non-decreasing,
            ending at total_q / total_k. Sequence b of q attends to sequence b of k/v only.
        max_seqlen_q, max_seqlen_k: the longest sequence in each (an upper bound is accepted).
        causal, window_size, alibi_slopes ...: per sequence, as ``attention`` applies them to
            one batch element (causal bottom-right aligned within each sequence pair by default).
            ``alibi_slopes`` may be (H,) or (B, H). Dropout's counters index the padded
            (B, H, max_seqlen_q, max_seqlen_k) space, so masks do not depend on the packing.

    The cumulative lengths are read on the host to validate them (one device synchronisation),
    once per tensor: later calls with the same, unmodified cu_seqlens tensor (every layer of a
    model) skip the check. A bad one raises ``ValueError`` naming it before anything launches.

    Returns:
        out (total_q, H, D) in q's dtype; with ``return_lse`` also lse (H, total_q) float32
        (FlashAttention-2's varlen convention). Differentiable with respect to q, k and v.
    """
    if torch.compiler.is_compiling():
        raise NotImplementedError("fa2dispatch.attention_varlen is not supported under torch.compile "
                                  "(cu_seqlens are validated on the host); call it eagerly")
    kw = dict(causal=causal, softmax_scale=softmax_scale, return_lse=return_lse, window_size=window_size,
              softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, generator=generator,
              causal_alignment=causal_alignment, deterministic=deterministic)
    problem, choice, views = _plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend, kw)
    if views is not None:
        return _as_dense(q, views, problem, kw)
    from fa2dispatch.api import feature_args

    decision = decide(problem, choice)
    features = feature_args(problem, alibi_slopes, generator, cu_seqlens_q, cu_seqlens_k)
    out, lse = attention_eager(q, k, v, problem, choice, decision, features=features)
    return (out, lse) if return_lse else out


def explain_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    causal_alignment: str = "bottom_right",
    deterministic: bool = False,
) -> Decision:
    """The dispatcher's decision for ``attention_varlen(**same arguments)``, without running it.
    A uniform pack under ``auto`` is explained as the dense call it runs as (``runs_as_dense``),
    with a note saying so."""
    kw = dict(causal=causal, softmax_scale=softmax_scale, return_lse=return_lse, window_size=window_size,
              softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, generator=generator,
              causal_alignment=causal_alignment, deterministic=deterministic)
    problem, choice, views = _plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend, kw)
    if views is None:
        return decide(problem, choice)
    from fa2dispatch.api import explain

    B, S, Sk = problem.B, views[0].shape[1], views[1].shape[1]
    return replace(explain(*views, layout="bshd", **kw),
                   note=f"varlen pack of {B} sequences of {S} queries and {Sk} keys each: runs as this dense "
                        "call on views of the same memory")


def _plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend: str, kw: dict):
    """(problem, the backend choice, the (B, S, H, D) views when the call runs as dense, else
    None): validation and the route, shared by ``attention_varlen`` and ``explain_varlen``."""
    from fa2dispatch.api import _resolve_backend

    features = {n: x for n, x in kw.items() if n != "generator"}
    problem = make_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **features)
    rng.check_generator(kw["generator"])
    check_backend_name(backend)
    choice = _resolve_backend(backend)
    if choice not in ("auto", AUTO_IGNORING_ENV) or not runs_as_dense(problem, q.shape[0], k.shape[0]):
        return problem, choice, None
    return problem, choice, [t.view(problem.B, t.shape[0] // problem.B, *t.shape[1:]) for t in (q, k, v)]


def runs_as_dense(problem: AttentionProblem, total_q: int, total_k: int) -> bool:
    """Whether a varlen call under ``backend="auto"`` runs as a dense batch: every q sequence
    has one length and every k sequence one length, so the packed (total, H, D) tensors are
    (B, S, H, D) views and the call is exactly dense attention over them (the same math per
    sequence). The dispatcher then has every dense kernel to pick from (cuDNN, the Hopper
    forward), where packed calls have only the varlen kernels. With dropout only when the
    max_seqlen arguments are the lengths themselves: the dropout counters index
    (B, H, max_seqlen_q, max_seqlen_k), and the dense call's index (B, H, S_q, S_k)."""
    if not problem.varlen_uniform:
        return False
    s_q, s_k = total_q // problem.B, total_k // problem.B
    return not problem.dropout_p or (problem.Mq, problem.Mkv) == (s_q, s_k)


def _as_dense(q, views, problem: AttentionProblem, kw: dict):
    """``attention`` over the (B, S, H, D) views of a uniform pack; out and lse come back in the
    varlen shapes ((total_q, H, D) and (H, total_q))."""
    from fa2dispatch.api import attention

    res = attention(*views, layout="bshd", **kw)
    out, lse = res if kw["return_lse"] else (res, None)
    out = out.view(q.shape[0], *out.shape[2:])
    if lse is None:
        return out
    return out, lse.permute(1, 0, 2).reshape(problem.H, q.shape[0])  # (B, H, S) -> (H, B * S)


# cu_seqlens tensors already validated, with their version counter at the time: a model calls
# attention_varlen once per layer with the same cu_seqlens, and only the first call of a step
# needs to read them on the host (a device synchronisation). An in-place change bumps the
# version, so a modified tensor is checked again.
# Keyed by id(), holding a weak reference to check identity (a tensor's == is elementwise, so
# it cannot key a WeakKeyDictionary); bounded.
_VALIDATED: dict[int, tuple] = {}
_VALIDATED_LIMIT = 256


def _check_cu(name: str, cu, rows: int, device: torch.device, max_seqlen: int, max_name: str) -> list[int]:
    stamp = None
    if isinstance(cu, torch.Tensor):
        stamp = (cu._version, cu.data_ptr(), tuple(cu.shape), cu.dtype, rows, device, max_seqlen)
        seen = _VALIDATED.get(id(cu))
        if seen is not None and seen[0]() is cu and seen[1] == stamp:
            return seen[2]
    lengths = _check_cu_values(name, cu, rows, device, max_seqlen, max_name)
    if len(_VALIDATED) >= _VALIDATED_LIMIT:
        _VALIDATED.clear()
    _VALIDATED[id(cu)] = (weakref.ref(cu), stamp, lengths)
    return lengths


def _check_cu_values(name: str, cu, rows: int, device: torch.device, max_seqlen: int, max_name: str) -> list[int]:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    where = f"{name} (shape {tuple(cu.shape)}, dtype {cu.dtype}, device {cu.device})"
    if cu.dtype != torch.int32:
        raise TypeError(f"{where}: dtype must be int32")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{where}: must be 1-d with B + 1 >= 2 entries")
    if cu.device != device:
        raise ValueError(f"{where}: must be on q's device {device}")
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{where}: must start at 0, starts at {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        at = lengths.index(min(lengths))
        raise ValueError(f"{where}: must be non-decreasing, but entry {at + 1} ({values[at + 1]}) < entry {at} "
                         f"({values[at]})")
    if values[-1] != rows:
        raise ValueError(f"{where}: ends at {values[-1]} but the packed tensor has {rows} rows")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence in {name} ({max(lengths)})")
    return lengths


def make_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                        softmax_scale=None, return_lse=False, **features) -> AttentionProblem:
    """Validate a varlen call and describe it (layout "thd"). Raises naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{_describe(name, t)}: expected a 3-d packed tensor (total, heads, D)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if q.dtype not in DTYPES or q.dtype == torch.float8_e4m3fn:
        raise TypeError(f"{_describe('q', q)}: dtype not supported (supported: float16, bfloat16, float32)")
    check_like_q(q, k=k, v=v)
    _, H, D = q.shape
    total_k, Hkv, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape: {_describe('k', k)}, {_describe('v', v)}")
    if Dk != D:
        raise ValueError(f"head dims differ: {_describe('q', q)}, {_describe('k', k)} (q, k and v must share D)")
    if H == 0 or Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"number of query heads H={H} ({_describe('q', q)}) must be a multiple of the key/value "
                         f"heads Hkv={Hkv} ({_describe('k', k)})")
    if not (HEAD_DIM_MIN <= D <= HEAD_DIM_MAX and D % HEAD_DIM_MULTIPLE == 0):
        raise ValueError(f"head dim D={D} of {_describe('q', q)} is not supported "
                         f"(supported: {HEAD_DIM_MIN}..{HEAD_DIM_MAX}, multiple of {HEAD_DIM_MULTIPLE})")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    lens_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, max_seqlen_q, "max_seqlen_q")
    lens_k = _check_cu("cu_seqlens_k", cu_seqlens_k, total_k, q.device, max_seqlen_k, "max_seqlen_k")
    if len(lens_q) != len(lens_k):
        raise ValueError(f"cu_seqlens_q has {len(lens_q) + 1} entries but cu_seqlens_k has {len(lens_k) + 1}: "
                         "both must list the same B sequences")
    softmax_scale = resolve_softmax_scale(softmax_scale, D)
    problem = AttentionProblem(
        B=len(lens_q), H=H, Hkv=Hkv, Mq=max_seqlen_q, Mkv=max_seqlen_k, D=D, dtype=q.dtype, device=q.device,
        layout="thd", causal=causal, softmax_scale=float(softmax_scale),
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        return_lse=return_lse, varlen=True, varlen_equal=lens_q == lens_k,
        varlen_empty=min(lens_q) == 0 or min(lens_k) == 0,
        varlen_uniform=min(lens_q) == max(lens_q) > 0 and min(lens_k) == max(lens_k) > 0)
    return with_features(problem, **features)
