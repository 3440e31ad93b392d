"""attention_with_kvcache on a real GPU at realistic sizes: the Triton decode kernels (context
32k, GQA 8:1, paged and contiguous, appends, chunked prefill, features) against float64 truth
by STYLE.md's rule, what auto dispatch picks, and decode under CUDA graph capture.
Skipped with the reason where there is no GPU (tests/conftest.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_kvcache import KVCase, _call_args, check_kv_case, make_kv_inputs, run_backend, truth_and_lowprec

import fa2dispatch
from fa2dispatch.kvcache import attention_with_kvcache, explain_kvcache

pytestmark = pytest.mark.gpu

F16, BF16 = torch.float16, torch.bfloat16
LONG = {"B": 4, "H": 32, "Hkv": 4, "D": 128, "capacity": 32768, "seqlens": (32767, 1000, 0, 20000)}
GPU_CASES = [
    KVCase(**LONG),  # decode at 32k, split count by heuristic
    KVCase(**LONG, num_splits=1),
    KVCase(**LONG, dtype=BF16, num_splits=16),
    KVCase(**LONG, page=256),  # vLLM-style pages, one table read per key block
    KVCase(**LONG, page=16, dtype=BF16),  # small pages: per-row page lookups
    KVCase(B=2, H=32, Hkv=4, D=128, capacity=32768, seqlens=(32768, 9000), n_new=0),  # full cache, no append
    # chunked prefill: 128 new queries appended and attended causally, GQA 8:1 and 4:1
    KVCase(B=2, Mq=128, n_new=128, H=32, Hkv=4, D=128, capacity=8192, seqlens=(5000, 0), causal=True),
    KVCase(B=2, Mq=128, n_new=128, H=16, Hkv=4, D=64, capacity=8192, seqlens=(8064, 77), causal=True, page=64,
           dtype=BF16),
    # head dims, MQA
    KVCase(B=3, H=16, Hkv=1, D=256, capacity=4096, seqlens=(4095, 17, 2048)),
    KVCase(B=3, H=8, Hkv=8, D=64, capacity=4096, seqlens=(4095, 17, 2048), dtype=torch.float32),
    # features at 4k
    KVCase(B=2, H=32, Hkv=4, D=128, capacity=4096, seqlens=(4000, 1500), window=(1024, -1), causal=True,
           Mq=4, n_new=4),
    KVCase(B=2, H=32, Hkv=4, D=128, capacity=4096, seqlens=(4000, 1500), window=(300, 200), Mq=8, n_new=8),
    KVCase(B=2, H=32, Hkv=4, D=128, capacity=4096, seqlens=(4000, 1500), softcap=30.0, dtype=BF16),
    KVCase(B=2, H=32, Hkv=4, D=128, capacity=4096, seqlens=(4000, 1500), alibi="bh", causal=True, page=256),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_triton_decode_gpu(case):
    args = make_kv_inputs(case, device="cuda")
    truth, low, expected = truth_and_lowprec(case, args)
    out, lse = run_backend(case, args, "triton")
    torch.cuda.synchronize()
    check_kv_case(case, out, lse, args, truth, low, expected)


def test_auto_dispatch_picks_triton_and_matches():
    case = KVCase(**LONG)
    args = make_kv_inputs(case, device="cuda")
    decision = explain_kvcache(**_call_args(args))
    assert decision.backend.name == "triton", str(decision)
    truth, low, expected = truth_and_lowprec(case, args)
    out, lse = attention_with_kvcache(**{**_call_args(args), "return_lse": True})
    check_kv_case(case, out, lse, args, truth, low, expected)


def test_value_checks_on_gpu():
    """Lengths and page ids are checked on device tensors too (one sync), before any write."""
    args = make_kv_inputs(KVCase(B=2, seqlens=(20, 41), page=16, capacity=64), device="cuda")
    before = args["k_cache"].clone()
    bad = dict(args, cache_seqlens=torch.tensor([64, 3], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="cache_seqlens .*values must be in 0..63"):
        attention_with_kvcache(**_call_args(bad))
    table = args["block_table"].clone()
    table[1, 0] = 1000
    with pytest.raises(ValueError, match="block_table .*page ids"):
        attention_with_kvcache(**_call_args(dict(args, block_table=table)))
    assert torch.equal(args["k_cache"], before)


@pytest.mark.parametrize("fused, pdl", [(True, False), (False, False), (False, True)],
                         ids=["fused-combine", "combine", "combine-pdl"])
def test_decode_under_cuda_graph(fused, pdl, monkeypatch):
    """A decode step captured in a CUDA graph (value checks are skipped during capture) and
    replayed with new lengths and new rows gives the answer of the eager call, twice (the fused
    combine's arrival counters, the graph's own, must be zero again after a replay); with the
    combine folded into decode_fwd, as its own kernel, and as a programmatic dependent launch
    (decode_launch.USE_PDL; 8 splits here)."""
    from fa2dispatch.backends.triton_fa2 import decode_launch

    monkeypatch.setattr(decode_launch, "USE_FUSED", fused)
    monkeypatch.setattr(decode_launch, "USE_PDL", pdl)
    case = KVCase(B=4, H=32, Hkv=4, D=128, capacity=4096, seqlens=(100, 4000, 0, 2500), page=256)
    args = make_kv_inputs(case, device="cuda")
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    call = _call_args(static)
    with fa2dispatch.use_backend("triton"):
        attention_with_kvcache(**call)  # warm-up: compile outside the capture
        static["k_cache"].copy_(args["k_cache"])
        static["v_cache"].copy_(args["v_cache"])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attention_with_kvcache(**call)
    # step: new lengths, queries and rows written into the static inputs, then replay
    step = dict(args, cache_seqlens=args["cache_seqlens"] + 3, q=torch.randn_like(args["q"]),
                k=torch.randn_like(args["k"]), v=torch.randn_like(args["v"]))
    case2 = replace(case, seqlens=tuple(s + 3 for s in case.seqlens))
    truth, low, expected = truth_and_lowprec(case2, step)
    for name in ("q", "k", "v", "cache_seqlens"):
        static[name].copy_(step[name])
    static["k_cache"].copy_(args["k_cache"])
    static["v_cache"].copy_(args["v_cache"])
    graph.replay()
    torch.cuda.synchronize()
    from helpers import check_close

    check_close("out", out, truth[0], low[0])
    assert torch.equal(static["k_cache"], expected[0]) and torch.equal(static["v_cache"], expected[1])
    first = out.clone()
    static["k_cache"].copy_(args["k_cache"])
    static["v_cache"].copy_(args["v_cache"])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first), "a second replay of the same step gave another answer"


def test_fused_combine_on_concurrent_streams(monkeypatch):
    """The fused combine's arrival counters are per stream (decode_launch._arrival_counters):
    decode loops on two streams at once, each over its own inputs, give bit for bit the answers
    of the same calls run alone, and match float64 truth; the counters end at zero."""
    from fa2dispatch.backends.triton_fa2 import decode_launch

    monkeypatch.setattr(decode_launch, "USE_FUSED", True)  # opt-in (FA2DISPATCH_DECODE_FUSED=1)
    cases = [KVCase(B=1, H=32, Hkv=4, D=128, capacity=32768, seqlens=(32000,), n_new=0)] * 2
    inputs = [make_kv_inputs(c, device="cuda", seed=s) for c, s in zip(cases, (1, 2))]
    with fa2dispatch.use_backend("triton"):
        alone = [attention_with_kvcache(**_call_args(a)) for a in inputs]
        assert decode_launch._launches and any(x.fused for x in decode_launch._launches.values()), \
            "the fused combine did not run (B=1 at 32k should split)"
        streams = [torch.cuda.Stream() for _ in cases]
        outs = [[], []]
        torch.cuda.synchronize()
        for _ in range(20):
            for i, (stream, a) in enumerate(zip(streams, inputs)):
                with torch.cuda.stream(stream):
                    outs[i].append(attention_with_kvcache(**_call_args(a)))
        torch.cuda.synchronize()
    for i, (case, a) in enumerate(zip(cases, inputs)):
        assert all(torch.equal(o, alone[i]) for o in outs[i]), f"stream {i}: a concurrent call differed"
        truth, low, _ = truth_and_lowprec(case, a)
        from helpers import check_close

        check_close("out", alone[i], truth[0], low[0])
    assert not any(buf.any() for buf in decode_launch._COUNTERS.values()), "arrival counters left non-zero"


@pytest.mark.parametrize("pdl", [False, True], ids=["combine", "combine-pdl"])
@pytest.mark.parametrize("page", [0, 256])
def test_decode_loop_fast_launch(page, pdl, monkeypatch):
    """A decode loop's later steps launch the cached compiled kernels directly
    (fast_launch.FAST_LAUNCH; the combine as a programmatic dependent launch where USE_PDL):
    new tensors every step, one of them at a pointer that is not 16-byte aligned (a different
    specialization), and every step matches the truth; so does Triton's own launcher. The fast
    path must really be taken (it falls back to Triton's path if its launcher refuses)."""
    from fa2dispatch.backends.triton_fa2 import decode, decode_launch, fast_launch

    monkeypatch.setattr(decode_launch, "USE_PDL", pdl)
    runs = [0] * 4  # decode_fwd launches through JITFunction.run, per step
    real_run = decode.decode_fwd.run
    monkeypatch.setattr(decode.decode_fwd, "run",
                        lambda *a, **kw: runs.__setitem__(step, runs[step] + 1) or real_run(*a, **kw))
    case = KVCase(B=2, H=32, Hkv=4, D=128, capacity=4096, seqlens=(4000, 1500), page=page)
    for step in range(4):
        args = make_kv_inputs(case, device="cuda", seed=step)
        if step == 2:  # q one element into a larger buffer: its pointer is 2-byte aligned
            buf = torch.empty(args["q"].numel() + 1, dtype=args["q"].dtype, device="cuda")
            q = buf[1:].view_as(args["q"])
            q.copy_(args["q"])
            args["q"] = q
        truth, low, expected = truth_and_lowprec(case, args)
        monkeypatch.setattr(fast_launch, "FAST_LAUNCH", step != 3)
        out, lse = run_backend(case, args, "triton")
        torch.cuda.synchronize()
        check_kv_case(case, out, lse, args, truth, low, expected)
        assert fast_launch.FAST_LAUNCH == (step != 3), f"the fast launch path fell back to Triton's: {fast_launch.REFUSED}"
    # step 0 compiles (unless an earlier test did), step 1 repeats it, step 3 has the fast path off
    assert runs[1] == 0 and runs[3] == 1, f"JITFunction.run per step: {runs} (fast launch not taken at step 1?)"
