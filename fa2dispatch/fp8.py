"""FP8 (e4m3) inputs: quantization helpers, the Hadamard rotation, and descale validation.

FlashAttention-3's convention: q, k and v are ``torch.float8_e4m3fn`` with float32 descale
factors of shape (B, Hkv): the real value of an element is ``x8 * descale`` of its (batch,
head). ``quantize_fp8`` produces such pairs with amax/448 scaling (448 is e4m3's largest
finite value). ``q_descale`` may also be (B, H), one per query head, which is what
``attention(..., fp8=True)`` uses (finer than FA3's one per key/value-head group).

Incoherent processing (``hadamard=True``): Q and K are multiplied by the same random
orthogonal matrix R = diag(random signs) @ Walsh-Hadamard / sqrt(D) before quantization.
Q R (K R)^T = Q K^T, so the scores are unchanged, while an outlier channel is spread over all
D channels, which shrinks amax and with it the quantization step of every other element. The
signs come from a fixed seed, so results are deterministic. D must be a power of two (the
Walsh-Hadamard matrix exists for those sizes; 64, 128 and 256 are): other head dims are
refused with a ValueError rather than padded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
GRANULARITIES = ("per_head", "per_tensor")
OUT_DTYPES = (torch.bfloat16, torch.float16)
V_LAYOUTS = ("natural", "transposed")
HADAMARD_SEED = 0x5EED


@dataclass(frozen=True, eq=False)
class FP8Args:
    """The per-call tensors of an fp8 call, passed to the backend next to q, k and v (they are
    not hashable, so they are not part of the AttentionProblem). None: a descale of 1."""

    q_descale: torch.Tensor | None = None
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None


def _layout_axes(layout: str) -> tuple[int, int]:
    """(sequence axis, head axis) of a 4-d tensor in ``layout``."""
    if layout == "bshd":
        return 1, 2
    if layout == "bhsd":
        return 2, 1
    raise ValueError(f"layout={layout!r} is not supported (supported: 'bshd', 'bhsd')")


def quantize_fp8(x: torch.Tensor, granularity: str = "per_head", layout: str = "bshd"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (float16, bfloat16 or float32; (B, M, heads, D) for ``layout="bshd"``,
    (B, heads, M, D) for ``"bhsd"``) to e4m3 with amax/448 scaling.

    Returns ``(x8, descale)``: x8 float8_e4m3fn, same shape and layout (contiguous);
    descale float32 of shape (B, heads) with ``x ~= x8 * descale[b, h]``. ``"per_head"``: one
    scale per (batch, head); ``"per_tensor"``: one for the whole tensor, repeated into (B,
    heads) so it fits the same arguments. An all-zero slice gets descale 1.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x (shape {tuple(x.shape)}, dtype {x.dtype}): quantize_fp8 takes float16, bfloat16 "
                        "or float32")
    if x.dim() != 4:
        raise ValueError(f"x (shape {tuple(x.shape)}): expected a 4-d tensor for layout={layout!r}")
    if x.numel() == 0:  # an empty slice has no amax to scale by
        raise ValueError(f"x (shape {tuple(x.shape)}): every dimension must be >= 1")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not supported (supported: "
                         f"{', '.join(map(repr, GRANULARITIES))})")
    seq, head = _layout_axes(layout)
    xf = x.float()
    if granularity == "per_head":
        amax = xf.abs().amax(dim=(seq, 3), keepdim=True)  # (B, 1, heads, 1) or (B, heads, 1, 1)
    else:
        amax = xf.abs().amax().reshape(1, 1, 1, 1).expand(x.shape[0], *(
            (1, x.shape[2], 1) if layout == "bshd" else (x.shape[1], 1, 1)))
    descale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x8 = (xf / descale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8.contiguous(), descale.reshape(x.shape[0], x.shape[head]).contiguous()


@functools.lru_cache(maxsize=16)
def _rotation(d: int, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:  # Sylvester's construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator(device="cpu").manual_seed(HADAMARD_SEED + d)
    signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h / d**0.5).to(device=device, dtype=torch.float32)


def hadamard_rotation(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed random orthogonal (d, d) float32 matrix of ``hadamard=True`` (d a power of two)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard: head dim D={d} is not a power of two (supported: 1, 2, 4, ..., 256)")
    return _rotation(d, torch.device(device))


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ R`` over the last (head) dim, in float32: apply to both q and k (any layout).
    x: a floating-point tensor of >= 1 dims whose last dim D is a power of two."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x (shape {tuple(x.shape)}, dtype {x.dtype}): hadamard takes a floating-point tensor")
    if x.dim() < 1:
        raise ValueError(f"x (shape {tuple(x.shape)}): expected a tensor of >= 1 dims, the last the head dim")
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"x (shape {tuple(x.shape)}): hadamard: head dim D={d} (the last dim) is not a power of "
                         "two (supported: 1, 2, 4, ..., 256)")
    return x.float() @ hadamard_rotation(d, x.device)


def check_fp8_args(problem, q_descale, k_descale, v_descale) -> FP8Args | None:
    """Validate the descales of a call described by ``problem`` (AttentionProblem). Raises
    ValueError/TypeError naming the argument; returns the FP8Args (None when no descale)."""
    given = {"q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale}
    if all(t is None for t in given.values()):
        return None
    if not problem.is_fp8:
        names = ", ".join(n for n, t in given.items() if t is not None)
        raise ValueError(f"{names} given but q is {str(problem.dtype).removeprefix('torch.')}: descale factors "
                         "apply to float8_e4m3fn inputs only")
    for name, t in given.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        where = f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"
        if t.dtype != torch.float32:
            raise TypeError(f"{where}: must be float32")
        if t.device != problem.device:
            raise ValueError(f"{where}: must be on q's device {problem.device}")
        shapes = {(problem.B, problem.Hkv): "(B, Hkv)"}
        if name == "q_descale":
            shapes.setdefault((problem.B, problem.H), "(B, H)")
        if tuple(t.shape) not in shapes:
            expected = " or ".join(f"{label} = {shape}" for shape, label in shapes.items())
            raise ValueError(f"{where}: expected shape {expected}")
    return FP8Args(q_descale, k_descale, v_descale)


def quantize_inputs(q, k, v, layout: str, use_hadamard: bool):
    """``attention(..., fp8=True)``: (q8, k8, v8, FP8Args) with per-head scales (q's per query
    head), after the Hadamard rotation of q and k when asked."""
    with torch.no_grad():
        if use_hadamard:
            q, k = hadamard(q), hadamard(k)
        q8, qd = quantize_fp8(q, "per_head", layout)
        k8, kd = quantize_fp8(k, "per_head", layout)
        v8, vd = quantize_fp8(v, "per_head", layout)
    return q8, k8, v8, FP8Args(qd, kd, vd)
