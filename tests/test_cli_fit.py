"""`acg fit` end to end: fitting, importing a dictionary trained elsewhere, and refusing one made for another model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_model

from acg.cli import main
from acg.compiler import acg as acg_io
from acg.compiler import interop
from acg.compiler.transcoder import Transcoder
from acg.compiler.transformer import save_checkpoint

SMALL = ["--width", "16", "--steps", "30", "--e2e-steps", "5", "--target-l0", "4", "--json"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    ckpt = save_checkpoint(random_model(seed=61, d_vocab=13, n_ctx=12), root / "ckpt")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(rng.integers(0, 13, rng.integers(3, 12)).tolist()) + "\n" for _ in range(80)))
    return root, ckpt, corpus


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_then_import_the_exported_dictionary(capsys, setup, tmp_path):
    root, ckpt, corpus = setup
    code, out, err = cli(capsys, "fit", ckpt, "-o", tmp_path / "acg", "--corpus", corpus, *SMALL)
    assert code == 0, err
    report = json.loads(out)
    assert [r["layer"] for r in report["layers"]] == [0, 1] and report["dictionary"] is None
    fitted = acg_io.load(tmp_path / "acg")
    assert all(tc.n_features == 16 for tc in fitted.transcoders)

    for fmt, save in (("saelens", interop.save_saelens), ("circuit-tracer", interop.save_circuit_tracer)):
        folder = save(fitted.transcoders, tmp_path / fmt)
        code, out, err = cli(
            capsys, "fit", ckpt, "-o", tmp_path / f"acg-{fmt}", "--corpus", corpus, "--dictionary", folder, "--json"
        )
        assert code == 0, err
        assert json.loads(out)["dictionary"]["format"] == fmt
        imported = acg_io.load(tmp_path / f"acg-{fmt}")
        for a, b in zip(fitted.transcoders, imported.transcoders, strict=True):
            assert np.array_equal(a.W_enc.astype(np.float32), b.W_enc.astype(np.float32))
            assert np.array_equal(a.threshold.astype(np.float32), b.threshold.astype(np.float32))
        assert imported.usage.keys() == fitted.usage.keys()


def test_a_dictionary_for_another_model_is_refused(capsys, setup, tmp_path):
    root, ckpt, corpus = setup
    wide = Transcoder(np.zeros((7, 4)), np.zeros(4), np.zeros((4, 7)), np.zeros(7))
    folder = interop.save_saelens([wide, wide], tmp_path / "other")
    code, _, err = cli(capsys, "fit", ckpt, "-o", tmp_path / "acg", "--corpus", corpus, "--dictionary", folder)
    assert code == 2 and "d_model" in err and "another model" in err and "Traceback" not in err
    assert not (tmp_path / "acg").exists()
    code, _, err = cli(capsys, "fit", ckpt, "-o", tmp_path / "acg", "--corpus", corpus, "--dictionary", tmp_path)
    assert code == 2 and "neither a circuit-tracer transcoder set" in err


def test_compile_an_acg_exact_replacement_and_circuit(capsys, setup, tmp_path):
    root, ckpt, corpus = setup
    assert cli(capsys, "fit", ckpt, "-o", tmp_path / "acg", "--corpus", corpus, *SMALL)[0] == 0
    acg = tmp_path / "acg"
    for backend in ("python", "numba", "torch", "onnx"):
        out = tmp_path / f"exact-{backend}"
        code, res, err = cli(
            capsys, "compile", ckpt, "--acg", acg, "--keep-errors", "-o", out, "--backend", backend,
            "--dtype", "float64", "--json",
        )  # fmt: skip
        assert code == 0 and json.loads(res)["graph"] == "acg-exact", err
        code, res, _ = cli(capsys, "verify", ckpt, out, "--dtype", "float64", "--json")
        assert code == 0 and json.loads(res)["max_abs_err"] <= 1e-6, backend
    code, res, err = cli(capsys, "compile", ckpt, "--acg", acg, "-o", tmp_path / "repl", "--json")
    assert code == 0 and json.loads(res)["graph"] == "acg-replacement", err
    code, res, err = cli(
        capsys, "compile", ckpt, "--acg", acg, "--top", "3", "--max-terms", "4", "-o", tmp_path / "circ", "--json"
    )
    assert code == 0 and json.loads(res)["graph"] == "acg-circuit", err
    source = (tmp_path / "circ" / "model.py").read_text()
    compile(source, "model.py", "exec")
    public = [line for line in source.splitlines() if line.startswith("def ") and not line.startswith("def _")]
    assert public == ["def forward(tokens):"]  # a circuit reads as one function, top to bottom


def test_compile_option_errors(capsys, setup, tmp_path):
    root, ckpt, corpus = setup
    code, _, err = cli(capsys, "compile", ckpt, "--keep-errors", "-o", tmp_path / "x")
    assert code == 2 and "pass --acg" in err and not (tmp_path / "x").exists()
    assert cli(capsys, "fit", ckpt, "-o", tmp_path / "acg", "--corpus", corpus, *SMALL)[0] == 0
    code, _, err = cli(capsys, "compile", ckpt, "--acg", tmp_path / "acg", "--features", "0:999", "-o", tmp_path / "y")
    assert code == 2 and "layer 0 has features 0..15" in err and not (tmp_path / "y").exists()
    other = save_checkpoint(random_model(seed=62, d_vocab=13, n_ctx=12, d_model=8, d_head=4), tmp_path / "other")
    code, _, err = cli(capsys, "compile", other, "--acg", tmp_path / "acg", "-o", tmp_path / "z")
    assert code == 2 and "another model" in err


def test_pruning_options_need_a_circuit(capsys, setup, tmp_path):
    root, ckpt, corpus = setup
    assert cli(capsys, "fit", ckpt, "-o", tmp_path / "acg", "--corpus", corpus, *SMALL)[0] == 0
    code, _, err = cli(capsys, "compile", ckpt, "--acg", tmp_path / "acg", "--max-terms", "3", "-o", tmp_path / "x")
    assert code == 2 and "give --features or --top" in err and not (tmp_path / "x").exists()
