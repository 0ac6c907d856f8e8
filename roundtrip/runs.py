"""Saved runs of the backdoor benches (`bench/backdoor.py`, `bench/recipe_freeze.py`): the code a run was made with,
and the runs of several outputs (one seed per session on a slow machine) joined into one table.

An output is `{"benchmark": NAME, "seconds": ..., "results": [{"model", "ratio", "runs": [{"seed", "rows": {method:
{...}}, ...}]}]}`; every run's rows hold the original's (each row's DER is against it).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


class MergeError(ValueError):
    """Outputs that cannot be joined into one table: unreadable, of another bench, or the same seed twice."""


def code_version(where: Path | None = None) -> dict[str, str | bool | None]:
    """The commit of the git checkout holding `where` (this file by default) and whether its tracked files had
    uncommitted changes; None for both outside a git checkout."""

    def git(*a: str) -> str | None:
        cwd = Path(where or __file__).resolve()
        cwd = cwd if cwd.is_dir() else cwd.parent
        try:
            done = subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True)
        except OSError:  # no git on the machine
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _runs_of(f: Path, benchmark: str) -> tuple[dict[str, Any], list[tuple[str, float, list[dict]]]]:
    """The output in `f` and its (model, ratio, runs); MergeError where it is not `benchmark`'s."""
    what = f"not a bench/{benchmark}.py JSON output"
    try:
        doc = json.loads(f.read_text())
        named = doc.get("benchmark", benchmark)
        found = [(e["model"], e["ratio"], e["runs"]) for e in doc["results"]]
        for _, _, listed in found:
            for r in listed:
                if "seed" not in r or "original" not in r["rows"]:  # DER needs the original's row
                    raise KeyError("seed" if "seed" not in r else "rows.original")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise MergeError(f"{f}: {what} ({type(e).__name__}: {e})") from e
    if named != benchmark:
        raise MergeError(f"{f}: {what} (it is bench/{named}.py's)")
    return doc, found


def merge_runs(files: list[Path], benchmark: str) -> tuple[dict[tuple[str, float], list[dict]], float]:
    """The runs of `benchmark`'s outputs in `files` per (model, ratio), sorted by seed, and the seconds they took in
    all. Refused (MergeError, naming the file): a file that is not such an output, a (model, ratio, seed) present
    twice (it would count twice), and runs whose rows differ (runs of different versions of the bench)."""
    entries: dict[tuple[str, float], list[dict]] = {}
    seconds = 0.0
    for f in files:
        doc, found = _runs_of(f, benchmark)
        seconds += doc.get("seconds", 0.0)
        for model, ratio, new in found:
            runs = entries.setdefault((model, ratio), [])
            seen = {r["seed"] for r in runs}
            for r in new:
                if r["seed"] in seen:
                    raise MergeError(f"{f}: {model} ratio {ratio} seed {r['seed']} is already in an earlier file")
                if runs and list(r["rows"]) != list(runs[0]["rows"]):
                    theirs, ours = set(r["rows"]), set(runs[0]["rows"])
                    raise MergeError(
                        f"{f}: {model} ratio {ratio} seed {r['seed']} has other rows than seed {runs[0]['seed']} "
                        f"(only here: {sorted(theirs - ours) or 'none'}; only there: {sorted(ours - theirs) or 'none'})"
                        ": runs of different versions of the bench do not make one table"
                    )
                runs.append(r)
    for runs in entries.values():
        runs.sort(key=lambda r: r["seed"])
    return entries, seconds
