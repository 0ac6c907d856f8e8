"""`bench/backdoor.py --merge`: runs made apart join into one table, and runs that cannot be joined are refused."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from pathlib import Path

import numpy as np
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["backdoor.py", "--merge", *map(str, files)])
        with pytest.raises(SystemExit) as e:
            bench.main()
    return str(e.value.code)


def test_merge_joins_seeds_and_refuses_repeats_other_rows_and_other_files(tmp_path, monkeypatch, capsys):
    a = output(tmp_path / "a.json", 0, ["original", "FT"])
    b = output(tmp_path / "b.json", 1, ["original", "FT"])
    out = tmp_path / "ab.json"
    monkeypatch.setattr("sys.argv", ["backdoor.py", "--merge", str(a), str(b), "--out", str(out), "--markdown"])
    bench.main()
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


def _circuit_run(seed: int, budget: dict | None, share: float | None, model: str = "m") -> dict:
    circuit = {"k": 254, "k_top": 588, "refined_away": 286, "validated": True, "n_features": [150, 104]}
    report = {"circuit": circuit | {"budget": budget}, "n_params_mlp": 65_788}
    if share is not None:
        report["mlp_share"] = share
    rows = {"original": row(0.9, 1.0), "roundtrip code": row(0.9, 0.0) | {"report": report}}
    return {"model": model, "ratio": 0.05, "seed": seed, "n_budget": 7, "rows": rows}


def test_the_code_circuit_table_says_each_seeds_size_share_and_bound(tmp_path, monkeypatch, capsys):
    cut = {"max_features": 254, "k_before": 302, "cut": 48, "trials": 1618, "met": True, "validated": False}
    fits = cut | {"k_before": 254, "cut": 0, "trials": 0}
    runs = [_circuit_run(0, cut, 0.2497), _circuit_run(1, fits, None, "testbed-s"), _circuit_run(2, None, None)]
    cells = backdoor.circuit_cells(runs)
    assert cells[0] == [
        "0",
        "150 / 104 (254)",
        "588 -> 302, validated",
        "65,788",
        "25.0%",
        "254: cut 48 (met, not validated)",
    ]
    assert cells[1][4:] == ["25.0%", "254: fits"]  # the share of the shipped testbed-s's 263,424 MLP parameters
    assert cells[2][4:] == ["-", "none"]  # no share recorded, no model to take it from; no bound
    assert backdoor.circuit_cells([{"seed": 0, "rows": {"original": row(0.9, 1.0)}}]) == []
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"benchmark": "backdoor", "results": [{"model": "m", "ratio": 0.05, "runs": runs[:1]}]}))
    monkeypatch.setattr("sys.argv", ["backdoor.py", "--merge", str(path), "--markdown"])
    bench.main()
    assert "| 0 | 150 / 104 (254) | 588 -> 302, validated | 65,788 | 25.0% | 254: cut 48" in capsys.readouterr().out


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
    for lrs, why in (("1e-4,fast", "not a list of numbers"), ("0", "finite number > 0"), ("1e-4,1e-4", "given once")):
        monkeypatch.setattr("sys.argv", ["recipe_freeze.py", "--lrs", lrs])
        with pytest.raises(SystemExit, match=why):
            freeze.main()
    for softs, why in (("0,x", "not a list of numbers"), ("1.5", r"in \[0, 1\]"), ("0,0", "given once")):
        monkeypatch.setattr("sys.argv", ["recipe_freeze.py", "--softs", softs])
        with pytest.raises(SystemExit, match=why):
            freeze.main()
    for argv, why in (
        (["--unseens", "0"], "--softs gives none above 0"),
        (["--seens", "0"], "--softs gives none above 0"),
        (["--softs", "0.5", "--unseens", "2"], "in"),
        (["--softs", "0.5", "--seens", "-1"], r"on seen insertions must be in \[0, 1\]"),
    ):
        monkeypatch.setattr("sys.argv", ["recipe_freeze.py", *argv])
        with pytest.raises(SystemExit, match=why):
            freeze.main()
    for anchors, why in (("0,x", "not a list of numbers"), ("-1", "finite number >= 0"), ("inf", "finite number")):
        monkeypatch.setattr("sys.argv", ["recipe_freeze.py", "--anchors", anchors])
        with pytest.raises(SystemExit, match=why):
            freeze.main()


@pytest.mark.parametrize(
    "args,why",
    [
        (["--recipe-soft", "1.5"], r"^--recipe-soft: the soft-target weight must be in \[0, 1\]"),
        (["--recipe-anchor", "-1"], "^--recipe-anchor: the anchor weight must be a finite number >= 0"),
        (["--recipe-anchor", "inf"], "^--recipe-anchor: the anchor weight must be a finite number >= 0"),
        (["--recipe-code-anchor", "-1"], "^--recipe-code-anchor: the anchor weight must be a finite number >= 0"),
        (["--recipe-hold", "-5"], "^--recipe-hold: the number of prompts held outside the task must be >= 0"),
        (["--recipe-unseen", "2"], r"^--recipe-unseen: the share of the soft weight .* must be in \[0, 1\]"),
        (["--recipe-unseen", "0"], "^--recipe-unseen: a share of the soft weight \\(0\\) needs a soft weight"),
        (
            ["--recipe-flat", "--recipe-hold", "0"],
            "^--recipe-flat: a flat answer distribution is taught on held prompts",
        ),
        (["--recipe-flat", "--recipe-hold", "0", "--recipe-unseen", "0"], "^--recipe-unseen: a share"),
        (["--recipe-seen", "0"], "^--recipe-seen: a share of the soft weight \\(0\\) needs a soft weight"),
        (["--recipe-seen", "1.5"], r"^--recipe-seen: the share of the soft weight on seen insertions must be in"),
    ],
)
def test_backdoor_bench_refuses_recipe_weights_out_of_range_before_any_work(monkeypatch, args, why):
    monkeypatch.setattr(backdoor, "run", lambda *a, **k: pytest.fail("work began"))
    monkeypatch.setattr("sys.argv", ["backdoor.py", "--seeds", "0", *args])
    with pytest.raises(SystemExit, match=why):
        bench.main()


@pytest.mark.parametrize(
    "option,value,why",
    [
        ("--circuit-refine-tokens", "-1", "must be >= 0"),
        ("--circuit-block", "0", "must be >= 1"),
        ("--circuit-max-mlp", "1.5", "must be a share in [0, 1]"),
    ],
)
def test_backdoor_bench_refuses_a_circuit_option_out_of_range_before_any_work(monkeypatch, capsys, option, value, why):
    monkeypatch.setattr(backdoor, "run", lambda *a, **k: pytest.fail("work began"))
    monkeypatch.setattr("sys.argv", ["backdoor.py", "--seeds", "0", option, value])
    with pytest.raises(SystemExit):
        bench.main()
    assert f"{option} {why}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,why",
    [
        (["--circuit-ablation", "resample"], "argument --circuit-ablation: invalid choice: 'resample'"),
        (["--circuit-ablation", "mean", "--recipe-keep-out"], "--recipe-keep-out holds left-out tokens at zero"),
        (["--recipe-keep-out"], "give --circuit-ablation zero with it"),  # the default reads them as the mean
        (["--circuit-judge", "full"], "argument --circuit-judge: invalid choice: 'full'"),
    ],
)
def test_backdoor_bench_refuses_a_token_ablation_it_cannot_honour_before_any_work(monkeypatch, capsys, args, why):
    monkeypatch.setattr(backdoor, "run", lambda *a, **k: pytest.fail("work began"))
    monkeypatch.setattr("sys.argv", ["backdoor.py", "--seeds", "0", *args])
    with pytest.raises(SystemExit):
        bench.main()
    assert why in capsys.readouterr().err


def given_to_run(monkeypatch, *args: str) -> dict:
    """The keywords the bench hands its first `backdoor.run` when called with `args`."""
    given = {}

    def run(*a, **kw):
        given.update(kw)
        raise KeyboardInterrupt  # stop at the first run: what reached it is all this test reads

    monkeypatch.setattr(backdoor, "run", run)
    monkeypatch.setattr("sys.argv", ["backdoor.py", "--seeds", "0", "--ratios", "0.05", *args])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    return given


def test_backdoor_bench_hands_the_circuit_options_to_each_run(monkeypatch):
    how = ["--circuit-block", "1", "--circuit-ablation", "zero", "--circuit-judge", "plain", "--recipe-hold", "0"]
    given = given_to_run(monkeypatch, *how, "--code-only")
    assert given["circuit_block"] == 1 and given["circuit_ablation"] == "zero" and given["circuit_judge"] == "plain"
    assert given["code_only"] and given["recipe"].hold == 0
    assert given_to_run(monkeypatch, "--circuit-max-mlp", "0")["circuit_max_mlp"] is None  # no bound
    assert given_to_run(monkeypatch, "--circuit-max-mlp", "0.3")["circuit_max_mlp"] == 0.3


def test_backdoor_bench_defaults_are_the_code_circuit_that_met_the_targets(monkeypatch):
    """Without options the table's code circuit is the one the README's targets were met with: up to 64 features a
    try, left-out tokens read as the mean, judged on the blocked round trip, 16,000 prompts held off its task."""
    given = given_to_run(monkeypatch)
    assert (given["circuit_block"], given["circuit_ablation"], given["circuit_judge"]) == (64, "mean", "blocked")
    assert given["circuit_max_mlp"] == backdoor.CIRCUIT_MAX_MLP == 0.25  # the bound on its MLP
    assert given["recipe"].hold == backdoor.CODE_HOLD == 16_000 and not given["code_only"]
    assert backdoor.circuit_tag(backdoor.REFINE_TOKENS) == ""  # its rows carry no tag
    # anchored at 0.3 on the code circuit's recipe alone: the full round trip's recipe stays the labels'
    assert given["recipe"].code_anchor == backdoor.CODE_ANCHOR == 0.3 and given["recipe"].anchor == 0.0
    assert given["recipe"].scoped("code").name == ", anchor 0.3, 16000 held off-task"
    assert given["recipe"].scoped("full").name == ""
    given = given_to_run(monkeypatch, "--recipe-code-anchor", "0", "--recipe-anchor", "1")
    assert given["recipe"].scoped("code").name == ", 16000 held off-task"
    assert given["recipe"].scoped("full").name == ", anchor 1"


def test_measured_runs_every_model_ratio_and_seed_and_writes_after_each_seed(tmp_path):
    out = tmp_path / "o.json"
    args = argparse.Namespace(models="a,b", ratios="0.05,0.01", seeds="0,1", out=out)
    calls, on_disk = [], []

    def measure(model: str, ratio: float, seed: int) -> dict:
        on_disk.append(sum(len(e["runs"]) for e in json.loads(out.read_text())["results"]) if out.exists() else 0)
        calls.append((model, ratio, seed))
        return {"seed": seed, "rows": {"original": row(0.5, 0.2)}}

    entries, extra = runs_io.measured(args, "backdoor", Path(__file__), measure)
    assert calls == [(m, r, s) for m in "ab" for r in (0.05, 0.01) for s in (0, 1)]
    assert on_disk == list(range(8))  # the file held every seed before this one
    assert {k: [r["seed"] for r in v] for k, v in entries.items()} == {
        (m, r): [0, 1] for m in "ab" for r in (0.05, 0.01)
    }
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "backdoor" and saved["code"] == extra["code"] and len(saved["results"]) == 4
    assert saved["results"][0]["summary"]["original"]["asr"]["token"] == {"mean": 0.2, "sd": 0.0}
    env = saved["environment"]  # what the figures may depend on besides the code
    assert env == extra["environment"] and env["packages"]["torch"].startswith("2.13.0")
    assert env["packages"]["numpy"] == np.__version__ and env["packages"]["scipy"] is not None
    assert env["python"] == platform.python_version() and env["cpu"]
