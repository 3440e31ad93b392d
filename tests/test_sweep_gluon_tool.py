"""tools/sweep_gluon.py off the GPU: its --configs entries (the optional ping-pong grid and
sections) and the names it gives them; the sweep itself needs a GPU."""

from __future__ import annotations

import pytest
from helpers import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("sweep_gluon")


def test_configs_take_six_to_ten_fields_with_defaults(tool):
    assert tool._config("64:64:2:2:4:0") == (64, 64, 2, 2, 4, 0, 0, 0, 0, -1)
    assert tool._config("128:128:2:2:4:0:24:240") == (128, 128, 2, 2, 4, 0, 24, 240, 0, -1)
    assert tool._config("128:128:2:2:4:0:24:240:1") == (128, 128, 2, 2, 4, 0, 24, 240, 1, -1)
    assert tool._config("128:128:2:2:4:0:24:240:2:0") == (128, 128, 2, 2, 4, 0, 24, 240, 2, 0)


@pytest.mark.parametrize("text", ["64:64:2:2:4", "1:2:3:4:5:6:7:8:9:10:11", "64:64:2:x:4:0"])
def test_a_bad_config_names_itself(tool, text):
    with pytest.raises(SystemExit, match=f"--configs '{text}'"):
        tool._config(text)


def test_names_show_only_what_differs_from_the_defaults(tool):
    assert tool._grid_name(0, -1) == ""
    assert tool._grid_name(2, -1) == "g2"
    assert tool._grid_name(1, 0) == "g1s0"
    assert tool._grid_name(0, 3) == "s3"
