"""The CuPy kernels compile with NVRTC (the compiler CuPy uses at run time, not nvcc) for
sm_80, sm_89 and sm_90 at every instantiation of the default configs: both dtypes, causal or
not, every head dim the backend accepts (8..256, multiple of 8), with zero register spills and
within each target's shared memory. No GPU and no cupy
needed: NVRTC is loaded through ctypes (backends/cupy_cuda/nvrtc_check.py). Registers and
spills per kernel are printed (pytest -rP)."""

from __future__ import annotations

import pytest
import torch
from fa2dispatch.backends.cupy_cuda import nvrtc_check
from fa2dispatch.backends.cupy_cuda.compile import backward_specs, forward_spec, source

pytestmark = pytest.mark.compile

NVRTC = nvrtc_check.load_nvrtc()
needs_nvrtc = pytest.mark.skipif(
    NVRTC is None, reason="libnvrtc not found (pip install nvidia-cuda-nvrtc, or set CUDA_HOME): NVRTC compile "
                          "checks of the CuPy kernels did not run")


# Every accepted head dim, in four groups so xdist spreads the ~1,500 compiles (~0.2 s each).
HEAD_DIMS = tuple(range(8, 257, 8))
GROUPS = [HEAD_DIMS[i::4] for i in range(4)]


def test_the_groups_cover_every_head_dim_the_backend_accepts():
    from fa2dispatch.backends import BACKENDS

    cupy = BACKENDS["cupy"]
    accepted = range(cupy.head_dim_min, cupy.head_dim_max + 1, cupy.head_dim_multiple)
    assert sorted(d for g in GROUPS for d in g) == list(accepted)


@needs_nvrtc
@pytest.mark.parametrize("head_dims", GROUPS, ids=[f"D{g[0]}+{g[1] - g[0]}k" for g in GROUPS])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", sorted(nvrtc_check.TARGETS))
def test_kernels_compile_without_spills_and_fit(arch, dtype, head_dims):
    rows = []
    for d in head_dims:
        for causal in (False, True):
            rows += nvrtc_check.check(arch, getattr(torch, dtype), d, causal)
    print(f"\nNVRTC {nvrtc_check.nvrtc_version(NVRTC)}  {arch} {dtype}")
    for r in rows:
        print(f"  D={r['head_dim']:<3} causal={int(r['causal'])} {r['kernel']:13} regs={r['registers']:<3} "
              f"spill st/ld={r['spill_stores']}/{r['spill_loads']} stack={r['stack']} "
              f"smem={r['smem'] / 1024:.1f}/{r['smem_limit'] / 1024:.0f} KiB")
    assert len(rows) == 4 * 2 * len(head_dims)
    for r in rows:
        where = f"{r['kernel']} D={r['head_dim']} causal={r['causal']} on {arch} ({r['config']})"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where}: spills {r}"
        assert r["smem"] <= r["smem_limit"], f"{where}: {r['smem']} bytes of shared memory"


@needs_nvrtc
def test_a_broken_source_fails_with_the_nvrtc_log():
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        nvrtc_check.compile_cubin(NVRTC, "extern \"C\" __global__ void k() { undeclared(); }",
                                  ("--gpu-architecture=sm_80",))


def test_sources_are_package_data_and_inline_the_header():
    """The .cu files load through importlib.resources and carry common.cuh inlined, so NVRTC
    needs no include path and the on-disk cache key (the source text) covers the header."""
    for name in ("fa2_fwd.cu", "fa2_bwd.cu"):
        text = source(name)
        assert '#include "common.cuh"' not in text and "mma.sync.aligned.m16n8k16" in text


def test_specs_specialise_by_dtype_head_dim_causal_and_tiles():
    from fa2dispatch.backends.cupy_cuda.config import CupyConfig

    cfg = CupyConfig()
    a = forward_spec(torch.float16, 136, True, cfg)
    assert dict(a.defines) == {"FA2_BF16": 0, "HEAD_DIM": 136, "D_PAD": 144, "CAUSAL": 1, "BLOCK_M": 128,
                               "BLOCK_N": 64, "NUM_WARPS": 4, "O_SMEM": 1,
                               "WARP_SKIP": cfg.warp_skip, "GROUP_ORDER": int(cfg.head_group != 1)}
    assert a.options() != forward_spec(torch.bfloat16, 136, True, cfg).options()
    bwd = backward_specs(torch.float16, 200, False, cfg)
    # dK/dV splits D=200's columns in two chunks of 112 (padded to 224); dQ pads to 208.
    assert dict(bwd["dkdv"].defines)["D_PAD"] == 224 and dict(bwd["dq"].defines)["D_PAD"] == 208
    assert bwd["pre"].options() == bwd["dq"].options()
