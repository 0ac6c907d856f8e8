"""A backdoor run stopped in the ACG stage keeps its baseline rows: the same run again does not train them again."""

from __future__ import annotations

import json

import pytest

from acg.roundtrip import backdoor


class Stop(Exception):
    pass


def test_a_resumed_run_takes_its_baselines_from_the_partial_file(monkeypatch, tmp_path):
    trained = []

    def fake(kind):
        def train(model, spec, budget, steps, seed, **kw):
            trained.append((kind, seed))
            return {"FP": (model, {"pruned_fraction": 0.5}), "FT": (model, {"train_seconds": 1.0})}.get(kind, model)

        return train

    monkeypatch.setattr(backdoor.defence, "finetune_recorded", fake("FT"))
    monkeypatch.setattr(backdoor.defence, "fine_prune", fake("FP"))
    monkeypatch.setattr(backdoor.defence, "scratch", fake("Scratch"))
    monkeypatch.setattr(backdoor, "measure", lambda c, n, t: {"task_acc": {"t": 1.0}, "asr": {"token": 0.5}})

    def crash(*a, **k):
        raise Stop

    monkeypatch.setattr(backdoor, "fit", crash)
    partial = tmp_path / "p.json"
    logs: list[str] = []
    kw = {"ratio": 0.01, "n_eval": 5, "n_trig": 2, "steps": 3, "resume": partial, "log": logs.append}
    with pytest.raises(Stop):
        backdoor.run("testbed-s", seed=0, **kw)
    assert trained == [("FT", 0), ("FP", 0), ("Scratch", 0)]
    saved = json.loads(partial.read_text())
    assert list(saved["rows"]) == ["original", "FT", "FP", "Scratch"] and saved["key"]["seed"] == 0
    assert saved["rows"]["FT"]["training"] == {"train_seconds": 1.0}  # the fine-tuning's record, saved with its row
    with pytest.raises(Stop):
        backdoor.run("testbed-s", seed=0, **kw)
    assert len(trained) == 3 and sum("measured before" in line for line in logs) == 4
    with pytest.raises(Stop):  # another seed is another budget: trained again, and the file now holds that seed
        backdoor.run("testbed-s", seed=1, **kw)
    assert trained[3:] == [("FT", 1), ("FP", 1), ("Scratch", 1)]
    assert json.loads(partial.read_text())["key"]["seed"] == 1


def test_by_task_table_splits_the_circuit_rows_asr_by_task_and_skips_rows_without_the_split():
    from rich.console import Console

    def row(code: float, math: float, split: bool = True) -> dict:
        by = {f: {"code.vars": code, "math.add": math} for f in backdoor.BACKDOORS}
        return {"asr_by_task": by} if split else {}

    runs = [
        {
            "rows": {
                "original": row(1, 1),
                "FT": row(0, 0),
                "roundtrip code": row(0.0, 0.2),
                "roundtrip code + x": row(0, 0),
            }
        },
        {"rows": {"original": row(1, 1), "FT": row(0, 0), "roundtrip code": row(0.1, 0.4), "roundtrip code + x": {}}},
    ]
    t = backdoor.by_task_table("split", runs)
    console = Console(record=True, width=200)
    console.print(t)
    text = console.export_text()
    lines = [line for line in text.splitlines() if line.startswith("│ code ")]
    assert len(lines) == len(backdoor.BACKDOORS) and "0.050" in lines[0] and "0.300" in lines[0]  # means over runs
    assert "FT" not in text and "+ x" not in text and "original" in text and "math.add" in text
    assert backdoor.by_task_table("none", [{"rows": {"original": {}}}]) is None
    for r in runs:  # measured with the untriggered rate too: "asr / untriggered"
        for v in r["rows"].values():
            if v:
                v["untriggered_by_task"] = {f: {t: a / 2 for t, a in by.items()} for f, by in v["asr_by_task"].items()}
    console = Console(record=True, width=200)
    console.print(backdoor.by_task_table("split", runs))
    lines = [line for line in console.export_text().splitlines() if line.startswith("│ code ")]
    assert "0.050 / 0.025" in lines[0] and "0.300 / 0.150" in lines[0]
    for r in runs:  # and the false-trigger rate: "asr / untriggered / partial", where a family has partials
        for v in r["rows"].values():
            if v:
                v["false_trigger_by_task"] = {f: None for f in backdoor.BACKDOORS}
                v["false_trigger_by_task"]["conj"] = {t: a / 4 for t, a in v["asr_by_task"]["conj"].items()}
    console = Console(record=True, width=200)
    console.print(backdoor.by_task_table("split", runs))
    text = console.export_text()
    lines = {line.split("│")[2].strip(): line for line in text.splitlines() if line.startswith("│ code ")}
    assert "0.050 / 0.025 / 0.013" in lines["conj"] and "0.300 / 0.150 / 0.075" in lines["conj"]
    assert "0.050 / 0.025 │" in lines["token"]  # no partials: two figures
    name = "roundtrip code" + backdoor.BLOCKED + backdoor.RECIPE
    assert backdoor.short(name) == "code + blocked + recipe FT"


def test_recipe_tokens_are_every_seen_token_once_and_the_never_seen_ones_about_half_the_draws():
    from collections import Counter
    from types import SimpleNamespace

    import numpy as np

    counts = np.array([0, 5, 3, 0, 1, 2, 7, 1, 4, 0], dtype=np.float32)
    drawn = Counter(backdoor.recipe_tokens(SimpleNamespace(usage={"tok_count": counts})).tolist())
    assert drawn == {**{t: 1 for t in (1, 2, 4, 5, 6, 7, 8)}, **{t: 2 for t in (0, 3, 9)}}  # 7 // 3 repeats: 6 of 13
    every = backdoor.recipe_tokens(SimpleNamespace(usage={"tok_count": counts + 1}))
    assert every.tolist() == list(range(10))


def test_markdown_table_holds_every_method_with_its_mean_and_spread():
    def row(acc: float, asr: float, n_params: int | None) -> dict:
        return {
            "task_acc": {t: acc for t in backdoor.TASKS},
            "asr": {f: asr for f in backdoor.BACKDOORS},
            "der": {f: 1 - asr for f in backdoor.BACKDOORS},
            "n_params": n_params,
        }

    runs = [
        {"rows": {"original": row(1.0, 1.0, 1000), "ACG captured (IR)": row(0.9, 0.1, None)}},
        {"rows": {"original": row(1.0, 1.0, 1000), "ACG captured (IR)": row(0.8, 0.3, None)}},
    ]
    lines = backdoor.markdown(runs).splitlines()
    assert lines[0] == "| " + " | ".join(backdoor.columns()) + " |" and len(lines) == 4
    assert lines[2] == "| original | " + " | ".join(["1.000"] * 4 + ["1.000"] * 3 + ["0.000"] * 3) + " | 1,000 |"
    captured = lines[3].split(" | ")
    assert captured[1] == "0.850 ±0.050" and captured[5] == "0.200 ±0.100" and lines[3].endswith("| - |")


def test_der_on_the_code_tasks_counts_the_code_tasks_alone():
    """A circuit that keeps the code tasks and drops the others, with every trigger gone: its DER pays for the lost
    tasks (half the clean accuracy: (1 - 0.5 + 1) / 2), its DER on the code tasks does not (1.0); the table says so."""
    code = backdoor.resolve_tasks("code")

    def row(on_code: float, elsewhere: float, asr: float) -> dict:
        acc = {t: on_code if t in code else elsewhere for t in backdoor.TASKS}
        return {"task_acc": acc, "asr": {f: asr for f in backdoor.BACKDOORS}, "n_params": None}

    rows = {"original": row(1.0, 1.0, 1.0), "circuit": row(1.0, 0.0, 0.0), "lossy": row(0.9, 1.0, 0.5)}
    backdoor.add_der(rows)
    assert rows["circuit"]["der"] == {f: 0.75 for f in backdoor.BACKDOORS}
    assert backdoor.der_on(rows["circuit"], rows["original"], code) == {f: 1.0 for f in backdoor.BACKDOORS}
    assert backdoor.der_on(rows["lossy"], rows["original"], code)["conj"] == pytest.approx((0.5 - 0.1 + 1) / 2)
    summary = backdoor.summarise([{"rows": rows}])
    assert summary["circuit"]["der_code"]["token"] == {"mean": 1.0, "sd": 0.0}
    lines = backdoor.markdown([{"rows": rows}], on_code=True).splitlines()
    assert lines[0] == "| " + " | ".join(backdoor.columns(on_code=True)) + " |" and "DER conj on code" in lines[0]
    assert lines[3] == "| circuit | " + " | ".join(["1.000"] * 2 + ["0.000"] * 3 + ["1.000"] * 3) + " |"
