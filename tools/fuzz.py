"""Numerics fuzzer (issue 9, "Numerics"): random valid calls against the float64 reference.

Draws ``--n`` random valid configurations from a fixed seed, across every feature and dtype:
odd lengths drawn log-uniform up to ~4k, Mq != Mkv, GQA/MQA, head dims 8..256, both layouts,
strided inputs, windows, softcap, ALiBi, dropout (seeded), top-left causal, deterministic,
varlen, float16/bfloat16/float32, and fp8 (through the fp8 path where the device has it).
Each runs through the dispatcher's choice (``backend="auto"``) and forced onto the Triton
kernels (``"triton"``, or ``"triton-fp8"`` for fp8) where they can run it, forward and, where
the call has gradients, backward; each result is checked against ``attention_math`` in float64
with the STYLE.md rule (``tests/helpers.py``: ours within 2x PyTorch's own error in the same
precision plus 8 float32 ulps).

Then a few long sequences (16k, 32k, 64k, B = H = 1), whose float64 reference is computed in
chunks of query rows (``chunked_reference``), and the calls with more than 2^31 elements in ONE
batch element of one tensor (64-bit offsets inside the kernels: a large batch only exercises
the batch offset): (1, M, 8, 128) q or k/v, and strided views of a packed qkv / kv whose row
stride carries the offset past 2^31 (``big_inputs``); forward only, a sample of rows checked.
Every such call runs in its own process, so an illegal address (a CUDA error poisons its
context) is reported, not fatal.

    python tools/fuzz.py --json fuzz.json          # GPU: 1000 configs + long + >2^31
    python tools/fuzz.py --time-limit 300          # stop drawing random configs after 300 s
    python tools/fuzz.py --device cpu --n 30       # smoke test: reference + Triton interpreter

On a GPU the random configs share ``--pool`` (64) kernel specialisations (dtype, head dim,
causal, layout, which features are on: the Triton kernels compile one variant per combination,
seconds each) while shapes, lengths and feature values vary per config; they run in
``--workers`` processes (one per core up to 16) that take work from one queue, costliest first
(``queue_order``: runs of configs of one specialisation, so a worker compiles a variant once).
A worker that dies, or whose CUDA context an error poisoned, is reported with the config it was
running; the rest of its work item goes back on the queue and a fresh worker takes its place.
Exit code 1 on any mismatch, error or crash; the summary tables (by kind, dtype, feature,
backend) go to stdout and, with every result, to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# fixed shapes of the long and >2^31 cases
LONG_LENGTHS = (16383, 32769, 65535)  # odd, 16k / 32k / 64k
BIG_ROWS = 2**21 + 2**15 + 1  # x H=8 x D=128 = 2.18e9 elements > 2^31 in one batch element
BIG_H, BIG_D = 8, 128
BIG_LIMIT = 2**31  # the element offset the >2^31 cases pass
CHUNK_ROWS = 1024  # query rows per chunk of the long references: (1024 x 64k) float64 = 512 MiB
FULL_LOWPREC_MAX = 2**28  # B*H*Mq*Mkv up to which the low-precision reference runs unchunked


# ---------------------------------------------------------------------------- environment


def setup(device: str):
    """Import torch and fa2dispatch for ``device``: on CPU the Triton kernels run under the
    interpreter with the test harness's fixes for its known defects (tests/interpreter_fixes.py)."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch  # noqa: F401

    import interpreter_fixes

    from fa2dispatch.backends.triton_fa2 import _interpreting

    if _interpreting():
        interpreter_fixes.install()


def fp8_supported(device: str) -> bool:
    import torch

    if device == "cpu":
        return True  # the fp8 kernel runs under the interpreter
    return torch.cuda.get_device_capability() >= (8, 9)


# ---------------------------------------------------------------------------- drawing configs


def _odd_log_uniform(r: random.Random, hi: int) -> int:
    return min(hi, int(math.exp(r.uniform(0, math.log(hi)))) | 1)


def draw_spec(r: random.Random, device: str, fp8_ok: bool) -> dict:
    """What fixes the compiled kernel: call kind, dtype, head dim, causal, layout, gradients and
    which features are on (the Triton kernels are specialised on all of these)."""
    kind = r.choices(["dense", "varlen", "fp8"], weights=[75, 15, 10 if fp8_ok else 0])[0]
    spec = dict(kind=kind, D=8 * r.randint(1, (256 if device != "cpu" else 64) // 8), causal=r.random() < 0.5,
                grad=False, layout="bshd", contiguous=True, dtype="float8_e4m3fn", window=None, softcap=False,
                alibi=None, dropout=False, top_left=False, deterministic=False)
    if kind == "fp8":
        spec["layout"] = r.choice(["bshd", "bhsd"])
        return spec
    spec.update(dtype=r.choice(["float16", "bfloat16", "float32"]), grad=r.random() < 0.7)
    if kind == "dense":
        spec.update(layout=r.choice(["bshd", "bhsd"]), contiguous=r.random() < 0.8)
    if r.random() < 0.3:
        spec["window"] = r.choice(["left", "right", "both", "both"])
    spec["softcap"] = r.random() < 0.2
    spec["alibi"] = r.choice(["h", "bh"]) if r.random() < 0.2 else None
    spec["dropout"] = r.random() < 0.2
    spec["top_left"] = (spec["causal"] or spec["window"] is not None) and r.random() < 0.4
    spec["deterministic"] = r.random() < 0.1
    return spec


def draw_config(r: random.Random, index: int, device: str, spec: dict, spec_id: int = -1) -> dict:
    """One random valid call of the kernel ``spec``: shapes, lengths (odd, log-uniform), GQA,
    window sizes, softcap value, slopes, dropout p and seed are drawn here. Sizes keep the
    float64 reference (which materialises the (B, H, Mq, Mkv) scores) small: B*H*Mq*Mkv <= 2^24
    on a GPU; tiny shapes on CPU."""
    gpu = device != "cpu"
    max_len, max_bh, budget = (4097, 32, 2**24) if gpu else (48, 4, 2**13)
    kind = spec["kind"]
    Hkv = r.choice([1, 1, 2, 4])
    group = r.choice([1, 1, 2, 4])
    while Hkv * group > max_bh:
        if group > 1:
            group //= 2
        else:
            Hkv //= 2
    H = Hkv * group
    B = r.choice([1, 1, 2, 3])
    while B * H > max_bh:
        B -= 1
    Mq = _odd_log_uniform(r, max_len)
    Mkv = Mq if r.random() < 0.25 else _odd_log_uniform(r, max_len)
    if spec["dropout"] and kind != "varlen":
        budget //= 2  # the reference's (B, H, Mq, Mkv) dropout mask and its Philox temporaries
    while B * H * Mq * Mkv > budget:  # shrink the longer side first
        if Mq >= Mkv:
            Mq = max(1, Mq // 2) | 1
        else:
            Mkv = max(1, Mkv // 2) | 1
    cfg = dict(index=index, spec=spec_id, kind=kind, B=B, H=H, Hkv=Hkv, Mq=Mq, Mkv=Mkv, D=spec["D"],
               seed=1000 + index, causal=spec["causal"], grad=spec["grad"], layout=spec["layout"],
               contiguous=spec["contiguous"], dtype=spec["dtype"], features={})
    if kind == "fp8":
        return cfg
    feats: dict = {}
    if spec["window"] is not None:
        left = r.randint(0, Mkv) if spec["window"] in ("left", "both") else -1
        right = r.randint(0, Mkv) if spec["window"] in ("right", "both") else -1
        feats["window_size"] = [left, right]
    if spec["softcap"]:
        feats["softcap"] = round(10 ** r.uniform(0, 1.7), 3)
    if spec["alibi"]:
        feats["alibi"] = spec["alibi"]
    if spec["dropout"]:
        feats["dropout_p"] = r.choice([0.1, 0.17, 0.3, 0.5])
    if spec["top_left"]:
        feats["causal_alignment"] = "top_left"
    if spec["deterministic"]:
        feats["deterministic"] = True
    cfg["features"] = feats
    if kind == "varlen":
        n = r.randint(1, 5)
        cfg["lens_q"] = [0 if r.random() < 0.1 else _odd_log_uniform(r, Mq) for _ in range(n)]
        cfg["lens_k"] = [0 if r.random() < 0.1 else _odd_log_uniform(r, Mkv) for _ in range(n)]
        cfg["lens_q"][0] = max(cfg["lens_q"][0], 1)  # at least one query row
        cfg.update(B=n, Mq=max(cfg["lens_q"]), Mkv=max(1, max(cfg["lens_k"])))
    return cfg


def draw_scale(seed: int, index: int, D: int) -> float:
    """A softmax_scale for config ``index`` (``--scales``), from a stream of its own so the rest
    of every config is what it is without the option: the default 1/sqrt(D) times a log-uniform
    factor in [1/4, 8] (60%), a negative scale (25%: the largest scaled score is the smallest
    raw one), or 0 (15%: uniform weights over the visible keys)."""
    r = random.Random(seed * 1_000_003 + index)
    kind = r.choices(["positive", "negative", "zero"], weights=[60, 25, 15])[0]
    if kind == "zero":
        return 0.0
    value = round(D**-0.5 * 2 ** r.uniform(-2, 3), 6)
    return value if kind == "positive" else -value


def draw_configs(n: int, seed: int, device: str, fp8_ok: bool, pool: int, scales: bool = False) -> list[dict]:
    """n configs. With ``pool`` > 0 they share ``pool`` kernel specialisations (drawn first),
    so that compilation (seconds per specialisation and kernel, the bulk of a GPU run) stays
    bounded while shapes and feature values vary per config; 0: every config its own.
    ``scales``: each config also gets a drawn ``softmax_scale`` (``draw_scale``); without it
    every call takes the default 1/sqrt(D), as the session 6-7 runs did."""
    r = random.Random(seed)
    specs = [draw_spec(r, device, fp8_ok) for _ in range(pool)]
    out = []
    for i in range(n):
        if pool:
            sid = r.randrange(pool)
            out.append(draw_config(r, i, device, specs[sid], sid))
        else:
            out.append(draw_config(r, i, device, draw_spec(r, device, fp8_ok), i))
        if scales:
            out[-1]["softmax_scale"] = draw_scale(seed, i, out[-1]["D"])
    return out


def draw_long_configs(r: random.Random, device: str) -> list[dict]:
    """The long sequences: 16k / 32k / 64k, B = H = 1, D small, 16-bit; gradients checked in full
    at 16k (dq at every length: its rows are independent, so row chunks reproduce it exactly)."""
    if device == "cpu":
        return []
    out = []
    plans = [(LONG_LENGTHS[0], LONG_LENGTHS[0], True, {}), (LONG_LENGTHS[0], 4095, True, dict(softcap=30.0)),
             (LONG_LENGTHS[1], LONG_LENGTHS[1], True, dict(window_size=[4096, -1])),
             (2049, LONG_LENGTHS[1], False, dict(alibi="h")),
             (LONG_LENGTHS[2], LONG_LENGTHS[2], True, {}),
             (LONG_LENGTHS[2], LONG_LENGTHS[2], False, dict(dropout_p=0.1))]
    for i, (mq, mkv, causal, feats) in enumerate(plans):
        out.append(dict(index=100000 + i, kind="long", B=1, H=1, Hkv=1, Mq=mq, Mkv=mkv, D=r.choice([32, 64]),
                        seed=7000 + i, causal=causal, grad=True, layout="bshd", contiguous=True,
                        dtype=r.choice(["float16", "bfloat16"]), features=feats))
    return out


# ---------------------------------------------------------------------------- reference helpers


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _case(cfg: dict):
    from helpers import Case

    return Case(cfg["B"], cfg["H"], cfg["Hkv"], cfg["Mq"], cfg["Mkv"], cfg["D"], _dtype(cfg["dtype"]), cfg["causal"],
                cfg["layout"], cfg["contiguous"])


def _slopes(cfg: dict, device):
    """ALiBi slopes: the geometric ones of the paper per head, jittered per batch for (B, H)."""
    import torch

    kind = cfg["features"].get("alibi")
    if kind is None:
        return None
    H = cfg["H"]
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)
    if kind == "bh":
        g = torch.Generator().manual_seed(cfg["seed"])
        base = base[None, :] * (0.5 + torch.rand(cfg["B"], H, generator=g))
    return base.to(device)


def call_kwargs(cfg: dict, device) -> dict:
    """The feature keywords of the call (a fresh, seeded generator for dropout: the reference
    rebuilds the mask from the same draw)."""
    import torch

    feats = cfg["features"]
    kw = {}
    if "softmax_scale" in cfg:
        kw["softmax_scale"] = cfg["softmax_scale"]
    if "window_size" in feats:
        kw["window_size"] = tuple(feats["window_size"])
    for name in ("softcap", "dropout_p", "causal_alignment", "deterministic"):
        if name in feats:
            kw[name] = feats[name]
    if "alibi" in feats:
        kw["alibi_slopes"] = _slopes(cfg, device)
    if "dropout_p" in feats:
        kw["generator"] = torch.Generator().manual_seed(cfg["seed"] + 1)
    return kw


def scale_of(cfg: dict) -> float:
    """The call's softmax_scale: the drawn one (``--scales``), else 1/sqrt(D)."""
    return cfg.get("softmax_scale", cfg["D"] ** -0.5)


def dropout_draw(cfg: dict) -> tuple[int, int] | None:
    import torch

    from fa2dispatch import rng

    if not cfg["features"].get("dropout_p"):
        return None
    return rng.draw_seed(torch.Generator().manual_seed(cfg["seed"] + 1))


def _math_kwargs(cfg: dict, kw: dict) -> dict:
    out = {k: v for k, v in kw.items()
           if k not in ("generator", "deterministic", "causal", "layout", "softmax_scale")}
    if "window_size" in out:
        out["window"] = tuple(out.pop("window_size"))
    return out


def dense_reference(q, k, v, dout, cfg: dict, kw: dict, keep, compute_dtype):
    """(out, lse, dq, dk, dv) of attention_math in compute_dtype (grads None without dout)."""
    import torch

    from fa2dispatch.backends.reference import attention_math

    leaves = [t.detach().to(compute_dtype).requires_grad_(dout is not None) for t in (q, k, v)]
    with torch.enable_grad():
        out, lse = attention_math(*leaves, causal=cfg["causal"], softmax_scale=scale_of(cfg), layout=cfg["layout"],
                                  compute_dtype=compute_dtype, dropout_keep=keep, **_math_kwargs(cfg, kw))
        grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype)) if dout is not None else (None,) * 3
    return (out.detach(), lse.detach(), *grads)


def chunk_keep(seed: int, offset: int, B: int, H: int, Mq: int, Mkv: int, r0: int, r1: int, p: float, device):
    """Rows r0:r1 of ``rng.attention_dropout_mask`` (B, H, r1 - r0, Mkv), without the rest:
    the kernels' counter of score (b, h, i, j) is ``offset + ((b*H + h)*Mq + i)*Mkv + j``."""
    import torch

    from fa2dispatch import rng

    bh = torch.arange(B * H, dtype=torch.int64, device=device)[:, None, None]
    i = torch.arange(r0, r1, dtype=torch.int64, device=device)[None, :, None]
    j = torch.arange(Mkv, dtype=torch.int64, device=device)[None, None, :]
    counters = offset + (bh * Mq + i) * Mkv + j
    return rng.keep_from_uniform(rng.philox_uniform(seed, counters), p).reshape(B, H, r1 - r0, Mkv)


def chunked_reference(q, k, v, *, causal: bool, softmax_scale: float, compute_dtype, layout: str = "bshd",
                      window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, causal_alignment: str = "bottom_right",
                      dropout_p: float = 0.0, dropout_seed: tuple[int, int] | None = None, dout=None,
                      chunk: int = CHUNK_ROWS, key_grads: bool = True):
    """``attention_math`` over chunks of query rows, so the (Mq, Mkv) scores never exist whole.

    Each chunk [r0, r1) is an ``attention_math`` call without causal/window/ALiBi of its own:
    the one rule's mask and bias of those rows (``features.visible`` / ``features.alibi_bias``
    with the shift moved by r0) go in as ``attn_mask`` (bool, or float bias with -inf where
    masked), which attention_math applies exactly where it applies its own (after softcap,
    before the softmax); dropout rows come from ``chunk_keep``. Every row sees the same
    operations as in an unchunked call, so out, lse and dq (whose rows are independent) are
    PyTorch's own in ``compute_dtype``. dk and dv sum over every row: here they are accumulated
    across chunks in float64, which is the truth when compute_dtype is float64 but not PyTorch's
    low-precision result (that rounds once, after the whole sum), so callers check low-precision
    dk/dv only from an unchunked call. Returns (out, lse, dq, dk, dv) (grads None without dout).
    """
    import torch

    from fa2dispatch import features
    from fa2dispatch.backends.reference import attention_math

    row_dim = 1 if layout == "bshd" else 2
    Mq, Mkv = q.shape[row_dim], k.shape[row_dim]
    B, H = q.shape[0], q.shape[2] if layout == "bshd" else q.shape[1]
    shift = features.shift_of(Mq, Mkv, causal_alignment)
    kk, vv = (t.detach().to(compute_dtype).requires_grad_(dout is not None and key_grads) for t in (k, v))
    outs, lses, dqs = [], [], []
    dk = dv = None
    for r0 in range(0, Mq, chunk):
        r1 = min(Mq, r0 + chunk)
        n = r1 - r0
        vis = features.visible(n, Mkv, causal=causal, window=tuple(window), shift=shift + r0, device=q.device)
        # Rows that see no key are 0 / -inf by definition and take no gradient: attention_math
        # gets them through masked_fill, whose backward zeroes the NaN that logsumexp's backward
        # makes of an all -inf row; an additive mask would pass it on, so they stay out here.
        rows = torch.arange(n, device=q.device) if vis is None else vis.any(1).nonzero()[:, 0]
        out = torch.zeros(*q.narrow(row_dim, r0, n).shape, dtype=compute_dtype, device=q.device)
        lse = torch.full((B, H, n), float("-inf"), dtype=compute_dtype, device=q.device)
        dq = torch.zeros_like(out) if dout is not None else None
        if len(rows):
            mask = None if vis is None else vis[rows]
            if alibi_slopes is not None:
                bias = features.alibi_bias(alibi_slopes, B, H, n, Mkv, shift + r0, compute_dtype)[:, :, rows]
                mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            keep = None
            if dropout_p:
                keep = chunk_keep(*dropout_seed, B, H, Mq, Mkv, r0, r1, dropout_p, q.device)[:, :, rows]
            qc = q.narrow(row_dim, r0, n).index_select(row_dim, rows).detach().to(compute_dtype)
            qc.requires_grad_(dout is not None)
            with torch.enable_grad():
                o, ls = attention_math(qc, kk, vv, causal=False, softmax_scale=softmax_scale, layout=layout,
                                       compute_dtype=compute_dtype, softcap=softcap, attn_mask=mask,
                                       dropout_p=dropout_p, dropout_keep=keep)
                if dout is not None:
                    leaves = (qc, kk, vv) if key_grads else (qc,)
                    dc = dout.narrow(row_dim, r0, n).index_select(row_dim, rows).to(compute_dtype)
                    grads = torch.autograd.grad(o, leaves, dc)
                    dq.index_copy_(row_dim, rows, grads[0])
                    if key_grads:
                        dk = grads[1].double() if dk is None else dk + grads[1].double()
                        dv = grads[2].double() if dv is None else dv + grads[2].double()
            out.index_copy_(row_dim, rows, o.detach())
            lse.index_copy_(2, rows, ls.detach())
            del o, ls, mask, keep
        outs.append(out)
        lses.append(lse)
        if dq is not None:
            dqs.append(dq)
        del vis
    out = torch.cat(outs, row_dim)
    lse = torch.cat(lses, 2)
    dq = torch.cat(dqs, row_dim) if dqs else None
    return out, lse, dq, dk, dv


# ---------------------------------------------------------------------------- checks


def compare(name: str, ours, truth, low, magnitude, errors: dict) -> bool:
    """The STYLE.md rule through tests/helpers.py; records (error, bound) under ``name``."""
    from helpers import within_tolerance

    ok, err, bound = within_tolerance(ours, truth, low, magnitude)
    errors[name] = [err, bound]
    return ok


def compare_lse(ours, truth, low, errors: dict) -> bool:
    """helpers.check_lse as a value: the -inf rows (no visible key) must match, the rest the rule."""
    import torch

    empty = torch.isneginf(truth)
    if not torch.equal(torch.isneginf(ours), empty):
        errors["lse"] = ["-inf rows differ", 0.0]
        return False
    keep = ~empty
    return compare("lse", ours[keep], truth[keep], low.float()[keep], None, errors)


def _run_call(fn, q, k, v, cfg: dict, backend: str, kw: dict, dout):
    """(out, lse, grads, backends that ran): the output (with gradients when the config has
    them) from a plain call, as a training step makes it, and lse from a no-grad call with
    return_lse (a call asking for lse with gradients may go elsewhere: not every backend
    differentiates through lse)."""
    import torch

    ran = {}
    if dout is not None:
        ran["out"] = _ran(fn, q, k, v, backend, kw)
        out = fn(q, k, v, backend=backend, **kw)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        with torch.no_grad():
            ran["lse"] = _ran(fn, q, k, v, backend, kw, return_lse=True)
            _, lse = fn(q, k, v, backend=backend, return_lse=True, **_fresh(kw))
    else:
        with torch.no_grad():
            ran["out"] = ran["lse"] = _ran(fn, q, k, v, backend, kw, return_lse=True)
            out, lse = fn(q, k, v, backend=backend, return_lse=True, **kw)
        grads = None
    return out, lse, grads, ran


def _fresh(kw: dict) -> dict:
    """The same keywords with the generator re-seeded (the second call must draw the same mask)."""
    if "generator" not in kw:
        return kw
    import torch

    kw = dict(kw)
    kw["generator"] = torch.Generator().manual_seed(kw["generator"].initial_seed())
    return kw


def _ran(fn, q, k, v, backend: str, kw: dict, return_lse: bool = False) -> str:
    """The backend the dispatcher picks for this call (explain; varlen has no explain: the
    decision of the same problem)."""
    import fa2dispatch

    kw = {n: x for n, x in kw.items() if n != "generator"}
    if fn is fa2dispatch.attention:
        return fa2dispatch.explain(q, k, v, backend=backend, return_lse=return_lse, **kw).backend.name
    from fa2dispatch.api import _resolve_backend
    from fa2dispatch.dispatch import decide
    from fa2dispatch.varlen import make_varlen_problem

    cq, ck, mq, mk = fn.varlen_args
    problem = make_varlen_problem(q, k, v, cq, ck, mq, mk, return_lse=return_lse,
                                  **{n: x for n, x in kw.items() if n != "causal"}, causal=kw.get("causal", False))
    return decide(problem, _resolve_backend(backend)).backend.name


def forced_backend(cfg: dict) -> str:
    return "triton-fp8" if cfg["kind"] == "fp8" else "triton"


def can_run(cfg: dict, backend: str, q, k, v, kw: dict) -> str | None:
    """None if ``backend`` can run the (dense) call, else why not."""
    import fa2dispatch

    if backend == "auto" or cfg["kind"] == "varlen":
        return None
    try:
        fa2dispatch.explain(q, k, v, backend=backend, **{n: x for n, x in kw.items() if n != "generator"})
    except (ValueError, NotImplementedError) as e:
        return str(e).splitlines()[0][:300]
    return None


def check_dense(cfg: dict, backend: str, device) -> dict:
    import torch
    from helpers import make_inputs

    import fa2dispatch
    from fa2dispatch import rng

    case = _case(cfg)
    q, k, v, dout = make_inputs(case, device, cfg["seed"], requires_grad=cfg["grad"])
    kw = dict(causal=cfg["causal"], layout=cfg["layout"], **call_kwargs(cfg, device))
    why = can_run(cfg, backend, q, k, v, kw)
    if why:
        return dict(status="refused", reason=why)
    out, lse, grads, ran = _run_call(fa2dispatch.attention, q, k, v, cfg, backend, kw, dout if cfg["grad"] else None)
    draw = dropout_draw(cfg)
    keep = None
    if draw is not None:
        keep = rng.attention_dropout_mask(*draw, cfg["B"], cfg["H"], cfg["Mq"], cfg["Mkv"],
                                          cfg["features"]["dropout_p"], device)
    d = dout if cfg["grad"] else None
    truth = dense_reference(q, k, v, d, cfg, kw, keep, torch.float64)
    low = dense_reference(q, k, v, d, cfg, kw, keep, case.dtype)
    return _verdict(out, lse, grads, truth, low, ran)


def _verdict(out, lse, grads, truth, low, ran, names=("dq", "dk", "dv")) -> dict:
    present = [t for t in (truth[0], *truth[2:]) if t is not None]
    magnitude = max(t.abs().max().item() if t.numel() else 0.0 for t in present)
    errors: dict = {}
    ok = compare("out", out, truth[0], low[0], magnitude, errors)
    ok &= compare_lse(lse, truth[1], low[1], errors)
    if grads is not None:
        for name, ours, t, lp in zip(("dq", "dk", "dv"), grads, truth[2:], low[2:]):
            if name in names and t is not None and lp is not None:
                ok &= compare(name, ours, t, lp, magnitude, errors)
    return dict(status="ok" if ok else "mismatch", ran=ran, errors=errors)


def check_varlen(cfg: dict, backend: str, device) -> dict:
    import torch

    import fa2dispatch
    from fa2dispatch import rng
    from fa2dispatch.backends.reference import attention_math

    dtype = _dtype(cfg["dtype"])
    g = torch.Generator().manual_seed(cfg["seed"])
    lq, lk = cfg["lens_q"], cfg["lens_k"]
    cq = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=device)
    ck = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=device)
    H, Hkv, D = cfg["H"], cfg["Hkv"], cfg["D"]

    def rand(rows, heads, grad):
        return torch.randn(rows, heads, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    q, k, v = rand(sum(lq), H, cfg["grad"]), rand(sum(lk), Hkv, cfg["grad"]), rand(sum(lk), Hkv, cfg["grad"])
    dout = rand(sum(lq), H, False)
    kw = dict(causal=cfg["causal"], **call_kwargs(cfg, device))
    mq, mk = cfg["Mq"], cfg["Mkv"]

    def fn(q, k, v, backend, return_lse=False, **kw):
        return fa2dispatch.attention_varlen(q, k, v, cq, ck, mq, mk, backend=backend, return_lse=return_lse, **kw)

    fn.varlen_args = (cq, ck, mq, mk)
    out, lse, grads, ran = _run_call(fn, q, k, v, cfg, backend, kw, dout if cfg["grad"] else None)
    draw = dropout_draw(cfg)
    keep = None
    if draw is not None:
        keep = rng.attention_dropout_mask(*draw, len(lq), H, mq, mk, cfg["features"]["dropout_p"], device)
    mkw = _math_kwargs(cfg, kw)
    slopes = mkw.pop("alibi_slopes", None)

    def reference(compute_dtype):
        """Each sequence alone through attention_math (as tests/test_varlen.py rebuilds it)."""
        leaves = [t.detach().to(compute_dtype).requires_grad_(cfg["grad"]) for t in (q, k, v)]
        outs, lses = [], []
        with torch.enable_grad():
            for b in range(len(lq)):
                qs, ks, vs = (t[c[b]:c[b + 1]][None] for t, c in zip(leaves, (cq, ck, ck)))
                n_q, n_k = qs.shape[1], ks.shape[1]
                if n_q == 0:
                    continue
                if n_k == 0:  # no key at all: every row sees nothing, out 0 and lse -inf
                    outs.append(qs[0].sum() * 0 + torch.zeros(n_q, H, D, dtype=compute_dtype, device=device))
                    lses.append(torch.full((H, n_q), float("-inf"), dtype=compute_dtype, device=device))
                    continue
                sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b:b + 1])
                o, ls = attention_math(qs, ks, vs, causal=cfg["causal"], softmax_scale=scale_of(cfg),
                                       compute_dtype=compute_dtype, alibi_slopes=sl,
                                       dropout_keep=None if keep is None else keep[b:b + 1, :, :n_q, :n_k], **mkw)
                outs.append(o[0])
                lses.append(ls[0])
            out_r, lse_r = torch.cat(outs), torch.cat(lses, 1)
            gr = torch.autograd.grad(out_r, leaves, dout.to(compute_dtype), allow_unused=True) if cfg["grad"] \
                else (None,) * 3
        if cfg["grad"]:  # a key/value row of an empty query sequence gets no gradient: 0
            gr = tuple(torch.zeros_like(t) if x is None else x for x, t in zip(gr, leaves))
        return (out_r.detach(), lse_r.detach(), *gr)

    return _verdict(out, lse, grads, reference(torch.float64), reference(dtype), ran)


def check_fp8(cfg: dict, backend: str, device) -> dict:
    import torch
    from helpers import check_fp8 as helpers_check_fp8
    from helpers import make_fp8_inputs

    import fa2dispatch

    case = _case(dict(cfg, dtype="float16"))
    q8, k8, v8, qd, kd, vd = make_fp8_inputs(case, device, cfg["seed"])
    kw = dict(causal=cfg["causal"], layout=cfg["layout"], q_descale=qd, k_descale=kd, v_descale=vd,
              softmax_scale=scale_of(cfg))
    why = can_run(cfg, backend, q8, k8, v8, kw)
    if why:
        return dict(status="refused", reason=why)
    ran = {"out": fa2dispatch.explain(q8, k8, v8, backend=backend, return_lse=True, **kw).backend.name}
    ran["lse"] = ran["out"]
    with torch.no_grad():
        out, lse = fa2dispatch.attention(q8, k8, v8, backend=backend, return_lse=True, **kw)
    try:
        helpers_check_fp8(out, lse, q8, k8, v8, qd, kd, vd, causal=cfg["causal"], layout=cfg["layout"],
                          softmax_scale=scale_of(cfg))
    except AssertionError as e:
        return dict(status="mismatch", ran=ran, errors={"fp8": [str(e), 0.0]})
    return dict(status="ok", ran=ran, errors={})


def check_long(cfg: dict, backend: str, device) -> dict:
    """A long sequence: the float64 truth from ``chunked_reference``; PyTorch's own error the
    same chunked way for out, lse and dq, unchunked for dk/dv where it fits in memory (else dk
    and dv are reported as not checked)."""
    import torch

    import fa2dispatch

    dtype = _dtype(cfg["dtype"])
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    B, H, Mq, Mkv, D = cfg["B"], cfg["H"], cfg["Mq"], cfg["Mkv"], cfg["D"]
    q = torch.randn(B, Mq, H, D, generator=g, device=device, dtype=dtype).requires_grad_()
    k = torch.randn(B, Mkv, H, D, generator=g, device=device, dtype=dtype).requires_grad_()
    v = torch.randn(B, Mkv, H, D, generator=g, device=device, dtype=dtype).requires_grad_()
    dout = torch.randn(B, Mq, H, D, generator=g, device=device, dtype=dtype)
    kw = dict(causal=cfg["causal"], **call_kwargs(cfg, device))
    why = can_run(cfg, backend, q, k, v, kw)
    if why:
        return dict(status="refused", reason=why)
    out, lse, grads, ran = _run_call(fa2dispatch.attention, q, k, v, cfg, backend, kw, dout)
    out, lse, grads = out.detach(), lse.detach(), tuple(x.detach() for x in grads)
    torch.cuda.empty_cache() if device != "cpu" else None
    mkw = _math_kwargs(cfg, kw)
    ref = dict(causal=cfg["causal"], softmax_scale=D**-0.5, window=mkw.get("window", (-1, -1)),
               softcap=mkw.get("softcap", 0.0), alibi_slopes=mkw.get("alibi_slopes"),
               causal_alignment=mkw.get("causal_alignment", "bottom_right"), dropout_p=mkw.get("dropout_p", 0.0),
               dropout_seed=dropout_draw(cfg), dout=dout)
    truth = chunked_reference(q, k, v, compute_dtype=torch.float64, **ref)
    full = B * H * Mq * Mkv <= FULL_LOWPREC_MAX
    low = chunked_reference(q, k, v, compute_dtype=dtype, key_grads=False, **ref)
    names = ("dq",)
    if full:
        keep = None
        if ref["dropout_p"]:
            from fa2dispatch import rng

            keep = rng.attention_dropout_mask(*ref["dropout_seed"], B, H, Mq, Mkv, ref["dropout_p"], device)
        cfg_b = dict(cfg, layout="bshd")
        full_low = dense_reference(q, k, v, dout, cfg_b, kw, keep, dtype)
        low = (low[0], low[1], low[2], full_low[3], full_low[4])
        names = ("dq", "dk", "dv")
        del full_low, keep
    result = _verdict(out, lse, grads, truth, low, ran, names)
    if not full:
        result["note"] = "dk/dv not checked: PyTorch's low-precision dk/dv needs the unchunked scores"
    return result


CHECKS = dict(dense=check_dense, varlen=check_varlen, fp8=check_fp8, long=check_long)


ALSO_ENV = "FA2DISPATCH_FUZZ_ALSO"  # --also, handed to the worker processes


def also_backends(cfg: dict) -> tuple[str, ...]:
    """The --also backends a config is forced onto besides Triton: dense configs only (varlen
    calls are Triton's or the reference's; long and fp8 ones have their own paths)."""
    names = tuple(b for b in os.environ.get(ALSO_ENV, "").split(",") if b)
    return names if cfg["kind"] == "dense" else ()


def run_config(cfg: dict, device: str) -> dict:
    """Every backend of one config: the dispatcher's choice, the forced Triton kernel, and the
    --also backends (refused where they cannot run the call)."""
    import torch

    result = dict(config=cfg, runs={})
    for backend in ("auto", forced_backend(cfg), *also_backends(cfg)):
        if backend in result["runs"]:
            continue
        t0 = time.perf_counter()
        try:
            r = CHECKS[cfg["kind"]](cfg, backend, device)
        except Exception as e:  # a valid call must not raise: recorded as an error, the run goes on
            r = dict(status="error", error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
        r["time_s"] = round(time.perf_counter() - t0, 3)
        result["runs"][backend] = r
        if device != "cpu":
            torch.cuda.empty_cache()
        if backend == "auto" and r.get("ran", {}).get("out") == forced_backend(cfg) \
                and r.get("ran", {}).get("lse") == forced_backend(cfg):
            result["runs"][forced_backend(cfg)] = dict(r, same_as="auto")  # the dispatcher chose it: same call
    return result


# ---------------------------------------------------------------------------- the >2^31 case


def big_inputs(which: str, device: str):
    """(q, k, v, first q row past element 2^31 or None) of a >2^31 case, float16:
    ``q``: q (1, BIG_ROWS, 8, 128) with 77 keys: q's own row offsets pass 2^31;
    ``kv``: k and v (1, BIG_ROWS, 8, 128) with 97 queries: key row offsets pass 2^31;
    ``qview``: q is ``packed[:, :, 0]`` of a packed qkv (1, M, 3, 8, 128) with M*3*8*128 > 2^31 but
    M*8*128 < 2^31: the shape is small, the row stride (3*8*128) carries the offsets past 2^31;
    ``kvview``: k, v are ``kv[:, :, 0]``, ``kv[:, :, 1]`` of a packed (1, M, 2, 8, 128), likewise."""
    import torch

    g = torch.Generator(device=device).manual_seed(31)
    dtype, H, D = torch.float16, BIG_H, BIG_D

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    if which == "q":
        return rnd(1, BIG_ROWS, H, D), rnd(1, 77, H, D), rnd(1, 77, H, D), BIG_LIMIT // (H * D)
    if which == "kv":
        return rnd(1, 97, H, D), rnd(1, BIG_ROWS, H, D), rnd(1, BIG_ROWS, H, D), None
    if which == "qview":
        m = BIG_LIMIT // (3 * H * D) + 950
        return rnd(1, m, 3, H, D)[:, :, 0], rnd(1, 77, H, D), rnd(1, 77, H, D), BIG_LIMIT // (3 * H * D)
    m = BIG_LIMIT // (2 * H * D) + 2**16 + 1
    kv = rnd(1, m, 2, H, D)
    return rnd(1, 97, H, D), kv[:, :, 0], kv[:, :, 1], None


BIG_CASES = ("q", "kv", "qview", "kvview")


def big_case(which: str, backend: str, device: str) -> dict:
    """One >2^31 case (``big_inputs``), forward only; a sample of rows (the first, the last,
    those right past element 2^31, random ones; every row when q is small) against the float64
    reference. A backend may refuse the call with a reason; computing it wrong is the failure."""
    import torch

    import fa2dispatch
    from fa2dispatch.backends.reference import attention_math

    dtype = torch.float16
    q, k, v, first_past = big_inputs(which, device)
    mq, mkv = q.shape[1], k.shape[1]
    kw = dict(causal=which in ("q", "qview"))
    try:
        ran = fa2dispatch.explain(q, k, v, backend=backend, return_lse=True, **kw).backend.name
    except (ValueError, NotImplementedError) as e:
        return dict(status="refused", reason=str(e).splitlines()[0][:300])
    with torch.no_grad():
        try:
            out, lse = fa2dispatch.attention(q, k, v, backend=backend, return_lse=True, **kw)
        except NotImplementedError as e:  # a forced backend that refuses by the tensors' strides
            return dict(status="refused", reason=str(e).splitlines()[0][:300])
        if backend == "auto":
            ran = fa2dispatch.explain(q, k, v, backend=backend, return_lse=True, **kw).backend.name
    torch.cuda.synchronize() if device != "cpu" else None
    if first_past is not None:
        r = torch.Generator().manual_seed(0)
        rows = sorted(x for x in {*range(64), *range(first_past - 32, first_past + 96), *range(mq - 64, mq),
                                  *torch.randint(0, mq, (128,), generator=r).tolist()} if 0 <= x < mq)
    else:
        rows = list(range(mq))
    idx = torch.tensor(rows, device=device)
    errors: dict = {}
    ok = True
    shift = mkv - mq
    qs = q[:, idx]
    truth_o, truth_l, low_o, low_l = [], [], [], []
    for h in range(BIG_H):  # one head at a time bounds the float64 scores (97 x 2.2M at most)
        for cd, os_, ls_ in ((torch.float64, truth_o, truth_l), (dtype, low_o, low_l)):
            mask = None
            if kw["causal"]:  # bottom-right causal of the sampled rows
                mask = torch.arange(mkv, device=device)[None, :] <= idx[:, None] + shift
            o, ls = attention_math(qs[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], causal=False,
                                   softmax_scale=BIG_D**-0.5, compute_dtype=cd, attn_mask=mask)
            os_.append(o)
            ls_.append(ls)
    truth_o, low_o = torch.cat(truth_o, 2), torch.cat(low_o, 2)
    truth_l, low_l = torch.cat(truth_l, 1), torch.cat(low_l, 1)
    ours_o, ours_l = out[:, idx], lse[:, :, idx]
    ok &= compare("out", ours_o, truth_o, low_o, None, errors)
    ok &= compare_lse(ours_l, truth_l, low_l, errors)
    past = [i for i, row in enumerate(rows) if row >= first_past] if first_past is not None else []
    if past:  # the rows past element 2^31 alone, for the report
        p = torch.tensor(past, device=device)
        compare("out rows past 2^31", ours_o[:, p], truth_o[:, p], low_o[:, p], None, errors)
    return dict(status="ok" if ok else "mismatch", ran={"out": ran, "lse": ran}, errors=errors,
                shape=dict(q=list(q.shape), k=list(k.shape)), strides=dict(q=list(q.stride()), k=list(k.stride())),
                max_offset_in_batch=max(sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:]))
                                        for t in (q, k, v)), rows_checked=len(rows))


def run_big(device: str, backends: list[str]) -> list[dict]:
    """Each (case, backend) in its own process: an illegal address is reported, not fatal."""
    results = []
    for which in BIG_CASES:
        for backend in backends:
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--device", device, "--big-one", f"{which}:{backend}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            line = [x for x in proc.stdout.splitlines() if x.startswith("BIGRESULT ")]
            if proc.returncode == 0 and line:
                r = json.loads(line[-1][len("BIGRESULT "):])
            else:
                r = dict(status="crash", returncode=proc.returncode,
                         error=(proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:1000],
                         stderr_tail=proc.stderr[-3000:])
            r.update(case=which, backend=backend, time_s=round(time.perf_counter() - t0, 1))
            print(f"[>2^31 {which:6s} {backend:8s}] {r['status']:8s} ran={r.get('ran', {}).get('out', '-')} "
                  f"{_fmt_errors(r)} {r.get('error', r.get('reason', ''))[:200]}", flush=True)
            results.append(r)
    return results


# ---------------------------------------------------------------------------- workers and report


def _fmt_errors(r: dict) -> str:
    return " ".join(f"{n}={e[0]:.2e}/{e[1]:.2e}" if isinstance(e[0], float) else f"{n}:{e[0]}"
                    for n, e in r.get("errors", {}).items())


def describe(cfg: dict) -> str:
    f = ",".join(f"{k}={v}" for k, v in cfg["features"].items())
    lens = f" lens_q={cfg['lens_q']} lens_k={cfg['lens_k']}" if cfg["kind"] == "varlen" else ""
    return (f"#{cfg['index']} {cfg['kind']} {cfg['dtype']} B{cfg['B']} H{cfg['H']}/{cfg['Hkv']} q{cfg['Mq']} "
            f"k{cfg['Mkv']} d{cfg['D']} {'causal' if cfg['causal'] else 'full'} {cfg['layout']}"
            f"{'' if cfg['contiguous'] else ' strided'}{' grad' if cfg['grad'] else ''} {f}{lens}")


STICKY_CUDA_ERRORS = ("illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
                      "misaligned address", "CUDA error")


def config_cost(cfg: dict) -> float:
    """A rough relative cost of one config on a GPU, for ordering the queue (longest first): the
    Triton compiles dominate, and float32 (FMA-chain dots, several times longer to compile) and
    wide head dims cost most (session 6's run: float32 took 71% of the worker time)."""
    cost = 1.0 + cfg["D"] / 128
    if cfg["dtype"] == "float32":
        cost *= 4
    if cfg["grad"]:
        cost *= 2
    return cost


def queue_order(configs: list[dict], chunk: int = 4) -> list[list[int]]:
    """Work items for the workers' shared queue: runs of up to ``chunk`` configs of one kernel
    specialisation (a worker compiles a variant once and reuses it for the rest of the run),
    the costliest items first, so that no worker is left with a long tail while the others idle
    (the static spec % W split of session 6 left the busiest worker 1.6x the mean)."""
    by_spec: dict[int, list[dict]] = defaultdict(list)
    for cfg in configs:
        by_spec[cfg["spec"]].append(cfg)
    items = []
    for group in by_spec.values():
        group.sort(key=lambda c: c["index"])
        for i in range(0, len(group), chunk):
            run = group[i:i + chunk]
            items.append((sum(config_cost(c) for c in run), run[0]["index"], [c["index"] for c in run]))
    items.sort(key=lambda t: (-t[0], t[1]))
    return [ids for _, _, ids in items]


def _claim(queue: Path) -> list[int] | None:
    """The next work item of the shared queue (a JSON list of items and a cursor), under a file
    lock; None when it is empty."""
    from filelock import FileLock

    with FileLock(str(queue) + ".lock"):
        state = json.loads(queue.read_text())
        if state["next"] >= len(state["items"]):
            return None
        item = state["items"][state["next"]]
        state["next"] += 1
        queue.write_text(json.dumps(state))
    return item


def worker(args) -> None:
    """Claim work items from the shared queue (--queue) until it is empty; one JSON line per
    config started and per result."""
    setup(args.device)
    w = int(args.worker)
    by_index = {c["index"]: c for c in json.loads(Path(args.configs).read_text())}
    queue = Path(args.queue)
    with open(args.out, "a") as f:
        while (item := _claim(queue)) is not None:
            f.write(json.dumps(dict(item=item)) + "\n")
            for index in item:
                cfg = by_index[index]
                f.write(json.dumps(dict(start=cfg["index"])) + "\n")
                f.flush()
                if os.environ.get("FUZZ_TEST_EXIT_AT") == str(index):  # tests: a worker dying mid-config
                    os._exit(7)
                result = run_config(cfg, args.device)
                f.write(json.dumps(result) + "\n")
                f.flush()
                sticky = any(any(m in r.get("error", "") for m in STICKY_CUDA_ERRORS) for r in result["runs"].values())
                for backend, r in result["runs"].items():
                    if r.get("same_as"):
                        continue
                    tag = r["status"].upper() if r["status"] != "ok" else "ok"
                    print(f"[w{w}] {tag:8s} {backend:10s} ran={r.get('ran', {}).get('out', '-'):22s} "
                          f"{r['time_s']:6.2f}s {describe(cfg)} {_fmt_errors(r)} {r.get('error', '')[:300]}",
                          flush=True)
                if sticky:  # this process's CUDA context is lost: the parent starts a fresh worker
                    print(f"[w{w}] CUDA context lost; restarting the worker", flush=True)
                    os._exit(3)


def _requeue(queue: Path, indices: list[int]) -> None:
    """Put the rest of a dead worker's item back at the head of the queue."""
    if not indices:
        return
    from filelock import FileLock

    with FileLock(str(queue) + ".lock"):
        state = json.loads(queue.read_text())
        state["items"].insert(state["next"], indices)
        queue.write_text(json.dumps(state))


def _has_work(queue: Path) -> bool:
    """Whether the shared queue still holds an item (read under its lock: a worker may be
    rewriting the file)."""
    from filelock import FileLock

    with FileLock(str(queue) + ".lock"):
        state = json.loads(queue.read_text())
    return state["next"] < len(state["items"])


def read_worker_log(path: Path, results: dict[int, dict]) -> tuple[int | None, list[int]]:
    """Add a worker's finished results to ``results``; (the config it started and did not
    finish or None, its last work item)."""
    started, item = None, []
    for line in path.read_text().splitlines() if path.exists() else []:
        d = json.loads(line)
        if "item" in d:
            item = d["item"]
        elif "start" in d:
            started = d["start"]
        else:
            results[d["config"]["index"]] = d
            started = None
    return started, item


def run_workers(configs: list[dict], args, tmp: Path) -> list[dict]:
    """The configs over ``args.workers`` processes that share one queue (``queue_order``); a
    dead worker's config is reported as a crash, the rest of its item goes back on the queue and
    a fresh worker takes its place while the queue has work."""
    cfg_file = tmp / "configs.json"
    cfg_file.write_text(json.dumps(configs))
    queue = tmp / "queue.json"
    queue.write_text(json.dumps(dict(items=queue_order(configs), next=0)))
    by_index = {c["index"]: c for c in configs}
    results: dict[int, dict] = {}
    procs = {}
    generation = 0

    def launch(w):
        nonlocal generation
        generation += 1
        out = tmp / f"w{w}.{generation}.jsonl"
        cmd = [sys.executable, __file__, "--device", args.device, "--worker", str(w),
               "--configs", str(cfg_file), "--queue", str(queue), "--out", str(out)]
        procs[w] = (subprocess.Popen(cmd), out)

    for w in range(args.workers):
        launch(w)
    deadline = time.time() + args.time_limit if args.time_limit else None
    while procs:
        time.sleep(0.5)
        for w, (p, path) in list(procs.items()):
            if deadline and time.time() > deadline:
                p.kill()
            rc = p.poll()
            if rc is None:
                continue
            del procs[w]
            started, item = read_worker_log(path, results)
            timed_out = deadline and time.time() > deadline
            if rc == 0 or timed_out:
                if timed_out and started is not None and started not in results:
                    print(f"[w{w}] TIMEOUT while running {describe(by_index[started])}", flush=True)
                continue
            if started is not None and started not in results:
                print(f"[w{w}] CRASH (exit {rc}) while running {describe(by_index[started])}", flush=True)
                results[started] = dict(config=by_index[started], runs={"?": dict(
                    status="crash", error=f"worker exited with {rc} during this config", time_s=0.0)})
            _requeue(queue, [i for i in item if i not in results])  # after the crashed one
            if _has_work(queue):
                launch(w)
    return [results[i] for i in sorted(results)]


def summarize(results: list[dict], big: list[dict]) -> dict:
    table = {"by_feature": defaultdict(lambda: [0, 0]), "by_backend": defaultdict(lambda: [0, 0]),
             "by_dtype": defaultdict(lambda: [0, 0]), "by_kind": defaultdict(lambda: [0, 0])}
    checks = mismatches = errors = refused = 0
    failing = []
    for res in results:
        cfg = res["config"]
        feats = list(cfg["features"]) or ["plain"]
        if cfg["H"] != cfg["Hkv"]:
            feats.append("gqa")
        if cfg["Mq"] != cfg["Mkv"]:
            feats.append("mq!=mkv")
        if cfg["causal"]:
            feats.append("causal")
        if cfg["grad"]:
            feats.append("backward")
        bad_cfg = False
        for backend, r in res["runs"].items():
            if r.get("same_as") or r["status"] == "refused":
                refused += r["status"] == "refused"
                continue
            checks += 1
            bad = r["status"] != "ok"
            bad_cfg |= bad
            mismatches += r["status"] == "mismatch"
            errors += r["status"] in ("error", "crash")
            ran = r.get("ran", {}).get("out", backend)
            table["by_backend"][f"{backend} -> {ran}"][0] += 1
            table["by_backend"][f"{backend} -> {ran}"][1] += bad
            if bad:
                failing.append(dict(config=describe(cfg), backend=backend, status=r["status"],
                                    errors=r.get("errors"), error=r.get("error")))
        for f in feats:
            table["by_feature"][f][0] += 1
            table["by_feature"][f][1] += bad_cfg
        table["by_dtype"][cfg["dtype"]][0] += 1
        table["by_dtype"][cfg["dtype"]][1] += bad_cfg
        table["by_kind"][cfg["kind"]][0] += 1
        table["by_kind"][cfg["kind"]][1] += bad_cfg
    big_bad = [b for b in big if b["status"] not in ("ok", "refused")]
    return dict(configs=len(results), checks=checks, mismatches=mismatches, errors=errors, refused_forced=refused,
                failing=failing, big_failing=big_bad, **{k: dict(sorted(v.items())) for k, v in table.items()})


def print_summary(s: dict, big: list[dict]) -> None:
    print("\n== summary ==")
    print(f"configs {s['configs']}  checks {s['checks']}  mismatches {s['mismatches']}  errors {s['errors']}  "
          f"(forced backend refused the call: {s['refused_forced']})")
    for key in ("by_kind", "by_dtype", "by_feature", "by_backend"):
        print(f"\n| {key[3:]} | configs/checks | failing |\n|---|---:|---:|")
        for name, (n, bad) in s[key].items():
            print(f"| {name} | {n} | {bad} |")
    if big:
        print("\n| >2^31 case | backend | ran | status | out err / bound |\n|---|---|---|---|---|")
        for b in big:
            e = b.get("errors", {}).get("out", ["-", "-"])
            err = f"{e[0]:.2e} / {e[1]:.2e}" if isinstance(e[0], float) else "-"
            print(f"| {b['case']} | {b['backend']} | {b.get('ran', {}).get('out', '-')} | {b['status']} | {err} |")
    for f in s["failing"][:50]:
        print(f"FAIL {f['backend']} {f['status']} {f['config']} {f['errors'] or ''} {(f['error'] or '')[:300]}")
    for b in s["big_failing"]:
        print(f"FAIL >2^31 {b['case']} {b['backend']} {b['status']} {b.get('error', '')[:300]} {b.get('errors', '')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="random configurations (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: one per CPU core up to 16 on a GPU, 1 on CPU)")
    p.add_argument("--pool", type=int, default=None,
                   help="kernel specialisations the configs share (default 64 on a GPU, 0 = none on CPU)")
    p.add_argument("--json", default=None, help="write every result and the summary here")
    p.add_argument("--scales", action="store_true",
                   help="draw each config's softmax_scale (positive, negative, zero; draw_scale) instead of 1/sqrt(D)")
    p.add_argument("--no-long", action="store_true", help="skip the 16k/32k/64k sequences")
    p.add_argument("--no-big", action="store_true", help="skip the >2^31-element calls")
    p.add_argument("--also", default="", help="comma-separated backends every dense config is also forced "
                   "onto where it can run (e.g. cupy); refusals are counted, not failures")
    p.add_argument("--big-backends", default="auto,triton", help="backends of the >2^31 calls (add cupy, ...)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds for the random configs (0: none)")
    p.add_argument("--only", default=None,
                   help="comma-separated config indices: run just these of the --n drawn (re-check failures)")
    p.add_argument("--resume", default=None,
                   help="a --json file of an earlier run (same --n and --seed): its configs are not run again, "
                        "and its results (random, long and >2^31) join this run's report")
    # internal: one worker / one >2^31 call
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--configs", help=argparse.SUPPRESS)
    p.add_argument("--queue", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--big-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.also:
        from fa2dispatch.backends import BACKENDS as known

        unknown = [b for b in args.also.split(",") if b and b not in known]
        if unknown:
            p.error(f"--also: unknown backend(s) {', '.join(unknown)} (known: {', '.join(known)})")
        os.environ[ALSO_ENV] = args.also  # the workers are processes of their own: they read it there
    if args.worker:
        worker(args)
        return 0
    if args.big_one:
        setup(args.device)
        which, backend = args.big_one.split(":")
        print("BIGRESULT " + json.dumps(big_case(which, backend, args.device)), flush=True)
        return 0
    setup(args.device)
    import torch

    import fa2dispatch
    from fa2dispatch.backends import BACKENDS

    if args.workers is None:
        args.workers = min(16, os.cpu_count() or 1) if args.device != "cpu" else 1
    fp8_ok = fp8_supported(args.device)
    if args.pool is None:
        args.pool = 64 if args.device != "cpu" else 0
    configs = draw_configs(args.n, args.seed, args.device, fp8_ok, args.pool, args.scales)
    if args.only:
        wanted = {int(x) for x in args.only.split(",")}
        configs = [c for c in configs if c["index"] in wanted]
    earlier, earlier_big = [], []
    if args.resume:
        prior = json.loads(Path(args.resume).read_text())
        if (prior["summary"].get("n_requested"), prior["summary"].get("seed")) != (args.n, args.seed):
            raise SystemExit(f"--resume {args.resume}: that run drew --n {prior['summary'].get('n_requested')} "
                             f"--seed {prior['summary'].get('seed')}, this one --n {args.n} --seed {args.seed}")
        earlier, earlier_big = prior["results"], prior.get("big", [])
        done_before = {r["config"]["index"] for r in earlier if r["config"]["kind"] != "long"}
        configs = [c for c in configs if c["index"] not in done_before]
        if any(r["config"]["kind"] == "long" for r in earlier):
            args.no_long = True
        if earlier_big:
            args.no_big = True
        print(f"resume: {len(done_before)} configs done in {args.resume}, {len(configs)} left", flush=True)
    long_cfgs = [] if args.no_long else draw_long_configs(random.Random(args.seed + 1), args.device)
    dev_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    print(f"fuzz: {args.n} configs ({args.pool or 'no'} shared kernel specialisations) + {len(long_cfgs)} long, "
          f"seed {args.seed}, device {dev_name}, {args.workers} workers, "
          f"fp8 {'on' if fp8_ok else 'off (needs sm_89+)'}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_workers(configs, args, Path(tmp))
    results = sorted(earlier + results, key=lambda r: (r["config"]["kind"] == "long", r["config"]["index"]))
    t_small = time.perf_counter() - t0
    for cfg in long_cfgs:  # in this process, one at a time: each needs several GiB
        res = run_config(cfg, args.device)
        for backend, rr in res["runs"].items():
            print(f"[long] {rr['status'].upper() if rr['status'] != 'ok' else 'ok':8s} {backend:8s} "
                  f"ran={rr.get('ran', {}).get('out', '-'):18s} {rr['time_s']:6.2f}s {describe(cfg)} "
                  f"{_fmt_errors(rr)} {rr.get('error', '')[:300]} {rr.get('note', '')}", flush=True)
        results.append(res)
    big = []
    if not args.no_big and args.device != "cpu":
        backends = [b for b in args.big_backends.split(",") if b == "auto" or b in BACKENDS]
        big = run_big(args.device, backends)
    big = earlier_big + big
    summary = summarize(results, big)
    summary.update(n_requested=args.n, seed=args.seed, device=dev_name, seconds_random=round(t_small, 1),
                   seconds_total=round(time.perf_counter() - t0, 1),
                   versions=dict(torch=torch.__version__, fa2dispatch=getattr(fa2dispatch, "__version__", "?")))
    print_summary(summary, big)
    done = sum(1 for x in results if x["config"]["kind"] != "long")
    if done < args.n:
        print(f"NOTE: {args.n - done} of {args.n} random configs did not run (time limit {args.time_limit}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(summary=summary, results=results, big=big), indent=1,
                                              default=str))
    bad = summary["mismatches"] + summary["errors"] + len(summary["big_failing"])
    print(f"\nRESULT: {'PASS' if not bad else 'FAIL'} ({summary['checks']} checks, {summary['mismatches']} "
          f"mismatches, {summary['errors']} errors, {len(summary['big_failing'])} >2^31 failures) in "
          f"{summary['seconds_total']}s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
