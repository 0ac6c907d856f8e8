"""Which parameters must the recipe train? The full ACG's blocked round trip fine-tuned by `bench/backdoor.py`'s recipe
with parameter sets left untrained, side by side, on one defender's clean budget per seed.

    python bench/recipe_freeze.py [--models testbed-s] [--ratios 0.01] [--seeds 0,1,2] [--sets nothing,layer-0 QK]
                                  [--lrs 2e-4,1e-4] [--softs 0,1] [--unseens 1,0] [--seens 1,0]
                                  [--anchors 0,1] [--json] [--out FILE]
    python bench/recipe_freeze.py --merge A.json B.json ... [--out FILE] [--markdown]

The recipe (confirmed insertions + the budget, the FT baseline's steps) takes the backdoor pathways out of the blocked
round trip, and on testbed-s at 1% it costs `code.brackets` about 2 points. Layer 0's attention scores are where the
round trip blocks the QK pairs the budget never used; the sets (`backdoor.FREEZE_SETS`) are nothing, layer 0's
W_Q/W_K/b_Q/b_K, the embeddings (W_E, W_pos; and each alone), and all of those with layer 0's first norm (its
"table"); `--lrs` fine-tunes each set at each learning rate (default: the recipe's), `--softs` with each weight of
the captured IR's answer distribution against the labels on the prompts with insertions (`backdoor.recipe_targets`;
default 0: the labels alone, the recipe's), `--unseens` with each share of a soft weight kept on the insertions that
hold a token the fit never saw (`backdoor.Recipe.unseen`; default 1: all of it; the labels take none), `--seens` on
the other insertions (`backdoor.Recipe.seen`; `--unseens 1 --seens 0`: soft targets where a never-seen token went in
and nowhere else), `--anchors`
with each weight that holds the round trip's own block outputs on the budget's clean prompts (`backdoor.anchor_kw`;
default 0: none, the recipe's). Rows: the original, the blocked round trip before fine-tuning, then one per set,
rate and weights; columns as
`bench/backdoor.py`'s (task_acc per task, asr and DER per family, mean over seeds +- the standard deviation,
n_params).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

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
    runs_io.add_options(ap, ratios="0.01")
    ap.add_argument("--sets", default=",".join(backdoor.FREEZE_SETS), help="which of backdoor.FREEZE_SETS, in order")
    ap.add_argument("--lrs", default=f"{defence.FT_LR:g}", help="fine-tuning learning rates, each set at each")
    ap.add_argument("--softs", default="0", help="soft-target weights in [0, 1] on the insertions, each at each rate")
    ap.add_argument("--unseens", default="1", help="shares in [0, 1] of each soft weight on never-seen insertions")
    ap.add_argument("--seens", default="1", help="shares in [0, 1] of each soft weight on the other insertions")
    ap.add_argument("--anchors", default="0", help="anchor weights >= 0 on the budget's prompts, each at each of those")
    args = ap.parse_args()
    runs_io.bench_main(args, NAME, Path(__file__), lambda: measure(args), print_table)


def measure(args) -> Callable[[str, float, int], dict]:
    """One seed's `backdoor.freeze_run` with `args`' sets and a recipe per rate, soft-target and anchor weight (each
    with each; refused, with the reason, before any work)."""
    unknown = [s for s in args.sets.split(",") if s not in backdoor.FREEZE_SETS]
    if unknown:
        sys.exit(f"--sets: no such set {unknown}; the sets are {list(backdoor.FREEZE_SETS)}")
    sets = {s: backdoor.FREEZE_SETS[s] for s in args.sets.split(",")}
    given = (
        ("--lrs", args.lrs),
        ("--softs", args.softs),
        ("--unseens", args.unseens),
        ("--seens", args.seens),
        ("--anchors", args.anchors),
    )
    lrs, softs, unseens, seens, anchors = (numbers(text, option) for option, text in given)
    product = itertools.product(lrs, softs, unseens, seens, anchors)
    options = [(r, s, u, n, a) for r, s, u, n, a in product if s or u == n == 1]  # the labels take no share
    if not options:
        sys.exit("--unseens / --seens: a share below 1 scales a soft weight, and --softs gives none above 0")
    try:
        recipes = [backdoor.Recipe(lr=r, soft=s, unseen=u, seen=n, anchor=a) for r, s, u, n, a in options]
    except ValueError as e:
        sys.exit(f"--lrs / --softs / --unseens / --seens / --anchors: {e}")

    def one(model: str, ratio: float, seed: int) -> dict:
        kw = {"sets": sets, "recipes": recipes, "threads": args.threads, "log": runs_io.log}
        return backdoor.freeze_run(model, ratio, seed, args.n_eval, args.n_trig, **kw)

    return one


def numbers(text: str, option: str) -> list[float]:
    """`option`'s comma-separated numbers, each given once; exits with what is wrong otherwise."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        sys.exit(f"{option}: not a list of numbers: {text!r}")
    if len(set(values)) < len(values):
        sys.exit(f"{option}: each number given once: {text!r}")
    return values


if __name__ == "__main__":
    main()
