"""Backdoor removal, side by side: original, FT, FP, Scratch, the ACG replacement, the captured ACG (IR), the
round-tripped full ACG and the round-tripped `code` circuit (plain, with layer 0's unused QK pairs blocked, and that
fine-tuned on the insertions the captured IR confirms plus the budget), on one defender's clean budget per seed.

    python bench/backdoor.py [--models testbed-s] [--ratios 0.05,0.01] [--seeds 0,1,2] [--recipe-soft W]
                             [--recipe-unseen U] [--recipe-seen S] [--recipe-anchor A] [--recipe-code-anchor A]
                             [--recipe-hold N [--recipe-flat]] [--recipe-keep-out] [--no-recipe]
                             [--circuit-refine-tokens N] [--circuit-block B] [--circuit-ablation zero|mean]
                             [--circuit-judge plain|blocked] [--circuit-max-mlp F] [--code-only] [--json]
                             [--out FILE]
    python bench/backdoor.py --merge A.json B.json ... [--out FILE]   # one table from runs made apart (seed by seed)
    python bench/backdoor.py --merge A.json --markdown                 # the README's table of a saved run

With --out, each seed's baseline rows (original, FT, FP, Scratch) are also kept in `OUT.MODEL-RATIO-SEED.partial.json`
as they are measured; the same command run again after a crash takes them from there and starts at the ACG fit.
`--recipe-soft W` fine-tunes the recipe rows with weight W of the captured IR's answer distribution against the labels
on the prompts with insertions (`backdoor.recipe_targets`; the rows are named ", soft W"), and `--recipe-unseen U`
keeps U of W on the insertions that hold a token the fit never saw (" (U on never-seen)"), `--recipe-seen S` S of W on
the others (" (S on seen)"); `--recipe-anchor A` holds the round trip's own block outputs on the budget's clean
prompts at weight A (`backdoor.anchor_kw`; ", anchor A"), and `--recipe-code-anchor A` the code circuit's on the
budget's code prompts (default 0.3, `backdoor.CODE_ANCHOR`; 0: none; the full round trip's stays `--recipe-anchor`'s,
where the anchor costs `phrase`); `--recipe-hold N` adds to the code circuit's recipe N prompts of the other tasks with
insertions, labelled with the circuit's own answer on the prompt each was made from (`backdoor.with_held`; ", N held
off-task"; default 16,000, `backdoor.CODE_HOLD`; 0: none, as in the earlier tables), and with `--recipe-flat`
teaches them an even answer distribution instead, at full weight (`backdoor.flat_held`; " flat"); `--recipe-keep-out`
keeps the embeddings of the tokens each round trip left out at zero through the fine-tuning (`backdoor.keep_out_kw`;
", left-out tokens kept out"; with `--circuit-ablation zero`).
The code circuit's options, each named in its rows' names where it is not the default (`backdoor.circuit_tag`):
`--circuit-refine-tokens N` has its elimination try leaving out the N rarest tokens of the code prompts (default 64,
`backdoor.REFINE_TOKENS`; 0: every token they hold kept, as before 4 December: " (every code token kept)").
`--circuit-block B` lets its feature elimination leave out up to B features at one try, twice as many after a removal
kept, half after one refused (`circuit.extract`'s `block`; default 64, `backdoor.CIRCUIT_BLOCK`; 1: one at a time, as
in the earlier tables: " (one feature a try)"). `--circuit-ablation` says what a token the circuit leaves out reads
as: the kept tokens' mean embedding under how often the code prompts hold each (mean, the default) or its position
alone (zero, as in the earlier tables: " (left-out tokens zeroed)"; `circuit.extract`'s `token_ablation`).
`--circuit-judge` says which round trip each of the elimination's decisions measures: the circuit's with layer 0's
unused pairs blocked, the blocked rows' checkpoint (blocked, the default), or the pruned replacement model (plain, as
in the earlier tables: " (judged plain)"; `backdoor.code_circuit`'s `judge`). The earlier tables
(docs/backdoor-record.md) measured its code rows with `--circuit-block 1 --circuit-ablation zero --circuit-judge plain
--recipe-hold 0 --recipe-code-anchor A --circuit-max-mlp 0`, A the run's `--recipe-anchor` (0 without one), unless
they say; the tables measured on the defaults before 75d01a3, with `--recipe-code-anchor 0 --circuit-max-mlp 0`, and
those between 75d01a3 and the MLP bound with `--circuit-max-mlp 0`.
`--circuit-max-mlp F` bounds the code circuit's MLP parameters at F of the original's (the issue's target: default
0.25, `backdoor.CIRCUIT_MAX_MLP`): a circuit its elimination leaves larger loses the features whose removal costs its
task least, measured (`circuit.cut_to_budget`), until it fits, met or not (its report's `budget` says); 0: no bound,
as in the earlier tables (" (no MLP bound)"; where the elimination's circuit fits, the bound changes nothing).
`--no-recipe` leaves out the recipe rows; `--code-only` measures the rows the code circuit needs alone (original, ACG
replacement, the code circuit's round trips; with a recipe, `ACG captured (IR)` as its teacher): no baselines,
ablations or full round trips (testbed-m seed 0 with --no-recipe: 41 minutes here, 29 of them the extraction; every
row: 68-132 minutes).
Runs of the two kinds have different rows and do not merge.

Columns: task_acc per task, asr per backdoor family, DER per family (mean over seeds, +- the standard deviation),
n_params. Every method sees the same budget: `ratio` x the clean examples the model was trained on. A second table
gives the code tasks' task_acc, asr and DER with the clean accuracy over the code tasks alone (`der_code` in the
summary: a code circuit drops math and text by design, which the first DER charges it for).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from acg.roundtrip import backdoor, circuit
from acg.roundtrip import runs as runs_io

NAME = "backdoor"


def table(model: str, ratio: float, runs: list[dict]) -> Table:
    title = f"{model}, clean budget {ratio:.0%} ({runs[0]['n_budget']:,} examples), {len(runs)} seed(s)"
    return backdoor.table(title, runs)


def print_tables(console: Console, model: str, ratio: float, runs: list[dict], as_markdown: bool = False) -> None:
    """The table, the same with DER over the code tasks alone, the code circuit per seed (its size, MLP share and
    bound), then its asr split by the task of the triggered prompts (where measured); with `as_markdown` the first
    three alone, in Markdown, where the console writes (stderr under --json) and never wrapped."""
    on_code = f"{model}, {ratio:.0%}: DER with the clean accuracy over the code tasks alone (a code-only defender's)"
    if as_markdown:
        print(f"{model}, {ratio:.0%} ({len(runs)} seed(s)):\n\n{backdoor.markdown(runs)}\n", file=console.file)
        print(f"{on_code}:\n\n{backdoor.markdown(runs, on_code=True)}\n", file=console.file)
        circuits = backdoor.circuit_markdown(runs)
        if circuits is not None:
            print(f"{model}, {ratio:.0%}: the code circuit per seed:\n\n{circuits}\n", file=console.file)
        return
    console.print(table(model, ratio, runs))
    console.print(backdoor.table(on_code, runs, on_code=True))
    circuits = backdoor.circuit_table(f"{model}, {ratio:.0%}: the code circuit per seed", runs)
    if circuits is not None:
        console.print(circuits)
    title = f"{model}, {ratio:.0%}: asr by the task of the triggered prompts (/ untriggered / partial trigger)"
    split = backdoor.by_task_table(title, runs)
    if split is not None:
        console.print(split)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs_io.add_options(ap, ratios="0.05,0.01")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps of FT / FP / Scratch (default: the fit's)")
    ap.add_argument("--device", default="cpu", help="where FT / FP / Scratch train (the ACG fit runs on the CPU)")
    ap.add_argument(
        "--recipe-soft",
        type=float,
        default=0.0,
        help="weight in [0, 1] of the captured IR's answer distribution on the recipe's insertions (0: labels alone)",
    )
    ap.add_argument(
        "--recipe-unseen",
        type=float,
        default=1.0,
        help="share in [0, 1] of --recipe-soft kept on the insertions that hold a token the fit never saw (1: all)",
    )
    ap.add_argument(
        "--recipe-seen",
        type=float,
        default=1.0,
        help="share in [0, 1] of --recipe-soft kept on the other insertions (1: all)",
    )
    ap.add_argument(
        "--recipe-anchor",
        type=float,
        default=0.0,
        help="weight >= 0 holding the round trip's own block outputs on the budget's clean prompts (0: none)",
    )
    ap.add_argument(
        "--recipe-code-anchor",
        type=float,
        default=backdoor.CODE_ANCHOR,
        help="weight >= 0 holding the code circuit's round trip's own block outputs on the budget's code prompts "
        "while its recipe trains (0: none; default %(default)s)",
    )
    ap.add_argument(
        "--recipe-hold",
        type=int,
        default=backdoor.CODE_HOLD,
        help="the code circuit's recipe also trains on this many of the other tasks' prompts with insertions, labelled "
        "with the circuit's own answer without them (0: none; default %(default)s)",
    )
    ap.add_argument(
        "--recipe-flat",
        action="store_true",
        help="teach the --recipe-hold prompts an even answer distribution (no answer) instead of the circuit's own",
    )
    ap.add_argument(
        "--recipe-keep-out",
        action="store_true",
        help="keep the embeddings of the tokens each round trip left out at zero through the recipe's fine-tuning",
    )
    ap.add_argument(
        "--circuit-refine-tokens",
        type=int,
        default=backdoor.REFINE_TOKENS,
        help="the code circuit's elimination tries leaving out this many of the code prompts' rarest tokens (0: none)",
    )
    ap.add_argument(
        "--circuit-block",
        type=int,
        default=backdoor.CIRCUIT_BLOCK,
        help="the code circuit's feature elimination leaves out up to this many at one try, twice as many after a "
        "removal kept, half after one refused (1: one at a time; default %(default)s)",
    )
    ap.add_argument(
        "--circuit-ablation",
        choices=circuit.TOKEN_ABLATIONS,
        default=backdoor.CIRCUIT_ABLATION,
        help="what a token the code circuit leaves out reads as: its position alone (zero) or the kept tokens' mean "
        "embedding under how often the code prompts hold each (mean; the default)",
    )
    ap.add_argument(
        "--circuit-judge",
        choices=backdoor.JUDGES,
        default=backdoor.CIRCUIT_JUDGE,
        help="which of the code circuit's round trips its elimination measures: the plain one (the pruned replacement "
        "model) or the one with layer 0's unused pairs blocked (the default)",
    )
    ap.add_argument(
        "--circuit-max-mlp",
        type=float,
        default=backdoor.CIRCUIT_MAX_MLP,
        help="the code circuit keeps at most this share of the original's MLP parameters, cut to fit where its "
        "elimination leaves more (0: no bound; default %(default)s)",
    )
    ap.add_argument("--no-recipe", action="store_true", help="leave out the rows the recipe fine-tunes")
    ap.add_argument(
        "--code-only",
        action="store_true",
        help="the code circuit's rows alone (and the original's, the ACG replacement's): no baselines, no full ones",
    )
    args = ap.parse_args()
    if args.circuit_refine_tokens < 0:
        ap.error(f"--circuit-refine-tokens must be >= 0 (tokens to try leaving out), got {args.circuit_refine_tokens}")
    if args.circuit_block < 1:
        ap.error(f"--circuit-block must be >= 1 (features tried together), got {args.circuit_block}")
    if not 0 <= args.circuit_max_mlp <= 1:
        ap.error(
            f"--circuit-max-mlp must be a share in [0, 1] of the original's MLP parameters, got {args.circuit_max_mlp}"
        )
    if args.recipe_keep_out and args.circuit_ablation != "zero" and not args.no_recipe:
        ap.error(
            "--recipe-keep-out holds left-out tokens at zero: give --circuit-ablation zero with it (the default, "
            "mean, reads them as the mean)"
        )
    runs_io.bench_main(args, NAME, Path(__file__), lambda: measure(args), print_tables)


def measure(args) -> Callable[[str, float, int], dict]:
    """One seed's `backdoor.run` with `args`; with --out, each seed's baseline rows (original, FT, FP, Scratch) also
    kept in `OUT.MODEL-RATIO-SEED.partial.json` as they are measured, so that a run stopped later does not redo them."""

    given = dict(soft=args.recipe_soft, unseen=args.recipe_unseen, seen=args.recipe_seen, anchor=args.recipe_anchor)
    given.update(hold=args.recipe_hold, flat=args.recipe_flat, keep_out=args.recipe_keep_out)
    given.update(code_anchor=args.recipe_code_anchor)
    for field, value in given.items():  # each checked alone, so that the message names the option at fault
        try:  # beside what the others need: a share scales a soft weight, a flat target goes on held prompts
            backdoor.Recipe(**{"soft": 1.0, "hold": 1, field: value})
        except ValueError as e:
            sys.exit(f"--recipe-{field.replace('_', '-')}: {e}")
    try:
        recipe = backdoor.Recipe(**given)
    except ValueError as e:  # an option without the one it needs: a share without a soft weight, flat without held
        needs = [f for f in ("unseen", "seen") if given[f] != 1 and not given["soft"]]
        sys.exit(f"--recipe-{(needs or ['flat'])[0]}: {e}")

    def one(model: str, ratio: float, seed: int) -> dict:
        kw = {"steps": args.steps, "log": runs_io.log, "device": args.device, "threads": args.threads}
        kw.update(recipe=None if args.no_recipe else recipe, refine_tokens=args.circuit_refine_tokens)
        kw.update(code_only=args.code_only, circuit_block=args.circuit_block, circuit_ablation=args.circuit_ablation)
        kw.update(circuit_judge=args.circuit_judge, circuit_max_mlp=args.circuit_max_mlp or None)
        if args.out:
            kw["resume"] = args.out.with_name(f"{args.out.stem}.{model}-{ratio}-{seed}.partial.json")
        return backdoor.run(model, ratio, seed, args.n_eval, args.n_trig, **kw)

    return one


if __name__ == "__main__":
    main()
