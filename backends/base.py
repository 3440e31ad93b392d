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
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items() if v not in (None, 0))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Backend:
    """Base class: subclasses set the capability attributes and implement forward/backward."""

    name: ClassVar[str]
    vendors: ClassVar[tuple[str, ...]]  # device vendors it runs on: "nvidia", "amd", "cpu"
    dtypes: ClassVar[tuple[torch.dtype, ...]]
    head_dim_min: ClassVar[int] = 8
    head_dim_max: ClassVar[int] = 256
    head_dim_multiple: ClassVar[int] = 8
    supports_backward: ClassVar[bool] = True
    deterministic: ClassVar[bool] = True

    # -- availability and support: lists of reasons, empty means yes -----------------------
    def available(self, device: DeviceInfo) -> list[str]:
        """Reasons this backend cannot run on this device at all (missing library, arch)."""
        if device.vendor not in self.vendors:
            return [f"runs on {'/'.join(self.vendors)} devices, not {device.vendor}"]
        return []

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
        return reasons

    # -- configs ---------------------------------------------------------------------------
    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> Config | None:
        return None

    def config_space(self, problem: AttentionProblem, device: DeviceInfo) -> list[Config]:
        cfg = self.default_config(problem, device)
        return [] if cfg is None else [cfg]

    # -- compute ---------------------------------------------------------------------------
    def forward(
        self, problem: AttentionProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (out in q's layout and dtype, lse float32 of shape (B, H, Mq), natural log)."""
        raise NotImplementedError

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
        raise NotImplementedError
