"""The on-disk autotune cache: where it lives, what a file holds, and lookups for dispatch.

One JSON file per device (product name and arch in the file name); the header carries the
whole device key, and every entry carries the hash of its backend's kernel sources::

    {"schema": 2,
     "device_key": {"name": ..., "arch": ..., "driver": ..., "toolkit": ..., "torch": ...,
                    "triton": ..., "cupy": ..., "kernel_hashes": {"triton": ..., "cupy": ...}},
     "entries": {"fwd/float16/d128/full/g1/q4096/k4096":
                    {"backend": "triton", "config": {...}, "kernel_hash": "...", "ms": 0.41,
                     "spread": 0.004, "verified": true, "versions": {...}, "tried": [...],
                     "per_backend": {"torch-sdpa-cudnn": {"config": null, "kernel_hash": null,
                                                          "ms": 0.39, ...}}}}}

Kernel hashes are per backend (``KERNEL_SOURCES``): changing the CuPy sources leaves the
tuned Triton and cuDNN results standing. Python sources are hashed without docstrings and
comment lines (``code_text``): documentation edits do not retire tuned results. A result whose backend's sources changed since it
was measured is dropped at load (with one warning); when that was the winner, the fastest
remaining verified runner-up of the entry serves until the next ``fa2dispatch autotune``,
which re-tunes the bucket. Backends without sources of ours (PyTorch SDPA) have no hash:
their kernels are torch's, whose version is a soft field below.

Matching a file against the device: another product or arch is a *hard* mismatch (the file is
ignored with a warning, and never overwritten); other driver, toolkit or library versions are a
*soft* mismatch (entries still serve, and the autotuner re-tunes them). A damaged file or one of
another schema is reported and treated as empty.

Lookup order: the user cache (``$FA2DISPATCH_CACHE_DIR``, else the platform's user cache dir),
then the cache shipped in ``fa2dispatch/autotune_cache``. The user's entry wins per bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

SCHEMA = 2  # 1: one kernel hash per file (any kernel change orphaned every backend's results)
ENV_CACHE_DIR = "FA2DISPATCH_CACHE_DIR"
HARD_FIELDS = ("name", "arch")
SOFT_FIELDS = ("driver", "toolkit", "torch", "triton", "cupy")
# Per backend, the sources (globs relative to the backends package) whose change invalidates
# that backend's tuned results: kernels and launchers, which decide what a config means.
KERNEL_SOURCES = {
    "triton": ("triton_fa2/kernels.py", "triton_fa2/launch.py", "triton_fa2/dropout.py",
               "triton_fa2/kernels_hopper.py", "triton_fa2/launch_hopper.py",
               "triton_fa2/kernels_gluon.py", "triton_fa2/kernels_gluon_ws.py", "triton_fa2/launch_gluon.py",
               "triton_fa2/kernels_gluon_bwd.py", "triton_fa2/launch_gluon_bwd.py"),
    "cupy": ("cupy_cuda/*.cu", "cupy_cuda/*.cuh", "cupy_cuda/launch.py"),
    "triton-fp8": ("triton_fp8/*.py", "triton_fa2/kernels_gluon.py", "triton_fa2/kernels_gluon_ws.py",
                   "triton_fa2/launch_gluon.py"),
}


class CacheError(Exception):
    """A cache file that cannot be used (damaged, wrong schema), or one that cannot be written.

    ``replaceable`` says whether the autotuner may write a new file over it: yes for content
    nobody can use (garbage, a truncated file, an older schema), no for a file it could not
    read (permissions, I/O errors: its content is unknown) or one a newer fa2dispatch wrote
    (another install sharing the cache dir would lose its results)."""

    def __init__(self, message: str, *, replaceable: bool = True):
        super().__init__(message)
        self.replaceable = replaceable


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


@functools.cache
def kernel_hash(backend: str) -> str | None:
    """SHA-256 (first 16 hex digits) over ``backend``'s kernel sources in a fixed order; None for
    a backend with no sources of ours (its kernels come with torch). Python sources are hashed
    without their documentation (``code_text``), so a docstring or comment edit does not retire
    the backend's tuned results; other files (.cu, .cuh) byte for byte."""
    from fa2dispatch import backends

    patterns = KERNEL_SOURCES.get(backend)
    if not patterns:
        return None
    root = Path(backends.__file__).parent
    digest = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(code_text(path.read_text(encoding="utf-8")).encode() if path.suffix == ".py"
                          else path.read_bytes())
    return digest.hexdigest()[:16]


def code_text(source: str) -> str:
    """``source`` without what does not run: docstrings (module, class, function) that stand on
    lines of their own, and lines that are only a comment. Line numbers come from ``ast``, which
    every Python version reports alike, so the text (and the hash) is the same on every machine."""
    import ast

    lines = source.splitlines()
    drop = {i for i, line in enumerate(lines) if line.lstrip().startswith("#")}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            start, end = first.lineno - 1, first.end_lineno - 1
            head = lines[start].lstrip()
            if head[:1] in "\"'rRuUbB" and lines[end].rstrip()[-1:] in "\"'":  # the docstring owns its lines
                drop.update(range(start, end + 1))
    return "\n".join(line.rstrip() for i, line in enumerate(lines) if i not in drop and line.strip())


def kernel_hashes() -> dict[str, str | None]:
    return {name: kernel_hash(name) for name in KERNEL_SOURCES}


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
        "kernel_hashes": kernel_hashes(),  # for the reader; each entry carries its own
    }


def file_name(device: DeviceInfo) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device.name).strip("-").lower() or "device"
    return f"{slug}_{device.arch}.json"


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
        raw = path.read_bytes()
    except OSError as exc:  # the content is unknown, not damaged: never written over
        raise CacheError(f"{path}: unreadable ({type(exc).__name__}: {exc})", replaceable=False) from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON; nesting too deep for the parser
        raise CacheError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        newer = isinstance(found, int) and not isinstance(found, bool) and found > SCHEMA
        raise CacheError(f"{path}: schema {found!r} (supported: {SCHEMA}"
                         + ("; written by a newer fa2dispatch)" if newer else ")"), replaceable=not newer)
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


def _current(backend: str, stamped) -> bool:
    """Whether a result stamped with ``stamped`` was measured on today's sources of ``backend``."""
    return stamped == kernel_hash(backend)


def _entries_of(path: Path, data: dict) -> list[Entry]:
    """The usable entries of one file. Results measured on other kernel sources of their backend
    are dropped (one warning per file and backend); an entry whose winner is dropped is served
    by its fastest current runner-up, and one with nothing current left is skipped."""
    out = []
    stale: dict[str, int] = {}
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
            results = [(raw["backend"], config, float(raw.get("ms") or 0.0), raw.get("kernel_hash"))]
            results += [(name, alt.get("config"), float(alt.get("ms", 0.0)), alt.get("kernel_hash"))
                        for name, alt in others.items() if isinstance(alt, dict)]
            for name, cfg, _, _ in results:
                # a config that does not parse is left to the dispatcher, which says so at lookup
                wrong = _config_problem(name, cfg, parse_errors=False)
                if wrong:
                    raise ValueError(wrong)
            current = []
            for name, cfg, ms, stamped in results:
                if _current(name, stamped):
                    current.append((name, cfg, ms))
                else:
                    stale[name] = stale.get(name, 0) + 1
            if not current:
                continue
            if current[0][0] == raw["backend"]:
                winner, rest = current[0], current[1:]
                winner = (winner[0], winner[1], raw.get("ms"))
            else:  # the winner's kernels changed: the fastest current runner-up serves
                ranked = sorted(current, key=lambda r: r[2])
                winner, rest = ranked[0], ranked[1:]
            alternatives = tuple(sorted(rest, key=lambda a: a[2]))
            out.append(Entry(bucket, winner[0], winner[1], winner[2], str(path), alternatives))
        except (ValueError, TypeError) as exc:
            warn_once(f"autotune cache {path}: entry {key!r} ignored ({exc})")
    for name, count in sorted(stale.items()):
        warn_once(f"autotune cache {path}: {count} result(s) of backend {name!r} were measured on other "
                  f"kernel sources and are ignored; run `fa2dispatch autotune` to re-tune them")
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
            warn_once(f"autotune cache {path} belongs to another device ({why}); ignored")
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
    """Measured with today's versions and, for the winner and every runner-up, today's kernel
    sources of its backend; anything else is re-tuned by the next autotune run."""
    if entry.get("versions") != soft_stamp(device) or not _current(entry.get("backend"), entry.get("kernel_hash")):
        return False
    others = entry.get("per_backend") or {}
    return all(_current(name, alt.get("kernel_hash")) for name, alt in others.items() if isinstance(alt, dict))


def changed_backends(entry: dict, device: DeviceInfo, backends) -> set[str] | None:
    """For a stale entry: which of ``backends`` a partial re-tune must search again, the ones
    with kernel sources of ours not measured on today's sources (recorded with another hash, or
    not recorded at all). None when the entry must be re-tuned whole: measured with other
    versions (torch, triton, driver ...), fresh, or malformed."""
    if entry.get("versions") != soft_stamp(device) or _malformed(entry):
        return None
    recorded = {name: alt.get("kernel_hash") for name, alt in (entry.get("per_backend") or {}).items()}
    recorded[entry["backend"]] = entry.get("kernel_hash")
    changed = {name for name in backends if kernel_hash(name) is not None and recorded.get(name) != kernel_hash(name)}
    return changed or None


def write_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the autotuner writes: ``cache_dir`` if given, else the user cache dir."""
    return Path(cache_dir).expanduser() if cache_dir is not None else user_dir()


def _malformed(raw) -> str | None:
    """Why an entry cannot be used as the tuner's incumbent, or None: the fields the tuner
    reads (backend names, configs that fit their backends) have the right types."""
    if not isinstance(raw, dict) or not isinstance(raw.get("backend"), str):
        return "entry without a backend name"
    others = raw.get("per_backend") or {}
    if not isinstance(others, dict) or not all(isinstance(alt, dict) for alt in others.values()):
        return "per_backend is not an object of objects"
    for name, config in [(raw["backend"], raw.get("config")), *((n, a.get("config")) for n, a in others.items())]:
        problem = _config_problem(name, config)
        if problem:
            return problem
    return None


def _config_problem(name: str, config, parse_errors: bool = True) -> str | None:
    """Why ``config`` cannot be ``name``'s: not an object, not its fields (``parse_errors``),
    or a field of the wrong type (``"num_warps": true``); None if it fits or the backend is not
    registered here."""
    from fa2dispatch.backends import BACKENDS

    if config is not None and not isinstance(config, dict):
        return f"config of {name!r} is not an object"
    if name not in BACKENDS:
        return None
    try:
        parsed = BACKENDS[name].config_from_dict(config)
    except ValueError as exc:
        return str(exc) if parse_errors else None
    wrong = _wrong_field_type(parsed)
    return f"config of {name!r}: {wrong}" if wrong else None


_FIELD_TYPES = {"int": int, "bool": bool, "float": float, "str": str, "None": type(None)}


def _wrong_field_type(config) -> str | None:
    """A config field whose JSON value has another type than the field declares ("block_m":
    "64"), which would break the arithmetic of the search space; None if all fit. Fields
    annotated with types other than plain int/bool/float/str/None are not checked."""
    if config is None:
        return None
    for f in dataclasses.fields(config):
        allowed = [_FIELD_TYPES.get(part.strip()) for part in str(f.type).split("|")]
        value = getattr(config, f.name)
        if None not in allowed and type(value) not in allowed:  # bool is not an int here
            return f"{f.name}={value!r} (supported: {f.type})"
    return None


def read_entries(device: DeviceInfo, directory: Path) -> dict:
    """The well-formed entries of this device's file in ``directory`` ({} if there is none or
    it is damaged); a malformed entry is left out with a warning, and the tuner re-tunes it."""
    path = directory / file_name(device)
    if not path.is_file():
        return {}
    try:
        data = read(path)
    except CacheError:
        return {}
    if match(data["device_key"], device)[0] == "hard":
        return {}
    out = {}
    for key, raw in data["entries"].items():
        why = _malformed(raw)
        if why is None:
            out[key] = raw
        else:
            warn_once(f"autotune cache {path}: entry {key!r} ignored ({why})")
    return out


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
                    if not exc.replaceable:
                        raise CacheError(f"{exc}; not overwritten", replaceable=False) from exc
                    warn_once(f"replacing a damaged autotune cache file ({exc})")
                else:
                    verdict, why = match(data["device_key"], device)
                    if verdict == "hard":
                        raise CacheError(f"{path} belongs to another device ({why}); not overwritten")
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


def _umask() -> int:
    """The process umask, read without changing it (Linux); else the usual 0o022."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a new file beside ``path`` and move it over ``path``; on any failure
    (disk full, permissions) the new file is removed and ``path`` is left as it was.

    The new file takes the old one's permissions, or 0o666 less the umask as any file the user
    writes: ``mkstemp`` makes it 0o600, unreadable to the other users of a shared cache dir."""
    import tempfile

    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if hasattr(os, "fchmod"):  # Unix; Windows has no such modes
                os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
