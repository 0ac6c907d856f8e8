"""Fitting an ACG: wall time by stage, harvested tokens per second, per-layer `l0` / nmse / dead fraction, and the
replacement model's `agreement`, `kl` and `task_acc` (all MLPs replaced at once, errors dropped), for the testbed
models; side by side, SAELens's BatchTopK trainer on the same layer-0 activations, width, batch and steps.

    python bench/fit.py [--models testbed-s] [--no-peers] [--json]

SAELens runs in `.venv-peers` (made on first use, as bench/attribution.py does). It trains SAEs, not transcoders, so
the comparison is of training throughput on identical inputs and sizes, and of reconstruction quality for what each
reconstructs (FVU of its own target).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from acg.cli import layer_table
from acg.compiler.fit import FitSpec, fit
from acg.compiler.harvest import harvest, testbed_corpus
from acg.compiler.replacement import replacement_fidelity
from acg.compiler.transcoder import FitConfig, evaluate_transcoder, fit_transcoder
from acg.zoo.registry import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import ensure_peers  # noqa: E402

N_PROMPTS = 10_000


def bench_model(name: str, peers: bool) -> dict:
    torch.set_num_threads(2)
    model = load(name)
    corpus = testbed_corpus(N_PROMPTS, seed=1000)
    spec = FitSpec()
    acg, stats = fit(model, corpus, spec, progress=sys.stderr.isatty())
    fidelity = replacement_fidelity(model, acg.transcoders, n=2000)
    out = {
        "model": name,
        "spec": asdict(spec),
        "n_prompts": N_PROMPTS,
        "n_tokens": stats["n_tokens"],
        "seconds": stats["seconds"],
        "tokens_per_second_harvest": stats["tokens_per_second_harvest"],
        "layers": stats["layers"],
        "agreement": fidelity["agreement"],
        "kl": fidelity["kl"],
        "task_acc": fidelity["task_acc"],
        "task_acc_original": fidelity["task_acc_original"],
    }
    # Layer 0 alone, acg's layer-local trainer against SAELens's, on the same activations.
    acts = harvest(model, corpus, progress=False)
    x, y = np.asarray(acts.mlp_in[0], np.float32), np.asarray(acts.mlp_out[0], np.float32)
    width = spec.width or 8 * model.cfg.d_model
    fc = FitConfig(width=width, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, target_l0=spec.target_l0)
    start = time.perf_counter()
    tc, _ = fit_transcoder(x, y, fc)
    ours_s = time.perf_counter() - start
    m = evaluate_transcoder(tc, x, y)
    tokens = spec.steps * spec.batch_size
    out["layer0"] = {
        "acg": {"seconds": ours_s, "tokens_per_second": tokens / ours_s, "fvu": m["nmse"], "l0": m["l0"]},
        "width": width,
        "steps": spec.steps,
        "batch": spec.batch_size,
    }
    if peers:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "acts.npy", x)
            py = ensure_peers()
            script = Path(__file__).resolve().parent / "peers" / "saelens_fit.py"
            args = [py, script, Path(tmp) / "acts.npy", "--width", width, "--k", spec.target_l0]
            args += ["--steps", spec.steps, "--batch", spec.batch_size, "--lr", spec.lr]
            run = subprocess.run([str(a) for a in args], capture_output=True, text=True)
            if run.returncode:
                out["layer0"]["sae-lens"] = {"error": run.stderr.strip().splitlines()[-1:]}
            else:
                out["layer0"]["sae-lens"] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="testbed-s")
    ap.add_argument("--no-peers", action="store_true", help="skip the SAELens side")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [bench_model(m, not args.no_peers) for m in args.models.split(",")]
    if args.json:
        print(json.dumps({"benchmark": "fit", "results": results}, indent=2))
        return
    console = Console()
    for r in results:
        s = r["seconds"]
        table = Table(title=f"ACG fit of {r['model']} ({r['n_tokens']:,} tokens, 2 threads): {s['total']:.0f} s")
        for col in ("stage", "seconds"):
            table.add_column(col, justify="right")
        for stage, sec in s.items():
            table.add_row(stage, f"{sec:.1f}")
        console.print(table)
        console.print(layer_table(r["layers"], "per layer"))
        console.print(
            f"replacement: agreement {r['agreement']:.4f}, kl {r['kl']:.4f}; task_acc "
            + ", ".join(f"{t} {v:.3f} (orig {r['task_acc_original'][t]:.3f})" for t, v in r["task_acc"].items())
        )
        l0 = r["layer0"]
        side = Table(title=f"layer 0, width {l0['width']}, {l0['steps']} steps x {l0['batch']} tokens")
        for col in ("trainer", "seconds", "tokens/s", "FVU", "l0"):
            side.add_column(col, justify="right")
        for tool in ("acg", "sae-lens"):
            if tool in l0 and "seconds" in l0[tool]:
                t = l0[tool]
                side.add_row(
                    tool, f"{t['seconds']:.1f}", f"{t['tokens_per_second']:,.0f}", f"{t['fvu']:.3f}", f"{t['l0']:.1f}"
                )
        console.print(side)


if __name__ == "__main__":
    main()
