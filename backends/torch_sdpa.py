"""Adapters over PyTorch SDPA's fused kernels, each pinned to one of them, as candidates.

``torch-sdpa-flash`` (PyTorch's FlashAttention-2), ``torch-sdpa-cudnn`` (cuDNN's fused
attention) and ``torch-sdpa-efficient`` (the xformers memory-efficient kernel) compete with our
kernels in dispatch and autotuning. Each calls the ATen op of its kernel directly (the ops
behind ``F.scaled_dot_product_attention``'s backends), because only those return the
log-sum-exp our interface hands on and take it back in the backward.

What SDPA cannot express is refused with a reason, never approximated:
- ``is_causal`` is top-left aligned; ours is bottom-right by default. They agree when Mq == Mkv,
  and for Mq == 1 bottom-right causal masks nothing. Other bottom-right causal calls are
  refused; ``causal_alignment="top_left"`` calls are SDPA's own, except on the flash kernel:
  the raw FlashAttention-2 op puts its diagonal bottom-right whatever SDPA's documentation says
  (measured on the H100, 2026-11-25: top-left causal Mq=64, Mkv=128 through it was off by 2.96
  against a bound of 6e-3), so ``torch-sdpa-flash`` refuses top-left calls with Mq != Mkv.
- Windows, softcap, ALiBi, dropout with our RNG and KV caches are refused (capability data in
  base.Backend).
- Varlen (``attention_varlen``, packed (total, H, D) with int32 cu_seqlens) runs on
  FlashAttention-2's ragged op (``aten::_flash_attention_forward/backward``, what PyTorch's
  nested-tensor SDPA calls). Its causal mask is bottom-right per sequence (ours); a
  ``causal_alignment="top_left"`` call with q length != k length in some sequence is refused
  (``varlen_causal_alignment``), and so are sequences of length 0 (what the op writes for them
  is not specified). The lse comes back in the varlen convention (H, total_q) whatever form the
  op keeps it in. cuDNN's ragged op (``aten::_cudnn_attention_forward``) is refused: measured on
  the H100 (torch 2.11.0+cu130, cuDNN 9.19, 2026-11-25, tools/bench_varlen.py, 16k tokens,
  H=16, D=128, fp16) it took 47-75 ms per forward call whatever the lengths (20-640x dense
  cuDNN; a per-call cost, not the attention), and its backward returned wrong dq (inf, zero
  rows) and was followed by an illegal memory access.
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

    # varlen: where the ragged op's causal diagonal sits in each sequence (None: no varlen op)
    varlen_causal_alignment: str | None = None

    def feature_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().feature_reasons(problem)
        if not problem.varlen or not self.supports_varlen:
            return reasons
        own = self.varlen_causal_alignment
        # bottom-right causal with one query row per sequence masks nothing (_is_causal is False)
        no_mask = problem.causal_alignment == "bottom_right" and problem.Mq == 1
        if problem.causal and not problem.varlen_equal and problem.causal_alignment != own and not no_mask:
            reasons.append(f"causal varlen with q length != k length in some sequence, "
                           f"causal_alignment={problem.causal_alignment!r} (its ragged causal mask is {own}; "
                           f"supported: equal lengths per sequence or causal_alignment={own!r})")
        if problem.varlen_empty:
            reasons.append("varlen with an empty sequence (q or k length 0) is not supported")
        return reasons

    def forward(self, problem, q, k, v, config, features=None):
        if problem.varlen:
            return self._forward_varlen(problem, *(_packed(t) for t in (q, k, v)), features)
        qh, kh, vh = (_bhsd(t, problem.layout) for t in (q, k, v))
        out, lse = self._forward(problem, qh, kh, vh)
        return _like_input(out, problem.layout), lse

    def backward(self, problem, dout, q, k, v, out, lse, config, dlse=None, features=None):
        if dlse is not None and problem.return_lse:
            raise RuntimeError(f"{self.name}: gradient through lse is not supported (dispatch should have refused)")
        if problem.varlen:
            return self._backward_varlen(problem, *(_packed(t) for t in (dout, q, k, v, out)), lse, features)
        args = [_bhsd(t, problem.layout) for t in (dout, q, k, v, out)]
        grads = self._backward(problem, *args, lse)
        return tuple(_like_input(g, problem.layout) for g in grads)

    def _forward_varlen(self, problem, q, k, v, features):
        raise NotImplementedError(f"{self.name} has no varlen forward")

    def _backward_varlen(self, problem, dout, q, k, v, out, lse, features):
        raise NotImplementedError(f"{self.name} has no varlen backward")


class TorchSDPAFlash(TorchSDPABackend):
    name = "torch-sdpa-flash"
    description = ("PyTorch SDPA's FlashAttention-2 kernel (aten::_scaled_dot_product_flash_attention; "
                   "varlen: aten::_flash_attention_forward)")
    kernel = "flash"
    supports_top_left = False  # the raw op's diagonal is bottom-right (module docstring)
    supports_varlen = True
    varlen_causal_alignment = "bottom_right"  # FlashAttention-2 >= 2.1, per sequence

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

    def _forward_varlen(self, problem, q, k, v, features):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, features.cu_seqlens_q, features.cu_seqlens_k, problem.Mq, problem.Mkv, 0.0,
            _is_causal(problem), False, scale=problem.softmax_scale)
        return out, _lse_to_varlen(self.kernel, lse, problem, features, q.shape[0])

    def _backward_varlen(self, problem, dout, q, k, v, out, lse, features):
        seed, offset = _no_dropout_rng(q.device)
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, _lse_from_varlen(self.kernel, lse, problem, features), features.cu_seqlens_q,
            features.cu_seqlens_k, problem.Mq, problem.Mkv, 0.0, _is_causal(problem), seed, offset,
            scale=problem.softmax_scale)


class TorchSDPACudnn(TorchSDPABackend):
    name = "torch-sdpa-cudnn"
    description = "PyTorch SDPA's cuDNN fused attention (aten::_scaled_dot_product_cudnn_attention)"
    kernel = "cudnn"
    vendors = ("nvidia",)
    head_dim_max = 128  # cuDNN 9's limit on Ampere/Ada, and for the backward everywhere
    supports_gqa = False  # the ATen op takes equal head counts

    def feature_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().feature_reasons(problem)
        if problem.varlen:  # the measurement is in the module docstring
            reasons.append("cuDNN's ragged op is not used (H100, torch 2.11 / cuDNN 9.19: 47-75 ms per call "
                           "whatever the lengths, and a wrong backward)")
        return reasons

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


def _packed(t: torch.Tensor) -> torch.Tensor:
    """A packed (total, heads, D) tensor as the ragged ops take it: dense rows, unit stride in D
    (they address sequence b at row cu_seqlens[b] with the tensor's row stride)."""
    return t if t.is_contiguous() else t.contiguous()


# FlashAttention-2's ragged op keeps the log-sum-exp as (H, total_q) ("ht", our convention,
# flash-attn >= 2.6) or padded (B, H, max_seqlen_q) ("bhm", older copies), by torch version. The
# forward records the form per kernel; the backward hands the lse back in it.
_VARLEN_LSE_FORM: dict[str, tuple[str, tuple[int, ...]]] = {}


def _rows(problem: AttentionProblem, features, total_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position in it) of each packed q row, on the device (no host sync)."""
    cu = features.cu_seqlens_q.long()
    t = torch.arange(total_q, device=cu.device)
    b = torch.searchsorted(cu[1:].contiguous(), t, right=True)
    return b, t - cu[b]


def _lse_to_varlen(kernel: str, lse: torch.Tensor, problem: AttentionProblem, features, total_q: int) -> torch.Tensor:
    H = problem.H
    if tuple(lse.shape) == (H, total_q):
        _VARLEN_LSE_FORM[kernel] = ("ht", ())
        return lse.float()
    if tuple(lse.shape) == (problem.B, H, problem.Mq):
        _VARLEN_LSE_FORM[kernel] = ("bhm", ())
        b, i = _rows(problem, features, total_q)
        return lse[b, :, i].t().float().contiguous()
    raise RuntimeError(f"{kernel}: unexpected varlen log-sum-exp shape {tuple(lse.shape)} for total_q={total_q}, "
                       f"H={H}, B={problem.B}, max_seqlen_q={problem.Mq}")


def _lse_from_varlen(kernel: str, lse: torch.Tensor, problem: AttentionProblem, features) -> torch.Tensor:
    form, _ = _VARLEN_LSE_FORM.get(kernel, ("ht", ()))
    total_q = lse.shape[1]
    if form == "bhm":
        b, i = _rows(problem, features, total_q)
        padded = lse.new_zeros(problem.B, problem.H, problem.Mq)
        padded[b, :, i] = lse.t()
        return padded
    return lse.contiguous()


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
