"""Test-harness workarounds for defects of Triton's CPU interpreter (not of our kernels).

- triton#11584: the interpreter keeps bf16 as uint16 and ``tl.dot`` multiplies the raw bits.
  Fixed here as the issue proposes: widen bf16 operands to float32 before ``np.matmul``.
- triton#8322: fp32 -> bf16 casts truncate. Fixed here by rounding to nearest even, which is
  what the GPU's ``cvt.rn.bf16.f32`` does.
- triton#8322 (fp8 side; fixed upstream by triton#11897): downcasts to fp8 e4m3 round ties away
  from zero, drop the carry into the exponent and round subnormals twice. Fixed here by casting
  with torch's correctly rounding ``.to(torch.float8_e4m3fn)`` after saturating to +-448, which
  is what the GPU's ``cvt.rn.satfinite.e4m3x2.f32`` does (NaN stays NaN).

Applied by tests/conftest.py only, so the library itself still detects an unpatched
interpreter (``backends/triton_fa2/interpreter.py``) and refuses bf16 there with the reason.
"""

from __future__ import annotations

import numpy as np
import torch


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):  # keep NaN a (quiet) NaN instead of rounding its payload into infinity
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def _f32_to_e4m3_bits(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


_originals: dict = {}


def install() -> None:
    """Patch the interpreter's builder in place; idempotent."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if _originals:
        return
    _originals["create_dot"] = builder.create_dot
    _originals["cast_impl"] = builder.cast_impl
    _originals["create_fp_to_fp"] = builder.create_fp_to_fp

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a_data = _bf16_bits_to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
            b_data = _bf16_bits_to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
            return interpreter.TensorHandle(np.matmul(a_data, b_data, dtype=d.data.dtype) + d.data, d.dtype.scalar)
        return _originals["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16_bits(src.data), dst_type.scalar)
        return _originals["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar in (tl.float32, tl.float16, tl.bfloat16):
            if src.dtype.scalar == tl.bfloat16:
                data = _bf16_bits_to_f32(src.data)
            else:
                data = src.data.astype(np.float32)  # float16 -> float32 is exact
            return interpreter.TensorHandle(_f32_to_e4m3_bits(data), dst_type.scalar)
        return _originals["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp


def uninstall() -> None:
    from triton.runtime import interpreter

    for name, fn in _originals.items():
        setattr(interpreter.InterpreterBuilder, name, fn)
    _originals.clear()
