"""triton_fa2/fast_launch.py without a GPU: a stand-in for a JIT function and its compiled kernel
records which path each call takes. The first call with a key compiles (``fn[grid]``); a call
with the same scalars, alignments and constexprs goes to the compiled kernel's launcher with the
constexpr values appended; any change of those goes back through ``fn[grid]``. Launch hooks,
CPU tensors, a refusing launcher and constexprs out of place keep Triton's path. The real
kernels under the fast path: tests/test_kvcache_gpu.py (decode) and tests/test_hopper_kernel.py
(the Gluon forward)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from fa2dispatch.backends.triton_fa2 import fast_launch


class FakeTensor:
    """What fast_launch reads of a CUDA tensor: data_ptr, dtype and is_cuda."""

    def __init__(self, ptr: int, is_cuda: bool = True, dtype=torch.float16):
        self.ptr, self.is_cuda, self.dtype = ptr, is_cuda, dtype

    def data_ptr(self) -> int:
        return self.ptr


class FakeDescriptor:
    def __init__(self, base, block_shape=(64, 128), layout="nvmma-128B"):
        self.base, self.block_shape, self.layout, self.padding = base, list(block_shape), layout, "zero"


class FakeKernel:
    def __init__(self, log, refuse=False):
        self.log, self.refuse = log, refuse
        self.function, self.packed_metadata = "function", "metadata"

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
        if self.refuse:
            raise TypeError("launcher refused")
        self.log.append(("fast", (gx, gy, gz), args))


class FakeJIT:
    """params as JITFunction's (is_constexpr, name, default); fn[grid](...) compiles once per call."""

    def __init__(self, names, constexprs, defaults=None, refuse=False):
        self.fn = SimpleNamespace(__name__="fake_kernel")
        defaults = defaults or {}
        self.params = [SimpleNamespace(name=n, is_constexpr=n in constexprs,
                                       default=defaults.get(n, inspect.Parameter.empty)) for n in names]
        self.log, self.refuse = [], refuse

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return FakeKernel(self.log, self.refuse)
        return run


@pytest.fixture
def gpu_like(monkeypatch):
    """A current device and stream without a GPU; fast launch on; the installed Triton's own
    launch hooks as they are by default (Triton 3.6: empty HookChains, not None)."""
    monkeypatch.setattr(fast_launch, "_device_and_stream", lambda: (0, 1234))
    monkeypatch.setattr(fast_launch, "FAST_LAUNCH", True)
    monkeypatch.setattr(fast_launch, "REFUSED", None)


def _fn(refuse=False):
    return FakeJIT(["X", "desc", "n", "scale", "BLOCK", "CAUSAL"], {"BLOCK", "CAUSAL"}, {"CAUSAL": False},
                   refuse=refuse)


def test_second_call_goes_to_the_compiled_launcher_with_the_constexprs(gpu_like):
    fn, cache = _fn(), {}
    args = (FakeTensor(4096), FakeDescriptor(FakeTensor(8192)), 7, 0.5)
    fast_launch.launch(fn, (3, 2), args, {"BLOCK": 64, "num_warps": 4}, cache)
    fast_launch.launch(fn, (5,), (FakeTensor(1 << 20), FakeDescriptor(FakeTensor(1 << 21)), 7, 0.5),
                       {"BLOCK": 64, "num_warps": 4}, cache)
    assert [e[0] for e in fn.log] == ["jit", "fast"]
    _, grid, passed = fn.log[1]
    assert grid == (5, 1, 1)
    assert passed[-2:] == (64, False)  # BLOCK from meta, CAUSAL from its default, in parameter order
    assert passed[2:4] == (7, 0.5) and len(cache) == 1


@pytest.mark.parametrize("change", ["scalar", "scalar type", "alignment", "dtype", "descriptor alignment",
                                    "descriptor dtype", "descriptor block", "descriptor layout", "constexpr",
                                    "option"])
def test_anything_that_selects_another_kernel_compiles_again(gpu_like, change):
    fn, cache = _fn(), {}
    base = {"x": FakeTensor(4096), "d": FakeTensor(8192), "n": 7, "block": (64, 128), "layout": "nvmma-128B",
            "meta": {"BLOCK": 64, "num_warps": 4}}

    def call(a):
        fast_launch.launch(fn, (1,), (a["x"], FakeDescriptor(a["d"], a["block"], a["layout"]), a["n"], 0.5),
                           a["meta"], cache)

    if change == "scalar type":
        base["n"] = 1
    call(base)
    other = dict(base)
    if change == "scalar":
        other["n"] = 16  # Triton specializes integers (== 1, divisible by 16)
    elif change == "scalar type":
        other["n"] = True  # equal to 1 in Python, another argument type to Triton
    elif change == "alignment":
        other["x"] = FakeTensor(4098)
    elif change == "dtype":
        other["x"] = FakeTensor(4096, dtype=torch.bfloat16)
    elif change == "descriptor alignment":
        other["d"] = FakeTensor(8194)
    elif change == "descriptor dtype":
        other["d"] = FakeTensor(8192, dtype=torch.bfloat16)
    elif change == "descriptor block":  # block_m 128 after 64: only the descriptors say so
        other["block"] = (128, 128)
    elif change == "descriptor layout":
        other["layout"] = "nvmma-64B"
    elif change == "constexpr":
        other["meta"] = {"BLOCK": 128, "num_warps": 4}
    else:
        other["meta"] = {"BLOCK": 64, "num_warps": 8}
    call(other)
    assert [e[0] for e in fn.log] == ["jit", "jit"], change
    assert len(cache) == 2


def test_triton_path_with_a_hook_on_cpu_or_when_off(gpu_like, monkeypatch):
    fn, cache = _fn(), {}
    args, meta = (FakeTensor(4096), FakeDescriptor(FakeTensor(8192)), 7, 0.5), {"BLOCK": 64}
    fast_launch.launch(fn, (1,), args, meta, cache)
    hooks = fast_launch.knobs.runtime.launch_enter_hook

    def hook(*a):
        return None

    if hasattr(hooks, "add"):  # Triton 3.6: a HookChain
        hooks.add(hook)
        try:
            fast_launch.launch(fn, (1,), args, meta, cache)  # a profiler's hook must see the launch
        finally:
            hooks.remove(hook)
    else:
        monkeypatch.setattr(fast_launch.knobs.runtime, "launch_enter_hook", hook)
        fast_launch.launch(fn, (1,), args, meta, cache)
        monkeypatch.setattr(fast_launch.knobs.runtime, "launch_enter_hook", None)
    exit_hooks = fast_launch.knobs.runtime.launch_exit_hook
    monkeypatch.setattr(fast_launch.knobs.runtime, "launch_exit_hook", hook)  # an older Triton's bare callable
    fast_launch.launch(fn, (1,), args, meta, cache)
    monkeypatch.setattr(fast_launch.knobs.runtime, "launch_exit_hook", exit_hooks)
    fast_launch.launch(fn, (1,), (FakeTensor(4096, is_cuda=False), *args[1:]), meta, cache)
    monkeypatch.setattr(fast_launch, "FAST_LAUNCH", False)
    fast_launch.launch(fn, (1,), args, meta, cache)
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit", "jit", "jit"]


def test_a_refusing_launcher_falls_back_for_good(gpu_like):
    fn, cache = _fn(refuse=True), {}
    args, meta = (FakeTensor(4096), FakeDescriptor(FakeTensor(8192)), 7, 0.5), {"BLOCK": 64}
    fast_launch.launch(fn, (1,), args, meta, cache)
    with pytest.warns(RuntimeWarning, match="TypeError: launcher refused"):
        fast_launch.launch(fn, (1,), args, meta, cache)  # the launcher raises: nothing ran; Triton's path runs it
    assert [e[0] for e in fn.log] == ["jit", "jit"] and fast_launch.FAST_LAUNCH is False
    assert fast_launch.REFUSED == "TypeError: launcher refused"


def test_constexprs_before_other_parameters_keep_tritons_path(gpu_like):
    fn = FakeJIT(["X", "BLOCK", "n"], {"BLOCK"})
    cache = {}
    for _ in range(2):
        fast_launch.launch(fn, (1,), (FakeTensor(4096), 7), {"BLOCK": 64}, cache)
    assert [e[0] for e in fn.log] == ["jit", "jit"] and not cache
    assert fast_launch.constexpr_tail(fn, 2, {"BLOCK": 64}) is None


def test_the_cache_is_bounded(gpu_like, monkeypatch):
    monkeypatch.setattr(fast_launch, "CACHE_LIMIT", 3)
    fn, cache = _fn(), {}
    for n in range(5):
        fast_launch.launch(fn, (1,), (FakeTensor(4096), FakeDescriptor(FakeTensor(8192)), n, 0.5), {"BLOCK": 64},
                           cache)
    assert 1 <= len(cache) <= 3


def test_real_tensors_and_descriptors_key_by_what_triton_specializes_on():
    t = torch.empty(64, dtype=torch.float16)
    assert fast_launch._arg_key(t) == ("ptr", torch.float16, t.data_ptr() % 16 == 0)
    assert fast_launch._arg_key(t[1:]) == ("ptr", torch.float16, False)  # 2 bytes past an aligned base
    assert fast_launch._arg_key(True) != fast_launch._arg_key(1)
    assert fast_launch._arg_key(3.0) != fast_launch._arg_key(3)


def test_scalars_share_a_key_exactly_when_triton_specializes_them_alike():
    """Sequence lengths, a varlen batch's sizes and the softmax scale change from call to call:
    they must keep the compiled kernel when Triton would, and never when it would compile
    another (1 is a constant to Triton, multiples of 16 are marked divisible, and 32-bit,
    64-bit and unsigned 64-bit integers are different argument types)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = [0, 1, 2, 3, 15, 16, 17, 32, 4096, 4097, -1, -16, 2**31 - 1, 2**31, 2**31 + 1, 2**40, 2**63,
              0.0, 0.5, 1.0, -2.5, True, False]
    for a in values:
        for b in values:
            same_key = fast_launch._arg_key(a) == fast_launch._arg_key(b)
            same_kernel = (type(a) is type(b)
                           and native_specialize_impl(BaseBackend, a, False, True, True)
                           == native_specialize_impl(BaseBackend, b, False, True, True))
            assert same_key == same_kernel, (a, b)
    assert fast_launch._arg_key(5) == fast_launch._arg_key(7)  # both plain i32: one kernel
    assert fast_launch._arg_key(0.25) == fast_launch._arg_key(0.5)  # floats are fp32 arguments


@pytest.mark.interpreter
def test_launch_py_passes_every_kernel_its_arguments_then_its_constexprs(monkeypatch):
    """Each launch launch.py makes (forward; backward with the preprocess, and with the
    DELTA_ONLY pass) gives fast_launch the kernel's non-constexpr parameters positionally and
    its constexprs in meta, so the compiled launcher can be called again. A mismatch would
    leave every call silently on Triton's slow path. The calls run under the interpreter; the
    counts are checked against the compiled kernels' parameters in a process without it."""
    import json
    import os
    import subprocess
    import sys

    import fa2dispatch

    seen = {}
    real = fast_launch.launch

    def record(fn, grid, args, meta, kernels):
        name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
        seen.setdefault(name, (len(args), sorted(k for k in meta if k not in ("num_warps", "num_stages",
                                                                              "maxnreg", "num_ctas"))))
        return real(fn, grid, args, meta, kernels)

    monkeypatch.setattr(fast_launch, "launch", record)
    g = torch.Generator().manual_seed(0)
    for mkv in (256, 16):  # 16 keys: rows see one key block, so delta comes from the DELTA_ONLY pass
        q = torch.randn(1, 2, 32, 16, generator=g).half().requires_grad_()
        k, v = (torch.randn(1, 2, mkv, 16, generator=g).half().requires_grad_() for _ in range(2))
        fa2dispatch.attention(q, k, v, layout="bhsd", backend="triton").float().sum().backward()
    assert set(seen) == {"attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "attn_bwd_preprocess"}, sorted(seen)
    code = (
        "import json, sys\n"
        "from fa2dispatch.backends.triton_fa2 import fast_launch, kernels\n"
        "for name, (n, meta) in json.loads(sys.argv[1]).items():\n"
        "    fn = getattr(kernels, name)\n"
        "    assert n == sum(not p.is_constexpr for p in fn.params), (name, n)\n"
        "    assert fast_launch.constexpr_tail(fn, n, dict.fromkeys(meta, 0)) is not None, name\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(seen)], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
