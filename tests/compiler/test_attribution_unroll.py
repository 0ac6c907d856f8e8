"""Attribution graphs are direct effects (checked by intervention on an independent frozen forward pass); scores
behave; the unrolled circuit program computes the replacement model exactly and prints readable code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_model, random_tokens

from acg import codegen
from acg.compiler.attribution import attribute, graph_scores, to_graph_json
from acg.compiler.fit import FitSpec, fit
from acg.compiler.lower import lower
from acg.compiler.unroll import unroll
from acg.ir import interpret


@pytest.fixture(scope="module")
def small():
    model = random_model(seed=61, d_vocab=9, n_ctx=8, act_fn="relu", d_model=8, n_heads=2, d_head=4, d_mlp=16)
    rng = np.random.default_rng(0)
    corpus = [list(map(int, rng.integers(0, 9, rng.integers(3, 8)))) for _ in range(120)]
    acg, _ = fit(model, corpus, FitSpec(width=6, steps=60, e2e_steps=20, usage_prompts=40, target_l0=3), progress=False)
    return model, acg


def _frozen_pre(acg, tokens, drop=None, edit_err=None):
    """An independent forward pass with attention patterns and LN scales frozen at their clean values and MLP outputs
    replaced by feature writes + errors; `drop` = (layer, pos, feature) removed. Returns feature pre-activations."""
    cfg, w = acg.cfg, acg.weights
    n = len(tokens)

    def ln(x, prefix, scale=None):
        y = x - x.mean(-1, keepdims=True)
        s = 1 / np.sqrt((y * y).mean(-1, keepdims=True) + cfg.eps) if scale is None else scale
        return y * s * w[f"{prefix}.w"] + w[f"{prefix}.b"], s

    rec = {}
    for frozen in (False, True):
        x = w["embed.W_E"][tokens] + w["pos_embed.W_pos"][:n]
        pres = []
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}"
            h, s1 = ln(x, f"{p}.ln1", rec.get(("s1", layer)) if frozen else None)
            q = np.einsum("pd,hde->hpe", h, w[f"{p}.attn.W_Q"]) + w[f"{p}.attn.b_Q"][:, None]
            k = np.einsum("pd,hde->hpe", h, w[f"{p}.attn.W_K"]) + w[f"{p}.attn.b_K"][:, None]
            v = np.einsum("pd,hde->hpe", h, w[f"{p}.attn.W_V"]) + w[f"{p}.attn.b_V"][:, None]
            if frozen:
                A = rec[("A", layer)]
            else:
                sc = q @ k.transpose(0, 2, 1) / cfg.attn_scale + np.triu(np.full((n, n), -np.inf), 1)
                A = np.exp(sc - sc.max(-1, keepdims=True))
                A /= A.sum(-1, keepdims=True)
            x = x + np.einsum("hpe,hed->pd", A @ v, w[f"{p}.attn.W_O"]) + w[f"{p}.attn.b_O"]
            h2, s2 = ln(x, f"{p}.ln2", rec.get(("s2", layer)) if frozen else None)
            tc = acg.transcoders[layer]
            pre = h2 @ tc.W_enc + tc.b_enc
            pres.append(pre)
            if frozen:
                f = rec[("f", layer)].copy()
                if drop is not None and drop[0] == layer:
                    f[drop[1], drop[2]] = 0.0
                x = x + f @ tc.W_dec + tc.b_dec + rec[("err", layer)]
            else:
                f = tc.encode(h2)
                mlp = (
                    np.maximum(h2 @ w[f"{p}.mlp.W_in"] + w[f"{p}.mlp.b_in"], 0) @ w[f"{p}.mlp.W_out"]
                    + w[f"{p}.mlp.b_out"]
                )
                rec.update(
                    {
                        ("s1", layer): s1,
                        ("s2", layer): s2,
                        ("A", layer): A,
                        ("f", layer): f,
                        ("err", layer): mlp - (f @ tc.W_dec + tc.b_dec),
                    }
                )
                x = x + mlp
    return pres


def test_feature_edges_equal_interventions(small):
    _, acg = small
    tokens = [1, 4, 2, 7, 3, 5]
    g = attribute(acg, tokens)
    feats = [tuple(f) for f in g.active_features.tolist()]
    base = _frozen_pre(acg, np.array(tokens))
    checked = 0
    for src, (ls, ps, fs) in enumerate(feats):
        if ls != 0:
            continue
        after = _frozen_pre(acg, np.array(tokens), drop=(ls, ps, fs))
        for tgt, (lt, pt, ft) in enumerate(feats):
            if lt == 1:
                effect = base[1][pt, ft] - after[1][pt, ft]
                assert abs(effect - g.adjacency[tgt, src]) <= 1e-9
                checked += 1
    assert checked > 0


def test_scores_and_graph_json(small, tmp_path):
    _, acg = small
    g = attribute(acg, [1, 4, 2, 7, 3, 5])
    scores = graph_scores(g)
    assert 0 <= scores["replacement_score"] <= 1 and 0 <= scores["completeness_score"] <= 1
    doc = json.loads(to_graph_json(g, acg, tmp_path / "g.json").read_text())
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert kinds == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    ids = {n["node_id"] for n in doc["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert doc["metadata"]["schema_version"] == 1


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_unrolled_program_is_the_replacement_model(norm):
    model = random_model(
        seed=62, d_vocab=7, n_ctx=6, act_fn="relu", normalization_type=norm, d_model=8, n_heads=2, d_head=4, d_mlp=12
    )
    corpus = [[1, 2, 3, 4], [2, 3, 5, 6, 1]] * 20
    acg, _ = fit(model, corpus, FitSpec(width=4, steps=30, e2e_steps=0, usage_prompts=10, target_l0=2), progress=False)
    graph = unroll(acg, tokens=list(range(7)), positions=list(range(6)), dtype="float64")
    repl = lower(acg, keep_errors=False, dtype="float64")
    tokens = random_tokens(model.cfg, seed=3)
    assert np.abs(interpret.run(graph, tokens)["logits"] - interpret.run(repl, tokens)["logits"]).max() <= 1e-9


def test_readable_circuit_code(small, tmp_path):
    _, acg = small
    graph = unroll(acg, keep={0: [0, 1], 1: [2]}, min_weight=0.2)
    path = codegen.compile(graph, tmp_path / "py", "python", title="a small circuit")
    source = (path / "model.py").read_text()
    assert "f1_2 = " in source and "tok_" in source and "L0H0_pattern" in source
    import ast

    assign = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "f1_2_pre"
    )
    text = ast.get_source_segment(source, assign)
    assert " * " in text and "s_L1_mlp" in text  # a weighted sum of named features, scaled by the LN factor
    forward = codegen.load(path)
    tokens = np.array([[1, 2, 3]])
    assert np.allclose(forward(tokens), interpret.run(graph, tokens, dtype="float32")["logits"], rtol=1e-5, atol=1e-5)


def test_max_terms_caps_every_sum_and_keeps_the_largest(small):
    from acg.compiler.unroll import _Unroll

    _, acg = small
    keep = {0: [0, 1], 1: [2]}
    full = unroll(acg, keep=keep)
    capped = unroll(acg, keep=keep, max_terms=2)
    assert len(capped.ops) < len(full.ops) and capped.meta["max_terms"] == 2
    u = _Unroll(acg, keep, None, None, None, 0.0, 2, "float32")
    nodes, heads = u.plan()
    u.needed(nodes, heads)
    for node in nodes:
        if node.name in u.terms:
            largest = sorted((abs(v) for v in node.deps.values() if v), reverse=True)[:2]
            assert sorted((abs(v) for _, v in u.terms[node.name]), reverse=True) == largest
    assert u.scores and all(len(pairs) <= 2 and len(g) <= 2 for pairs, g in u.scores.values())
