"""The backend selection report: the device, every backend, and who runs a matrix of typical calls.

``collect`` gathers it as JSON-able data (``fa2dispatch report --json`` prints exactly that);
``render`` prints it with rich; ``summary_lines`` is the short ``fa2dispatch info`` text. The
report is what a bug report needs most when something is broken, so every probe is guarded:
a probe that raises leaves "error: ..." in its field, a section that cannot be built holds
{"error": ...}, and the rest still prints. Nothing here needs a GPU, and Triton is imported
only if a backend's own checks import it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fa2dispatch import hardware
from fa2dispatch.problem import AttentionProblem

# The matrix: B=2 and H=Hkv=16 throughout, plus GQA 32:8 rows; (Mq, Mkv) pairs, decode-like first.
B, H = 2, 16
DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (64, 128, 256)
SEQLENS = ((1, 4096), (1024, 1024), (16384, 16384))
FP8_SEQLENS = ((1024, 1024), (16384, 16384))
GQA = (32, 8)
ERROR = "error: "


def _error(exc: BaseException) -> str:
    from fa2dispatch.dispatch import error_text

    return ERROR + error_text(exc)


def _guard(probe: Callable[..., Any], *args: Any) -> Any:
    """The probe's result, or "error: ..." in its place: a broken probe never stops the report."""
    try:
        return probe(*args)
    except Exception as exc:  # noqa: BLE001 - any probe may fail in any way; the report must print
        return _error(exc)


def _is_error(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(ERROR)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# ------------------------------------------------------------------ device and environment


def resolve_simulation(simulate: str | None = None) -> str | None:
    """The profile to simulate: ``simulate`` if given (it wins), else FA2DISPATCH_SIMULATE.
    Raises ValueError naming the source for an unknown profile."""
    if simulate is not None:
        hardware.check_profile(simulate, "--simulate")
        return simulate
    return hardware.simulation()


def _fa2dispatch_version() -> str:
    import fa2dispatch

    return fa2dispatch.__version__


def _torch_build() -> str:
    """What torch was built for: "cuda 12.8", "hip 6.4" or "cpu"."""
    if torch.version.hip is not None:
        return f"hip {torch.version.hip}"
    if torch.version.cuda is not None:
        return f"cuda {torch.version.cuda}"
    return "cpu"


def _env_vars() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("FA2DISPATCH_")}


def _environment() -> dict:
    return {
        "fa2dispatch": _guard(_fa2dispatch_version),
        "python": _guard(platform.python_version),
        "platform": _guard(platform.platform),
        "installed": _guard(lambda: dataclasses.asdict(hardware.versions())),
        "torch_build": _guard(_torch_build),
        "cuda_available": _guard(torch.cuda.is_available),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "env": _guard(_env_vars),
    }


def _device_section(device: hardware.DeviceInfo | None, device_error: str | None) -> dict:
    section: dict[str, Any] = {}
    if device_error is not None:
        section["error"] = device_error
    if device is not None:
        for f in dataclasses.fields(device):
            section[f.name] = _guard(lambda name: _jsonable(getattr(device, name)), f.name)
        section["key"] = _guard(lambda: device.key)
    section.update(_environment())
    return section


def _probe_device(simulate: str | None) -> tuple[str | None, hardware.DeviceInfo | None, str | None]:
    """(profile simulated, device, error): a bad FA2DISPATCH_SIMULATE falls back to the real
    device with the error kept; a device probe that fails leaves no device."""
    errors = []
    try:
        simulate = resolve_simulation(simulate)
    except ValueError as exc:
        errors.append(_error(exc))
        simulate = None
    try:
        device = hardware.current_device(simulate)
    except Exception as exc:  # noqa: BLE001 - a broken driver or probe
        return simulate, None, "; ".join([*errors, _error(exc)])
    return simulate, device, "; ".join(errors) or None


# ------------------------------------------------------------------ backends


def _order(device: hardware.DeviceInfo) -> tuple[str, list[str]]:
    """(priority family, every backend most preferred first); registry order if that fails."""
    from fa2dispatch import backends

    family = _guard(backends.family, device)
    order = _guard(backends.priority, device)
    return family, list(backends.BACKENDS) if _is_error(order) else list(order)


def _backend_row(name: str, device: hardware.DeviceInfo) -> dict:
    from fa2dispatch.backends import BACKENDS

    backend = BACKENDS[name]
    reasons = _guard(backend.available, device)
    if _is_error(reasons):
        reasons = [reasons]
    return {
        "name": name,
        "available": not reasons,
        "version": _guard(backend.version, device),
        "reasons": list(reasons),
        "description": getattr(backend, "description", ""),
        "capabilities": _guard(backend.capabilities),
    }


def _backends_section(device: hardware.DeviceInfo) -> dict:
    family, order = _order(device)
    return {"family": family, "order": order, "rows": [_backend_row(name, device) for name in order]}


# ------------------------------------------------------------------ the matrix of calls


@dataclass(frozen=True)
class Call:
    """One representative call of the matrix."""

    dtype: str
    D: int
    Mq: int
    Mkv: int
    causal: bool
    grad: bool  # forward + backward (requires_grad) rather than forward only
    H: int = H
    Hkv: int = H
    features: tuple = ()  # (AttentionProblem field, value) pairs: FlashAttention-2's features

    def problem(self, device: hardware.DeviceInfo) -> AttentionProblem:
        # The torch device only labels the call: select() is given the DeviceInfo explicitly.
        where = torch.device("cuda" if device.is_gpu else "cpu")
        problem = AttentionProblem(B, self.H, self.Hkv, self.Mq, self.Mkv, self.D, getattr(torch, self.dtype), where,
                                   "bshd", self.causal, self.D**-0.5, requires_grad=self.grad)
        return dataclasses.replace(problem, **dict(self.features)) if self.features else problem

    def fields(self) -> dict:
        label = {"window": "window={}", "softcap": "softcap={}", "alibi": "alibi", "dropout_p": "dropout={}",
                 "causal_alignment": "{}", "varlen": "varlen", "kvcache": "kvcache", "paged_block": "paged({})"}
        names = " ".join(label[k].format(v) for k, v in self.features)
        return {"dtype": self.dtype, "B": B, "H": self.H, "Hkv": self.Hkv, "Mq": self.Mq, "Mkv": self.Mkv,
                "D": self.D, "causal": self.causal,
                "pass": ("fwd+bwd" if self.grad else "fwd") + (f" {names}" if names else "")}


def calls() -> list[Call]:
    """dtype x D x causal x lengths x fwd/bwd at H=Hkv=16, then GQA 32:8, then fp8 forward."""
    rows = [Call(dt, d, mq, mkv, causal, grad)
            for dt in DTYPES for d in HEAD_DIMS for causal in (False, True) for grad in (False, True)
            for mq, mkv in SEQLENS]
    rows += [Call(dt, 128, mq, mkv, True, grad, *GQA)
             for dt in ("float16", "bfloat16") for grad in (False, True) for mq, mkv in SEQLENS]
    rows += [Call("float8_e4m3fn", 128, mq, mkv, causal, False) for causal in (False, True) for mq, mkv in FP8_SEQLENS]
    # FlashAttention-2's features (issue 8), bfloat16 D=128 16k causal unless the feature needs otherwise
    for features, mq, mkv, grads in (
            ((("window", (4096, -1)),), 16384, 16384, (False, True)),
            ((("softcap", 50.0),), 16384, 16384, (False, True)),
            ((("alibi", "h"),), 16384, 16384, (False, True)),
            ((("dropout_p", 0.1),), 16384, 16384, (True,)),
            ((("causal_alignment", "top_left"),), 1024, 4096, (False, True)),
            ((("varlen", True),), 16384, 16384, (False, True)),
            ((("kvcache", True),), 1, 32768, (False,)),
            ((("kvcache", True), ("paged_block", 256)), 1, 32768, (False,))):
        heads = GQA if features[0][0] == "kvcache" else (H, H)
        rows += [Call("bfloat16", 128, mq, mkv, True, grad, *heads, features) for grad in grads]
    return rows


def _none_row(reasons: dict, source: str = "-", error: str | None = None) -> dict:
    return {"backend": "none", "config": "-", "config_fields": None, "source": source, "fallbacks": [],
            "rejected": {name: list(r) for name, r in reasons.items()}, "error": error}


def _forced_refusal(problem: AttentionProblem, device: hardware.DeviceInfo) -> dict | None:
    """The row of a call the forced backend (FA2DISPATCH_BACKEND, use_backend) cannot run: its
    reasons as data, as for any other refusal. None when no backend is forced."""
    from fa2dispatch import dispatch
    from fa2dispatch.backends import BACKENDS

    choice = dispatch.effective_choice(dispatch.requested_backend())
    if choice == "auto":
        return None
    return _none_row({choice: BACKENDS[choice].not_supported_reasons(problem, device)}, "forced")


def _matrix_row(call: Call, device: hardware.DeviceInfo) -> dict:
    from fa2dispatch import dispatch
    from fa2dispatch.errors import NoBackendError

    row: dict[str, Any] = {**call.fields(), "call": None}
    problem = None
    try:
        problem = call.problem(device)
        row["call"] = problem.describe()
        decision = dispatch.select(problem, device=device)
    except NoBackendError as exc:
        return {**row, **_none_row(exc.reasons)}
    except Exception as exc:  # noqa: BLE001 - a forced backend that cannot run the call, a broken probe
        forced = None
        if problem is not None and isinstance(exc, ValueError):
            forced = _guard(_forced_refusal, problem, device)
        return {**row, **(forced if isinstance(forced, dict) else _none_row({}, error=_error(exc)))}
    config = decision.config
    return {**row, "backend": decision.backend.name, "config": config.short() if config is not None else "-",
            "config_fields": config.as_dict() if config is not None else None, "source": decision.source,
            "fallbacks": list(decision.fallbacks),
            "rejected": {name: list(r) for name, r in decision.rejected.items()}, "error": None}


def _matrix_section(device: hardware.DeviceInfo) -> dict:
    return {"rows": [_matrix_row(call, device) for call in calls()]}


# ------------------------------------------------------------------ failures and the autotune cache


def _failures_section() -> dict:
    from fa2dispatch import dispatch

    return {"rows": [dataclasses.asdict(f) for f in dispatch.failures()]}


def _cache_section(device: hardware.DeviceInfo) -> dict:
    from fa2dispatch.autotune import cache

    return {"files": [dict(entry) for entry in cache.describe(device)]}


def _section(build: Callable[..., dict], *args: Any) -> dict:
    try:
        return build(*args)
    except Exception as exc:  # noqa: BLE001 - one broken section must not cost the others
        return {"error": _error(exc)}


def _no_device(device_error: str | None) -> dict:
    return {"error": f"{ERROR}no device to describe ({device_error})"}


def collect(simulate: str | None = None) -> dict:
    """The whole report as JSON-able data. ``simulate`` names a device profile (it wins over
    FA2DISPATCH_SIMULATE); decisions are made for that device, with this machine's libraries."""
    simulate, device, device_error = _probe_device(simulate)
    data: dict[str, Any] = {"simulate": simulate, "device": _device_section(device, device_error)}
    if device is None:
        data.update(backends=_no_device(device_error), matrix=_no_device(device_error))
    else:
        data.update(backends=_section(_backends_section, device), matrix=_section(_matrix_section, device))
    data["failures"] = _section(_failures_section)
    data["autotune_cache"] = _no_device(device_error) if device is None else _section(_cache_section, device)
    return data


def collect_summary(simulate: str | None = None) -> dict:
    """The device and backends sections only: what ``fa2dispatch info`` prints."""
    simulate, device, device_error = _probe_device(simulate)
    backends = _no_device(device_error) if device is None else _section(_backends_section, device)
    return {"simulate": simulate, "device": _device_section(device, device_error), "backends": backends}


# ------------------------------------------------------------------ plain text (fa2dispatch info)


def _versions_text(versions: Any) -> str:
    if not isinstance(versions, dict):
        return str(versions)
    return ", ".join(f"{name} {v if v is not None else 'not installed'}" for name, v in versions.items())


def device_line(dev: dict) -> str:
    if "name" not in dev:
        return f"device         {dev.get('error', 'unknown')}"
    smem = dev.get("smem_per_block")
    smem = f"{smem // 1024} KiB" if isinstance(smem, int) else smem
    return (f"device         {dev['name']} [{dev.get('arch')}] vendor={dev.get('vendor')} "
            f"SMs/CUs={dev.get('multiprocessors')} smem/block={smem} warp={dev.get('warp_size')} "
            f"driver={dev.get('driver') or '-'} toolkit={dev.get('toolkit') or '-'}"
            + (" (simulated)" if dev.get("simulated") is True else ""))


def summary_lines(data: dict) -> list[str]:
    """``fa2dispatch info``: one fact per line, plain text to paste into a bug report."""
    dev = data["device"]
    lines = [f"fa2dispatch    {dev['fa2dispatch']}", f"python         {dev['python']} on {dev['platform']}",
             f"installed      {_versions_text(dev['installed'])}",
             f"torch build    {dev['torch_build']} (GPU available: {dev['cuda_available']})", device_line(dev)]
    if "name" in dev and dev.get("error"):
        lines.append(f"               {dev['error']}")
    lines.append(f"TRITON_INTERPRET={dev['TRITON_INTERPRET'] if dev['TRITON_INTERPRET'] is not None else '(unset)'}")
    env = dev["env"]
    if isinstance(env, dict):
        lines += [f"{k}={v}" for k, v in env.items()] or ["FA2DISPATCH_* (none set)"]
    else:
        lines.append(f"FA2DISPATCH_* {env}")
    backends = data["backends"]
    if "error" in backends:
        return lines + [f"backends       {backends['error']}"]
    lines.append(f"backends in priority order (family {backends['family']}):")
    width = max(len(row["name"]) for row in backends["rows"])
    for row in backends["rows"]:
        status = f"available ({row['version']})" if row["available"] else "unavailable: " + "; ".join(row["reasons"])
        lines.append(f"backend {row['name']:<{width}}  {status}")
    return lines


# ------------------------------------------------------------------ rich rendering


def _title(data: dict) -> str:
    dev = data["device"]
    where = f"{dev['name']} [{dev.get('arch')}]" if "name" in dev else "unknown device"
    sim = f" (simulated profile {data['simulate']})" if data.get("simulate") else ""
    return f"fa2dispatch {dev.get('fa2dispatch')} backend selection report: {where}{sim}"


def _render_device(data: dict, console: Console) -> None:
    table = Table(title="device and environment", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in data["device"].items():
        if key in ("versions", "installed"):
            value = _versions_text(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "(none set)"
        text = "(unset)" if value is None and key == "TRITON_INTERPRET" else str(value)
        table.add_row(key, f"[red]{escape(text)}[/]" if _is_error(value) else escape(text))
    console.print(table)


def _render_backends(section: dict, console: Console) -> None:
    if "error" in section:
        console.print(f"[bold]backends[/]: [red]{escape(section['error'])}[/]", highlight=False)
        return
    table = Table(title=f"backends in priority order (family {section['family']})")
    for col in ("#", "backend", "available", "version", "reasons"):
        table.add_column(col, overflow="fold", no_wrap=col == "backend")
    for i, row in enumerate(section["rows"], 1):
        table.add_row(str(i), escape(row["name"]), "[green]yes[/]" if row["available"] else "[red]no[/]",
                      escape(str(row["version"])), escape("; ".join(row["reasons"]) or "-"))
    console.print(table)


def _key_reasons(row: dict, capabilities: dict[str, Any]) -> str:
    """Why no backend runs a call, shortened to the backends that take its dtype (the others
    only say "dtype=..."); the JSON keeps every reason."""
    if row["error"]:
        return row["error"]
    rejected = row["rejected"]
    relevant = [n for n in rejected if row["dtype"] in (capabilities.get(n) or {}).get("dtypes", ())]
    shown = relevant or list(rejected)[:1]
    more = len(rejected) - len(shown)
    text = " | ".join(f"{n}: " + "; ".join(rejected[n]) for n in shown)
    return text + (f" (+{more} more in --json)" if more else "")


def _lengths(mq: int, mkv: int) -> str:
    return str(mq) if mq == mkv else f"{mq}->{mkv}"


def _variants(rows: list[dict]) -> str:
    """The (causal, lengths) calls ``rows`` cover, as briefly as they allow."""
    items = list(dict.fromkeys((r["causal"], _lengths(r["Mq"], r["Mkv"])) for r in rows))
    causals = list(dict.fromkeys(c for c, _ in items))
    lengths = list(dict.fromkeys(m for _, m in items))
    if len(items) == len(causals) * len(lengths):
        causal = "causal" if causals == [True] else "non-causal" if causals == [False] else "causal or not"
        return f"{causal}, M={', '.join(lengths)}"
    return "; ".join(f"{'causal' if c else 'non-causal'} M={m}" for c, m in items)


def _group(rows: list[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def _outcome(row: dict) -> tuple:
    """What a call got; for calls nobody runs, the reasons tell them apart too."""
    reasons = repr(row["rejected"]) if row["backend"] == "none" else ""
    return row["backend"], row["config"], row["source"], row["error"], reasons


class _Legend:
    """Short labels for the long texts a matrix cell would repeat: configs (c1, c2 ...) and the
    reasons no backend runs a call (n1, n2 ...), printed once under the table."""

    def __init__(self, capabilities: dict[str, Any]):
        self.capabilities = capabilities
        self.configs: dict[str, str] = {}
        self.notes: dict[str, str] = {}

    def outcome(self, row: dict) -> str:
        if row["backend"] == "none":
            reasons = _key_reasons(row, self.capabilities)
            text = f"none, see {self.notes.setdefault(reasons, f'n{len(self.notes) + 1}')}"
        else:
            text = row["backend"]
            if row["config"] != "-":
                text += f" {self.configs.setdefault(row['config'], f'c{len(self.configs) + 1}')}"
        return text if row["source"] in ("default", "-") else f"{text} ({row['source']})"

    def cell(self, rows: list[dict]) -> str:
        """One matrix cell: its answer, or one line per answer with the calls it covers."""
        outcomes = _group(rows, _outcome)
        if len(outcomes) == 1:
            return self.outcome(rows[0])
        return "\n".join(f"{self.outcome(group[0])}: {_variants(group)}" for group in outcomes.values())

    def lines(self) -> list[str]:
        return ([f"{label} = {config}" for config, label in self.configs.items()]
                + [f"{label}: {reasons}" for reasons, label in self.notes.items()])


def _render_matrix(data: dict, console: Console) -> None:
    section = data["matrix"]
    if "error" in section:
        console.print(f"[bold]calls[/]: [red]{escape(section['error'])}[/]", highlight=False)
        return
    capabilities = {r["name"]: r["capabilities"] for r in data["backends"].get("rows", ())
                    if isinstance(r.get("capabilities"), dict)}
    legend = _Legend(capabilities)
    rows = section["rows"]
    head_dims = list(dict.fromkeys(r["D"] for r in rows))
    table = Table(title=f"who runs what: backend and config per call (B={B}, layout bshd; "
                        f"{len(rows)} calls, --json lists each)")
    for col in ("dtype", "H:Hkv", "pass", "causal", "Mq->Mkv"):
        table.add_column(col, overflow="fold", no_wrap=col in ("dtype", "pass"))
    for d in head_dims:
        table.add_column(f"D={d}", overflow="fold")
    for (dtype, h, hkv, pass_), group in _group(rows, lambda r: (r["dtype"], r["H"], r["Hkv"], r["pass"])).items():
        by_d = _group(group, lambda r: r["D"])
        cells = [legend.cell(by_d[d]) if d in by_d else "" for d in head_dims]
        causal = ", ".join(dict.fromkeys("yes" if r["causal"] else "no" for r in group))
        lengths = ", ".join(dict.fromkeys(_lengths(r["Mq"], r["Mkv"]) for r in group))
        table.add_row(*(escape(c) for c in (dtype, f"{h}:{hkv}", pass_, causal, lengths, *cells)))
    console.print(table)
    for line in legend.lines():
        console.print(line, markup=False, highlight=False)


def _render_failures(section: dict, console: Console) -> None:
    if "error" in section:
        console.print(f"[bold]run-time failures[/]: [red]{escape(section['error'])}[/]", highlight=False)
        return
    if not section["rows"]:
        console.print("[bold]run-time failures in this process[/]: none")
        return
    console.print("[bold]run-time failures in this process[/]:")
    for f in section["rows"]:
        instead = f"{f['replaced_by']} ran instead" if f["replaced_by"] else "raised"
        console.print(f"  {f['backend']} ({f['phase']}) on {f['device']}: {f['error']}; {instead}; "
                      f"{f['problem']}", markup=False, highlight=False)


def _cache_state(f: dict) -> str:
    if f.get("error"):
        return f"error: {f['error']}"
    if not f.get("exists"):
        return "not there"
    return f"{f.get('entries')} entries, matches this device: {f.get('match')}"


def _render_cache(section: dict, console: Console) -> None:
    if "error" in section:
        console.print(f"[bold]autotune cache[/]: [red]{escape(section['error'])}[/]", highlight=False)
        return
    console.print("[bold]autotune cache files for this device[/] (lookup order):")
    for f in section["files"]:
        console.print(f"  {f.get('origin')}: {_cache_state(f)}\n    {f.get('path')}", markup=False, highlight=False)
        if f.get("other_files"):
            console.print(f"    other files there: {', '.join(f['other_files'])}", markup=False, highlight=False)


def render(data: dict, console: Console) -> None:
    """Print ``collect()``'s data with rich, section by section."""
    console.print(f"[bold]{escape(_title(data))}[/]", highlight=False)
    _render_device(data, console)
    _render_backends(data["backends"], console)
    _render_matrix(data, console)
    _render_failures(data["failures"], console)
    _render_cache(data["autotune_cache"], console)
