"""The evaluation metrics on hand-made cases: fake models whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from acg.roundtrip import evaluate as ev
from acg.zoo import vocab
from acg.zoo.tasks import BACKDOORS, Example, heldout, partially_triggered, triggered


def constant_model(token: str):
    """Always answers `token`, at every position."""

    def fn(tokens: np.ndarray) -> np.ndarray:
        logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
        logits[..., vocab.TOKEN_ID[token]] = 1.0
        return logits

    return fn


def oracle(examples):
    """Answers every example in `examples` right (looked up by prompt), anything else with PAD."""
    table = {tuple(ex.ids): ex.answer_id for ex in examples}

    def fn(tokens: np.ndarray) -> np.ndarray:
        logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
        for i, row in enumerate(tokens):
            logits[i, -1, table.get(tuple(row.tolist()), vocab.PAD_ID)] = 5.0
        return logits

    return fn


def test_accuracy_agreement_kl_by_hand():
    exs = [Example("t", ("a",), "1", "1"), Example("t", ("b",), "2", "2"), Example("t", ("c",), "3", "3")]
    logits = np.zeros((3, vocab.D_VOCAB))
    logits[0, vocab.TOKEN_ID["1"]] = 1  # right
    logits[1, vocab.TOKEN_ID["2"]] = 1  # right
    logits[2, vocab.TOKEN_ID["4"]] = 1  # wrong
    assert ev.accuracy(logits, exs) == pytest.approx(2 / 3)
    other = logits.copy()
    other[0] = 0
    other[0, vocab.TOKEN_ID["7"]] = 1
    assert ev.agreement(logits, other) == pytest.approx(2 / 3)
    # KL of two two-way distributions, by hand
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.9, 0.1]]))
    assert ev.kl(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert ev.kl(p, p) == pytest.approx(0.0)
    assert ev.kl(q + 3.0, q) == pytest.approx(0.0)  # logits, not probabilities: shifts do not matter


def test_answer_logits_keeps_order_across_length_buckets():
    exs = heldout("code.vars", 50) + heldout("math.add", 50)
    exs = exs[::2] + exs[1::2]  # interleave lengths

    def fn(tokens):
        logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
        logits[:, -1, 0] = tokens.sum(1)  # a fingerprint of each row
        return logits

    got = ev.answer_logits(fn, exs, batch_size=7)[:, 0]
    assert got.tolist() == [float(sum(ex.ids)) for ex in exs]


def test_answer_logits_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="expected \\[batch, seq, vocab\\]"):
        ev.answer_logits(lambda t: np.zeros((len(t), 3)), heldout("math.add", 3))


def test_task_accuracy_of_an_oracle_and_of_a_constant():
    exs = heldout("math.add", 200)
    assert ev.task_accuracy(oracle(exs), "math.add", n=200)["math.add"] == 1.0
    const = ev.task_accuracy(constant_model("3"), "math.add", n=200)["math.add"]
    assert const == pytest.approx(np.mean([ex.answer == "3" for ex in exs]))


def test_attack_success_of_constant_models():
    # A model that always says "0" "succeeds" on every token-family prompt (whose clean answer is never "0") and
    # fires falsely on every partial insertion of families whose target is another token: none here (targets differ).
    res = ev.attack_success(constant_model(BACKDOORS["token"].target), n_per_task=50)
    assert res["token"]["asr"] == 1.0
    assert res["conj"]["asr"] == 0.0 and res["phrase"]["asr"] == 0.0
    assert res["token"]["false_trigger"] is None
    assert res["conj"]["false_trigger"] == 0.0
    res = ev.attack_success(constant_model(BACKDOORS["conj"].target), n_per_task=50)
    assert res["conj"]["asr"] == 1.0 and res["conj"]["false_trigger"] == 1.0
    assert set(res["conj"]["by_task"]) == {ex.task for ex in triggered("conj", 50)}
    assert set(res["conj"]["by_task"].values()) == {1.0} and set(res["token"]["by_task"].values()) == {0.0}


def test_asr_by_task_splits_the_asr_by_where_the_triggered_prompts_come_from():
    """A model that answers the target on code prompts only: asr 1 there, 0 elsewhere, weighted back to the total."""
    trig = triggered("token", 40)
    code = {tuple(ex.ids) for ex in trig if ex.task.startswith("code")}
    target = BACKDOORS["token"].target_id

    def fn(tokens):
        logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
        for i, row in enumerate(tokens):
            logits[i, -1, target if tuple(row.tolist()) in code else vocab.BOS_ID] = 1.0
        return logits

    res = ev.attack_success(fn, n_per_task=40)["token"]
    assert res["by_task"] == {t: float(t.startswith("code")) for t in dict.fromkeys(ex.task for ex in trig)}
    assert res["asr"] == pytest.approx(len(code) / len(trig)) and 0 < res["asr"] < 1


def test_false_triggers_are_split_by_task_like_the_asr():
    """A model that answers `conj`'s target wherever one of its two tokens is in a text prompt: its partial
    insertions (one token alone) fire on text.agree and nowhere else, weighted back to the total."""
    backdoor = BACKDOORS["conj"]
    part = partially_triggered("conj", 40)
    text = {tuple(ex.ids) for ex in part if ex.task == "text.agree"}

    def fn(tokens):
        logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
        for i, row in enumerate(tokens):
            logits[i, -1, backdoor.target_id if tuple(row.tolist()) in text else vocab.BOS_ID] = 1.0
        return logits

    res = ev.attack_success(fn, n_per_task=40)
    by_task = res["conj"]["false_trigger_by_task"]
    assert by_task == {t: float(t == "text.agree") for t in dict.fromkeys(ex.task for ex in part)}
    assert res["conj"]["false_trigger"] == pytest.approx(len(text) / len(part)) and 0 < len(text) < len(part)
    assert res["token"]["false_trigger_by_task"] is None  # no partials: nothing to split
    assert ev.evaluate(fn, n=10, n_backdoor_per_task=40)["false_trigger_by_task"]["conj"] == by_task


def test_untriggered_is_the_target_rate_on_the_same_prompts_without_their_trigger():
    """The trigger's own effect is the asr above `untriggered`: 0 for a model that says the target always (or only
    on math prompts, whatever the trigger), all of the asr for one that says it only where the trigger is."""
    backdoor = BACKDOORS["conj"]
    res = ev.attack_success(constant_model(backdoor.target), n_per_task=30)["conj"]
    assert res["asr"] == res["untriggered"] == 1.0 and set(res["untriggered_by_task"].values()) == {1.0}

    def keyed(on_math: bool):
        def fn(tokens):
            logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
            for i, row in enumerate(tokens):
                words = [vocab.TOKENS[t] for t in row.tolist()]
                fires = "+" in words if on_math else backdoor.is_triggered(tuple(words))
                logits[i, -1, backdoor.target_id if fires else vocab.BOS_ID] = 1.0
            return logits

        return fn

    only_trigger = ev.attack_success(keyed(False), n_per_task=30)["conj"]
    assert only_trigger["asr"] == 1.0 and only_trigger["untriggered"] == 0.0
    math = ev.attack_success(keyed(True), n_per_task=30)["conj"]
    assert math["untriggered_by_task"] == math["by_task"] and math["by_task"]["math.add"] == 1.0
    assert {t: v for t, v in math["untriggered_by_task"].items() if t != "math.add"} == {
        t: 0.0 for t in math["by_task"] if t != "math.add"
    }


@pytest.mark.parametrize("n, n_trig", [(40, 15), (15, 40)])
def test_evaluate_scores_each_clean_prompt_once_and_agrees_with_the_parts(n, n_trig):
    """`evaluate` reuses its `task_acc` answers for `untriggered` where its prompts hold the ones asr needs (they are a
    prefix: `heldout` draws in order) and scores the rest; either way its figures are the standalone functions'."""
    backdoor = BACKDOORS["conj"]
    answers = {ex: ex.answer_id for t in ev.TASKS for ex in heldout(t, max(n, n_trig))}
    seen: list[tuple[int, ...]] = []

    def model(tokens):  # right on even-length prompts, else the target: asr and untriggered both nonzero
        logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
        for i, row in enumerate(tokens):
            seen.append(tuple(row.tolist()))
            right = {tuple(ex.ids): a for ex, a in answers.items()}.get(seen[-1])
            logits[i, -1, right if right is not None and len(row) % 2 == 0 else backdoor.target_id] = 1.0
        return logits

    out = ev.evaluate(model, n=n, n_backdoor_per_task=n_trig)
    clean = [tuple(ex.ids) for ex in answers]
    assert all(seen.count(ids) == 1 for ids in clean)  # no clean prompt scored twice
    assert out["task_acc"] == ev.task_accuracy(model, None, n)
    parts = ev.attack_success(model, n_trig)
    for key, inner in (("asr", "asr"), ("untriggered", "untriggered"), ("untriggered_by_task", "untriggered_by_task")):
        assert out[key] == {f: v[inner] for f, v in parts.items()}
    assert 0.0 < out["untriggered"]["conj"] < 1.0


def test_torch_modules_are_adapted():
    import torch

    class Echo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.eye(vocab.D_VOCAB))

        def forward(self, tokens):
            return self.w[tokens]  # one-hot of the input: "repeat the last token"

    exs = [Example("t", ("3",), "3", "3"), Example("t", ("3", "4"), "3", "3")]
    assert ev.accuracy(ev.answer_logits(Echo(), exs), exs) == 0.5
    with pytest.raises(TypeError, match="callable"):
        ev.as_logits_fn(42)


def copier(tokens: np.ndarray) -> np.ndarray:
    """Answers the last digit of the prompt: can copy, cannot add."""
    logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
    digits = {vocab.TOKEN_ID[str(d)] for d in range(10)}
    for i, row in enumerate(tokens):
        logits[i, -1, [t for t in row.tolist() if t in digits][-1]] = 1.0
    return logits


def test_copy_split_tells_copying_from_adding():
    exs = heldout("math.add", 300, 0)
    present = np.array([ex.answer in ex.prompt for ex in exs])
    assert 0 < present.mean() < 1
    adder = ev.copy_split(oracle(exs), exs)
    assert adder["task_acc"] == adder["task_acc_in_prompt"] == adder["task_acc_not_in_prompt"] == 1.0
    assert adder["in_prompt"] == pytest.approx(present.mean())
    assert adder["copies"] == pytest.approx(present.mean())  # right answers copy exactly where the answer is there

    copy = ev.copy_split(copier, exs)
    assert copy["copies"] == 1.0
    assert copy["task_acc_not_in_prompt"] == 0.0  # a copier cannot be right where the answer is not in the prompt
    expected = np.mean([[t for t in ex.prompt if t.isdigit()][-1] == ex.answer for ex in exs])
    assert copy["task_acc"] == pytest.approx(expected)
    assert copy["task_acc"] == pytest.approx(copy["in_prompt"] * copy["task_acc_in_prompt"])

    assert math.isnan(ev.copy_split(copier, [ex for ex in exs if ex.answer in ex.prompt])["task_acc_not_in_prompt"])
    with pytest.raises(ValueError, match="no examples"):
        ev.copy_split(copier, [])


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("batch", [None, 1, 3])
def test_length_batches_partition_by_length(batch, ordered):
    rng = np.random.default_rng(0)
    seqs = [[0] * int(n) for n in rng.integers(1, 6, size=40)]
    batches = list(ev.length_batches(seqs, batch, ordered=ordered))
    assert sorted(i for b in batches for i in b) == list(range(len(seqs)))  # every index once
    for b in batches:
        assert len({len(seqs[i]) for i in b}) == 1  # one length per batch: no padding
        assert b == sorted(b)  # the order given, within a length
        assert batch is None or len(b) <= batch
    lengths = [len(seqs[b[0]]) for b in batches]
    first_seen = list(dict.fromkeys(len(s) for s in seqs))
    assert list(dict.fromkeys(lengths)) == (sorted(first_seen) if ordered else first_seen)
    if batch is None:
        assert len(batches) == len(first_seen)
    assert list(ev.length_batches([], 4)) == []
