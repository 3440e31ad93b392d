"""Registered backends, in priority order (the dispatcher walks this list).

The order is the default preference on every device family until the autotune cache (a
later issue) measures otherwise: the Triton FlashAttention-2 kernels first, the reference
last as the fallback that runs anywhere.
"""

from __future__ import annotations

from .base import Backend, Config
from .reference import ReferenceBackend
from .triton_fa2 import TritonBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), ReferenceBackend())}

__all__ = ["BACKENDS", "Backend", "Config"]
