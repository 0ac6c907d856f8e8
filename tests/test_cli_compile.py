"""`acg compile`, `acg ir show` and `acg verify` end to end, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_model

from acg.cli import main
from acg.compiler.transformer import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(random_model(seed=41), tmp_path_factory.mktemp("m") / "ckpt")


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("backend", ["python", "torch", "onnx", "numba"])
def test_compile_then_verify(capsys, tmp_path, ckpt, backend):
    code, out, _ = cli(
        capsys, "compile", ckpt, "-o", tmp_path / backend, "--backend", backend, "--dtype", "float64", "--json"
    )
    assert code == 0 and json.loads(out)["backend"] == backend
    code, out, _ = cli(capsys, "verify", ckpt, tmp_path / backend, "--dtype", "float64", "--json")
    result = json.loads(out)
    assert code == 0 and result["max_abs_err"] <= 1e-9 and result["agreement"] == 1.0
    assert np.asarray(result["tokens"]).shape == (8, 12)


def test_verify_with_a_token_file_and_an_ir_folder(capsys, tmp_path, ckpt):
    np.save(tmp_path / "toks.npy", np.array([[1, 2, 3], [4, 5, 6]]))
    assert cli(capsys, "compile", ckpt, "-o", tmp_path / "py", "--save-ir", tmp_path / "ir", "--json")[0] == 0
    code, out, _ = cli(capsys, "verify", ckpt, tmp_path / "ir", "--tokens", tmp_path / "toks.npy", "--json")
    result = json.loads(out)
    assert code == 0 and result["tokens"] == [[1, 2, 3], [4, 5, 6]] and result["max_rel_err"] <= 1e-5
    np.save(tmp_path / "bad.npy", np.array([[1, 99]]))
    code, _, err = cli(capsys, "verify", ckpt, tmp_path / "py", "--tokens", tmp_path / "bad.npy")
    assert code == 2 and "token ids must lie in [0, 13)" in err


def test_ir_show(capsys, ckpt):
    code, out, _ = cli(capsys, "ir", "show", ckpt, "--max-ops", "5")
    assert code == 0 and out.startswith("graph(%tokens: int64[batch, seq])") and "more ops" in out


def test_compile_errors_are_one_paragraph(capsys, tmp_path, ckpt):
    code, out, err = cli(capsys, "compile", ckpt, "-o", tmp_path / "x", "--backend", "cuda")
    assert code == 2 and "unknown backend 'cuda'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    code, _, err = cli(capsys, "compile", tmp_path / "nowhere", "-o", tmp_path / "y")
    assert code == 2 and "neither a testbed model" in err
