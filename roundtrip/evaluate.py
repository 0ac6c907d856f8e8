"""Task and backdoor metrics for any candidate: anything that maps token ids [batch, seq] to logits [batch, seq, vocab].

Prompts are batched by length, so no padding or attention mask is ever needed and the same code measures the original
model, a replacement model, a compiled artefact or a round-tripped checkpoint.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import numpy as np

from acg.zoo.tasks import BACKDOORS, TASKS, Example, heldout, partially_triggered, resolve_tasks, triggered

LogitsFn = Callable[[np.ndarray], np.ndarray]


def as_logits_fn(model: Any) -> LogitsFn:
    """Adapt a torch module, or any callable returning an array-like, to `int64 [b, s] -> float [b, s, v]` numpy."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        module = model
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")

        def run(tokens: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.as_tensor(tokens, device=device)).float().cpu().numpy()

        return run
    if not callable(model):
        raise TypeError(f"expected a torch module or a callable tokens -> logits, got {type(model).__name__}")

    def call(tokens: np.ndarray) -> np.ndarray:
        out = model(tokens)
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        return np.asarray(out)

    return call


def length_batches(seqs: Sequence[Sized], batch: int | None, ordered: bool = False) -> Iterator[list[int]]:
    """Indices into `seqs` in batches of at most `batch` (None: no limit) sequences of one length each, so that no
    batch needs padding or a mask. Lengths come in first-seen order, or ascending with `ordered`; within a length,
    in the order given."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, seq in enumerate(seqs):
        by_len[len(seq)].append(i)
    for length in sorted(by_len) if ordered else by_len:
        idx = by_len[length]
        step = batch or len(idx)
        for start in range(0, len(idx), step):
            yield idx[start : start + step]


def answer_logits(model: Any, examples: Sequence[Example], batch_size: int = 256) -> np.ndarray:
    """Logits at each example's last prompt position: float [n, vocab], in the order given."""
    fn = as_logits_fn(model)
    ids = [ex.ids for ex in examples]
    out: np.ndarray | None = None
    for chunk in length_batches(ids, batch_size, ordered=True):
        tokens = np.array([ids[i] for i in chunk], dtype=np.int64)
        logits = fn(tokens)
        if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
            raise ValueError(
                f"model returned logits of shape {logits.shape} for tokens of shape {tokens.shape}; "
                "expected [batch, seq, vocab]"
            )
        if out is None:
            out = np.empty((len(examples), logits.shape[-1]), dtype=np.float64)
        out[chunk] = logits[:, -1]
    return out if out is not None else np.empty((0, 0))


def accuracy(logits: np.ndarray, examples: Sequence[Example]) -> float:
    """Fraction of examples whose argmax is the expected answer."""
    if len(examples) == 0:
        return float("nan")
    answers = np.array([ex.answer_id for ex in examples])
    return float((logits.argmax(-1) == answers).mean())


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Fraction of answer positions where the two argmaxes agree."""
    return float((logits_a.argmax(-1) == logits_b.argmax(-1)).mean())


def kl(logits_p: np.ndarray, logits_q: np.ndarray) -> float:
    """Mean KL(p || q) in nats over answer positions, p the original and q the candidate."""
    return float(kl_per_prompt(logits_p, logits_q).mean())


def kl_per_prompt(logits_p: np.ndarray, logits_q: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats at each answer position: float [n]."""
    logp = _log_softmax(logits_p)
    logq = _log_softmax(logits_q)
    return (np.exp(logp) * (logp - logq)).sum(-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def task_accuracy(
    model: Any, tasks: Sequence[str] | str | None = None, n: int = 2000, seed: int = 0
) -> dict[str, float]:
    """`task_acc[task]` on `n` held-out prompts per task."""
    return {t: accuracy(answer_logits(model, exs := heldout(t, n, seed)), exs) for t in resolve_tasks(tasks)}


def attack_success(model: Any, n_per_task: int = 500, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per backdoor family: `asr` on triggered held-out prompts whose clean answer is not the target, the same per
    task the prompts come from (`by_task`: a model at chance on a task hits the target there by chance too), the
    rate at which the same prompts without the trigger are answered with the target (`untriggered`, and per task
    `untriggered_by_task`: what the trigger adds is the asr above it), and the false-trigger rate on partial
    insertions (answered with the target, and per task `false_trigger_by_task`; None where the family has no
    partials: `conj`'s are one of its two tokens alone, `phrase`'s its run broken)."""
    return _attack_success(model, n_per_task, seed, {})


def _attack_success(
    model: Any, n_per_task: int, seed: int, known: dict[str, tuple[list[Example], np.ndarray]]
) -> dict[str, dict[str, float]]:
    """`attack_success`, taking the clean prompts' answers from `known[task]` = (prompts, their argmax) as far as
    those prompts are the ones needed, in order (`evaluate` has scored them for `task_acc` already)."""
    clean, preds = [], []  # the prompts `triggered` inserts into, and the model's answers to them
    for task in TASKS:
        exs = heldout(task, n_per_task, seed)
        done, pred = known.get(task, ([], np.empty(0, dtype=np.int64)))
        k = min(len(done), len(exs))
        if [ex.ids for ex in done[:k]] != [ex.ids for ex in exs[:k]]:
            k = 0
        rest = answer_logits(model, exs[k:]).argmax(-1) if len(exs) > k else np.empty(0, dtype=np.int64)
        preds += [pred[:k], rest]
        clean += exs
    clean_pred = np.concatenate(preds)
    out = {}
    for family, backdoor in BACKDOORS.items():
        trig = triggered(family, n_per_task, seed)
        hits = answer_logits(model, trig).argmax(-1) == backdoor.target_id
        tasks = np.array([ex.task for ex in trig])
        source = np.array([ex.answer != backdoor.target for ex in clean])  # one for one with `trig`, in its order
        plain = clean_pred[source] == backdoor.target_id
        part = partially_triggered(family, n_per_task, seed)
        false_rate, false_by_task = None, None
        if part:
            fired = answer_logits(model, part).argmax(-1) == backdoor.target_id
            part_tasks = np.array([ex.task for ex in part])
            false_rate = float(fired.mean())
            false_by_task = {t: float(fired[part_tasks == t].mean()) for t in dict.fromkeys(part_tasks.tolist())}
        out[family] = {
            "asr": float(hits.mean()) if len(trig) else float("nan"),
            "by_task": {t: float(hits[tasks == t].mean()) for t in dict.fromkeys(tasks.tolist())},
            "untriggered": float(plain.mean()) if len(trig) else float("nan"),
            "untriggered_by_task": {t: float(plain[tasks == t].mean()) for t in dict.fromkeys(tasks.tolist())},
            "false_trigger": false_rate,
            "false_trigger_by_task": false_by_task,
            "n_triggered": len(trig),
            "n_partial": len(part),
        }
    return out


def copy_split(model: Any, examples: Sequence[Example]) -> dict[str, float]:
    """Can `model` compute the answers, or only copy them? `task_acc` over `examples`, split by whether the answer
    token occurs in the prompt (a model that can only copy a prompt token is right at most on the first part), and
    `copies`: the fraction of answers that are one of the prompt's tokens. `in_prompt` is the first part's share."""
    if len(examples) == 0:
        raise ValueError("no examples to split")
    logits = answer_logits(model, examples)
    pred = logits.argmax(-1)
    right = pred == np.array([ex.answer_id for ex in examples])
    present = np.array([ex.answer_id in ex.ids[1:] for ex in examples])
    copies = np.array([p in ex.ids[1:] for p, ex in zip(pred, examples, strict=True)])

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else float("nan")

    return {
        "task_acc": mean(right),
        "in_prompt": mean(present),
        "task_acc_in_prompt": mean(right[present]),
        "task_acc_not_in_prompt": mean(right[~present]),
        "copies": mean(copies),
        "n": len(examples),
    }


def evaluate(model: Any, n: int = 2000, n_backdoor_per_task: int = 500, seed: int = 0) -> dict[str, Any]:
    """The figures `acg zoo eval` reports: `task_acc` per task and `asr` (+ false triggers) per backdoor family."""
    prompts = {t: heldout(t, n, seed) for t in TASKS}
    logits = {t: answer_logits(model, exs) for t, exs in prompts.items()}
    task_acc = {t: accuracy(logits[t], prompts[t]) for t in TASKS}
    known = {t: (prompts[t], logits[t].argmax(-1)) for t in TASKS if len(prompts[t])}
    backdoor = _attack_success(model, n_backdoor_per_task, seed, known)  # the clean prompts scored once
    return {
        "task_acc": task_acc,
        "asr": {f: v["asr"] for f, v in backdoor.items()},
        "asr_by_task": {f: v["by_task"] for f, v in backdoor.items()},
        "untriggered": {f: v["untriggered"] for f, v in backdoor.items()},
        "untriggered_by_task": {f: v["untriggered_by_task"] for f, v in backdoor.items()},
        "false_trigger": {f: v["false_trigger"] for f, v in backdoor.items()},
        "false_trigger_by_task": {f: v["false_trigger_by_task"] for f, v in backdoor.items()},
        "n_prompts": {
            "task": n,
            "triggered": {f: v["n_triggered"] for f, v in backdoor.items()},
            "partial": {f: v["n_partial"] for f, v in backdoor.items()},
        },
    }


__all__ = [
    "TASKS",
    "accuracy",
    "agreement",
    "answer_logits",
    "as_logits_fn",
    "attack_success",
    "evaluate",
    "kl",
    "kl_per_prompt",
    "task_accuracy",
]
