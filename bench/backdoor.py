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
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from acg.roundtrip import backdoor
from acg.roundtrip import runs as runs_io


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
    version = runs_io.code_version(Path(__file__))  # the code at launch, recorded in every write of the JSON

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
    """The runs of several outputs (e.g. one seed per session on a slow machine), per model and ratio, as one table
    (`runs.merge_runs`: a (model, ratio, seed) present twice is refused rather than counted twice)."""
    try:
        entries, seconds = runs_io.merge_runs(files, "backdoor")
    except runs_io.MergeError as e:
        sys.exit(str(e))
    results = []
    console = Console(stderr=as_json)
    for (model, ratio), runs in entries.items():
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
