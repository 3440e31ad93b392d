"""The on-disk autotune cache: where it lives, what a file holds, and lookups for dispatch.

One JSON file per device key. The file name carries the device (product name, arch) and the
hash of the kernel sources, so a kernel change starts a new file and never overwrites the
old one; the header carries the whole key::

    {"schema": 1,
     "device_key": {"name": ..., "arch": ..., "driver": ..., "toolkit": ..., "torch": ...,
                    "triton": ..., "cupy": ..., "kernel_hash": ...},
     "entries": {"fwd/float16/d128/full/g1/q4096/k4096":
                    {"backend": "triton", "config": {...}, "ms": 0.41, "default_ms": 0.44,
                     "spread": 0.004, "verified": true, "tried": [...]}}}

Matching a file against the device: another product, arch or kernel hash is a *hard* mismatch
(the file is ignored with a warning, and never overwritten); other driver, toolkit or library
versions are a *soft* mismatch (entries still serve, and the autotuner re-tunes them). A damaged
file is reported and treated as empty.

Lookup order: the user cache (``$FA2DISPATCH_CACHE_DIR``, else the platform's user cache dir),
then the cache shipped in ``fa2dispatch/autotune_cache``. The user's entry wins per bucket.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from .buckets import Bucket, bucket_of

log = logging.getLogger("fa2dispatch")

SCHEMA = 1
ENV_CACHE_DIR = "FA2DISPATCH_CACHE_DIR"
HARD_FIELDS = ("name", "arch", "kernel_hash")
SOFT_FIELDS = ("driver", "toolkit", "torch", "triton", "cupy")
# Kernel sources whose change invalidates tuned entries (relative to the backends package).
KERNEL_SOURCES = ("triton_fa2/kernels.py", "triton_fa2/launch.py", "triton_fp8/*.py", "cupy_cuda/*.cu")


class CacheError(Exception):
    """A cache file that cannot be used (damaged, wrong schema)."""


def user_dir() -> Path:
    """``$FA2DISPATCH_CACHE_DIR``, else the platform's user cache dir (platformdirs).
    Raises CacheError when neither is available."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
    except ImportError as exc:  # a declared dependency, but --no-deps installs exist
        raise CacheError(f"no user cache dir: platformdirs not installed and {ENV_CACHE_DIR} not set") from exc
    return Path(platformdirs.user_cache_dir("fa2dispatch", appauthor=False)) / "autotune"


def shipped_dir() -> Path:
    import fa2dispatch.autotune_cache as shipped

    return Path(shipped.__file__).parent


def locations() -> list[tuple[Path, str]]:
    """Directories searched, first wins: (path, "user" | "shipped"). Without a user dir
    (see ``user_dir``) only the shipped cache is read, with a warning once."""
    try:
        user = [(user_dir(), "user")]
    except CacheError as exc:
        warn_once(str(exc))
        user = []
    return [*user, (shipped_dir(), "shipped")]


@functools.lru_cache(maxsize=None)
def kernel_hash() -> str:
    """SHA-256 (first 16 hex digits) over the kernel sources, in a fixed order."""
    import fa2dispatch.backends as backends

    root = Path(backends.__file__).parent
    digest = hashlib.sha256()
    for pattern in KERNEL_SOURCES:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def device_key(device: DeviceInfo) -> dict:
    v = device.versions
    return {
        "name": device.name,
        "arch": device.arch,
        "driver": device.driver,
        "toolkit": device.toolkit,
        "torch": v.torch if v else None,
        "triton": v.triton if v else None,
        "cupy": v.cupy if v else None,
        "kernel_hash": kernel_hash(),
    }


def file_name(device: DeviceInfo) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device.name).strip("-").lower() or "device"
    return f"{slug}_{device.arch}_{kernel_hash()[:12]}.json"


def match(header: dict, device: DeviceInfo) -> tuple[str, str]:
    """("yes" | "soft" | "hard", reason) for a file's device key against this device."""
    want = device_key(device)
    hard = [f"{f} {header.get(f)!r} != {want[f]!r}" for f in HARD_FIELDS if header.get(f) != want[f]]
    if hard:
        return "hard", "; ".join(hard)
    # A simulated device has no driver: its versions cannot disagree with a real file's.
    soft = [f"{f} {header.get(f)!r} != {want[f]!r}" for f in SOFT_FIELDS
            if header.get(f) != want[f] and not (device.simulated and f in ("driver", "toolkit"))]
    if soft:
        return "soft", "; ".join(soft)
    return "yes", ""


def read(path: Path) -> dict:
    """The parsed file; raises CacheError if it is damaged or of another schema."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise CacheError(f"{path}: schema {found!r} (supported: {SCHEMA})")
    if not isinstance(data.get("device_key"), dict) or not isinstance(data.get("entries"), dict):
        raise CacheError(f"{path}: missing device_key or entries")
    return data


@dataclass(frozen=True)
class Entry:
    bucket: Bucket
    backend: str
    config: dict | None
    ms: float | None
    path: str
    # other backends' fastest verified configs, fastest first: (backend, config, ms)
    alternatives: tuple[tuple[str, dict | None, float], ...] = ()

    @property
    def source(self) -> str:
        return f"{self.bucket.key} in {self.path}"


@dataclass
class Table:
    """Every usable entry for one device, user entries over shipped ones, grouped by kind."""

    entries: dict[str, Entry] = field(default_factory=dict)
    by_kind: dict[tuple, list[Entry]] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        if entry.bucket.key in self.entries:
            return  # the first location wins
        self.entries[entry.bucket.key] = entry
        self.by_kind.setdefault(entry.bucket.kind, []).append(entry)

    def find(self, bucket: Bucket) -> tuple[Entry | None, bool]:
        """(entry, exact): the bucket's own entry, else the nearest of its kind."""
        exact = self.entries.get(bucket.key)
        if exact is not None:
            return exact, True
        same_kind = self.by_kind.get(bucket.kind)
        if not same_kind:
            return None, False
        return min(same_kind, key=lambda e: (bucket.distance(e.bucket), e.bucket.mq, e.bucket.mkv)), False


_tables: dict[tuple, Table] = {}
_warned: set[str] = set()
_lock = threading.Lock()


def warn_once(message: str) -> None:
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning("fa2dispatch: %s", message)


def _entries_of(path: Path, data: dict) -> list[Entry]:
    out = []
    for key, raw in data["entries"].items():
        try:
            bucket = Bucket.from_key(key)
            if not isinstance(raw, dict) or not isinstance(raw.get("backend"), str):
                raise ValueError("entry without a backend name")
            config = raw.get("config")
            if config is not None and not isinstance(config, dict):
                raise ValueError("config is not an object")
            others = raw.get("per_backend") or {}
            if not isinstance(others, dict):
                raise ValueError("per_backend is not an object")
            alternatives = tuple(sorted(((name, alt.get("config"), float(alt.get("ms", 0.0)))
                                         for name, alt in others.items() if isinstance(alt, dict)),
                                        key=lambda a: a[2]))
            out.append(Entry(bucket, raw["backend"], config, raw.get("ms"), str(path), alternatives))
        except ValueError as exc:
            warn_once(f"autotune cache {path}: entry {key!r} ignored ({exc})")
    return out


def table(device: DeviceInfo) -> Table:
    """The merged entries for ``device``, loaded once per process (``reload`` forgets them)."""
    key = (device.name, device.arch, device.simulated, os.environ.get(ENV_CACHE_DIR))
    found = _tables.get(key)
    if found is not None:
        return found
    merged = Table()
    name = file_name(device)
    for directory, _origin in locations():
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = read(path)
        except CacheError as exc:
            warn_once(f"autotune cache file is damaged and ignored: {exc}")
            continue
        verdict, why = match(data["device_key"], device)
        if verdict == "hard":
            warn_once(f"autotune cache {path} belongs to another device or kernel ({why}); ignored")
            continue
        for entry in _entries_of(path, data):
            merged.add(entry)
    _tables[key] = merged
    return merged


def reload() -> None:
    """Forget loaded tables (after the autotuner wrote, or the cache dir changed)."""
    _tables.clear()


def lookup(device: DeviceInfo, problem: AttentionProblem) -> tuple[Entry | None, bool]:
    """The tuned entry for ``problem`` on ``device`` (exact bucket or nearest of its kind)."""
    return table(device).find(bucket_of(problem))


def describe(device: DeviceInfo) -> list[dict]:
    """For the report: each location, whether a file for this device is there, and its state."""
    rows = []
    name = file_name(device)
    try:
        user_dir()
    except CacheError as exc:
        rows.append({"path": None, "origin": "user", "exists": False, "entries": 0, "match": "-",
                     "error": str(exc), "other_files": []})
    for directory, origin in locations():
        path = directory / name
        row = {"path": str(path), "origin": origin, "exists": path.is_file(), "entries": 0, "match": "-",
               "error": None}
        others = sorted(p.name for p in directory.glob("*.json") if p.name != name) if directory.is_dir() else []
        row["other_files"] = others
        if row["exists"]:
            try:
                data = read(path)
                verdict, why = match(data["device_key"], device)
                row["entries"] = len(data["entries"])
                row["match"] = verdict if verdict == "yes" else f"{verdict}: {why}"
            except CacheError as exc:
                row["error"] = str(exc)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ writing (the autotuner)


def soft_stamp(device: DeviceInfo) -> dict:
    """The soft fields of the device key, stored with each entry: an entry whose stamp differs
    from the current one is stale (still served, re-tuned by the next autotune run)."""
    key = device_key(device)
    return {f: key[f] for f in SOFT_FIELDS}


def is_fresh(entry: dict, device: DeviceInfo) -> bool:
    return entry.get("versions") == soft_stamp(device)


def write_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the autotuner writes: ``cache_dir`` if given, else the user cache dir."""
    return Path(cache_dir).expanduser() if cache_dir is not None else user_dir()


def read_entries(device: DeviceInfo, directory: Path) -> dict:
    """The entries of this device's file in ``directory`` ({} if there is none or it is damaged)."""
    path = directory / file_name(device)
    if not path.is_file():
        return {}
    try:
        data = read(path)
    except CacheError:
        return {}
    return data["entries"] if match(data["device_key"], device)[0] != "hard" else {}


def store(device: DeviceInfo, entries: dict[str, dict], directory: Path) -> Path:
    """Merge ``entries`` (bucket key -> entry) into this device's file in ``directory``.

    Read-modify-write under a file lock, so concurrent tuners lose no entry; the new file is
    written next to the old one and moved over it (``os.replace``), so a reader never sees half
    a file. A damaged file is replaced (its content was unusable); a file of another device or
    kernel is never overwritten. Raises CacheError when the directory cannot be written.
    """
    from filelock import FileLock, Timeout

    path = directory / file_name(device)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", timeout=60)
        with lock:
            merged: dict = {}
            if path.is_file():
                try:
                    data = read(path)
                except CacheError as exc:
                    warn_once(f"replacing a damaged autotune cache file ({exc})")
                else:
                    verdict, why = match(data["device_key"], device)
                    if verdict == "hard":
                        raise CacheError(f"{path} belongs to another device or kernel ({why}); not overwritten")
                    merged = data["entries"]
            merged.update(entries)
            payload = {"schema": SCHEMA, "device_key": device_key(device), "entries": dict(sorted(merged.items()))}
            _atomic_write(path, json.dumps(payload, indent=1) + "\n")
    except Timeout as exc:
        raise CacheError(f"{path}: lock held by another process for 60 s") from exc
    except OSError as exc:
        raise CacheError(f"cannot write {path} ({type(exc).__name__}: {exc})") from exc
    reload()
    return path


def _atomic_write(path: Path, text: str) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
