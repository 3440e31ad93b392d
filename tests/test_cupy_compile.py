"""The CuPy kernels compile with NVRTC (the compiler CuPy uses at run time, not nvcc) for
sm_80, sm_89 and sm_90 at every instantiation of the default configs: both dtypes, causal or
not, every head dim the backend accepts (8..256, multiple of 8), with zero register spills and
within each target's shared memory. The sm_90 defaults at head dims 64 and 128 are the wgmma
forward, compiled for sm_90a as at run time. No GPU and no cupy
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
    assert len(rows) == 5 * 2 * len(head_dims)  # forward, pre, delta, dK/dV, dQ
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
    text = source("fa2_fwd_sm90.cu")
    assert '#include "common.cuh"' not in text and "wgmma.mma_async.sync.aligned" in text


@needs_nvrtc
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
def test_every_sm90_forward_candidate_compiles_without_spills(D, dtype):
    """Every forward config the tuner may time on an H100 (the wgmma kernel's tiles and ring
    depths for sm_90a, the mma.sync kernel's for sm_90), causal or not, compiles and fits the
    H100's shared memory; the wgmma ones without spills and without ptxas serialising their
    MMAs. (Of the mma.sync candidates, 256-row blocks at D=128 spill 12 bytes with NVRTC 13.5:
    slower, still exact; the tuner times them like any other.)"""
    from fa2dispatch.backends.cupy_cuda.config import config_space
    from fa2dispatch.problem import AttentionProblem

    device = nvrtc_check.TARGETS["sm_90"]
    seen = set()
    print(f"\nNVRTC {nvrtc_check.nvrtc_version(NVRTC)}  sm_90 D={D} {dtype}")
    for causal in (False, True):
        problem = AttentionProblem(2, 8, 8, 2048, 2048, D, getattr(torch, dtype), torch.device("cpu"), "bshd", causal,
                                   D**-0.5)
        configs = config_space(problem, device)
        assert sum(c.fwd_kernel == "wgmma" for c in configs) >= 3, [c.short() for c in configs]
        for cfg in configs:
            spec = forward_spec(problem.dtype, D, causal, cfg)
            if (spec.file, spec.options()) in seen:
                continue
            seen.add((spec.file, spec.options()))
            options = spec.options() + (f"--gpu-architecture={spec.arch or 'sm_90'}", "--ptxas-options=-v")
            _, log = nvrtc_check.compile_cubin(NVRTC, source(spec.file), options)
            info = nvrtc_check.parse_ptxas_log(log)[spec.kernel]
            print(f"  {spec.kernel:12} {spec.arch or 'sm_90':6} causal={int(causal)} {cfg.short()}: {info}")
            assert spec.smem <= device.smem_per_block, (cfg.short(), spec.smem)
            if cfg.fwd_kernel == "wgmma":
                assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (cfg.short(), info)
            assert "(C7515)" not in log, f"ptxas serialised the wgmma pipeline: {log}"


@needs_nvrtc
def test_cubins_of_a_named_target_are_compiled_once_and_kept_on_disk(tmp_path, monkeypatch):
    """compile.cubin_path: NVRTC runs on the first request only; the file lands in the cache dir
    under a name that changes with the options (and source, arch, NVRTC version)."""
    from fa2dispatch.backends.cupy_cuda import compile as cc
    from fa2dispatch.backends.cupy_cuda.config import CupyConfig

    monkeypatch.setenv("FA2DISPATCH_CACHE_DIR", str(tmp_path))
    calls = []
    real = nvrtc_check.compile_cubin
    monkeypatch.setattr(nvrtc_check, "compile_cubin", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    cfg = CupyConfig(fwd_kernel="wgmma", block_m=64, num_warps=4, block_n=64)
    spec = forward_spec(torch.float16, 64, False, cfg)
    assert spec.arch == "sm_90a" and spec.threads == 128
    first = cc.cubin_path(spec)
    assert first.parent == tmp_path / "cubin" and first.stat().st_size > 0 and len(calls) == 1
    assert "--gpu-architecture=sm_90a" in calls[0]
    assert cc.cubin_path(spec) == first and len(calls) == 1  # from disk
    other = cc.cubin_path(forward_spec(torch.float16, 64, True, cfg))
    assert other != first and len(calls) == 2
    assert not list((tmp_path / "cubin").glob("*.tmp"))


def test_cubin_dir_without_platformdirs_is_private_to_the_process(monkeypatch, caplog):
    """A --no-deps install without platformdirs and without FA2DISPATCH_CACHE_DIR (the H100
    image, session 10: every wgmma test errored on the import): cubins go to a temporary
    directory only this process uses (mode 0700), with one warning, instead of failing."""
    import builtins
    import stat

    from fa2dispatch.backends.cupy_cuda import compile as cc

    monkeypatch.delenv("FA2DISPATCH_CACHE_DIR", raising=False)
    real_import = builtins.__import__

    def no_platformdirs(name, *args, **kwargs):
        if name == "platformdirs":
            raise ImportError("No module named 'platformdirs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_platformdirs)
    with caplog.at_level("WARNING"):
        first = cc.cubin_dir()
        assert cc.cubin_dir() == first
    assert first.is_dir() and stat.S_IMODE(first.stat().st_mode) == 0o700
    assert "platformdirs not installed" in caplog.text
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert cc.cubin_dir() != first  # with platformdirs back: the user cache dir


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
