#!/usr/bin/env python3
"""Plot a benchmark JSON (tools/bench.py's output): TFLOP/s against sequence length, one line
per provider, one panel per (mode, dtype, causal, head dim).

    python tools/bench_plot.py docs/bench/h100-fp16-2026-11-24.json            # -> ...json's .png
    python tools/bench_plot.py bench.json --out plot.png

bench.py calls ``plot`` itself after a run (``--plot``, on by default). matplotlib is needed
only here; without it ``plot`` returns the reason and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

# One colour and marker per provider, stable across plots so "ours" is always the same line.
STYLE = {
    "ours": ("#d62728", "o"),
    "flash": ("#1f77b4", "s"),
    "cudnn": ("#2ca02c", "^"),
    "efficient": ("#9467bd", "v"),
    "flex": ("#ff7f0e", "D"),
}


def default_path(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".png"


def panels(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by panel key (mode, dtype, causal, D), each group sorted by seqlen."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["mode"], row["dtype"], row["causal"], row["D"])].append(row)
    return {key: sorted(group, key=lambda r: r["Mq"]) for key, group in sorted(groups.items())}


def plot(data: dict, out: str, title: str | None = None) -> str | None:
    """Write the figure to ``out``; returns None, or why nothing was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on the GPU machine or in CI
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib not installed ({exc})"
    rows = data.get("rows") or []
    if not rows:
        return "no rows to plot"
    groups = panels(rows)
    providers = [p for p in rows[0]["tflops"]]
    cols = min(4, len(groups))
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, ((mode, dtype, causal, d), group) in zip(axes.flat, groups.items()):
        seqlens = [r["Mq"] for r in group]
        for p in providers:
            ys = [r["tflops"].get(p) for r in group]
            if all(y is None for y in ys):
                continue
            color, marker = STYLE.get(p, (None, "x"))
            ax.plot(seqlens, [math.nan if y is None else y for y in ys], marker=marker, color=color,
                    label=p, linewidth=2.2 if p == "ours" else 1.4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
        ax.set_title(f"{mode} {dtype} {'causal' if causal else 'full'} D={d}", fontsize=10)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.96), ncol=len(labels), frameon=False)
    env = data.get("env") or {}
    fig.suptitle(title or f"{env.get('gpu', '?')} · {env.get('date', '?')[:10]} · torch {env.get('torch', '?')} "
                 f"· triton {env.get('triton', '?')} · ours = backend {data.get('protocol', {}).get('backend', '?')}",
                 y=0.995, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.91))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="a JSON file written by tools/bench.py")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        with open(args.json, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"bench_plot: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    out = args.out or default_path(args.json)
    why = plot(data, out, args.title)
    if why:
        print(f"bench_plot: nothing written: {why}", file=sys.stderr)
        return 1
    print(f"plot written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
