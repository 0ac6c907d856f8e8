"""Every backend x every case: the compiled artefact computes what the IR interpreter computes (tight), and what the
original torch model computes (tight), on fresh random tokens of several shapes (m2cgen's cartesian e2e)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import dense_ir, random_model, random_tokens, rel_err, torch_logits

from acg import codegen
from acg.compiler.frontend import load
from acg.ir import interpret
from acg.zoo.registry import ZOO

CASES = {
    "ln-gelu-causal": dict(seed=21),
    "rms-relu-bidirectional": dict(seed=22, normalization_type="RMS", act_fn="relu", attention_dir="bidirectional"),
    "lnpre-gelu_new-attn_only": dict(seed=23, normalization_type="LNPre", act_fn="gelu_new", attn_only=True, n_heads=3),
    "none-silu-3layers": dict(seed=24, normalization_type=None, act_fn="silu", n_layers=3, std=0.2),
}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """(case, backend, dtype) -> (model, graph, forward), compiled once per module."""
    out = {}
    root = tmp_path_factory.mktemp("artefacts")

    def get(case, backend, dtype):
        key = (case, backend, dtype)
        if key not in out:
            model = random_model(**CASES[case])
            graph = dense_ir(model, dtype)
            path = codegen.compile(graph, root / f"{case}-{backend}-{dtype}", backend, title=case)
            out[key] = (model, graph, codegen.load(path))
        return out[key]

    return get


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", codegen.BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_interpreter_and_torch(artefacts, case, backend, dtype):
    model, graph, forward = artefacts(case, backend, dtype)
    for trial in range(3):
        tokens = random_tokens(model.cfg, batch=1 + trial * 2)
        got = np.asarray(forward(tokens))
        assert got.shape == (*tokens.shape, model.cfg.d_vocab_out)
        ir = interpret.run(graph, tokens, dtype=dtype)["logits"]
        ref = torch_logits(model, tokens)
        if dtype == "float64":
            assert np.abs(got - ir).max() <= 1e-9
            assert np.abs(got - ref).max() <= 1e-9
        else:
            assert got.dtype == np.float32
            assert rel_err(got, ir) <= 1e-5
            assert rel_err(got, ref) <= 1e-5


def test_generated_python_is_readable_and_lint_clean(tmp_path):
    import subprocess
    import sys

    graph = dense_ir(random_model(seed=25), "float32")
    path = codegen.compile(graph, tmp_path / "py", "python", title="a small model")
    source = (path / "model.py").read_text()
    assert "import acg" not in source and "from acg" not in source
    assert "def blocks_0_attn(" in source and "def forward(tokens):" in source
    assert "# float32[batch, 2, seq, 8]" in source  # shapes in comments
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--line-length", "120", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("backend", codegen.BACKENDS)
def test_generation_is_deterministic(tmp_path, backend):
    graph = dense_ir(random_model(seed=26), "float32")
    a = codegen.compile(graph, tmp_path / "a", backend)
    b = codegen.compile(dense_ir(random_model(seed=26), "float32"), tmp_path / "b", backend)
    for f in sorted(p.name for p in a.iterdir() if p.is_file()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_unknown_backend_and_missing_manifest(tmp_path):
    graph = dense_ir(random_model(seed=27))
    with pytest.raises(codegen.ArtefactError, match="unknown backend 'cuda'"):
        codegen.compile(graph, tmp_path / "x", "cuda")
    with pytest.raises(codegen.ArtefactError, match="not an acg artefact"):
        codegen.load(tmp_path)


@pytest.mark.parametrize("name", ["testbed-s", pytest.param("testbed-m", marks=pytest.mark.slow)])
def test_shipped_testbed_models_compile_exactly(tmp_path, name):
    """The shipped models through every backend, float64, against the original torch model (the issue's bar)."""
    loaded = load(name, "float64")
    tokens = random_tokens(ZOO[name].cfg, batch=2)
    ref = loaded.original(tokens)
    for backend in codegen.BACKENDS:
        forward = codegen.load(codegen.compile(loaded.graph, tmp_path / backend, backend))
        assert np.abs(np.asarray(forward(tokens)) - ref).max() <= 1e-9, backend
