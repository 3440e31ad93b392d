"""Problem buckets: the unit the autotune cache stores winners for.

A bucket is everything that changes which kernel and config win, and nothing else: the mode
("fwd": a call without gradients; "bwd": a call with gradients, whose forward and backward
must run on one backend, timed together), dtype, head dim, causal, feature flags, the GQA
ratio, and Mq and Mkv rounded up to powers of two. Batch and head counts are left out: they
scale the grid, and the tuning grid holds B*H large enough to fill the device.

"The same kind" is every field but the two lengths; an unseen bucket borrows the nearest tuned
bucket of its kind (distance in log2 of the lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

from fa2dispatch.problem import AttentionProblem

MODES = ("fwd", "bwd")


def pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _log2(n: int) -> int:
    return n.bit_length() - 1


@dataclass(frozen=True)
class Bucket:
    mode: str
    dtype: str  # "float16"
    head_dim: int
    causal: bool
    group: int  # H // Hkv: 1 is MHA
    mq: int  # power of two >= Mq
    mkv: int  # power of two >= Mkv
    features: tuple[str, ...] = ()  # e.g. ("lse",) when the caller takes the lse (with gradients)

    @property
    def kind(self) -> tuple:
        return (self.mode, self.dtype, self.head_dim, self.causal, self.group, self.features)

    @property
    def key(self) -> str:
        """Readable, stable text key used in cache files: 'fwd/float16/d128/causal/g1/q4096/k4096'."""
        parts = [self.mode, self.dtype, f"d{self.head_dim}", "causal" if self.causal else "full",
                 f"g{self.group}", f"q{self.mq}", f"k{self.mkv}", *self.features]
        return "/".join(parts)

    @classmethod
    def from_key(cls, key: str) -> Bucket:
        """Inverse of ``key``; raises ValueError on a malformed key."""
        parts = key.split("/")
        if len(parts) < 7 or parts[0] not in MODES or parts[3] not in ("causal", "full"):
            raise ValueError(f"bucket key {key!r} is malformed")
        try:
            head_dim, group = int(parts[2].removeprefix("d")), int(parts[4].removeprefix("g"))
            mq, mkv = int(parts[5].removeprefix("q")), int(parts[6].removeprefix("k"))
        except ValueError as exc:
            raise ValueError(f"bucket key {key!r} is malformed") from exc
        return cls(parts[0], parts[1], head_dim, parts[3] == "causal", group, mq, mkv, tuple(parts[7:]))

    def distance(self, other: Bucket) -> int:
        """Log2 distance in lengths between buckets of one kind."""
        return abs(_log2(self.mq) - _log2(other.mq)) + abs(_log2(self.mkv) - _log2(other.mkv))


def bucket_of(problem: AttentionProblem) -> Bucket:
    # FlashAttention-2's features change the kernel (and which backends can run it), so a
    # feature call never borrows a plain bucket's winner.
    features = problem.feature_names + (("lse",) if problem.return_lse and problem.requires_grad else ())
    return Bucket(
        mode="bwd" if problem.requires_grad else "fwd",
        dtype=str(problem.dtype).removeprefix("torch."),
        head_dim=problem.D,
        causal=problem.causal,
        group=problem.group,
        mq=pow2_ceil(problem.Mq),
        mkv=pow2_ceil(problem.Mkv),
        features=features,
    )
