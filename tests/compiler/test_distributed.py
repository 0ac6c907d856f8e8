"""Fitting beyond one process: a sharded activation store written by two workers, a transcoder trained by two gloo
processes under torchrun that matches a one-process run on the same streams, and a run killed (SIGKILL) between
checkpoints that resumes and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_model

from acg.compiler.shards import ShardError, merge, read_manifest, streams, write_part

RUN = r"""
import os, sys, torch
import torch.distributed as dist
from acg.compiler.distributed import exit_now, leave_group, train_layer
from acg.compiler.transcoder import FitConfig
torch.set_num_threads(1)
folder, out, ckpt = sys.argv[1], sys.argv[2], (sys.argv[3] if sys.argv[3] != "-" else None)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
cfg = FitConfig(width=32, kind="jumprelu", target_l0=4, steps=120, batch_size=64, lr=2e-3, seed=3, resample_every=50)
module, info = train_layer(folder, 0, cfg, n_streams=2, checkpoint=ckpt, checkpoint_every=20)
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out)
leave_group()  # together: a rank that exits while the other still holds the group can abort in gloo's teardown
exit_now()  # and without the interpreter's finalisation, where gloo's threads can still abort (rarely)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = random_model(seed=5, d_vocab=13, n_ctx=10, act_fn="relu")
    rng = np.random.default_rng(0)
    corpus = [rng.integers(0, 13, rng.integers(3, 10)).tolist() for _ in range(400)]
    for rank in range(2):  # two workers, disjoint slices (here one after the other)
        write_part(model, corpus, root / "store", rank=rank, world=2, shard_tokens=300)
    merge(root / "store", model, 2)
    (root / "run.py").write_text(RUN)
    return root, model, corpus


def _train(root: Path, out: str, ckpt: str = "-", nproc: int = 1, env: dict | None = None) -> subprocess.Popen:
    if nproc == 1:
        cmd = [sys.executable, str(root / "run.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd.append(str(root / "run.py"))
    return subprocess.Popen(
        [*cmd, str(root / "store"), str(root / out), ckpt],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _why(proc: subprocess.Popen | subprocess.CompletedProcess) -> str:
    """A failed run's stderr: torchrun's summary comes last, a rank's own error (what aborted it) before it."""
    text = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.read().decode()
    return text if len(text) <= 12_000 else f"{text[:6000]}\n[...]\n{text[-6000:]}"


def _same(a: Path, b: Path, atol: float) -> None:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x.keys() == y.keys()
    for k in x:
        assert (x[k] - y[k]).abs().max().item() <= atol, k


def test_the_store_covers_the_corpus_once_and_streams_are_seeded(store):
    root, model, corpus = store
    manifest = read_manifest(root / "store", model)
    assert manifest["tokens"] == sum(map(len, corpus)) and manifest["workers"] == 2
    assert [s["index"] for s in manifest["shards"]] == list(range(len(manifest["shards"])))
    alone = write_part(model, corpus, root / "alone", shard_tokens=300)  # one worker writes the same shards
    assert [s["tokens"] for s in alone["shards"]] == [s["tokens"] for s in manifest["shards"]]
    for s in manifest["shards"]:
        assert (root / "alone" / s["file"]).read_bytes() == (root / "store" / s["file"]).read_bytes()
    # a stopped harvest resumes: written shards are kept (same bytes, same mtime), a missing one is harvested again
    first, last = root / "alone" / alone["shards"][0]["file"], root / "alone" / alone["shards"][-1]["file"]
    stamp = first.stat().st_mtime_ns
    last.unlink()
    again = write_part(model, corpus, root / "alone", shard_tokens=300)
    assert again == alone and first.stat().st_mtime_ns == stamp and last.exists()
    a, b = streams(root / "store", 0, 2, seed=1, ids=[0])[0], streams(root / "store", 0, 2, seed=1, ids=[0])[0]
    x1, _ = a.batch(500)  # crosses shard boundaries
    x2, _ = b.batch(500)
    assert torch.equal(x1, x2)
    state = a.state()
    next_a, _ = a.batch(64)
    b.restore(state)
    assert torch.equal(b.batch(64)[0], next_a)  # a position is all a stream needs to resume
    other = random_model(seed=6, d_vocab=13, n_ctx=10, act_fn="relu")
    with pytest.raises(ShardError, match="another model"):
        read_manifest(root / "store", other)


def test_two_gloo_processes_match_one_process(store):
    root, _, _ = store
    one = _train(root, "one.pt")
    assert one.wait(timeout=600) == 0, _why(one)
    two = _train(root, "two.pt", nproc=2)
    assert two.wait(timeout=600) == 0, _why(two)
    _same(root / "one.pt", root / "two.pt", atol=1e-5)


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(store):
    root, _, _ = store
    if not (root / "one.pt").exists():
        assert _train(root, "one.pt").wait(timeout=600) == 0
    ckpt = root / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    mark = root / "mark"
    # pause at the third checkpoint (step 60), before it is committed: the last one on disk is step 40
    proc = _train(
        root, "resumed.pt", str(ckpt), env={"ACG_FAILPOINT": "before-commit:60:3", "ACG_FAILPOINT_MARK": str(mark)}
    )
    deadline = time.time() + 300
    while not mark.exists():
        assert proc.poll() is None, _why(proc)
        assert time.time() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert torch.load(ckpt / "state.pt", weights_only=True)["step"] == 40
    assert not (root / "resumed.pt").exists()
    again = _train(root, "resumed.pt", str(ckpt))
    assert again.wait(timeout=600) == 0, _why(again)
    _same(root / "one.pt", root / "resumed.pt", atol=0.0)  # exactly


def test_acg_fit_distributed_under_torchrun_data_and_layer_parallel(store, tmp_path):
    """`acg fit --distributed` with 2 gloo processes, data-parallel and layer-parallel, end-to-end fine-tuning
    included, against 1 process: the same dictionaries up to the order of floating-point sums (tolerance 1e-5;
    measured about 1e-7)."""
    import json as _json

    from acg.compiler import acg as acg_io
    from acg.compiler.transformer import save_checkpoint

    model = random_model(seed=5, d_vocab=13, n_ctx=10, act_fn="relu")
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(_json.dumps(rng.integers(0, 13, rng.integers(3, 10)).tolist()) + "\n" for _ in range(300))
    )
    args = ["fit", str(ckpt), "--corpus", str(corpus), "--distributed", "--width", "16", "--steps", "30"]
    args += ["--e2e-steps", "10", "--target-l0", "3", "--streams", "2", "--shard-tokens", "400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "acg"]
    runs = {
        "one": [sys.executable, "-m", "acg", *args, "-o", str(tmp_path / "one")],
        "data": [*launch, *args, "-o", str(tmp_path / "data")],
        "layers": [*launch, *args, "--parallel", "layers", "-o", str(tmp_path / "layers")],
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (name, _why(proc))
    one = acg_io.load(tmp_path / "one")
    for name in ("data", "layers"):
        other = acg_io.load(tmp_path / name)
        assert other.meta["distributed"]["world"] == 2 and other.meta["distributed"]["parallel"] == name
        for a, b in zip(one.transcoders, other.transcoders, strict=True):
            for k, v in a.tensors().items():
                assert np.abs(v - b.tensors()[k]).max() <= 1e-5, (name, k)


def test_statistics_from_the_store_are_those_of_a_harvest(store):
    """Rank 0 builds the ACG from the store's statistics (no second harvest): the same usage counts, layer metrics,
    labels and pair statistics as `fit` computes from a harvest, for the same dictionaries."""
    from acg.compiler.distributed import _assemble, train_layer
    from acg.compiler.fit import FitSpec, fit
    from acg.compiler.transcoder import FitConfig, to_transcoder

    root, model, corpus = store
    spec = FitSpec(width=16, steps=20, e2e_steps=0, target_l0=3, usage_prompts=50)
    cfg = FitConfig(width=16, kind="jumprelu", target_l0=3, steps=20, batch_size=64, seed=1)
    tcs = [to_transcoder(train_layer(root / "store", layer, cfg, n_streams=2)[0], cfg) for layer in range(2)]
    ours, _ = _assemble(model, corpus, spec, tcs, root / "store", {"distributed": {}})
    theirs, _ = fit(model, corpus, spec, transcoders=tcs, progress=False)
    assert ours.usage.keys() == theirs.usage.keys()
    for k in ours.usage:
        np.testing.assert_allclose(ours.usage[k], theirs.usage[k], rtol=1e-5, atol=1e-4, err_msg=k)
    for a, b in zip(ours.stats["layers"], theirs.stats["layers"], strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1, abs(b[k])) for k in a), (a, b)
    assert ours.labels == theirs.labels
    assert ours.stats["n_tokens"] == theirs.stats["n_tokens"]
