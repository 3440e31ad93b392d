"""The dropout RNG: the Triton tile functions (backends/triton_fa2/dropout.py) and their
PyTorch twin (fa2dispatch/rng.py) give the same bits, the twin is Philox4x32-10 as published,
masks have the right statistics and change with seed and offset, seeds are reproducible, and
the argument checks name the argument.

The bit-for-bit tests compare exact float32 bit patterns, never with a tolerance: the
reference backend must drop exactly the elements a kernel drops."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fa2dispatch import rng

# Counter bases: 0, a tile straddling 2^32 (low word wraps, high word 0 -> 1), past 2^40,
# and near the top of the 2^63 range that offsets + counters may reach.
BASES = [0, 2**32 - 700, 2**40 + 12345, 2**62 + 3]


def _seeds(n: int, seed: int = 0) -> list[int]:
    """Seeds across the key space: one below 2^31 (an i32 kernel argument), the rest 63-bit."""
    g = torch.Generator().manual_seed(seed)
    return [12345] + [int(v) for v in torch.randint(2**31, 2**63 - 1, (n - 1,), generator=g, dtype=torch.int64)]


def _tile_twin(seed, base, n_rows, n_cols, stride_row, stride_col):
    rows = torch.arange(n_rows, dtype=torch.int64)[:, None]
    cols = torch.arange(n_cols, dtype=torch.int64)[None, :]
    return rng.philox_uniform(seed, base + rows * stride_row + cols * stride_col)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# ----------------------------------------------------------------------------- the twin alone


@pytest.mark.parametrize("counter, key, expected", [
    # Random123 known-answer vectors for philox4x32-10 (kat_vectors, Salmon et al. 2011).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
], ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    words = rng.philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_uniform_conversion_edges():
    """Triton's uint_to_uniform_float: 0 and 2^32-1 map to 0, 2^31-1 and 2^31 to the largest
    value, which is below 1 in float32."""
    bits = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    u = rng.bits_to_uniform(bits)
    scale = torch.tensor(rng.UNIFORM_SCALE, dtype=torch.float32)
    assert u.dtype == torch.float32
    assert u[0] == 0 and u[5] == 0 and u[1] == scale and u[4] == scale
    assert u[2] == u[3] == torch.tensor(2**31 - 1, dtype=torch.float32) * scale
    assert u[2] < 1.0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction(p):
    """Over 2^17 elements the kept fraction is 1 - p within 5 binomial standard deviations, and
    the uniforms' mean is 1/2 within 5 standard deviations (sd of U(0,1) is 1/sqrt(12))."""
    n = 2**17
    seed, offset = rng.draw_seed(torch.Generator().manual_seed(int(p * 100)))
    keep = rng.attention_dropout_mask(seed, offset, 2, 4, 128, 128, p)
    assert keep.shape == (2, 4, 128, 128) and keep.dtype == torch.bool
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept {frac:.5f} for p={p}"
    u = rng.philox_uniform(seed, offset + torch.arange(n))
    assert abs(u.double().mean().item() - 0.5) < 5 / math.sqrt(12 * n)


def test_p_zero_keeps_everything():
    assert rng.attention_dropout_mask(7, 0, 1, 2, 33, 65, 0.0).all()


def test_tie_keeps():
    """keep = uniform >= p: an element whose uniform equals p (as float32) is kept."""
    u = rng.philox_uniform(3, torch.arange(64))
    assert rng.keep_from_uniform(u, u[10].item())[10]


def test_masks_change_with_seed_and_offset():
    """Another seed or offset gives another mask (about half the bits differ at p=0.5); an
    offset moves the counter, so offset + 1 is the same stream shifted by one element."""
    shape = (1, 2, 64, 64)
    base = rng.attention_dropout_mask(1, 2**33, *shape, 0.5)
    for other in (rng.attention_dropout_mask(2, 2**33, *shape, 0.5), rng.attention_dropout_mask(1, 2**34, *shape, 0.5)):
        differ = (base != other).double().mean().item()
        assert 0.4 < differ < 0.6, differ
    shifted = rng.attention_dropout_mask(1, 2**33 + 1, *shape, 0.5)
    assert torch.equal(shifted.flatten()[:-1], base.flatten()[1:])


def test_high_counter_word_is_used():
    """Counters c and c + 2^32 differ only in the high word: their numbers must differ
    (a generator that truncated counters to 32 bits would repeat itself here)."""
    c = torch.arange(4096, dtype=torch.int64) + 2**40
    assert (rng.philox_bits(99, c) != rng.philox_bits(99, c + 2**32)).double().mean() > 0.99


def test_dropout_keep_mask_is_the_attention_convention():
    """attention_dropout_mask's element (b, h, i, j) is dropout_keep_mask's row (b*H+h)*Mq + i,
    column j, with row stride Mkv."""
    B, H, Mq, Mkv, seed, offset = 2, 3, 5, 7, 314159, 2**32 - 50
    full = rng.attention_dropout_mask(seed, offset, B, H, Mq, Mkv, 0.3)
    b, h = 1, 2
    block = rng.dropout_keep_mask(seed, offset + (b * H + h) * Mq * Mkv, Mq, Mkv, Mkv, 0.3)
    assert torch.equal(full[b, h], block)


def test_twin_argument_errors():
    with pytest.raises(ValueError, match="seed"):
        rng.philox_uniform(-1, torch.arange(4))
    with pytest.raises(TypeError, match="counters"):
        rng.philox_uniform(1, torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="counters"):
        rng.philox_uniform(1, torch.arange(4) - 2)
    with pytest.raises(ValueError, match="offset"):
        rng.attention_dropout_mask(1, 2**63 - 3, 1, 1, 2, 2, 0.1)


# ----------------------------------------------------------------------------- seeds


def test_draw_seed_reproducible_under_manual_seed():
    torch.manual_seed(1234)
    first = rng.draw_seed()
    torch.manual_seed(1234)
    assert rng.draw_seed() == first
    second = rng.draw_seed()  # the stream moves on
    assert second != first
    torch.manual_seed(1235)
    assert rng.draw_seed() != first
    seed, offset = first
    assert 0 <= seed < 2**63 and 0 <= offset < 2**62


def test_draw_seed_consumes_a_fixed_amount():
    """Two draws from one seeding leave the default generator where two draws always do."""
    torch.manual_seed(5)
    rng.draw_seed(), rng.draw_seed()
    after = torch.rand(3)
    torch.manual_seed(5)
    rng.draw_seed(), rng.draw_seed()
    assert torch.equal(torch.rand(3), after)


def test_draw_seed_with_generator():
    """An explicit generator is reproducible and leaves the global generator alone."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = rng.draw_seed(torch.Generator().manual_seed(42))
    b = rng.draw_seed(torch.Generator().manual_seed(42))
    c = rng.draw_seed(torch.Generator().manual_seed(43))
    assert a == b and a != c
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("p", [0, 0.0, 0.1, 0.999999])
def test_check_dropout_p_accepts(p):
    assert rng.check_dropout_p(p) == float(p)


@pytest.mark.parametrize("p, error", [
    (True, TypeError), ("0.1", TypeError), (None, TypeError), (torch.tensor(0.1), TypeError),
    (float("nan"), ValueError), (-0.1, ValueError), (1.0, ValueError), (1, ValueError), (float("inf"), ValueError),
], ids=["bool", "str", "none", "tensor", "nan", "negative", "one", "int-one", "inf"])
def test_check_dropout_p_refuses(p, error):
    with pytest.raises(error, match="dropout_p"):
        rng.check_dropout_p(p)


def test_check_generator():
    g = torch.Generator()
    assert rng.check_generator(None) is None and rng.check_generator(g) is g
    for bad in (0, "cpu", torch.device("cpu")):
        with pytest.raises(TypeError, match="generator"):
            rng.check_generator(bad)
    with pytest.raises(TypeError, match="generator"):
        rng.draw_seed(123)


# ----------------------------------------------------------------------------- Triton vs twin


def _run_tile_kernel(seed, base, n_rows, n_cols, stride_row, stride_col, p, device="cpu"):
    import triton

    from fa2dispatch.backends.triton_fa2 import dropout

    u = torch.full((n_rows, n_cols), float("nan"), device=device)
    keep = torch.full((n_rows, n_cols), -1, dtype=torch.int8, device=device)
    grid = (triton.cdiv(n_rows, 16), triton.cdiv(n_cols, 32))
    dropout.dropout_mask_kernel[grid](u, keep, seed, base, n_rows, n_cols, stride_row, stride_col, p,
                                      BLOCK_R=16, BLOCK_C=32)
    return u, keep


@pytest.mark.interpreter
@pytest.mark.parametrize("base", BASES, ids=["0", "2^32-700", "2^40+", "2^62+"])
def test_triton_tile_matches_twin(base):
    """Odd tile sizes (ragged edges on both axes), row stride != n_cols, a column stride."""
    for seed in _seeds(3, seed=base % 1000):
        twin = _tile_twin(seed, base, 19, 45, 53, 1)
        p = twin[2, 3].item()  # a float32 value: element (2, 3) sits exactly on the threshold
        u, keep = _run_tile_kernel(seed, base, 19, 45, 53, 1, p)
        assert torch.equal(_bits(u), _bits(twin)), f"seed {seed} base {base}"
        assert keep[2, 3] == 1, "keep is uniform >= p: a tie keeps"
        assert torch.equal(keep.bool(), rng.keep_from_uniform(twin, p)), f"seed {seed} base {base}"
    u, _ = _run_tile_kernel(seed, base, 17, 9, 1, 17, 0.3)  # a transposed (column-major) tile
    assert torch.equal(_bits(u), _bits(_tile_twin(seed, base, 17, 9, 1, 17)))


@pytest.mark.interpreter
def test_triton_tile_is_tl_rand():
    """The explicit (low word, high word) counter split is what tl.rand does with int64
    offsets: the documented generator is Triton's own."""
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(Out, seed, base, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Out + offs, tl.rand(seed, offs.to(tl.int64) + base))

    seed, base, n = 2**62 + 17, 2**32 - 64, 128
    ours, _ = _run_tile_kernel(seed, base, 1, n, 0, 1, 0.5)
    theirs = torch.empty(n)
    rand_kernel[(1,)](theirs, seed, base, N=n)
    assert torch.equal(_bits(ours[0]), _bits(theirs))


@pytest.mark.interpreter
@pytest.mark.parametrize("transposed", [False, True], ids=["s", "s-transposed"])
def test_triton_attention_mask_matches_twin(transposed):
    """attention_dropout_keep (both tile orientations) writes attention_dropout_mask's mask,
    odd lengths with ragged last blocks and an offset whose counters cross 2^32."""
    import triton

    from fa2dispatch.backends.triton_fa2 import dropout

    B, H, Mq, Mkv, p = 2, 3, 37, 45, 0.25
    seed, offset = 2**62 + 99, 2**32 - 2000
    keep = torch.full((B, H, Mq, Mkv), -1, dtype=torch.int8)
    grid = (triton.cdiv(Mq, 16), triton.cdiv(Mkv, 32), B * H)
    dropout.attention_mask_kernel[grid](keep, seed, offset, Mq, Mkv, p, BLOCK_M=16, BLOCK_N=32, TRANSPOSED=transposed)
    assert torch.equal(keep.bool(), rng.attention_dropout_mask(seed, offset, B, H, Mq, Mkv, p))


@pytest.mark.gpu
def test_gpu_tile_matches_twin():
    """On a GPU: the compiled kernel, the twin on CUDA and the twin on CPU agree bit for bit
    (int->float conversion and the float32 multiply round the same in all three)."""
    for seed in _seeds(4, seed=7):
        for base in BASES:
            u, keep = _run_tile_kernel(seed, base, 130, 257, 300, 1, 0.3, device="cuda")
            rows = torch.arange(130, device="cuda")[:, None]
            cols = torch.arange(257, device="cuda")[None, :]
            twin_cuda = rng.philox_uniform(seed, base + rows * 300 + cols)
            assert torch.equal(_bits(u), _bits(twin_cuda)), f"seed {seed} base {base}"
            assert torch.equal(_bits(u).cpu(), _bits(_tile_twin(seed, base, 130, 257, 300, 1)))
            assert torch.equal(keep.bool(), rng.keep_from_uniform(twin_cuda, 0.3))


# ----------------------------------------------------------------------------- offline compile

_COMPILE = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fa2dispatch.backends.triton_fa2 import dropout
target = GPUTarget("cuda", 90, 32)
rows = []
sig = {"U": "*fp32", "Keep": "*i8", "seed": "i64", "base_offset": "i64", "n_rows": "i32", "n_cols": "i32",
       "stride_row": "i64", "stride_col": "i64", "p": "fp32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
kernels = [(dropout.dropout_mask_kernel, sig, {"BLOCK_R": 64, "BLOCK_C": 64})]
sig = {"Keep": "*i8", "seed": "i64", "offset": "i64", "Mq": "i32", "Mkv": "i32", "p": "fp32",
       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "TRANSPOSED": "constexpr"}
for t in (False, True):
    kernels.append((dropout.attention_mask_kernel, sig, {"BLOCK_M": 128, "BLOCK_N": 64, "TRANSPOSED": t}))
for fn, sig, constexprs in kernels:
    c = triton.compile(ASTSource(fn, sig, constexprs), target=target)
    rows.append({"kernel": fn.__name__, "mulhi": "mul.hi.u32" in c.asm["ptx"], "cubin": len(c.asm["cubin"])})
print(json.dumps(rows))
"""


@pytest.mark.compile
def test_dropout_compiles_for_sm90():
    """The tile functions compile for sm_90 inside kernels (Philox's 32-bit mulhi in the PTX)."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend to compile for sm_90")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 3
    for row in rows:
        assert row["mulhi"] and row["cubin"] > 0, row
