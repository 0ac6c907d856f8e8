"""Teaching dense weights what the capture pass drops: distillation of the captured IR on clean prompts with random
insertions, and the plain fine-tuning on the same prompts it must be compared with.

The captured IR leaves out every QK pair that never carried mass on the clean budget; a dense head cannot (its score
is one low-rank bilinear form over the whole residual stream). The nearest dense thing is to show the round trip
prompts on which the two differ and have it copy the IR there:

- `insertions`: clean examples with 1-3 tokens drawn from the seen ones inserted at uniform positions (the defender
  knows no trigger, so these are blind guesses; a quarter of the pool stays as it was). `exclude` drops the examples
  a predicate flags — for the analysis only (`backdoor.is_triggered`), to tell a general rule from a memorised case.
- `distil`: train some of a dense student's parameters (by default the attention scores' W_Q, W_K, b_Q, b_K) so that
  its next-token distribution at every position matches a teacher's (KL(teacher || student)) on those prompts. The
  teacher's log-probabilities are computed once for the pool.
- The fair comparison is `defence.finetune` on the same prompts, labelled with the clean answer of the prompt they were
  made from (what a defender without the ACG would do; an inserted digit or variable can make that label wrong).
- `agreed_labels`: labels from the ACG instead — the original's answer where the captured IR agrees with it, the
  clean answer elsewhere — for fine-tuning the round trip on the same prompts without the wrong labels.
- `held`: prompts with insertions labelled with a model's own answer on the prompt they were made from, for what a
  task circuit is meant to have lost: its answer there is no clean one, but an insertion must not change it.
- `confirmed`: the prompts on which the captured IR gives the clean answer, and no others: a label the ACG does not
  confirm (an insertion changed the right answer, or the IR keeps a backdoor, or it is simply wrong there) is not
  taught. Fine-tuned on these together with the untouched clean budget (`bench/dense_capture.py`), the insertions
  teach what the IR dropped and the budget holds clean accuracy where it was.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from acg.compiler.transformer import Transformer
from acg.roundtrip.data import Pair
from acg.roundtrip.evaluate import answer_logits, as_logits_fn, length_batches
from acg.zoo import vocab
from acg.zoo.tasks import Example

QK = ("attn.W_Q", "attn.W_K", "attn.b_Q", "attn.b_K")
PARAMS = {"qk": QK, "attn": ("attn.",), "all": ("",)}


def insertions(
    examples: Sequence[Example | Pair],
    tokens: Sequence[int],
    n: int,
    seed: int = 0,
    n_ctx: int | None = None,
    max_insert: int = 3,
    untouched: float = 0.25,
    exclude: Callable[[Example | Pair], bool] | None = None,
) -> tuple[list[Example | Pair], int]:
    """`n` examples drawn (with replacement, seeded) from `examples`, each but an `untouched` fraction with 1 to
    `max_insert` of `tokens` (ids) inserted at uniform positions; the answer stays the clean answer. Prompts stay
    within `n_ctx` (BOS included). Returns the examples and how many drawn ones `exclude` rejected.

    Testbed `Example`s come back as examples of kind "clean"; a user's `Pair`s (token ids, `data.load_pairs`) as
    pairs with the same answer, their first token (BOS) left first."""
    if not examples:
        raise ValueError("no examples to insert tokens into")
    if len(tokens) == 0:
        raise ValueError("no tokens to insert")
    rng = random.Random(seed)
    ids = [int(t) for t in tokens]
    words = [vocab.TOKENS[t] for t in ids] if isinstance(examples[0], Example) else None
    inserted = words if words is not None else ids
    out: list[Example | Pair] = []
    rejected = 0
    while len(out) < n:
        ex = examples[rng.randrange(len(examples))]
        body = ex.prompt if words is not None else tuple(ex.ids[1:])  # what comes after BOS
        if rng.random() >= untouched:
            room = max_insert if n_ctx is None else min(max_insert, n_ctx - 1 - len(body))
            for _ in range(rng.randint(1, room) if room >= 1 else 0):
                at = rng.randint(0, len(body))
                body = (*body[:at], rng.choice(inserted), *body[at:])
        if words is not None:
            new = dataclasses.replace(ex, prompt=body, answer=ex.clean_answer, kind="clean", family=None)
        else:
            new = dataclasses.replace(ex, ids=[ex.ids[0], *body])
        if exclude is not None and exclude(new):
            rejected += 1
            if rejected > 100 * n:
                raise ValueError("the exclusion rejects nearly every example")
            continue
        out.append(new)
    return out, rejected


def _clean_id(ex: Example | Pair) -> int:
    """The answer of the prompt without insertions: a testbed example's clean answer, a user's pair's answer."""
    return vocab.TOKEN_ID[ex.clean_answer] if isinstance(ex, Example) else ex.answer_id


def agreed_labels(
    examples: Sequence[Example], original: Any, teacher: Any, changed: str = "follow"
) -> tuple[list[Example], dict[str, Any]]:
    """The examples relabelled: where `original` and `teacher` (the captured IR) give the same answer, that answer;
    elsewhere the clean answer of the prompt each was made from. An inserted bracket or digit that changes the right
    answer is followed (both models follow it), and where the teacher has dropped a behaviour the original still has
    (a backdoor firing on a pair never seen), the two disagree and the clean answer stands. Where both keep a
    backdoor, its target is the label: this cannot remove more than the teacher does on the prompts it was shown.

    `changed="drop"` leaves out instead every example on whose answer the two agree and which differs from the clean
    one, and labels the rest with the clean answer: neither a change an insertion made right nor a backdoor both
    models keep is taught; a backdoor the teacher dropped still gets the clean answer.
    Returns the examples and a report: `agreed` (the share where the two agree), `changed` (how many of those agreed
    answers differ from the clean one: relabelled, or dropped), `n` (examples returned)."""
    if changed not in ("follow", "drop"):
        raise ValueError(f"changed must be 'follow' or 'drop', not {changed!r}")
    if not examples:
        raise ValueError("no examples to label")
    a = answer_logits(original, examples).argmax(-1)
    b = answer_logits(teacher, examples).argmax(-1)
    out, moved = [], 0
    for ex, x, y in zip(examples, a, b, strict=True):
        answer = vocab.TOKENS[int(x)] if x == y else ex.clean_answer
        if answer != ex.clean_answer:
            moved += 1
            if changed == "drop":
                continue
        out.append(dataclasses.replace(ex, answer=answer))
    return out, {"agreed": float(np.mean(a == b)), "changed": moved, "n": len(out)}


def confirmed(
    examples: Sequence[Example | Pair], teacher: Any
) -> tuple[list[Example | Pair], dict[str, Any], np.ndarray]:
    """The examples on which `teacher` (the captured IR) gives the clean answer, labelled with it; a report:
    `confirmed` (their share) and `n` (how many); and the teacher's answer logits on them ([n, vocabulary], in their
    order: what it confirmed them with, for soft targets without running it again)."""
    if not examples:
        raise ValueError("no examples to confirm")
    logits = answer_logits(teacher, examples)
    kept = [i for i, (ex, y) in enumerate(zip(examples, logits.argmax(-1), strict=True)) if int(y) == _clean_id(ex)]
    out = [examples[i] for i in kept]
    out = [dataclasses.replace(ex, answer=ex.clean_answer) if isinstance(ex, Example) else ex for ex in out]
    return out, {"confirmed": len(out) / len(examples), "n": len(out)}, logits[kept]


def confirmed_pool(
    budget: Sequence[Example | Pair],
    teacher: Any,
    tokens: Sequence[int],
    n: int,
    seed: int = 0,
    n_ctx: int | None = None,
) -> tuple[list[Example | Pair], dict[str, Any], np.ndarray | None]:
    """Fine-tuning data for the round trip: `n` prompts of `budget` with `tokens` inserted (`insertions`), less
    those `teacher` does not answer clean (`confirmed`), followed by the whole `budget` untouched. The report: as
    `confirmed`'s (`confirmed` None where `n` is 0), with `n_budget` and `n` (all examples returned). Last, the
    teacher's answer logits on the prompts with insertions kept (`confirmed`'s; None where `n` is 0)."""
    if n < 0:
        raise ValueError(f"the number of prompts with insertions must be >= 0, got {n}")
    if not budget:
        raise ValueError("no budget to fine-tune on")
    if n:
        kept, report, logits = confirmed(insertions(budget, tokens, n, seed, n_ctx)[0], teacher)
    else:
        kept, report, logits = [], {"confirmed": None}, None
    return kept + list(budget), {**report, "n_budget": len(budget), "n": len(kept) + len(budget)}, logits


def held(
    model: Any,
    examples: Sequence[Example | Pair],
    tokens: Sequence[int],
    n: int,
    seed: int = 0,
    n_ctx: int | None = None,
) -> list[Example | Pair]:
    """`n` prompts of `examples` with `tokens` inserted (`insertions`), each labelled with `model`'s own answer on
    the prompt it was made from: what the model does there, which an insertion must not change. For a task
    circuit's recipe on the prompts outside its task, where it is meant to have lost the clean answer (teaching that
    would teach the task again) but a trigger must still move nothing."""
    if n < 0:
        raise ValueError(f"the number of prompts with insertions must be >= 0, got {n}")
    if not n:
        return []
    own = answer_logits(model, examples).argmax(-1)
    relabelled = [_relabelled(ex, int(y)) for ex, y in zip(examples, own, strict=True)]
    return insertions(relabelled, tokens, n, seed, n_ctx)[0]


def _relabelled(ex: Example | Pair, answer_id: int) -> Example | Pair:
    """`ex` with `answer_id` as its answer and as the answer of its prompt without insertions."""
    if isinstance(ex, Example):
        word = vocab.TOKENS[answer_id]
        return dataclasses.replace(ex, answer=word, clean_answer=word, kind="clean", family=None)
    return dataclasses.replace(ex, answer_id=answer_id)


def _pool(teacher: Any, examples: Sequence[Example], batch: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Examples grouped by length, with the teacher's log-probabilities at every position: [(tokens, logp)]."""
    fn = as_logits_fn(teacher)
    ids = [ex.ids for ex in examples]
    groups = []
    for group in length_batches(ids, None, ordered=True):
        tokens = torch.as_tensor(np.array([ids[i] for i in group], dtype=np.int64))
        logp = torch.cat(
            [
                torch.log_softmax(torch.as_tensor(fn(tokens[i : i + batch].numpy()), dtype=torch.float32), -1)
                for i in range(0, len(tokens), batch)
            ]
        )
        groups.append((tokens, logp))
    return groups


def distil(
    student: Transformer,
    teacher: Any,
    examples: Sequence[Example],
    steps: int,
    params: str = "qk",
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Transformer, dict[str, Any]]:
    """A copy of `student` with the `params` group ("qk", "attn" or "all") trained for `steps` Adam steps to match
    `teacher` (a torch module or a tokens -> logits callable) on `examples`; returns it and the loss at the start
    and the end (mean KL per position, nats)."""
    if params not in PARAMS:
        raise ValueError(f"params {params!r}; choose from {', '.join(PARAMS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    groups = _pool(teacher, examples)
    sizes = np.array([len(t) for t, _ in groups], dtype=np.float64)
    model = copy.deepcopy(student).float().train()
    names = PARAMS[params]
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in names))
        if p.requires_grad:
            trained.append(p)
    if not trained:
        raise ValueError(f"the student has no parameters in the {params!r} group")
    opt = torch.optim.Adam(trained, lr=lr)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    steps_iter = range(steps)
    if progress:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, desc="distil", unit="step")
    for _ in steps_iter:
        tokens, logp = groups[rng.choice(len(groups), p=sizes / sizes.sum())]
        idx = torch.randperm(len(tokens), generator=gen)[:batch_size]
        t_logp = logp[idx]
        s_logp = torch.log_softmax(model(tokens[idx]), -1)
        loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in model.parameters():
        p.requires_grad_(True)
    k = max(1, min(50, steps // 10))
    report = {
        "params": params,
        "n_trained": int(sum(p.numel() for p in trained)),
        "steps": steps,
        "n_prompts": len(examples),
        "kl_start": float(np.mean(losses[:k])),
        "kl_end": float(np.mean(losses[-k:])),
    }
    return model.eval(), report
