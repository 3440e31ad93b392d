"""Adapters over PyTorch SDPA's fused kernels, each pinned to one of them, as candidates.

``torch-sdpa-flash`` (PyTorch's FlashAttention-2), ``torch-sdpa-cudnn`` (cuDNN's fused
attention) and ``torch-sdpa-efficient`` (the xformers memory-efficient kernel) compete with our
kernels in dispatch and autotuning. Each calls the ATen op of its kernel directly (the ops
behind ``F.scaled_dot_product_attention``'s backends), because only those return the
log-sum-exp our interface hands on and take it back in the backward.

What SDPA cannot express is refused with a reason, never approximated:
- ``is_causal`` is top-left aligned; ours is bottom-right by default. They agree when Mq == Mkv,
  and for Mq == 1 bottom-right causal masks nothing. Other bottom-right causal calls are
  refused; ``causal_alignment="top_left"`` calls are SDPA's own.
- Windows, softcap, ALiBi, dropout with our RNG, varlen and KV caches are refused (capability
  data in base.Backend).
- The backward ops take no gradient for the log-sum-exp, so ``return_lse`` with gradients is
  refused (it would silently drop that gradient).
- The backward needs the forward's own residuals, so it never takes over another backend's
  forward.
"""

from __future__ import annotations

import functools

import torch

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from .base import Backend

_ROCM_ARCHS = ("gfx90a", "gfx942", "gfx950")  # where ROCm builds ship the fused SDPA kernels
_LSE_ALIGN_EFFICIENT = 32  # the memory-efficient kernel pads lse rows to a multiple of 32


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    t = t.transpose(1, 2) if layout == "bshd" else t
    return t if t.stride(-1) == 1 else t.contiguous()  # the fused kernels need unit stride in D


def _like_input(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def _is_causal(problem: AttentionProblem) -> bool:
    # SDPA's is_causal is top-left aligned. Bottom-right causal with one query row masks nothing;
    # Mq == Mkv is the same for both alignments.
    if problem.causal_alignment == "top_left":
        return problem.causal
    return problem.causal and problem.Mq > 1


class TorchSDPABackend(Backend):
    """Shared adapter logic; subclasses name the kernel and state its limits."""

    kernel: str  # "flash" | "cudnn" | "efficient"
    vendors = ("nvidia", "amd")
    min_capability = (8, 0)
    amd_archs = _ROCM_ARCHS
    dtypes = (torch.float16, torch.bfloat16)
    supports_causal_unequal = False
    supports_top_left = True  # is_causal's own alignment
    supports_lse_grad = False
    backward_needs_own_forward = True
    deterministic = False  # dQ (flash, efficient) is accumulated with atomics unless torch is told otherwise

    def version(self, device: DeviceInfo) -> str:
        return f"torch {device.versions.torch}" if device.versions else f"torch {torch.__version__}"

    def available(self, device: DeviceInfo) -> list[str]:
        reasons = super().available(device)
        if reasons or device.simulated:
            return reasons  # a simulated device assumes torch built for its platform
        build = torch.version.cuda if device.vendor == "nvidia" else torch.version.hip
        if build is None:
            platform = "CUDA" if device.vendor == "nvidia" else "ROCm"
            reasons.append(f"torch {torch.__version__} was built without {platform}")
        else:
            reasons.extend(self._build_reasons())
        return reasons

    def _build_reasons(self) -> list[str]:
        return []

    def forward(self, problem, q, k, v, config):
        qh, kh, vh = (_bhsd(t, problem.layout) for t in (q, k, v))
        out, lse = self._forward(problem, qh, kh, vh)
        return _like_input(out, problem.layout), lse

    def backward(self, problem, dout, q, k, v, out, lse, config, dlse=None):
        if dlse is not None and problem.return_lse:
            raise RuntimeError(f"{self.name}: gradient through lse is not supported (dispatch should have refused)")
        args = [_bhsd(t, problem.layout) for t in (dout, q, k, v, out)]
        grads = self._backward(problem, *args, lse)
        return tuple(_like_input(g, problem.layout) for g in grads)


class TorchSDPAFlash(TorchSDPABackend):
    name = "torch-sdpa-flash"
    description = "PyTorch SDPA's FlashAttention-2 kernel (aten::_scaled_dot_product_flash_attention)"
    kernel = "flash"

    def _build_reasons(self) -> list[str]:
        check = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        if check is not None and not check():
            return ["this torch build has no flash attention kernel"]
        return []

    def _forward(self, problem, q, k, v):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, _is_causal(problem), False, scale=problem.softmax_scale)
        return out, lse

    def _backward(self, problem, dout, q, k, v, out, lse):
        seed, offset = _no_dropout_rng(q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, problem.Mq, problem.Mkv, 0.0, _is_causal(problem),
            seed, offset, scale=problem.softmax_scale)


class TorchSDPACudnn(TorchSDPABackend):
    name = "torch-sdpa-cudnn"
    description = "PyTorch SDPA's cuDNN fused attention (aten::_scaled_dot_product_cudnn_attention)"
    kernel = "cudnn"
    vendors = ("nvidia",)
    head_dim_max = 128  # cuDNN 9's limit on Ampere/Ada, and for the backward everywhere
    supports_gqa = False  # the ATen op takes equal head counts

    def version(self, device: DeviceInfo) -> str:
        base = super().version(device)
        if device.simulated:
            return base
        try:
            version = torch.backends.cudnn.version()  # None where torch has no cuDNN
        except Exception:
            version = None
        return f"{base}, cuDNN {version}" if version else base

    def _build_reasons(self) -> list[str]:
        if not torch.backends.cudnn.is_available():
            return ["cuDNN not available in this torch build"]
        version = torch.backends.cudnn.version() or 0
        if version < 90000:
            return [f"cuDNN {version} (supported: >= 9.0 for fused attention)"]
        return []

    def _forward(self, problem, q, k, v):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, _is_causal(problem), False, scale=problem.softmax_scale)
        _CUDNN_LSE_SHAPE[0] = tuple(lse.shape[3:])  # (1,) where cuDNN keeps its stats 4-d
        return out, lse.reshape(problem.B, problem.H, problem.Mq)

    def _backward(self, problem, dout, q, k, v, out, lse):
        seed, offset = _no_dropout_rng(q.device)
        lse = lse.reshape(problem.B, problem.H, problem.Mq, *_CUDNN_LSE_SHAPE[0])
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, None, None, problem.Mq, problem.Mkv, 0.0,
            _is_causal(problem), scale=problem.softmax_scale)


_CUDNN_LSE_SHAPE: list[tuple[int, ...]] = [()]


class TorchSDPAEfficient(TorchSDPABackend):
    name = "torch-sdpa-efficient"
    description = "PyTorch SDPA's memory-efficient kernel (aten::_scaled_dot_product_efficient_attention)"
    kernel = "efficient"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    supports_gqa = False  # the ATen op takes equal head counts

    def _forward(self, problem, q, k, v):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, _is_causal(problem), scale=problem.softmax_scale)
        return out, lse[..., : problem.Mq]  # rows past Mq are padding

    def _backward(self, problem, dout, q, k, v, out, lse):
        seed, offset = _no_dropout_rng(torch.device("cpu"))
        padded = -(-problem.Mq // _LSE_ALIGN_EFFICIENT) * _LSE_ALIGN_EFFICIENT
        lse = torch.nn.functional.pad(lse, (0, padded - problem.Mq))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], _is_causal(problem),
            scale=problem.softmax_scale)
        return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _no_dropout_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox seed and offset for a backward without dropout: read by no kernel, but required."""
    return torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device)
