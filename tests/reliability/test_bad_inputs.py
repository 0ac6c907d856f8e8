"""Corrupt and mismatched inputs, through the CLI: each gives exit status 2, one paragraph on stderr (no traceback)
naming the file and what was expected or found, and leaves no output (not even a temporary) behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_model
from safetensors.torch import load_file, save_file

from acg.cli import main
from acg.compiler.tlayout import to_ir
from acg.compiler.transformer import save_checkpoint
from acg.ir import serialize


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = random_model(seed=41, d_vocab=11, n_ctx=8, act_fn="relu")
    ckpt = save_checkpoint(model, root / "ckpt")
    other = save_checkpoint(random_model(seed=42, d_vocab=11, n_ctx=8, act_fn="relu"), root / "other")
    corpus = root / "corpus.jsonl"
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps(rng.integers(0, 11, 6).tolist()) + "\n" for _ in range(40)))
    fit = ["--corpus", str(corpus), "--width", "8", "--steps", "5", "--e2e-steps", "0", "--target-l0", "2"]
    assert main(["fit", str(other), "-o", str(root / "acg-other"), *fit]) == 0
    assert main(["fit", str(ckpt), "-o", str(root / "acg"), *fit]) == 0
    graph = to_ir(model.cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()}, "float32")
    serialize.save(graph, root / "ir")
    return root, ckpt


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_tensors(ckpt: Path, edit) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))
    (ckpt / "meta.json").unlink()  # as if written by another tool (the hash would catch it first otherwise)


def _ckpt_case(edit):
    def make(root: Path, ckpt: Path, tmp: Path) -> list[str]:
        bad = _copy(ckpt, tmp / "in")
        edit(bad)
        return ["compile", str(bad), "-o", str(tmp / "out")]

    return make


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _ir_case(edit):
    def make(root: Path, ckpt: Path, tmp: Path) -> list[str]:
        bad = _copy(root / "ir", tmp / "in")
        edit(bad)
        return ["compile", str(bad), "-o", str(tmp / "out")]

    return make


def _graph_json(folder: Path, change) -> None:
    doc = json.loads((folder / "graph.json").read_text())
    change(doc)
    (folder / "graph.json").write_text(json.dumps(doc))


def _fit_case(rows):
    def make(root: Path, ckpt: Path, tmp: Path) -> list[str]:
        corpus = tmp / "corpus.jsonl"
        corpus.write_text(rows)
        return ["fit", str(ckpt), "--corpus", str(corpus), "-o", str(tmp / "out"), "--steps", "5"]

    return make


def _edge_to_nowhere(doc: dict) -> None:
    doc["ops"][5]["inputs"][0] = "f0_999"


CASES = {
    "truncated safetensors": (_ckpt_case(lambda d: _truncate(d / "model.safetensors")), "model.safetensors"),
    "wrong dtype": (
        _ckpt_case(lambda d: _edit_tensors(d, lambda t: t.update({"embed.W_E": t["embed.W_E"].to(torch.int64)}))),
        r"embed\.W_E.*dtype",
    ),
    "shape mismatch": (
        _ckpt_case(lambda d: _edit_tensors(d, lambda t: t.update({"embed.W_E": t["embed.W_E"][:5]}))),
        r"embed\.W_E.*shape",
    ),
    "missing key": (_ckpt_case(lambda d: _edit_tensors(d, lambda t: t.pop("unembed.W_U"))), "missing.*unembed.W_U"),
    "NaN weights": (
        _ckpt_case(lambda d: _edit_tensors(d, lambda t: t["blocks.0.mlp.W_in"].view(-1).__setitem__(3, float("nan")))),
        "NaN",
    ),
    "Inf weights": (
        _ckpt_case(lambda d: _edit_tensors(d, lambda t: t["blocks.0.attn.W_Q"].view(-1).__setitem__(0, float("inf")))),
        "Inf",
    ),
    "config field": (
        _ckpt_case(
            lambda d: (d / "config.json").write_text(
                json.dumps({**json.loads((d / "config.json").read_text()), "n_heads": "four"})
            )
        ),
        "n_heads",
    ),
    "config not JSON": (_ckpt_case(lambda d: (d / "config.json").write_text("{oops")), "config.json: not valid JSON"),
    "unknown IR schema version": (
        _ir_case(lambda d: _graph_json(d, lambda doc: doc.update(version=99))),
        "schema version 99 is not supported",
    ),
    "IR edge to a missing value": (_ir_case(lambda d: _graph_json(d, _edge_to_nowhere)), "f0_999"),
    "IR tensors truncated": (_ir_case(lambda d: _truncate(d / "tensors.safetensors")), "tensors.safetensors"),
    "IR changed after writing": (
        _ir_case(lambda d: _graph_json(d, lambda doc: doc["meta"].update(title="changed"))),
        "content hash mismatch",
    ),
    "empty corpus": (_fit_case(""), "corpus"),
    "token outside the vocabulary": (_fit_case("[1, 2, 99]\n" * 5), "99"),
    "corpus not JSON lines": (_fit_case("[1, 2,\n"), "corpus.jsonl"),
    "dictionary of another model": (
        lambda root, ckpt, tmp: ["roundtrip", str(ckpt), "--acg", str(root / "acg-other"), "-o", str(tmp / "out")],
        "another model",
    ),
    "ACG folder corrupt": (
        lambda root, ckpt, tmp: [
            "roundtrip",
            str(ckpt),
            "--acg",
            str(_truncated_acg(root, tmp)),
            "-o",
            str(tmp / "out"),
        ],
        "tensors.safetensors",
    ),
}


def _truncated_acg(root: Path, tmp: Path) -> Path:
    bad = _copy(root / "acg", tmp / "acg")
    _truncate(bad / "tensors.safetensors")
    return bad


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_leaves_nothing(base, tmp_path, capsys, case):
    root, ckpt = base
    make, pattern = CASES[case]
    argv = make(root, ckpt, tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith("error:")
    assert re.search(pattern, " ".join(err.split())), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left either


def test_debug_shows_the_traceback(base, tmp_path, capsys):
    root, ckpt = base
    make, _ = CASES["truncated safetensors"]
    argv = make(root, ckpt, tmp_path)
    with pytest.raises(Exception, match="model.safetensors"):
        main(["--debug", *argv])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--bogus", "zoo", "list"], ["zoo", "list", "--bogus"], ["compile"], ["nosuch"]])
def test_a_mistyped_command_line_is_a_usage_message_not_a_traceback(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Usage: acg" in err and "Error:" in err
