"""Launching a compiled Triton or Gluon kernel again without ``JITFunction.run``'s per-call work.

``fn[grid](*args, **meta)`` re-derives the specialization of every argument, builds the kernel
cache key, and makes launch metadata on every call. For a forward of 38 arguments that is most
of the call's host time: an ``attention_varlen`` call through the Gluon forward spent 170-270 us
on the host against ~80 us for the dense cuDNN call. See BENCHMARKS.md, "Session 10", and
``tools/bench_varlen.py --profile``. With L2 flushed before each timed run, host time beyond the
flush (~90 us) is timed as idle GPU.

``launch`` calls ``fn[grid]`` the first time, and keeps the compiled kernel under a key of
everything that selects it:
- the kernel's name and the current device;
- each argument as Triton specializes on it, or finer: scalars by Python type and Triton's own
  specialization (``_specialize``); tensors by dtype and 16-byte alignment; tensor descriptors
  by their base's dtype and alignment, block shape, shared-memory layout and padding (a
  descriptor's block shape is part of the compiled kernel's signature: two calls that differ
  only there run different kernels);
- the constexprs and options in ``meta``.

Later calls with the same key go straight to the compiled kernel's launcher, as
``JITFunction.run`` itself ends. Descriptors still become TMA descriptors in that launcher on
every call.

Not taken:
- while a Triton launch hook is set (profilers): Triton's own path, which calls the hooks (Triton
  3.6's hooks are a ``HookChain``, never None: empty means unset);
- off the GPU (the interpreter);
- when a kernel's constexpr parameters do not all follow its other parameters.

``FA2DISPATCH_FAST_LAUNCH=0`` (or the older ``FA2DISPATCH_DECODE_FAST_LAUNCH=0``) turns it off.
A launcher that refuses the arguments turns it off for the process (one warning naming the
error, kept in ``REFUSED``), and that call goes through Triton.
"""

from __future__ import annotations

import inspect
import os
import warnings

import triton
from triton import knobs

FAST_LAUNCH = (os.environ.get("FA2DISPATCH_FAST_LAUNCH", "1") != "0"
               and os.environ.get("FA2DISPATCH_DECODE_FAST_LAUNCH", "1") != "0")
CACHE_LIMIT = 1024  # compiled kernels kept per cache dict; cleared when full
REFUSED: str | None = None  # why the fast path was turned off for this process, if it was


def constexpr_tail(fn, n_args: int, meta: dict) -> tuple | None:
    """The values of fn's constexpr parameters, in order, when they all follow its first n_args
    parameters (as Triton's launcher receives them); None otherwise (no fast path)."""
    params = fn.params
    if any(p.is_constexpr for p in params[:n_args]) or not all(p.is_constexpr for p in params[n_args:]):
        return None
    tail = []
    for p in params[n_args:]:
        if p.name in meta:
            tail.append(meta[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


def disable(why: str | None = None) -> None:
    global FAST_LAUNCH, REFUSED
    FAST_LAUNCH = False
    if why is not None:
        REFUSED = why
        warnings.warn(f"fa2dispatch: a compiled kernel's launcher refused its arguments ({why}); "
                      "kernels launch through Triton from now on", RuntimeWarning, stacklevel=3)


def _arg_key(x):
    """What of an argument can select another compiled kernel (see the module docstring)."""
    ptr = getattr(x, "data_ptr", None)
    if ptr is not None:
        return ("ptr", x.dtype, ptr() % 16 == 0)
    base = getattr(x, "base", None)  # a tensor descriptor (triton.tools / gluon TensorDescriptor)
    if base is not None and hasattr(base, "data_ptr"):
        return ("desc", base.dtype, base.data_ptr() % 16 == 0, tuple(x.block_shape), getattr(x, "layout", None),
                getattr(x, "padding", None))
    return (type(x), _specialize(x))


def _specialize(x):
    """How Triton specializes a scalar argument: an int as i32/i64/u64 by its range, ``1`` as a
    constant, divisibility by 16 as an attribute; every float as fp32; a bool as u1. Keying by
    this instead of the value lets calls whose sizes change (a new sequence length, a varlen
    batch's total and longest sequence, another softmax scale) keep the compiled kernel that
    Triton itself would pick. Without Triton's native helper: the value itself (finer, so never
    a wrong kernel)."""
    if _NATIVE is None:
        return x
    try:
        return _NATIVE(_BACKEND, x, False, True, True)
    except Exception:  # noqa: BLE001 - an argument the helper does not know: key by value
        return x


try:  # Triton 3.4+: the C++ specialization JITFunction.run itself uses
    from triton._C.libtriton import native_specialize_impl as _NATIVE
    from triton.backends.compiler import BaseBackend as _BACKEND
except ImportError:  # pragma: no cover - older Triton
    _NATIVE = _BACKEND = None


def _device_and_stream() -> tuple:
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    return device, driver.get_current_stream(device)


def _hooked() -> bool:
    """A launch hook is set (a profiler's). Triton 3.6 keeps the hooks in a ``HookChain`` that is
    never None (empty: no ``calls``); older releases keep None or one callable."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _on_gpu(x) -> bool:
    """A CUDA tensor, or a descriptor over one. (A tensor's own ``base`` is None unless it is a
    view: read ``is_cuda`` before looking for a descriptor's base.)"""
    on = getattr(x, "is_cuda", None)
    if on is None:
        on = getattr(getattr(x, "base", None), "is_cuda", False)
    return bool(on)


def launch(fn, grid: tuple, args: tuple, meta: dict, kernels: dict) -> None:
    """``fn[grid](*args, **meta)``, through the compiled kernel's own launcher once a call with
    the same key has compiled it. ``kernels``: the caller's dict of compiled kernels (one per
    kernel family, or per launch spec); bounded by CACHE_LIMIT."""
    if not (FAST_LAUNCH and _on_gpu(args[0]) and not _hooked()):
        fn[grid](*args, **meta)
        return
    device, stream = _device_and_stream()
    key = (fn.fn.__name__, device, tuple(_arg_key(a) for a in args), tuple(meta.items()))
    found = kernels.get(key)
    if found is not None:
        kernel, tail = found
        try:
            kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                       kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
            return
        except Exception as exc:  # noqa: BLE001 - the launcher refused the arguments (nothing launched):
            disable(f"{type(exc).__name__}: {exc}")  # Triton's own path from now on
    kernel = fn[grid](*args, **meta)
    tail = constexpr_tail(fn, len(args), meta)
    if tail is not None and hasattr(kernel, "run") and hasattr(kernel, "packed_metadata"):
        if len(kernels) >= CACHE_LIMIT:
            kernels.clear()
        kernels[key] = (kernel, tail)
