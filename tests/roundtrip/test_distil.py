"""Insertion pools and distillation of a teacher into some of a dense student's parameters (roundtrip/distil.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from acg.roundtrip.data import Pair
from acg.roundtrip.distil import agreed_labels, confirmed, confirmed_pool, distil, held, insertions
from acg.zoo import vocab
from acg.zoo.tasks import heldout
from tests.helpers import random_model

INSERTED = ("big", "the")  # never in a code.vars prompt: removing them gives the prompt back


@pytest.fixture(scope="module")
def examples():
    return heldout("code.vars", 40, 0)


def test_insertions_add_up_to_three_tokens_and_keep_the_clean_answer(examples):
    sources = {ex.prompt for ex in examples}
    ids = [vocab.TOKEN_ID[t] for t in INSERTED]
    n_ctx = max(len(ex.ids) for ex in examples) + 2
    pool, rejected = insertions(examples, ids, 400, seed=3, n_ctx=n_ctx)
    assert len(pool) == 400 and rejected == 0
    untouched = 0
    for ex in pool:
        stripped = tuple(t for t in ex.prompt if t not in INSERTED)
        assert stripped in sources
        added = len(ex.prompt) - len(stripped)
        assert 0 <= added <= 3 and len(ex.ids) <= n_ctx
        assert ex.answer == ex.clean_answer and ex.kind == "clean"
        untouched += added == 0
    assert 0.17 < untouched / len(pool) < 0.33  # a quarter left as it was
    again, _ = insertions(examples, ids, 400, seed=3, n_ctx=n_ctx)
    other, _ = insertions(examples, ids, 400, seed=4, n_ctx=n_ctx)
    assert [e.prompt for e in again] == [e.prompt for e in pool] != [e.prompt for e in other]


def test_insertions_leave_out_what_exclude_flags(examples):
    ids = [vocab.TOKEN_ID[t] for t in INSERTED]
    pool, rejected = insertions(examples, ids, 300, seed=0, exclude=lambda ex: "big" in ex.prompt)
    assert len(pool) == 300 and rejected > 0
    assert not any("big" in ex.prompt for ex in pool)
    assert any("the" in ex.prompt for ex in pool)


def test_insertions_refuse_empty_inputs(examples):
    with pytest.raises(ValueError, match="no examples"):
        insertions([], [3], 10)
    with pytest.raises(ValueError, match="no tokens"):
        insertions(examples, [], 10)
    with pytest.raises(ValueError, match="rejects nearly every"):
        insertions(examples, [3], 5, exclude=lambda ex: True)


def _answering(rule, pool):
    """A fake model answering rule(prompt, clean answer) at the last position of each pool prompt."""
    clean = {tuple(ex.ids): (ex.prompt, ex.clean_answer) for ex in pool}

    def fn(tokens):
        logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
        for i, row in enumerate(tokens):
            logits[i, -1, vocab.TOKEN_ID[rule(*clean[tuple(row.tolist())])]] = 1.0
        return logits

    return fn


def test_agreed_labels_follow_both_models_where_they_agree_and_the_clean_answer_elsewhere(examples):
    ids = [vocab.TOKEN_ID[t] for t in INSERTED]
    pool, _ = insertions(examples, ids, 300, seed=1)
    # the original fires a "backdoor" (9) on "big" and answers 5 on "the"; the teacher has dropped the first only
    original = _answering(lambda p, a: "9" if "big" in p else ("5" if "the" in p else a), pool)
    teacher = _answering(lambda p, a: "5" if "the" in p and "big" not in p else a, pool)
    labelled, report = agreed_labels(pool, original, teacher)
    assert [ex.prompt for ex in labelled] == [ex.prompt for ex in pool]
    for ex in labelled:
        expected = "5" if "the" in ex.prompt and "big" not in ex.prompt else ex.clean_answer
        assert ex.answer == expected
    moved = [ex for ex in labelled if ex.answer != ex.clean_answer]
    assert report["changed"] == len(moved) > 0 and report["n"] == len(pool)
    assert report["agreed"] == pytest.approx(np.mean(["big" not in ex.prompt or ex.clean_answer == "9" for ex in pool]))
    kept, dropped = agreed_labels(pool, original, teacher, changed="drop")
    assert [ex.prompt for ex in kept] == [ex.prompt for ex in labelled if ex.answer == ex.clean_answer]
    assert all(ex.answer == ex.clean_answer for ex in kept)  # the "big" backdoor the teacher dropped: clean label
    assert any("big" in ex.prompt for ex in kept)
    assert not any("the" in ex.prompt and "big" not in ex.prompt and ex.clean_answer != "5" for ex in kept)
    assert dropped["changed"] == report["changed"] and dropped["n"] == len(pool) - report["changed"]
    with pytest.raises(ValueError, match="no examples"):
        agreed_labels([], original, teacher)
    with pytest.raises(ValueError, match="follow"):
        agreed_labels(pool, original, teacher, changed="ignore")


def test_confirmed_keeps_exactly_the_prompts_on_which_the_teacher_gives_the_clean_answer(examples):
    ids = [vocab.TOKEN_ID[t] for t in INSERTED]
    pool, _ = insertions(examples, ids, 300, seed=2)
    # the teacher keeps a "backdoor" on "big" (9) and follows an inserted "the" (5); clean elsewhere
    teacher = _answering(lambda p, a: "9" if "big" in p else ("5" if "the" in p else a), pool)
    kept, report, logits = confirmed(pool, teacher)
    expected = [
        ex
        for ex in pool
        if ("9" if "big" in ex.prompt else "5" if "the" in ex.prompt else ex.clean_answer) == ex.clean_answer
    ]
    assert [ex.prompt for ex in kept] == [ex.prompt for ex in expected]
    assert 0 < len(kept) < len(pool) and report == {"confirmed": len(kept) / len(pool), "n": len(kept)}
    assert all(ex.answer == ex.clean_answer for ex in kept)
    # the teacher's answer logits on the kept prompts, in their order: what confirmed them
    assert logits.shape == (len(kept), vocab.D_VOCAB)
    assert logits.argmax(-1).tolist() == [vocab.TOKEN_ID[ex.clean_answer] for ex in kept]
    assert not any("big" in ex.prompt and ex.clean_answer != "9" for ex in kept)
    with pytest.raises(ValueError, match="no examples"):
        confirmed([], teacher)


def test_a_users_pairs_get_the_same_insertions_as_the_examples_they_hold(examples):
    """Token-id pairs (a user's JSONL) are drawn and inserted into exactly as the testbed examples they encode, BOS
    left first and the answer kept; `confirmed` and `confirmed_pool` take them as they are."""
    pairs = [Pair(ex.ids, ex.answer_id, "code.vars") for ex in examples]
    ids = [vocab.TOKEN_ID[t] for t in INSERTED]
    n_ctx = max(len(ex.ids) for ex in examples) + 2
    from_examples, _ = insertions(examples, ids, 300, seed=5, n_ctx=n_ctx)
    from_pairs, _ = insertions(pairs, ids, 300, seed=5, n_ctx=n_ctx)
    assert all(isinstance(p, Pair) for p in from_pairs)
    assert [p.ids for p in from_pairs] == [ex.ids for ex in from_examples]
    assert [p.answer_id for p in from_pairs] == [vocab.TOKEN_ID[ex.clean_answer] for ex in from_examples]
    assert all(p.ids[0] == vocab.BOS_ID and p.task == "code.vars" for p in from_pairs)

    teacher = _answering(lambda p, a: "9" if "big" in p else a, from_examples)
    kept, report, logits = confirmed(from_pairs, teacher)
    kept_ex, report_ex, logits_ex = confirmed(from_examples, teacher)
    assert [p.ids for p in kept] == [ex.ids for ex in kept_ex] and report == report_ex
    assert np.array_equal(logits, logits_ex)
    data, pool_report, pool_logits = confirmed_pool(pairs, teacher, ids, 300, seed=5, n_ctx=n_ctx)
    assert data == kept + pairs and np.array_equal(pool_logits, logits)
    assert pool_report == {**report, "n_budget": len(pairs), "n": len(kept) + len(pairs)}
    assert confirmed_pool(pairs, teacher, ids, 0) == (pairs, {"confirmed": None, "n_budget": 40, "n": 40}, None)
    with pytest.raises(ValueError, match=">= 0"):
        confirmed_pool(pairs, teacher, ids, -1)
    with pytest.raises(ValueError, match="no budget"):
        confirmed_pool([], teacher, ids, 5)


def test_held_prompts_carry_the_models_own_answer_on_the_prompt_they_were_made_from(examples):
    """`held` draws and inserts as `insertions` does, but labels each prompt with the model's answer on its source:
    here the source's first token, which an insertion in front would change (the label must not follow it)."""

    def first_token(tokens):
        logits = np.zeros((*tokens.shape, vocab.D_VOCAB))
        logits[np.arange(len(tokens)), -1, tokens[:, 1]] = 1.0
        return logits

    ids = [vocab.TOKEN_ID[t] for t in INSERTED]
    n_ctx = max(len(ex.ids) for ex in examples) + 2
    pool = held(first_token, examples, ids, 300, seed=3, n_ctx=n_ctx)
    drawn, _ = insertions(examples, ids, 300, seed=3, n_ctx=n_ctx)
    assert [ex.prompt for ex in pool] == [ex.prompt for ex in drawn]  # the same draws and insertions
    firsts = [next(t for t in ex.prompt if t not in INSERTED) for ex in pool]
    assert [ex.answer for ex in pool] == [ex.clean_answer for ex in pool] == firsts
    assert any(ex.prompt[0] in INSERTED for ex in pool)  # where the model on the prompt itself would answer otherwise
    assert all(ex.kind == "clean" and ex.family is None for ex in pool)
    assert any(a != ex.clean_answer for a, ex in zip(firsts, drawn, strict=True))  # not the task's clean answers
    pairs = [Pair(ex.ids, ex.answer_id, "code.vars") for ex in examples]  # a user's pairs: the same, by id
    from_pairs = held(first_token, pairs, ids, 300, seed=3, n_ctx=n_ctx)
    assert [p.ids for p in from_pairs] == [ex.ids for ex in pool]
    assert [p.answer_id for p in from_pairs] == [vocab.TOKEN_ID[a] for a in firsts]
    assert held(first_token, examples, ids, 0) == []
    with pytest.raises(ValueError, match=">= 0"):
        held(first_token, examples, ids, -1)


def _pair():
    teacher = random_model(seed=0, d_vocab=len(vocab.TOKENS), n_ctx=32, std=0.3)
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for block in student.blocks:
            block.attn.W_Q.add_(torch.randn(block.attn.W_Q.shape, generator=gen) * 0.5)
            block.attn.W_K.add_(torch.randn(block.attn.W_K.shape, generator=gen) * 0.5)
    return teacher, student


def test_distil_moves_only_the_scores_toward_the_teacher(examples):
    teacher, student = _pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out, report = distil(student, teacher, examples, steps=80, lr=1e-2, batch_size=16)
    assert report["params"] == "qk" and report["steps"] == 80
    assert report["kl_end"] < 0.5 * report["kl_start"]
    for name, value in out.state_dict().items():
        changed = not torch.equal(value, before[name])
        in_group = any(k in name for k in ("W_Q", "W_K", "b_Q", "b_K"))
        assert changed <= in_group, name  # nothing outside the score's parameters moves
        assert changed or not name.endswith(("W_Q", "W_K")), name
        assert torch.equal(student.state_dict()[name], before[name])  # the student given is left as it was
    assert report["n_trained"] == sum(
        p.numel() for n, p in out.named_parameters() if any(k in n for k in ("W_Q", "W_K", "b_Q", "b_K"))
    )
    assert all(p.requires_grad for p in out.parameters())  # an ordinary model again


def test_distil_refuses_an_unknown_parameter_group(examples):
    teacher, student = _pair()
    with pytest.raises(ValueError, match="params 'mlp'"):
        distil(student, teacher, examples, steps=1, params="mlp")
    with pytest.raises(ValueError, match="steps"):
        distil(student, teacher, examples, steps=0)
