"""Shared test helpers: inputs, ground truth, and the STYLE.md tolerance rule.

Ground truth is ``attention_math`` in float64. The bound for our error is what PyTorch's own
math gets in the input precision (``attention_math`` run in that dtype), against the same
truth:  max|ours - truth| <= 2 * max|torch_lowprec - truth| + floor,
where floor = 8 float32 ulps of the largest quantity the call produces (out, dq, dk, dv).
Our kernels accumulate in float32 along another path than PyTorch (exp2 with the scale folded
in, dS = P * (dP - delta) with delta from the stored output), so where PyTorch's float32 math
is exact by structure (one key: dq is exactly 0 there, by cancellation) a few float32
roundings of the quantities being cancelled still separate us from float64 (measured: dq
error 1.31e-6 at Mkv=1, D=136, largest quantity 2.7, i.e. 4.1 ulps; 8 keeps a 2x margin).
The floor is ~1e-6 at unit scale: far below any 16-bit error or what a wrong kernel gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fa2dispatch.backends.reference import attention_math

from fa2dispatch.autotune.verify import within_tolerance


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    Hkv: int
    Mq: int
    Mkv: int
    D: int
    dtype: torch.dtype
    causal: bool
    layout: str = "bshd"
    contiguous: bool = True

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        kind = "mha" if self.H == self.Hkv else ("mqa" if self.Hkv == 1 else "gqa")
        return (f"{dt}-{'causal' if self.causal else 'full'}-{self.layout}-B{self.B}H{self.H}{kind}"
                f"-q{self.Mq}k{self.Mkv}-d{self.D}{'' if self.contiguous else '-strided'}")


def make_inputs(case: Case, device="cpu", seed=0, requires_grad=True):
    """q, k, v, dout in the case's layout; non-contiguous views when case.contiguous is False."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def make(heads, m):
        shape = (case.B, m, heads, case.D) if case.layout == "bshd" else (case.B, heads, m, case.D)
        if case.contiguous:
            t = torch.randn(shape, generator=g)
        else:  # heads/seq swapped in memory; every other element of the last dim unless .to() copies
            wide = torch.randn(shape[0], shape[2], shape[1], 2 * shape[3], generator=g)
            t = wide.transpose(1, 2)[..., ::2]
        return t.to(device=device, dtype=case.dtype)

    q, k, v = make(case.H, case.Mq), make(case.Hkv, case.Mkv), make(case.Hkv, case.Mkv)
    dout = make(case.H, case.Mq)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, dout


def math_with_grads(q, k, v, dout, case: Case, compute_dtype, scale=None):
    """attention_math in compute_dtype: (out, lse, dq, dk, dv), gradients for dout."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention_math(*leaves, causal=case.causal, softmax_scale=scale if scale is not None else case.D**-0.5,
                              layout=case.layout, compute_dtype=compute_dtype)
    grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype))
    return (out, lse, *grads)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_close(name: str, ours: torch.Tensor, truth: torch.Tensor, lowprec: torch.Tensor,
                magnitude: float | None = None) -> None:
    """The STYLE.md rule (fa2dispatch.autotune.verify.within_tolerance, which the autotuner
    applies to its winners too); NaN anywhere in ours fails. ``magnitude``: the largest
    quantity of the call (default: this tensor's own)."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in output"
    ok, err, bound = within_tolerance(ours, truth, lowprec, magnitude)
    assert ok, f"{name}: max error {err:.3e} > 2 x PyTorch's error + floor = {bound:.3e}"


def max_magnitude(*tensors: torch.Tensor) -> float:
    return max(t.abs().max().item() for t in tensors)


def check_lse(ours: torch.Tensor, truth: torch.Tensor, lowprec: torch.Tensor) -> None:
    empty = torch.isneginf(truth)
    assert torch.equal(torch.isneginf(ours), empty), "lse: -inf rows (no visible key) differ from the reference"
    keep = ~empty
    check_close("lse", ours[keep], truth[keep], lowprec.float()[keep])


def check_case(case: Case, device="cpu", seed=0, backend="triton"):
    """Forward (out, lse) and backward (dq, dk, dv) of fa2dispatch against float64 truth."""
    from fa2dispatch.backends import BACKENDS

    import fa2dispatch

    q, k, v, dout = make_inputs(case, device, seed)
    if BACKENDS[backend].supports_lse_grad:
        out, lse = fa2dispatch.attention(q, k, v, causal=case.causal, layout=case.layout, return_lse=True,
                                         backend=backend)
    else:  # lse from a call without gradients; the backward from a call without lse
        with torch.no_grad():
            _, lse = fa2dispatch.attention(q, k, v, causal=case.causal, layout=case.layout, return_lse=True,
                                           backend=backend)
        out = fa2dispatch.attention(q, k, v, causal=case.causal, layout=case.layout, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (case.B, case.H, case.Mq) and lse.dtype == torch.float32
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    truth = math_with_grads(q, k, v, dout, case, torch.float64)
    low = math_with_grads(q, k, v, dout, case, case.dtype)
    magnitude = max_magnitude(truth[0], *truth[2:])
    check_close("out", out, truth[0], low[0], magnitude)
    check_lse(lse, truth[1], low[1])
    for name, ours, t, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), truth[2:], low[2:]):
        check_close(name, ours, t, lp, magnitude)
    return out, lse, dq, dk, dv


# ------------------------------------------------------------------ fp8


def make_fp8_inputs(case: Case, device="cpu", seed=0, q_per_head=False):
    """(q8, k8, v8, q_descale, k_descale, v_descale) from the case's normal inputs, quantized per
    head with fa2dispatch.quantize_fp8; q's descale is (B, H) if ``q_per_head``, else (B, Hkv)
    (one per key/value-head group, FlashAttention-3's convention)."""
    import fa2dispatch

    q, k, v, _ = make_inputs(case, "cpu", seed, requires_grad=False)
    q, k, v = (t.float() for t in (q, k, v))
    if not q_per_head and case.H != case.Hkv:  # one scale per group of query heads
        qh = q.transpose(1, 2) if case.layout == "bshd" else q  # (B, H, M, D)
        amax = qh.unflatten(1, (case.Hkv, case.H // case.Hkv)).abs().amax(dim=(2, 3, 4))
        qd = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        q8 = (qh / qd.repeat_interleave(case.H // case.Hkv, dim=1)[:, :, None, None]).clamp(-448, 448)
        q8 = q8.to(torch.float8_e4m3fn)
        q8 = q8.transpose(1, 2).contiguous() if case.layout == "bshd" else q8
    else:
        q8, qd = fa2dispatch.quantize_fp8(q, layout=case.layout)
    (k8, kd), (v8, vd) = (fa2dispatch.quantize_fp8(t, layout=case.layout) for t in (k, v))
    return tuple(t.to(device) for t in (q8, k8, v8, qd, kd, vd))


def check_fp8(out, lse, q8, k8, v8, qd, kd, vd, *, causal: bool, layout: str = "bshd",
              out_dtype=torch.bfloat16, softmax_scale=None):
    """STYLE.md's rule for fp8: truth is float64 attention on the dequantized inputs; PyTorch's
    own error is that of the same fp8 pipeline emulated with torch's casts
    (backends.reference.attention_fp8_emulation)."""
    from fa2dispatch.backends.reference import attention_fp8_emulation, dequantize_fp8

    scale = softmax_scale if softmax_scale is not None else q8.shape[-1] ** -0.5
    assert out.dtype == out_dtype and out.shape == q8.shape
    truth, truth_lse = attention_math(*(dequantize_fp8(x, d, layout) for x, d in ((q8, qd), (k8, kd), (v8, vd))),
                                      causal=causal, softmax_scale=scale, layout=layout, compute_dtype=torch.float64)
    emu, emu_lse = attention_fp8_emulation(q8, k8, v8, qd, kd, vd, causal=causal, softmax_scale=scale,
                                           layout=layout, out_dtype=out_dtype)
    check_close("out", out.cpu(), truth.cpu(), emu.cpu())
    if lse is not None:
        check_lse(lse.cpu(), truth_lse.cpu(), emu_lse.cpu())


def check_fp8_on_the_fly(out, q, k, v, *, causal: bool, use_hadamard: bool, layout: str = "bshd"):
    """``attention(q, k, v, fp8=True, hadamard=...)`` against the exact answer on the original
    inputs: its RMS error may be at most the quantization's own (exact attention on the
    dequantized inputs) plus twice the pipeline's (the emulation against that), by the triangle
    inequality with a 2x margin on the pipeline part. A rotation applied to q but not k, or a
    scale on the wrong head, gives errors of the size of the output itself."""
    from fa2dispatch.backends.reference import attention_fp8_emulation, dequantize_fp8

    import fa2dispatch

    scale = q.shape[-1] ** -0.5
    qr, kr = (fa2dispatch.hadamard(q), fa2dispatch.hadamard(k)) if use_hadamard else (q, k)
    (q8, qd), (k8, kd), (v8, vd) = (fa2dispatch.quantize_fp8(t, layout=layout) for t in (qr, kr, v))
    check_fp8(out, None, q8, k8, v8, qd, kd, vd, causal=causal, layout=layout, out_dtype=q.dtype)
    exact, _ = attention_math(q, k, v, causal=causal, softmax_scale=scale, layout=layout, compute_dtype=torch.float64)
    deq, _ = attention_math(*(dequantize_fp8(x, d, layout) for x, d in ((q8, qd), (k8, kd), (v8, vd))),
                            causal=causal, softmax_scale=scale, layout=layout, compute_dtype=torch.float64)
    emu, _ = attention_fp8_emulation(q8, k8, v8, qd, kd, vd, causal=causal, softmax_scale=scale, layout=layout,
                                     out_dtype=q.dtype)

    def rms(a, b):
        return (a.double() - b.double()).pow(2).mean().sqrt().item()

    bound = rms(deq, exact) + 2 * rms(emu, deq)
    assert rms(out, exact) <= bound, f"fp8=True: RMS error {rms(out, exact):.3e} > {bound:.3e}"


# ------------------------------------------------------------------ FlashAttention-2 features


def feature_math(q, k, v, dout, case: Case, compute_dtype, features: dict, keep=None):
    """``attention_math`` with FlashAttention-2's features in compute_dtype: (out, lse, dq, dk, dv).
    ``keep``: the dropout mask (fa2dispatch.rng.attention_dropout_mask of the call's seed)."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    kw = dict(features)
    kw.pop("generator", None)
    if "window_size" in kw:
        kw["window"] = tuple(kw.pop("window_size"))
    out, lse = attention_math(*leaves, causal=case.causal, softmax_scale=case.D**-0.5, layout=case.layout,
                              compute_dtype=compute_dtype, dropout_keep=keep, **kw)
    grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype))
    return (out, lse, *grads)


def check_feature_case(case: Case, features: dict, device="cpu", seed=0, backend="triton"):
    """``check_case`` with feature keywords (window_size, softcap, alibi_slopes, dropout_p,
    causal_alignment): forward and backward against float64 truth under the STYLE.md rule.
    A dropout call draws its RNG state from a generator seeded with ``seed``; the reference
    rebuilds the same mask from the same draw (fa2dispatch.rng)."""
    import fa2dispatch
    from fa2dispatch import rng

    q, k, v, dout = make_inputs(case, device, seed)
    features = dict(features)
    keep = None
    if features.get("dropout_p"):
        features["generator"] = torch.Generator().manual_seed(seed + 1000)
        rseed, roffset = rng.draw_seed(torch.Generator().manual_seed(seed + 1000))
        keep = rng.attention_dropout_mask(rseed, roffset, case.B, case.H, case.Mq, case.Mkv, features["dropout_p"],
                                          device)
    out, lse = fa2dispatch.attention(q, k, v, causal=case.causal, layout=case.layout, return_lse=True,
                                     backend=backend, **features)
    assert out.shape == q.shape and out.dtype == q.dtype
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    truth = feature_math(q, k, v, dout, case, torch.float64, features, keep)
    low = feature_math(q, k, v, dout, case, case.dtype, features, keep)
    magnitude = max_magnitude(truth[0], *truth[2:])
    check_close("out", out, truth[0], low[0], magnitude)
    check_lse(lse, truth[1], low[1])
    for name, ours, t, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), truth[2:], low[2:]):
        check_close(name, ours, t, lp, magnitude)
    return out, lse, dq, dk, dv


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is not a package), registered in sys.modules under
    ``name`` so that dataclasses and pickling inside it resolve."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
