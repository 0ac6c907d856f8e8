"""Can dense weights learn what the capture pass drops? The round trip's attention distilled from the captured IR on
clean prompts with random insertions, beside plain fine-tuning on the same prompts, each also blind to the triggers,
and the two combined.

    python bench/dense_capture.py [--model testbed-s] [--ratio 0.05] [--seeds 0,1,2] [--n-prompts 16000]
        [--rows ROW ...] [--json]

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
  with layer 0's pairs blocked;
- `... + FT, confirmed insertions + budget` — fine-tuning on the pool less every prompt on which the captured IR does
  not give the clean answer (`distil.confirmed`), together with the whole clean budget untouched (the budget holds
  clean accuracy; the confirmed insertions teach what the IR dropped), from the blocked round trip (the recipe), from
  the plain round trip (is the blocking needed?) and from the original (is the round trip needed?); beside them
  `FT + insertions + budget` (the original on the whole pool and the budget, clean labels: the same data without the
  ACG) and `... blocked + FT on budget` (no insertions: the FT baseline's data) (`--rows` measures a subset);
- `+ QK distilled, blind`, `FT + insertions, blind` — those two with every pool prompt that holds a trigger left
  out: not a defence (it needs the triggers), an ablation that tells a general rule (the pair never seen leaves the
  answer alone) from what was learnt on the few triggered prompts random insertions make.

Columns as `bench/backdoor.py`'s: task_acc per task, asr and DER per family (mean, +- sd over seeds), n_params.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from acg.compiler.fit import FitSpec, fit
from acg.compiler.lower import lower
from acg.roundtrip import backdoor, defence, dense
from acg.roundtrip.distil import agreed_labels, confirmed_pool, distil, insertions
from acg.zoo.registry import get, load
from acg.zoo.tasks import is_clean


def triggered(ex) -> bool:
    return not is_clean(ex.prompt)


BLOCKED = "roundtrip full" + backdoor.BLOCKED
AGREED = ("roundtrip full + FT on agreed labels", "roundtrip full + FT, agreed changes dropped")
CONFIRMED = "FT, confirmed insertions + budget"
ROWS = (
    "original",
    "ACG captured (IR)",
    "roundtrip full",
    BLOCKED,
    "+ QK distilled",
    "+ QK distilled, blind",
    "FT + insertions",
    "FT + insertions, blind",
    "roundtrip full + FT on insertions",
    *AGREED,
    f"{BLOCKED} + FT, agreed changes dropped",
    "FT + insertions + budget",
    CONFIRMED,
    f"roundtrip full + {CONFIRMED}",
    f"{BLOCKED} + {CONFIRMED}",
    f"{BLOCKED} + FT on budget",
)


def run(
    name: str,
    ratio: float,
    seed: int,
    n_prompts: int,
    n_eval: int,
    n_trig: int,
    threads: int,
    log,
    only: Sequence[str] = ROWS,
) -> dict:
    """One seed: the rows named in `only` (in ROWS' order; `original` and the teacher always)."""
    zoo, model = get(name), load(name)
    spec = FitSpec(seed=seed, threads=threads)
    steps = spec.steps + spec.e2e_steps
    budget = defence.clean_budget(zoo.train, ratio, seed)
    base = dataclasses.replace(zoo.train, threads=threads)  # fine-tuned on the bench's threads too
    rows: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {"n_budget": len(budget), "steps": steps, "n_prompts": n_prompts}

    def add(method: str, candidate: Any, seconds: float, n_params: int | None, **more: Any) -> None:
        t = time.perf_counter()
        rows[method] = {**backdoor.measure(candidate, n_eval, n_trig), "n_params": n_params, "seconds": seconds, **more}
        log(f"{name} seed {seed}: {method} ({seconds:.0f} s + {time.perf_counter() - t:.0f} s eval)")

    def timed(method: str, make) -> None:
        """Measure `method` if asked for: make() -> (candidate, extra fields; `seconds` added to its time)."""
        if method in only:
            t = time.perf_counter()
            candidate, more = make()
            add(
                method,
                candidate,
                time.perf_counter() - t + more.pop("seconds", 0.0),
                dense.n_params(candidate)["n_params"],
                **more,
            )

    add("original", model, 0.0, dense.n_params(model)["n_params"])
    t = time.perf_counter()
    acg, _ = fit(model, [ex.ids for ex in budget], spec)
    extra["fit_seconds"] = time.perf_counter() - t
    seen = np.flatnonzero(acg.usage["tok_count"] > 0)
    pool, _ = insertions(budget, seen, n_prompts, seed, model.cfg.n_ctx)
    pools = {False: pool}
    if any(m.endswith(", blind") for m in only):
        pools[True], rejected = insertions(budget, seen, n_prompts, seed, model.cfg.n_ctx, exclude=triggered)
        extra["rejected_blind"] = rejected
    extra["triggered_in_pool"] = sum(map(triggered, pool))
    rt, _, _ = dense.roundtrip(acg, dense.select_captured(acg))
    rt_blocked, _, report = dense.roundtrip(acg, dense.select_captured(acg), block=backdoor.BLOCK)
    with tempfile.TemporaryDirectory(prefix="acg-capture-") as tmp:
        t = time.perf_counter()
        graph = lower(acg, keep_errors=False, dtype="float32", usage=True, qk_tables=True)
        teacher, _ = backdoor.captured_ir(graph, (), tmp)

        def distilled(data) -> tuple[Any, dict]:
            student, rep = distil(rt, teacher, data, steps, seed=seed)
            return student, {"report": rep}

        add("ACG captured (IR)", teacher, time.perf_counter() - t, None)
        timed("roundtrip full", lambda: (rt, {}))
        timed(BLOCKED, lambda: (rt_blocked, {"report": report["pairs"]}))
        for blind, suffix in ((False, ""), (True, ", blind")):
            timed(f"+ QK distilled{suffix}", lambda b=blind: distilled(pools[b]))
        labelling = 0.0
        if any(m.endswith("agreed labels") or m.endswith("agreed changes dropped") for m in only):
            t = time.perf_counter()
            agreed_pool, extra["agreed_labels"] = agreed_labels(pool, model, teacher)
            # what changed="drop" returns, without running both models over the pool again
            kept_pool = [ex for ex in agreed_pool if ex.answer == ex.clean_answer]
            extra["agreed_changes_dropped"] = {**extra["agreed_labels"], "n": len(kept_pool)}
            labelling = time.perf_counter() - t
        if any(m.endswith(CONFIRMED) for m in only):
            t = time.perf_counter()
            # the same insertions as `pool` (same seed and arguments), confirmed, then the budget
            made = confirmed_pool(budget, teacher, seen, n_prompts, seed, model.cfg.n_ctx)
            confirmed_data, extra["confirmed"] = made[:2]  # its logits (for soft targets) are not used here
            confirming = time.perf_counter() - t

    def tuned(start, data, seconds: float = 0.0) -> tuple[Any, dict]:  # `seconds` spent before: the labelling
        return defence.finetune(start, base, data, steps, seed), {"seconds": seconds}

    for blind, suffix in ((False, ""), (True, ", blind")):
        timed(f"FT + insertions{suffix}", lambda b=blind: tuned(model, pools[b]))
    timed("roundtrip full + FT on insertions", lambda: tuned(rt, pool))
    timed(AGREED[0], lambda: tuned(rt, agreed_pool, labelling))
    timed(AGREED[1], lambda: tuned(rt, kept_pool, labelling))
    timed(f"{BLOCKED} + FT, agreed changes dropped", lambda: tuned(rt_blocked, kept_pool, labelling))
    timed("FT + insertions + budget", lambda: tuned(model, pool + budget))
    for start, prefix in ((model, ""), (rt, "roundtrip full + "), (rt_blocked, f"{BLOCKED} + ")):
        timed(prefix + CONFIRMED, lambda s=start: tuned(s, confirmed_data, confirming))
    timed(f"{BLOCKED} + FT on budget", lambda: tuned(rt_blocked, budget))
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
    ap.add_argument(
        "--rows", nargs="+", metavar="ROW", help="measure only these rows (names as in the table; default: all)"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", type=Path, help="also write the JSON here (after every seed)")
    args = ap.parse_args()
    unknown = [r for r in args.rows or () if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(map(repr, unknown))}; the rows are: {', '.join(map(repr, ROWS))}")
    only = ROWS if not args.rows else tuple(r for r in ROWS if r in args.rows)
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
        runs.append(run(a.model, a.ratio, seed, a.n_prompts, a.n_eval, a.n_trig, a.threads, log, only))
        if args.out:
            args.out.write_text(document() + "\n")
    title = f"{args.model}, clean budget {args.ratio:.0%}, insertion pool {args.n_prompts:,}, {len(runs)} seed(s)"
    Console(stderr=args.json).print(backdoor.table(title, runs))
    if args.json:
        print(document())


if __name__ == "__main__":
    main()
