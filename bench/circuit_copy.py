"""Does the `code` circuit add, or only copy? Its `math.add` accuracy split by whether the answer occurs in the prompt.

    python bench/circuit_copy.py [--models testbed-s] [--ratio 0.05] [--seeds 0,1,2] [--acg MODEL=DIR] [--json]

The round-tripped `code` circuit of `bench/backdoor.py` keeps `math.add` above chance (0.10). Its `code.vars` prompts
ask for the digit assigned to a variable, so the circuit must copy a digit from the prompt; on a `math.add` prompt a
copier is right exactly where the answer digit is one of the prompt's digits (about 30% of prompts), and can never be
right elsewhere. Per model and seed, on the defender's clean budget and the ACG fitted on it (as `bench/backdoor.py`
does; `--acg MODEL=DIR` takes a fitted ACG instead, for every seed), this measures on held-out `math.add` prompts,
for `original`, `roundtrip full` and `roundtrip code` (`roundtrip.evaluate.copy_split`):

- `task_acc`; `in_prompt`: the share of prompts whose answer occurs in the prompt;
- `task_acc_in_prompt`, `task_acc_not_in_prompt`: accuracy on each part; chance is 0.10 on both;
- `copies`: the share of answers that are one of the prompt's tokens.

A circuit that computes no addition has `task_acc_not_in_prompt` at or below chance, whatever its overall figure.
Where no circuit meets the 1-point target, `circuit.extract` keeps every feature, and the row is not a circuit's: the
table says so under it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from acg.compiler import acg as acg_io
from acg.compiler.fit import FitSpec, fit
from acg.roundtrip import backdoor, defence, dense
from acg.roundtrip.evaluate import copy_split
from acg.zoo.registry import get, load
from acg.zoo.tasks import heldout

COLUMNS = ("task_acc", "in_prompt", "task_acc_in_prompt", "task_acc_not_in_prompt", "copies")


def run(name: str, ratio: float, seed: int, n: int, threads: int, acg_dir: str | None, log) -> dict[str, Any]:
    zoo, model = get(name), load(name)
    budget = defence.clean_budget(zoo.train, ratio, seed)
    t0 = time.perf_counter()
    if acg_dir is None:
        log(f"{name} seed {seed}: fitting the ACG on the budget ({len(budget):,} prompts) ...")
        acg, _ = fit(model, [ex.ids for ex in budget], FitSpec(seed=seed, threads=threads))
    else:
        acg = acg_io.load(acg_dir)
    fitted = time.perf_counter() - t0
    log(f"{name} seed {seed}: code circuit ...")
    circ = backdoor.code_circuit(model, acg, budget)
    full, _, _ = dense.roundtrip(acg, dense.select_captured(acg))
    code, _, report = dense.roundtrip(acg, circ.selection)
    examples = heldout("math.add", n, 0)
    rows = {
        m: copy_split(c, examples) for m, c in (("original", model), ("roundtrip full", full), ("roundtrip code", code))
    }
    rows["roundtrip code"]["n_features"] = int(sum(report["n_features"]))
    return {
        "model": name,
        "ratio": ratio,
        "seed": seed,
        "acg": acg_dir or "fitted on the budget",
        "fit_seconds": fitted,
        "circuit": circ.report,
        "rows": rows,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    return {m: {c: backdoor.mean_sd([r["rows"][m][c] for r in runs]) for c in COLUMNS} for m in runs[0]["rows"]}


def table(title: str, summary: dict[str, dict[str, dict[str, float]]], n_runs: int) -> Table:
    t = Table(title=f"{title} ({n_runs} seed{'s' if n_runs > 1 else ''}; math.add held out, chance 0.10)")
    t.add_column("method")
    for c in COLUMNS:
        t.add_column(c, justify="right")
    for method, cols in summary.items():
        cells = [f"{v['mean']:.3f}" + (f" ±{v['sd']:.3f}" if n_runs > 1 else "") for v in cols.values()]
        t.add_row(method, *cells)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="testbed-s")
    ap.add_argument("--ratio", type=float, default=0.05, help="the defender's clean budget, as in bench/backdoor.py")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--acg", action="append", default=[], help="MODEL=DIR: use this fitted ACG instead of fitting one")
    ap.add_argument("--n", type=int, default=2000, help="held-out math.add prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    given = dict(a.split("=", 1) for a in args.acg)
    err = Console(stderr=True)
    start = time.perf_counter()
    results = []
    for name in args.models.split(","):
        runs = [
            run(name, args.ratio, int(s), args.n, args.threads, given.get(name), err.log) for s in args.seeds.split(",")
        ]
        results.append({"model": name, "runs": runs, "summary": summarise(runs)})
    out = {"benchmark": "circuit_copy", "seconds": time.perf_counter() - start, "results": results}
    text = json.dumps(out, indent=1, default=float)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        console = Console(width=140)
        for r in results:
            console.print(table(r["model"], r["summary"], len(r["runs"])))
            for run_ in r["runs"]:
                c = run_["circuit"]
                met = "met" if c["target_met"] else "NOT met: every feature kept, not a circuit"
                size = f"{c['k']:,} features ({c['fraction']:.1%})"
                console.print(f"  seed {run_['seed']}: code circuit of {size}; 1-point target {met}")


if __name__ == "__main__":
    main()
