"""The CuPy backend on a real GPU: the same matrix as the Triton backend (fp16/bf16 cases),
NaN-poisoned outputs, a bit-for-bit repeatable backward, and the autotuner timing its configs.
Skipped without a CUDA GPU, and with the backend's own reasons where cupy/NVRTC are missing."""

from __future__ import annotations

import pytest
import torch
from fa2dispatch.backends import BACKENDS
from helpers import Case, check_case, check_close, check_lse, make_inputs, math_with_grads, max_magnitude
from test_gpu import MATRIX

import fa2dispatch
from fa2dispatch.hardware import device_info
from fa2dispatch.problem import AttentionProblem

pytestmark = pytest.mark.gpu

CASES = [c for c in MATRIX if c.dtype in (torch.float16, torch.bfloat16)]
# Head dims the shared matrix does not reach: the smallest, and padded ones on both sides of 128.
CASES += [Case(2, 3, 3, 77, 130, 8, torch.float16, True),
          Case(1, 4, 2, 129, 65, 72, torch.bfloat16, True, "bhsd"),
          Case(1, 2, 1, 200, 200, 248, torch.float16, False),
          # padded head dim 112 has its own defaults (config.py: ptxas spilled with the D=128 ones)
          Case(2, 4, 2, 300, 257, 104, torch.bfloat16, True),
          Case(1, 3, 3, 190, 190, 112, torch.float16, False, "bhsd")]


@pytest.fixture(scope="module", autouse=True)
def cupy_usable():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reasons = BACKENDS["cupy"].available(device_info(torch.device("cuda")))
    if reasons:
        pytest.skip(f"cupy backend unavailable: {'; '.join(reasons)}")
    _precompile()


def _precompile():
    """Compile every module the matrix needs up front, several at a time (NVRTC runs without
    the GIL), so the cases measure kernels, not compilation."""
    from concurrent.futures import ThreadPoolExecutor

    from fa2dispatch.backends.cupy_cuda.compile import backward_specs, forward_spec, function
    from fa2dispatch.backends.cupy_cuda.config import default_config

    device = device_info(torch.device("cuda"))
    specs = {}
    for c in CASES:
        cfg = default_config(c.D, device)
        for spec in (forward_spec(c.dtype, c.D, c.causal, cfg), *backward_specs(c.dtype, c.D, c.causal, cfg).values()):
            specs.setdefault((spec.file, spec.options()), spec)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: function(s, device.index or 0), specs.values()))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_backward_matches_reference(case, nan_poison):
    """Outputs are NaN-poisoned before the kernels run; check_case fails on any NaN left."""
    check_case(case, device="cuda", seed=1, backend="cupy")


@pytest.mark.parametrize("D", [64, 128, 200])
def test_every_tuner_candidate_matches_reference(D, nan_poison):
    """Each config the autotuner may pick (forward and backward spaces), not only the default,
    computes the same attention: causal, GQA, ragged lengths on both sides of the blocks."""
    case = Case(1, 4, 2, 333, 517, D, torch.bfloat16, causal=True)
    q, k, v, dout = make_inputs(case, device="cuda", seed=7, requires_grad=False)
    truth = math_with_grads(q, k, v, dout, case, torch.float64)
    low = math_with_grads(q, k, v, dout, case, case.dtype)
    magnitude = max_magnitude(truth[0], *truth[2:])
    backend, device = BACKENDS["cupy"], device_info(torch.device("cuda"))
    for grad in (False, True):
        problem = AttentionProblem(case.B, case.H, case.Hkv, case.Mq, case.Mkv, D, case.dtype, q.device, case.layout,
                                   True, D**-0.5, requires_grad=grad)
        configs = backend.config_space(problem, device)
        assert len(configs) >= 2
        for cfg in configs:
            out, lse = backend.forward(problem, q, k, v, cfg)
            check_close(f"out [{cfg.short()}]", out, truth[0], low[0], magnitude)
            if grad:
                grads = backend.backward(problem, dout, q, k, v, out, lse, cfg)
                for name, ours, t, lp in zip(("dq", "dk", "dv"), grads, truth[2:], low[2:]):
                    check_close(f"{name} [{cfg.short()}]", ours, t, lp, magnitude)


WGMMA_CASES = [Case(2, 6, 2, 700, 300, 128, torch.float16, True, "bhsd"),  # Mq > Mkv: rows see no key
               Case(1, 4, 2, 333, 517, 128, torch.bfloat16, True),  # ragged on both sides, GQA
               Case(2, 4, 1, 129, 1100, 64, torch.float16, True, "bhsd"),  # MQA, few rows, long keys
               Case(1, 8, 8, 1000, 1000, 64, torch.bfloat16, False),
               Case(2, 4, 4, 255, 77, 128, torch.float16, False, "bhsd"),  # fewer keys than one block
               Case(1, 4, 2, 512, 640, 128, torch.bfloat16, False)]  # whole blocks


@pytest.mark.parametrize("case", WGMMA_CASES, ids=[c.id for c in WGMMA_CASES])
def test_wgmma_forward_every_config_matches_reference(case, nan_poison):
    """The sm_90 forward (fwd_kernel="wgmma", fa2_fwd_sm90.cu) at every tile shape and ring
    depth it accepts: out against float64 with the tolerance of the same math in the input
    precision, lse likewise, rows with no visible key (out 0, lse -inf), ragged blocks, GQA/MQA,
    both layouts. Outputs are NaN-poisoned before the kernel runs."""
    from dataclasses import replace

    from fa2dispatch.backends.cupy_cuda.config import default_config

    backend, device = BACKENDS["cupy"], device_info(torch.device("cuda"))
    if device.capability != (9, 0):
        pytest.skip(f"the wgmma forward is sm_90 code (this GPU: {device.arch})")
    q, k, v, dout = make_inputs(case, device="cuda", seed=21, requires_grad=False)
    truth = math_with_grads(q, k, v, dout, case, torch.float64)
    low = math_with_grads(q, k, v, dout, case, case.dtype)
    magnitude = max_magnitude(truth[0])
    problem = AttentionProblem(case.B, case.H, case.Hkv, case.Mq, case.Mkv, case.D, case.dtype, q.device, case.layout,
                               case.causal, case.D**-0.5)
    base = replace(default_config(case.D, device), fwd_kernel="wgmma")
    ran = 0
    for block_m in (64, 128):
        for block_n in (64, 128):
            for stages in (3, 4):
                cfg = replace(base, block_m=block_m, num_warps=block_m // 16, block_n=block_n, fwd_stages=stages)
                if backend.config_reasons(problem, device, cfg):
                    continue
                out, lse = backend.forward(problem, q, k, v, cfg)
                check_close(f"out [{cfg.short()}]", out, truth[0], low[0], magnitude)
                check_lse(lse, truth[1], low[1])
                ran += 1
    assert ran >= 6, f"only {ran} wgmma configs fit"


@pytest.mark.parametrize("D", [8, 64, 72, 128, 200])
def test_forward_epilogue_through_smem_equals_fragment_stores(D):
    """The forward's O stored through shared memory in 16-byte chunks (o_smem) is bit for bit the
    fragment-store epilogue: ragged row blocks, rows with no visible key (causal, Mq > Mkv),
    head dims that are not a multiple of 16, GQA, both layouts (row strides D and H x D)."""
    from dataclasses import replace

    from fa2dispatch.backends.cupy_cuda.config import default_config

    backend, device = BACKENDS["cupy"], device_info(torch.device("cuda"))
    base = default_config(D, device)
    for causal, mq, mkv, layout in ((True, 700, 300, "bhsd"), (False, 333, 517, "bshd"), (True, 1000, 1000, "bshd")):
        case = Case(2, 6, 2, mq, mkv, D, torch.float16, causal, layout)
        q, k, v, _ = make_inputs(case, device="cuda", seed=11, requires_grad=False)
        problem = AttentionProblem(case.B, case.H, case.Hkv, mq, mkv, D, case.dtype, q.device, layout, causal, D**-0.5)
        outs = [backend.forward(problem, q, k, v, replace(base, o_smem=flag)) for flag in (False, True)]
        assert torch.equal(outs[0][0], outs[1][0]), f"out differs: {case}"
        assert torch.equal(outs[0][1], outs[1][1]), f"lse differs: {case}"


@pytest.mark.parametrize("D", [64, 128])
def test_causal_work_order_and_warp_skip_are_bitwise_the_plain_forward(D):
    """The causal forward's CTA order (head_group: one head, auto, partial last group, all heads)
    and the per-warp skip of key blocks no row of the warp sees (warp_skip bits) change which
    CTA runs when and drop exact zeros only: out and lse equal the plain kernel's bit for bit,
    with Mq > Mkv (rows with no visible key), Mq < Mkv, ragged blocks, GQA, both layouts, and
    both epilogues and warp counts."""
    from dataclasses import replace

    from fa2dispatch.backends.cupy_cuda.config import default_config

    backend, device = BACKENDS["cupy"], device_info(torch.device("cuda"))
    plain = replace(default_config(D, device), head_group=1, warp_skip=0)
    features = [{"head_group": g, "warp_skip": w} for g in (0, 1, 3, 1000) for w in (0, 1, 2, 3)]
    features += [{"head_group": g, "warp_skip": 3, "o_smem": False} for g in (1, 0)]
    # other tiles: compared with the plain kernel of the same tiles (another warp count is
    # another compiled kernel, not promised to round the same)
    tiles = [{}, {"num_warps": 8}, {"block_m": 64}]
    for mq, mkv, layout in ((700, 300, "bhsd"), (333, 517, "bshd"), (1000, 1000, "bshd"), (129, 1100, "bhsd")):
        case = Case(2, 6, 2, mq, mkv, D, torch.bfloat16, True, layout)
        q, k, v, _ = make_inputs(case, device="cuda", seed=5, requires_grad=False)
        problem = AttentionProblem(case.B, case.H, case.Hkv, mq, mkv, D, case.dtype, q.device, layout, True, D**-0.5)
        for tile in tiles:
            base = replace(plain, **tile)
            if backend.config_reasons(problem, device, base):
                continue
            ref = backend.forward(problem, q, k, v, base)
            for kw in features if not tile else [{"head_group": 0, "warp_skip": 3}, {"head_group": 2, "warp_skip": 1}]:
                out, lse = backend.forward(problem, q, k, v, replace(base, **kw))
                diff = (out.float() - ref[0].float()).abs().max().item()
                assert torch.equal(out, ref[0]), f"out differs by up to {diff:.3e}: {case} {tile} {kw}"
                assert torch.equal(lse, ref[1]), f"lse differs: {case} {tile} {kw}"


def test_refuses_nonpositive_softmax_scale_and_runs_large_ones(nan_poison):
    """A positive scale large enough that every key block moves the row max by a lot (2.0) is
    exact; a negative or zero scale is refused naming softmax_scale (fa2_fwd.cu takes maxima of
    the raw scores; before the refusal, masked keys of a negative scale gave 2^+inf and scale 0
    gave NaN), and auto runs those calls elsewhere (tests/test_gpu.py checks their values)."""
    case = Case(2, 4, 2, 700, 300, 128, torch.float16, True)
    q, k, v, dout = make_inputs(case, device="cuda", seed=13)
    truth = math_with_grads(q, k, v, dout, case, torch.float64, scale=2.0)
    low = math_with_grads(q, k, v, dout, case, case.dtype, scale=2.0)
    magnitude = max_magnitude(truth[0], *truth[2:])
    out = fa2dispatch.attention(q, k, v, causal=True, softmax_scale=2.0, backend="cupy")
    check_close("out", out, truth[0], low[0], magnitude)
    for name, ours, t, lp in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), truth[2:], low[2:]):
        check_close(name, ours, t, lp, magnitude)
    for scale in (-0.3, 0.0):
        with pytest.raises(Exception, match="softmax_scale"):
            fa2dispatch.attention(q, k, v, causal=True, softmax_scale=scale, backend="cupy")
        assert fa2dispatch.explain(q, k, v, causal=True, softmax_scale=scale).backend.name != "cupy"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_backward_is_bitwise_repeatable(dtype):
    case = Case(2, 16, 4, 1024, 1024, 128, dtype, causal=True)
    q, k, v, dout = make_inputs(case, device="cuda", seed=2)
    runs = []
    for _ in range(2):
        out = fa2dispatch.attention(q, k, v, causal=True, backend="cupy")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between identical runs"


def test_runs_on_the_current_stream_without_synchronising():
    """Launched on a side stream, the result is ready only after that stream's work: the
    kernels must order with it (and the call must not synchronise the device)."""
    case = Case(1, 4, 4, 512, 512, 64, torch.float16, causal=False)
    q, k, v, _ = make_inputs(case, device="cuda", seed=5, requires_grad=False)
    expected = fa2dispatch.attention(q, k, v, backend="cupy")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # keep the side stream busy for a while
        got = fa2dispatch.attention(q, k, v, backend="cupy")
        assert not side.query(), "the call synchronised (the side stream ran dry during it)"
    side.synchronize()
    assert torch.equal(got, expected)


def test_autotune_times_cupy_configs_for_one_bucket(tmp_path):
    """The tuner's machinery over the cupy config space for one small forward bucket: every
    candidate compiles and is timed, and the winner is verified and stored."""
    from fa2dispatch.autotune import cache, tuner
    from fa2dispatch.autotune.timer import CudaTimer

    device = device_info(torch.device("cuda"))
    grid = tuner.Grid(extras=(), dtypes=("bfloat16",), head_dims=(64,), causal=(True,), lengths=((1024, 1024),),
                      modes=("fwd",), level="quick", backends=("cupy",))
    [result] = tuner.run(grid, device, CudaTimer(), tmp_path)
    assert result.status == "tuned", result.note
    entry = result.entry
    assert entry["backend"] == "cupy" and entry["verified"]
    timed = [t for t in entry["tried"] if "ms" in t]
    assert len(timed) >= 2 and {t["backend"] for t in timed} == {"cupy"}
    assert cache.read_entries(device, tmp_path)[result.bucket.key]["backend"] == "cupy"


def test_wgmma_cubin_through_the_ctypes_nvrtc_when_cupys_cannot_compile(tmp_path, monkeypatch, nan_poison):
    """The sm_90a cubin is compiled through CuPy's NVRTC bindings (the default: the other
    tests), or, when CuPy cannot give one, through the libnvrtc nvrtc_check.py loads; either
    lands in the cubin cache dir and computes the same output."""
    from dataclasses import replace

    from fa2dispatch.backends.cupy_cuda import compile as cc
    from fa2dispatch.backends.cupy_cuda import nvrtc_check
    from fa2dispatch.backends.cupy_cuda.config import default_config

    device = device_info(torch.device("cuda"))
    if device.capability != (9, 0):
        pytest.skip(f"the wgmma forward is sm_90 code (this GPU: {device.arch})")
    if nvrtc_check.load_nvrtc() is None:
        pytest.skip("no libnvrtc for nvrtc_check.py's loader on this machine")
    case = Case(1, 4, 2, 300, 333, 64, torch.float16, True)
    q, k, v, _ = make_inputs(case, device="cuda", seed=3, requires_grad=False)
    problem = AttentionProblem(1, 4, 2, 300, 333, 64, case.dtype, q.device, case.layout, True, 64**-0.5)
    cfg = replace(default_config(64, device), fwd_kernel="wgmma", block_m=64, num_warps=4, fwd_stages=4)
    expected = BACKENDS["cupy"].forward(problem, q, k, v, cfg)

    def no_cupy_nvrtc():
        raise ImportError("simulated: no cupy NVRTC")

    monkeypatch.setenv("FA2DISPATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cc, "_cupy_nvrtc", no_cupy_nvrtc)
    monkeypatch.setattr(cc, "_modules", {})
    monkeypatch.setattr(cc, "_functions", {})
    got = BACKENDS["cupy"].forward(problem, q, k, v, cfg)
    assert list((tmp_path / "cubin").glob("fa2_fwd_sm90-sm_90a-*.cubin")), "no cubin written"
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


SHORT_KEY_CASES = [Case(3, 2, 2, 1, 1, 256, torch.float16, True),  # fuzz #614: one query, one key, D=256
                   Case(2, 4, 2, 7, 1, 128, torch.bfloat16, False),
                   Case(1, 8, 2, 33, 5, 64, torch.float16, True, "bhsd"),
                   Case(2, 4, 4, 100, 64, 96, torch.bfloat16, False)]


@pytest.mark.parametrize("case", SHORT_KEY_CASES, ids=[c.id for c in SHORT_KEY_CASES])
def test_backward_with_one_key_block_takes_delta_from_dp(case, nan_poison):
    """Rows that see one key block at most: delta comes from the P and dP the gradients use
    (fa2_bwd_delta), so a row with one visible key has dS = 0 exactly and the gradients meet
    the rule even where PyTorch's own error is 0 (fuzz #614: dk was 1.08x the bound with
    rowsum(dO O)). Also with a gradient reaching lse (dlse folds into the new delta)."""
    check_case(case, device="cuda", seed=614, backend="cupy")
    q, k, v, dout = make_inputs(case, device="cuda", seed=615)
    out, lse = fa2dispatch.attention(q, k, v, causal=case.causal, layout=case.layout, return_lse=True, backend="cupy")
    dlse = torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    from fa2dispatch.backends.reference import attention_math

    o64, l64 = attention_math(*leaves, causal=case.causal, softmax_scale=case.D**-0.5, layout=case.layout,
                              compute_dtype=torch.float64)
    truth = torch.autograd.grad((o64, l64), leaves, (dout.double(), dlse.double()))
    lows = [t.detach().to(case.dtype).requires_grad_() for t in (q, k, v)]
    ol, ll = attention_math(*lows, causal=case.causal, softmax_scale=case.D**-0.5, layout=case.layout,
                            compute_dtype=case.dtype)
    low = torch.autograd.grad((ol, ll), lows, (dout, dlse.to(ll.dtype)))
    magnitude = max_magnitude(*truth)
    for name, ours, t, lp in zip(("dq", "dk", "dv"), grads, truth, low):
        check_close(f"{name} (with dlse)", ours, t, lp, magnitude)
