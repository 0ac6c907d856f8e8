"""Same inputs and seed, two separate processes: byte-identical ACG folder, IR folders (dense and feature-level),
readable circuit and every backend's artefact, and a checkpoint from the round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import random_model

from acg.compiler.transformer import save_checkpoint

SCRIPT = r"""
import sys
from pathlib import Path
from acg.cli import main
ckpt, corpus, out = map(Path, sys.argv[1:4])
fit = ["--corpus", str(corpus), "--width", "16", "--steps", "20", "--e2e-steps", "5", "--target-l0", "3", "--seed", "7"]
assert main(["fit", str(ckpt), "-o", str(out / "acg"), *fit]) == 0
for backend in ("python", "numba", "torch", "onnx"):
    assert main(["compile", str(ckpt), "--backend", backend, "-o", str(out / f"dense-{backend}"),
                 "--save-ir", str(out / "ir-dense")]) == 0
    assert main(["compile", str(ckpt), "--acg", str(out / "acg"), "--keep-errors", "--backend", backend,
                 "-o", str(out / f"exact-{backend}"), "--save-ir", str(out / "ir-exact")]) == 0
assert main(["compile", str(ckpt), "--acg", str(out / "acg"), "--top", "4", "--max-terms", "4",
             "-o", str(out / "circuit")]) == 0
assert main(["roundtrip", str(ckpt), "--acg", str(out / "acg"), "--all", "-o", str(out / "rt")]) == 0
"""


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_two_processes_write_the_same_bytes(tmp_path):
    ckpt = save_checkpoint(random_model(seed=51, d_vocab=11, n_ctx=8, act_fn="relu"), tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(rng.integers(0, 11, 7).tolist()) + "\n" for _ in range(60)))
    runs = []
    out = tmp_path / "out"  # the same paths both times: same inputs (the round trip records where it came from)
    for name in ("a", "b"):
        out.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(ckpt), str(corpus), str(out)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(_files(out))
        out.rename(tmp_path / name)
    a, b = runs
    assert a.keys() == b.keys() and len(a) > 30
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ == [], differ
