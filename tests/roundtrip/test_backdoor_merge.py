"""`bench/backdoor.py --merge`: runs made apart join into one table, and runs that cannot be joined are refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from acg.roundtrip import backdoor
from acg.roundtrip import runs as runs_io

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
    other_bench = json.loads(a.read_text()) | {"benchmark": "recipe_freeze"}
    bad.write_text(json.dumps(other_bench))
    assert "it is bench/recipe_freeze.py's" in refused(a, bad)
    version = runs_io.code_version()
    assert version["commit"] is None or len(version["commit"]) == 40


def test_recipe_freeze_bench_merges_its_own_outputs_and_refuses_unknown_sets(tmp_path, monkeypatch, capsys):
    path = Path(__file__).parents[2] / "bench" / "recipe_freeze.py"
    spec = importlib.util.spec_from_file_location("bench_freeze", path)
    freeze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(freeze)
    files = []
    for seed in (0, 1):
        f = output(tmp_path / f"f{seed}.json", seed, ["original", "recipe FT, nothing frozen"])
        f.write_text(json.dumps(json.loads(f.read_text()) | {"benchmark": "recipe_freeze"}))
        files.append(str(f))
    out = tmp_path / "merged.json"
    monkeypatch.setattr("sys.argv", ["recipe_freeze.py", "--merge", *files, "--out", str(out), "--markdown"])
    freeze.main()
    assert "| recipe FT, nothing frozen | 0.500 |" in capsys.readouterr().out
    merged = json.loads(out.read_text())
    assert merged["benchmark"] == "recipe_freeze" and [r["seed"] for r in merged["results"][0]["runs"]] == [0, 1]
    backdoor_output = output(tmp_path / "b.json", 2, ["original", "recipe FT, nothing frozen"])
    monkeypatch.setattr("sys.argv", ["recipe_freeze.py", "--merge", files[0], str(backdoor_output)])
    with pytest.raises(SystemExit, match="it is bench/backdoor.py's"):
        freeze.main()
    monkeypatch.setattr("sys.argv", ["recipe_freeze.py", "--sets", "nothing,layer-9"])
    with pytest.raises(SystemExit, match=r"no such set \['layer-9'\]"):
        freeze.main()
    for lrs, why in (("1e-4,fast", "not a list of numbers"), ("0", "positive"), ("1e-4,1e-4", "given once")):
        monkeypatch.setattr("sys.argv", ["recipe_freeze.py", "--lrs", lrs])
        with pytest.raises(SystemExit, match=why):
            freeze.main()
