"""The one Backend interface every kernel family sits behind.

Capabilities are data on the class; ``not_supported_reasons`` calls the shared checks and a
backend adds only what is its own. The dispatcher knows nothing backend-specific.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem


@dataclass(frozen=True)
class Config:
    """Launch parameters of one backend; subclasses add fields. Frozen so it can key caches."""

    def as_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items() if v not in (None, 0, ""))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _arch_of(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


class Backend:
    """Base class: subclasses set the capability attributes and implement forward/backward."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    vendors: ClassVar[tuple[str, ...]]  # device vendors it runs on: "nvidia", "amd", "cpu"
    min_capability: ClassVar[tuple[int, int] | None] = None  # NVIDIA devices below this are refused
    amd_archs: ClassVar[tuple[str, ...] | None] = None  # AMD archs it runs on (None: any)
    packages: ClassVar[tuple[str, ...]] = ()  # optional Python packages it needs ("triton", "cupy")
    dtypes: ClassVar[tuple[torch.dtype, ...]]
    head_dim_min: ClassVar[int] = 8
    head_dim_max: ClassVar[int] = 256
    head_dim_multiple: ClassVar[int] = 8
    supports_backward: ClassVar[bool] = True
    deterministic: ClassVar[bool] = True  # backward bit-for-bit repeatable
    supports_gqa: ClassVar[bool] = True  # H != Hkv without copying k and v
    supports_lse_grad: ClassVar[bool] = True  # gradient through the returned lse
    # bottom-right causal masking when Mq != Mkv (Mq == Mkv is the same for both alignments)
    supports_causal_unequal: ClassVar[bool] = True
    # backward works only after this backend's own forward (its residuals), so it cannot take
    # over a backward whose forward ran elsewhere
    backward_needs_own_forward: ClassVar[bool] = False
    # FlashAttention-2's features (fa2dispatch.features); a backend that lacks one refuses the call
    supports_window: ClassVar[bool] = False  # window_size=(left, right)
    supports_softcap: ClassVar[bool] = False  # softcap > 0
    supports_alibi: ClassVar[bool] = False  # alibi_slopes
    supports_dropout: ClassVar[bool] = False  # dropout_p > 0 with fa2dispatch's reproducible RNG
    supports_top_left: ClassVar[bool] = False  # causal_alignment="top_left" with Mq != Mkv
    supports_varlen: ClassVar[bool] = False  # attention_varlen (packed sequences, cu_seqlens)
    supports_kvcache: ClassVar[bool] = False  # attention_with_kvcache, contiguous cache
    supports_paged_kv: ClassVar[bool] = False  # attention_with_kvcache with block_table
    supports_attn_mask: ClassVar[bool] = False  # an arbitrary SDPA-style attn_mask (fa2dispatch.compat)

    # -- availability and support: lists of reasons, empty means yes -----------------------
    def version(self, device: DeviceInfo) -> str:
        """What the kernels come from, for the report ("triton 3.6.0", "torch 2.11.0")."""
        return f"torch {device.versions.torch if device.versions is not None else torch.__version__}"

    def available(self, device: DeviceInfo) -> list[str]:
        """Reasons this backend cannot run on this device at all (missing library, arch)."""
        if device.vendor not in self.vendors:
            return [f"runs on {'/'.join(self.vendors)} devices, not {device.vendor}"]
        reasons = []
        versions = device.versions
        for package in self.packages:
            if versions is not None and getattr(versions, package) is None:
                reasons.append(f"{package} not installed")
        if device.vendor == "nvidia" and self.min_capability is not None:
            if device.capability is None or device.capability < self.min_capability:
                reasons.append(f"requires {_arch_of(self.min_capability)}+ but device is {device.arch}")
        if device.vendor == "amd" and self.amd_archs is not None and device.arch not in self.amd_archs:
            reasons.append(f"arch {device.arch} (supported: {', '.join(self.amd_archs)})")
        return reasons

    def not_supported_reasons(self, problem: AttentionProblem, device: DeviceInfo) -> list[str]:
        """Every reason this backend cannot compute this exact call, phrased as STYLE.md asks."""
        reasons = list(self.available(device))
        if problem.dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            reasons.append(f"dtype={_dtype_name(problem.dtype)} (supported: {names})")
        d = problem.D
        if not (self.head_dim_min <= d <= self.head_dim_max and d % self.head_dim_multiple == 0):
            reasons.append(
                f"head_dim={d} (supported: {self.head_dim_min}..{self.head_dim_max}, "
                f"multiple of {self.head_dim_multiple})"
            )
        if problem.requires_grad and not self.supports_backward:
            reasons.append("backward (gradients requested) is not implemented")
        if problem.H != problem.Hkv and not self.supports_gqa:
            reasons.append(f"GQA/MQA H={problem.H} Hkv={problem.Hkv} (supported: H == Hkv)")
        if (problem.causal and problem.Mq != problem.Mkv and problem.Mq != 1
                and problem.causal_alignment == "bottom_right" and not self.supports_causal_unequal):
            reasons.append(f"bottom-right causal with Mq={problem.Mq} != Mkv={problem.Mkv} "
                           "(supported: causal when Mq == Mkv or Mq == 1)")
        reasons.extend(self.feature_reasons(problem))
        if problem.deterministic and problem.requires_grad and not self.deterministic:
            reasons.append("deterministic=True: its backward is not bit-for-bit repeatable")
        if problem.requires_grad and problem.return_lse and not self.supports_lse_grad:
            reasons.append("gradient through the returned lse (return_lse=True with requires_grad) "
                           "is not supported")
        return reasons

    def feature_reasons(self, problem: AttentionProblem) -> list[str]:
        """The FlashAttention-2 features this call uses that this backend lacks."""
        reasons = []
        if problem.has_window and not self.supports_window:
            reasons.append(f"sliding window window_size={problem.window} is not supported")
        if problem.softcap and not self.supports_softcap:
            reasons.append(f"softcap={problem.softcap:g} is not supported")
        if problem.alibi and not self.supports_alibi:
            reasons.append("alibi_slopes are not supported")
        if problem.dropout_p and not self.supports_dropout:
            reasons.append(f"dropout_p={problem.dropout_p:g} with fa2dispatch's reproducible RNG is not supported")
        if problem.causal_alignment == "top_left" and not self.supports_top_left:
            reasons.append(f"causal_alignment='top_left' with Mq={problem.Mq} != Mkv={problem.Mkv} is not supported")
        if problem.varlen and not self.supports_varlen:
            reasons.append("varlen (packed sequences with cu_seqlens) is not supported")
        if problem.kvcache and not self.supports_kvcache:
            reasons.append("KV-cache decode (attention_with_kvcache) is not supported")
        if problem.kvcache and problem.paged_block and not self.supports_paged_kv:
            reasons.append("paged KV cache (block_table) is not supported")
        if problem.attn_mask and not self.supports_attn_mask:
            reasons.append(f"an arbitrary attn_mask ({problem.attn_mask}) is not supported")
        return reasons

    def capabilities(self) -> dict:
        """The capability data, for the report."""
        return {
            "vendors": list(self.vendors),
            "min_capability": _arch_of(self.min_capability) if self.min_capability else None,
            "amd_archs": list(self.amd_archs) if self.amd_archs is not None else None,
            "dtypes": [_dtype_name(d) for d in self.dtypes],
            "head_dims": f"{self.head_dim_min}..{self.head_dim_max}, multiple of {self.head_dim_multiple}",
            "backward": self.supports_backward,
            "deterministic": self.deterministic,
            "gqa": self.supports_gqa,
            "lse_grad": self.supports_lse_grad,
            "causal_unequal_lengths": self.supports_causal_unequal,
            "features": [name for name, flag in (
                ("window", self.supports_window), ("softcap", self.supports_softcap),
                ("alibi", self.supports_alibi), ("dropout", self.supports_dropout),
                ("top_left", self.supports_top_left), ("varlen", self.supports_varlen),
                ("kvcache", self.supports_kvcache), ("paged_kv", self.supports_paged_kv),
                ("attn_mask", self.supports_attn_mask)) if flag],
        }

    # -- configs ---------------------------------------------------------------------------
    config_type: ClassVar[type[Config] | None] = None  # None: the backend takes no launch config

    def config_from_dict(self, data: dict | None) -> Config | None:
        """A config read back from the autotune cache; ValueError if it does not fit this backend."""
        if self.config_type is None:
            if data:
                raise ValueError(f"backend {self.name!r} takes no config, got {data}")
            return None
        if not isinstance(data, dict):
            raise ValueError(f"backend {self.name!r} needs a config, got {data!r}")
        try:
            return self.config_type(**data)
        except TypeError as exc:
            raise ValueError(f"config {data} does not fit backend {self.name!r}: {exc}") from exc

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> Config | None:
        return None

    def config_reasons(self, problem: AttentionProblem, device: DeviceInfo, config: Config | None) -> list[str]:
        """Reasons this config (e.g. a tuned one) cannot run this call; empty means it can."""
        return []

    def config_space(self, problem: AttentionProblem, device: DeviceInfo) -> list[Config]:
        cfg = self.default_config(problem, device)
        return [] if cfg is None else [cfg]

    # -- compute ---------------------------------------------------------------------------
    def forward(
        self, problem: AttentionProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (out in q's layout and dtype, lse float32 of shape (B, H, Mq), natural log)."""
        raise NotImplementedError(f"backend {self.name!r} has no forward")

    def backward(
        self,
        problem: AttentionProblem,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        config: Config | None,
        dlse: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (dq, dk, dv), each in its input's layout and dtype. ``dlse`` is the
        gradient reaching the returned lse (None when lse was not used)."""
        raise NotImplementedError(f"backend {self.name!r} has no backward")

    def forward_kvcache(self, problem: AttentionProblem, q: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, kv, config: Config | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode / chunked prefill over a KV cache (``fa2dispatch.attention_with_kvcache``);
        ``kv`` is ``fa2dispatch.kvcache.KVCacheArgs`` (cache_seqlens, block_table, slopes,
        num_splits). Return (out like q, lse (B, H, Mq) float32). Backends declaring
        ``supports_kvcache`` implement it."""
        raise NotImplementedError(f"backend {self.name!r} has no KV-cache forward")

