"""Train the testbed models from their seeds and report wall time and the figures `acg zoo eval` reports.

    python bench/zoo_train.py                      # all models, a table
    python bench/zoo_train.py --models testbed-s --json
    python bench/zoo_train.py --out zoo/weights    # (re)write the shipped weights

Each model trains on 2 threads (the spec fixes it); run on a quiet machine, one model at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from acg.compiler.transformer import save_checkpoint
from acg.roundtrip.evaluate import evaluate
from acg.zoo.registry import ZOO, get
from acg.zoo.train import train


def run(name: str, out_root: Path, device: str = "cpu", **overrides) -> dict:
    spec = get(name)
    train_spec = dataclasses.replace(spec.train, **overrides)
    model, record = train(spec.cfg, train_spec, progress=sys.stderr.isatty(), device=device)
    figures = evaluate(model)
    n_params = sum(p.numel() for p in model.parameters())
    out = save_checkpoint(
        model, out_root / name, metadata={"name": name, **record, "eval": figures, "n_params": n_params}
    )
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    shipped = spec.path / "model.safetensors"
    return {
        "model": name,
        "device": record["device"],
        "train_seconds": record["train_seconds"],
        "steps": train_spec.steps,
        "batch_size": train_spec.batch_size,
        "overrides": overrides,
        "n_params": n_params,
        **figures,
        "sha256": digest,
        "identical_to_shipped": shipped.exists() and hashlib.sha256(shipped.read_bytes()).hexdigest() == digest,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--out", type=Path, default=None, help="where checkpoints go (default: a temporary folder)")
    ap.add_argument("--device", default="cpu", help="torch device (the shipped weights say which trained them)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a TrainSpec field (experiments)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    with tempfile.TemporaryDirectory() as tmp:
        out_root = args.out or Path(tmp)
        results = [run(name, out_root, args.device, **overrides) for name in args.models.split(",")]
    if args.json:
        print(json.dumps({"benchmark": "zoo_train", "results": results}, indent=2))
        return
    table = Table(title=f"testbed training ({args.device})")
    for col in (
        "model",
        "seconds",
        "params",
        *next(iter(results))["task_acc"],
        "asr token/conj/phrase",
        "false trigger conj/phrase",
    ):
        table.add_column(col)
    for r in results:
        table.add_row(
            r["model"],
            f"{r['train_seconds']:.0f}",
            f"{r['n_params']:,}",
            *(f"{v:.3f}" for v in r["task_acc"].values()),
            "/".join(f"{v:.3f}" for v in r["asr"].values()),
            "/".join(f"{r['false_trigger'][f]:.3f}" for f in ("conj", "phrase")),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
