"""attention_with_kvcache on CPU: the Triton decode kernels under the interpreter and the
reference, against float64 truth (STYLE.md's rule), plus validation, dispatch and fallback.

A case builds a cache holding random keys, optionally paged through a shuffled block table
(so page order never matches position order), and new rows to append. The expected cache
after the append is built here row by row, independently of any backend; the ground truth is
``kvcache_math`` (the reference module, i.e. ``attention_math`` per sequence) in float64 on
that expected cache, and PyTorch's own error is the same math in the inputs' dtype. The case
helpers are shared with test_kvcache_gpu.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import pytest
import torch
from fa2dispatch.backends.kvcache_reference import kvcache_math
from helpers import check_close, check_lse, max_magnitude

import fa2dispatch
from fa2dispatch import dispatch
from fa2dispatch.kvcache import attention_with_kvcache, explain_kvcache, prepare


@dataclass(frozen=True)
class KVCase:
    B: int = 2
    Mq: int = 1
    H: int = 8
    Hkv: int = 2
    D: int = 64
    dtype: torch.dtype = torch.float16
    capacity: int = 64
    seqlens: tuple = (20, 41)  # lengths before the append; None: the whole cache, no append
    n_new: int = 1
    page: int = 0  # page size; 0: contiguous cache
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None / "h" / "bh"
    num_splits: int = 0
    seqlens_as_int: bool = False
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        parts = [dt, f"B{self.B}q{self.Mq}H{self.H}kv{self.Hkv}d{self.D}", f"cap{self.capacity}",
                 f"len{'-'.join(map(str, self.seqlens)) if self.seqlens is not None else 'full'}",
                 f"new{self.n_new}", f"page{self.page}" if self.page else "contig", f"splits{self.num_splits}"]
        if self.causal:
            parts.append("causal")
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.alibi:
            parts.append(f"alibi_{self.alibi}")
        if self.seqlens_as_int:
            parts.append("int")
        return "-".join(parts)


def make_kv_inputs(case: KVCase, device="cpu", seed=0) -> dict:
    """The call's arguments (caches freshly allocated, so each call may append in place)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=case.dtype)

    args = {"q": randn(case.B, case.Mq, case.H, case.D)}
    if case.page:
        per_seq = -(-case.capacity // case.page)
        n_blocks = case.B * per_seq + 3  # spare pages that no sequence uses
        perm = torch.randperm(n_blocks, generator=g)[: case.B * per_seq]
        args["block_table"] = perm.reshape(case.B, per_seq).to(device=device, dtype=torch.int32)
        shape = (n_blocks, case.page, case.Hkv, case.D)
    else:
        shape = (case.B, case.capacity, case.Hkv, case.D)
    args["k_cache"], args["v_cache"] = randn(*shape), randn(*shape)
    if case.n_new:
        args["k"], args["v"] = randn(case.B, case.n_new, case.Hkv, case.D), randn(case.B, case.n_new, case.Hkv, case.D)
    if case.seqlens is not None:
        if case.seqlens_as_int:
            args["cache_seqlens"] = case.seqlens[0]
        else:
            args["cache_seqlens"] = torch.tensor(case.seqlens, dtype=torch.int32, device=device)
    if case.alibi:
        shape = (case.H,) if case.alibi == "h" else (case.B, case.H)
        args["alibi_slopes"] = (torch.rand(*shape, generator=g) * 0.5).to(device)
    args.update(causal=case.causal, window_size=case.window, softcap=case.softcap, num_splits=case.num_splits)
    return args


def expected_caches(case: KVCase, args: dict):
    """The caches after the append, written row by row here (not by any backend)."""
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    if "k" not in args:
        return k_cache, v_cache
    seqlens = args["cache_seqlens"]
    starts = [seqlens] * case.B if isinstance(seqlens, int) else seqlens.tolist()
    for b in range(case.B):
        for r in range(case.n_new):
            pos = starts[b] + r
            if case.page:
                blk, row = int(args["block_table"][b, pos // case.page]), pos % case.page
                k_cache[blk, row], v_cache[blk, row] = args["k"][b, r], args["v"][b, r]
            else:
                k_cache[b, pos], v_cache[b, pos] = args["k"][b, r], args["v"][b, r]
    return k_cache, v_cache


def _call_args(args: dict) -> dict:
    keys = ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table", "causal", "softmax_scale",
            "window_size", "softcap", "alibi_slopes", "num_splits", "return_lse")
    return {k: args.get(k, d) for k, d in zip(keys, (None,) * 7 + (False, None, (-1, -1), 0.0, None, 0, False))}


def truth_and_lowprec(case: KVCase, args: dict):
    """(truth out, truth lse) in float64 and (out, lse) of PyTorch's math in the inputs' dtype,
    both on the expected post-append cache."""
    k_exp, v_exp = expected_caches(case, args)
    problem, kv = prepare(**{**_call_args(args), "return_lse": True})
    truth = kvcache_math(problem, args["q"], k_exp, v_exp, kv, torch.float64)
    low = kvcache_math(problem, args["q"], k_exp, v_exp, kv, case.dtype)
    return truth, low, (k_exp, v_exp)


def run_backend(case: KVCase, args: dict, backend: str):
    """Run one backend's forward_kvcache directly (its capability flags not consulted: this
    tests the kernel itself), as the public function would after validation."""
    from fa2dispatch.backends import BACKENDS

    from fa2dispatch.hardware import device_info

    problem, kv = prepare(**{**_call_args(args), "return_lse": True})
    be = BACKENDS[backend]
    config = be.default_config(problem, device_info(args["q"].device))
    with torch.no_grad():
        return be.forward_kvcache(problem, args["q"], args["k_cache"], args["v_cache"], kv, config)


def check_kv_case(case: KVCase, out, lse, args: dict, truth, low, expected) -> None:
    q = args["q"]
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (case.B, case.H, case.Mq) and lse.dtype == torch.float32
    k_exp, v_exp = expected
    assert torch.equal(args["k_cache"], k_exp), "k_cache after the append differs from the expected cache"
    assert torch.equal(args["v_cache"], v_exp), "v_cache after the append differs from the expected cache"
    magnitude = max_magnitude(truth[0]) if truth[0].numel() else 1.0
    check_close("out", out, truth[0], low[0], max(magnitude, 1e-3))
    check_lse(lse.cpu(), truth[1].cpu(), low[1].cpu())


# ------------------------------------------------------------------------------ the matrix

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CASES = [
    # decode, GQA 4:1, one append, a sequence at 0 before the append and one filling the cache
    KVCase(B=3, seqlens=(37, 0, 63), causal=True),
    KVCase(B=3, seqlens=(37, 0, 63), causal=True, num_splits=1),
    KVCase(B=3, seqlens=(37, 0, 63), causal=True, num_splits=3),
    KVCase(B=3, seqlens=(37, 0, 63), num_splits=7),  # more splits than some sequences have key blocks
    # paged: pages a multiple of the key block (one table read per block) and not (per-row lookups)
    KVCase(B=2, seqlens=(30, 50), page=16, causal=True, num_splits=2),
    KVCase(B=2, seqlens=(30, 5), page=24, capacity=72, num_splits=3),
    KVCase(B=2, seqlens=(7, 40), page=8, capacity=48, n_new=5, Mq=5, causal=True, num_splits=2),
    # chunked prefill: Mq = Mnew > 1, causal bottom-right per sequence; GQA rows span query positions
    KVCase(B=2, Mq=6, n_new=6, seqlens=(11, 0), causal=True, capacity=40),
    KVCase(B=2, Mq=6, n_new=6, seqlens=(11, 0), causal=True, capacity=40, num_splits=4),
    KVCase(B=1, Mq=3, n_new=0, seqlens=(45,), H=4, Hkv=4, causal=True),  # MHA, queries over a cache, no append
    # MQA, odd head dim (padded to 64), float32, bfloat16
    KVCase(B=2, H=6, Hkv=1, D=40, dtype=F32, seqlens=(17, 52), capacity=53, num_splits=2),
    KVCase(B=2, H=8, Hkv=2, D=24, dtype=BF16, seqlens=(9, 33), causal=True, num_splits=2),
    # lengths: the whole cache (cache_seqlens None), an int, zero keys in a sequence
    KVCase(B=2, seqlens=None, n_new=0, capacity=29, num_splits=2),
    KVCase(B=2, seqlens=(13,), n_new=2, seqlens_as_int=True, capacity=31),
    KVCase(B=2, seqlens=(0, 19), n_new=0, num_splits=2),  # sequence 0 sees no key: out 0, lse -inf
    # features: window (both sides, left with causal), softcap, ALiBi (H,) and (B, H)
    KVCase(B=2, seqlens=(40, 22), window=(9, 3), num_splits=2),
    KVCase(B=2, Mq=4, n_new=4, seqlens=(40, 3), window=(6, -1), causal=True, num_splits=3),
    KVCase(B=2, Mq=2, n_new=2, seqlens=(40, 21), window=(-1, 0), page=16),
    KVCase(B=2, seqlens=(40, 22), softcap=1.5, num_splits=2),
    KVCase(B=2, seqlens=(40, 22), softcap=2.0, dtype=F32, causal=True),
    # float32 with a large softcap: tanh's small-argument series (kernels._tanh), not 1 - e
    KVCase(B=2, seqlens=(40, 22), softcap=1000.0, dtype=F32),
    KVCase(B=2, Mq=3, n_new=3, seqlens=(40, 22), alibi="h", causal=True, num_splits=2),
    KVCase(B=2, seqlens=(40, 22), alibi="bh", window=(12, -1), softcap=3.0, page=16, num_splits=2),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_decode_matches_reference(case, nan_poison):
    """The Triton kernels (append, split-KV decode, combine) against float64 truth; NaN-filled
    fresh allocations catch any output or partial element left unwritten."""
    args = make_kv_inputs(case)
    truth, low, expected = truth_and_lowprec(case, args)
    out, lse = run_backend(case, args, "triton")
    check_kv_case(case, out, lse, args, truth, low, expected)


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[7], CASES[14], CASES[21]], ids=lambda c: c.id)
def test_reference_backend(case):
    """The reference backend's own append and math (the CPU path of the dispatcher)."""
    args = make_kv_inputs(case)
    truth, low, expected = truth_and_lowprec(case, args)
    out, lse = run_backend(case, args, "reference")
    check_kv_case(case, out, lse, args, truth, low, expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_function(backend):
    """attention_with_kvcache itself, with a backend forced; the output alone without return_lse,
    and a second decode step appending after the first (positions move with cache_seqlens)."""
    case = KVCase(B=2, seqlens=(5, 30), page=16, causal=True, num_splits=2)
    args = make_kv_inputs(case)
    truth, low, expected = truth_and_lowprec(case, args)
    with fa2dispatch.use_backend(backend):
        out = attention_with_kvcache(**_call_args(args))
        assert isinstance(out, torch.Tensor)
        check_close("out", out, truth[0], low[0])
        assert torch.equal(args["k_cache"], expected[0]) and torch.equal(args["v_cache"], expected[1])
        # step 2: the lengths grew by one; append again and attend
        step = dict(args, cache_seqlens=args["cache_seqlens"] + 1, k=torch.randn_like(args["k"]),
                    v=torch.randn_like(args["v"]), q=torch.randn_like(args["q"]))
        case2 = replace(case, seqlens=tuple(x + 1 for x in case.seqlens))
        truth2, low2, expected2 = truth_and_lowprec(case2, step)
        out2, lse2 = attention_with_kvcache(**{**_call_args(step), "return_lse": True})
    check_kv_case(case2, out2, lse2, step, truth2, low2, expected2)


@pytest.mark.interpreter
def test_public_function_with_features():
    """Window, softcap and ALiBi through the public function on the Triton backend (its
    capability data must admit them for KV-cache calls)."""
    case = KVCase(B=2, Mq=2, n_new=2, seqlens=(40, 9), window=(11, -1), causal=True, softcap=4.0, alibi="bh",
                  page=16, num_splits=3)
    args = make_kv_inputs(case)
    truth, low, expected = truth_and_lowprec(case, args)
    with fa2dispatch.use_backend("triton"):
        assert explain_kvcache(**_call_args(args)).backend.name == "triton"
        out, lse = attention_with_kvcache(**{**_call_args(args), "return_lse": True})
    check_kv_case(case, out, lse, args, truth, low, expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("fused", [True, False], ids=["fused-combine", "combine-kernel"])
def test_split_counts_agree(fused, monkeypatch):
    """Every split count gives the same answer within the rule (the combine is exact math), with
    the combine folded into decode_fwd (the last split of each row block combines) and as its own
    kernel. The fused path's arrival counters are one buffer for every call, as on a CUDA
    stream: each call must leave it zero. Over MAX_FUSED_SPLITS (2 here) the kernel combines."""
    from fa2dispatch.backends.triton_fa2 import decode_launch

    monkeypatch.setattr(decode_launch, "USE_FUSED", fused)
    monkeypatch.setattr(decode_launch, "MAX_FUSED_SPLITS", 2)
    counters = torch.zeros(1024, dtype=torch.int32)
    monkeypatch.setattr(decode_launch, "_arrival_counters", lambda device, n: counters)
    launched = []
    real_launch = decode_launch._launch
    monkeypatch.setattr(decode_launch, "_launch",
                        lambda fn, *a: launched.append((fn.fn.__name__, a[3].get("FUSED_COMBINE", False)))
                        or real_launch(fn, *a))
    base = KVCase(B=2, seqlens=(50, 61), causal=True)
    args = make_kv_inputs(base)
    truth, low, expected = truth_and_lowprec(base, args)
    for splits in (1, 2, 4):
        launched.clear()
        run_args = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone(), num_splits=splits)
        out, lse = run_backend(replace(base, num_splits=splits), run_args, "triton")
        check_kv_case(base, out, lse, run_args, truth, low, expected)
        assert not counters.any(), f"{splits} splits left arrival counts behind: {counters[:8].tolist()}"
        kernels = [name for name, _ in launched if name != "kv_append"]
        want_fused = fused and splits == 2
        assert kernels == (["decode_fwd"] if splits == 1 or want_fused else ["decode_fwd", "decode_combine"]), launched
        assert ("decode_fwd", True) in launched if want_fused else ("decode_fwd", True) not in launched, launched


def test_auto_dispatch_on_cpu_runs_reference():
    case = KVCase(B=2, seqlens=(5, 9))
    args = make_kv_inputs(case)
    decision = explain_kvcache(**_call_args(args))
    assert decision.problem.kvcache and decision.problem.Mkv == case.capacity
    assert "kvcache" in decision.problem.describe()
    truth, low, expected = truth_and_lowprec(case, args)
    out, lse = attention_with_kvcache(**{**_call_args(args), "return_lse": True})
    check_kv_case(case, out, lse, args, truth, low, expected)
    paged = make_kv_inputs(replace(case, page=16))
    assert explain_kvcache(**_call_args(paged)).problem.paged_block == 16


def test_problem_fields_and_window_normalization():
    """Mkv is the capacity; a window side that can mask no key of any length <= capacity is
    dropped (exact for every per-sequence length); causal keeps the right side unbounded."""
    args = make_kv_inputs(KVCase(B=2, seqlens=(5, 9), capacity=64))
    problem, kv = prepare(**{**_call_args(args), "window_size": (63, 0)})
    assert problem.window == (-1, -1)  # left >= capacity - 1, right >= Mq - 1: nothing masked
    problem, _ = prepare(**{**_call_args(args), "window_size": (10, 0)})
    assert problem.window == (10, -1)
    problem, _ = prepare(**{**_call_args(args), "window_size": (10, 4), "causal": True})
    assert problem.window == (10, -1) and problem.causal
    assert kv.n_new == 1 and kv.max_seqlen_k == 64


def test_fallback_to_next_backend(monkeypatch):
    """A backend failing at run time on a valid call hands over to the next capable one,
    which appends (idempotently) and computes; the failure is recorded."""
    from fa2dispatch.backends import BACKENDS

    from fa2dispatch.dispatch import Decision
    from fa2dispatch.hardware import device_info
    from fa2dispatch.kvcache import run

    case = KVCase(B=2, seqlens=(5, 9))
    args = make_kv_inputs(case)
    truth, low, expected = truth_and_lowprec(case, args)
    problem, kv = prepare(**{**_call_args(args), "return_lse": True})

    def broken(*a, **kw):
        raise RuntimeError("injected launch failure")

    monkeypatch.setattr(BACKENDS["triton"], "forward_kvcache", broken)
    dispatch.clear_failures()
    device = device_info(args["q"].device)
    decision = Decision(BACKENDS["triton"], None, "default", device, problem, {}, ("reference",))
    out, lse = run(decision, problem, args["q"], args["k_cache"], args["v_cache"], kv, "auto")
    check_kv_case(case, out, lse, args, truth, low, expected)
    assert [(f.backend, f.replaced_by) for f in dispatch.failures()] == [("triton", "reference")]
    forced = Decision(BACKENDS["triton"], None, "forced", device, problem)
    with pytest.raises(RuntimeError, match="injected"):
        run(forced, problem, args["q"], args["k_cache"], args["v_cache"], kv, "triton")
    dispatch.clear_failures()


def test_split_heuristic():
    from fa2dispatch.backends.triton_fa2.decode_launch import active_splits, split_heuristic

    # GQA 8:1 (Hkv=4) at context 32k in 64-key blocks on 132 SMs: the H100 sweep's best counts,
    # B x Hkv x splits = 128 programs, one per SM, equal parts (docs/DECODE.md)
    assert [split_heuristic(b * 4, 512, 132) for b in (1, 2, 4, 8, 16)] == [32, 16, 8, 4, 2]
    assert split_heuristic(32 * 4, 512, 132) == 1  # the SMs are full without splitting
    assert split_heuristic(4, 8, 132) == 8  # capped at the 8 key blocks
    assert split_heuristic(1, 10_000, 132) == 127  # <= 128, and every split gets 79 blocks
    assert split_heuristic(64 * 4, 256, 132) == 1  # enough programs already
    for base, blocks, sms in ((4, 512, 132), (3, 1000, 108), (5, 77, 80), (1, 3, 4)):
        s = split_heuristic(base, blocks, sms)
        assert active_splits(s, blocks) == s and base * s <= 2 * sms


# ------------------------------------------------------------------------------ validation


@pytest.fixture
def no_kvcache_launch(monkeypatch):
    from fa2dispatch.backends import BACKENDS

    def launched(*args, **kwargs):
        raise AssertionError("kernel launched")

    for backend in BACKENDS.values():
        monkeypatch.setattr(backend, "forward_kvcache", launched)
    dispatch.clear_memo()
    yield
    dispatch.clear_memo()


I32 = torch.int32
INVALID = [
    ("q-3d", lambda a: dict(a, q=a["q"][:, 0]), ValueError, r"q \(shape .*expected a 4-d tensor"),
    ("q-not-tensor", lambda a: dict(a, q=1.0), TypeError, "q must be a torch.Tensor"),
    ("q-int", lambda a: dict(a, q=a["q"].to(torch.int32)), TypeError, "q .*dtype not supported"),
    ("q-fp8", lambda a: dict(a, q=a["q"].to(torch.float8_e4m3fn)), TypeError, "q .*dtype not supported"),
    ("kcache-dtype", lambda a: dict(a, k_cache=a["k_cache"].float()), TypeError, "k_cache .*dtype differs"),
    ("vcache-shape", lambda a: dict(a, v_cache=a["v_cache"][:, :-1]), ValueError, "same shape"),
    ("kcache-heads", lambda a: dict(a, k_cache=a["k_cache"][:, :, :1].expand(-1, -1, 3, -1),
                                    v_cache=a["v_cache"][:, :, :1].expand(-1, -1, 3, -1)), ValueError,
     "multiple of the key/value heads"),
    ("head-dim", lambda a: dict(a, q=a["q"][..., :32]), ValueError, "head dims differ"),
    ("kcache-strided-d", lambda a: dict(a, k_cache=a["k_cache"].transpose(1, 3).contiguous().transpose(1, 3)),
     ValueError, "k_cache .*last dimension must be contiguous"),
    ("cache-batch", lambda a: dict(a, k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError,
     "cache batch 1 is smaller"),
    ("k-without-v", lambda a: dict(a, v=None), ValueError, "k is given but v is None"),
    ("v-without-k", lambda a: dict(a, k=None), ValueError, "v is given but k is None"),
    ("k-shape", lambda a: dict(a, k=a["k"][:, :, :1], v=a["v"][:, :, :1]), ValueError, r"k \(shape .*expected shape"),
    ("k-dtype", lambda a: dict(a, k=a["k"].float()), TypeError, "k .*dtype differs"),
    ("k-v-shapes", lambda a: dict(a, v=torch.cat([a["v"], a["v"]], 1)), ValueError, "k and v must have the same"),
    ("seqlens-none-append", lambda a: dict(a, cache_seqlens=None), ValueError, "cache_seqlens is None"),
    ("seqlens-dtype", lambda a: dict(a, cache_seqlens=a["cache_seqlens"].long()), TypeError,
     "cache_seqlens .*int32"),
    ("seqlens-length", lambda a: dict(a, cache_seqlens=a["cache_seqlens"][:1]), ValueError,
     r"cache_seqlens .*expected shape \(B=2,\)"),
    ("seqlens-type", lambda a: dict(a, cache_seqlens=[1, 2]), TypeError, "cache_seqlens must be"),
    ("seqlens-negative", lambda a: dict(a, cache_seqlens=torch.tensor([-1, 3], dtype=I32)), ValueError,
     "cache_seqlens .*values must be in 0..63"),
    ("append-overflow", lambda a: dict(a, cache_seqlens=torch.tensor([64, 3], dtype=I32)), ValueError,
     "values must be in 0..63 .*got min 3, max 64"),
    ("append-overflow-int", lambda a: dict(a, cache_seqlens=64), ValueError, "cache_seqlens=64: must be in 0..63"),
    ("num-splits-negative", lambda a: dict(a, num_splits=-1), ValueError, "num_splits=-1 must be >= 0"),
    ("num-splits-float", lambda a: dict(a, num_splits=2.0), TypeError, "num_splits must be an int"),
    ("causal-type", lambda a: dict(a, causal=1), TypeError, "causal must be a bool"),
    ("scale-inf", lambda a: dict(a, softmax_scale=float("inf")), ValueError, "softmax_scale=inf must be finite"),
    ("window", lambda a: dict(a, window_size=(-2, 0)), ValueError, "window_size"),
    ("softcap", lambda a: dict(a, softcap=-1.0), ValueError, "softcap=-1.0"),
    ("alibi-shape", lambda a: dict(a, alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes .*expected shape"),
]
PAGED_INVALID = [
    ("table-dtype", lambda a: dict(a, block_table=a["block_table"].long()), TypeError, "block_table .*int32"),
    ("table-shape", lambda a: dict(a, block_table=a["block_table"][0]), ValueError,
     r"block_table .*expected shape \(B=2"),
    ("table-id-high", lambda a: dict(a, block_table=torch.where(a["block_table"] == a["block_table"][1, 0], 99,
                                                                a["block_table"])), ValueError,
     r"block_table .*page ids of the pages in use must be in 0..10"),
    ("table-id-negative", lambda a: dict(a, block_table=a["block_table"] * 0 - 1), ValueError,
     "page ids of the pages in use"),
]


@pytest.mark.parametrize("name,mutate,exc,match", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_calls_raise_before_any_write(name, mutate, exc, match, no_kvcache_launch):
    args = make_kv_inputs(KVCase(B=2, seqlens=(20, 41)))
    before = args["k_cache"].clone(), args["v_cache"].clone()
    bad = mutate(dict(args))
    with pytest.raises(exc, match=match):
        attention_with_kvcache(**_call_args(bad))
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


@pytest.mark.parametrize("name,mutate,exc,match", PAGED_INVALID, ids=[c[0] for c in PAGED_INVALID])
def test_invalid_paged_calls(name, mutate, exc, match, no_kvcache_launch):
    args = make_kv_inputs(KVCase(B=2, seqlens=(20, 41), page=16, capacity=64))  # 8 pages used + 3 spare
    with pytest.raises(exc, match=match):
        attention_with_kvcache(**_call_args(mutate(dict(args))))


def test_unused_pages_may_hold_anything(no_kvcache_launch):
    """Only pages that hold a key of the sequence are checked (flash-attn never reads the rest):
    a table padded with -1 past the used pages is valid."""
    case = KVCase(B=2, seqlens=(3, 41), page=16, capacity=64)
    args = make_kv_inputs(case)
    table = args["block_table"].clone()
    table[0, 1:] = -1  # sequence 0 uses one page (3 keys + 1 appended)
    problem, _ = prepare(**{**_call_args(args), "block_table": table})
    assert problem.paged_block == 16


# ------------------------------------------------------------------------------ offline compile

# (dtype, head dim, page size, features) compiled for sm_90 at the H100 default plan
COMPILE_KINDS = [
    ("float16", 128, 0, ""), ("bfloat16", 128, 256, "causal,left,softcap,alibi"), ("float16", 64, 24, "right"),
    ("bfloat16", 256, 0, ""),
]


def offline_compile(target: str = "sm_90") -> list[dict]:
    """Compile the decode kernels for ``target`` at their default plan, specialised as a launch
    specialises them (unit last-dim strides, 16-divisible pointers and strides): rows with the
    shared memory, whether tl.dot became MMA instructions and whether the key/value loads are
    pipelined (cp.async). Needs TRITON_INTERPRET unset or 0 (run in a subprocess)."""
    import triton
    from fa2dispatch.backends.triton_fa2 import decode
    from fa2dispatch.backends.triton_fa2.config import block_d
    from fa2dispatch.backends.triton_fa2.decode_launch import DecodePlan, plan
    from fa2dispatch.backends.triton_fa2.offline import TARGETS
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fa2dispatch.problem import AttentionProblem

    device = TARGETS[target]
    arch = GPUTarget("cuda", device.capability[0] * 10 + device.capability[1], 32)
    rows = []
    for dtype_name, D, page, feats in COMPILE_KINDS:
        dtype = getattr(torch, dtype_name)
        short = {"float16": "fp16", "bfloat16": "bf16"}[dtype_name]
        problem = AttentionProblem(B=1, H=32, Hkv=4, Mq=1, Mkv=32768, D=D, dtype=dtype, device=torch.device("cpu"),
                                   layout="bshd", causal="causal" in feats, softmax_scale=1.0, kvcache=True,
                                   paged_block=page)
        kv = type("KV", (), {"max_seqlen_k": 32768, "num_splits": 0})()
        p: DecodePlan = plan(problem, kv, None, device)
        pointers = {"Q": short, "Kc": short, "Vc": short, "Out": short, "Knew": short, "Vnew": short,
                    "Seqlens": "i32", "BlockTable": "i32", "Slopes": "fp32", "Lse": "fp32", "OutPart": "fp32",
                    "LsePart": "fp32", "Flags": "i32", "Arrivals": "i32"}
        unit = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1, "stride_nd": 1}
        launches = [
            ("decode_fwd", {"GROUP": 8, "HEAD_DIM": D, "BLOCK_D": block_d(D), "BLOCK_M": p.block_m,
                            "BLOCK_N": p.block_n, "PAGE_SIZE": page, "SPLIT": True, "CAUSAL": "causal" in feats,
                            "WINDOW_LEFT": "left" in feats, "WINDOW_RIGHT": "right" in feats,
                            "SOFTCAP": "softcap" in feats, "ALIBI": "alibi" in feats, "DOT_PRECISION": "tf32",
                            "PDL": True, "FUSED_COMBINE": False, "BLOCK_S": 1},
             {"num_warps": p.num_warps, "num_stages": p.num_stages}),
            ("decode_fwd", {"GROUP": 8, "HEAD_DIM": D, "BLOCK_D": block_d(D), "BLOCK_M": p.block_m,
                            "BLOCK_N": p.block_n, "PAGE_SIZE": page, "SPLIT": True, "CAUSAL": "causal" in feats,
                            "WINDOW_LEFT": "left" in feats, "WINDOW_RIGHT": "right" in feats,
                            "SOFTCAP": "softcap" in feats, "ALIBI": "alibi" in feats, "DOT_PRECISION": "tf32",
                            "PDL": False, "FUSED_COMBINE": True, "BLOCK_S": 1 << (p.num_splits - 1).bit_length()},
             {"num_warps": p.num_warps, "num_stages": p.num_stages}),
            ("decode_combine", {"BLOCK_S": 1 << (p.num_splits - 1).bit_length(),
                                "HEAD_DIM": D, "BLOCK_D": block_d(D), "PDL": True},
             {"num_warps": 4, "launch_pdl": True}),
            ("kv_check", {"CHECK_LEN": True, "PAGE_SIZE": page, "BLOCK_T": 256}, {"num_warps": 1}),
            ("kv_append", {"HEAD_DIM": D, "BLOCK_D": block_d(D), "BLOCK_M": 16, "PAGE_SIZE": page}, {"num_warps": 4}),
        ]
        for name, constexprs, options in launches:
            fn = getattr(decode, name)
            constexprs = dict(constexprs, **{k: v for k, v in unit.items() if k in fn.arg_names})
            signature, attrs = {}, {}
            for i, arg in enumerate(fn.arg_names):
                if arg in constexprs:
                    signature[arg] = "constexpr"
                    continue
                signature[arg] = ("*" + pointers[arg]) if arg in pointers else \
                    ("fp32" if arg in ("sm_scale", "softcap") else "i32")
                if arg in pointers or arg.startswith("stride_"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=arch, options=options)
            ptx = compiled.asm["ptx"]
            rows.append({"kernel": name, "dtype": dtype_name, "head_dim": D, "page": page, "features": feats,
                             "plan": f"block_m={p.block_m} block_n={p.block_n} warps={p.num_warps} "
                                  f"stages={p.num_stages} splits={p.num_splits}",
                             "shared": compiled.metadata.shared, "smem_limit": device.smem_per_block,
                             "mma": "mma" in ptx, "cp_async": "cp.async" in ptx,
                             "griddepcontrol": "griddepcontrol" in ptx,
                             "fused": bool(constexprs.get("FUSED_COMBINE")),
                             "atom_acq_rel_gpu": any("atom" in ln and ".acq_rel" in ln and ".gpu" in ln
                                                     for ln in ptx.splitlines()),
                             "bar_sync": "bar.sync" in ptx or "barrier.sync" in ptx,
                             "ld_cg": "ld.global.cg" in ptx, "local": ".local" in ptx})
    return rows


@pytest.mark.compile
def test_decode_kernels_compile_for_sm90():
    """Every decode kernel compiles for sm_90 at the H100 default plan and fits its shared
    memory; decode_fwd's dots are MMA instructions and its cache loads are pipelined."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__, "--offline-compile"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(__file__), timeout=600, check=False)
    assert proc.returncode == 0, f"offline compile failed:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 5 * len(COMPILE_KINDS)
    for row in rows:
        print(row)
        assert row["shared"] <= row["smem_limit"], row
        if row["kernel"] == "decode_fwd":
            assert row["mma"] and row["cp_async"], row
            if row["fused"]:  # the arrival protocol: a barrier, a gpu-scope acq_rel atomic, partials read past L1
                assert row["atom_acq_rel_gpu"] and row["bar_sync"] and row["ld_cg"], row
                assert not row["local"], row
            else:
                assert row["griddepcontrol"], row  # PDL: lets decode_combine launch early
        if row["kernel"] == "decode_combine":
            assert row["griddepcontrol"], row  # PDL: waits for decode_fwd's writes


if __name__ == "__main__" and sys.argv[1:] == ["--offline-compile"]:
    import json

    print(json.dumps(offline_compile()))


def test_memoized_validation_still_checks_values(no_kvcache_launch):
    """A call whose signature was validated before takes the memo, and its values are still
    checked: the same shapes with lengths out of range, or a new int length, still raise."""
    from fa2dispatch import kvcache

    args = make_kv_inputs(KVCase(B=2, seqlens=(20, 41), page=16, capacity=64))
    call = _call_args(args)
    problem, _ = prepare(**call)
    assert prepare(**call)[0] is problem  # memo hit: the same problem object
    with pytest.raises(ValueError, match="cache_seqlens .*values must be in 0..63"):
        prepare(**dict(call, cache_seqlens=torch.tensor([20, 64], dtype=torch.int32)))
    table = args["block_table"].clone()
    table[1, 2] = 1000
    with pytest.raises(ValueError, match="page ids"):
        prepare(**dict(call, block_table=table))
    prepare(**dict(call, cache_seqlens=5))
    with pytest.raises(ValueError, match="cache_seqlens=63: must be in 0..62"):
        prepare(**dict(call, cache_seqlens=63, k=args["k"].expand(2, 2, 2, 64).contiguous(),
                       v=args["v"].expand(2, 2, 2, 64).contiguous()))
    assert len(kvcache._memo) >= 2


def test_kv_check_kernel_flags():
    """The fused value check (decode.kv_check, the GPU path of kvcache._check_values) flags each
    sequence's bad length (bit 0) and bad page ids among the pages in use only (bit 1)."""
    from fa2dispatch.backends.triton_fa2.decode import kv_check

    seqlens = torch.tensor([0, 20, 63, 64, -1, 30], dtype=torch.int32)
    table = torch.arange(6 * 4, dtype=torch.int32).reshape(6, 4)  # 4 pages of 16 rows, 24 pages
    table[1, 1] = 24  # used by sequence 1 (keys 16..20): bad
    table[2, 3] = -1  # used by sequence 2 (keys 48..63): bad
    table[5, 3] = 99  # not used by sequence 5 (30 + 1 keys: pages 0, 1): ignored
    flags = torch.full((6,), -7, dtype=torch.int32)
    kv_check[(6,)](seqlens, table, flags, 1, 63, 24, table.stride(0), CHECK_LEN=True, PAGE_SIZE=16, BLOCK_T=2)
    assert flags.tolist() == [0, 2, 2, 1, 1, 0]
    kv_check[(6,)](seqlens, seqlens, flags, 0, 64, 24, 0, CHECK_LEN=True, PAGE_SIZE=0, BLOCK_T=2)
    assert flags.tolist() == [0, 0, 0, 0, 1, 0]
