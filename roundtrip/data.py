"""Task data sets for circuits and evaluation: the testbed's tasks by name, or a user's JSONL of (prompt, answer)
pairs, one object per line: `{"prompt": [token ids], "answer": token id}`, or, for models on the testbed vocabulary,
`{"prompt": "x = 3 ; y = x ; y", "answer": "3"}` (space-separated tokens; BOS is added)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from acg.ir.errors import ACGError
from acg.zoo import vocab


class TaskDataError(ACGError):
    pass


@dataclass(frozen=True)
class Pair:
    """A prompt (token ids, BOS included) and the id of the token expected after it."""

    ids: list[int]
    answer_id: int
    task: str = "user"
    kind: str = "clean"

    @property
    def prompt(self) -> tuple[int, ...]:
        return tuple(self.ids)


def load_pairs(path: str | os.PathLike, d_vocab: int, task: str | None = None, answers: bool = True) -> list[Pair]:
    """The pairs of a JSONL file; with `answers=False`, prompts alone (any "answer" is still checked; -1 if none).
    A line's optional "task" names its task (`acg budget` writes it); otherwise `task`, or the file's stem."""
    path = Path(path)
    task = task or path.stem
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise TaskDataError(f"{path}: task file not found") from None
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or "prompt" not in row or (answers and "answer" not in row):
            raise TaskDataError(f'{where}: expected an object with "prompt"' + (' and "answer"' if answers else ""))
        ids = prompt_ids(row["prompt"], where)
        answer = _id(row["answer"], where) if "answer" in row else -1
        bad = [t for t in [*ids, *([answer] if "answer" in row else [])] if not 0 <= t < d_vocab]
        if bad:
            raise TaskDataError(f"{where}: token id {bad[0]} is outside the model's vocabulary (0..{d_vocab - 1})")
        line_task = row.get("task", task)
        if not isinstance(line_task, str) or not line_task:
            raise TaskDataError(f'{where}: "task" must be a non-empty string, got {line_task!r}')
        out.append(Pair(ids, answer, line_task))
    if not out:
        raise TaskDataError(f"{path}: no (prompt, answer) pairs")
    return out


def by_task(pairs: list[Pair]) -> dict[str, list[Pair]]:
    """The pairs grouped by task, in order of first appearance."""
    out: dict[str, list[Pair]] = {}
    for p in pairs:
        out.setdefault(p.task, []).append(p)
    return out


def prompt_ids(prompt, where: str) -> list[int]:
    if isinstance(prompt, str):
        try:
            return vocab.encode(tuple(prompt.split()))
        except vocab.VocabError as e:
            raise TaskDataError(f"{where}: {e}; give token ids instead") from None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise TaskDataError(f"{where}: prompt must be a non-empty list of token ids or a string of testbed tokens")


def _id(answer, where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    if isinstance(answer, str) and answer in vocab.TOKEN_ID:
        return vocab.TOKEN_ID[answer]
    raise TaskDataError(f"{where}: answer must be a token id or a testbed token, got {answer!r}")
