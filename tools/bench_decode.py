#!/usr/bin/env python3
"""Benchmark fa2dispatch.attention_with_kvcache (decode) against the device's copy bandwidth
and PyTorch SDPA, all measured in the same run; optionally the decode config sweep and
attention_varlen against dense attention at equal total tokens.

Decode case (BENCHMARKS.md target): GQA 8:1 (H=32, Hkv=4), D=128, float16, a full 32k
context per sequence (cache_seqlens = 32768), Mq = 1, batch 1..64, contiguous cache.
Every timing is fa2dispatch.autotune.timer.CudaTimer: warm-up, L2 flushed (256 MiB write)
before each run, median between device events.

- copy: ``dst.copy_(src)`` of a 2 GiB buffer; bandwidth = bytes read + bytes written / time.
- ours, eager: the public call, ``attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=...)``,
  with the value checks off (``kvcache.CHECK_VALUES = False``: no host sync, as in a decode
  loop); ``chk`` is the same call with them on (one sync per call). The L2 flush before each
  run gives the host a head start of one 256 MiB write; where the host's cost per call
  (``host us``: enqueue rate of back-to-back calls) exceeds it, eager times include host time.
- ours, graph: the same call captured in a CUDA graph and replayed (how serving engines run
  decode steps): the GPU time alone. Effective bandwidth = K and V bytes of the cache the call
  must read / time; ``%copy`` = that over the copy bandwidth. ``paged``: the same cache viewed
  as 256-row pages in shuffled order through ``block_table``, in a CUDA graph.
- clean: every graph timing is repeated with ``CudaTimer(clean_l2=True)`` (the write flush, then a 256 MiB
  read of another buffer): a cold L2 without dirty lines, whose write-back otherwise adds up
  to 50 MB of DRAM traffic to the timed run (a third of B=1's bytes).
- SDPA: ``torch.nn.functional.scaled_dot_product_attention`` on the same tensors (the cache
  viewed as (B, Hkv, S, D)) pinned to each backend through ``sdpa_kernel``, eager and in a
  CUDA graph: first with ``enable_gqa=True``; a backend that refuses it gets K/V expanded to H
  heads (a copy made outside the timing, when it fits in memory; never for MATH). The best
  backend of each mode is reported.

    python tools/bench_decode.py --out decode.json
    python tools/bench_decode.py --no-decode --sweep --sweep-batches 1,2,4,8   # configs x split counts
    python tools/bench_decode.py --host-cpu                    # Python side of a call, CPU, kernels mocked
    python tools/bench_decode.py --varlen                      # attention_varlen vs dense, if it exists
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from datetime import datetime, timezone

CONTEXT = 32768
H, HKV, D = 32, 4, 128
BATCHES = (1, 2, 4, 8, 16, 32, 64)
# (decode_block_n, decode_num_stages, decode_num_warps) timed by --sweep, each at the plan's split
# count, half and twice it, and the counts near 1..4 programs per SM (sweep_split_counts)
SWEEP_CONFIGS = ((32, 4, 4), (32, 6, 4), (64, 2, 4), (64, 3, 4), (64, 4, 4), (64, 5, 4), (64, 3, 8),
                 (64, 4, 8), (128, 2, 4), (128, 3, 4), (128, 2, 8), (128, 3, 8))
SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
STEPS_PER_GRAPH = 8  # --floor: calls per graph in the "N per graph" rows


def bind(fn, *args, **kwargs):
    """A no-argument call of fn with these arguments, bound now (not at call time)."""
    return lambda: fn(*args, **kwargs)


def _timer(runs: int):
    from fa2dispatch.autotune.timer import CudaTimer

    return CudaTimer(runs=runs)


def copy_bandwidth(timer, nbytes: int = 2 << 30) -> dict:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    t = timer(bind(dst.copy_, src))
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "ms": t.ms, "GBps": 2 * nbytes / (t.ms * 1e-3) / 1e9}


def make_decode(B: int, dtype, context: int = CONTEXT, seed: int = 0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype, generator=g)
    k_cache = torch.randn(B, context, HKV, D, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn(B, context, HKV, D, device="cuda", dtype=dtype, generator=g)
    seqlens = torch.full((B,), context, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, seqlens


def graph_of(fn):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream, which compile
    and allocate): replaying it costs one launch, so its timing is the GPU time alone."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"


def sdpa_times(q, k_cache, v_cache, timer, clean=None) -> dict:
    """Per SDPA backend on the same call: eager ms and CUDA-graph ms (None with the reason
    where it cannot run it)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs = q.transpose(1, 2)  # (B, H, 1, D)
    ks, vs = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (B, Hkv, S, D) views of the cache
    results = {}
    for name in SDPA:
        backend = getattr(SDPBackend, name)
        entry = {"ms": None, "graph_ms": None, "graph_clean_ms": None}
        ke = ve = None
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)
            call, entry["how"] = bind(F.scaled_dot_product_attention, qs, ks, vs, enable_gqa=True), "enable_gqa"
        except Exception as exc:  # noqa: BLE001 - each backend's refusal is data
            first = _first_line(exc)
            free, _ = torch.cuda.mem_get_info()
            need = 2 * ks.numel() * ks.element_size() * (H // HKV)
            if need > 0.8 * free or name == "MATH":
                results[name.lower()] = dict(entry, how=f"enable_gqa refused ({first}); expanded K/V "
                                                        f"({need / 2**30:.1f} GiB) not tried")
                continue
            ke = ks.repeat_interleave(H // HKV, dim=1)
            ve = vs.repeat_interleave(H // HKV, dim=1)
            call, entry["how"] = bind(F.scaled_dot_product_attention, qs, ke, ve), \
                f"expanded K/V (enable_gqa refused: {first})"
        try:
            with sdpa_kernel([backend]):
                entry["ms"] = timer(call).ms
                try:
                    g = graph_of(call)
                    entry["graph_ms"] = timer(g.replay).ms
                    if clean is not None:
                        entry["graph_clean_ms"] = clean(g.replay).ms
                except Exception as exc:  # noqa: BLE001
                    entry["graph_error"] = _first_line(exc)
        except Exception as exc:  # noqa: BLE001
            entry["how"] += f"; failed: {_first_line(exc)}"
        results[name.lower()] = entry
        del ke, ve, call
        torch.cuda.empty_cache()
    return results


def decode_rows(batches, dtype, timer, copy_gbps: float, with_sdpa: bool = True) -> list[dict]:
    import time

    import torch
    from fa2dispatch.backends.triton_fa2.decode_launch import plan

    import fa2dispatch.kvcache as kvc
    from fa2dispatch.autotune.timer import CudaTimer
    from fa2dispatch.hardware import device_info

    clean = CudaTimer(timer.runs, clean_l2=True)
    rows = []
    for B in batches:
        q, kc, vc, seqlens = make_decode(B, dtype)
        cache_bytes = 2 * kc.numel() * kc.element_size()  # K and V, every position valid
        call = bind(kvc.attention_with_kvcache, q, kc, vc, cache_seqlens=seqlens)
        kvc.CHECK_VALUES = False
        decision = kvc.explain_kvcache(q, kc, vc, cache_seqlens=seqlens)
        eager = timer(call)
        g = graph_of(call)
        graph = timer(g.replay)
        graph_clean = clean(g.replay)
        call()
        torch.cuda.synchronize()
        n = 200
        start = time.perf_counter()
        for _ in range(n):
            call()
        host_us = (time.perf_counter() - start) * 1e6 / n  # enqueue rate: the host's cost per call
        torch.cuda.synchronize()
        kvc.CHECK_VALUES = True
        checked = timer(call)
        kvc.CHECK_VALUES = False
        problem, kv = kvc.prepare(q, kc, vc, None, None, seqlens, None, False, None, (-1, -1), 0.0, None, 0, False)
        p = plan(problem, kv, decision.config, device_info(q.device)) if decision.backend.name == "triton" else None
        row = {"B": B, "context": CONTEXT, "H": H, "Hkv": HKV, "D": D, "dtype": str(dtype).removeprefix("torch."),
               "backend": decision.backend.name, "plan": None if p is None else p.__dict__,
               "ours_ms": eager.ms, "ours_spread_ms": eager.spread, "ours_graph_ms": graph.ms,
               "ours_graph_clean_ms": graph_clean.ms,
               "ours_checked_ms": checked.ms, "host_us_per_call": host_us, "cache_GB": cache_bytes / 1e9,
               "ours_GBps": cache_bytes / (eager.ms * 1e-3) / 1e9,
               "ours_graph_GBps": cache_bytes / (graph.ms * 1e-3) / 1e9}
        row["frac_copy"] = row["ours_GBps"] / copy_gbps
        row["graph_frac_copy"] = row["ours_graph_GBps"] / copy_gbps
        row["graph_clean_frac_copy"] = cache_bytes / (graph_clean.ms * 1e-3) / 1e9 / copy_gbps
        # the same cache as 256-row pages in shuffled order (vLLM's layout), CUDA graph
        page = 256
        n_pages = kc.shape[0] * kc.shape[1] // page
        table = torch.randperm(n_pages, device="cuda").to(torch.int32).reshape(B, -1)
        kp, vp = (t.view(n_pages, page, HKV, D) for t in (kc, vc))
        paged = timer(graph_of(bind(kvc.attention_with_kvcache, q, kp, vp, cache_seqlens=seqlens,
                                    block_table=table)).replay)
        row["paged256_graph_ms"] = paged.ms
        row["paged256_graph_frac_copy"] = cache_bytes / (paged.ms * 1e-3) / 1e9 / copy_gbps
        if with_sdpa:
            sd = sdpa_times(q, kc, vc, timer, clean)
            for mode, key in (("", "ms"), ("graph_", "graph_ms"), ("graph_clean_", "graph_clean_ms")):
                ok = {k: v[key] for k, v in sd.items() if v.get(key) is not None}
                best = min(ok, key=ok.get) if ok else None
                ours = row[{"": "ours_ms", "graph_": "ours_graph_ms", "graph_clean_": "ours_graph_clean_ms"}[mode]]
                row.update({f"sdpa_{mode}best": best, f"sdpa_{mode}best_ms": ok.get(best),
                            f"{mode}speedup_vs_sdpa": (ok[best] / ours) if best else None})
            row["sdpa"] = sd
        rows.append(row)
        del q, kc, vc, call
        torch.cuda.empty_cache()
        print(_fmt_row(row), flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    def sd(mode):
        best = r.get(f"sdpa_{mode}best")
        if not best:
            return f"{'-':>9} {'-':>8} {'-':>7}"
        return f"{best.removesuffix('_attention'):>9} {r[f'sdpa_{mode}best_ms'] * 1e3:8.1f} " \
               f"{r[f'{mode}speedup_vs_sdpa']:6.2f}x"

    splits = r["plan"]["num_splits"] if r.get("plan") else "-"
    return (f"{r['B']:>3} {splits:>6} {r['host_us_per_call']:7.1f} | {r['ours_ms'] * 1e3:8.1f} "
            f"{r['ours_checked_ms'] * 1e3:8.1f} {r['ours_GBps']:6.0f} {r['frac_copy'] * 100:5.1f}% {sd('')} | "
            f"{r['ours_graph_ms'] * 1e3:8.1f} {r['ours_graph_GBps']:6.0f} {r['graph_frac_copy'] * 100:5.1f}% "
            f"{sd('graph_')} | {r['paged256_graph_ms'] * 1e3:8.1f} {r['paged256_graph_frac_copy'] * 100:5.1f}% | "
            f"{r['ours_graph_clean_ms'] * 1e3:8.1f} {r['graph_clean_frac_copy'] * 100:5.1f}% {sd('graph_clean_')}")


HEADER = (f"{'B':>3} {'splits':>6} {'host us':>7} | {'eager us':>8} {'chk us':>8} {'GB/s':>6} {'%copy':>6} "
          f"{'sdpa':>9} {'sdpa us':>8} {'speedup':>7} | {'graph us':>8} {'GB/s':>6} {'%copy':>6} "
          f"{'sdpa':>9} {'sdpa us':>8} {'speedup':>7} | {'paged us':>8} {'%copy':>6} | "
          f"{'clean us':>8} {'%copy':>6} {'sdpa':>9} {'sdpa us':>8} {'speedup':>7}")


def sweep_split_counts(B: int, auto: int, sms: int, key_blocks: int) -> list[int]:
    """Split counts tried at batch B: the plan's, 1 where the plan splits little, and the counts
    that make B * Hkv * splits programs close to 1, 2, 3, 4 programs per SM (wave quantization)."""
    base = B * HKV
    opts = {auto, max(1, auto // 2), min(128, auto * 2)}
    if auto <= 2:
        opts.add(1)
    for per_sm in (1, 2, 3, 4):
        s = round(per_sm * sms / base)
        if s >= 1:
            opts.update({s, max(1, s - 1)})
    return sorted(s for s in opts if 1 <= s <= min(128, key_blocks))


def _time_combine(B: int, splits: int, dtype, timer) -> float:
    """GPU time (ms, CUDA graph) of decode_combine alone at this batch and split count."""
    import torch
    import triton
    from fa2dispatch.backends.triton_fa2 import decode

    rows = B * H
    part = torch.randn(rows * splits * D, dtype=torch.float32, device="cuda")
    lse_part = torch.randn(rows * splits, dtype=torch.float32, device="cuda")
    out = torch.empty(B, 1, H, D, dtype=dtype, device="cuda")
    lse = torch.empty(B, H, 1, dtype=torch.float32, device="cuda")

    def call():
        decode.decode_combine[(rows,)](part, lse_part, out, lse, *out.stride(), H, 1, splits,
                                       BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=D, BLOCK_D=D, num_warps=4)

    return timer(graph_of(call).replay).ms


def sweep(batches, dtype, timer, copy_gbps: float, configs=None) -> list[dict]:
    """Time decode configs through the launcher directly (the public call's plan overridden),
    each captured in a CUDA graph: the GPU time of the config, without the host's cost. Every
    config is timed with the usual write flush (``ms``) and with a clean L2 (``clean_ms``,
    ``CudaTimer(clean_l2=True)``); the best per batch (by clean_ms) is printed with its %copy."""
    import torch
    from fa2dispatch.backends.triton_fa2.config import TritonConfig
    from fa2dispatch.backends.triton_fa2.decode_launch import forward_kvcache, plan

    from fa2dispatch.autotune.timer import CudaTimer
    from fa2dispatch.hardware import device_info
    from fa2dispatch.kvcache import prepare

    clean = CudaTimer(timer.runs, clean_l2=True)
    rows = []
    for B in batches:
        q, kc, vc, seqlens = make_decode(B, dtype)
        problem, kv = prepare(q, kc, vc, None, None, seqlens, None, False, None, (-1, -1), 0.0, None, 0, False)
        dev = device_info(q.device)
        cache_bytes = 2 * kc.numel() * kc.element_size()
        default = plan(problem, kv, None, dev)
        for block_n, stages, warps in configs or SWEEP_CONFIGS:
            key_blocks = CONTEXT // block_n
            for splits in sweep_split_counts(B, default.num_splits, dev.multiprocessors or 132, key_blocks):
                cfg = TritonConfig(decode_block_n=block_n, decode_num_stages=stages, decode_num_warps=warps,
                                   num_splits=splits)
                row = {"B": B, "block_n": block_n, "stages": stages, "warps": warps, "splits": splits}
                try:
                    g = graph_of(bind(forward_kvcache, problem, q, kc, vc, kv, cfg, dev))
                    t, tc = timer(g.replay), clean(g.replay)
                except Exception as exc:  # noqa: BLE001 - out of resources etc. is data
                    rows.append(dict(row, error=_first_line(exc)))
                    torch.cuda.synchronize()
                    continue
                p = plan(problem, kv, cfg, dev)
                active = -(-(CONTEXT // block_n) // -(-(CONTEXT // block_n) // p.num_splits))  # non-empty splits
                rows.append(dict(row, splits_used=p.num_splits, active_splits=active, ms=t.ms, clean_ms=tc.ms,
                                 frac_copy=cache_bytes / (t.ms * 1e-3) / 1e9 / copy_gbps,
                                 clean_frac_copy=cache_bytes / (tc.ms * 1e-3) / 1e9 / copy_gbps))
        mine = [r for r in rows if r["B"] == B and "ms" in r]
        dflt = [r for r in mine if (r["block_n"], r["stages"], r["warps"], r["splits"]) ==
                (default.block_n, default.num_stages, default.num_warps, default.num_splits)]
        for key in ("clean_ms", "ms"):
            best = min(mine, key=lambda r: r[key])
            print(f"sweep B={B} best by {key}: ({best['block_n']}, {best['stages']}, {best['warps']}) "
                  f"splits {best['splits']}: {best['ms'] * 1e3:.1f} us ({best['frac_copy'] * 100:.1f}%), clean "
                  f"{best['clean_ms'] * 1e3:.1f} us ({best['clean_frac_copy'] * 100:.1f}%)", flush=True)
        if dflt:
            d = dflt[0]
            print(f"sweep B={B} default ({d['block_n']}, {d['stages']}, {d['warps']}) splits {d['splits']}: "
                  f"{d['ms'] * 1e3:.1f} us ({d['frac_copy'] * 100:.1f}%), clean {d['clean_ms'] * 1e3:.1f} us "
                  f"({d['clean_frac_copy'] * 100:.1f}%)", flush=True)
        top = sorted(mine, key=lambda r: r["clean_ms"])[:8]
        for r in top:
            print(f"   ({r['block_n']:>3}, {r['stages']}, {r['warps']}) splits {r['splits']:>3} "
                  f"(active {r['active_splits']:>3}): {r['ms'] * 1e3:7.1f} us, clean {r['clean_ms'] * 1e3:7.1f} us",
                  flush=True)
        best = min(mine, key=lambda r: r["clean_ms"])
        try:
            for s in sorted({best["splits"], default.num_splits}):
                cm = _time_combine(B, s, dtype, clean)
                rows.append({"B": B, "combine_splits": s, "combine_clean_ms": cm})
                print(f"   decode_combine alone, {s} splits: {cm * 1e3:.1f} us (clean L2, graph)", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"   decode_combine timing failed: {_first_line(exc)}", flush=True)
        # programmatic dependent launch of the combine (decode_launch.USE_PDL), default plan
        from fa2dispatch.backends.triton_fa2 import decode_launch

        pdl, before = {}, decode_launch.USE_PDL
        for on in (False, True):
            decode_launch.USE_PDL = on
            g = graph_of(bind(forward_kvcache, problem, q, kc, vc, kv, None, dev))
            pdl[on] = (timer(g.replay).ms, clean(g.replay).ms)
        decode_launch.USE_PDL = before
        rows.append({"B": B, "pdl_off_ms": pdl[False][0], "pdl_off_clean_ms": pdl[False][1],
                     "pdl_on_ms": pdl[True][0], "pdl_on_clean_ms": pdl[True][1]})
        print(f"   default plan, combine without / with PDL: {pdl[False][0] * 1e3:.1f} / {pdl[True][0] * 1e3:.1f} us, "
              f"clean {pdl[False][1] * 1e3:.1f} / {pdl[True][1] * 1e3:.1f} us", flush=True)
        del q, kc, vc
        torch.cuda.empty_cache()
    return rows


def host_overhead_cpu(n: int = 2000, B: int = 1, context: int = 4096) -> dict:
    """The Python side of one decode call, on the CPU (no GPU needed): the kernels are replaced
    by no-op launches, so what is timed is validation (memoized), dispatch, planning, argument
    assembly and output allocation; per call, mean over n calls. Triton's own launcher and the
    device sync of the value checks are not in it (they need a GPU: the decode table's
    ``host us`` and ``chk us`` columns)."""
    import time

    import torch
    from fa2dispatch.backends.triton_fa2 import decode, decode_launch

    import fa2dispatch.kvcache as kvc
    from fa2dispatch import dispatch
    from fa2dispatch.hardware import device_info

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = {name: getattr(decode, name) for name in ("decode_fwd", "decode_combine", "kv_append", "kv_check")}
    for name in saved:
        setattr(decode, name, NoLaunch())
    try:
        q = torch.randn(B, 1, H, D, dtype=torch.float16)
        kc = torch.zeros(B, context, HKV, D, dtype=torch.float16)
        vc = torch.zeros_like(kc)
        seqlens = torch.full((B,), context - 1, dtype=torch.int32)
        k_new = torch.randn(B, 1, HKV, D, dtype=torch.float16)
        table = torch.arange(B * context // 256, dtype=torch.int32).reshape(B, -1)
        kp, vp = kc.view(-1, 256, HKV, D), vc.view(-1, 256, HKV, D)
        dev = device_info(q.device)

        def per_call(fn) -> float:
            for _ in range(20):
                fn()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - start) * 1e6 / n

        args = (q, kc, vc, None, None, seqlens, None, False, None, (-1, -1), 0.0, None, 0, False)
        problem, kv = kvc.prepare(*args)
        decision = dispatch.decide(problem, "triton")
        out = {}
        with dispatch.use_backend("triton"):
            out["prepare (memo hit + CPU value check)"] = per_call(lambda: kvc.prepare(*args))
            out["dispatch.decide (memo)"] = per_call(lambda: dispatch.decide(problem, "triton"))
            out["decode_launch.forward_kvcache (launches mocked)"] = per_call(
                lambda: decode_launch.forward_kvcache(problem, q, kc, vc, kv, decision.config, dev))
            out["_check_values, torch ops (CPU)"] = per_call(
                lambda: kvc._check_values(seqlens, None, 0, context, B, seqlens))
            out["_check_values, torch ops, paged (CPU)"] = per_call(
                lambda: kvc._check_values(seqlens, table, 0, context, kp.shape[0], seqlens))
            out["attention_with_kvcache, contiguous"] = per_call(
                lambda: kvc.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens))
            out["attention_with_kvcache, paged 256 + append"] = per_call(
                lambda: kvc.attention_with_kvcache(q, kp, vp, k=k_new, v=k_new, cache_seqlens=seqlens,
                                                   block_table=table))
    finally:
        for name, fn in saved.items():
            setattr(decode, name, fn)
    for k, v in out.items():
        print(f"host (CPU, launches mocked) {k}: {v:.1f} us/call", flush=True)
    return out


def varlen_rows(timer, dtype) -> list[dict]:
    """attention_varlen (equal lengths packed) against dense attention at the same total tokens."""
    import torch

    import fa2dispatch

    if not hasattr(fa2dispatch, "attention_varlen"):
        print("varlen: fa2dispatch.attention_varlen does not exist yet; skipped", flush=True)
        return []
    rows = []
    total = 16384
    for seqlen in (512, 2048, 8192):
        for causal in (False, True):
            B = total // seqlen
            q = torch.randn(B, seqlen, 16, 128, device="cuda", dtype=dtype)
            k, v = torch.randn_like(q), torch.randn_like(q)
            cu = torch.arange(0, total + 1, seqlen, dtype=torch.int32, device="cuda")
            qp, kp, vp = (t.reshape(total, 16, 128) for t in (q, k, v))
            dense = timer(bind(fa2dispatch.attention, q, k, v, causal=causal))
            packed = timer(bind(fa2dispatch.attention_varlen, qp, kp, vp, cu, cu, seqlen, seqlen, causal=causal))
            rows.append({"total_tokens": total, "seqlen": seqlen, "B": B, "causal": causal, "dense_ms": dense.ms,
                         "varlen_ms": packed.ms, "varlen_over_dense": packed.ms / dense.ms})
            print(f"varlen S={seqlen:>5} causal={causal!s:>5}: dense {dense.ms * 1e3:8.1f} us, "
                  f"varlen {packed.ms * 1e3:8.1f} us, ratio {packed.ms / dense.ms:.3f}", flush=True)
    return rows


def _read_kernel():
    """A Triton kernel that reads a buffer once (each program a contiguous part) and writes one
    float per program: the plain streaming read that decode at B=1 is measured against."""
    import triton
    import triton.language as tl

    @triton.jit
    def stream_read(X, Out, n_per_prog, BLOCK: tl.constexpr):
        base = X + tl.program_id(0).to(tl.int64) * n_per_prog
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.range(0, n_per_prog, BLOCK, num_stages=3):
            acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(Out + tl.program_id(0), tl.sum(acc))

    return stream_read


def floor_rows(timer, copy_gbps: float, nbytes: int = 64 << 20) -> list[dict]:
    """What a CUDA graph replay of B=1's size can reach on this timer (clean L2, as the decode
    table's "clean" column): an empty graph (one tiny kernel: the timer's own floor), then
    reads of ``nbytes`` (B=1's K and V) by torch's sum and by a streaming Triton kernel at a
    few grid sizes (128 programs is decode's grid at B=1); then, per call, STEPS_PER_GRAPH calls
    over as many distinct 64 MiB buffers / caches in one graph (the read, our decode, SDPA's cuDNN):
    what a call costs inside a model step's graph, where the timer's floor is paid once. Time
    and %copy per row."""
    import torch

    from fa2dispatch.autotune.timer import CudaTimer

    clean = CudaTimer(timer.runs, clean_l2=True)
    x = torch.ones(nbytes // 2, dtype=torch.float16, device="cuda")
    tiny = torch.zeros(1, device="cuda")
    kernel = _read_kernel()
    cases = [("empty graph (tiny kernel)", 0, bind(tiny.add_, 1)), ("torch sum", nbytes, bind(x.sum))]
    for programs, block, warps in ((128, 8192, 8), (128, 16384, 8), (256, 8192, 8), (512, 4096, 4),
                                   (1024, 4096, 4), (4096, 4096, 4)):  # each divides the buffer evenly
        out = torch.empty(programs, device="cuda")
        cases.append((f"triton read: {programs} programs x {block} x {warps} warps", nbytes,
                      bind(kernel[(programs,)], x, out, x.numel() // programs, BLOCK=block, num_warps=warps)))
    # The same work as steps of one graph, the way a model's decode step runs its layers: N
    # calls over N distinct caches (no L2 reuse between them), timed once per replay; per call =
    # time / N, so the timer's own floor (the first row) is paid once per N calls.
    n = STEPS_PER_GRAPH
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fa2dispatch.kvcache as kvc

    kvc.CHECK_VALUES = False
    sets = [make_decode(1, torch.float16, seed=i) for i in range(n)]
    xs = [torch.ones(nbytes // 2, dtype=torch.float16, device="cuda") for _ in range(n)]
    outs = [torch.empty(256, device="cuda") for _ in range(n)]

    def steps(one):
        return lambda: [one(i) for i in range(n)]

    def sdpa_cudnn(i):
        q, kc, vc, _ = sets[i]
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                                  enable_gqa=True)

    from fa2dispatch.backends.triton_fa2 import decode_launch

    def ours(i):
        return kvc.attention_with_kvcache(sets[i][0], sets[i][1], sets[i][2], cache_seqlens=sets[i][3])

    def with_flags(i, fused: bool, counters=None):
        """ours(i) captured with the combine folded in or not; counters: the fused kernel's
        arrival counters preallocated outside the capture (no memset node per call)."""
        saved = decode_launch.USE_FUSED, decode_launch._arrival_counters
        decode_launch.USE_FUSED = fused
        if counters is not None:
            decode_launch._arrival_counters = lambda device, m: counters[i][:m]
        try:
            return ours(i)
        finally:
            decode_launch.USE_FUSED, decode_launch._arrival_counters = saved

    counters = [torch.zeros(1024, dtype=torch.int32, device="cuda") for _ in range(n)]
    multi = [(f"triton read 256 x 8192 x 8, {n} per graph", nbytes,
              steps(lambda i: kernel[(256,)](xs[i], outs[i], xs[i].numel() // 256, BLOCK=8192, num_warps=8))),
             (f"decode B=1 (ours, default), {n} per graph", nbytes, steps(ours)),
             (f"decode B=1 (ours, combine kernel), {n} per graph", nbytes, steps(lambda i: with_flags(i, False))),
             (f"decode B=1 (ours, fused combine), {n} per graph", nbytes, steps(lambda i: with_flags(i, True))),
             (f"decode B=1 (ours, fused, counters kept), {n} per graph", nbytes,
              steps(lambda i: with_flags(i, True, counters))),
             (f"decode B=1 (SDPA cuDNN), {n} per graph", nbytes, steps(sdpa_cudnn))]
    rows = []
    for name, size, fn, per in [(*c, 1) for c in cases] + [(*m, n) for m in multi]:
        try:
            t = clean(graph_of(fn).replay)
        except Exception as exc:  # noqa: BLE001 - a case that cannot run is a row with its reason
            rows.append({"case": name, "error": _first_line(exc)})
            print(f"floor  {name:<44} failed: {_first_line(exc)}", flush=True)
            continue
        t = dataclasses.replace(t, ms=t.ms / per, spread=t.spread / per)
        row = {"case": name, "bytes": size, "calls_per_graph": per, "graph_clean_ms": t.ms,
               "frac_copy": (size / (t.ms * 1e-3) / 1e9 / copy_gbps) if size else None}
        rows.append(row)
        frac = f"{100 * row['frac_copy']:5.1f}%" if size else "     -"
        print(f"floor  {name:<48} {t.ms * 1e3:8.2f} us  {frac}", flush=True)
    return rows


def environment() -> dict:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "sm_count": props.multi_processor_count,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-decode", action="store_true", help="skip the decode table")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time decode configs")
    ap.add_argument("--sweep-batches", default="1,2,4,8")
    ap.add_argument("--sweep-configs", default=None,
                    help="block_n:stages:warps,... instead of SWEEP_CONFIGS (e.g. 64:3:4,64:2:4)")
    ap.add_argument("--varlen", action="store_true", help="also time attention_varlen against dense attention")
    ap.add_argument("--floor", action="store_true",
                    help="also time an empty graph and plain 64 MiB reads (what B=1 can reach on this timer)")
    ap.add_argument("--host-cpu", action="store_true",
                    help="only the Python side of a decode call on the CPU, kernels mocked (no GPU needed)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.host_cpu:
        result = {"host_cpu": host_overhead_cpu()}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    timer = _timer(args.runs)
    result = {"env": environment()}
    result["copy"] = copy_bandwidth(timer)
    print(f"{result['env']}\ncopy bandwidth: {result['copy']['GBps']:.0f} GB/s (2 GiB dst.copy_(src), read + write)",
          flush=True)
    if args.floor:
        result["floor"] = floor_rows(timer, result["copy"]["GBps"])
    if not args.no_decode:
        print(f"decode: H={H} Hkv={HKV} D={D} {args.dtype} context {CONTEXT}, Mq=1\n{HEADER}", flush=True)
        result["decode"] = decode_rows([int(b) for b in args.batches.split(",")], dtype, timer,
                                       result["copy"]["GBps"], not args.no_sdpa)
    if args.sweep:
        configs = None if not args.sweep_configs else \
            [tuple(int(x) for x in c.split(":")) for c in args.sweep_configs.split(",")]
        result["sweep"] = sweep([int(b) for b in args.sweep_batches.split(",")], dtype, timer, result["copy"]["GBps"],
                                configs)
    if args.varlen:
        result["varlen"] = varlen_rows(timer, dtype)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
