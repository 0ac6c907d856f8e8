"""Harvesting and transcoder-training throughput on testbed-m, 1 process against 2 (torch.distributed, gloo, launched
with torchrun), each process with cores / processes threads so both use the whole machine.

    python bench/distributed.py [--model testbed-m] [--prompts 2000] [--steps 60] [--json]

Harvest: tokens written to the sharded store per second (wall time of the slowest worker). Training: layer 0's
transcoder (width 8 x d_model, batch 1,024, 2 streams), optimiser steps per second and tokens per second, after a
warm-up of 5 steps. On 2 cores the speed-up is bounded by the cores, not by the design: report what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def worker(args) -> None:
    import torch

    from acg.compiler.distributed import _barrier, init_from_env, train_layer
    from acg.compiler.harvest import testbed_corpus
    from acg.compiler.shards import merge, read_manifest, write_part
    from acg.compiler.transcoder import FitConfig
    from acg.zoo.registry import load

    rank, world = init_from_env()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    model = load(args.model)
    corpus = testbed_corpus(args.prompts, seed=1000)
    store = Path(args.store)
    from acg.compiler.harvest import harvest

    harvest(model, corpus[:8])  # warm-up: the first forward pass pays for lazy initialisation
    _barrier()
    t0 = time.perf_counter()
    write_part(model, corpus, store, rank=rank, world=world, shard_tokens=args.shard_tokens)
    _barrier()
    harvest_s = time.perf_counter() - t0
    if rank == 0:
        merge(store, model, world)
    _barrier()
    tokens = read_manifest(store)["tokens"]
    warm = 5
    cfg = FitConfig(
        width=8 * model.cfg.d_model, kind="jumprelu", target_l0=30, steps=args.steps + warm, batch_size=1024
    )
    marks: dict[int, float] = {}

    def tick(step: int, mse: float, l0: float) -> None:  # steps after the warm-up are timed
        if step + 1 in (warm, cfg.steps):
            marks[step + 1] = time.perf_counter()

    _barrier()
    train_layer(store, 0, cfg, n_streams=2, progress=tick)
    train_s = marks[cfg.steps] - marks[warm]
    if rank == 0:
        print(
            json.dumps(
                {
                    "processes": world,
                    "threads_per_process": torch.get_num_threads(),
                    "tokens": tokens,
                    "harvest_seconds": harvest_s,
                    "harvest_tokens_per_second": tokens / harvest_s,
                    "train_steps": args.steps,
                    "train_seconds": train_s,
                    "train_steps_per_second": args.steps / train_s,
                    "train_tokens_per_second": args.steps * cfg.batch_size / train_s,
                }
            ),
            flush=True,
        )


def launch(args, nproc: int, store: Path) -> dict:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [__file__, "--worker", "--store", str(store), "--model", args.model, "--prompts", str(args.prompts)]
    cmd += ["--steps", str(args.steps), "--shard-tokens", str(args.shard_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"{nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed-m")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--shard-tokens", type=int, default=8192)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="acg-bench-dist-") as tmp:
        for nproc in (1, 2):
            rows.append(launch(args, nproc, Path(tmp) / f"store{nproc}"))
    one, two = rows
    doc = {
        "benchmark": "distributed",
        "model": args.model,
        "prompts": args.prompts,
        "rows": rows,
        "harvest_speedup": two["harvest_tokens_per_second"] / one["harvest_tokens_per_second"],
        "train_speedup": two["train_steps_per_second"] / one["train_steps_per_second"],
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return
    t = Table(title=f"{args.model}: {one['tokens']:,} tokens harvested, layer 0 trained {args.steps} steps")
    for col in ("processes", "threads each", "harvest tok/s", "train steps/s", "train tok/s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["processes"]),
            str(r["threads_per_process"]),
            f"{r['harvest_tokens_per_second']:,.0f}",
            f"{r['train_steps_per_second']:.2f}",
            f"{r['train_tokens_per_second']:,.0f}",
        )
    Console().print(t)
    Console().print(
        f"speed-up with 2 processes: harvest {doc['harvest_speedup']:.2f}x, training {doc['train_speedup']:.2f}x"
    )


if __name__ == "__main__":
    main()
