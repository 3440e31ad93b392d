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


def resolve_softmax_scale(softmax_scale, D: int) -> float:
    """``softmax_scale`` as given (a finite number), or 1/sqrt(D) for None; raises naming it."""
    if softmax_scale is None:
        return D**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale={softmax_scale!r} must be finite")
    return softmax_scale


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
    # fp8 calls only (None / "natural" otherwise): the output dtype (None: bfloat16) and how v
    # is laid out ("transposed": (B, Hkv, D, Mkv), the K-major operand Hopper's fp8 MMA takes)
    out_dtype: torch.dtype | None = None
    v_layout: str = "natural"
    # FlashAttention-2's features (fa2dispatch.features has the one visibility rule):
    # window (left, right), -1 unbounded, canonical (features.normalize_window); softcap 0 = off;
    # alibi None / "h" (slopes (H,)) / "bh" (slopes (B, H)); dropout probability; where the
    # causal diagonal sits when Mq != Mkv; a bit-for-bit repeatable backward requested
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None
    dropout_p: float = 0.0
    causal_alignment: str = "bottom_right"
    deterministic: bool = False
    # varlen: packed sequences (layout "thd", q (total_q, H, D)); B sequences, Mq and Mkv their
    # maximum lengths. kvcache: attention_with_kvcache (Mkv the cache capacity); paged_block: the
    # page size of a paged cache (0: contiguous)
    varlen: bool = False
    # varlen per-call facts read from cu_seqlens on the host (varlen.make_varlen_problem): every
    # sequence has as many q rows as k rows (then top-left and bottom-right causal agree); some
    # sequence has no q or no k rows. Kernels whose causal mask has the other alignment, or that
    # cannot take an empty sequence, refuse by them (backends.torch_sdpa).
    varlen_equal: bool = False
    varlen_empty: bool = False
    # every q sequence has one length and every k sequence has one length (> 0): the pack is a
    # dense (B, S, H, D) batch in memory (varlen.attention_varlen runs it as one)
    varlen_uniform: bool = False
    kvcache: bool = False
    paged_block: int = 0
    # an arbitrary SDPA-style mask ("bool" / "float"), from fa2dispatch.compat only
    attn_mask: str | None = None

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
    def output_dtype(self) -> torch.dtype:
        """dtype of the output: the inputs' own, or for fp8 inputs ``out_dtype`` (default bfloat16)."""
        if self.out_dtype is not None:
            return self.out_dtype
        return torch.bfloat16 if self.is_fp8 else self.dtype

    @property
    def shift(self) -> int:
        """Query i's diagonal among the keys is i + shift (features.shift_of)."""
        return self.Mkv - self.Mq if self.causal_alignment == "bottom_right" else 0

    @property
    def has_window(self) -> bool:
        return self.window != (-1, -1)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The features this call uses, by name (the report, autotune buckets, reasons)."""
        names = []
        if self.has_window:
            names.append("window")
        if self.softcap:
            names.append("softcap")
        if self.alibi:
            names.append("alibi")
        if self.dropout_p:
            names.append("dropout")
        if self.causal_alignment != "bottom_right":
            names.append("top_left")
        if self.varlen:
            names.append("varlen")
        if self.kvcache:
            names.append("paged" if self.paged_block else "kvcache")
        if self.attn_mask:
            names.append("mask")
        return tuple(names)

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
            + (f" out={str(self.output_dtype).removeprefix('torch.')}" if self.is_fp8 else "")
            + (" v=transposed" if self.v_layout == "transposed" else "")
            + (f" window={self.window}" if self.has_window else "")
            + (f" softcap={self.softcap:g}" if self.softcap else "")
            + (f" alibi=({'B, H' if self.alibi == 'bh' else 'H'})" if self.alibi else "")
            + (f" dropout={self.dropout_p:g}" if self.dropout_p else "")
            + (" causal_alignment=top_left" if self.causal_alignment != "bottom_right" else "")
            + (" deterministic" if self.deterministic and self.requires_grad else "")
            + (" varlen" if self.varlen else "")
            + ((f" paged_kv(page={self.paged_block})" if self.paged_block else " kvcache") if self.kvcache else "")
            + (f" attn_mask({self.attn_mask})" if self.attn_mask else "")
        )


def check_like_q(q: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Each named tensor must have q's dtype (TypeError) and device (ValueError)."""
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{_describe(name, t)}: dtype differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_describe(name, t)}: device differs from q's {q.device}")


def _split_dims(name: str, t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """Return (B, heads, M, D) of one input in the given layout ("vt": v pre-transposed)."""
    if t.dim() != 4:
        expected = {"bshd": "(B, M, H, D)", "bhsd": "(B, H, M, D)", "vt": "(B, Hkv, D, Mkv)"}[layout]
        where = "v_layout='transposed'" if layout == "vt" else f"layout={layout!r}"
        raise ValueError(f"{_describe(name, t)}: expected a 4-d tensor {expected} for {where}")
    if layout == "vt":
        b, h, d, m = t.shape
    elif layout == "bshd":
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
    out_dtype: torch.dtype | None = None,
    v_layout: str = "natural",
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    dropout_p=0.0,
    causal_alignment="bottom_right",
    deterministic=False,
    attn_mask=None,
) -> AttentionProblem:
    """Validate one call and describe it. Raises ValueError/TypeError naming the argument.

    ``out_dtype`` and ``v_layout`` apply to float8_e4m3fn inputs only (see ``fa2dispatch.fp8``);
    fp8 inputs that require gradients are refused: the fp8 path is forward-only."""
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
    check_like_q(q, k=k, v=v)

    is_fp8 = q.dtype == torch.float8_e4m3fn
    _check_fp8_options(q, k, v, is_fp8, out_dtype, v_layout)

    B, H, Mq, D = _split_dims("q", q, layout)
    Bk, Hkv, Mkv, Dk = _split_dims("k", k, layout)
    Bv, Hv, Mv, Dv = _split_dims("v", v, "vt" if v_layout == "transposed" else layout)
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
    softmax_scale = resolve_softmax_scale(softmax_scale, D)

    problem = AttentionProblem(
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
        out_dtype=(out_dtype or torch.bfloat16) if is_fp8 else None,
        v_layout=v_layout,
    )
    return with_features(problem, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                         dropout_p=dropout_p, causal_alignment=causal_alignment, deterministic=deterministic,
                         attn_mask=attn_mask)


def with_features(problem: AttentionProblem, *, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                  dropout_p=0.0, causal_alignment="bottom_right", deterministic=False,
                  attn_mask=None) -> AttentionProblem:
    """``problem`` with FlashAttention-2's feature arguments validated and in canonical form
    (equivalent calls share one problem: a window that masks nothing is no window; the alignment
    of a call it cannot change is "bottom_right")."""
    from dataclasses import replace

    from fa2dispatch import features, rng

    window = features.check_window(window_size)
    softcap = features.check_softcap(softcap)
    dropout_p = rng.check_dropout_p(dropout_p)
    alignment = features.check_alignment(causal_alignment)
    deterministic = features.check_deterministic(deterministic)
    alibi = features.alibi_kind(alibi_slopes, problem.B, problem.H, problem.device)
    mask = features.attn_mask_kind(attn_mask, problem.B, problem.H, problem.Mq, problem.Mkv, problem.dtype,
                                   problem.device)
    shift = features.shift_of(problem.Mq, problem.Mkv, alignment)
    if problem.varlen:  # lengths differ per sequence: only the causal rule is length-free
        window = (window[0], -1 if problem.causal else window[1])
        if problem.varlen_equal:
            alignment = "bottom_right"  # q length == k length in every sequence: the same mask
    else:
        window = features.normalize_window(window, problem.causal, problem.Mq, problem.Mkv, shift)
        if problem.Mq == problem.Mkv or not (problem.causal or window != (-1, -1) or alibi):
            alignment = "bottom_right"  # the alignment changes nothing for this call
    if mask is None and (window, softcap, alibi, dropout_p, alignment, deterministic) == (
            (-1, -1), 0.0, None, 0.0, "bottom_right", False):
        return problem
    return replace(problem, window=window, softcap=softcap, alibi=alibi, dropout_p=dropout_p,
                   causal_alignment=alignment, deterministic=deterministic, attn_mask=mask)


def _check_fp8_options(q, k, v, is_fp8: bool, out_dtype, v_layout) -> None:
    """out_dtype, v_layout and gradients of an fp8 call; the descales are checked by
    ``fa2dispatch.fp8.check_fp8_args``."""
    if not isinstance(v_layout, str) or v_layout not in ("natural", "transposed"):
        raise ValueError(f"v_layout={v_layout!r} is not supported (supported: 'natural', 'transposed')")
    if out_dtype is not None:
        if not isinstance(out_dtype, torch.dtype):
            raise TypeError(f"out_dtype must be a torch.dtype or None, got {type(out_dtype).__name__}")
        if out_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"out_dtype={out_dtype} is not supported (supported: torch.bfloat16, torch.float16)")
    if not is_fp8:
        if out_dtype is not None:
            raise ValueError(f"out_dtype={out_dtype} given but q is {q.dtype}: out_dtype applies to "
                             "float8_e4m3fn inputs only (the output takes the inputs' dtype)")
        if v_layout != "natural":
            raise ValueError(f"v_layout={v_layout!r} given but q is {q.dtype}: a pre-transposed v applies to "
                             "float8_e4m3fn inputs only")
        return
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.requires_grad:
                raise ValueError(
                    f"{_describe(name, t)} requires grad, but fp8 (float8_e4m3fn) attention is forward-only: "
                    "there is no backward through fp8 inputs. Call it under torch.no_grad() / "
                    "torch.inference_mode(), or use float16/bfloat16 inputs for training")
