"""Attention dropout masks from Triton's Philox, regenerated in the backward instead of stored.

Every score element gets its own 64-bit counter; the mask bit of an element is a pure
function of (seed, counter, p), so the forward, the backward and the PyTorch twin
(``fa2dispatch/rng.py``, which reproduces these bits exactly on CPU or CUDA) agree without
ever writing the mask to memory.

The generator, bit for bit (Triton 3.6 ``triton/language/random.py``):

- Philox4x32-10 (``tl.philox``) with key ``(seed & 0xffffffff, seed >> 32)`` and counter
  words ``(counter & 0xffffffff, counter >> 32, 0, 0)``: the high 32 bits of the counter go to
  the second word explicitly, so tensors past 2^32 elements get fresh numbers instead of
  wrapping. Only the first output word is used (one Philox per element).
- uniform = ``tl.random.uint_to_uniform_float`` of that word: read as int32 ``x``, take
  ``x`` if ``x >= 0`` else ``-x - 1`` (in [0, 2^31)), then ``float32(x) * 4.6566127342e-10``
  in float32: a float in [0, 1).
- keep = ``uniform >= p``, so ``p = 0`` keeps everything and an element is dropped with
  probability ``p``. ``p`` is compared as float32 (a float kernel argument).

Counter convention of the attention kernels (``attention_dropout_keep``): score element
(b, h, i, j) of a (B, H, Mq, Mkv) problem has counter ``offset + ((b*H + h)*Mq + i)*Mkv + j``.
``seed`` and ``offset`` come from ``fa2dispatch.rng.draw_seed`` and both lie in [0, 2^63);
pass them as 64-bit integer kernel arguments (``i64`` in an offline signature) and list them in
``do_not_specialize`` so that each call's fresh values do not trigger a recompile.

Cost: one Philox4x32-10 per score element. Measured on an H100 (triton 3.6): writing the
1x32x4096x4096 mask with ``attention_mask_kernel`` takes 1.81 ms against 0.17 ms to fill the
same int8 tensor, i.e. about 300 G elements/s of Philox, a few times a forward pass's tensor-core
time at D=128. Using all four output words (one Philox per 4 elements) would cut that by ~4x
at the price of another counter convention.
"""

import triton
import triton.language as tl


@triton.jit
def dropout_counters(base_offset, offs_rows, offs_cols, stride_row, stride_col):
    """int64 counters ``base_offset + offs_rows[:, None]*stride_row + offs_cols[None, :]*stride_col``.

    Everything is widened to int64 before multiplying: the products pass 2^31 long before a
    problem is large (B*H*Mq*Mkv counts score elements)."""
    rows = offs_rows.to(tl.int64)[:, None] * stride_row
    cols = offs_cols.to(tl.int64)[None, :] * stride_col
    return (rows + cols) + base_offset  # int64 + any int: int64


@triton.jit
def philox_uniform(seed, counters):
    """float32 uniforms in [0, 1) for an int64 counter tile (the first Philox4x32-10 word)."""
    c_lo = counters.to(tl.uint32)  # truncation keeps the low word
    c_hi = (counters >> 32).to(tl.uint32)  # counters are >= 0, so the shift brings no sign bits
    zero = c_lo * 0
    r, _, _, _ = tl.philox(seed, c_lo, c_hi, zero, zero)
    return tl.random.uint_to_uniform_float(r)


@triton.jit
def dropout_uniform(seed, base_offset, offs_rows, offs_cols, stride_row, stride_col):
    """The uniform tile behind ``dropout_keep`` (same arguments, without ``p``)."""
    return philox_uniform(seed, dropout_counters(base_offset, offs_rows, offs_cols, stride_row, stride_col))


@triton.jit
def dropout_keep(seed, base_offset, offs_rows, offs_cols, stride_row, stride_col, p):
    """Boolean tile keep[r, c] of the element with counter
    ``base_offset + offs_rows[r]*stride_row + offs_cols[c]*stride_col``: True where kept.

    A transposed tile (rows = keys, cols = queries, as in a dK/dV loop) is the same call with
    the strides swapped; no ``tl.trans`` needed."""
    u = dropout_uniform(seed, base_offset, offs_rows, offs_cols, stride_row, stride_col)
    return u >= p


@triton.jit
def attention_dropout_keep(seed, offset, bh, Mq, Mkv, offs_m, offs_n, p, TRANSPOSED: tl.constexpr = False):
    """keep tile of score block (offs_m queries x offs_n keys) of batch*head ``bh = b*H + h`` (a
    tensor, e.g. from ``tl.program_id``):
    counter ``offset + (bh*Mq + i)*Mkv + j``. ``TRANSPOSED=True`` gives the (offs_n x offs_m)
    tile of the same elements, for loops that hold S^T (dK/dV)."""
    base = bh.to(tl.int64) * Mq * Mkv + offset
    if TRANSPOSED:
        keep = dropout_keep(seed, base, offs_n, offs_m, 1, Mkv, p)
    else:
        keep = dropout_keep(seed, base, offs_m, offs_n, Mkv, 1, p)
    return keep


@triton.jit
def dropout_mask_kernel(U, Keep, seed, base_offset, n_rows, n_cols, stride_row, stride_col, p,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Write the uniforms (float32) and keep bits (int8) of an (n_rows, n_cols) block, row-major.

    For tests and debugging: the attention kernels call ``dropout_keep`` inline instead."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols)
    out = offs_r.to(tl.int64)[:, None] * n_cols + offs_c[None, :]
    u = dropout_uniform(seed, base_offset, offs_r, offs_c, stride_row, stride_col)
    keep = dropout_keep(seed, base_offset, offs_r, offs_c, stride_row, stride_col, p)
    tl.store(U + out, u, mask=inside)
    tl.store(Keep + out, keep.to(tl.int8), mask=inside)


@triton.jit
def attention_mask_kernel(Keep, seed, offset, Mq, Mkv, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          TRANSPOSED: tl.constexpr):
    """Write the int8 keep mask (B, H, Mq, Mkv) of an attention call through
    ``attention_dropout_keep``; grid (cdiv(Mq, BLOCK_M), cdiv(Mkv, BLOCK_N), B*H).

    For tests and debugging; ``TRANSPOSED=True`` builds each tile as S^T and stores it back
    transposed, so both layouts of the helper write the same mask."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = Keep + bh.to(tl.int64) * Mq * Mkv
    if TRANSPOSED:
        keep = attention_dropout_keep(seed, offset, bh, Mq, Mkv, offs_m, offs_n, p, TRANSPOSED=True)
        ptrs = base + offs_m[None, :].to(tl.int64) * Mkv + offs_n[:, None]
        inside = (offs_m[None, :] < Mq) & (offs_n[:, None] < Mkv)
    else:
        keep = attention_dropout_keep(seed, offset, bh, Mq, Mkv, offs_m, offs_n, p)
        ptrs = base + offs_m[:, None].to(tl.int64) * Mkv + offs_n[None, :]
        inside = (offs_m[:, None] < Mq) & (offs_n[None, :] < Mkv)
    tl.store(ptrs, keep.to(tl.int8), mask=inside)
