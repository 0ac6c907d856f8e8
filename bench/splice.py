"""Hypotheses for testbed features whose meaning the task fixes: for each bracket type, the layer-1 (and layer-0)
feature that best separates "the innermost open bracket is this type" from everything else on code.brackets
prompts, and the verdict of that rule as its hypothesis against the same rule for another bracket type.

    python bench/splice.py [--acg DIR] [--n 200] [--json]

Without --acg an ACG of testbed-s is fitted with the default FitSpec on 10,000 clean prompts (as the demo does).
Columns: the feature, how often it fires where the rule holds and elsewhere, `local_verdict` (1 - squared error /
squared value of the feature, every position) and the behavioural `verdict` (1 - KL(orig||spliced) / KL(orig||ablated)
at the answers; `-` where ablating the feature moves the answers by less than 1e-3 nats), right rule and wrong rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from acg.compiler import acg as acg_io
from acg.compiler.lower import lower
from acg.ir import interpret
from acg.ir.hypothesis import compiled
from acg.roundtrip.splice import measure, parse_part
from acg.zoo import vocab
from acg.zoo.tasks import heldout

OPEN = {"(": vocab.TOKEN_ID["("], "[": vocab.TOKEN_ID["["], "{": vocab.TOKEN_ID["{"]}
CLOSE = (vocab.TOKEN_ID[")"], vocab.TOKEN_ID["]"], vocab.TOKEN_ID["}"])
RULE = """def innermost(tokens):
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        stack = np.zeros(tokens.shape[1] + 1, dtype=np.int64)
        depth = 0
        for i in range(tokens.shape[1]):
            t = tokens[b, i]
            if t == OPENS:
                stack[depth] = t
                depth += 1
            elif (CLOSES) and depth > 0:
                depth -= 1
            if depth > 0 and stack[depth - 1] == KIND:
                out[b, i] = SCALE
    return out
"""


def rule(kind: int, scale: float) -> tuple[str, str]:
    opens = " or t == ".join(str(v) for v in OPEN.values())
    closes = " or ".join(f"t == {c}" for c in CLOSE)
    src = RULE.replace("OPENS", opens).replace("CLOSES", closes).replace("KIND", str(kind))
    return src.replace("SCALE", repr(scale)), "innermost"


def fitted(path: Path | None):
    if path is not None:
        return acg_io.load(path)
    from acg.compiler.fit import FitSpec, fit
    from acg.compiler.harvest import testbed_corpus
    from acg.zoo.registry import load

    acg, _ = fit(load("testbed-s"), testbed_corpus(10_000, seed=1000), FitSpec(), meta={"model": "testbed-s"})
    return acg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acg", type=Path, help="an ACG of testbed-s (default: fit one)")
    ap.add_argument("--n", type=int, default=200, help="code.brackets prompts to find the features and to measure on")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    acg = fitted(args.acg)
    graph = lower(acg, keep_errors=True, dtype="float64")
    find, data = heldout("code.brackets", args.n, 0), {"code.brackets": heldout("code.brackets", args.n, 1)}
    acts: dict[int, list[np.ndarray]] = {layer: [] for layer in range(acg.cfg.n_layers)}
    truth: dict[str, list[np.ndarray]] = {k: [] for k in OPEN}
    for ex in find:
        tokens = np.array([ex.ids])
        env = interpret.run(graph, tokens, keep=True)
        for layer in acts:
            acts[layer].append(env[f"mlp{layer}"][0])
        for k, v in OPEN.items():
            truth[k].append(compiled(*rule(v, 1.0))(tokens)[0] > 0)
    rows = []
    kinds = list(OPEN)
    for layer in acts:
        X = np.concatenate(acts[layer])
        for n, k in enumerate(kinds):
            on = np.concatenate(truth[k])
            f = int(np.argmax((X[on] > 0).mean(0) - (X[~on] > 0).mean(0)))
            scale = float(X[on, f].mean())
            wrong = kinds[(n + 1) % len(kinds)]
            part = parse_part(f"L{layer}.f{f}", acg)
            right_r = measure(acg, part, rule(OPEN[k], scale), data)
            wrong_r = measure(acg, part, rule(OPEN[wrong], scale), data)
            rows.append(
                {
                    "part": part.name,
                    "rule": f"innermost open bracket is {k}",
                    "wrong_rule": f"innermost open bracket is {wrong}",
                    "fires_where_rule_holds": float((X[on, f] > 0).mean()),
                    "fires_elsewhere": float((X[~on, f] > 0).mean()),
                    "scale": scale,
                    "local_verdict": right_r["local_verdict"],
                    "verdict": right_r["verdict"],
                    "kl_ablated": right_r["kl_ablated"],
                    "wrong_local_verdict": wrong_r["local_verdict"],
                    "wrong_verdict": wrong_r["verdict"],
                }
            )
            print(
                f"{part.name}: {k} {right_r['local_verdict']:.3f} / {wrong} {wrong_r['local_verdict']:.3f}",
                file=sys.stderr,
            )
    doc = {"benchmark": "splice", "seconds": time.perf_counter() - start, "n": args.n, "rows": rows}
    if args.json:
        print(json.dumps(doc, indent=1))
        return
    t = Table(title=f"hypotheses for bracket-type features of testbed-s ({args.n} code.brackets prompts)")
    for col in (
        "part",
        "rule",
        "fires (rule / else)",
        "local verdict",
        "verdict",
        "kl ablated",
        "wrong: local",
        "verdict",
    ):
        t.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        t.add_row(
            r["part"],
            r["rule"],
            f"{r['fires_where_rule_holds']:.2f} / {r['fires_elsewhere']:.2f}",
            fmt(r["local_verdict"]),
            fmt(r["verdict"]),
            f"{r['kl_ablated']:.1e}",
            fmt(r["wrong_local_verdict"]),
            fmt(r["wrong_verdict"]),
        )
    Console().print(t)


if __name__ == "__main__":
    main()
