"""Selection on every simulated device profile, and the exact text of every refusal.

Simulated devices (hardware.PROFILES) make the dispatcher's choices for GPUs testable on CPU:
``dispatch.select(problem, device=simulated_device(name))`` or ``FA2DISPATCH_SIMULATE``.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

import fa2dispatch
from fa2dispatch import dispatch, hardware
from fa2dispatch.backends import BACKENDS, PRIORITY, family, priority
from fa2dispatch.backends.triton_fa2.config import TritonConfig
from fa2dispatch.hardware import PROFILES, DeviceInfo, Versions, simulated_device
from fa2dispatch.problem import AttentionProblem



@pytest.fixture(autouse=True)
def fresh_memo():
    dispatch.clear_memo()
    yield
    dispatch.clear_memo()


def problem(**overrides) -> AttentionProblem:
    fields = dict(B=2, H=16, Hkv=16, Mq=4096, Mkv=4096, D=128, dtype=torch.float16, device=torch.device("cpu"),
                  layout="bshd", causal=False, softmax_scale=128**-0.5)
    return AttentionProblem(**{**fields, **overrides})


def pick(profile: str, **overrides) -> dispatch.Decision:
    return dispatch.select(problem(**overrides), device=simulated_device(profile))


def reasons(profile: str, backend: str, **overrides) -> list[str]:
    return BACKENDS[backend].not_supported_reasons(problem(**overrides), simulated_device(profile))


# ------------------------------------------------------------------ priority data


def test_every_family_orders_registered_backends_only():
    for fam, order in PRIORITY.items():
        assert set(order) <= set(BACKENDS), fam
        assert len(set(order)) == len(order), fam
    for name in PROFILES:
        assert sorted(priority(simulated_device(name))) == sorted(BACKENDS)


@pytest.mark.parametrize("profile, fam", [("h100", "nvidia-sm90"), ("a100", "nvidia"), ("rtx4090", "nvidia"),
                                          ("mi300x", "amd"), ("mi250x", "amd"), ("cpu", "cpu")])
def test_profiles_map_to_their_family(profile, fam):
    assert family(simulated_device(profile)) == fam


def test_backend_names_are_kebab_case():
    for name in BACKENDS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name


# ------------------------------------------------------------------ choices per profile


@pytest.mark.parametrize(
    "profile, overrides, expected",
    [
        # H100: cuDNN's fused kernel leads where it applies (measured, backends/__init__.py) ...
        ("h100", {}, "torch-sdpa-cudnn"),
        ("h100", {"causal": True}, "torch-sdpa-cudnn"),
        ("h100", {"requires_grad": True}, "torch-sdpa-cudnn"),
        ("h100", {"causal": True, "Mq": 1}, "torch-sdpa-cudnn"),  # decode: bottom-right causal masks nothing
        # ... and ours takes what cuDNN cannot express
        ("h100", {"D": 256}, "triton"),
        ("h100", {"Hkv": 4}, "triton"),
        ("h100", {"causal": True, "Mq": 1000}, "triton"),
        ("h100", {"dtype": torch.float32}, "triton"),
        ("h100", {"requires_grad": True, "return_lse": True}, "triton"),
        ("a100", {}, "triton"),
        ("a100", {"dtype": torch.float32}, "triton"),
        ("rtx4090", {"dtype": torch.bfloat16, "causal": True}, "triton"),
        ("mi300x", {}, "triton"),
        ("mi250x", {"D": 64}, "triton"),
        ("cpu", {}, "reference"),
    ],
)
def test_choice_on_simulated_devices(profile, overrides, expected):
    decision = pick(profile, **overrides)
    assert decision.backend.name == expected
    assert decision.source == "default"
    assert decision.device.simulated and decision.device.name == PROFILES[profile].name
    # every backend is accounted for: chosen, a fallback, or rejected with reasons
    assert {expected, *decision.fallbacks, *decision.rejected} == set(BACKENDS)
    assert all(decision.rejected.values())
    assert decision.fallbacks[-1:] == ("reference",) or expected == "reference"


def test_h100_fallbacks_follow_the_priority_order():
    decision = pick("h100")
    assert decision.fallbacks == ("triton", "torch-sdpa-flash", "torch-sdpa-efficient", "reference")


@pytest.mark.parametrize("profile", ["mi300x", "mi250x"])
def test_amd_picks_triton_with_amd_launch_options(profile):
    decision = pick(profile)
    assert isinstance(decision.config, TritonConfig)
    options = decision.config.launch_options("amd")
    assert options["waves_per_eu"] == 2 and options["matrix_instr_nonkdim"] == 16 and options["kpack"] == 2
    assert options["num_stages"] == 1  # AMD's stream-pipeliner takes 1-2 stages
    assert "waves_per_eu" not in decision.config.launch_options("nvidia")
    assert decision.fallbacks == ("torch-sdpa-flash", "torch-sdpa-efficient", "reference")
    assert decision.rejected["torch-sdpa-cudnn"] == ["runs on nvidia devices, not amd"]


def test_rtx4090_gets_configs_for_its_99_kib_of_shared_memory():
    ada, hopper = pick("rtx4090").config, pick("h100", D=256).config
    assert ada.num_stages == 2 and ada.block_n == 64
    assert (ada.dkdv_block_m, ada.bwd_num_stages) == (32, 1)
    assert hopper != ada


@pytest.mark.parametrize("profile", list(PROFILES))
def test_fp8_inputs_run_on_sm89_sm90_and_are_refused_elsewhere_naming_the_arch(profile):
    refused = {
        "a100": "requires sm_89+ but device is sm_80",
        "mi300x": "fp8 e4m3fn on AMD gfx942 is not supported (supported: nvidia sm_89+)",
        "mi250x": "fp8 e4m3fn on AMD gfx90a is not supported (supported: nvidia sm_89+)",
    }
    if profile not in refused:  # e4m3 tensor cores (sm_89, sm_90), or the interpreter on CPU
        decision = pick(profile, dtype=torch.float8_e4m3fn)
        assert decision.backend.name == "triton-fp8" and decision.source == "default"
        assert decision.rejected["triton"] == ["dtype=float8_e4m3fn (supported: float16, bfloat16, float32)"]
        return
    with pytest.raises(fa2dispatch.NoBackendError) as info:
        pick(profile, dtype=torch.float8_e4m3fn)
    assert info.value.reasons["triton-fp8"] == [refused[profile]]
    assert info.value.reasons["triton"] == ["dtype=float8_e4m3fn (supported: float16, bfloat16, float32)"]


# ------------------------------------------------------------------ exact reason texts


@pytest.mark.parametrize(
    "profile, backend, overrides, reason",
    [
        ("h100", "torch-sdpa-cudnn", {"D": 256}, "head_dim=256 (supported: 8..128, multiple of 8)"),
        ("h100", "torch-sdpa-cudnn", {"H": 32, "Hkv": 8}, "GQA/MQA H=32 Hkv=8 (supported: H == Hkv)"),
        ("h100", "torch-sdpa-efficient", {"H": 32, "Hkv": 1}, "GQA/MQA H=32 Hkv=1 (supported: H == Hkv)"),
        ("h100", "torch-sdpa-flash", {"causal": True, "Mq": 100, "Mkv": 200},
         "bottom-right causal with Mq=100 != Mkv=200 (supported: causal when Mq == Mkv or Mq == 1)"),
        ("h100", "torch-sdpa-flash", {"dtype": torch.float32}, "dtype=float32 (supported: float16, bfloat16)"),
        ("h100", "torch-sdpa-cudnn", {"requires_grad": True, "return_lse": True},
         "gradient through the returned lse (return_lse=True with requires_grad) is not supported"),
        ("h100", "triton-fp8", {"dtype": torch.float8_e4m3fn, "requires_grad": True},
         "backward (gradients requested) is not implemented"),
        ("h100", "cupy", {}, "cupy not installed"),
        ("h100", "cupy", {"softmax_scale": -0.3}, ("softmax_scale=-0.3 (supported: > 0; the CuPy forward takes row "
         "maxima of the raw scores, which order like the scaled ones only for a positive scale)")),
        ("h100", "cupy", {"softmax_scale": 0.0}, ("softmax_scale=0 (supported: > 0; the CuPy forward takes row "
         "maxima of the raw scores, which order like the scaled ones only for a positive scale)")),
        ("h100", "triton", {"D": 264}, "head_dim=264 (supported: 8..256, multiple of 8)"),
        ("a100", "triton-fp8", {"dtype": torch.float8_e4m3fn}, "requires sm_89+ but device is sm_80"),
        ("mi300x", "torch-sdpa-cudnn", {}, "runs on nvidia devices, not amd"),
        ("mi300x", "cupy", {}, "runs on nvidia devices, not amd"),
        ("cpu", "torch-sdpa-flash", {}, "runs on nvidia/amd devices, not cpu"),
        ("cpu", "triton", {"dtype": torch.float64}, "dtype=float64 (supported: float16, bfloat16, float32)"),
    ],
)
def test_reason_text(profile, backend, overrides, reason):
    assert reason in reasons(profile, backend, **overrides)


def test_supported_calls_have_no_reasons():
    assert reasons("h100", "torch-sdpa-flash", H=32, Hkv=8) == []  # FlashAttention-2 takes GQA natively
    assert reasons("h100", "torch-sdpa-cudnn", causal=True, Mq=1, Mkv=999) == []
    assert reasons("mi300x", "triton", dtype=torch.bfloat16) == []


def _device(**changes) -> DeviceInfo:
    return replace(simulated_device("h100"), **changes)


@pytest.mark.parametrize(
    "device, backend, reason",
    [
        (_device(capability=(7, 5), arch="sm_75"), "triton", "requires sm_80+ but device is sm_75"),
        (_device(capability=(7, 5), arch="sm_75"), "torch-sdpa-flash", "requires sm_80+ but device is sm_75"),
        (_device(vendor="amd", arch="gfx908", capability=None), "triton",
         "arch gfx908 (supported: gfx90a, gfx942, gfx950, gfx1100, gfx1101, gfx1200, gfx1201)"),
        (_device(versions=Versions(torch="2.11.0", triton=None, cupy=None)), "triton", "triton not installed"),
        (_device(versions=Versions(torch="2.11.0", triton="3.1.0", cupy=None)), "triton",
         "triton 3.1.0 is older than 3.2 (supported: >= 3.2)"),
        (_device(versions=Versions(torch="2.11.0", triton=None, cupy=None)), "triton-fp8", "triton not installed"),
    ],
    ids=["sm75-triton", "sm75-flash", "gfx908", "no-triton", "old-triton", "no-triton-fp8"],
)
def test_availability_reason_text(device, backend, reason):
    assert reason in BACKENDS[backend].available(device)


def test_cupy_reasons_when_installed_on_a_simulated_h100():
    """With cupy present (simulated by the version record) nothing stands in the way; on an
    sm_75 device the arch does."""
    device = _device(versions=Versions(torch="2.11.0", triton="3.6.0", cupy="14.2.0"))
    assert BACKENDS["cupy"].available(device) == []
    assert BACKENDS["cupy"].not_supported_reasons(problem(D=256, requires_grad=True), device) == []
    old = replace(device, capability=(7, 5), arch="sm_75")
    assert BACKENDS["cupy"].available(old) == ["requires sm_80+ but device is sm_75"]


def test_cupy_wgmma_forward_default_and_refusals():
    """On an (simulated) H100 the CuPy default at D 64/128 is the wgmma forward, elsewhere the
    mma.sync one; a wgmma config the device or call cannot take is refused naming the field."""
    from fa2dispatch.backends.cupy_cuda.config import CupyConfig, default_config

    cupy = BACKENDS["cupy"]
    h100 = _device(versions=Versions(torch="2.11.0", triton="3.6.0", cupy="14.2.0"))
    a100 = replace(simulated_device("a100"), versions=h100.versions)
    for D in (64, 128):
        assert default_config(D, h100).fwd_kernel == "wgmma"
        assert default_config(D, a100).fwd_kernel == "mma"
        assert default_config(D, h100, wgmma=False).fwd_kernel == "mma"
    assert default_config(96, h100).fwd_kernel == "mma"
    assert cupy.config_reasons(problem(D=128), h100, default_config(128, h100)) == []
    wg = CupyConfig(fwd_kernel="wgmma", block_m=64, num_warps=4, block_n=64)
    assert cupy.config_reasons(problem(D=128), a100, wg) == [
        "fwd_kernel='wgmma' needs an sm_90 GPU (this one: sm_80)"]
    assert cupy.config_reasons(problem(D=96), h100, wg) == ["fwd_kernel='wgmma' at head_dim=96 (supported: 64 and 128)"]
    assert cupy.config_reasons(problem(D=64), h100, replace(wg, block_n=32)) == [
        "fwd_kernel='wgmma' with block_n=32 (supported: 64 or 128)"]
    assert cupy.config_reasons(problem(D=64), h100, replace(wg, num_warps=8)) == [
        "fwd_kernel='wgmma' with block_m=64 num_warps=8 (supported: block_m 64 or 128, one warpgroup of 4 warps "
        "per 64 rows)", "block_m=64 (supported: 16 or 32 rows per warp x num_warps=8)"]
    assert cupy.config_reasons(problem(D=64), h100, replace(wg, fwd_stages=2)) == [
        "fwd_stages=2 (supported: 3 or 4)"]
    assert cupy.config_reasons(problem(D=64), h100, replace(wg, warp_skip=1)) == [
        "warp_skip=1 with fwd_kernel='wgmma' (a setting of the mma.sync forward only; leave it at 0)"]
    assert cupy.config_reasons(problem(D=64), h100, replace(wg, fwd_kernel="tcgen05")) == [
        "fwd_kernel='tcgen05' (supported: 'mma', 'wgmma')"]
    # 128 x 128 tiles with a ring of 4 do not fit the H100's 227 KiB at D=128
    big = replace(wg, block_m=128, num_warps=8, block_n=128, fwd_stages=4)
    assert cupy.config_reasons(problem(D=128), h100, big) == ["forward kernel needs 289 KiB of shared memory "
                                                                "(device: 227 KiB per block)"]


def test_cupy_wgmma_needs_an_nvrtc_with_sm90a(monkeypatch):
    """With CuPy's NVRTC older than 12.0 (no sm_90a target) a real H100 gets the mma.sync
    forward by default and a wgmma config is refused naming NVRTC; simulated devices have no
    NVRTC to ask."""
    from fa2dispatch.backends import cupy_cuda
    from fa2dispatch.backends.cupy_cuda.config import CupyConfig

    cupy = BACKENDS["cupy"]
    real = replace(_device(versions=Versions(torch="2.11.0", triton="3.6.0", cupy="14.2.0")), simulated=False)
    wg = CupyConfig(fwd_kernel="wgmma", block_m=64, num_warps=4, block_n=64)
    monkeypatch.setattr(cupy_cuda, "_nvrtc_version", lambda: (11, 8))
    assert cupy.default_config(problem(D=128), real).fwd_kernel == "mma"
    assert all(c.fwd_kernel == "mma" for c in cupy.config_space(problem(D=128), real))
    assert cupy.config_reasons(problem(D=128), real, wg) == [
        "fwd_kernel='wgmma' needs NVRTC 12.0+ for sm_90a (CuPy's NVRTC: 11.8)"]
    assert cupy.default_config(problem(D=128), replace(real, simulated=True)).fwd_kernel == "wgmma"
    monkeypatch.setattr(cupy_cuda, "_nvrtc_version", lambda: (13, 0))
    assert cupy.default_config(problem(D=128), real).fwd_kernel == "wgmma"
    assert cupy.config_reasons(problem(D=128), real, wg) == []


# ------------------------------------------------------------------ forced choices


def test_forced_backend_that_cannot_run_raises_value_error_with_reasons():
    p = problem(H=32, Hkv=8, D=256)
    with pytest.raises(ValueError) as info:
        dispatch.select(p, "torch-sdpa-cudnn", device=simulated_device("h100"))
    assert str(info.value) == (f"backend='torch-sdpa-cudnn' cannot run this call ({p.describe()}): "
                               "head_dim=256 (supported: 8..128, multiple of 8); "
                               "GQA/MQA H=32 Hkv=8 (supported: H == Hkv)")


def test_forced_backend_that_can_run_is_used_as_is():
    decision = dispatch.select(problem(), "torch-sdpa-flash", device=simulated_device("h100"))
    assert (decision.backend.name, decision.source, decision.config) == ("torch-sdpa-flash", "forced", None)


@pytest.mark.parametrize("name", ["torch_sdpa_flash", "Triton", "cudnn", ""])
def test_unknown_backend_names_are_refused(name):
    with pytest.raises(ValueError, match=re.escape(f"backend={name!r} is not known (known: 'auto', 'triton'")):
        dispatch.select(problem(), name)


# ------------------------------------------------------------------ FA2DISPATCH_SIMULATE


def test_simulate_environment_plans_for_the_profile_and_refuses_to_compute(monkeypatch):
    monkeypatch.setenv(hardware.ENV_SIMULATE, "mi300x")
    q = torch.randn(1, 64, 4, 64, dtype=torch.float16)
    decision = fa2dispatch.explain(q, q, q)
    assert decision.device == simulated_device("mi300x")
    assert decision.backend.name == "triton" and decision.config.waves_per_eu == 2
    with pytest.raises(RuntimeError, match=r"FA2DISPATCH_SIMULATE is set: .*simulated AMD Instinct MI300X \[gfx942\]"):
        fa2dispatch.attention(q, q, q)
    monkeypatch.delenv(hardware.ENV_SIMULATE)
    assert fa2dispatch.explain(q, q, q).device.simulated is True  # read when deciding: memoized
    dispatch.clear_memo()
    assert fa2dispatch.explain(q, q, q).device.simulated is False


def test_unknown_simulate_profile_is_refused(monkeypatch):
    monkeypatch.setenv(hardware.ENV_SIMULATE, "h200")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=re.escape("FA2DISPATCH_SIMULATE='h200' is not a known device profile "
                                                   "(known: h100, a100, rtx4090, mi300x, mi250x, cpu)")):
        fa2dispatch.explain(q, q, q)


def test_profiles_carry_this_machines_library_versions():
    for name in PROFILES:
        device = simulated_device(name)
        assert device.versions == hardware.versions() and device.versions.torch == torch.__version__
        assert device.warp_size == (64 if device.vendor == "amd" else (32 if device.vendor == "nvidia" else 1))


def test_real_cpu_device_info_has_versions_and_no_driver():
    info = hardware.device_info(torch.device("cpu"))
    assert (info.vendor, info.arch, info.simulated, info.driver) == ("cpu", "cpu", False, None)
    assert info.versions.parsed("torch") is not None
    assert info.versions.parsed("triton") is not None  # CI installs triton for the interpreter
