"""Reproducible attention dropout: seeds, argument checks, and the kernels' mask in PyTorch.

The Triton kernels draw their dropout mask from Philox4x32-10 keyed by a 64-bit seed, one
64-bit counter per score element (``backends/triton_fa2/dropout.py`` states the generator
bit for bit). This module reproduces those bits with plain int64 tensor arithmetic, on CPU
or CUDA, so the reference backend applies exactly the mask a kernel applied.

Reproducibility contract: the forward calls ``draw_seed(generator)`` once and saves the
``(seed, offset)`` pair for the backward, which regenerates the same mask from it instead of
storing one. ``torch.manual_seed(s)`` (or a ``torch.Generator`` seeded alike) therefore
gives the same output and the same gradients, on every backend that follows this module.
"""

from __future__ import annotations

import math
import numbers

import torch

# Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011, as in Triton).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit words: (2^31 - 1) * scale < 1 in float32.
UNIFORM_SCALE = 4.6566127342e-10

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_SEED_BITS = 63  # seed and offset stay in [0, 2^63): they travel as int64 kernel arguments
_OFFSET_BITS = 62  # offset + a counter of < 2^62 score elements never passes 2^63


def _mul32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant ``a`` and ``x``, both
    unsigned 32-bit (``x`` held in int64). Split in 16-bit halves: every partial product
    stays below 2^34, so nothing overflows int64."""
    a_hi, a_lo = a >> 16, a & _MASK16
    x_hi, x_lo = x >> 16, x & _MASK16
    lo_lo = a_lo * x_lo
    mid = a_hi * x_lo + a_lo * x_hi + (lo_lo >> 16)
    high = a_hi * x_hi + (mid >> 16)
    low = ((mid & _MASK16) << 16) | (lo_lo & _MASK16)
    return high, low


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int,
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 (Random123's, and ``tl.philox_impl``'s) on unsigned 32-bit words held in int64
    tensors, with the key ``(k0, k1)``; returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_bits(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """First 32-bit word of Philox4x32-10 for each int64 counter (values in [0, 2^32), int64).

    Key ``(seed & 0xffffffff, seed >> 32)``; counter ``(c & 0xffffffff, c >> 32, 0, 0)``:
    exactly ``tl.philox(seed, c_lo, c_hi, 0, 0)[0]`` of Triton 3.6."""
    _check_seed(seed)
    if counters.dtype != torch.int64:
        raise TypeError(f"counters must be an int64 tensor, got dtype={counters.dtype}")
    if counters.numel() and counters.min().item() < 0:
        raise ValueError("counters must be >= 0 (64-bit counters are read as unsigned)")
    zero = torch.zeros_like(counters)
    return philox4x32(counters & _MASK32, counters >> 32, zero, zero, seed & _MASK32, (seed >> 32) & _MASK32)[0]


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: a float32 in [0, 1).

    The word read as int32 ``x`` maps to ``x`` or ``-x - 1`` (both in [0, 2^31)), converted
    to float32 (round to nearest, exact below 2^24) and multiplied by the float32 scale."""
    folded = torch.where(bits >= 2**31, _MASK32 - bits, bits)
    scale = torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=bits.device)
    return folded.to(torch.float32) * scale


def philox_uniform(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), bit for bit those of ``dropout.philox_uniform`` in Triton."""
    return bits_to_uniform(philox_bits(seed, counters))


def keep_from_uniform(uniform: torch.Tensor, p: float) -> torch.Tensor:
    """keep = uniform >= p, with p rounded to float32 as a float kernel argument is."""
    return uniform >= torch.tensor(p, dtype=torch.float32, device=uniform.device)


def dropout_keep_mask(seed: int, base_offset: int, n_rows: int, n_cols: int, stride_row: int, p: float,
                      device: torch.device | str | None = None, stride_col: int = 1) -> torch.Tensor:
    """bool (n_rows, n_cols): the ``dropout_keep`` tile of rows ``0..n_rows-1`` and columns
    ``0..n_cols-1``, element (r, c) having counter ``base_offset + r*stride_row + c*stride_col``."""
    rows = torch.arange(n_rows, dtype=torch.int64, device=device)
    cols = torch.arange(n_cols, dtype=torch.int64, device=device)
    counters = base_offset + rows[:, None] * stride_row + cols[None, :] * stride_col
    return keep_from_uniform(philox_uniform(seed, counters), p)


def attention_dropout_mask(seed: int, offset: int, B: int, H: int, Mq: int, Mkv: int, p: float,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """bool (B, H, Mq, Mkv): True where the attention kernels keep score (b, h, i, j).

    The kernels' counter convention: ``offset + ((b*H + h)*Mq + i)*Mkv + j``, i.e. the
    row-major index of the (B, H, Mq, Mkv) score tensor plus ``offset``. Kept probabilities
    are scaled by ``1 / (1 - p)``."""
    n = B * H * Mq * Mkv
    _check_offset(offset, n)
    counters = offset + torch.arange(n, dtype=torch.int64, device=device)
    return keep_from_uniform(philox_uniform(seed, counters), p).reshape(B, H, Mq, Mkv)


def draw_seed(generator: torch.Generator | None = None) -> tuple[int, int]:
    """(seed, offset) for one attention call: seed in [0, 2^63), offset in [0, 2^62).

    Drawn from ``generator``, or from torch's default CPU generator when None (so
    ``torch.manual_seed(s)`` makes the call reproducible, whatever device the inputs are on).
    Every call consumes the same amount of generator state: one ``random_`` over two int64
    values. The forward draws once and saves the pair; the backward reuses it. A generator on
    a CUDA device is read back to the host, which synchronizes that device."""
    check_generator(generator)
    if generator is None:
        generator = torch.default_generator
    draws = torch.empty(2, dtype=torch.int64, device=generator.device).random_(generator=generator)
    seed, offset = (int(v) for v in draws.tolist())
    return seed & ((1 << _SEED_BITS) - 1), offset & ((1 << _OFFSET_BITS) - 1)


def check_dropout_p(dropout_p) -> float:
    """``dropout_p`` as a float in [0, 1); TypeError/ValueError naming the argument otherwise."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    value = float(dropout_p)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return value


def check_generator(generator):
    """``generator`` if it is None or a torch.Generator; TypeError naming the argument otherwise."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")


def _check_offset(offset, n: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + n > 2**63:
        raise ValueError(f"offset must be an int >= 0 with offset + {n} elements <= 2^63, got {offset!r}")
