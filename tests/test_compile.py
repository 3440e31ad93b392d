"""The Triton kernels compile offline for sm_80, sm_90 and gfx942 (no GPU needed), their
default configs fit each target's shared memory, and the matrix instructions are there.

Compilation runs in a subprocess with TRITON_INTERPRET=0: in this process the kernels may be
interpreted, and an interpreted kernel cannot be compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.compile

# (dtype, head dim): the common head dims, a padded one (40 -> tiles of 64), the largest, fp32.
PROBLEMS = [("float16", 64), ("bfloat16", 128), ("float16", 256), ("float32", 128), ("float16", 40)]
DOT_KERNELS = {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}


def _compile(target: str, dtype: str, head_dims: list[int], *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "fa2dispatch.backends.triton_fa2.offline", "--target", target, "--dtype", dtype,
           *extra]
    for d in head_dims:
        cmd += ["--head-dim", str(d)]
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"offline compile for {target} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _print_report(rows: list[dict]) -> None:
    """Shared memory per kernel at the default configs (shown with pytest -rP)."""
    for r in rows:
        instr = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "fma")
        print(f"{r['target']:7} {r['dtype']:9} D={r['head_dim']:<3} {r['kernel']:20} "
              f"{r['shared_bytes'] / 1024:6.1f} KiB of {r['smem_limit'] / 1024:.0f}  {instr:5}  {r['config']}")


@pytest.mark.parametrize("target", ["sm_80", "sm_90", "gfx942"])
def test_kernels_compile_and_fit(target):
    rows = []
    for dtype in sorted({p[0] for p in PROBLEMS}):
        rows += _compile(target, dtype, [d for dt, d in PROBLEMS if dt == dtype])
    _print_report(rows)
    assert len(rows) == 4 * len(PROBLEMS), "every problem compiles four kernels"
    for row in rows:
        where = f"{row['kernel']} {row['dtype']} D={row['head_dim']} on {target}"
        assert 0 <= row["shared_bytes"] <= row["smem_limit"], f"{where}: {row['shared_bytes']} B of shared memory"
        # float32 dots run in exact IEEE float32 (tl.dot input_precision="ieee"): FMA, no tensor cores.
        if row["kernel"] in DOT_KERNELS and row["dtype"] != "float32":
            assert row["mma"], f"{where}: no tensor-core instruction in the generated code"
    if target == "sm_90":
        # Hopper's warpgroup MMA for the 16-bit forward at the common head dims.
        fwd = [r for r in rows if r["kernel"] == "attn_fwd" and r["dtype"] != "float32" and r["head_dim"] in (64, 128)]
        assert fwd and all(r["wgmma"] for r in fwd), "sm_90 forward should use wgmma"


@pytest.mark.parametrize("target", ["sm_90", "gfx942"])
def test_feature_kernels_compile_and_fit(target):
    """The kernels with every FlashAttention-2 feature on (left window, softcap, ALiBi, dropout,
    varlen; and a two-sided window) compile, fit, and keep their matrix instructions; float32
    with every feature too (softcap's series for small arguments, the RENORM backward)."""
    rows = _compile(target, "bfloat16", [128], "--features", "all") + \
        _compile(target, "float16", [64], "--causal", "false", "--features", "window") + \
        _compile(target, "float32", [64], "--features", "all")
    _print_report(rows)
    assert len(rows) == 12
    for row in rows:
        where = f"{row['kernel']} {row['dtype']} D={row['head_dim']} features={row['features']} on {target}"
        assert 0 <= row["shared_bytes"] <= row["smem_limit"], f"{where}: {row['shared_bytes']} B of shared memory"
        if row["dtype"] == "float32":  # exact IEEE float32 dots: FMA, no tensor cores
            continue
        if row["kernel"] in DOT_KERNELS:
            assert row["mma"], f"{where}: no tensor-core instruction in the generated code"
        if target == "sm_90" and row["kernel"] == "attn_fwd":
            assert row["wgmma"], f"{where}: the forward should use wgmma"
