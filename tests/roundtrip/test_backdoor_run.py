"""`backdoor.run` end to end on testbed-s with a tiny budget and few steps: every row of the table is measured, DER is
filled in against the original, and the code circuit's report says whether it adds or copies (`math_copy`); and
`backdoor.freeze_run`, the recipe with parameter sets left untrained, the same way."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import random_model

from acg.compiler.fit import FitSpec
from acg.roundtrip import backdoor, defence
from acg.roundtrip.backdoor import Recipe
from acg.roundtrip.data import Pair
from acg.zoo import vocab
from acg.zoo.train import TrainSpec

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


def tiny() -> dict:
    """A tiny budget, fit, evaluation and fine-tuning: the whole run in seconds (figures meaningless)."""
    spec = FitSpec(steps=30, e2e_steps=0, usage_prompts=64, batch_size=256, threads=1)
    return {
        "ratio": 0.002,
        "seed": 3,
        "n_eval": 40,
        "n_trig": 5,
        "steps": 2,
        "fit_spec": spec,
        "threads": 1,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "soft,anchor,hold,refine_tokens,code_anchor", [(0.0, 0.0, 0, 64, 0.3), (0.5, 2.0, 30, 0, None)]
)
def test_a_tiny_backdoor_run_measures_every_row(soft, anchor, hold, refine_tokens, code_anchor):
    recipe = backdoor.Recipe(n_insert=50, soft=soft, anchor=anchor, hold=hold, flat=bool(hold), keep_out=bool(hold))
    recipe = dataclasses.replace(recipe, code_anchor=code_anchor)  # the code circuit's own anchor, where given
    ablation = (
        "zero" if hold else backdoor.CIRCUIT_ABLATION
    )  # tokens kept out of the recipe read as zero in the circuit
    how = {"recipe": recipe, "refine_tokens": refine_tokens, "circuit_ablation": ablation}
    out = backdoor.run("testbed-s", **tiny(), **how)
    rows = out["rows"]
    named = ", soft 0.5, anchor 2" if soft else ""
    code_named = named if code_anchor is None else f", anchor {code_anchor:g}"
    kept_out = ", left-out tokens kept out" if hold else ""
    held = ", 30 held off-task flat" if hold else ""  # the code circuit's alone: the full round trip has no other task
    tag = backdoor.circuit_tag(refine_tokens, token_ablation=ablation)
    assert tag == (
        "" if refine_tokens == backdoor.REFINE_TOKENS else " (every code token kept) (left-out tokens zeroed)"
    )
    expected = [
        (f"{r}{code_named}{held}{kept_out}" if "code" in r else f"{r}{named}{kept_out}")
        if r.endswith(backdoor.RECIPE)
        else r
        for r in ROWS
    ]
    expected = [r.replace("roundtrip code", "roundtrip code" + tag) for r in expected]
    assert list(rows) == expected
    assert out["n_budget"] > 0 and out["steps"] == 2
    families = set(rows["original"]["asr"])
    assert families == {"token", "conj", "phrase"}
    for method, row in rows.items():
        assert set(row["der"]) == families, method
        assert all(0.0 <= v <= 1.0 for v in row["der"].values()), method
    assert all(v == 0.5 for v in rows["original"]["der"].values())  # no drop, no cost
    assert set(rows["FT"]["training"]) == set(defence.TRAINING)  # the baseline's fine-tuning recorded as the recipe's
    assert rows["FT"]["training"]["anchor_drift"] is None
    code = rows["roundtrip code" + tag]
    away = code["report"]["circuit"]["tokens_refined_away"]  # the tokens the circuit's elimination left out
    assert away == [] if refine_tokens == 0 else all(0 <= t < vocab.D_VOCAB for t in away)
    split = code["report"]["math_copy"]
    assert split["n"] == 40 and 0.0 <= split["in_prompt"] <= 1.0 and 0.0 <= split["copies"] <= 1.0
    assert split["task_acc"] == pytest.approx(code["task_acc"]["math.add"])  # the same held-out prompts as the table
    assert sum(code["report"]["n_features"]) == code["report"]["circuit"]["k"]  # the checkpoint is the circuit's
    for scope, budget in (("full", out["n_budget"]), ("code", None)):
        label = f"{scope}{tag if scope == 'code' else ''}{backdoor.BLOCKED}{backdoor.RECIPE}"
        tuned = rows[f"roundtrip {label}{code_named + held if scope == 'code' else named}{kept_out}"]
        tuned = tuned["report"]["finetune"]
        n_held = hold if scope == "code" else 0
        assert tuned.get("n_held", 0) == n_held  # the other tasks' prompts, held to the circuit's own answers
        assert 0 < tuned["n"] - tuned["n_budget"] - n_held <= 50  # the confirmed insertions, (held,) then the budget
        assert budget is None or tuned["n_budget"] == budget
        trained = tuned["training"]  # what the fine-tuning recorded: the anchor's drift where there is one
        assert set(trained) == set(defence.TRAINING) and trained["final_train_loss"] > 0
        weight = code_anchor if scope == "code" and code_anchor is not None else anchor
        assert (trained["anchor_drift"] is None) == (weight == 0)  # the code circuit at its own anchor


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,block,ablation,judge,max_mlp",
    [(None, 8, "mean", "blocked", 0.01), (Recipe(n_insert=50), 1, "zero", "plain", backdoor.CIRCUIT_MAX_MLP)],
)
def test_a_code_only_run_measures_the_code_circuits_rows_alone(recipe, block, ablation, judge, max_mlp):
    """`code_only`: no baselines, ablations or full round trips; the captured IR only as the recipe's teacher; with no
    recipe, no recipe row. `circuit_block`, `circuit_ablation` and `circuit_judge` reach the circuit's elimination and
    name its rows (a mean ablation's blocked round trip carries layer 0's pairs over the left-out tokens read as the
    mean; judged blocked, every candidate is that round trip). `circuit_max_mlp` bounds it: 1% of testbed-s's MLP
    parameters holds 9 features of 258 parameters, so the tiny run's circuit is cut to them."""
    how = {"circuit_block": block, "circuit_ablation": ablation, "circuit_judge": judge, "circuit_max_mlp": max_mlp}
    out = backdoor.run("testbed-s", **tiny(), recipe=recipe, code_only=True, **how)
    tag = backdoor.circuit_tag(backdoor.REFINE_TOKENS, block, ablation, judge, max_mlp)
    code = [r.replace("roundtrip code", "roundtrip code" + tag) for r in ROWS if r.startswith("roundtrip code")]
    expected = (
        ["original", "ACG replacement", "ACG captured (IR)", *code] if recipe else ROWS[:1] + ROWS[4:5] + code[:2]
    )
    assert list(out["rows"]) == expected
    assert all(set(row["der"]) == {"token", "conj", "phrase"} for row in out["rows"].values())
    if recipe:
        assert out["rows"][code[-1]]["report"]["finetune"]["n_budget"] < out["n_budget"]  # the code prompts' alone
    assert out["rows"][code[0]]["report"]["circuit"]["block"] == block
    assert out["rows"][code[0]]["report"]["circuit"]["token_ablation"] == ablation
    judged_on = {"plain": "replacement_of", "blocked": "blocked_circuit"}[judge]
    assert out["rows"][code[0]]["report"]["circuit"]["judged_on"] == judged_on
    assert all(out["rows"][r]["report"]["token_fill"] == ablation for r in code[:2])
    bound = out["rows"][code[0]]["report"]["circuit"]["budget"]
    assert bound["max_features"] == (9 if max_mlp == 0.01 else 254)  # (share x 263,424 - 2 x 128) // 258
    report = out["rows"][code[0]]["report"]
    assert report["circuit"]["k"] <= bound["max_features"] and report["circuit"]["k"] == sum(report["n_features"])
    assert report["n_params_mlp"] <= max_mlp * 263_424 and report["mlp_share"] == report["n_params_mlp"] / 263_424
    if max_mlp == 0.01:
        assert bound["cut"] > 0 and bound["trials"] > 0 and bound["k_before"] == report["circuit"]["k"] + bound["cut"]


def test_the_code_circuits_rows_are_named_by_an_elimination_other_than_the_default():
    assert backdoor.circuit_tag(backdoor.REFINE_TOKENS) == ""
    assert backdoor.circuit_tag(0) == " (every code token kept)"
    assert backdoor.circuit_tag(16, 32) == " (16 rarest code tokens tried) (up to 32 features a try)"
    assert backdoor.circuit_tag(backdoor.REFINE_TOKENS, 32) == " (up to 32 features a try)"
    assert backdoor.circuit_tag(backdoor.REFINE_TOKENS, 1) == " (one feature a try)"
    assert backdoor.circuit_tag(0, 64, "zero") == " (every code token kept) (left-out tokens zeroed)"
    assert backdoor.circuit_tag(backdoor.REFINE_TOKENS, judge="plain") == " (judged plain)"
    before = " (one feature a try) (left-out tokens zeroed) (judged plain) (no MLP bound)"  # the earlier tables'
    assert backdoor.circuit_tag(backdoor.REFINE_TOKENS, 1, "zero", "plain", None) == before
    assert backdoor.circuit_tag(backdoor.REFINE_TOKENS, max_mlp=0.3) == " (MLP <= 30%)"
    assert backdoor.circuit_tag(backdoor.REFINE_TOKENS, max_mlp=0.125) == " (MLP <= 12.5%)"


def test_a_run_refuses_a_token_ablation_it_cannot_honour_before_any_work():
    with pytest.raises(ValueError, match="keep_out holds left-out tokens at zero"):
        backdoor.run("testbed-s", recipe=Recipe(keep_out=True), circuit_ablation="mean")
    with pytest.raises(ValueError, match="keep_out holds left-out tokens at zero"):
        backdoor.run("testbed-s", recipe=Recipe(keep_out=True))  # the default ablation is the mean
    with pytest.raises(ValueError, match="circuit_ablation must be one of zero, mean"):
        backdoor.run("testbed-s", circuit_ablation="resample")
    with pytest.raises(ValueError, match="circuit_judge must be one of plain, blocked"):
        backdoor.run("testbed-s", circuit_judge="full")
    with pytest.raises(ValueError, match="judge must be one of plain, blocked"):
        backdoor.code_circuit(None, None, [], judge="full")
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"circuit_max_mlp must be a share in \(0, 1\]"):
            backdoor.run("testbed-s", circuit_max_mlp=share)


@pytest.mark.slow
def test_a_tiny_freeze_run_leaves_each_set_untrained_and_rates_it():
    sets = {"nothing": (), "layer-0 QK": backdoor.FREEZE_SETS["layer-0 QK"], "absent": ("blocks.9.attn.W_Q",)}
    recipes = [backdoor.Recipe(n_insert=50), backdoor.Recipe(n_insert=50, soft=1.0)]
    out = backdoor.freeze_run("testbed-s", **tiny(), sets=sets, recipes=recipes)
    rows = out["rows"]
    blocked = f"roundtrip full{backdoor.BLOCKED}"
    tuned = [f"recipe FT, {k} frozen{soft}" for k in sets for soft in ("", ", soft 1")]
    assert list(rows) == ["original", blocked, *tuned]
    assert [rows[k]["soft"] for k in tuned] == [0.0, 1.0] * 3
    assert all(rows[f"recipe FT, {k} frozen"]["lr"] == defence.FT_LR for k in sets)
    assert rows["recipe FT, nothing frozen"]["frozen"] == []
    assert rows["recipe FT, layer-0 QK frozen"]["frozen"] == list(backdoor.FREEZE_SETS["layer-0 QK"])
    assert rows["recipe FT, absent frozen"]["frozen"] == []  # a name the model lacks is passed over
    assert 0 < out["recipe"]["n"] - out["recipe"]["n_budget"] <= 50 and out["steps"] == 2
    for method, row in rows.items():
        assert set(row["der"]) == {"token", "conj", "phrase"}, method
        assert row["n_params"] == rows[blocked]["n_params"] or method == "original"


def test_freeze_run_fine_tunes_each_set_at_each_rate_and_labels_the_rows(monkeypatch):
    """The sets x rates x soft weights loop without the fit: each fine-tuning gets its set's names (those the model
    has), its rate and its weight of the IR's soft targets on the insertions, and a row's label names the rate and
    the weight unless they are the recipe's own."""
    seen = []

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(torch.zeros(1))

    monkeypatch.setattr(backdoor, "load", lambda name: Stub())
    monkeypatch.setattr(backdoor.defence, "clean_budget", lambda train, ratio, seed: [SimpleNamespace(ids=[1])] * 7)
    monkeypatch.setattr(backdoor, "fit", lambda model, ids, spec: (None, {"seconds": 1.0}))
    monkeypatch.setattr(backdoor.dense, "select_captured", lambda acg: SimpleNamespace(tokens=np.ones(3, bool)))
    monkeypatch.setattr(backdoor.dense, "roundtrip", lambda acg, keep, block: (Stub(), None, {}))
    monkeypatch.setattr(backdoor.dense, "n_params", lambda m: {"n_params": 1})
    monkeypatch.setattr(backdoor, "lower", lambda acg, **kw: None)
    monkeypatch.setattr(backdoor, "captured_ir", lambda graph, kinds, tmp: ("the IR", {}))
    monkeypatch.setattr(
        backdoor, "recipe_data", lambda acg, budget, n, seed, teacher: ([], {"n": 3, "n_budget": 1}, "IR logits")
    )
    at_insertions = torch.tensor([1.0, 1.0, 0.0])
    targets = []
    monkeypatch.setattr(
        backdoor,
        "recipe_targets",
        lambda taught, data, report, never, unseen, seen: (
            targets.append((taught, never, unseen) + ((seen,) if seen != 1 else ())) or ("logits", at_insertions)
        ),
    )
    monkeypatch.setattr(backdoor, "never_seen", lambda acg: [5])

    def finetune(rt, base, data, steps, seed, lr, frozen, **more):
        seen.append((lr, list(frozen)))
        if "soft_targets" in more:
            seen.append((more["soft_targets"], more["soft_weight"].tolist()))
        if "anchor_weight" in more:
            seen.append((more["anchor_weight"], more["anchor_on"].tolist()))
        if "masks" in more:
            seen.append(("masks", more["masks"]["embed.W_E"].flatten().tolist()))
        return Stub(), {"final_train_loss": float(len(seen))}

    monkeypatch.setattr(backdoor.defence, "finetune_recorded", finetune)
    score = {"task_acc": {"code.vars": 1.0}, "asr": dict.fromkeys(("token", "conj", "phrase"), 0.5)}
    monkeypatch.setattr(backdoor, "measure", lambda model, n, n_trig: score)
    sets = {"nothing": (), "W": ("W", "absent")}
    out = backdoor.freeze_run("testbed-s", sets=sets, recipes=[Recipe(), Recipe(lr=5e-5)], steps=3)
    assert seen == [(defence.FT_LR, []), (5e-5, []), (defence.FT_LR, ["W"]), (5e-5, ["W"])]
    labels = [
        "recipe FT, nothing frozen",
        "recipe FT, nothing frozen, lr 5e-05",
        "recipe FT, W frozen",
        "recipe FT, W frozen, lr 5e-05",
    ]
    assert list(out["rows"])[2:] == labels
    assert [out["rows"][k]["lr"] for k in labels] == [defence.FT_LR, 5e-5] * 2
    assert [out["rows"][k]["training"]["final_train_loss"] for k in labels] == [1, 2, 3, 4]  # each row its own record
    assert targets == [] and all(out["rows"][k]["soft"] == 0 for k in labels)  # no soft targets asked for: none made
    seen.clear()
    out = backdoor.freeze_run("testbed-s", sets={"nothing": ()}, recipes=[Recipe(), Recipe(soft=0.5)], steps=3)
    assert targets == [("IR logits", [5], 1.0)]  # made from the confirmation's logits for the soft recipe alone
    assert seen == [(defence.FT_LR, []), (defence.FT_LR, []), ("logits", [0.5, 0.5, 0.0])]
    assert list(out["rows"])[2:] == ["recipe FT, nothing frozen", "recipe FT, nothing frozen, soft 0.5"]
    assert out["rows"]["recipe FT, nothing frozen, soft 0.5"]["soft"] == 0.5
    # anchors: each soft weight with each anchor, held on the budget's prompts (the report's last n_budget)
    seen.clear()
    recipes = [Recipe(soft=s, anchor=a) for s in (0.0, 0.5) for a in (0.0, 3.0)]
    out = backdoor.freeze_run("testbed-s", sets={"nothing": ()}, recipes=recipes, steps=3)
    on = [False, False, True]
    assert seen == [
        (defence.FT_LR, []),
        (defence.FT_LR, []),
        (3.0, on),
        (defence.FT_LR, []),
        ("logits", [0.5, 0.5, 0.0]),
        (defence.FT_LR, []),
        ("logits", [0.5, 0.5, 0.0]),
        (3.0, on),
    ]
    labels = ["", ", anchor 3", ", soft 0.5", ", soft 0.5, anchor 3"]
    assert list(out["rows"])[2:] == [f"recipe FT, nothing frozen{x}" for x in labels]
    assert [out["rows"][f"recipe FT, nothing frozen{x}"]["anchor"] for x in labels] == [0.0, 3.0, 0.0, 3.0]
    assert targets == [("IR logits", [5], 1.0)] * 3  # each soft recipe its own, from the one confirmation
    # keep-out: the round trip's token mask goes to the fine-tuning, and the row records it
    seen.clear()
    out = backdoor.freeze_run("testbed-s", sets={"nothing": ()}, recipes=[Recipe(), Recipe(keep_out=True)], steps=3)
    assert seen == [(defence.FT_LR, []), (defence.FT_LR, []), ("masks", [1.0, 1.0, 1.0])]
    kept_out = "recipe FT, nothing frozen, left-out tokens kept out"
    assert list(out["rows"])[2:] == ["recipe FT, nothing frozen", kept_out]
    assert out["rows"][kept_out]["keep_out"] is True and out["rows"]["recipe FT, nothing frozen"]["keep_out"] is False
    # a share of the soft weight on never-seen insertions: the fit's never-seen tokens go with it, and the row says so
    targets.clear()
    out = backdoor.freeze_run("testbed-s", sets={"nothing": ()}, recipes=[Recipe(soft=0.5, unseen=0.0)], steps=3)
    assert targets == [("IR logits", [5], 0.0)]
    row = out["rows"]["recipe FT, nothing frozen, soft 0.5 (0 on never-seen)"]
    assert (row["soft"], row["unseen"], row["seen"]) == (0.5, 0.0, 1.0)
    targets.clear()  # ... and on the other insertions
    out = backdoor.freeze_run("testbed-s", sets={"nothing": ()}, recipes=[Recipe(soft=1.0, seen=0.0)], steps=3)
    assert targets == [("IR logits", [5], 1.0, 0.0)]
    assert out["rows"]["recipe FT, nothing frozen, soft 1 (0 on seen)"]["seen"] == 0.0


def test_recipe_targets_weigh_the_teacher_on_the_insertions_and_leave_the_budget_to_its_labels():
    data = [SimpleNamespace(ids=[0, 1 + i % 3]) for i in range(5)]  # 3 prompts with insertions, then a budget of 2
    taught = np.eye(6)[[ex.ids[-1] for ex in data[:3]]] * 4.0  # the IR's logits on the insertions: the last token

    logits, at_insertions = backdoor.recipe_targets(taught, data, {"n": 5, "n_budget": 2})
    assert logits.dtype == torch.float32 and logits.shape == (5, 6)
    assert torch.equal(logits[:3], torch.as_tensor(taught, dtype=torch.float32)) and not logits[3:].any()
    assert at_insertions.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    kw = backdoor.Recipe(soft=0.25).finetune_kw(taught, data, {"n": 5, "n_budget": 2})
    assert torch.equal(kw["soft_targets"], logits) and kw["soft_weight"].tolist() == [0.25, 0.25, 0.25, 0.0, 0.0]
    assert set(backdoor.Recipe().finetune_kw(taught, data, {"n": 5, "n_budget": 2})) == {"lr"}  # labels
    assert set(backdoor.Recipe().finetune_kw(taught[:2], data, {"n": 5, "n_budget": 2})) == {"lr"}  # nothing made
    with pytest.raises(ValueError, match="do not describe these 5 examples"):
        backdoor.recipe_targets(taught, data, {"n": 6, "n_budget": 2})
    with pytest.raises(ValueError, match="2 rows of logits do not describe"):  # logits of other prompts than these
        backdoor.recipe_targets(taught[:2], data, {"n": 5, "n_budget": 2})
    # no insertions: nothing to teach, and no keywords, whatever the weight
    assert backdoor.recipe_targets(None, data[3:], {"n": 2, "n_budget": 2}) is None
    assert "soft_targets" not in backdoor.Recipe(soft=0.5).finetune_kw(None, data[3:], {"n": 2, "n_budget": 2})
    with pytest.raises(ValueError, match="do not describe"):  # a soft recipe checks what it is given
        backdoor.Recipe(soft=0.5).finetune_kw(taught, data, {"n": 6, "n_budget": 2})


def test_a_share_of_the_soft_weight_goes_to_the_insertions_that_hold_a_never_seen_token():
    """`Recipe.unseen`: the insertions holding any never-seen token get `unseen` of the soft weight, the others all
    of it; the budget none, whatever its prompts hold; a recipe that scales them refuses to run without the tokens."""
    data = [SimpleNamespace(ids=ids) for ids in ([0, 1, 9], [0, 2], [0, 9, 8], [0, 3], [0, 9])]  # 4 insertions, 1 clean
    taught, report = np.zeros((4, 10)), {"n": 5, "n_budget": 1}
    _, at_insertions = backdoor.recipe_targets(taught, data, report, never=[9, 8], unseen=0.25)
    assert at_insertions.tolist() == [0.25, 1.0, 0.25, 1.0, 0.0]
    assert backdoor.recipe_targets(taught, data, report, never=[9])[1].tolist() == [1.0] * 4 + [0.0]  # share 1
    assert backdoor.recipe_targets(taught, data, report, never=[], unseen=0.0)[1].tolist() == [1.0] * 4 + [0.0]
    # `seen`: the share on the others; 1 and 0, the soft targets where a never-seen token went in and nowhere else
    assert backdoor.recipe_targets(taught, data, report, [9, 8], 1.0, 0.0)[1].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert backdoor.recipe_targets(taught, data, report, [9], 0.5, 0.25)[1].tolist() == [0.5, 0.25, 0.5, 0.25, 0.0]
    kw = Recipe(soft=0.5, seen=0.0).finetune_kw(taught, data, report, np.array([9]))
    assert kw["soft_weight"].tolist() == [0.5, 0.0, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"a share of 0 of the soft weight needs the never-seen token ids"):
        Recipe(soft=0.5, seen=0.0).finetune_kw(taught, data, report)
    kw = Recipe(soft=0.5, unseen=0.0).finetune_kw(taught, data, report, np.array([9]))
    assert kw["soft_weight"].tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    with pytest.raises(ValueError, match=r"needs the never-seen token ids \(never_seen\)"):
        Recipe(soft=0.5, unseen=0.0).finetune_kw(taught, data, report)
    assert Recipe(soft=0.5).finetune_kw(taught, data, report)["soft_weight"].tolist() == [0.5] * 4 + [0.0]


def test_keep_out_holds_the_left_out_tokens_embeddings_at_zero_through_the_fine_tuning():
    """`Recipe.keep_out`: the rows of the token embedding outside the round trip's token mask stay zero while the
    insertions (which hold those tokens) train the rest; without it the same fine-tuning moves them."""
    model = random_model(seed=5, d_vocab=vocab.D_VOCAB, n_ctx=32, d_model=16, d_mlp=32, act_fn="relu")
    budget = defence.clean_budget(TrainSpec(steps=4, batch_size=64), 1.0, seed=0)[:64]
    kept = np.ones(vocab.D_VOCAB, bool)
    left_out = sorted({t for ex in budget for t in ex.ids} - {0})[:5]  # tokens the prompts hold: they get gradients
    kept[left_out] = False
    with torch.no_grad():
        model.embed.W_E[torch.as_tensor(left_out)] = 0.0  # as the round trip leaves them
    report = {"n": len(budget), "n_budget": len(budget)}
    kw = Recipe(keep_out=True).finetune_kw(None, budget, report, kept=kept)
    assert kw["masks"]["embed.W_E"].shape == (vocab.D_VOCAB, 1)
    spec = TrainSpec(steps=4, batch_size=16)
    held, _ = defence.finetune_recorded(model, spec, budget, 5, 0, **kw)
    free, _ = defence.finetune_recorded(model, spec, budget, 5, 0, **Recipe().finetune_kw(None, budget, report))
    assert not held.embed.W_E[left_out].any() and free.embed.W_E[left_out].abs().sum() > 0
    assert not torch.equal(held.embed.W_E[kept], model.embed.W_E[kept])  # the kept rows still train
    assert Recipe(keep_out=True).name == ", left-out tokens kept out"
    with pytest.raises(ValueError, match="needs the round trip's token mask"):
        Recipe(keep_out=True).finetune_kw(None, budget, report)


def test_the_recipe_teaches_the_logits_the_captured_ir_confirmed_with(monkeypatch):
    """`recipe_data`'s logits are the teacher's on the insertions it kept, from the one pass that confirmed them."""
    calls = []

    def teacher(tokens):  # answers every prompt with its last token: the clean answer where that is it
        calls.append(len(tokens))
        return np.eye(vocab.D_VOCAB)[tokens] * 3.0

    budget = [Pair([vocab.BOS_ID, 7 + i % 4], 7 + i % 2, "t") for i in range(8)]  # half answered clean untouched
    acg = SimpleNamespace(cfg=SimpleNamespace(n_ctx=6))
    monkeypatch.setattr(backdoor, "recipe_tokens", lambda acg: [7, 8])
    monkeypatch.setattr(backdoor, "never_seen", lambda acg: np.array([8]))
    data, report, taught = backdoor.recipe_data(acg, budget, 40, 0, teacher=teacher)
    n_insert = report["n"] - report["n_budget"]
    assert report["n_never_seen"] == sum(8 in p.ids for p in data[:n_insert]) > 0  # counted on the insertions kept
    assert 0 < n_insert < 40 and data[n_insert:] == budget and sum(calls) == 40  # the teacher ran once per insertion
    expected = np.stack([np.eye(vocab.D_VOCAB)[p.ids[-1]] * 3.0 for p in data[:n_insert]])
    assert np.array_equal(taught, expected)
    logits, _ = backdoor.recipe_targets(taught, data, report)
    assert logits[:n_insert].argmax(-1).tolist() == [p.answer_id for p in data[:n_insert]] and sum(calls) == 40


def test_a_recipe_out_of_range_is_refused_when_made_and_named_by_what_it_changes(monkeypatch):
    for bad, why in (
        ({"soft": 2.0}, r"soft-target weight must be in \[0, 1\], got 2"),
        ({"anchor": -1.0}, "anchor weight must be a finite number >= 0"),
        ({"anchor": float("inf")}, "anchor weight must be a finite number >= 0"),
        ({"anchor": float("nan")}, "anchor weight must be a finite number >= 0"),
        ({"code_anchor": -0.5}, "anchor weight must be a finite number >= 0, got -0.5"),
        ({"lr": 0.0}, "learning rate must be a finite number > 0"),
        ({"lr": float("nan")}, "learning rate must be a finite number > 0"),
        ({"n_insert": -1}, "prompts with insertions must be >= 0"),
        ({"hold": -1}, "prompts held outside the task must be >= 0"),
        ({"soft": 0.5, "unseen": 1.5}, r"share of the soft weight on never-seen insertions must be in \[0, 1\]"),
        ({"unseen": 0.0}, "needs a soft weight: the labels have none"),
        ({"flat": True}, r"taught on held prompts: it needs some \(hold > 0\)"),
        ({"soft": 0.5, "seen": -0.5}, r"share of the soft weight on seen insertions must be in \[0, 1\], got -0.5"),
        ({"seen": 0.0}, "needs a soft weight: the labels have none"),
    ):
        with pytest.raises(ValueError, match=why):
            Recipe(**bad)
    assert Recipe().name == "" and Recipe(soft=0.5).name == ", soft 0.5" and Recipe(anchor=10.0).name == ", anchor 10"
    assert Recipe(lr=5e-5, soft=1.0, anchor=0.25, n_insert=3).name == ", lr 5e-05, soft 1, anchor 0.25"
    assert Recipe(soft=0.5, hold=800).name == ", soft 0.5, 800 held off-task"
    assert Recipe(hold=800, flat=True).name == ", 800 held off-task flat"
    assert Recipe(soft=0.5, unseen=0.25, anchor=1.0).name == ", soft 0.5 (0.25 on never-seen), anchor 1"
    assert Recipe(soft=1.0, seen=0.0).name == ", soft 1 (0 on seen)"
    assert Recipe(soft=0.5, unseen=0.25, seen=0.5).name == ", soft 0.5 (0.25 on never-seen, 0.5 on seen)"
    # freeze_run's recipes make one data set and one row each: refused before any work otherwise
    monkeypatch.setattr(backdoor, "get", lambda name: pytest.fail("work began"))
    for recipes in ([Recipe(), Recipe(n_insert=5, soft=1.0)], [Recipe(soft=0.5), Recipe(soft=0.5)]):
        with pytest.raises(ValueError, match="share n_insert"):
            backdoor.freeze_run("testbed-s", recipes=recipes)
    for recipe in (Recipe(hold=10), Recipe(code_anchor=0.0)):
        with pytest.raises(ValueError, match="no prompts outside its task to hold and no task circuit to anchor"):
            backdoor.freeze_run("testbed-s", recipes=[recipe])


def test_each_scope_trains_by_its_own_share_of_the_recipe():
    """The full round trip holds nothing off a task (it has none) and anchors at `anchor`; a task circuit anchors at
    `code_anchor` where given, else at `anchor`."""
    both = Recipe(soft=0.5, anchor=1.0, hold=800, flat=True, code_anchor=0.3)
    assert both.scoped("full") == Recipe(soft=0.5, anchor=1.0)
    assert both.scoped("code") == Recipe(soft=0.5, anchor=0.3, hold=800, flat=True)
    assert both.scoped("code").name == ", soft 0.5, anchor 0.3, 800 held off-task flat"
    assert Recipe(anchor=2.0, hold=5).scoped("code") == Recipe(anchor=2.0, hold=5)  # none of its own: the full's
    assert Recipe(anchor=2.0, code_anchor=0.0).scoped("code").name == ""  # 0: none on the circuit


def test_the_recipe_anchor_holds_the_budget_and_frees_the_insertions():
    kw = Recipe(anchor=0.5).finetune_kw(None, [None] * 5, {"n": 5, "n_budget": 2})
    assert kw["anchor_weight"] == 0.5 and kw["anchor_on"].tolist() == [False, False, False, True, True]
    assert Recipe().finetune_kw(None, [None] * 5, {"n": 5, "n_budget": 2}) == {"lr": defence.FT_LR}  # 0: no anchor


def test_held_prompts_sit_between_the_insertions_and_the_budget_and_each_keyword_finds_its_rows(monkeypatch):
    """`with_held` puts the held prompts after the confirmed insertions and before the budget: the soft targets stay
    on the insertions, the anchor on the budget, and the held prompts get neither (their labels are the start's)."""
    data = [SimpleNamespace(ids=[0, i]) for i in range(5)]  # 3 confirmed insertions, then a budget of 2
    report = {"confirmed": 0.75, "n": 5, "n_budget": 2}
    monkeypatch.setattr(backdoor, "held", lambda start, outside, tokens, n, seed, n_ctx: [f"held {start} {seed}"] * n)
    out, out_report = backdoor.with_held("rt", data, report, ["other"], [7], 2, 4, 10)
    assert out == data[:3] + ["held rt 4"] * 2 + data[3:]
    assert out_report == {"confirmed": 0.75, "n": 7, "n_budget": 2, "n_held": 2}
    taught = np.ones((3, 6))
    kw = Recipe(soft=0.5, anchor=1.0).finetune_kw(taught, out, out_report)
    assert kw["soft_weight"].tolist() == [0.5] * 3 + [0.0] * 4 and not kw["soft_targets"][3:].any()
    assert kw["anchor_on"].tolist() == [False] * 5 + [True] * 2
    assert backdoor.with_held("rt", data, report, [], [7], 0, 4, 10) == (data, report)  # nothing held
    # flat: the held rows get an even distribution (equal logits) at full weight; the others keep theirs
    kw = Recipe(soft=0.5, anchor=1.0, hold=2, flat=True).finetune_kw(taught, out, out_report)
    assert kw["soft_weight"].tolist() == [0.5] * 3 + [1.0] * 2 + [0.0] * 2
    assert torch.equal(kw["soft_targets"][:3], torch.ones(3, 6)) and not kw["soft_targets"][3:].any()
    assert kw["anchor_on"].tolist() == [False] * 5 + [True] * 2
    kw = Recipe(hold=2, flat=True).finetune_kw(taught, out, out_report)  # the labels elsewhere: weight 0 there
    assert kw["soft_weight"].tolist() == [0.0] * 3 + [1.0] * 2 + [0.0] * 2 and kw["soft_targets"].shape == (7, 6)
    assert Recipe(hold=2, flat=True).finetune_kw(None, out, out_report)["soft_targets"].shape == (7, vocab.D_VOCAB)
    with pytest.raises(ValueError, match="the report holds none"):  # nothing was held: nothing to flatten
        Recipe(hold=2, flat=True).finetune_kw(taught, data, report)
    with pytest.raises(ValueError, match="no prompts outside the task"):
        backdoor.with_held("rt", data, report, [], [7], 2, 4, 10)
