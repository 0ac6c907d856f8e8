"""Compile time per backend and forward throughput at batch 1 and batch 64, against the original torch model, for the
testbed models; exactness (max_abs_err vs the original) alongside. Ratios come from one run (the machine is noisy).

    python bench/backends.py [--models testbed-s,testbed-m] [--dtype float32] [--warm-cache] [--json]

Numba's kernels are compiled into a fresh cache folder unless `--warm-cache` is given, so the first model's
`load_and_first_call_s` includes the JIT (later models reuse the kernels compiled for the same dtypes in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from acg import codegen
from acg.compiler.frontend import load

BATCHES = (1, 64)


def _time(fn, tokens, min_seconds: float = 1.0, max_iters: int = 2000) -> float:
    """Seconds per call: the median of 5 rounds, each long enough to be measurable."""
    fn(tokens)  # warm up (and JIT)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds / 5 and n < max_iters:
        fn(tokens)
        n += 1
    n = max(n, 1)
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(tokens)
        rounds.append((time.perf_counter() - t0) / n)
    return float(np.median(rounds))


def bench_model(name: str, dtype: str, seq: int, root: Path) -> dict:
    torch.set_num_threads(2)
    loaded = load(name, dtype)
    vocab = loaded.graph.meta["config"]["d_vocab"]
    rng = np.random.default_rng(0)
    tokens = {b: rng.integers(0, vocab, (b, seq)) for b in BATCHES}
    out = {"model": name, "dtype": dtype, "seq": seq, "backends": {}}
    torch_s = {b: _time(loaded.original, tokens[b]) for b in BATCHES}
    out["backends"]["torch-original"] = {f"batch{b}_s": torch_s[b] for b in BATCHES}
    for backend in codegen.BACKENDS:
        t0 = time.perf_counter()
        path = codegen.compile(loaded.graph, root / f"{name}-{backend}", backend)
        generate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        forward = codegen.load(path)
        first = forward(tokens[1])  # includes the JIT for numba on a cold cache
        load_s = time.perf_counter() - t0
        err = max(float(np.abs(np.asarray(forward(tokens[b])) - loaded.original(tokens[b])).max()) for b in BATCHES)
        del first
        row = {"generate_s": generate_s, "load_and_first_call_s": load_s, "max_abs_err": err}
        for b in BATCHES:
            s = _time(forward, tokens[b])
            row[f"batch{b}_s"] = s
            row[f"batch{b}_speedup_vs_torch"] = torch_s[b] / s
        out["backends"][backend] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="testbed-s,testbed-m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--warm-cache", action="store_true", help="use the usual Numba cache (default: a cold one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="acg-bench-"))
    if not args.warm_cache:
        os.environ["ACG_NUMBA_DIR"] = str(root / "numba-cache")
    try:
        results = [bench_model(m, args.dtype, args.seq, root) for m in args.models.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"benchmark": "backends", "results": results}, indent=2))
        return
    table = Table(title=f"backends vs the original torch model ({args.dtype}, seq {args.seq}, 2 threads)")
    for col in (
        "model",
        "backend",
        "generate s",
        "load+1st call s",
        "batch 1 ms",
        "x torch",
        "batch 64 ms",
        "x torch",
        "max_abs_err",
    ):
        table.add_column(col, justify="right")
    for r in results:
        for backend, row in r["backends"].items():
            table.add_row(
                r["model"],
                backend,
                f"{row.get('generate_s', 0):.2f}",
                f"{row.get('load_and_first_call_s', 0):.2f}",
                f"{row['batch1_s'] * 1e3:.3f}",
                f"{row.get('batch1_speedup_vs_torch', 1):.2f}",
                f"{row['batch64_s'] * 1e3:.2f}",
                f"{row.get('batch64_speedup_vs_torch', 1):.2f}",
                f"{row.get('max_abs_err', 0):.1e}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
