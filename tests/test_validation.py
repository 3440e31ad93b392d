"""Every invalid call to ``attention`` and ``explain`` raises ValueError/TypeError naming the
argument (with its shape, dtype or device where one is involved) before any kernel launches.

Every backend's forward/backward is replaced by one that fails the test, so a validation error
that came too late (after dispatch, inside a launcher) shows up as "kernel launched".
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fa2dispatch
from fa2dispatch import dispatch

# A valid GQA problem that every bad case below changes in one place: B=2, H=4, Hkv=2,
# Mq=5, Mkv=7, D=16, float16 on CPU.
B, H, HKV, MQ, MKV, D = 2, 4, 2, 5, 7, 16


pytestmark = pytest.mark.usefixtures("no_kernel_launch")


def _shape(layout: str, b: int, heads: int, m: int, d: int) -> tuple[int, ...]:
    return (b, m, heads, d) if layout == "bshd" else (b, heads, m, d)


def _tensor(shape, dtype=torch.float16, device="cpu", seed=0) -> torch.Tensor:
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    g = torch.Generator().manual_seed(seed)
    if not dtype.is_floating_point:
        return torch.randint(-3, 4, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def _qkv(layout="bshd", *, q=None, k=None, v=None, dtype=torch.float16):
    """The valid inputs, with any of q, k, v replaced (a shape tuple or a ready object)."""
    kv = _shape(layout, B, HKV, MKV, D)
    shapes = {"q": _shape(layout, B, H, MQ, D), "k": kv, "v": kv}
    out = []
    for seed, (name, given) in enumerate((("q", q), ("k", k), ("v", v))):
        if given is None:
            out.append(_tensor(shapes[name], dtype, seed=seed))
        elif isinstance(given, tuple):
            out.append(_tensor(given, dtype, seed=seed))
        else:
            out.append(given)
    return tuple(out)


def _names(name: str, t: torch.Tensor) -> str:
    """Pattern for an argument named with its shape, dtype and device."""
    return re.escape(f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})")


def _case(case_id, exc, pattern, inputs, **kwargs):
    return pytest.param(inputs, kwargs, exc, pattern, id=case_id)


def _rank_cases():
    cases = []
    for layout in ("bshd", "bhsd"):
        expected = "(B, M, H, D)" if layout == "bshd" else "(B, H, M, D)"
        for name, shape in (("q", (B, MQ, H)), ("k", (B, 1, MKV, HKV, D)), ("v", (MKV, D))):
            inputs = _qkv(layout, **{name: shape})
            t = inputs["qkv".index(name)]
            pattern = _names(name, t) + re.escape(f": expected a 4-d tensor {expected} for layout='{layout}'")
            cases.append(_case(f"rank-{name}-{t.dim()}d-{layout}", ValueError, pattern, inputs, layout=layout))
    return cases


def _shape_cases():
    cases = []
    q, k, v = _qkv(k=(B + 1, MKV, HKV, D))
    cases.append(_case("batch-k", ValueError, "batch sizes differ: .*" + _names("k", k), (q, k, v)))
    q, k, v = _qkv("bhsd", v=(B + 1, HKV, MKV, D))
    cases.append(_case("batch-v-bhsd", ValueError, "batch sizes differ: .*" + _names("v", v), (q, k, v),
                       layout="bhsd"))
    for name in ("k", "v"):
        q, k, v = inputs = _qkv(**{name: (B, MKV, HKV, D + 8)})
        t = k if name == "k" else v
        cases.append(_case(f"head-dim-q-vs-{name}", ValueError, "head dims differ: .*" + _names(name, t), inputs))
    q, k, v = inputs = _qkv(v=(B, MKV, HKV * 2, D))
    cases.append(_case("kv-heads-differ", ValueError, "k and v must agree in heads and length: .*" + _names("v", v),
                       inputs))
    q, k, v = inputs = _qkv(v=(B, MKV + 1, HKV, D))
    cases.append(_case("kv-length-differ", ValueError, "k and v must agree in heads and length: .*" + _names("v", v),
                       inputs))
    q, k, v = inputs = _qkv(k=(B, MKV, 3, D), v=(B, MKV, 3, D))
    cases.append(_case("H-not-multiple-of-Hkv", ValueError,
                       re.escape(f"H={H} (") + _names("q", q) + r".*multiple of .*Hkv=3 \(" + _names("k", k), inputs))
    for d in (4, 12, 264):
        inputs = _qkv(q=(B, MQ, H, d), k=(B, MKV, HKV, d), v=(B, MKV, HKV, d))
        pattern = f"head dim D={d} of " + _names("q", inputs[0]) + re.escape(" is not supported (supported: 8..256")
        cases.append(_case(f"head-dim-{d}", ValueError, pattern, inputs))
    zero = {
        "D0": dict(q=(B, MQ, H, 0), k=(B, MKV, HKV, 0), v=(B, MKV, HKV, 0)),
        "B0": dict(q=(0, MQ, H, D), k=(0, MKV, HKV, D), v=(0, MKV, HKV, D)),
        "Mq0": dict(q=(B, 0, H, D)),
        "Mkv0": dict(k=(B, 0, HKV, D), v=(B, 0, HKV, D)),
    }
    for case_id, shapes in zero.items():
        inputs = _qkv(**shapes)
        name = "k" if case_id == "Mkv0" else "q"
        cases.append(_case(f"zero-size-{case_id}", ValueError,
                           _names(name, inputs["qkv".index(name)]) + ": every dimension must be >= 1", inputs))
    return cases


def _tensor_cases():
    cases = [
        _case("q-list", TypeError, "q must be a torch.Tensor, got list", _qkv(q=[[0.0] * D])),
        _case("k-ndarray", TypeError, "k must be a torch.Tensor, got ndarray", _qkv(k=np.zeros((B, MKV, HKV, D)))),
        _case("v-None", TypeError, "v must be a torch.Tensor, got NoneType", (*_qkv()[:2], None)),
    ]
    for name in ("k", "v"):
        inputs = _qkv(**{name: _tensor((B, MKV, HKV, D), device="meta")})
        t = inputs["qkv".index(name)]
        cases.append(_case(f"device-{name}-meta", ValueError, _names(name, t) + ": device differs from q's cpu",
                           inputs))
    inputs = _qkv(q=_tensor((B, MQ, H, D), device="meta"))
    cases.append(_case("device-q-meta", ValueError, _names("k", inputs[1]) + ": device differs from q's meta", inputs))
    for name, dtype in (("k", torch.float32), ("v", torch.bfloat16)):
        inputs = _qkv(**{name: _tensor((B, MKV, HKV, D), dtype)})
        t = inputs["qkv".index(name)]
        cases.append(_case(f"dtype-{name}-{str(dtype)[6:]}-q-float16", TypeError,
                           _names(name, t) + ": dtype differs from q's torch.float16", inputs))
    for dtype in (torch.float64, torch.int32):
        inputs = _qkv(dtype=dtype)
        supported = re.escape(": dtype not supported (supported: float16, bfloat16, float32, float8_e4m3fn)")
        cases.append(_case(f"dtype-{str(dtype)[6:]}", TypeError, _names("q", inputs[0]) + supported, inputs))
    return cases


def _argument_cases():
    qkv = _qkv()
    cases = []
    for scale in (float("nan"), float("inf"), float("-inf")):
        cases.append(_case(f"scale-{scale}", ValueError, re.escape(f"softmax_scale={scale!r} must be finite"), qkv,
                           softmax_scale=scale))
    for scale in ("0.1", True, torch.tensor(0.1)):
        cases.append(_case(f"scale-{type(scale).__name__}", TypeError,
                           f"softmax_scale must be a float or None, got {type(scale).__name__}", qkv,
                           softmax_scale=scale))
    for layout in ("BSHD", "sbhd", None):
        cases.append(_case(f"layout-{layout}", ValueError, re.escape(f"layout={layout!r} is not supported"), qkv,
                           layout=layout))
    for backend in ("flash", "", None):
        cases.append(_case(f"backend-{backend!r}", ValueError,
                           re.escape(f"backend={backend!r} is not known (known: 'auto', 'triton', 'cupy', "
                                     "'triton-fp8', 'torch-sdpa-cudnn', 'torch-sdpa-flash', 'torch-sdpa-efficient', "
                                     "'reference')"),
                           qkv, backend=backend))
    for causal in (1, "yes", None):
        cases.append(_case(f"causal-{type(causal).__name__}", TypeError,
                           f"causal must be a bool, got {type(causal).__name__}", qkv, causal=causal))
    for return_lse in (1, None):
        cases.append(_case(f"return_lse-{type(return_lse).__name__}", TypeError,
                           f"return_lse must be a bool, got {type(return_lse).__name__}", qkv, return_lse=return_lse))
    return cases


CASES = _tensor_cases() + _rank_cases() + _shape_cases() + _argument_cases()

ENTRY_POINTS = [
    pytest.param(fa2dispatch.attention, id="attention"),
    pytest.param(fa2dispatch.explain, id="explain"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("inputs, kwargs, exc, pattern", CASES)
def test_invalid_call_raises_naming_the_argument(entry, inputs, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        entry(*inputs, **kwargs)


def test_every_backend_is_blocked_from_computing():
    """The fixture is in force: a valid call reaches a backend and fails, so the cases above
    that raise a validation error raised it before any kernel."""
    with pytest.raises(AssertionError, match="kernel launched"):
        fa2dispatch.attention(*_qkv())
    with pytest.raises(AssertionError, match="kernel launched"):
        fa2dispatch.attention(*_qkv(), backend="reference")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("value", ["flash", "Reference"])
def test_unknown_backend_in_environment(monkeypatch, entry, value):
    monkeypatch.setenv(dispatch.ENV_BACKEND, value)
    dispatch.clear_memo()
    with pytest.raises(ValueError, match=re.escape(f"FA2DISPATCH_BACKEND={value!r} is not known")):
        entry(*_qkv())


@pytest.mark.parametrize("name", ["flash", None])
def test_use_backend_rejects_unknown_name(name):
    with pytest.raises(ValueError, match=re.escape(f"backend={name!r} is not known")):
        with fa2dispatch.use_backend(name):
            pytest.fail("entered a use_backend block with an unknown backend")
