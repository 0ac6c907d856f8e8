"""Passes keep the function (interpreter before == after) and change the structure they promise to change."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import dense_ir, random_model, random_tokens

from acg.ir import interpret
from acg.ir.builder import GraphBuilder
from acg.ir.graph import IRError
from acg.ir.passes import PassResult, get_pass, run_pipeline


@pytest.mark.parametrize("norm", ["LN", "RMS", "LNPre", None])
@pytest.mark.parametrize(
    "pipeline",
    [["dce"], ["fold-norm"], ["fuse-heads"], ["lower-einsum"], ["fold-norm", "fuse-heads", "lower-einsum", "dce"]],
)
def test_passes_preserve_the_function(norm, pipeline):
    model = random_model(seed=11, normalization_type=norm)
    graph = dense_ir(model)
    out, reports = run_pipeline(graph, pipeline)
    tokens = random_tokens(model.cfg)
    before = interpret.run(graph, tokens)["logits"]
    after = interpret.run(out, tokens)["logits"]
    assert np.abs(before - after).max() <= 1e-10
    assert [r["pass"] for r in reports] == pipeline


def test_fold_norm_removes_the_weights():
    graph = dense_ir(random_model(seed=12))
    out, [report] = run_pipeline(graph, ["fold-norm"])
    assert report["norms_folded"] == 5 and report["linear_maps_folded"] == 9  # 2 x (ln1 -> Q,K,V; ln2 -> W_in) + final
    assert not any(op.kind == "mul" and "ln" in op.name for op in out.ops)


def test_fuse_heads_and_lower_einsum_leave_no_einsum():
    graph = dense_ir(random_model(seed=13))
    out, reports = run_pipeline(graph, ["fuse-heads", "lower-einsum"])
    assert reports[0]["einsums_fused"] == 8
    assert reports[1]["einsums_left"] == 0
    assert not any(op.kind == "einsum" for op in out.ops)


def test_dce_drops_dead_ops_and_tensors():
    b = GraphBuilder()
    x = b.input("x", ("batch", 2), "float64")
    w = b.const("w", np.eye(2))
    dead = b.const("unused", np.ones((2, 2)))
    y = b.op("matmul", x, w, name="y")
    b.op("matmul", x, dead, name="dead")
    out = get_pass("dce")(b.build([y]))
    assert out.changed and set(out.graph.tensors) == {"w"}
    assert [op.name for op in out.graph.ops] == ["w", "y"]


def test_a_broken_pass_is_named_with_the_pipeline():
    class Breaks:
        name = "breaks"

        def __call__(self, graph):
            return PassResult(graph.replace(outputs=("nope",)), True)

    graph = dense_ir(random_model(seed=14))
    with pytest.raises(IRError, match="pass 'breaks' produced an invalid graph \\(pipeline so far: dce\\)"):
        run_pipeline(graph, ["dce", Breaks()])
    with pytest.raises(IRError, match="unknown pass"):
        get_pass("nope")


@pytest.mark.parametrize(
    "equation,shapes",
    [
        ("bpd,hde->bhpe", [(2, 5, 4), (3, 4, 6)]),
        ("bhqe,bhke->bhqk", [(2, 3, 5, 4), (2, 3, 5, 4)]),
        ("bhqk,bhke->bhqe", [(2, 3, 5, 5), (2, 3, 5, 4)]),
        ("ij,jk->ik", [(3, 4), (4, 5)]),
        ("ij,kj->ki", [(3, 4), (5, 4)]),
        ("i,j->ij", [(3,), (4,)]),
        ("bij,j->bi", [(2, 3, 4), (4,)]),
        ("abc,cd->abd", [(2, 3, 4), (4, 5)]),
        ("ab,bc->c", [(3, 4), (4, 5)]),
    ],
)
def test_lower_einsum_cases(equation, shapes):
    rng = np.random.default_rng(0)
    b = GraphBuilder()
    x = b.input("x", shapes[0], "float64")
    w = b.const("w", rng.normal(size=shapes[1]))
    y = b.op("einsum", x, w, equation=equation, name="y")
    graph = b.build([y])
    out, [report] = run_pipeline(graph, ["lower-einsum"])
    xv = rng.normal(size=shapes[0])
    np.testing.assert_allclose(interpret.run(out, xv)["y"], np.einsum(equation, xv, graph.tensors["w"]), atol=1e-12)
    assert report["einsums_left"] == 0
