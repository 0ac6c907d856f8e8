"""Which parameters must the recipe train? The full ACG's blocked round trip fine-tuned by `bench/backdoor.py`'s recipe
with parameter sets left untrained, side by side, on one defender's clean budget per seed.

    python bench/recipe_freeze.py [--models testbed-s] [--ratios 0.01] [--seeds 0,1,2] [--sets nothing,layer-0 QK]
                                  [--lrs 2e-4,1e-4] [--json] [--out FILE]
    python bench/recipe_freeze.py --merge A.json B.json ... [--out FILE] [--markdown]

The recipe (confirmed insertions + the budget, the FT baseline's steps) takes the backdoor pathways out of the blocked
round trip, and on testbed-s at 1% it costs `code.brackets` about 2 points. Layer 0's attention scores are where the
round trip blocks the QK pairs the budget never used; the sets (`backdoor.FREEZE_SETS`) are nothing, layer 0's
W_Q/W_K/b_Q/b_K, the embeddings (W_E, W_pos; and each alone), and all of those with layer 0's first norm (its
"table"); `--lrs` fine-tunes each set at each learning rate (default: the recipe's). Rows: the original, the
blocked round trip before fine-tuning, then one per set and rate; columns as
`bench/backdoor.py`'s (task_acc per task, asr and DER per family, mean over seeds +- the standard deviation,
n_params).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from acg.roundtrip import backdoor, defence
from acg.roundtrip import runs as runs_io

NAME = "recipe_freeze"


def print_table(console: Console, model: str, ratio: float, runs: list[dict], as_markdown: bool) -> None:
    title = f"{model}, clean budget {ratio:.0%} ({runs[0]['n_budget']:,} examples), {len(runs)} seed(s)"
    if as_markdown:
        print(f"{title}:\n\n{backdoor.markdown(runs)}\n", file=console.file)
    else:
        console.print(backdoor.table(title, runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="testbed-s")
    ap.add_argument("--ratios", default="0.01")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sets", default=",".join(backdoor.FREEZE_SETS), help="which of backdoor.FREEZE_SETS, in order")
    ap.add_argument("--lrs", default=f"{defence.FT_LR:g}", help="fine-tuning learning rates, each set at each")
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out prompts per task")
    ap.add_argument("--n-trig", type=int, default=200, help="triggered prompts per task and family")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", type=Path, help="also write the JSON here (after every seed)")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge these JSON outputs (their runs) into one table")
    ap.add_argument("--markdown", action="store_true", help="print the tables in Markdown")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    if args.merge:
        try:
            entries, seconds = runs_io.merge_runs(args.merge, NAME)
        except runs_io.MergeError as e:
            sys.exit(str(e))
        extra = {"merged_from": [str(f) for f in args.merge]}
        return finish(console, args, entries, {"seconds": seconds, **extra})
    unknown = [s for s in args.sets.split(",") if s not in backdoor.FREEZE_SETS]
    if unknown:
        sys.exit(f"--sets: no such set {unknown}; the sets are {list(backdoor.FREEZE_SETS)}")
    sets = {s: backdoor.FREEZE_SETS[s] for s in args.sets.split(",")}
    lrs = learning_rates(args.lrs)
    torch.set_num_threads(args.threads)
    start, version = time.perf_counter(), runs_io.code_version(Path(__file__))
    entries: dict[tuple[str, float], list[dict]] = {}

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    for model in args.models.split(","):
        for ratio in map(float, args.ratios.split(",")):
            runs = entries.setdefault((model, ratio), [])
            for seed in map(int, args.seeds.split(",")):
                kw = {"sets": sets, "lrs": lrs, "threads": args.threads, "log": log}
                runs.append(backdoor.freeze_run(model, ratio, seed, args.n_eval, args.n_trig, **kw))
                if args.out:  # after every seed, so that a run killed part way keeps what it measured
                    args.out.write_text(document(entries, time.perf_counter() - start, code=version) + "\n")
    finish(console, args, entries, {"seconds": time.perf_counter() - start, "code": version})


def learning_rates(text: str) -> list[float]:
    """`--lrs`: comma-separated positive numbers, each once; exits with what is wrong otherwise."""
    try:
        lrs = [float(x) for x in text.split(",")]
    except ValueError:
        sys.exit(f"--lrs: not a list of numbers: {text!r}")
    if not all(0 < lr < float("inf") for lr in lrs) or len(set(lrs)) < len(lrs):
        sys.exit(f"--lrs: each rate must be a positive number, given once: {text!r}")
    return lrs


def document(entries: dict[tuple[str, float], list[dict]], seconds: float, **extra) -> str:
    results = [
        {"model": m, "ratio": r, "runs": runs, "summary": backdoor.summarise(runs)} for (m, r), runs in entries.items()
    ]
    return json.dumps({"benchmark": NAME, "seconds": seconds, **extra, "results": results}, indent=1, default=float)


def finish(console: Console, args, entries: dict[tuple[str, float], list[dict]], extra: dict) -> None:
    for (model, ratio), runs in entries.items():
        print_table(console, model, ratio, runs, args.markdown)
    doc = document(entries, **extra)
    if args.out:
        args.out.write_text(doc + "\n")
    if args.json:
        print(doc)


if __name__ == "__main__":
    main()
