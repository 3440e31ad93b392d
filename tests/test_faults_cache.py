"""Faults of the autotune cache on disk: truncated files, garbage, other schemas, another
device's file, unreadable files, read-only directories, a full disk, and eight tuning processes
writing one file at once. Each must end without a crash, without a corrupt file and without a
lost entry, and say why in a warning. (test_autotune.py and test_cache_lookup.py hold the plain
round trip and the first damaged / read-only / concurrent cases; this file covers the rest.)"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
import torch

from fa2dispatch import dispatch
from fa2dispatch.autotune import cache, tuner
from fa2dispatch.autotune.buckets import bucket_of
from fa2dispatch.autotune.timer import Timing
from fa2dispatch.backends.triton_fa2.config import TritonConfig
from fa2dispatch.hardware import device_info, simulated_device
from fa2dispatch.problem import AttentionProblem

H100 = simulated_device("h100")
CPU = device_info(torch.device("cpu"))
TUNED = TritonConfig(block_m=64, block_n=64, num_warps=4, num_stages=3).as_dict()


def problem(**overrides) -> AttentionProblem:
    fields = dict(B=2, H=16, Hkv=16, Mq=4096, Mkv=4096, D=128, dtype=torch.float16, device=torch.device("cpu"),
                  layout="bshd", causal=False, softmax_scale=128**-0.5)
    return AttentionProblem(**{**fields, **overrides})


KEY = bucket_of(problem()).key
KEY64 = bucket_of(problem(D=64)).key


def entry(backend="triton", config=TUNED, device=H100, **extra) -> dict:
    return {"backend": backend, "config": config, "ms": 1.0, "spread": 0.01, "kernel_hash": cache.kernel_hash(backend),
            "versions": cache.soft_stamp(device), **extra}


@pytest.fixture
def directory(tmp_path, monkeypatch):
    """The user cache dir, empty; the conftest fixture already keeps the shipped cache out."""
    user = tmp_path / "cache"
    user.mkdir()
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(user))
    cache.reload()
    dispatch.clear_memo()
    cache._warned.clear()  # warn_once is per process: each test must see its own warnings
    yield user
    cache.reload()
    dispatch.clear_memo()


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "fa2dispatch")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def select(**overrides):
    return dispatch.select(problem(**overrides), device=H100)


# ------------------------------------------------------------------ the tuner on CPU, without kernels


def flat_timer(fn) -> Timing:
    """Every candidate takes 1 ms: the tuner's rules pick the default, no kernel runs."""
    return Timing(1.0, 0.01, 20)


def tiny_grid(**changes) -> tuner.Grid:
    base = dict(dtypes=("float16",), head_dims=(16,), causal=(False,), lengths=((16, 16),), modes=("fwd", "bwd"),
                backends=("reference", "triton"), extras=())
    return tuner.Grid(**{**base, **changes})


@pytest.fixture
def small_tuning(monkeypatch):
    monkeypatch.setattr(tuner, "TOKENS", 32)
    monkeypatch.setattr(tuner, "HIDDEN", 32)


def tune(directory: Path, grid: tuner.Grid | None = None, **kwargs) -> list[tuner.BucketResult]:
    return tuner.run(grid or tiny_grid(), CPU, flat_timer, directory, verifier=lambda *a: None, **kwargs)


TINY_FWD = "fwd/float16/d16/full/g1/q16/k16"
TINY_BWD = "bwd/float16/d16/full/g1/q16/k16"


# ------------------------------------------------------------------ truncated and garbage files


def stored_file(directory: Path) -> Path:
    """A real file as the tuner writes it: two entries, one with a runner-up."""
    cudnn = {"config": None, "kernel_hash": None, "ms": 1.2, "spread": 0.01}
    cache.store(H100, {KEY: entry(per_backend={"torch-sdpa-cudnn": cudnn}), KEY64: entry()}, directory)
    return directory / cache.file_name(H100)


def test_a_file_truncated_anywhere_is_damaged_never_fatal(directory, caplog):
    """Every cut of a real file (a crash mid-write on a filesystem without atomic rename, a
    copy that ran out of space) reads as a damaged file: CacheError, which the dispatcher turns
    into the default choice with a warning, and the next store replaces it."""
    path = stored_file(directory)
    whole = path.read_bytes()
    cuts = sorted({0, 1, len(whole) // 2, len(whole) - 2, *range(7, len(whole) - 1, 97)})
    for cut in cuts:
        path.write_bytes(whole[:cut])
        with pytest.raises(cache.CacheError, match="unreadable") as info:
            cache.read(path)
        assert info.value.replaceable, cut
    cache.reload()
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert select().source == "default"
        cache.store(H100, {KEY: entry()}, directory)
    text = warnings_text(caplog)
    assert f"autotune cache file is damaged and ignored: {path}: unreadable" in text
    assert "replacing a damaged autotune cache file" in text
    assert list(cache.read(path)["entries"]) == [KEY] and select().source == "tuned"


GARBAGE = {
    "empty": b"",
    "nul bytes": b"\0" * 4096,
    "random bytes": random.Random(9).randbytes(2048),
    "invalid utf-8": b'{"schema": 2, "device_key": {"name": "\xff\xfe"}, "entries": {}}',
    "utf-16": json.dumps({"schema": 2, "device_key": {}, "entries": {}}).encode("utf-16"),
    "nested 100k deep": b'{"schema": 2, "device_key": ' + b"[" * 100_000 + b"]" * 100_000 + b', "entries": {}}',
    "a number": b"2",
    "null": b"null",
    "entries not an object": b'{"schema": 2, "device_key": {}, "entries": [1, 2]}',
    "device_key not an object": b'{"schema": 2, "device_key": "h100", "entries": {}}',
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_files_are_ignored_reported_and_replaced(directory, small_tuning, caplog, content):
    """Garbage in place of the file: the dispatcher ignores it (default choice, one warning),
    the report names the error, and both writers (store, the tuner) replace it with a good file.
    (Nesting 100k deep made json raise RecursionError, which crashed store and the tuner.)"""
    for device in (H100, CPU):
        (directory / cache.file_name(device)).write_bytes(content)
    cache.reload()
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert select().source == "default"
        [row] = [r for r in cache.describe(H100) if r["origin"] == "user"]
        assert row["exists"] and row["entries"] == 0 and row["error"]
        cache.store(H100, {KEY: entry()}, directory)
        results = tune(directory)
    assert "autotune cache file is damaged and ignored" in warnings_text(caplog)
    assert list(cache.read(directory / cache.file_name(H100))["entries"]) == [KEY]
    assert [r.status for r in results] == ["tuned", "tuned"] and not any(r.note for r in results)
    assert set(cache.read(directory / cache.file_name(CPU))["entries"]) == {TINY_FWD, TINY_BWD}
    assert leftovers(directory) == []


MALFORMED = {
    "a number": 1,
    "a list": [],
    "no backend": {"config": None},
    "backend a list": {"backend": ["triton"], "config": None},
    "config a string": {"backend": "triton", "config": "64x64"},
    "unknown config field": {"backend": "triton", "config": {**TUNED, "block_q": 64}},
    "config field a string": {"backend": "triton", "config": {**TUNED, "block_m": "64"}},
    "config field null": {"backend": "triton", "config": {**TUNED, "block_m": None}},
    "config field a bool": {"backend": "triton", "config": {**TUNED, "num_warps": True}},
    "per_backend a list": {"backend": "reference", "config": None, "per_backend": [1]},
    "runner-up a string": {"backend": "reference", "config": None, "per_backend": {"triton": "fast"}},
    "runner-up config field a float": {"backend": "reference", "config": None,
                                       "per_backend": {"triton": {"config": {**TUNED, "block_n": 64.5}}}},
}


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_entries_in_a_valid_file_never_crash_the_tuner_or_a_call(directory, small_tuning, caplog, bad):
    """A hand-edited or foreign-version entry, stamped fresh so the tuner would otherwise keep
    it: the tuner warns, re-tunes the bucket and replaces the entry; a call in that bucket gets
    a working choice. The tuner read such an entry as its incumbent and as the Triton base of
    the backward bucket, and crashed (AttributeError, KeyError, TypeError) before the fix."""
    stamp = {"versions": cache.soft_stamp(CPU), "kernel_hash": cache.kernel_hash("triton")}
    raw = {**bad, **stamp} if isinstance(bad, dict) else bad
    path = directory / cache.file_name(CPU)
    path.write_text(json.dumps({"schema": cache.SCHEMA, "device_key": cache.device_key(CPU),
                                "entries": {TINY_FWD: raw, TINY_BWD: raw}}))
    cache.reload()
    tiny = AttentionProblem(B=1, H=2, Hkv=2, Mq=16, Mkv=16, D=16, dtype=torch.float16, device=torch.device("cpu"),
                            layout="bshd", causal=False, softmax_scale=0.25)
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        decision = dispatch.select(tiny)  # the cache never breaks a call, nor serves a malformed entry
        assert (decision.backend.name, decision.source) == ("reference", "default")
        results = tune(directory, tiny_grid(modes=("bwd",)))  # the backward bucket reads the forward entry
        results += tune(directory, tiny_grid(modes=("fwd",)))
    assert [r.status for r in results] == ["tuned", "tuned"]
    assert f"entry '{TINY_BWD}' ignored" in warnings_text(caplog)
    entries = cache.read(path)["entries"]
    assert all(cache._malformed(entries[k]) is None and cache.is_fresh(entries[k], CPU) for k in (TINY_FWD, TINY_BWD))


# ------------------------------------------------------------------ other schemas, other devices, unreadable files


def write_file(directory: Path, device=H100, schema=cache.SCHEMA, **key_changes) -> Path:
    path = directory / cache.file_name(device)
    path.write_text(json.dumps({"schema": schema, "device_key": {**cache.device_key(device), **key_changes},
                                "entries": {KEY: entry(device=device)}}))
    cache.reload()
    return path


def test_an_older_schema_is_ignored_and_replaced(directory, caplog):
    path = write_file(directory, schema=1)
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert select().source == "default"
        cache.store(H100, {KEY64: entry()}, directory)
    assert "schema 1 (supported: 2)" in warnings_text(caplog)
    assert list(cache.read(path)["entries"]) == [KEY64]


def test_a_newer_schema_is_ignored_and_never_overwritten(directory, small_tuning, caplog):
    """Two installs sharing the user cache dir: the older one must not wipe what the newer one
    tuned (store replaced any file of another schema as "damaged" before the fix)."""
    h100_file = write_file(directory, schema=cache.SCHEMA + 1)
    cpu_file = write_file(directory, device=CPU, schema=cache.SCHEMA + 1)
    before = h100_file.read_bytes(), cpu_file.read_bytes()
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert select().source == "default"
        with pytest.raises(cache.CacheError, match="written by a newer fa2dispatch.*not overwritten"):
            cache.store(H100, {KEY64: entry()}, directory)
        results = tune(directory)
    assert (h100_file.read_bytes(), cpu_file.read_bytes()) == before
    assert [r.status for r in results] == ["tuned", "tuned"]
    assert all(r.note.startswith("not stored: ") and "newer fa2dispatch" in r.note for r in results)
    text = warnings_text(caplog)
    assert f"schema {cache.SCHEMA + 1} (supported: {cache.SCHEMA}; written by a newer fa2dispatch)" in text
    assert "autotune results not stored: " in text  # the tuner says why, not only in its result notes
    assert leftovers(directory) == []


def test_another_devices_file_is_kept_and_the_tuner_says_why(directory, small_tuning, caplog):
    """A file under this device's name whose header names another product (copied from
    another machine): ignored for lookups, never overwritten, the tuner goes on and warns."""
    path = write_file(directory, device=CPU, name="NVIDIA H200", arch="sm_90")
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert cache.lookup(CPU, problem()) == (None, False)
        results = tune(directory)
    assert path.read_bytes() == before
    assert [r.status for r in results] == ["tuned", "tuned"]
    assert all("belongs to another device" in r.note for r in results)
    text = warnings_text(caplog)
    assert "belongs to another device (name 'NVIDIA H200' != 'cpu'; arch 'sm_90' != 'cpu'); ignored" in text
    assert "autotune results not stored: " in text and "not overwritten" in text


def test_a_file_that_cannot_be_read_is_not_overwritten(directory, caplog):
    """A read that fails (EACCES, EIO) says nothing about the content: store refuses to write
    over it rather than replace it as damaged (it did before the fix)."""
    path = write_file(directory)
    before = path.read_bytes()
    real = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        mp.setattr(Path, "read_bytes", denied)
        assert select().source == "default"
        with pytest.raises(cache.CacheError, match="unreadable .*PermissionError.*not overwritten"):
            cache.store(H100, {KEY64: entry()}, directory)
    assert path.read_bytes() == before
    assert "damaged and ignored" in warnings_text(caplog)


# ------------------------------------------------------------------ read-only directories and a full disk


def test_a_read_only_directory_really_chmod(directory, small_tuning, caplog):
    """The real thing: chmod 0o500. Root ignores directory modes, so there (CI containers)
    the next test simulates it."""
    path = stored_file(directory)
    before = path.read_bytes()
    directory.chmod(0o500)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes here (simulated in the next test)")
        with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
            with pytest.raises(cache.CacheError, match="cannot write .*Permission"):
                cache.store(H100, {KEY64: entry(config=None, backend="torch-sdpa-cudnn")}, directory)
            assert select().source == "tuned"  # reading still works
            results = tune(directory)
    finally:
        directory.chmod(0o700)
    assert path.read_bytes() == before and leftovers(directory) == []
    assert all(r.status == "tuned" and r.note.startswith("not stored: cannot write") for r in results)
    assert "autotune results not stored: cannot write" in warnings_text(caplog)


# Where a write can fail, and how each failure is injected. "lock": creating the lock file
# (a read-only directory that never had one); "create": the temporary file; "write": the data
# (half of it lands, then the disk is full); "sync": fsync (NFS reports ENOSPC there);
# "replace": the rename over the old file.
STEPS = ("lock", "create", "write", "sync", "replace")
ERRORS = {errno.ENOSPC: "No space left on device", errno.EACCES: "Permission denied",
          errno.EROFS: "Read-only file system", errno.EDQUOT: "Disk quota exceeded"}


def inject(mp: pytest.MonkeyPatch, step: str, code: int) -> list[str]:
    """Make ``step`` of the next writes fail with OSError(code) (``mp``: a MonkeyPatch of its
    own, so that undoing it keeps the cache isolation); returns where it fired."""
    fired: list[str] = []
    real_open, real_fdopen, real_fsync, real_replace = os.open, os.fdopen, os.fsync, os.replace

    def fail(where):
        fired.append(where)
        raise OSError(code, os.strerror(code), where)

    def fake_open(path, flags, *args, **kwargs):
        name = os.fspath(path)
        creating = flags & os.O_CREAT  # an existing lock file opens in a read-only directory too
        if creating and ((step == "lock" and name.endswith(".lock")) or (step == "create" and name.endswith(".tmp"))):
            fail(name)
        return real_open(path, flags, *args, **kwargs)

    class HalfFull:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            fail(self.f.name)

    def fake_fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return HalfFull(f) if step == "write" else f

    def fake_fsync(fd):
        if step == "sync":
            fail(f"fd {fd}")
        return real_fsync(fd)

    def fake_replace(src, dst, *args, **kwargs):
        if step == "replace":
            fail(os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    assert os.strerror(code) == ERRORS[code]
    mp.setattr(os, "open", fake_open)
    mp.setattr(os, "fdopen", fake_fdopen)
    mp.setattr(os, "fsync", fake_fsync)
    mp.setattr(os, "replace", fake_replace)
    return fired


@pytest.mark.parametrize("code", ERRORS, ids=[errno.errorcode[c] for c in ERRORS])
@pytest.mark.parametrize("step", STEPS)
def test_a_failed_write_leaves_the_old_file_and_says_why(directory, step, code):
    """Disk full, quota, read-only directory or mount, at every step of a store: CacheError
    naming the OS error, the old file byte for byte, no temporary file left, lookups unchanged."""
    path = stored_file(directory)
    before = path.read_bytes()
    lock = Path(f"{path}.lock")
    if step == "lock" and lock.exists():
        lock.unlink()  # a directory that never had a lock file
    with pytest.MonkeyPatch.context() as mp:
        fired = inject(mp, step, code)
        with pytest.raises(cache.CacheError, match=f"cannot write {path}.*{ERRORS[code]}"):
            cache.store(H100, {KEY: entry(config={**TUNED, "block_m": 128}), "fwd/float16/d64/full/g1/q1/k1": entry()},
                        directory)
    assert fired, f"the {step} fault never fired: the test no longer reaches that step"
    assert path.read_bytes() == before and leftovers(directory) == []
    cache.reload()
    dispatch.clear_memo()
    assert select().config == TritonConfig(**TUNED)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["ENOSPC", "EACCES"])
def test_the_tuner_goes_on_and_warns_once_when_nothing_can_be_written(directory, small_tuning, caplog, code):
    """A whole tuning run against a full disk or a read-only directory: every bucket is tuned
    and reported, none stored, and one warning (not one per bucket) says why."""
    stored_file(directory)
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        inject(mp, "create", code)
        results = tune(directory, tiny_grid(lengths=((16, 16), (64, 64))))
    assert [r.status for r in results] == ["tuned"] * 4
    assert all(r.note.startswith("not stored: cannot write") and ERRORS[code] in r.note for r in results)
    warned = [m for m in warnings_text(caplog).splitlines() if "autotune results not stored" in m]
    assert len(warned) == 1 and ERRORS[code] in warned[0]
    assert not (directory / cache.file_name(CPU)).exists() and leftovers(directory) == []


def test_a_new_file_is_readable_by_others_and_a_rewrite_keeps_its_mode(directory):
    """Files were created 0o600 by mkstemp, unreadable to the other users of a shared cache
    dir (FA2DISPATCH_CACHE_DIR on a team volume): now 0o666 less the umask, and a rewrite keeps
    the mode the file had."""
    old = os.umask(0o022)
    try:
        path = cache.store(H100, {KEY: entry()}, directory)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o664)
    cache.store(H100, {KEY64: entry()}, directory)
    assert path.stat().st_mode & 0o777 == 0o664


# ------------------------------------------------------------------ eight tuning processes at once


OWN, SHARED = 6, 3  # per process: its own buckets (direct stores), then shared buckets everyone writes


def tuning_process(directory: str, worker: int) -> None:
    """One tuning process: a real tuner.run on CPU (its own backward and forward buckets at
    length 2**(worker+5), and the bucket at 16 that every process tunes, forced), then more
    stores through the same function, some to buckets every process writes."""
    from fa2dispatch.autotune import cache as c
    from fa2dispatch.autotune import tuner as t

    t.TOKENS = t.HIDDEN = 32
    here = Path(directory)
    m = 2 ** (worker + 5)
    t.run(tiny_grid(lengths=((16, 16), (m, m))), CPU, flat_timer, here, force=True, verifier=lambda *a: None)
    for i in range(OWN):
        c.store(CPU, {f"fwd/float32/d64/full/g1/q{2 ** i}/k{2 ** worker}": entry("reference", None, CPU, worker=worker)},
                here)
    for i in range(SHARED):
        c.store(CPU, {f"fwd/float32/d128/full/g1/q{2 ** i}/k1": entry("reference", None, CPU, worker=worker,
                                                                       payload=[worker] * 50)}, here)


def test_eight_tuning_processes_lose_nothing_and_never_expose_a_partial_file(directory):
    """8 spawned processes tune and store into one file while this one keeps reading it: every
    read parses, and at the end the file holds every process's own buckets, each shared bucket
    as one writer's whole entry, and no temporary file."""
    # Separate processes from a fork server that imported torch and this module once, not eight
    # times (spawn costs 8 imports of torch: ~10 s on 2 cores); nothing is shared but the file.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    procs = [ctx.Process(target=tuning_process, args=(str(directory), w)) for w in range(8)]
    for p in procs:
        p.start()
    path, reads = directory / cache.file_name(CPU), 0
    while any(p.is_alive() for p in procs):
        if path.is_file():
            cache.read(path)  # raises CacheError on a half-written file
            reads += 1
        time.sleep(0.005)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    entries = cache.read(path)["entries"]
    lengths = [16, *(2 ** (w + 5) for w in range(8))]
    tuned = {f"{mode}/float16/d16/full/g1/q{m}/k{m}" for mode in ("fwd", "bwd") for m in lengths}
    own = {f"fwd/float32/d64/full/g1/q{2 ** i}/k{2 ** w}" for i in range(OWN) for w in range(8)}
    shared = {f"fwd/float32/d128/full/g1/q{2 ** i}/k1" for i in range(SHARED)}
    assert set(entries) == tuned | own | shared
    assert all(entries[k]["verified"] and cache.is_fresh(entries[k], CPU) for k in tuned)
    for key in shared:  # last writer wins, as a whole entry: never a mix of two writers
        assert entries[key]["payload"] == [entries[key]["worker"]] * 50
    assert leftovers(directory) == [] and reads > 0
