"""`bench/backdoor.py --merge`: runs made apart join into one table, and runs that cannot be joined are refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from acg.roundtrip import backdoor

_spec = importlib.util.spec_from_file_location("bench_backdoor", Path(__file__).parents[2] / "bench" / "backdoor.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def row(acc: float, asr: float) -> dict:
    return {
        "task_acc": {t: acc for t in backdoor.TASKS},
        "asr": {f: asr for f in backdoor.BACKDOORS},
        "der": {f: 1 - asr for f in backdoor.BACKDOORS},
        "n_params": 10,
    }


def output(path: Path, seed: int, methods: list[str]) -> Path:
    runs = [{"model": "m", "ratio": 0.05, "seed": seed, "n_budget": 7, "rows": {m: row(0.5, 0.2) for m in methods}}]
    path.write_text(
        json.dumps({"benchmark": "backdoor", "seconds": 1.0, "results": [{"model": "m", "ratio": 0.05, "runs": runs}]})
    )
    return path


def refused(*files: Path) -> str:
    with pytest.raises(SystemExit) as e:
        bench.merge(list(files), None, False)
    return str(e.value.code)


def test_merge_joins_seeds_and_refuses_repeats_other_rows_and_other_files(tmp_path, capsys):
    a = output(tmp_path / "a.json", 0, ["original", "FT"])
    b = output(tmp_path / "b.json", 1, ["original", "FT"])
    out = tmp_path / "ab.json"
    bench.merge([a, b], out, False, as_markdown=True)
    printed = capsys.readouterr().out
    assert "| FT | 0.500 |" in printed and "m, 5% (2 seed(s))" in printed
    assert [r["seed"] for r in json.loads(out.read_text())["results"][0]["runs"]] == [0, 1]

    assert "seed 0 is already in an earlier file" in refused(a, output(tmp_path / "c.json", 0, ["original", "FT"]))
    other = refused(a, output(tmp_path / "d.json", 2, ["original", "FT", "roundtrip code"]))
    assert "only here: ['roundtrip code']; only there: none" in other
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert "not a bench/backdoor.py JSON output" in refused(a, bad)
    bad.write_text(json.dumps({"results": [{"model": "m", "ratio": 0.05, "runs": [{"rows": {}}]}]}))
    assert "not a bench/backdoor.py JSON output" in refused(a, bad)
    assert bench.code_version()["commit"] is None or len(bench.code_version()["commit"]) == 40
