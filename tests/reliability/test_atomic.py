"""Atomic outputs under signals: the real CLI, in a subprocess, paused just before it commits an artefact (or between
moving the old one aside and the new one in) and killed there. The previous artefact must be intact, byte for byte;
SIGTERM must leave no debris at all; SIGKILL's debris (it cannot clean up) must be swept, and a half-swapped artefact
put back, by the next reader or writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import random_model

from acg import codegen
from acg.compiler import acg as acg_io
from acg.compiler.transformer import load_checkpoint, save_checkpoint
from acg.ir import serialize
from acg.ir.atomic import atomic_file


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    model = random_model(seed=21, d_vocab=11, n_ctx=8, act_fn="relu")
    ckpt = save_checkpoint(model, root / "ckpt")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(rng.integers(0, 11, 6).tolist()) + "\n" for _ in range(40)))
    return root, ckpt, corpus


def _commands(root: Path, ckpt: Path, corpus: Path) -> dict[str, tuple[list[str], Path, callable]]:
    fit = ["fit", str(ckpt), "--corpus", str(corpus), "--width", "8", "--steps", "5", "--e2e-steps", "0"]
    return {
        "compiled module": (
            ["compile", str(ckpt), "--backend", "python", "-o"],
            root / "out-py",
            codegen.read_manifest,
        ),
        "IR folder": (["compile", str(ckpt), "-o", str(root / "unused"), "--save-ir"], root / "out-ir", serialize.load),
        "ACG folder": ([*fit, "--target-l0", "2", "-o"], root / "out-acg", acg_io.load),
        "checkpoint": (
            ["roundtrip", str(ckpt), "--acg", str(root / "acg0"), "--all", "-o"],
            root / "out-ckpt",
            load_checkpoint,
        ),
    }


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _debris(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _run(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "acg", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_at(args: list[str], point: str, sig: int, mark: Path) -> None:
    mark.unlink(missing_ok=True)
    proc = _run(args, {"ACG_FAILPOINT": f"{point}:60", "ACG_FAILPOINT_MARK": str(mark)})
    deadline = time.time() + 120
    while not mark.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the writer never reached the failpoint"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0


@pytest.mark.parametrize("kind", ["compiled module", "IR folder", "ACG folder", "checkpoint"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_write_keeps_the_previous_artefact(world, kind, sig):
    root, ckpt, corpus = world
    if not (root / "acg0").exists():
        fit = ["fit", str(ckpt), "--corpus", str(corpus), "--width", "8", "--steps", "5", "--e2e-steps", "0"]
        assert _run([*fit, "--target-l0", "2", "-o", str(root / "acg0")]).wait() == 0
    args, out, load = _commands(root, ckpt, corpus)[kind]
    args = [*args, str(out)]
    if not out.exists():
        assert _run(args).wait() == 0
    before = _snapshot(out)
    _kill_at(args, "before-commit", sig, root / "mark")
    assert _snapshot(out) == before  # intact, byte for byte
    load(out)  # and it still loads (content hashes checked)
    if sig == signal.SIGTERM:
        assert _debris(out) == []  # cleaned up on the way out
    else:
        assert _debris(out), "SIGKILL cannot clean up; the next writer must"
        assert _run(args).wait() == 0
        assert _debris(out) == [] and _snapshot(out) == before  # swept; the same inputs give the same bytes


def test_a_kill_between_the_two_renames_is_repaired_by_the_next_reader(world):
    root, ckpt, corpus = world
    args, out, _ = _commands(root, ckpt, corpus)["compiled module"]
    out = root / "swap-py"
    args = [*args, str(out)]
    assert _run(args).wait() == 0
    before = _snapshot(out)
    _kill_at(args, "between-renames", signal.SIGKILL, root / "mark2")
    assert not out.exists()  # the old artefact was moved aside, the new one not yet in
    codegen.read_manifest(out)  # a reader puts the previous one back
    assert _snapshot(out) == before and _debris(out) == []


def test_a_killed_report_write_keeps_the_previous_file(tmp_path):
    """The HTML report (and every single-file output) goes through atomic_file."""
    target = tmp_path / "report.html"
    with atomic_file(target) as f:
        f.write("previous report")
    code = (
        "import sys\nfrom acg.ir.atomic import atomic_file\n"
        f"with atomic_file({str(target)!r}) as f:\n    f.write('half' * 1000)\n"
    )
    mark = tmp_path / "mark"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "ACG_FAILPOINT": "before-commit:60", "ACG_FAILPOINT_MARK": str(mark)},
    )
    while not mark.exists():
        assert proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert target.read_text() == "previous report" and _debris(target)
    with atomic_file(target) as f:  # the next write sweeps the dead writer's temporary
        f.write("next report")
    assert target.read_text() == "next report" and _debris(target) == []
