"""The IR core: verify names what is wrong, serialisation round-trips byte for byte and refuses corrupt folders,
the interpreter matches the torch model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import dense_ir, random_model, random_tokens, torch_logits

from acg.ir import interpret, serialize
from acg.ir.builder import GraphBuilder
from acg.ir.graph import Graph, IRError, Op, Value
from acg.ir.verify import verify


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", None])
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "silu"])
def test_interpreter_matches_torch_float64(norm, act):
    model = random_model(seed=3, normalization_type=norm, act_fn=act)
    graph = dense_ir(model)
    for seed in range(3):
        tokens = random_tokens(model.cfg, seed=None)
        ref = torch_logits(model, tokens)
        assert np.abs(interpret.run(graph, tokens)["logits"] - ref).max() <= 1e-9, seed


def test_interpreter_float32_relative_error():
    model = random_model(seed=4)
    graph = dense_ir(model, "float32")
    tokens = random_tokens(model.cfg)
    out = interpret.run(graph, tokens, dtype="float32")["logits"]
    assert out.dtype == np.float32
    ref = torch_logits(model, tokens)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_bidirectional_and_attn_only():
    for kw in ({"attention_dir": "bidirectional"}, {"attn_only": True}):
        model = random_model(seed=5, **kw)
        graph = dense_ir(model)
        tokens = random_tokens(model.cfg)
        assert np.abs(interpret.run(graph, tokens)["logits"] - torch_logits(model, tokens)).max() <= 1e-9


def test_serialisation_round_trip_is_byte_identical(tmp_path):
    graph = dense_ir(random_model(seed=6))
    serialize.save(graph, tmp_path / "a")
    again = serialize.load(tmp_path / "a")
    serialize.save(again, tmp_path / "b")
    for name in ("graph.json", "tensors.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tokens = random_tokens(random_model(seed=6).cfg)
    assert np.array_equal(interpret.run(graph, tokens)["logits"], interpret.run(again, tokens)["logits"])
    assert str(graph) == str(again)


def _saved(tmp_path):
    path = serialize.save(dense_ir(random_model(seed=7)), tmp_path / "ir")
    return path, json.loads((path / "graph.json").read_text())


def test_corrupt_folders_give_clear_errors(tmp_path):
    path, doc = _saved(tmp_path)
    (path / "graph.json").write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(IRError, match="schema version 99"):
        serialize.load(path)
    (path / "graph.json").write_text("{not json")
    with pytest.raises(IRError, match="not valid JSON"):
        serialize.load(path)
    path, doc = _saved(tmp_path)
    blob = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(IRError, match="tensors.safetensors"):
        serialize.load(path)
    path, doc = _saved(tmp_path)
    doc["tensors"]["embed.W_E"]["shape"] = [1, 2]
    (path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(IRError, match="embed.W_E"):
        serialize.load(path)
    path, doc = _saved(tmp_path)
    doc["ops"][3]["inputs"] = ["nowhere"]
    (path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(IRError, match="nowhere"):
        serialize.load(path)
    with pytest.raises(IRError, match="not an IR folder"):
        serialize.load(tmp_path / "missing")


def test_content_hash_catches_edits(tmp_path):
    path, doc = _saved(tmp_path)
    doc["meta"]["note"] = "edited"
    (path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(IRError, match="content hash"):
        serialize.load(path)


def test_nan_tensors_are_refused():
    b = GraphBuilder()
    x = b.input("x", ("batch", 2), "float64")
    w = b.const("w", np.array([[1.0, np.nan], [0.0, 1.0]]))
    b.op("matmul", x, w, name="y")
    with pytest.raises(IRError, match="NaN"):
        b.build(["y"])


def test_verify_names_the_op():
    x = Value("x", ("batch", 3), "float64")
    bad = Op("matmul", ("x", "x"), Value("y", ("batch", 3), "float64"))
    with pytest.raises(IRError, match="'y' \\(matmul\\).*inner dims"):
        verify(Graph((x,), (bad,), ("y",)))
    unknown = Op("fft", ("x",), Value("y", ("batch", 3), "float64"))
    with pytest.raises(IRError, match="unknown op kind; supported"):
        verify(Graph((x,), (unknown,), ("y",)))
    twice = Op("relu", ("x",), Value("x", ("batch", 3), "float64"))
    with pytest.raises(IRError, match="SSA"):
        verify(Graph((x,), (twice,), ("x",)))


def test_printer_is_readable():
    text = str(dense_ir(random_model(seed=8)))
    assert text.startswith("graph(%tokens: int64[batch, seq]) -> (%logits) {")
    assert '%L0_q = einsum(%blocks_0_ln1_out, %L0_attn_W_Q) {equation="bpd,hde->bhpe"}' in text
    assert "// blocks.1.mlp" in text
