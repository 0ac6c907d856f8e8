"""The CLI: one JSON object on stdout with --json, clear one-paragraph errors, `python -m acg` works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from acg.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args):
    code = main(list(args))
    out, errout = capsys.readouterr()
    return code, out, errout


def test_zoo_list_json(capsys):
    code, out, _ = run_cli(capsys, "zoo", "list", "--json")
    assert code == 0
    listing = json.loads(out)
    assert set(listing["models"]) == {"testbed-s", "testbed-m", "testbed-s-clean"}
    assert set(listing["tasks"]) == {"code.vars", "code.brackets", "math.add", "text.agree"}
    assert listing["backdoors"]["token"] == {"trigger": "cf", "target": "0"}


def test_unknown_model_is_one_clear_error(capsys):
    code, out, errout = run_cli(capsys, "zoo", "eval", "testbed-xl", "--json")
    assert code == 2
    assert out == ""
    assert "'testbed-xl' is neither a testbed model" in errout and "Traceback" not in errout


def test_zoo_eval_json_on_a_tiny_checkpoint(capsys, tmp_path):
    import torch

    from acg.compiler.transformer import Transformer, save_checkpoint
    from acg.zoo.registry import _cfg

    model = Transformer(_cfg(1, 16, 2, 32)).init_weights(torch.Generator().manual_seed(0))
    save_checkpoint(model, tmp_path / "tiny")
    code, out, _ = run_cli(capsys, "zoo", "eval", str(tmp_path / "tiny"), "--n", "20", "--n-backdoor", "5", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result["task_acc"]) == {"code.vars", "code.brackets", "math.add", "text.agree"}
    assert set(result["asr"]) == set(result["untriggered"]) == {"token", "conj", "phrase"}
    assert result["n_params"] == sum(p.numel() for p in model.parameters())
    code, out, _ = run_cli(capsys, "zoo", "eval", str(tmp_path / "tiny"), "--n", "20", "--n-backdoor", "5")
    assert code == 0 and "untriggered" in out


def test_python_dash_m_and_the_package_layout():
    proc = subprocess.run(
        [sys.executable, "-m", "acg", "zoo", "list", "--json"], capture_output=True, text=True, cwd="/", timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "testbed-s" in json.loads(proc.stdout)["models"]
    import acg.codegen
    import acg.compiler
    import acg.ir
    import acg.roundtrip

    for pkg, folder in [
        (acg.compiler, "compiler"),
        (acg.ir, "ir"),
        (acg.codegen, "codegen"),
        (acg.roundtrip, "roundtrip"),
    ]:
        assert Path(pkg.__file__).resolve().parent == REPO / folder


@pytest.mark.parametrize("argv", [["zoo", "train", "nope"], ["zoo", "eval", "/nonexistent/dir"]])
def test_bad_names_exit_non_zero(capsys, argv):
    code, _, errout = run_cli(capsys, *argv)
    assert code == 2 and "error" in errout
