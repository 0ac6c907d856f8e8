"""`backdoor.run` end to end on testbed-s with a tiny budget and few steps: every row of the table is measured, DER is
filled in against the original, and the code circuit's report says whether it adds or copies (`math_copy`); and
`backdoor.freeze_run`, the recipe with parameter sets left untrained, the same way."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from acg.compiler.fit import FitSpec
from acg.roundtrip import backdoor, defence

ROWS = [
    "original",
    "FT",
    "FP",
    "Scratch",
    "ACG replacement",
    "ACG captured (IR)",
    "- QK pairs only",
    "- layer-0 QK pairs only",
    "- OV entries only",
    "roundtrip full",
    "roundtrip full + layer-0 pairs",
    "roundtrip full + layer-0 pairs blocked",
    "roundtrip full + layer-0 pairs blocked + FT, confirmed insertions + budget",
    "roundtrip code",
    "roundtrip code + layer-0 pairs blocked",
    "roundtrip code + layer-0 pairs blocked + FT, confirmed insertions + budget",
]


@pytest.mark.slow
def test_a_tiny_backdoor_run_measures_every_row():
    spec = FitSpec(steps=30, e2e_steps=0, usage_prompts=64, batch_size=256, threads=1)
    out = backdoor.run(
        "testbed-s", ratio=0.002, seed=3, n_eval=40, n_trig=5, steps=2, fit_spec=spec, threads=1, n_insert=50
    )
    rows = out["rows"]
    assert list(rows) == ROWS
    assert out["n_budget"] > 0 and out["steps"] == 2
    families = set(rows["original"]["asr"])
    assert families == {"token", "conj", "phrase"}
    for method, row in rows.items():
        assert set(row["der"]) == families, method
        assert all(0.0 <= v <= 1.0 for v in row["der"].values()), method
    assert all(v == 0.5 for v in rows["original"]["der"].values())  # no drop, no cost
    code = rows["roundtrip code"]
    split = code["report"]["math_copy"]
    assert split["n"] == 40 and 0.0 <= split["in_prompt"] <= 1.0 and 0.0 <= split["copies"] <= 1.0
    assert split["task_acc"] == pytest.approx(code["task_acc"]["math.add"])  # the same held-out prompts as the table
    assert sum(code["report"]["n_features"]) == code["report"]["circuit"]["k"]  # the checkpoint is the circuit's
    for scope, budget in (("full", out["n_budget"]), ("code", None)):
        tuned = rows[f"roundtrip {scope}{backdoor.BLOCKED}{backdoor.RECIPE}"]["report"]["finetune"]
        assert 0 < tuned["n"] - tuned["n_budget"] <= 50  # the confirmed insertions, then the budget
        assert budget is None or tuned["n_budget"] == budget


@pytest.mark.slow
def test_a_tiny_freeze_run_leaves_each_set_untrained_and_rates_it():
    spec = FitSpec(steps=30, e2e_steps=0, usage_prompts=64, batch_size=256, threads=1)
    sets = {"nothing": (), "layer-0 QK": backdoor.FREEZE_SETS["layer-0 QK"], "absent": ("blocks.9.attn.W_Q",)}
    out = backdoor.freeze_run(
        "testbed-s", ratio=0.002, seed=3, n_eval=40, n_trig=5, sets=sets, steps=2, fit_spec=spec, threads=1, n_insert=50
    )
    rows = out["rows"]
    blocked = f"roundtrip full{backdoor.BLOCKED}"
    assert list(rows) == ["original", blocked, *(f"recipe FT, {k} frozen" for k in sets)]
    assert all(rows[f"recipe FT, {k} frozen"]["lr"] == defence.FT_LR for k in sets)
    assert rows["recipe FT, nothing frozen"]["frozen"] == []
    assert rows["recipe FT, layer-0 QK frozen"]["frozen"] == list(backdoor.FREEZE_SETS["layer-0 QK"])
    assert rows["recipe FT, absent frozen"]["frozen"] == []  # a name the model lacks is passed over
    assert 0 < out["recipe"]["n"] - out["recipe"]["n_budget"] <= 50 and out["steps"] == 2
    for method, row in rows.items():
        assert set(row["der"]) == {"token", "conj", "phrase"}, method
        assert row["n_params"] == rows[blocked]["n_params"] or method == "original"


def test_freeze_run_fine_tunes_each_set_at_each_rate_and_labels_the_rows(monkeypatch):
    """The sets x rates loop without the fit: each fine-tuning gets its set's names (those the model has) and its
    rate, and a row's label names the rate unless it is the recipe's own."""
    seen = []

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(torch.zeros(1))

    monkeypatch.setattr(backdoor, "load", lambda name: Stub())
    monkeypatch.setattr(backdoor.defence, "clean_budget", lambda train, ratio, seed: [SimpleNamespace(ids=[1])] * 7)
    monkeypatch.setattr(backdoor, "fit", lambda model, ids, spec: (None, {"seconds": 1.0}))
    monkeypatch.setattr(backdoor.dense, "select_captured", lambda acg: None)
    monkeypatch.setattr(backdoor.dense, "roundtrip", lambda acg, keep, block: (Stub(), None, {}))
    monkeypatch.setattr(backdoor.dense, "n_params", lambda m: {"n_params": 1})
    monkeypatch.setattr(backdoor, "recipe_data", lambda acg, budget, n, seed: ([], {"n": 0}))
    monkeypatch.setattr(
        backdoor.defence,
        "finetune",
        lambda rt, base, data, steps, seed, lr, frozen: seen.append((lr, list(frozen))) or Stub(),
    )
    score = {"task_acc": {"code.vars": 1.0}, "asr": dict.fromkeys(("token", "conj", "phrase"), 0.5)}
    monkeypatch.setattr(backdoor, "measure", lambda model, n, n_trig: score)
    sets = {"nothing": (), "W": ("W", "absent")}
    out = backdoor.freeze_run("testbed-s", sets=sets, lrs=(defence.FT_LR, 5e-5), steps=3)
    assert seen == [(defence.FT_LR, []), (5e-5, []), (defence.FT_LR, ["W"]), (5e-5, ["W"])]
    labels = [
        "recipe FT, nothing frozen",
        "recipe FT, nothing frozen, lr 5e-05",
        "recipe FT, W frozen",
        "recipe FT, W frozen, lr 5e-05",
    ]
    assert list(out["rows"])[2:] == labels
    assert [out["rows"][k]["lr"] for k in labels] == [defence.FT_LR, 5e-5] * 2
