"""Resource guards: a fit or compilation whose estimate exceeds the memory available is refused before it starts,
naming the sizes and the flag that overrides; the estimate's largest part is the real size of what it counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_model

from acg.cli import main
from acg.compiler.fit import FitSpec
from acg.compiler.harvest import harvest
from acg.compiler.transformer import save_checkpoint
from acg.ir import resources
from acg.ir.resources import ResourceError, check, fit_estimate


@pytest.fixture()
def tiny_machine(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 200_000_000)  # 200 MB free


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    ckpt = save_checkpoint(random_model(seed=61, d_vocab=11, n_ctx=8, act_fn="relu"), root / "ckpt")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(rng.integers(0, 11, 6).tolist()) + "\n" for _ in range(30)))
    return root, ckpt, corpus


@pytest.mark.parametrize("command", ["fit", "compile"])
def test_too_big_for_the_machine_is_refused_before_it_starts(tiny_machine, inputs, tmp_path, capsys, command):
    root, ckpt, corpus = inputs
    if command == "fit":
        argv = [
            "fit",
            str(ckpt),
            "--corpus",
            str(corpus),
            "--steps",
            "3",
            "--e2e-steps",
            "0",
            "-o",
            str(tmp_path / "o"),
        ]
    else:
        argv = ["compile", str(ckpt), "-o", str(tmp_path / "o")]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "at peak" in err and "0.2 GB available" in err and "--no-memory-check" in err
    assert not (tmp_path / "o").exists()
    assert main(["--no-memory-check", *argv]) == 0  # the user knows better
    assert (tmp_path / "o").exists()
    assert main(argv) == 2  # the override lasts one command
    capsys.readouterr()


def test_the_estimate_counts_what_the_fit_holds(inputs):
    from acg.compiler.transformer import load_checkpoint

    root, ckpt, corpus = inputs
    model = load_checkpoint(ckpt)
    seqs = [json.loads(line) for line in corpus.read_text().splitlines()]
    acts = harvest(model, seqs, progress=False)
    real = sum(a.nbytes for a in acts.mlp_in) + sum(a.nbytes for a in acts.mlp_out)
    est = fit_estimate(model.cfg, FitSpec(), acts.n_tokens)
    assert est.parts["harvested activations"] == real
    assert est.parts["one layer's training tensors"] == 2 * real / model.cfg.n_layers  # rescaled X, Y + temporaries
    bigger = fit_estimate(model.cfg, FitSpec(width=512), 10 * acts.n_tokens)
    assert bigger.bytes > est.bytes and bigger.seconds > est.seconds
    with pytest.raises(ResourceError, match="the fit: about"):
        check(est, available=1)
    assert check(est, available=1 << 40) is est
