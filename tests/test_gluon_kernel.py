"""The Gluon forward (backends/triton_fa2/kernels_gluon.py): offline sm_90 compiles of the
configs the fp8 backend may run and the 16-bit ones tools/sweep_gluon.py times (no GPU needed:
Gluon kernels do not run under the interpreter, so this is what CI can check), and the fp8
backend's routing rules. The kernel's values are checked on the H100 in tests/test_fp8_gpu.py
(the fp8 backend's default on sm_90 at D=128) and by tools/sweep_gluon.py (16-bit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from fa2dispatch.hardware import simulated_device
from fa2dispatch.problem import AttentionProblem

_COMPILE = r"""
import json, sys, torch
from fa2dispatch.backends.triton_fa2.launch_gluon import compile_sm90
rows = []
for dtype, d, causal, bm, bn, ks, vs, *varlen in json.loads(sys.argv[1]):
    r = compile_sm90(getattr(torch, dtype), d, causal, bm, bn, ks, vs, varlen=bool(varlen and varlen[0]))
    rows.append(dict(r, dtype=dtype, d=d, causal=causal, bm=bm, bn=bn, ks=ks, vs=vs, varlen=bool(varlen and varlen[0])))
print(json.dumps(rows))
"""


@pytest.mark.compile
def test_compiles_for_sm90_with_wgmma_and_no_local_memory():
    """fp8 tuner configs (the default 64 x 128 with one V buffer: under 75 KB of shared memory
    and 170 registers, three programs per SM) and the 16-bit configs of the session-8 sweep."""
    jobs = [("float8_e4m3fn", 128, False, 64, 128, 2, 1), ("float8_e4m3fn", 128, True, 64, 128, 2, 2),
            ("float8_e4m3fn", 64, True, 64, 64, 2, 1), ("float8_e4m3fn", 64, False, 64, 128, 2, 2),
            ("float16", 128, True, 64, 64, 2, 2), ("bfloat16", 64, False, 64, 128, 2, 2),
            ("float16", 128, False, 128, 128, 2, 2),
            # varlen (packed sequences, masked pointer stores of O): the 16-bit defaults' tiles
            ("float16", 128, True, 64, 64, 2, 1, True), ("bfloat16", 64, False, 64, 128, 2, 2, True)]
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == len(jobs)
    for r in rows:
        print(r)
        where = (f"{r['dtype']} D={r['d']} causal={r['causal']} {r['bm']}x{r['bn']} k{r['ks']} v{r['vs']}"
                 f"{' varlen' if r['varlen'] else ''}")
        assert r["wgmma"] >= 2, f"{where}: no wgmma"
        if r["dtype"] != "float8_e4m3fn":
            assert r["hgmma"] > 0, f"{where}: no HGMMA in the SASS"
        assert r["stack"] == 0 and r["ldl_stl"] == 0, f"{where}: local memory ({r['stack']} B stack)"
        assert r["smem"] <= 227 * 1024, f"{where}: {r['smem']} B of shared memory"
    default = rows[0]
    assert default["smem"] <= 75 * 1024 and default["registers"] <= 170, f"fp8 default: not 3 per SM: {default}"


def test_fp8_default_on_the_h100_is_the_gluon_kernel_at_d128_only():
    from fa2dispatch.backends.triton_fp8.config import config_space, default_config

    from fa2dispatch.problem import AttentionProblem

    h100, a100 = simulated_device("h100"), simulated_device("a100")

    def problem(D):
        return AttentionProblem(B=4, H=8, Hkv=8, Mq=4096, Mkv=4096, D=D, dtype=torch.float8_e4m3fn,
                                device=torch.device("cpu"), layout="bhsd", causal=False, softmax_scale=D**-0.5)

    assert default_config(problem(128), h100).kernel == "gluon"  # 4 x 8 x 4096^2 x 128 = 69 GFLOP
    small = AttentionProblem(B=1, H=8, Hkv=8, Mq=1024, Mkv=1024, D=128, dtype=torch.float8_e4m3fn,
                             device=torch.device("cpu"), layout="bhsd", causal=False, softmax_scale=0.1)
    assert default_config(small, h100).kernel == "triton"  # 4 GFLOP: host-bound, the Triton kernel
    assert default_config(problem(64), h100).kernel == "triton"  # not measured at D=64 as the default
    assert default_config(problem(256), h100).kernel == "triton"
    assert any(c.kernel == "gluon" for c in config_space(problem(64), h100))
    assert all(c.kernel == "triton" for c in config_space(problem(128), a100))


def test_gluon_reasons_name_what_the_kernel_cannot_take():
    from fa2dispatch.backends.triton_fp8.config import FP8Config
    from fa2dispatch.backends.triton_fp8.launch import gluon_reasons

    from fa2dispatch.problem import AttentionProblem

    cfg = FP8Config(block_m=64, block_n=128, num_warps=4, num_stages=2, kernel="gluon", v_stages=1)
    p = AttentionProblem(B=1, H=2, Hkv=2, Mq=1000, Mkv=512, D=96, dtype=torch.float8_e4m3fn,
                         device=torch.device("cpu"), layout="bhsd", causal=False, softmax_scale=-0.1)
    q = torch.empty(1, 2, 1000, 96, dtype=torch.float8_e4m3fn)
    vt = torch.empty(1, 2, 96, 512, dtype=torch.float8_e4m3fn)
    why = " | ".join(gluon_reasons(p, q, q, vt, cfg, simulated_device("h100")))
    for part in ("head dim 96", "softmax_scale=-0.1", "Mq=1000"):
        assert part in why, why
    assert "needs sm_90" in " | ".join(gluon_reasons(p, q, q, vt, cfg, simulated_device("a100")))


def test_16bit_default_on_the_h100_is_a_gluon_kernel_for_plain_calls_at_d64_and_d128():
    """D=128 with Mq a multiple of 128: the ping-pong kernel; D=64, or Mq a multiple of 64 only:
    the one-warpgroup kernel; D=96: the Hopper kernel; other parts and feature calls: plain."""
    from dataclasses import replace

    from fa2dispatch.backends.triton_fa2 import launch_gluon
    from fa2dispatch.backends.triton_fa2.config import default_config

    from fa2dispatch.problem import AttentionProblem

    h100 = simulated_device("h100")

    def problem(D, **kw):
        return AttentionProblem(B=2, H=8, Hkv=8, Mq=2048, Mkv=2048, D=D, dtype=torch.float16, device=torch.device("cpu"),
                                layout="bshd", causal=True, softmax_scale=D**-0.5, **kw)

    cfg = default_config(problem(64), h100)
    assert cfg.fwd_kernel == "gluon" and cfg.num_warps == cfg.block_m // 16, cfg
    cfg = default_config(problem(128), h100)
    assert (cfg.fwd_kernel, cfg.block_m, cfg.num_warps, cfg.fwd_maxnreg) == ("gluon-pp", 128, 12, 240), cfg
    assert launch_gluon.pp_problem_reasons(problem(128), cfg, h100) == []
    assert default_config(replace(problem(128), Mq=2112), h100).fwd_kernel == "gluon"  # 33 x 64 rows
    assert default_config(problem(96), h100).fwd_kernel == "hopper"
    assert default_config(problem(128), simulated_device("a100")).fwd_kernel == ""
    assert default_config(problem(128, softcap=30.0), h100).fwd_kernel == ""  # features: the plain kernel


def test_gluon_problem_reasons_and_the_fallbacks():
    """A gluon-pp config on a call the ping-pong kernel cannot take becomes the one-warpgroup
    kernel's default (``_gluon_default``); a gluon config on a call that kernel cannot take, the
    Hopper kernel's measured choice (``_hopper_fallback``)."""
    from dataclasses import replace

    from fa2dispatch.backends.triton_fa2 import _gluon_default, _hopper_fallback, launch_gluon
    from fa2dispatch.backends.triton_fa2.config import GLUON_DEFAULTS, TritonConfig, default_config

    from fa2dispatch.problem import AttentionProblem

    h100 = simulated_device("h100")
    p = AttentionProblem(B=1, H=4, Hkv=4, Mq=1000, Mkv=1000, D=128, dtype=torch.bfloat16, device=torch.device("cpu"),
                         layout="bshd", causal=False, softmax_scale=0.1)
    pp = default_config(replace(p, Mq=1024, Mkv=1024), h100)
    assert pp.fwd_kernel == "gluon-pp" and launch_gluon.pp_problem_reasons(replace(p, Mq=1024, Mkv=1024), pp, h100) == []
    assert any("Mq=960" in r for r in launch_gluon.pp_problem_reasons(replace(p, Mq=960), pp, h100))
    assert any("device sm_80" in r for r in launch_gluon.pp_problem_reasons(p, pp, simulated_device("a100")))
    assert any("fwd_maxnreg=200" in r for r in launch_gluon.pp_problem_reasons(replace(p, Mq=1024), replace(pp, fwd_maxnreg=200), h100))
    one_wg = _gluon_default(replace(p, Mq=960), pp)
    m, n, ks, vs = GLUON_DEFAULTS[128]
    assert (one_wg.fwd_kernel, one_wg.block_m, one_wg.block_n, one_wg.num_warps, one_wg.fwd_maxnreg) == ("gluon", m, n, 4, 0)
    assert launch_gluon.problem_reasons(replace(p, Mq=960), one_wg, h100) == []
    cfg = TritonConfig(block_m=m, block_n=n, num_warps=m // 16, num_stages=ks, fwd_v_stages=vs, fwd_kernel="gluon")
    assert any("Mq=1000" in r for r in launch_gluon.problem_reasons(p, cfg, h100))
    assert any("device sm_80" in r for r in launch_gluon.problem_reasons(p, cfg, simulated_device("a100")))
    fallback = _hopper_fallback(p, cfg)
    assert fallback.fwd_kernel == "hopper" and fallback.fwd_v_stages == 0
    q = torch.empty(1, 1000, 4, 128, dtype=torch.bfloat16)
    assert launch_gluon.tensor_reasons(q, q, q, "bshd") == []
    assert launch_gluon.tensor_reasons(q[:, :, :, ::2], q, q, "bshd") != []


def test_gluon_takes_plain_varlen_calls_and_refuses_varlen_with_features():
    """Packed sequences with no other feature go to the Gluon varlen forward on sm_90 (any
    max_seqlen_q: O is stored through masked pointers); with a window, ALiBi, softcap, dropout
    or top-left causal they keep the plain varlen kernel; the packed tensors must have heads and
    D contiguous for a (total, heads x D) descriptor."""
    from dataclasses import replace

    from fa2dispatch.backends.triton_fa2 import launch_gluon
    from fa2dispatch.backends.triton_fa2.config import default_config

    from fa2dispatch.problem import AttentionProblem

    h100 = simulated_device("h100")
    p = AttentionProblem(B=3, H=8, Hkv=2, Mq=1000, Mkv=1500, D=128, dtype=torch.float16, device=torch.device("cpu"),
                         layout="thd", causal=True, softmax_scale=0.1, varlen=True)
    cfg = default_config(p, h100)
    assert cfg.fwd_kernel == "gluon"  # the ping-pong kernel has no varlen
    assert launch_gluon.problem_reasons(p, cfg, h100) == []
    pp = default_config(replace(p, varlen=False, layout="bshd", Mq=1024, Mkv=1024), h100)
    assert any("varlen" in r for r in launch_gluon.pp_problem_reasons(replace(p, Mq=1024), pp, h100))
    assert launch_gluon.problem_reasons(replace(p, softcap=5.0), cfg, h100) != []
    assert launch_gluon.problem_reasons(replace(p, window=(16, 0)), cfg, h100) != []
    assert launch_gluon.problem_reasons(replace(p, causal_alignment="top_left"), cfg, h100) != []
    q = torch.empty(100, 8, 128, dtype=torch.float16)
    k = torch.empty(150, 2, 128, dtype=torch.float16)
    assert launch_gluon.varlen_tensor_reasons(q, k, k) == []
    wide = torch.empty(100, 8, 256, dtype=torch.float16)[:, :, :128]  # heads not packed
    assert any(r.startswith("q: ") for r in launch_gluon.varlen_tensor_reasons(wide, k, k))


_COMPILE_WS = r"""
import json, sys, torch
from fa2dispatch.backends.triton_fa2.launch_gluon import compile_ws_sm90
print(json.dumps([dict(compile_ws_sm90(getattr(torch, dt), d, c, bm, bn, pingpong=pp, fp8=f8), dtype=dt, d=d,
                       causal=c, bm=bm, bn=bn, pp=pp, fp8=f8)
                  for dt, d, c, bm, bn, pp, f8 in json.loads(sys.argv[1])]))
"""


@pytest.mark.compile
def test_warp_specialized_kernel_compiles_for_sm90():
    """kernels_gluon_ws.py: the warp-specialized kernel (the consumers' warps plus a producer
    warpgroup) and the ping-pong kernel (two consumer warpgroups of 64 rows plus the producer:
    12 warps at 128 rows; 16-bit and fp8 with a bf16 output), register reallocation, wgmma, no
    local memory, 1 CTA per SM at most."""
    jobs = [("float16", 128, False, 128, 128, False, False), ("bfloat16", 128, True, 128, 128, False, False),
            ("float16", 64, True, 128, 128, False, False), ("bfloat16", 128, False, 64, 64, False, False),
            ("float16", 128, False, 128, 128, True, False), ("bfloat16", 128, True, 128, 128, True, False),
            ("float16", 64, True, 128, 128, True, False),
            ("bfloat16", 128, True, 128, 128, True, True), ("bfloat16", 64, False, 128, 128, True, True)]
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_WS, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        print(r)
        assert r["num_warps"] == (12 if r["pp"] else r["bm"] // 16 + 4), r
        assert r["wgmma"] >= 2 and r["setmaxnreg"] > 0, r
        assert r["stack"] == 0 and r["ldl_stl"] == 0, r
        assert r["smem"] <= 227 * 1024, r


def test_tuner_candidates_hold_the_pingpong_configs_where_mq_allows():
    """sm_90, D 64 or 128: the ping-pong configs (12 warps: 8 consumers and a producer
    warpgroup, not pruned as too many warps for 128 rows) where Mq is a multiple of 128; causal
    calls hold each twice, persistent (fwd_tile_grid 2) and one CTA per tile (1), and the
    dispatcher's default (the launcher's choice, 0) where that is the ping-pong kernel (D=128)."""
    from fa2dispatch.autotune import space
    from fa2dispatch.problem import AttentionProblem

    h100 = simulated_device("h100")
    for Mq, D, level, expected in ((1024, 128, "full", 16), (512, 64, "full", 16), (1024, 128, "quick", 1),
                                   (320, 64, "full", 0), (1024, 128, "default", 2)):
        for causal in (False, True):
            p = AttentionProblem(B=2, H=4, Hkv=4, Mq=Mq, Mkv=Mq, D=D, dtype=torch.float16,
                                 device=torch.device("cpu"), layout="bshd", causal=causal, softmax_scale=0.1)
            keep, pruned = space.candidates(p, h100, ["triton"], level)
            pp = [c.config for c in keep if c.config.fwd_kernel == "gluon-pp"]
            default = [0] if causal and D == 128 and Mq % 128 == 0 else []
            grids = sorted([2, 1] * expected + default if causal else [0] * expected)
            assert sorted(c.fwd_tile_grid for c in pp) == grids, (Mq, D, level, causal)
            assert not [c for c, _ in pruned if c.config.fwd_kernel == "gluon-pp"]
    assert space.candidates(p, simulated_device("a100"), ["triton"], "full")[0]
    assert not [c for c in space.candidates(p, simulated_device("a100"), ["triton"], "full")[0]
                if c.config.fwd_kernel == "gluon-pp"]


@pytest.mark.parametrize("n_mb, n_bh, grid", [(8, 256, 132), (32, 64, 132), (128, 16, 132), (8, 4, 132),
                                               (16, 17, 132), (4, 33, 132), (3, 5, 7), (1, 1, 132)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sec", [None, 0, 3])
def test_pingpong_persistent_schedule_runs_every_tile_once_and_balances_causal(n_mb, n_bh, grid, causal, sec):
    """launch_gluon.pp_schedule (the ping-pong kernel's persistent order, in Python): every
    (head, row block) tile exactly once, with the grid the launcher uses (min(tiles, SMs)).
    Causal: each CTA's work (a tile with row block mb sees mb + 1 key blocks) is within one
    longest tile of the mean share; the plain stride of session 12's first try gave one CTA
    1.57x the mean at S=16k (checked here to fail the same bound). The causal order comes in
    sections of ``sec`` heads (None: the default of two; 0: all heads; 3 leaves a narrower last
    section wherever n_bh % 3): one section's tiles all run before the next section's, longest
    first inside it."""
    from fa2dispatch.backends.triton_fa2.launch_gluon import PP_PERSISTENT_CAUSAL_MB, PP_SECTION_HEADS, pp_schedule

    width = {None: PP_SECTION_HEADS, 0: n_bh, 3: 3}[sec]
    n_tiles = n_mb * n_bh
    grid = min(grid, n_tiles)
    plan = pp_schedule(n_tiles, n_mb, grid, causal, sec)
    ran = [t for cta in plan for t in cta]
    assert sorted(ran) == [(bh, mb) for bh in range(n_bh) for mb in range(n_mb)]
    # fwd_tile_grid=1 launches grid = n_tiles: one tile per CTA, every tile once, in order
    one_each = pp_schedule(n_tiles, n_mb, n_tiles, causal, sec)
    assert all(len(cta) == 1 for cta in one_each)
    per_tile = [cta[0] for cta in one_each]
    assert sorted(per_tile) == sorted(ran)
    if causal:  # section by section, each one's heads longest first
        assert per_tile == sorted(per_tile, key=lambda t: (t[0] // width, -t[1], t[0]))
    else:  # head by head
        assert per_tile == sorted(per_tile)
    if causal and (n_mb <= PP_PERSISTENT_CAUSAL_MB or width >= n_bh):
        # where the launcher's choice is the persistent grid, and for one section anywhere
        work = [sum(mb + 1 for _, mb in cta) for cta in plan]
        assert max(work) <= sum(work) / grid + n_mb, (max(work), sum(work) / grid)
        if (n_mb, n_bh) == (128, 16):  # the plain stride, head-major and longest first per head
            stride = [sum(n_mb - (t % n_mb) for t in range(pid, n_tiles, grid)) for pid in range(grid)]
            assert max(stride) > sum(stride) / grid + n_mb
        if width >= n_bh:  # one section: each CTA's first round is every head's last row block
            for cta in plan:
                assert cta[0][1] >= n_mb - 1 - (grid - 1) // n_bh


def test_pingpong_sections_refuse_a_bad_width():
    """sec_heads names itself when it is not an int >= 0; the width is capped at the heads."""
    from fa2dispatch.backends.triton_fa2.launch_gluon import pp_sections

    assert pp_sections(5) == 2 and pp_sections(1) == 1 and pp_sections(5, 0) == 5 and pp_sections(5, 9) == 5
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="sec_heads"):
            pp_sections(4, bad)


def test_pingpong_grid_choice_and_its_refusals():
    """launch_gluon.pp_per_tile: 1 one CTA per tile, 2 persistent, 0 the launcher's choice (one CTA
    per tile only for causal calls past PP_PERSISTENT_CAUSAL_MB row blocks per head, where the
    sectioned snake drifts out of balance: the schedule test above). Any other value is refused
    by name, by the helper, by both backends' config checks and by forward_pingpong."""
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.backends.triton_fa2 import launch_gluon
    from fa2dispatch.backends.triton_fp8.config import FP8Config

    limit = launch_gluon.PP_PERSISTENT_CAUSAL_MB
    assert [launch_gluon.pp_per_tile(0, True, n) for n in (1, limit, limit + 1)] == [False, False, True]
    assert not launch_gluon.pp_per_tile(0, False, 10 * limit)
    assert all(launch_gluon.pp_per_tile(1, c, n) for c in (False, True) for n in (1, 10 * limit))
    assert not any(launch_gluon.pp_per_tile(2, c, n) for c in (False, True) for n in (1, 10 * limit))
    for bad in (3, -1, True):
        with pytest.raises(ValueError, match="fwd_tile_grid"):
            launch_gluon.pp_per_tile(bad, True, 4)
    h100 = simulated_device("h100")
    p = AttentionProblem(B=1, H=4, Hkv=4, Mq=1024, Mkv=1024, D=128, dtype=torch.float16,
                         device=torch.device("cpu"), layout="bshd", causal=True, softmax_scale=0.1)
    ok = BACKENDS["triton"].default_config(p, h100)
    assert BACKENDS["triton"].config_reasons(p, h100, ok) == []
    assert "fwd_tile_grid=3" in BACKENDS["triton"].config_reasons(p, h100, replace(ok, fwd_tile_grid=3))[0]
    p8 = replace(p, dtype=torch.float8_e4m3fn)
    assert "tile_grid=5" in BACKENDS["triton-fp8"].config_reasons(p8, h100, FP8Config(tile_grid=5))[0]
    assert BACKENDS["triton-fp8"].config_reasons(p8, h100, FP8Config(tile_grid=2)) == []
    q = torch.zeros(1, 2, 128, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="fwd_tile_grid=7"):
        launch_gluon.forward_pingpong(q, q, q, True, tile_grid=7)
    with pytest.raises(ValueError, match="sec_heads=-2"):
        launch_gluon.forward_pingpong(q, q, q, True, sec_heads=-2)
