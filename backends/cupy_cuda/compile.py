"""Sources, compile options and the module cache of the CuPy kernels.

The CUDA C++ lives in ``fa2_fwd.cu``, ``fa2_bwd.cu`` and ``common.cuh`` next to this file, read
with ``importlib.resources``; ``#include "common.cuh"`` is inlined here so NVRTC needs no
include path and one source text covers everything a module is built from. A module is
specialised by ``-D`` defines (dtype, head dim, padded head dim, causal, tile sizes):
``KernelSpec`` says which, and nvrtc_check.py compiles exactly the same text and options.

Caches, two levels:
- in memory: one ``cupy.RawModule`` per (source file, options, device index), and one function
  object per kernel name with its dynamic shared-memory limit already raised;
- on disk, for modules that name their own target (``KernelSpec.arch``: the wgmma forward is
  sm_90a code, which CuPy's compiler never targets): we compile with NVRTC ourselves (CuPy's
  NVRTC bindings; without cupy, nvrtc_check.py's loader) and keep the cubin in ``cubin/`` of fa2dispatch's user cache dir,
  named by a hash of the source text, the options, the arch and the NVRTC version; written
  atomically under a file lock, so concurrent processes compile once and never read a partial
  file;
- on disk, for the others: CuPy's own kernel cache (``CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``). Its
  file name is a hash of the full source text, the options, the target arch (``sm_XX`` when
  NVRTC can emit a cubin for it) and the NVRTC version, so an edited ``.cu`` file or another GPU
  kind compiles afresh and nothing stale is ever loaded. We rely on it rather than keep a second
  cubin cache. The autotune cache's kernel hash covers ``cupy_cuda/*.cu`` (autotune/cache.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CupyConfig, d_pad, dkdv_d_pad, dkdv_split

INCLUDE = '#include "common.cuh"'
# -std=c++17 for the lambdas and static_asserts; no fast-math: the kernels choose their
# approximate instructions (ex2.approx) explicitly. --maxrregcount=255 and the kernels'
# __launch_bounds__(threads, 1): without them NVRTC 13.5's ptxas aims for 96 or 128 registers
# and spills (nvrtc_check: forward D=8 causal spilled 4 bytes at 128 registers on sm_80, the dQ
# kernel at D=8 8 bytes at 96 on sm_90; both compile without spills with them).
BASE_OPTIONS = ("--std=c++17", "--maxrregcount=255")


@functools.cache
def source(name: str) -> str:
    """The full text of one .cu file, common.cuh inlined."""
    files = importlib.resources.files(__package__)
    text = files.joinpath(name).read_text(encoding="utf-8")
    if INCLUDE in text:
        text = text.replace(INCLUDE, files.joinpath("common.cuh").read_text(encoding="utf-8"))
    return text


@dataclass(frozen=True)
class KernelSpec:
    """One module to compile and one kernel in it to launch."""

    file: str
    kernel: str
    defines: tuple[tuple[str, int], ...]
    threads: int
    smem: int  # dynamic shared memory in bytes
    arch: str = ""  # "": CuPy's target for the device; else this NVRTC target (e.g. "sm_90a")

    def options(self) -> tuple[str, ...]:
        return BASE_OPTIONS + tuple(f"-D{k}={v}" for k, v in self.defines)


def forward_spec(dtype: torch.dtype, head_dim: int, causal: bool, cfg: CupyConfig) -> KernelSpec:
    from .config import default_o_smem, smem_forward

    if cfg.fwd_kernel == "wgmma":
        defines = (("FA2_BF16", int(dtype == torch.bfloat16)), ("HEAD_DIM", head_dim), ("D_PAD", d_pad(head_dim)),
                   ("CAUSAL", int(causal)), ("BLOCK_N", cfg.block_n), ("WG", cfg.block_m // 64),
                   ("STAGES", cfg.fwd_stages))
        return KernelSpec("fa2_fwd_sm90.cu", "fa2_fwd_sm90", defines, 2 * cfg.block_m, smem_forward(head_dim, cfg),
                          "sm_90a")
    defines = (("FA2_BF16", int(dtype == torch.bfloat16)), ("HEAD_DIM", head_dim), ("D_PAD", d_pad(head_dim)),
               ("CAUSAL", int(causal)), ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n),
               ("NUM_WARPS", cfg.num_warps), ("O_SMEM", int(default_o_smem(cfg, causal))),
               ("WARP_SKIP", cfg.warp_skip if causal else 0),
               ("GROUP_ORDER", int(causal and cfg.head_group != 1)))
    return KernelSpec("fa2_fwd.cu", "fa2_fwd", defines, 32 * cfg.num_warps, smem_forward(head_dim, cfg))


def backward_specs(dtype: torch.dtype, head_dim: int, causal: bool, cfg: CupyConfig) -> dict[str, KernelSpec]:
    """The backward kernels: "pre", "delta", "dkdv", "dq". dK/dV pads the head dim to whole column
    chunks, so it is a module of its own when that differs from the dQ kernel's padding."""
    from .config import smem_dkdv, smem_dq

    common = (("FA2_BF16", int(dtype == torch.bfloat16)), ("HEAD_DIM", head_dim), ("CAUSAL", int(causal)),
              ("BWD_STAGES", cfg.bwd_stages))
    dq_only = (("DQ_BLOCK_M", cfg.dq_block_m), ("DQ_BLOCK_N", cfg.dq_block_n))
    dkdv_only = (("DKDV_BLOCK_M", cfg.dkdv_block_m), ("DKDV_BLOCK_N", cfg.dkdv_block_n),
                 ("DKDV_SPLIT", dkdv_split(head_dim)))
    if dkdv_d_pad(head_dim) == d_pad(head_dim):  # one module holds all three kernels
        dq = dkdv = common + (("D_PAD", d_pad(head_dim)),) + dq_only + dkdv_only
    else:
        dq = common + (("D_PAD", d_pad(head_dim)),) + dq_only
        dkdv = common + (("D_PAD", dkdv_d_pad(head_dim)),) + dkdv_only
    return {
        "pre": KernelSpec("fa2_bwd.cu", "fa2_bwd_pre", dq, 128, 0),
        # delta from dP for rows that see one key block at most (launch.backward, fa2_bwd.cu)
        "delta": KernelSpec("fa2_bwd.cu", "fa2_bwd_delta", dq, 32 * (cfg.dq_block_m // 16), smem_dq(head_dim, cfg)),
        "dkdv": KernelSpec("fa2_bwd.cu", "fa2_bwd_dkdv", dkdv, 32 * (cfg.dkdv_block_n // 16), smem_dkdv(head_dim, cfg)),
        "dq": KernelSpec("fa2_bwd.cu", "fa2_bwd_dq", dq, 32 * (cfg.dq_block_m // 16), smem_dq(head_dim, cfg)),
    }


_modules: dict = {}
_functions: dict = {}


def function(spec: KernelSpec, device_index: int):
    """The compiled kernel for ``spec`` on this device (compiled on first use, then cached)."""
    key = (spec, device_index)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    import cupy

    mkey = (spec.file, spec.options(), spec.arch, device_index)
    with cupy.cuda.Device(device_index):
        module = _modules.get(mkey)
        if module is None:
            if spec.arch:
                module = cupy.RawModule(path=str(cubin_path(spec)))
            else:
                module = cupy.RawModule(code=source(spec.file), options=spec.options())
            _modules[mkey] = module
        fn = module.get_function(spec.kernel)
        if spec.smem > 48 * 1024:  # above 48 KiB, dynamic shared memory must be opted into
            fn.max_dynamic_shared_size_bytes = spec.smem
    _functions[key] = fn
    return fn


@functools.cache
def _private_cubin_dir() -> Path:
    """A directory of this process's own (mode 0700, removed at exit): where cubins go when
    there is no cache dir. Nothing another user wrote is ever loaded from it."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="fa2dispatch-cubin-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def cubin_dir() -> Path:
    """``cubin/`` beside the autotune cache: ``$FA2DISPATCH_CACHE_DIR/cubin``, else the platform's
    user cache dir (platformdirs). Without either (a ``--no-deps`` install with no platformdirs
    and no variable set) a private temporary directory, with one warning: the kernels still
    load, but compile again in every process."""
    env = os.environ.get("FA2DISPATCH_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "cubin"
    try:
        import platformdirs
    except ImportError:
        from fa2dispatch.autotune.cache import warn_once

        warn_once("no cubin cache dir: platformdirs not installed and FA2DISPATCH_CACHE_DIR not set; the "
                  "sm_90a kernels are compiled once per process, into a temporary directory")
        return _private_cubin_dir()
    return Path(platformdirs.user_cache_dir("fa2dispatch", appauthor=False)) / "cubin"


def cubin_path(spec: KernelSpec) -> Path:
    """The cubin of ``spec`` (which names its arch) on disk, compiled with NVRTC on first use."""
    from filelock import FileLock

    from .nvrtc_check import compile_cubin, load_nvrtc, nvrtc_version

    text, options = source(spec.file), spec.options() + (f"--gpu-architecture={spec.arch}",)
    try:  # the NVRTC CuPy uses, which matches the CUDA runtime that will load the cubin
        version, compile_ = _cupy_nvrtc()
    except Exception:  # noqa: BLE001 (no cupy, as offline; or CuPy cannot load its NVRTC): the libnvrtc nvrtc_check.py finds
        lib = load_nvrtc()
        if lib is None:
            raise RuntimeError(f"{spec.file} for {spec.arch}: neither cupy nor a libnvrtc (the "
                               "nvidia-cuda-nvrtc wheel, $CUDA_HOME/lib64, the loader's path) to compile with")
        version, compile_ = nvrtc_version(lib), functools.partial(compile_cubin, lib)
    key = hashlib.sha256("\0".join((text, *options, version)).encode()).hexdigest()[:24]
    directory = cubin_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.file.removesuffix('.cu')}-{spec.arch}-{key}.cubin"
    if not path.is_file():
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                cubin, _ = compile_(text, options, spec.file)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_bytes(cubin)
                os.replace(tmp, path)
    return path


def _cupy_nvrtc():
    """(version, compile function) through CuPy's own NVRTC bindings; raises without cupy or
    when CuPy cannot load its NVRTC."""
    from cupy.cuda import nvrtc

    def compile_(text: str, options: tuple[str, ...], name: str) -> tuple[bytes, str]:
        prog = nvrtc.createProgram(text, name, (), ())
        try:
            try:
                nvrtc.compileProgram(prog, list(options))
            except nvrtc.NVRTCError as exc:
                raise RuntimeError(f"NVRTC failed ({exc}):\n{nvrtc.getProgramLog(prog)}") from exc
            return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
        finally:
            nvrtc.destroyProgram(prog)

    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}", compile_
