"""Compile the CuPy kernels with NVRTC for GPU targets on any machine (no GPU, no cupy needed).

NVRTC is the compiler CuPy uses at run time (it differs from nvcc), loaded here through ctypes
from the ``nvidia-cuda-nvrtc`` wheel (``nvidia/cu13/lib`` or ``nvidia/cuda_nvrtc/lib``), or
``$CUDA_HOME/lib64``, or the loader's path. Each instantiation is compiled to a cubin for
``sm_XX`` with exactly the source text and options the runtime uses (compile.py), plus
``--ptxas-options=-v``, whose report (registers, spill stores/loads, stack) lands in the
program log and is parsed here.

``python -m fa2dispatch.backends.cupy_cuda.nvrtc_check --arch sm_90`` prints one JSON row per
kernel of the default configs.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import glob
import json
import os
import re
import sys

import torch

from fa2dispatch.hardware import DeviceInfo

from .compile import KernelSpec, backward_specs, forward_spec, source
from .config import CupyConfig, default_config

# Offline profiles: shared memory per block (opt-in) that the default configs must fit.
TARGETS = {
    "sm_80": DeviceInfo("nvidia", "A100 (offline)", "sm_80", (8, 0), 108, 163 * 1024, 32),
    "sm_89": DeviceInfo("nvidia", "RTX 4090 (offline)", "sm_89", (8, 9), 128, 99 * 1024, 32),
    "sm_90": DeviceInfo("nvidia", "H100 (offline)", "sm_90", (9, 0), 132, 227 * 1024, 32),
}
# Head dims every check covers: the common ones, padded ones (40 -> 48, 136 -> 144, 200 -> 208
# with dK/dV padded to 224) and the smallest and largest.
HEAD_DIMS = (8, 40, 64, 96, 128, 136, 200, 256)


def _candidates() -> list[str]:
    found = []
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        for base in getattr(nvidia, "__path__", []):
            found += sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            found += sorted(glob.glob(os.path.join(os.environ[env], "lib64", "libnvrtc.so*")))
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    return [f for f in found if "builtins" not in os.path.basename(f) and "alt" not in os.path.basename(f)]


@functools.cache
def load_nvrtc() -> ctypes.CDLL | None:
    """libnvrtc, or None when no copy can be found or loaded."""
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    return None


def nvrtc_version(lib: ctypes.CDLL) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def _check(lib, status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")


def compile_cubin(lib: ctypes.CDLL, code: str, options: tuple[str, ...], name: str = "fa2.cu") -> tuple[bytes, str]:
    """(cubin, log); RuntimeError with the log when compilation fails."""
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None), "create")
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"NVRTC failed ({lib.nvrtcGetErrorString(status).decode()}):\n{log}")
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


_FUNC = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """{kernel: {registers, spill_stores, spill_loads, stack}} from ptxas -v output."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _FUNC.search(line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := _SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m.group(1))
    return out


def specs_for(dtype: torch.dtype, head_dim: int, causal: bool, cfg: CupyConfig) -> list[KernelSpec]:
    return [forward_spec(dtype, head_dim, causal, cfg), *backward_specs(dtype, head_dim, causal, cfg).values()]


def check(arch: str, dtype: torch.dtype, head_dim: int, causal: bool, cfg: CupyConfig | None = None) -> list[dict]:
    """Compile every kernel of one problem kind for ``arch``; one row per kernel."""
    lib = load_nvrtc()
    if lib is None:
        raise RuntimeError("libnvrtc not found")
    device = TARGETS[arch]
    cfg = cfg or default_config(head_dim, device)
    rows, compiled = [], {}
    for spec in specs_for(dtype, head_dim, causal, cfg):
        key = (spec.file, spec.options(), spec.arch)
        if key not in compiled:  # a spec that names its target (sm_90a) is compiled for it
            options = spec.options() + (f"--gpu-architecture={spec.arch or arch}", "--ptxas-options=-v")
            _, log = compile_cubin(lib, source(spec.file), options)
            compiled[key] = parse_ptxas_log(log)
        info = compiled[key].get(spec.kernel)
        if info is None:
            raise RuntimeError(f"{spec.kernel} missing from the ptxas report of {spec.file} {spec.options()}")
        rows.append(dict(arch=arch, dtype=str(dtype).removeprefix("torch."), head_dim=head_dim, causal=causal,
                         kernel=spec.kernel, smem=spec.smem, smem_limit=device.smem_per_block,
                         config=cfg.short(), **info))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(TARGETS))
    parser.add_argument("--head-dim", type=int, action="append")
    parser.add_argument("--dtype", action="append", choices=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    lib = load_nvrtc()
    if lib is None:
        print("libnvrtc not found", file=sys.stderr)
        return 2
    print(f"# NVRTC {nvrtc_version(lib)}", file=sys.stderr)
    rows = []
    for arch in args.arch or sorted(TARGETS):
        for dt in args.dtype or ["float16", "bfloat16"]:
            for d in args.head_dim or HEAD_DIMS:
                for causal in (False, True):
                    rows += check(arch, getattr(torch, dt), d, causal)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
