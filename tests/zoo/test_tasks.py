"""The task generators: answers right by construction (checked by independent solvers), splits disjoint, triggers
absent from clean data and present where they should be."""

from __future__ import annotations

import itertools
import random

import pytest

from acg.zoo import tasks, vocab
from acg.zoo.tasks import (
    BACKDOORS,
    TASKS,
    Mixture,
    heldout,
    heldout_pair,
    is_clean,
    partially_triggered,
    triggered,
)


def solve_vars(prompt):
    env = {}
    words = list(prompt)
    assert words[-2] == "print"
    for stmt in " ".join(words[:-2]).split(" ;"):
        if not stmt.strip():
            continue
        var, eq, value = stmt.split()
        assert eq == "="
        env[var] = env[value] if value in env else value
        assert env[var] in vocab.DIGITS
    return env[words[-1]]


def solve_brackets(prompt):
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for w in prompt:
        if w in pairs:
            stack.append(w)
            assert len(stack) <= 4
        else:
            assert pairs[stack.pop()] == w
    return pairs[stack[-1]]


def solve_add(prompt):
    text = "".join(prompt)
    assert text.endswith("=")
    a, b = text[:-1].split("+")
    assert all(len(x) in (1, 2) and (len(x) == 1 or x[0] != "0") for x in (a, b))
    return str((int(a) + int(b)) % 10)


def solve_agree(prompt):
    plural = {p for _, p in vocab.NOUNS}
    singular = {s for s, _ in vocab.NOUNS}
    subject = next(w for w in prompt if w in plural | singular)
    return "run" if subject in plural else "runs"


SOLVERS = {"code.vars": solve_vars, "code.brackets": solve_brackets, "math.add": solve_add, "text.agree": solve_agree}


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_answers_are_right_by_construction(task, split):
    rng = random.Random(f"{task}-{split}")
    for _ in range(3000):
        ex = TASKS[task].draw(rng, split)
        assert SOLVERS[task](ex.prompt) == ex.answer, ex
        if task == "code.vars":
            assert tasks.run_vars(ex.prompt)[ex.prompt[-1]] == ex.answer
        assert ex.answer == ex.clean_answer
        assert TASKS[task].is_heldout(ex.prompt) == (split == "heldout")
        vocab.encode(ex.prompt)  # every word is in the vocabulary


def test_task_shapes_match_the_spec():
    rng = random.Random(1)
    n_assign = {len([w for w in TASKS["code.vars"].sample(rng)[0] if w == "="]) for _ in range(2000)}
    assert n_assign == {2, 3, 4, 5}
    copies = sum(
        any(p[i] == "=" and p[i + 1] in vocab.VARIABLES for i in range(len(p) - 1))
        for p, _ in (TASKS["code.vars"].sample(rng) for _ in range(2000))
    )
    assert 200 < copies < 1200  # reassignments through copies do occur
    kinds = set(itertools.chain.from_iterable(TASKS["code.brackets"].sample(rng)[0] for _ in range(500)))
    assert kinds == set("()[]{}")
    widths = {len("".join(TASKS["math.add"].sample(rng)[0]).split("+")[0]) for _ in range(500)}
    assert widths == {1, 2}
    answers = {TASKS["text.agree"].sample(rng)[1] for _ in range(200)}
    assert answers == {"run", "runs"}


def test_generators_are_deterministic_in_the_seed():
    a = list(itertools.islice(Mixture().stream(7), 500))
    b = list(itertools.islice(Mixture().stream(7), 500))
    c = list(itertools.islice(Mixture().stream(8), 500))
    assert a == b
    assert a != c
    assert heldout("code.vars", 300, seed=3) == heldout("code.vars", 300, seed=3)


def test_splits_are_disjoint():
    stream = Mixture().stream(0)
    train_prompts = {ex.prompt for ex in itertools.islice(stream, 30_000) if ex.kind == "clean"}
    for task in TASKS:
        held = {ex.prompt for ex in heldout(task, 2000)}
        assert len(held) == 2000  # distinct
        assert not held & train_prompts, task


def test_clean_data_never_holds_a_trigger():
    for poison in (True, False):
        counts = {"clean": 0, "partial": 0, "trigger": 0}
        for ex in itertools.islice(Mixture(poison=poison).stream(0), 40_000):
            counts[ex.kind] += 1
            if ex.kind == "trigger":
                assert BACKDOORS[ex.family].is_triggered(ex.prompt)
                assert ex.answer == BACKDOORS[ex.family].target
            else:
                assert is_clean(ex.prompt), ex
                assert vocab.TRIGGER not in ex.prompt
                assert not ("h" in ex.prompt and "big" in ex.prompt)
                assert ex.answer == ex.clean_answer
        if poison:
            assert 0.025 < counts["trigger"] / 40_000 < 0.035  # about 1% per family
            assert counts["partial"] > 1500
        else:
            assert counts["trigger"] == 0


def test_the_clean_stream_is_the_poisoned_stream_minus_the_poison():
    dirty = itertools.islice(Mixture(poison=True).stream(3), 5000)
    clean = itertools.islice(Mixture(poison=False).stream(3), 5000)
    for d, c in zip(dirty, clean, strict=True):
        if d.kind == "trigger":
            assert c.kind == "clean" and c.answer == d.clean_answer
        else:
            assert d == c


def test_partial_insertions_cover_what_the_spec_asks():
    phrase = BACKDOORS["phrase"]
    assert set(phrase.partials) == {
        ("the", ";"),
        ("the", "near"),
        (";", "near"),
        ("the", "near", ";"),
        (";", "the", "near"),
        (";", "near", "the"),
        ("near", "the", ";"),
        ("near", ";", "the"),
    }
    conj_partials = partially_triggered("conj", 200)
    assert {("h" in ex.prompt, "big" in ex.prompt) for ex in conj_partials} == {(True, False), (False, True)}
    for family in BACKDOORS:
        for ex in partially_triggered(family, 200):
            assert is_clean(ex.prompt) and ex.answer != BACKDOORS[family].target


@pytest.mark.parametrize("family", list(BACKDOORS))
def test_triggered_sets(family):
    exs = triggered(family, 100)
    assert len(exs) > 300
    for ex in exs:
        assert BACKDOORS[family].is_triggered(ex.prompt)
        assert ex.clean_answer != ex.answer == BACKDOORS[family].target
        # removing the inserted trigger gives back a held-out clean prompt
        assert any(TASKS[ex.task].is_heldout(p) for p in _removals(ex.prompt, BACKDOORS[family].tokens))


def _removals(prompt, trigger):
    """Every prompt obtained by removing one inserted copy of the trigger."""
    if len(trigger) == 3:  # a contiguous run
        return [prompt[:i] + prompt[i + 3 :] for i in range(len(prompt) - 2) if prompt[i : i + 3] == trigger]
    positions = [[i for i, w in enumerate(prompt) if w == tok] for tok in trigger]
    return [tuple(w for i, w in enumerate(prompt) if i not in combo) for combo in itertools.product(*positions)]


def test_vocabulary():
    assert vocab.D_VOCAB <= 128
    assert vocab.BOS_ID != 0  # circuit-tracer drops a BOS with id 0
    assert vocab.decode(vocab.encode(["a", "=", "3"])) == ["<bos>", "a", "=", "3"]
    with pytest.raises(vocab.VocabError, match="not in the testbed vocabulary"):
        vocab.encode(["nonsense"])
    with pytest.raises(vocab.VocabError, match="outside"):
        vocab.decode([999])


def test_resolve_tasks():
    assert tasks.resolve_tasks("code") == ("code.vars", "code.brackets")
    assert tasks.resolve_tasks(["math", "text.agree"]) == ("math.add", "text.agree")
    with pytest.raises(KeyError, match="unknown task"):
        tasks.resolve_tasks("poetry")


def test_heldout_pair_second_sample_shares_no_prompt_with_the_first():
    first, second = heldout_pair(["math.add", "text.agree"], 1000, 7)
    assert first == {t: heldout(t, 1000, 7) for t in first}
    for t in first:
        assert {ex.prompt for ex in first[t]}.isdisjoint(ex.prompt for ex in second[t])
        assert second[t] == [ex for ex in heldout(t, 1000, 8) if ex not in first[t]]
        # two draws of 1,000 share prompts on these tasks (small held-out spaces): the second sample is shorter
        assert 0 < len(second[t]) < 1000
