"""A generated sweep of invalid calls over every public function and the CLI (issue 9, "bad input").

Each public function has a *valid* call built from base shapes (B, H, Hkv, Mq, Mkv, D, dtype,
layout); a catalogue of mutations changes that call in exactly one respect (a wrong rank,
dtype, device, shape, stride, head dim, cu_seqlens, block table, descale, window, NaN scale,
unknown name, ...). Every mutated call must raise ValueError or TypeError (a subclass counts;
``NoBackendError`` is a ``NotImplementedError``, which answers a *valid* call no backend runs,
so it fails here) whose message names the mutated argument, before any kernel launches (every
backend's forward, backward and forward_kvcache fail the test) and before a KV cache is
written. The CLI's malformed arguments, cache paths and environment variables must exit 2
with one error line naming the argument, and no traceback.

Two drivers: an explicit parametrized sweep (one test id per (function, mutation) on a fixed
base, so the catalogue is visible in ``pytest -v``) and a hypothesis test over (function,
mutation, random valid base shapes), derandomized, that counts the distinct invalid calls it
made and asserts there are at least 200.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fa2dispatch
from fa2dispatch import cli, compat, dispatch, kvcache
from fa2dispatch.autotune import cache
from fa2dispatch.hardware import ENV_SIMULATE

FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------ base shapes and valid calls


@dataclass(frozen=True)
class Base:
    """A valid problem every mutation changes in one place (small: validation only)."""

    B: int = 2
    Hkv: int = 2
    group: int = 2
    Mq: int = 3
    Mkv: int = 5
    D: int = 16
    dtype: torch.dtype = torch.float16
    layout: str = "bshd"

    @property
    def H(self) -> int:
        return self.Hkv * self.group

    def shape(self, heads: int, m: int, d: int | None = None, b: int | None = None) -> tuple[int, ...]:
        b = self.B if b is None else b
        d = self.D if d is None else d
        return (b, m, heads, d) if self.layout == "bshd" else (b, heads, m, d)

    @property
    def seq_axis(self) -> int:
        return 1 if self.layout == "bshd" else 2

    @property
    def head_axis(self) -> int:
        return 2 if self.layout == "bshd" else 1


FIXED = Base()


def rand(shape, dtype=torch.float16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def qkv(b: Base, dtype=None) -> dict:
    dtype = dtype or b.dtype
    return {"q": rand(b.shape(b.H, b.Mq), dtype, 0), "k": rand(b.shape(b.Hkv, b.Mkv), dtype, 1),
            "v": rand(b.shape(b.Hkv, b.Mkv), dtype, 2)}


def lens(m: int, B: int) -> list[int]:
    return [max(1, m - i) for i in range(B)]


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)


def varlen_args(b: Base) -> dict:
    lq, lk = lens(b.Mq, b.B), lens(b.Mkv, b.B)
    return {"q": rand((sum(lq), b.H, b.D), b.dtype, 0), "k": rand((sum(lk), b.Hkv, b.D), b.dtype, 1),
            "v": rand((sum(lk), b.Hkv, b.D), b.dtype, 2), "cu_seqlens_q": cu(lq), "cu_seqlens_k": cu(lk),
            "max_seqlen_q": max(lq), "max_seqlen_k": max(lk)}


PAGE = 4


def n_new(b: Base) -> int:
    return 1 + b.Mq % 2


def kvcache_args(b: Base, paged: bool = False) -> dict:
    """q (B, Mq, H, D) over a cache of capacity Mkv + 2 with n_new keys appended."""
    capacity = b.Mkv + 2
    new = n_new(b)
    args = {"q": rand((b.B, b.Mq, b.H, b.D), b.dtype, 0)}
    if paged:
        per_seq = -(-capacity // PAGE)
        n_blocks = b.B * per_seq + 1  # one spare page
        args["k_cache"] = rand((n_blocks, PAGE, b.Hkv, b.D), b.dtype, 1)
        args["v_cache"] = rand((n_blocks, PAGE, b.Hkv, b.D), b.dtype, 2)
        args["block_table"] = torch.arange(b.B * per_seq, dtype=torch.int32).reshape(b.B, per_seq)
        capacity = per_seq * PAGE
    else:
        args["k_cache"] = rand((b.B, capacity, b.Hkv, b.D), b.dtype, 1)
        args["v_cache"] = rand((b.B, capacity, b.Hkv, b.D), b.dtype, 2)
    args["k"] = rand((b.B, new, b.Hkv, b.D), b.dtype, 3)
    args["v"] = rand((b.B, new, b.Hkv, b.D), b.dtype, 4)
    args["cache_seqlens"] = torch.tensor([min(i, capacity - new) for i in range(b.B)], dtype=torch.int32)
    return args


def capacity_of(a: dict) -> int:
    if a.get("block_table") is not None:
        return a["block_table"].shape[1] * a["k_cache"].shape[1]
    return a["k_cache"].shape[1]


# ------------------------------------------------------------------ mutations


@dataclass(frozen=True)
class Mutation:
    """One change to a valid call: ``apply(args, base)`` edits the argument dict in place.
    ``arg``: the argument the error message must name; ``kind``: the catalogue's category."""

    id: str
    kind: str
    arg: str
    apply: Callable[[dict, Base], None]


def set_to(arg: str, value, kind: str = "type", tag: str | None = None) -> Mutation:
    def apply(a, b):
        a[arg] = value() if callable(value) and not isinstance(value, type) else value

    return Mutation(f"{arg}={tag or _tag(value)}", kind, arg, apply)


def _tag(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return "ndarray"
    return repr(value)


def edit(mid: str, kind: str, arg: str, fn: Callable[[dict, Base], None]) -> Mutation:
    return Mutation(mid, kind, arg, fn)


def on(arg: str, kind: str, tag: str, fn: Callable[[torch.Tensor, Base], object], *also: str) -> Mutation:
    """Replace tensor ``arg`` (and the same change to ``also``) by ``fn(tensor, base)``."""

    def apply(a, b):
        for name in (arg, *also):
            a[name] = fn(a.get(name), b)

    return Mutation(f"{'+'.join((arg, *also))}:{tag}", kind, arg, apply)


def non_tensors(*names: str) -> list[Mutation]:
    out = []
    for name in names:
        out += [set_to(name, lambda: [[0.0] * 8], tag="list"),
                set_to(name, lambda: np.zeros((2, 3, 2, 8)), tag="ndarray"), set_to(name, None), set_to(name, 1.0)]
    return out


def bool_flags(*names: str) -> list[Mutation]:
    """bool arguments given an int, a str, None."""
    return [set_to(n, v, "bool_arg") for n in names for v in (1, "yes", None)]


def scale_mutations(name: str = "softmax_scale") -> list[Mutation]:
    return ([set_to(name, v, "value") for v in (float("nan"), float("inf"), float("-inf"))]
            + [set_to(name, v, "type") for v in ("0.1", True)]
            + [set_to(name, lambda: torch.tensor(0.1), "type", tag="tensor()")])


def feature_mutations(alibi_heads: Callable[[Base], int] = lambda b: b.H) -> list[Mutation]:
    """window_size, softcap, alibi_slopes, dropout_p, generator, causal_alignment, deterministic."""
    out = [set_to("window_size", w, "window") for w in ((-2, -1), (-1, -3), (-5, 0), (0.5, -1), (True, -1), (-1,),
                                                         (1, 2, 3), "-1,-1", None, 5)]
    out += [set_to("softcap", s, "value") for s in (-1.0, float("nan"), float("inf"), -1e-9)]
    out += [set_to("softcap", s, "type") for s in ("1", True, None)]
    out += [
        on("alibi_slopes", "alibi", "shape(H+1,)", lambda t, b: torch.ones(alibi_heads(b) + 1)),
        on("alibi_slopes", "alibi", "shape(B,H,1)", lambda t, b: torch.ones(b.B, alibi_heads(b), 1)),
        on("alibi_slopes", "alibi", "shape(B+1,H)", lambda t, b: torch.ones(b.B + 1, alibi_heads(b))),
        on("alibi_slopes", "alibi", "float16", lambda t, b: torch.ones(alibi_heads(b), dtype=torch.float16)),
        on("alibi_slopes", "alibi", "float64", lambda t, b: torch.ones(alibi_heads(b), dtype=torch.float64)),
        on("alibi_slopes", "alibi", "int32", lambda t, b: torch.ones(alibi_heads(b), dtype=torch.int32)),
        on("alibi_slopes", "device", "meta", lambda t, b: torch.empty(alibi_heads(b), device="meta")),
        set_to("alibi_slopes", lambda: [0.5, 0.25], tag="list"),
    ]
    out += [set_to("dropout_p", p, "value") for p in (-0.1, 1.0, 1.5, float("nan"), float("-inf"))]
    out += [set_to("dropout_p", p, "type") for p in ("0.1", True, None)]
    out += [set_to("generator", g, "type") for g in (1, "seed")]
    out += [set_to("generator", lambda: torch.tensor(1), "type", tag="tensor()")]
    out += [set_to("causal_alignment", c, "name") for c in ("top-left", "TOP_LEFT", None, 1)]
    out += [set_to("deterministic", d, "bool_arg") for d in (1, "yes", None)]
    return out


def with_dims(b: Base, *, d=None, heads=None, m=None) -> Callable:
    return lambda t, _b: rand(_b.shape(heads(_b) if heads else t.shape[_b.head_axis],
                                       m(_b) if m else t.shape[_b.seq_axis], d), t.dtype)


def dense_mutations() -> list[Mutation]:
    """attention / explain on (B, M, H, D) or (B, H, M, D) inputs of any float dtype."""
    out = non_tensors("q", "k", "v")
    for name in ("q", "k", "v"):
        out += [on(name, "rank", "3-d", lambda t, b: t[..., 0]), on(name, "rank", "5-d", lambda t, b: t[None])]
    out += [on("q", "dtype", d, lambda t, b, d=d: t.to(getattr(torch, d)), "k", "v")
            for d in ("float64", "int32", "bool", "complex64")]
    out += [on("k", "dtype", "differs", lambda t, b: t.to(torch.float64)),
            on("v", "dtype", "differs",
               lambda t, b: t.to(torch.float32 if t.dtype != torch.float32 else torch.float16))]
    out += [on(n, "device", "meta", lambda t, b: meta(t)) for n in ("q", "k", "v")]
    out += [
        on("q", "zero_size", "Mq=0", lambda t, b: t.narrow(b.seq_axis, 0, 0)),
        on("k", "zero_size", "Mkv=0", lambda t, b: t.narrow(b.seq_axis, 0, 0), "v"),
        on("q", "zero_size", "B=0", lambda t, b: t[:0], "k", "v"),
        on("q", "zero_size", "H=0", lambda t, b: t.narrow(b.head_axis, 0, 0)),
        on("q", "zero_size", "D=0", lambda t, b: t[..., :0], "k", "v"),
        on("k", "batch", "B+1", lambda t, b: rand(b.shape(b.Hkv, b.Mkv, b=b.B + 1), t.dtype)),
        on("v", "batch", "B+1", lambda t, b: rand(b.shape(b.Hkv, b.Mkv, b=b.B + 1), t.dtype)),
        on("k", "heads", "H%Hkv", lambda t, b: rand(b.shape(b.H + 1, b.Mkv), t.dtype), "v"),
        on("v", "heads", "Hv!=Hkv", lambda t, b: rand(b.shape(b.Hkv + 1, b.Mkv), t.dtype)),
        on("v", "shape", "Mv!=Mkv", lambda t, b: rand(b.shape(b.Hkv, b.Mkv + 1), t.dtype)),
        on("k", "head_dim", "Dk=D+8", lambda t, b: rand(b.shape(b.Hkv, b.Mkv, b.D + 8), t.dtype), "v"),
        on("v", "head_dim", "Dv=D+8", lambda t, b: rand(b.shape(b.Hkv, b.Mkv, b.D + 8), t.dtype)),
    ]
    for d in (4, 7, 12, 264):
        out.append(edit(f"q+k+v:D={d}", "head_dim", "q", lambda a, b, d=d: a.update(
            q=rand(b.shape(b.H, b.Mq, d), a["q"].dtype), k=rand(b.shape(b.Hkv, b.Mkv, d), a["k"].dtype),
            v=rand(b.shape(b.Hkv, b.Mkv, d), a["v"].dtype))))
    out += bool_flags("causal", "return_lse")
    out += scale_mutations()
    out += [set_to("layout", v, "name") for v in ("BSHD", "sbhd", "thd", None, 0)]
    out += [set_to("backend", v, "name") for v in ("flash", "", "Reference", None, 3, "auto:ignore-env")]
    out += feature_mutations()
    # fp8-only arguments on float16/bfloat16/float32 inputs
    out += [set_to(n, lambda: torch.ones(2, 2), "descale", tag="on-non-fp8") for n in ("q_descale", "k_descale",
                                                                                     "v_descale")]
    out += [set_to("out_dtype", v, "dtype") for v in (torch.float16, torch.float32, torch.int8)]
    out += [set_to("out_dtype", "bfloat16", "type")]
    out += [set_to("v_layout", v, "name") for v in ("transposed", "Natural", None)]
    out += [set_to("fp8", v, "bool_arg") for v in (1, "yes")]
    out += [set_to("hadamard", v, "bool_arg") for v in (1, "yes")]
    out += [set_to("hadamard", True, "value", tag="True-without-fp8")]
    out += [
        edit("fp8=True:float32", "dtype", "q", lambda a, b: a.update(
            fp8=True, **{n: a[n].float() for n in "qkv"})),
        edit("fp8=True:k-float64", "dtype", "k", lambda a, b: a.update(
            fp8=True, **{n: a[n].half() for n in "qv"}, k=a["k"].double())),
        edit("fp8=True+q_descale", "descale", "q_descale", lambda a, b: a.update(
            fp8=True, q_descale=torch.ones(b.B, b.H), **half(a))),
        edit("fp8=True+out_dtype", "dtype", "out_dtype", lambda a, b: a.update(
            fp8=True, out_dtype=torch.bfloat16, **half(a))),
        edit("fp8=True+v_layout", "name", "v_layout", lambda a, b: a.update(
            fp8=True, v_layout="transposed", **half(a))),
        edit("fp8=True:requires_grad", "value", "fp8", lambda a, b: a.update(
            fp8=True, **{n: a[n].half().requires_grad_() for n in "qkv"})),
        edit("fp8=True+hadamard:D=24", "head_dim", "hadamard", lambda a, b: a.update(
            fp8=True, hadamard=True, q=rand(b.shape(b.H, b.Mq, 24)), k=rand(b.shape(b.Hkv, b.Mkv, 24)),
            v=rand(b.shape(b.Hkv, b.Mkv, 24)))),
    ]
    return out


def half(a: dict) -> dict:
    """q, k, v in float16: what fp8=True quantizes (so the mutation is the only fault)."""
    return {n: a[n].half() for n in "qkv"}


def fp8_inputs(a: dict, b: Base) -> None:
    for n in "qkv":
        a[n] = a[n].to(FP8)


def fp8_mutations() -> list[Mutation]:
    """attention / explain on float8_e4m3fn inputs with FlashAttention-3's descales."""
    out = []

    def fp8(mid, kind, arg, fn):
        def apply(a, b):
            fp8_inputs(a, b)
            fn(a, b)
        return Mutation("fp8:" + mid, kind, arg, apply)

    for n in ("q_descale", "k_descale", "v_descale"):
        out += [
            fp8(f"{n}:shape(B,)", "descale", n, lambda a, b, n=n: a.update({n: torch.ones(b.B)})),
            fp8(f"{n}:shape(B+1,Hkv)", "descale", n, lambda a, b, n=n: a.update({n: torch.ones(b.B + 1, b.Hkv)})),
            fp8(f"{n}:shape(B,H+1)", "descale", n, lambda a, b, n=n: a.update({n: torch.ones(b.B, b.H + 1)})),
            fp8(f"{n}:float16", "descale", n, lambda a, b, n=n: a.update({n: torch.ones(b.B, b.Hkv).half()})),
            fp8(f"{n}:float64", "descale", n, lambda a, b, n=n: a.update({n: torch.ones(b.B, b.Hkv).double()})),
            fp8(f"{n}:meta", "device", n, lambda a, b, n=n: a.update({n: torch.ones(b.B, b.Hkv, device="meta")})),
            fp8(f"{n}:float", "type", n, lambda a, b, n=n: a.update({n: 1.0})),
            fp8(f"{n}:list", "type", n, lambda a, b, n=n: a.update({n: [[1.0] * b.Hkv] * b.B})),
        ]
    out += [
        fp8("k_descale:shape(B,H)", "descale", "k_descale", lambda a, b: a.update(
            k_descale=torch.ones(b.B, b.H * 2))),  # only q_descale may be per query head
        fp8("out_dtype=float32", "dtype", "out_dtype", lambda a, b: a.update(out_dtype=torch.float32)),
        fp8("out_dtype=float8", "dtype", "out_dtype", lambda a, b: a.update(out_dtype=FP8)),
        fp8("out_dtype='bf16'", "type", "out_dtype", lambda a, b: a.update(out_dtype="bf16")),
        fp8("v_layout='T'", "name", "v_layout", lambda a, b: a.update(v_layout="T")),
        fp8("v_layout=transposed:D+8", "head_dim", "v", lambda a, b: a.update(
            v_layout="transposed", v=rand((b.B, b.Hkv, b.D + 8, b.Mkv)).to(FP8))),
        fp8("v_layout=transposed:3-d", "rank", "v", lambda a, b: a.update(
            v_layout="transposed", v=rand((b.Hkv, b.D, b.Mkv)).to(FP8))),
        fp8("k:float16", "dtype", "k", lambda a, b: a.update(k=a["k"].half())),
        fp8("v:meta", "device", "v", lambda a, b: a.update(v=meta(a["v"]))),
        fp8("q:requires_grad", "value", "q", lambda a, b: a.update(q=a["q"].requires_grad_())),
        fp8("fp8=True", "dtype", "q", lambda a, b: a.update(fp8=True)),
        fp8("D=7", "head_dim", "q", lambda a, b: a.update(
            q=rand(b.shape(b.H, b.Mq, 7)).to(FP8), k=rand(b.shape(b.Hkv, b.Mkv, 7)).to(FP8),
            v=rand(b.shape(b.Hkv, b.Mkv, 7)).to(FP8))),
    ]
    return out


def varlen_mutations(feature=True) -> list[Mutation]:
    out = non_tensors("q", "k", "v")[::2]
    out += [on(n, "rank", "4-d", lambda t, b: t[None]) for n in ("q", "k", "v")]
    out += [on("q", "rank", "2-d", lambda t, b: t[:, 0])]
    out += [on("q", "dtype", d, lambda t, b, d=d: t.to(d), "k", "v") for d in (torch.float64, FP8, torch.int32)]
    out += [on("k", "dtype", "differs", lambda t, b: t.to(torch.float64)),
            on("v", "device", "meta", lambda t, b: meta(t)), on("k", "device", "meta", lambda t, b: meta(t), "v")]
    out += [
        on("v", "heads", "Hv!=Hkv", lambda t, b: rand((t.shape[0], b.Hkv + 1, b.D), t.dtype)),
        on("k", "heads", "H%Hkv", lambda t, b: rand((t.shape[0], b.H + 1, b.D), t.dtype), "v"),
        on("k", "head_dim", "Dk=D+8", lambda t, b: rand((t.shape[0], b.Hkv, b.D + 8), t.dtype), "v"),
        on("q", "zero_size", "H=0", lambda t, b: t[:, :0]),
        on("q", "head_dim", "D=7", lambda t, b: t[..., :7], "k", "v"),
        on("q", "head_dim", "D=264", lambda t, b: rand((t.shape[0], t.shape[1], 264), t.dtype), "k", "v"),
    ]
    for name, total in (("cu_seqlens_q", "q"), ("cu_seqlens_k", "k")):
        out += [
            on(name, "cu_seqlens", "int64", lambda t, b: t.long()),
            on(name, "cu_seqlens", "float32", lambda t, b: t.float()),
            on(name, "cu_seqlens", "2-d", lambda t, b: t[None]),
            on(name, "cu_seqlens", "one-entry", lambda t, b: t[:1]),
            on(name, "device", "meta", lambda t, b: meta(t)),
            on(name, "cu_seqlens", "list", lambda t, b: t.tolist()),
            on(name, "cu_seqlens", "first!=0", lambda t, b: t + 1),
            on(name, "cu_seqlens", "decreasing", lambda t, b: torch.cat([t, torch.stack([t[-1] - 1, t[-1]])])),
            on(name, "cu_seqlens", "end<total", lambda t, b: torch.cat([t[:-1], t[-1:] - 1])),
            on(name, "cu_seqlens", "end>total", lambda t, b: torch.cat([t[:-1], t[-1:] + 1])),
        ]
    out += [on("cu_seqlens_k", "cu_seqlens", "B+1-sequences", lambda t, b: torch.cat([t[:1], t]))]
    for name in ("max_seqlen_q", "max_seqlen_k"):
        out += [
            on(name, "value", "too-small", lambda m, b: m - 1),
            set_to(name, 0, "value"), set_to(name, -1, "value"),
            set_to(name, 2.0, "type"), set_to(name, True, "type"), set_to(name, None, "type"),
            set_to(name, lambda: torch.tensor(3), "type", tag="tensor()"),
        ]
    out += bool_flags("causal", "return_lse")[::3] + scale_mutations()[::2]
    if feature:
        out += [set_to("backend", v, "name") for v in ("flash", None)]
        out += feature_mutations()[::2]
    return out


def kvcache_mutations(paged: bool) -> list[Mutation]:
    out = non_tensors("q", "k_cache", "v_cache")[::2]
    out += [on("q", "rank", "3-d", lambda t, b: t[0]), on("k_cache", "rank", "5-d", lambda t, b: t[None]),
            on("v_cache", "rank", "3-d", lambda t, b: t[0])]
    out += [on("q", "dtype", d, lambda t, b, d=d: t.to(d), "k_cache", "v_cache", "k", "v")
            for d in (torch.float64, FP8, torch.int32)]
    out += [on("k_cache", "dtype", "differs", lambda t, b: t.double()),
            on("v_cache", "device", "meta", lambda t, b: meta(t)),
            on("q", "zero_size", "Mq=0", lambda t, b: t[:, :0]),
            on("v_cache", "shape", "rows+1", lambda t, b: rand((t.shape[0], t.shape[1] + 1, *t.shape[2:]), t.dtype)),
            on("k_cache", "head_dim", "D+8", lambda t, b: rand((*t.shape[:3], b.D + 8), t.dtype), "v_cache"),
            on("k_cache", "heads", "H%Hkv", lambda t, b: rand((*t.shape[:2], b.H + 1, b.D), t.dtype), "v_cache"),
            on("k_cache", "stride", "last-dim-non-contiguous", lambda t, b: t.repeat_interleave(2, -1)[..., ::2]),
            on("v_cache", "stride", "last-dim-non-contiguous", lambda t, b: t.repeat_interleave(2, -1)[..., ::2]),
            on("q", "head_dim", "D=7", lambda t, b: t[..., :7], "k_cache", "v_cache", "k", "v"),
            on("q", "head_dim", "D=264", lambda t, b: rand((*t.shape[:3], 264), t.dtype), "k_cache", "v_cache", "k",
               "v")]
    # new keys / values
    out += [
        set_to("v", None, "missing", tag="k-without-v"), set_to("k", None, "missing", tag="v-without-k"),
        on("k", "dtype", "differs", lambda t, b: t.double()), on("v", "device", "meta", lambda t, b: meta(t)),
        on("k", "heads", "Hkv+1", lambda t, b: rand((b.B, t.shape[1], b.Hkv + 1, b.D), t.dtype), "v"),
        on("k", "batch", "B+1", lambda t, b: rand((b.B + 1, *t.shape[1:]), t.dtype), "v"),
        on("v", "shape", "Mnew+1", lambda t, b: rand((b.B, t.shape[1] + 1, b.Hkv, b.D), t.dtype)),
        on("k", "zero_size", "Mnew=0", lambda t, b: t[:, :0], "v"),
        on("k", "rank", "3-d", lambda t, b: t[0]),
        set_to("k", 1.0, "type"),
        set_to("cache_seqlens", None, "missing", tag="None-with-k"),
    ]
    # cache_seqlens
    out += [
        edit("cache_seqlens:int>capacity", "cache_seqlens", "cache_seqlens",
             lambda a, b: a.update(cache_seqlens=capacity_of(a) + 1)),
        edit("cache_seqlens:int-no-room", "cache_seqlens", "cache_seqlens",
             lambda a, b: a.update(cache_seqlens=capacity_of(a) - n_new(b) + 1)),
        set_to("cache_seqlens", -1, "cache_seqlens"),
        set_to("cache_seqlens", True, "type"), set_to("cache_seqlens", 1.0, "type"),
        on("cache_seqlens", "type", "list", lambda t, b: t.tolist()),
        on("cache_seqlens", "cache_seqlens", "int64", lambda t, b: t.long()),
        on("cache_seqlens", "cache_seqlens", "length-B+1", lambda t, b: torch.cat([t, t[:1]])),
        on("cache_seqlens", "cache_seqlens", "2-d", lambda t, b: t[None]),
        on("cache_seqlens", "device", "meta", lambda t, b: meta(t)),
        edit("cache_seqlens:value>capacity", "cache_seqlens", "cache_seqlens", lambda a, b: a.update(
            cache_seqlens=torch.full((b.B,), capacity_of(a), dtype=torch.int32))),
        on("cache_seqlens", "cache_seqlens", "negative", lambda t, b: t - 1 - t.max()),
    ]
    out += [set_to("num_splits", v, "value") for v in (-1, -8)]
    out += [set_to("num_splits", v, "type") for v in (1.5, True, "2", None)]
    out += bool_flags("causal", "return_lse")[::2] + scale_mutations()[::2]
    out += [set_to("window_size", (-2, -1), "window"), set_to("softcap", float("nan"), "value"),
            on("alibi_slopes", "alibi", "shape(H+1,)", lambda t, b: torch.ones(b.H + 1)),
            on("alibi_slopes", "alibi", "float16", lambda t, b: torch.ones(b.H).half())]
    if paged:
        n_blocks = lambda a: a["k_cache"].shape[0]
        out += [
            on("block_table", "block_table", "int64", lambda t, b: t.long()),
            on("block_table", "block_table", "float32", lambda t, b: t.float()),
            on("block_table", "device", "meta", lambda t, b: meta(t)),
            on("block_table", "block_table", "1-d", lambda t, b: t.flatten()),
            on("block_table", "block_table", "3-d", lambda t, b: t[None]),
            on("block_table", "block_table", "B+1-rows", lambda t, b: torch.cat([t, t[:1]])),
            on("block_table", "block_table", "0-columns", lambda t, b: t[:, :0]),
            on("block_table", "stride", "non-contiguous", lambda t, b: t.repeat_interleave(2, 1)[:, ::2]),
            on("block_table", "type", "list", lambda t, b: t.tolist()),
            edit("block_table:page>=n_blocks", "block_table", "block_table", lambda a, b: a["block_table"].__setitem__(
                (0, 0), n_blocks(a))),
            edit("block_table:page<0", "block_table", "block_table", lambda a, b: a["block_table"].__setitem__(
                (b.B - 1, 0), -1)),
        ]
    return out


def quantize_mutations() -> list[Mutation]:
    out = [set_to("x", v) for v in (None, 1.0)] + [set_to("x", lambda: [[1.0]], tag="list")]
    out += [on("x", "dtype", str(d)[6:], lambda t, b, d=d: t.to(d)) for d in (torch.float64, torch.int32, FP8,
                                                                             torch.bool)]
    out += [on("x", "rank", "3-d", lambda t, b: t[0]), on("x", "rank", "5-d", lambda t, b: t[None]),
            on("x", "zero_size", "M=0", lambda t, b: t.narrow(b.seq_axis, 0, 0)),
            on("x", "zero_size", "D=0", lambda t, b: t[..., :0])]
    out += [set_to("granularity", v, "name") for v in ("per_row", None, 1)]
    out += [set_to("layout", v, "name") for v in ("sbhd", None, "BSHD")]
    return out


def hadamard_mutations() -> list[Mutation]:
    out = [set_to("x", v) for v in (None, 1.0)] + [set_to("x", lambda: [[1.0]], tag="list")]
    out += [on("x", "rank", "0-d", lambda t, b: t.flatten()[0]),
            on("x", "head_dim", "D=24", lambda t, b: rand((*t.shape[:-1], 24))),
            on("x", "head_dim", "D=12", lambda t, b: rand((*t.shape[:-1], 12))),
            on("x", "zero_size", "D=0", lambda t, b: t[..., :0]),
            on("x", "dtype", "int32", lambda t, b: t.int()), on("x", "dtype", "bool", lambda t, b: t.bool())]
    return out


def sdpa_mutations() -> list[Mutation]:
    out = [set_to(n, v) for n in ("query", "key", "value") for v in (None, 1.0)]
    out += bool_flags("is_causal", "enable_gqa")
    out += [set_to("scale", v, "value") for v in (float("nan"), float("inf"))]
    out += [set_to("scale", v, "type") for v in ("0.1", True)]
    out += [set_to("dropout_p", v, "value") for v in (-0.1, 1.0)] + [set_to("dropout_p", "0.1", "type")]
    out += [
        edit("attn_mask+is_causal", "value", "attn_mask", lambda a, b: a.update(
            is_causal=True, attn_mask=torch.ones(b.Mq, b.Mkv, dtype=torch.bool))),
        edit("attn_mask:shape", "shape", "attn_mask", lambda a, b: a.update(
            attn_mask=torch.ones(b.Mq + 1, b.Mkv + 1, dtype=torch.bool))),
        edit("attn_mask:int32", "dtype", "attn_mask", lambda a, b: a.update(
            attn_mask=torch.ones(b.Mq, b.Mkv, dtype=torch.int32))),
        edit("attn_mask:meta", "device", "attn_mask", lambda a, b: a.update(
            attn_mask=torch.ones(b.Mq, b.Mkv, dtype=torch.bool, device="meta"))),
        edit("attn_mask:list", "type", "attn_mask", lambda a, b: a.update(attn_mask=[[True]])),
        edit("gqa-without-enable_gqa", "heads", "enable_gqa", lambda a, b: a.update(enable_gqa=False)),
        on("key", "heads", "H%Hkv", lambda t, b: rand((b.B, b.H + 1, b.Mkv, b.D), t.dtype), "value"),
        on("value", "heads", "Hv!=Hkv", lambda t, b: rand((b.B, b.Hkv + 1, b.Mkv, b.D), t.dtype)),
        on("value", "shape", "Mv!=Mkv", lambda t, b: rand((b.B, b.Hkv, b.Mkv + 1, b.D), t.dtype)),
        on("key", "dtype", "differs", lambda t, b: t.double()),
        on("value", "dtype", "differs", lambda t, b: t.to(torch.float32 if t.dtype != torch.float32 else torch.half)),
        on("key", "device", "meta", lambda t, b: meta(t)),
        on("value", "device", "meta", lambda t, b: meta(t)),
    ]
    return out


def sdpa_base(b: Base) -> Base:
    return replace(b, layout="bhsd", group=max(b.group, 2))  # GQA: enable_gqa is needed


def sdpa_args(b: Base) -> dict:
    a = qkv(b)
    return {"query": a["q"], "key": a["k"], "value": a["v"], "enable_gqa": True}


def packed_mutations(name: str, parts: int) -> list[Mutation]:
    out = [set_to(name, v) for v in (None, 1.0)]
    out += [on(name, "rank", "4-d", lambda t, b: t[0]), on(name, "rank", "6-d", lambda t, b: t[None]),
            on(name, "shape", f"{parts + 1}-parts", lambda t, b: torch.cat([t, t[:, :, :1]], 2)),
            on(name, "dtype", "float64", lambda t, b: t.double()), on(name, "dtype", "int32", lambda t, b: t.int()),
            on(name, "head_dim", "D=7", lambda t, b: t[..., :7]),
            on(name, "zero_size", "D=0", lambda t, b: t[..., :0]),
            on(name, "zero_size", "M=0", lambda t, b: t[:, :0])]
    if name == "kv":
        out += [on("kv", "dtype", "differs-from-q", lambda t, b: t.float() if t.dtype != torch.float32 else t.half()),
                on("kv", "device", "meta", lambda t, b: meta(t)),
                on("kv", "heads", "H%Hkv", lambda t, b: rand((*t.shape[:3], b.H + 1, b.D), t.dtype)),
                on("kv", "batch", "B+1", lambda t, b: rand((b.B + 1, *t.shape[1:]), t.dtype)),
                on("kv", "head_dim", "Dkv=D+8", lambda t, b: rand((*t.shape[:4], b.D + 8), t.dtype))]
    out += [set_to("dropout_p", -0.1, "value"), set_to("causal", 1, "bool_arg"),
            set_to("window_size", (-2, -1), "window"), set_to("return_attn_probs", 1, "bool_arg"),
            set_to("softmax_scale", float("nan"), "value"), set_to("deterministic", "yes", "bool_arg")]
    return out


def use_backend_call(name):
    with fa2dispatch.use_backend(name):
        pass


def hf_register(name):
    from fa2dispatch.integrations import hf

    return hf.register(name)


# ------------------------------------------------------------------ the catalogue


@dataclass(frozen=True)
class Function:
    """A public function, its valid call on a base, and its mutations."""

    name: str
    call: Callable
    valid: Callable[[Base], dict]
    mutations: list
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32)
    layouts: tuple = ("bshd", "bhsd")
    # the base this function's valid call is built on (a fixed layout, GQA for SDPA ...): the
    # mutations see the same base
    normalize: Callable[[Base], Base] = lambda b: b


def _dense(b):
    return {**qkv(b), "layout": b.layout}


def _bshd(b):
    return qkv(b)


def _qkvpacked(b):
    return {"qkv": rand((b.B, b.Mq, 3, b.H, b.D), b.dtype)}


def _kvpacked(b):
    return {"q": rand(b.shape(b.H, b.Mq), b.dtype), "kv": rand((b.B, b.Mkv, 2, b.Hkv, b.D), b.dtype)}


def _quantize(b):
    return {"x": rand(b.shape(b.H, b.Mq), b.dtype), "layout": b.layout}


def _hadamard(b):
    return {"x": rand(b.shape(b.H, b.Mq), b.dtype)}


def _compat_kvcache(paged):
    return lambda b: kvcache_args(b, paged)


DENSE = dense_mutations()
FP8_MUTATIONS = fp8_mutations()
FUNCTIONS = [
    Function("attention", fa2dispatch.attention, _dense, DENSE + FP8_MUTATIONS),
    Function("explain", fa2dispatch.explain, _dense, DENSE + FP8_MUTATIONS),
    Function("attention_varlen", fa2dispatch.attention_varlen, varlen_args, varlen_mutations()),
    Function("explain_varlen", fa2dispatch.explain_varlen, varlen_args, varlen_mutations()),
    Function("attention_with_kvcache", kvcache.attention_with_kvcache, lambda b: kvcache_args(b),
             kvcache_mutations(False)),
    Function("attention_with_kvcache[paged]", kvcache.attention_with_kvcache, lambda b: kvcache_args(b, True),
             kvcache_mutations(True)),
    Function("quantize_fp8", fa2dispatch.quantize_fp8, _quantize, quantize_mutations()),
    Function("hadamard", fa2dispatch.hadamard, _hadamard, hadamard_mutations()),
    # use_backend(name): the message calls its argument what it is, "backend=..." (dispatch.py)
    Function("use_backend", use_backend_call, lambda b: {"name": "reference"},
             [replace(set_to("name", v, "name"), arg="backend") for v in ("flash", "", "Reference", None, 3,
                                                                          "auto:ignore-env")],
             dtypes=(torch.float16,), layouts=("bshd",)),
    Function("compat.flash_attn_func", compat.flash_attn_func, _bshd,
             [m for m in DENSE if m.arg in ("q", "k", "v", "causal", "softmax_scale", "window_size", "softcap",
                                            "alibi_slopes", "dropout_p", "deterministic")
              and "fp8" not in m.id][::2]
             + bool_flags("return_attn_probs"), layouts=("bshd",)),
    Function("compat.flash_attn_qkvpacked_func", compat.flash_attn_qkvpacked_func, _qkvpacked,
             packed_mutations("qkv", 3), layouts=("bshd",), normalize=lambda b: replace(b, group=1)),
    Function("compat.flash_attn_kvpacked_func", compat.flash_attn_kvpacked_func, _kvpacked,
             packed_mutations("kv", 2), layouts=("bshd",)),
    Function("compat.flash_attn_varlen_func", compat.flash_attn_varlen_func, varlen_args,
             varlen_mutations(feature=False)[::2] + bool_flags("return_attn_probs")),
    Function("compat.flash_attn_with_kvcache", compat.flash_attn_with_kvcache, _compat_kvcache(True),
             [m for m in kvcache_mutations(True) if m.arg not in ("return_lse",)][::2]
             + bool_flags("rotary_interleaved", "return_softmax_lse")),
    Function("compat.scaled_dot_product_attention", compat.scaled_dot_product_attention, sdpa_args,
             sdpa_mutations(), layouts=("bhsd",), normalize=sdpa_base),
    Function("compat.explain_sdpa", compat.explain_sdpa, sdpa_args, sdpa_mutations(), layouts=("bhsd",),
             normalize=sdpa_base),
    Function("integrations.hf.register", hf_register, lambda b: {"name": "fa2dispatch"},
             [set_to("name", v, "name") for v in ("", None, 3, b"fa2dispatch")],
             dtypes=(torch.float16,), layouts=("bshd",)),
]
BY_NAME = {f.name: f for f in FUNCTIONS}
# hf.register imports transformers (seconds): the parametrized sweep covers it once; the
# hypothesis driver draws from the rest.
HYPOTHESIS_FUNCTIONS = [f for f in FUNCTIONS if f.name != "integrations.hf.register"]


def names_argument(message: str, arg: str) -> bool:
    """``arg`` appears in the message as a word of its own (``k`` in ``k_cache`` does not count)."""
    return re.search(rf"(?<![\w-]){re.escape(arg)}(?!\w)", message) is not None


def base_for(function: Function, base: Base) -> Base:
    if base.layout not in function.layouts:
        base = replace(base, layout=function.layouts[0])
    return function.normalize(base)


def invalid_call(function: Function, mutation: Mutation, base: Base) -> Exception:
    """Build the valid call, apply the mutation, call: assert the right error, naming the argument,
    with nothing written into a KV cache. (The kernels are blocked by the fixture.)"""
    base = base_for(function, base)
    args = function.valid(base)
    mutation.apply(args, base)
    caches = {n: args[n].clone() for n in ("k_cache", "v_cache")
              if isinstance(args.get(n), torch.Tensor) and args[n].device.type == "cpu"}
    with pytest.raises((ValueError, TypeError)) as info:
        function.call(**args)
    message = str(info.value)
    assert names_argument(message, mutation.arg), (
        f"{function.name} {mutation.id}: {type(info.value).__name__} does not name {mutation.arg!r}: {message}")
    for n, before in caches.items():
        assert torch.equal(args[n], before), f"{function.name} {mutation.id}: {n} written before the error"
    return info.value


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def blocked(no_kernel_launch, monkeypatch):
    """conftest's no_kernel_launch, plus the KV-cache entry point, and no environment choice."""
    from fa2dispatch.backends import BACKENDS

    def launched(*args, **kwargs):
        raise AssertionError("kernel launched")

    for backend in BACKENDS.values():
        monkeypatch.setattr(backend, "forward_kvcache", launched, raising=False)
    for name in (dispatch.ENV_BACKEND, ENV_SIMULATE):
        monkeypatch.delenv(name, raising=False)
    dispatch.clear_memo()


def valid_call(function: Function, base: Base) -> str:
    """The unmutated call passes validation: it reaches a (blocked) backend, or, for functions
    with no kernel behind them, returns. Returns which of the two happened."""
    valid = function.valid(base_for(function, base))
    if function.name in ("use_backend", "integrations.hf.register", "quantize_fp8", "hadamard"):
        function.call(**valid)
        return "returned"
    if function.name in ("explain", "explain_varlen", "compat.explain_sdpa"):
        assert function.call(**valid) is not None
        return "returned"
    with pytest.raises(AssertionError, match="kernel launched"):
        function.call(**valid)
    return "reached a backend"


def test_the_valid_base_calls_reach_a_backend(blocked):
    """Every valid base call passes validation and reaches a (blocked) backend, so the errors
    below come from the one mutation, and validation ran before any kernel."""
    outcomes = {function.name: valid_call(function, FIXED) for function in FUNCTIONS}
    assert len(outcomes) == len(FUNCTIONS)
    assert outcomes["attention"] == outcomes["attention_varlen"] == "reached a backend", outcomes


# ------------------------------------------------------------------ the explicit sweep

SWEEP = [pytest.param(f.name, i, id=f"{f.name}-{m.id}") for f in FUNCTIONS for i, m in enumerate(f.mutations)]


@pytest.mark.parametrize("function_name, index", SWEEP)
def test_invalid_call(function_name, index, blocked):
    function = BY_NAME[function_name]
    error = invalid_call(function, function.mutations[index], FIXED)
    assert isinstance(error, (ValueError, TypeError))


def test_sweep_counts_at_least_200_distinct_invalid_calls(blocked):
    """The sweep above, run in one place and counted: distinct (function, mutation) calls."""
    seen = Counter()
    for function in FUNCTIONS:
        for mutation in function.mutations:
            invalid_call(function, mutation, FIXED)
            seen[(function.name, mutation.id)] += 1
    assert len(seen) == len(SWEEP) >= 200, len(seen)


# ------------------------------------------------------------------ the hypothesis driver


def bases(function: Function):
    return st.builds(Base, B=st.integers(1, 3), Hkv=st.integers(1, 3), group=st.integers(1, 3),
                     Mq=st.integers(1, 6), Mkv=st.integers(1, 7), D=st.sampled_from([8, 16, 32, 64]),
                     dtype=st.sampled_from(function.dtypes), layout=st.sampled_from(function.layouts))


@st.composite
def calls(draw):
    function = draw(st.sampled_from(HYPOTHESIS_FUNCTIONS))
    mutation = draw(st.sampled_from(function.mutations))
    return function, mutation, draw(bases(function))


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(HYPOTHESIS_FUNCTIONS).flatmap(lambda f: st.tuples(st.just(f), bases(f))))
def test_hypothesis_bases_are_valid(blocked, drawn):
    """The random bases the driver below mutates are valid calls themselves."""
    valid_call(*drawn)


def test_hypothesis_invalid_calls(blocked):
    """(function, mutation, random valid base shapes): at least 200 distinct invalid calls, each
    refused with ValueError/TypeError naming the argument, no kernel launched."""
    seen = set()

    @settings(max_examples=1000, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(calls())
    def check(call):
        function, mutation, base = call
        invalid_call(function, mutation, base)
        seen.add((function.name, mutation.id, base))

    start = time.perf_counter()
    check()
    assert len(seen) >= 200, len(seen)
    functions = {name for name, _, _ in seen}
    assert functions == {f.name for f in HYPOTHESIS_FUNCTIONS}, functions
    print(f"hypothesis: {len(seen)} distinct invalid calls over {len(functions)} functions "
          f"in {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------ the CLI


def error_lines(err: str) -> list[str]:
    """stderr without argparse's usage block: what is left must be the one error line."""
    lines, in_usage = [], False
    for line in err.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):
            continue
        in_usage = False
        if line.strip():
            lines.append(line)
    return lines


@pytest.fixture
def cli_env(tmp_path, monkeypatch, blocked):
    for name in (dispatch.ENV_BACKEND, ENV_SIMULATE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path / "user"))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    return tmp_path


SMALL = ["--dtype", "fp16", "--head-dim", "64", "--seqlen", "128", "--mode", "fwd", "--causal", "false"]

# (id, argv, environment, the argument the message must name); "{file}": a regular file,
# "{tmp}": the test's temporary directory
CLI_CASES = [
    ("no-command", [], {}, "command"),
    ("unknown-command", ["bench"], {}, "command"),
    ("unknown-command-case", ["Report"], {}, "command"),
    ("report-unknown-flag", ["report", "--jsn"], {}, "--jsn"),
    ("report-simulate-unknown", ["report", "--simulate", "z80"], {}, "--simulate"),
    ("info-simulate-missing-value", ["info", "--simulate"], {}, "--simulate"),
    ("info-extra-argument", ["info", "extra"], {}, "extra"),
    ("demo-unknown-flag", ["demo", "--json"], {}, "--json"),
    ("env-simulate-report", ["report"], {ENV_SIMULATE: "z80"}, ENV_SIMULATE),
    ("env-simulate-report-json", ["report", "--json"], {ENV_SIMULATE: "H100"}, ENV_SIMULATE),
    ("env-simulate-info", ["info"], {ENV_SIMULATE: "garbage"}, ENV_SIMULATE),
    ("env-simulate-autotune", ["autotune", "--dry-run"], {ENV_SIMULATE: "z80"}, ENV_SIMULATE),
    ("env-backend-demo", ["demo"], {"FA2DISPATCH_BACKEND": "flash"}, "FA2DISPATCH_BACKEND"),
    ("env-backend-autotune", ["autotune", *SMALL], {"FA2DISPATCH_BACKEND": "Reference"}, "FA2DISPATCH_BACKEND"),
    ("autotune-head-dim-7", ["autotune", "--dry-run", "--head-dim", "7"], {}, "--head-dim"),
    ("autotune-head-dim-word", ["autotune", "--dry-run", "--head-dim", "abc"], {}, "--head-dim"),
    ("autotune-head-dim-empty", ["autotune", "--dry-run", "--head-dim", ""], {}, "--head-dim"),
    ("autotune-head-dim-trailing-comma", ["autotune", "--dry-run", "--head-dim", "64,"], {}, "--head-dim"),
    ("autotune-seqlen-0", ["autotune", "--dry-run", "--seqlen", "0"], {}, "--seqlen"),
    ("autotune-seqlen-negative", ["autotune", "--dry-run", "--seqlen=-5"], {}, "--seqlen"),
    ("autotune-seqlen-3-parts", ["autotune", "--dry-run", "--seqlen", "1x2x3"], {}, "--seqlen"),
    ("autotune-dtype", ["autotune", "--dry-run", "--dtype", "fp64"], {}, "--dtype"),
    ("autotune-causal", ["autotune", "--dry-run", "--causal", "maybe"], {}, "--causal"),
    ("autotune-group-0", ["autotune", "--dry-run", "--group", "0"], {}, "--group"),
    ("autotune-group-float", ["autotune", "--dry-run", "--group", "1.5"], {}, "--group"),
    ("autotune-mode", ["autotune", "--dry-run", "--mode", "both"], {}, "--mode"),
    ("autotune-backends", ["autotune", "--dry-run", "--backends", "flash"], {}, "--backends"),
    ("autotune-runs-small", ["autotune", "--dry-run", "--runs", "1"], {}, "--runs"),
    ("autotune-runs-word", ["autotune", "--dry-run", "--runs", "x"], {}, "--runs"),
    ("autotune-quick-full", ["autotune", "--dry-run", "--quick", "--full"], {}, "--full"),
    ("autotune-cache-dir-missing-value", ["autotune", "--dry-run", "--cache-dir"], {}, "--cache-dir"),
    ("autotune-cache-dir-empty", ["autotune", "--dry-run", "--cache-dir", ""], {}, "--cache-dir"),
    ("autotune-cache-dir-is-a-file", ["autotune", "--dry-run", *SMALL, "--cache-dir", "{file}"], {}, "--cache-dir"),
    ("autotune-cache-dir-is-a-file-run", ["autotune", *SMALL, "--cache-dir", "{file}"], {}, "--cache-dir"),
    ("autotune-cache-dir-under-a-file", ["autotune", *SMALL, "--cache-dir", "{file}/sub/dir"], {}, "--cache-dir"),
    ("autotune-env-cache-dir-is-a-file", ["autotune", "--dry-run", *SMALL], {cache.ENV_CACHE_DIR: "{file}"},
     cache.ENV_CACHE_DIR),
    ("autotune-env-cache-dir-under-a-file", ["autotune", *SMALL], {cache.ENV_CACHE_DIR: "{file}/x"},
     cache.ENV_CACHE_DIR),
]


def _fill(text: str, tmp) -> str:
    return text.replace("{file}", str(tmp / "a_file")).replace("{tmp}", str(tmp))


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, env, arg", [pytest.param(a, e, n, id=i) for i, a, e, n in CLI_CASES])
def test_cli_malformed_arguments_exit_2(argv, env, arg, cli_env, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, _fill(value, cli_env))
    dispatch.clear_memo()
    code, err = run_cli([_fill(a, cli_env) for a in argv], capsys)
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1 and "error:" in lines[0], err
    assert arg in lines[0], f"{arg!r} not named: {lines[0]}"


@pytest.mark.parametrize("flag", ["--cache-dir", cache.ENV_CACHE_DIR])
def test_cli_unwritable_cache_dir_exits_2(flag, cli_env, monkeypatch, capsys):
    """A directory autotune cannot write into. Root writes anywhere (CI containers run as root),
    so the permission is denied through os.access, which is what the CLI asks."""
    locked = cli_env / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path).startswith(str(locked))
                        else real_access(path, mode, **kw))
    for target in (locked, locked / "sub"):
        argv = ["autotune", *SMALL]
        if flag == "--cache-dir":
            argv += ["--cache-dir", str(target)]
        else:
            monkeypatch.setenv(flag, str(target))
        code, err = run_cli(argv, capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and flag in lines[0] and "not writable" in lines[0], err


def test_cli_a_missing_cache_dir_is_not_an_error(cli_env, capsys):
    """A cache dir that does not exist yet (parents neither) is created by the autotuner: valid."""
    code, err = run_cli(["autotune", "--dry-run", *SMALL, "--cache-dir", str(cli_env / "new" / "deeper")], capsys)
    assert code == 0, err


def test_cli_sweep_counts_its_cases():
    assert len({i for i, *_ in CLI_CASES}) == len(CLI_CASES) >= 30
