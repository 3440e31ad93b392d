"""tools/bench_plot.py: the benchmark's PNG (one panel per mode/dtype/causal/D, one line per
provider), written from a bench.py JSON without a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_plot

pytest.importorskip("matplotlib", reason="matplotlib not installed (requirements/test.txt installs it)")


def _rows():
    rows = []
    for mode in ("fwd", "bwd"):
        for seqlen in (1024, 4096, 16384):
            tflops = {"ours": 300.0 + seqlen / 100, "flash": 250.0, "cudnn": None if mode == "bwd" else 500.0}
            rows.append({"mode": mode, "dtype": "fp16", "causal": False, "D": 128, "Mq": seqlen, "tflops": tflops})
    return rows


def test_plot_writes_a_png_with_one_panel_per_kind(tmp_path):
    data = {"env": {"gpu": "H100", "date": "2026-11-24T00:00:00"}, "protocol": {"backend": "triton"}, "rows": _rows()}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    assert bench_plot.main([str(path)]) == 0
    png = tmp_path / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert list(bench_plot.panels(data["rows"])) == [("bwd", "fp16", False, 128), ("fwd", "fp16", False, 128)]
    assert [r["Mq"] for r in bench_plot.panels(list(reversed(data["rows"])))[("fwd", "fp16", False, 128)]] == \
        [1024, 4096, 16384]


def test_plot_says_why_it_wrote_nothing(tmp_path, capsys):
    assert bench_plot.plot({"rows": []}, str(tmp_path / "x.png")) == "no rows to plot"
    assert not (tmp_path / "x.png").exists()
    assert bench_plot.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
