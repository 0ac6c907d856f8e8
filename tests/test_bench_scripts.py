"""Every bench script runs as a script: `python bench/NAME.py --help` parses its options and prints its usage (a
script whose `__main__` guard went missing does nothing at all, and says nothing)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_the_bench_folder_holds_the_scripts():
    assert {"backdoor.py", "recipe_freeze.py", "backends.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_bench_script_run_as_a_script_prints_its_usage(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/NAME.py` puts its folder first
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out.lower()
