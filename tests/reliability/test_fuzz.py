"""Fuzzing (hypothesis) the readers of untrusted input: the IR loader (mutated graph.json, random tensor bytes), the
model config parser, the ACG loader, the compiled-artefact manifest, the code importer and the hypothesis checker.
Whatever they are fed, they either succeed or raise acg's own error type with a message; anything else (KeyError,
TypeError, RecursionError, ...) is a bug. A short run is in the default suite; `-m slow` runs the long one."""

from __future__ import annotations

import copy
import json
import os
import random

import numpy as np
import pytest
from helpers import random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acg import codegen
from acg.codegen.importer import import_code
from acg.compiler import acg as acg_io
from acg.compiler.tlayout import to_ir
from acg.compiler.transformer import TransformerConfig
from acg.ir import serialize
from acg.ir.errors import ACGError
from acg.ir.hypothesis import check

FAST = int(os.environ.get("ACG_FUZZ_EXAMPLES", "40"))
SLOW = 1500
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = random_model(seed=71, n_layers=1, d_vocab=7, n_ctx=5, d_model=8, d_mlp=8, act_fn="relu")
    graph = to_ir(model.cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()}, "float32")
    ir = serialize.save(graph, root / "ir")
    art = codegen.compile(graph, root / "py", "python")
    return root, json.loads((ir / "graph.json").read_text()), (ir / "tensors.safetensors").read_bytes(), art


def _paths(doc, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, seed: int, value, how: str):
    doc = copy.deepcopy(doc)
    paths = [p for p, _ in _paths(doc) if p]
    path = random.Random(seed).choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _expect_own_error(fn, *args):
    try:
        fn(*args)
    except ACGError as e:
        assert str(e).strip(), "an error without a message"


def _ir_case(valid, tmp_path, doc, blob):
    root = tmp_path
    (root / "graph.json").write_text(json.dumps(doc))
    (root / "tensors.safetensors").write_bytes(blob)
    _expect_own_error(serialize.load, root)


def _fuzz(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _ir(valid, tmp_path_factory, seed, value, how, cut):
    _, doc, blob, _ = valid
    mutated = _mutate(doc, seed, value, how)
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    _ir_case(valid, tmp_path_factory.mktemp("ir"), mutated, blob)


@pytest.mark.parametrize("n", [FAST, pytest.param(SLOW, marks=pytest.mark.slow)], ids=["short", "long"])
def test_ir_loader(valid, tmp_path_factory, n):
    @_fuzz(n)
    @given(st.integers(0, 10**6), json_values, st.sampled_from(["set", "delete"]), st.none() | st.integers(0, 10**6))
    def run(seed, value, how, cut):
        _ir(valid, tmp_path_factory, seed, value, how, cut)

    run()


@pytest.mark.parametrize("n", [FAST, pytest.param(SLOW, marks=pytest.mark.slow)], ids=["short", "long"])
def test_config_parser(n):
    base = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, d_vocab=7, n_ctx=5).to_dict()

    @_fuzz(n)
    @given(st.integers(0, 10**6), json_values, st.sampled_from(["set", "delete"]), json_values)
    def run(seed, value, how, anything):
        _expect_own_error(TransformerConfig.from_dict, _mutate(base, seed, value, how))
        if isinstance(anything, dict):
            _expect_own_error(TransformerConfig.from_dict, anything)

    run()


@pytest.mark.parametrize("n", [FAST, pytest.param(SLOW, marks=pytest.mark.slow)], ids=["short", "long"])
def test_manifest_and_acg_readers(valid, tmp_path_factory, n):
    root, _, _, art = valid
    manifest = json.loads((art / "acg.json").read_text())

    @_fuzz(n)
    @given(st.integers(0, 10**6), json_values, st.sampled_from(["set", "delete"]), st.binary(max_size=64))
    def run(seed, value, how, junk):
        folder = tmp_path_factory.mktemp("art")
        for f in art.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "acg.json").write_text(json.dumps(_mutate(manifest, seed, value, how)))
        _expect_own_error(codegen.load, folder)
        acg_dir = tmp_path_factory.mktemp("acg")
        (acg_dir / "acg.json").write_bytes(junk)
        (acg_dir / "tensors.safetensors").write_bytes(junk[::-1])
        _expect_own_error(acg_io.load, acg_dir)

    run()


@pytest.mark.parametrize("n", [FAST, pytest.param(SLOW, marks=pytest.mark.slow)], ids=["short", "long"])
def test_code_importer_and_hypothesis_checker(valid, tmp_path_factory, n):
    _, _, _, art = valid
    source = (art / "model.py").read_text()
    lines = source.splitlines()

    @_fuzz(n)
    @given(st.integers(0, 10**6), st.text(max_size=40), st.sampled_from(["insert", "replace", "delete", "swap"]))
    def run(seed, text, how):
        rng = np.random.default_rng(seed)
        edited = list(lines)
        i = int(rng.integers(0, len(edited)))
        if how == "insert":
            edited.insert(i, text)
        elif how == "replace":
            line = edited[i]
            j = int(rng.integers(0, len(line) + 1))
            edited[i] = line[:j] + text + line[j + len(text) :]
        elif how == "delete":
            del edited[i]
        else:
            k = int(rng.integers(0, len(edited)))
            edited[i], edited[k] = edited[k], edited[i]
        folder = tmp_path_factory.mktemp("code")
        for f in art.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "model.py").write_text("\n".join(edited) + "\n")
        _expect_own_error(import_code, folder / "model.py")
        _expect_own_error(check, f"def h(tokens):\n    return {text}\n", "h")

    run()
