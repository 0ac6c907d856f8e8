"""Backdoor removal, side by side: original, FT, FP, Scratch, the ACG replacement, the captured ACG (IR), the
round-tripped full ACG and the round-tripped `code` circuit (plain, with layer 0's unused QK pairs blocked, and that
fine-tuned on the insertions the captured IR confirms plus the budget), on one defender's clean budget per seed.

    python bench/backdoor.py [--models testbed-s] [--ratios 0.05,0.01] [--seeds 0,1,2] [--json] [--out FILE]
    python bench/backdoor.py --merge A.json B.json ... [--out FILE]   # one table from runs made apart (seed by seed)
    python bench/backdoor.py --merge A.json --markdown                 # the README's table of a saved run

With --out, each seed's baseline rows (original, FT, FP, Scratch) are also kept in `OUT.MODEL-RATIO-SEED.partial.json`
as they are measured; the same command run again after a crash takes them from there and starts at the ACG fit.

Columns: task_acc per task, asr per backdoor family, DER per family (mean over seeds, +- the standard deviation),
n_params. Every method sees the same budget: `ratio` x the clean examples the model was trained on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from acg.roundtrip import backdoor


def table(model: str, ratio: float, runs: list[dict]) -> Table:
    title = f"{model}, clean budget {ratio:.0%} ({runs[0]['n_budget']:,} examples), {len(runs)} seed(s)"
    return backdoor.table(title, runs)


def print_tables(console: Console, model: str, ratio: float, runs: list[dict], as_markdown: bool = False) -> None:
    """The table, then the code circuit's asr split by the task of the triggered prompts (where measured); with
    `as_markdown` the table alone, in Markdown, where the console writes (stderr under --json) and never wrapped."""
    if as_markdown:
        print(f"{model}, {ratio:.0%} ({len(runs)} seed(s)):\n\n{backdoor.markdown(runs)}\n", file=console.file)
        return
    console.print(table(model, ratio, runs))
    split = backdoor.by_task_table(f"{model}, {ratio:.0%}: asr by the task of the triggered prompts", runs)
    if split is not None:
        console.print(split)


def code_version() -> dict[str, str | bool | None]:
    """The commit the bench ran on and whether the tree had uncommitted changes (None outside a git checkout)."""

    def git(*a: str) -> str | None:
        done = subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="testbed-s")
    ap.add_argument("--ratios", default="0.05,0.01")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out prompts per task")
    ap.add_argument("--n-trig", type=int, default=200, help="triggered prompts per task and family")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps of FT / FP / Scratch (default: the fit's)")
    ap.add_argument("--device", default="cpu", help="where FT / FP / Scratch train (the ACG fit runs on the CPU)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge these JSON outputs (their runs) into one table")
    ap.add_argument("--markdown", action="store_true", help="print the table in Markdown (as in the README)")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out, args.json, args.markdown)
    torch.set_num_threads(args.threads)
    console = Console(stderr=args.json)
    results = []
    start = time.perf_counter()
    version = code_version()  # the code at launch, recorded in every write of the JSON

    def document() -> str:
        doc = {
            "benchmark": "backdoor",
            "seconds": time.perf_counter() - start,
            "code": version,
            "results": results,
        }
        return json.dumps(doc, indent=1, default=float)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    for model in args.models.split(","):
        for ratio in map(float, args.ratios.split(",")):
            runs: list[dict] = []
            entry = {"model": model, "ratio": ratio, "runs": runs}
            results.append(entry)
            for seed in map(int, args.seeds.split(",")):
                kw = {"steps": args.steps, "log": log, "device": args.device, "threads": args.threads}
                if args.out:  # the baselines' rows as they come, so that a run stopped later does not redo them
                    kw["resume"] = args.out.with_name(f"{args.out.stem}.{model}-{ratio}-{seed}.partial.json")
                runs.append(backdoor.run(model, ratio, seed, args.n_eval, args.n_trig, **kw))
                entry["summary"] = backdoor.summarise(runs)
                if args.out:  # after every seed, so that a run killed part way keeps what it measured
                    args.out.write_text(document() + "\n")
            print_tables(console, model, ratio, runs, args.markdown)
    if args.json:
        print(document())


def merge(files: list[Path], out: Path | None, as_json: bool, as_markdown: bool = False) -> None:
    """The runs of several outputs (e.g. one seed per session on a slow machine), per model and ratio, as one table;
    a (model, ratio, seed) present twice is refused rather than counted twice."""
    entries: dict[tuple[str, float], list[dict]] = {}
    seconds = 0.0
    for f in files:
        try:
            doc = json.loads(f.read_text())
            found = [(e["model"], e["ratio"], e["runs"]) for e in doc["results"]]
            for _, _, listed in found:  # every run needs a seed, and rows with the original's (for DER)
                for r in listed:
                    r["seed"], r["rows"]["original"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"{f}: not a bench/backdoor.py JSON output ({type(e).__name__}: {e})")
        seconds += doc.get("seconds", 0.0)
        for model, ratio, new in found:
            runs = entries.setdefault((model, ratio), [])
            seen = {r["seed"] for r in runs}
            for r in new:
                if r["seed"] in seen:
                    sys.exit(f"{f}: {model} ratio {ratio} seed {r['seed']} is already in an earlier file")
                if runs and list(r["rows"]) != list(runs[0]["rows"]):  # runs of another version of the bench
                    theirs, ours = set(r["rows"]), set(runs[0]["rows"])
                    sys.exit(
                        f"{f}: {model} ratio {ratio} seed {r['seed']} has other rows than seed {runs[0]['seed']} "
                        f"(only here: {sorted(theirs - ours) or 'none'}; only there: {sorted(ours - theirs) or 'none'})"
                        ": runs of different versions of the bench do not make one table"
                    )
                runs.append(r)
    results = []
    console = Console(stderr=as_json)
    for (model, ratio), runs in entries.items():
        runs.sort(key=lambda r: r["seed"])
        results.append({"model": model, "ratio": ratio, "runs": runs, "summary": backdoor.summarise(runs)})
        print_tables(console, model, ratio, runs, as_markdown)
    doc = json.dumps(
        {"benchmark": "backdoor", "seconds": seconds, "merged_from": [str(f) for f in files], "results": results},
        indent=1,
        default=float,
    )
    if out:
        out.write_text(doc + "\n")
    if as_json:
        print(doc)


if __name__ == "__main__":
    main()
