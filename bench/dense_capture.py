"""Can dense weights learn what the capture pass drops? The round trip's attention distilled from the captured IR on
clean prompts with random insertions, beside plain fine-tuning on the same prompts, each also blind to the triggers,
and the two combined.

    python bench/dense_capture.py [--model testbed-s] [--ratio 0.05] [--seeds 0,1,2] [--n-prompts 16000] [--json]

Per seed, on the defender's clean budget (the same as `bench/backdoor.py`'s) and the ACG fitted on it:

- `ACG captured (IR)` — the teacher: the feature-level IR with every QK pair, OV entry, token and feature the budget
  never used dropped (not a dense model);
- `roundtrip full` — the dense checkpoint of the captured ACG, as in `bench/backdoor.py`;
- `roundtrip full + layer-0 pairs blocked` — the round trip with layer 0's heads rewritten (wider) so that a key is
  not attended from a query it forms a never-used QK pair with (`roundtrip.pairs`), as in `bench/backdoor.py`;
- `+ QK distilled` — its W_Q, W_K, b_Q, b_K trained to match the teacher (KL at every position) on the budget's
  prompts with 1-3 seen tokens inserted at random (`roundtrip.distil`), as many steps as the baselines train;
- `FT + insertions` — the original fine-tuned (the FT baseline's recipe and steps) on the same prompts, labelled with
  the clean answer of the prompt each was made from: insertions without the ACG;
- `roundtrip full + FT on insertions` — both: the round trip (which leaves out what the budget never used: tokens,
  features) fine-tuned like `FT + insertions`;
- `roundtrip full + FT on agreed labels` — the same fine-tuning of the round trip, labelled by the ACG instead
  (`distil.agreed_labels`: the original's answer where the captured IR gives the same, the clean answer elsewhere),
  so that an insertion that changes the right answer no longer gets a wrong label; and `roundtrip full + FT, agreed
  changes dropped` — the same on the pool less every prompt on which the two models agree on an answer other than
  the clean one (`changed="drop"`), labelled with the clean answer: no wrong label where an insertion changed the
  answer, and no backdoor the teacher keeps taught, while a backdoor it dropped is still labelled clean; and
  `roundtrip full + layer-0 pairs blocked + FT, agreed changes dropped` — that recipe started from the round trip
  with layer 0's pairs blocked (the three rows left out with `--no-agreed-labels`);
- `+ QK distilled, blind`, `FT + insertions, blind` — those two with every pool prompt that holds a trigger left
  out: not a defence (it needs the triggers), an ablation that tells a general rule (the pair never seen leaves the
  answer alone) from what was learnt on the few triggered prompts random insertions make.

Columns as `bench/backdoor.py`'s: task_acc per task, asr and DER per family (mean, +- sd over seeds), n_params.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from acg.compiler.fit import FitSpec, fit
from acg.compiler.lower import lower
from acg.roundtrip import backdoor, defence, dense
from acg.roundtrip.distil import agreed_labels, distil, insertions
from acg.zoo.registry import get, load
from acg.zoo.tasks import is_clean


def triggered(ex) -> bool:
    return not is_clean(ex.prompt)


def run(
    name: str,
    ratio: float,
    seed: int,
    n_prompts: int,
    n_eval: int,
    n_trig: int,
    threads: int,
    log,
    agreed: bool = True,
) -> dict:
    zoo, model = get(name), load(name)
    spec = FitSpec(seed=seed, threads=threads)
    steps = spec.steps + spec.e2e_steps
    budget = defence.clean_budget(zoo.train, ratio, seed)
    rows: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {"n_budget": len(budget), "steps": steps, "n_prompts": n_prompts}

    def add(method: str, candidate: Any, seconds: float, n_params: int | None, **more: Any) -> None:
        t = time.perf_counter()
        rows[method] = {**backdoor.measure(candidate, n_eval, n_trig), "n_params": n_params, "seconds": seconds, **more}
        log(f"{name} seed {seed}: {method} ({seconds:.0f} s + {time.perf_counter() - t:.0f} s eval)")

    add("original", model, 0.0, dense.n_params(model)["n_params"])
    t = time.perf_counter()
    acg, _ = fit(model, [ex.ids for ex in budget], spec)
    extra["fit_seconds"] = time.perf_counter() - t
    seen = np.flatnonzero(acg.usage["tok_count"] > 0)
    pool, _ = insertions(budget, seen, n_prompts, seed, model.cfg.n_ctx)
    blind_pool, rejected = insertions(budget, seen, n_prompts, seed, model.cfg.n_ctx, exclude=triggered)
    pools = {False: pool, True: blind_pool}
    extra.update(triggered_in_pool=sum(map(triggered, pool)), rejected_blind=rejected)
    rt, _, report = dense.roundtrip(acg, dense.select_captured(acg))
    n_rt = report["n_params"]
    rt_pairs, _, report = dense.roundtrip(acg, dense.select_captured(acg), block=backdoor.BLOCK)
    n_rt_pairs = report["n_params"]
    with tempfile.TemporaryDirectory(prefix="acg-capture-") as tmp:
        t = time.perf_counter()
        graph = lower(acg, keep_errors=False, dtype="float32", usage=True, qk_tables=True)
        teacher, _ = backdoor.captured_ir(graph, (), tmp)
        add("ACG captured (IR)", teacher, time.perf_counter() - t, None)
        add("roundtrip full", rt, 0.0, n_rt)
        add("roundtrip full" + backdoor.BLOCKED, rt_pairs, 0.0, n_rt_pairs, report=report["pairs"])
        for blind, suffix in ((False, ""), (True, ", blind")):
            t = time.perf_counter()
            student, rep = distil(rt, teacher, pools[blind], steps, seed=seed)
            add(f"+ QK distilled{suffix}", student, time.perf_counter() - t, n_rt, report=rep)
        if agreed:
            t = time.perf_counter()
            agreed_pool, extra["agreed_labels"] = agreed_labels(pool, model, teacher)
            # what changed="drop" returns, without running both models over the pool again
            kept_pool = [ex for ex in agreed_pool if ex.answer == ex.clean_answer]
            extra["agreed_changes_dropped"] = {**extra["agreed_labels"], "n": len(kept_pool)}
            labelling = time.perf_counter() - t
    for blind, suffix in ((False, ""), (True, ", blind")):
        t = time.perf_counter()
        ft = defence.finetune(model, zoo.train, pools[blind], steps, seed)
        add(f"FT + insertions{suffix}", ft, time.perf_counter() - t, dense.n_params(ft)["n_params"])
    t = time.perf_counter()
    both = defence.finetune(rt, zoo.train, pool, steps, seed)
    add("roundtrip full + FT on insertions", both, time.perf_counter() - t, n_rt)
    if agreed:
        t = time.perf_counter()
        relabelled = defence.finetune(rt, zoo.train, agreed_pool, steps, seed)
        add("roundtrip full + FT on agreed labels", relabelled, labelling + time.perf_counter() - t, n_rt)
        t = time.perf_counter()
        filtered = defence.finetune(rt, zoo.train, kept_pool, steps, seed)
        add("roundtrip full + FT, agreed changes dropped", filtered, labelling + time.perf_counter() - t, n_rt)
        t = time.perf_counter()
        filtered = defence.finetune(rt_pairs, zoo.train, kept_pool, steps, seed)
        seconds = labelling + time.perf_counter() - t
        add(f"roundtrip full{backdoor.BLOCKED} + FT, agreed changes dropped", filtered, seconds, n_rt_pairs)
    backdoor.add_der(rows)
    return {"model": name, "ratio": ratio, "seed": seed, "rows": rows, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed-s")
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-prompts", type=int, default=16_000, help="prompts in the insertion pool")
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out prompts per task")
    ap.add_argument("--n-trig", type=int, default=200, help="triggered prompts per task and family")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-agreed-labels", action="store_true", help="leave out the three rows labelled by the ACG")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", type=Path, help="also write the JSON here (after every seed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs: list[dict] = []

    def document() -> str:
        entry = {"model": args.model, "ratio": args.ratio, "runs": runs, "summary": backdoor.summarise(runs)}
        doc = {"benchmark": "dense_capture", "seconds": time.perf_counter() - start, "results": [entry]}
        return json.dumps(doc, indent=1, default=float)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    for seed in map(int, args.seeds.split(",")):
        a = args
        runs.append(
            run(a.model, a.ratio, seed, a.n_prompts, a.n_eval, a.n_trig, a.threads, log, not a.no_agreed_labels)
        )
        if args.out:
            args.out.write_text(document() + "\n")
    title = f"{args.model}, clean budget {args.ratio:.0%}, insertion pool {args.n_prompts:,}, {len(runs)} seed(s)"
    Console(stderr=args.json).print(backdoor.table(title, runs))
    if args.json:
        print(document())


if __name__ == "__main__":
    main()
