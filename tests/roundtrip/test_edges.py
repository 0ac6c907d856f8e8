"""Edge-level circuits: the torch circuit computes what the unrolled IR computes (every edge set, every norm); its edge
attributions are the logit change from deleting the edge where the logit is linear in it, and first-order exact
elsewhere; the search finds a circuit's edges known by construction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import planted_one_layer, random_model, random_tokens, rel_err

from acg.compiler.acg import ACG
from acg.compiler.transcoder import Transcoder
from acg.compiler.transformer import Transformer, TransformerConfig
from acg.compiler.unroll import _Unroll, unroll
from acg.ir import interpret
from acg.roundtrip import edges as edges_mod


@dataclass(frozen=True)
class Ex:
    ids: list[int]
    answer_id: int


def _random_acg(norm: str | None, seed: int, act: str = "relu"):
    """A random 2-layer model and random dictionaries (6 features a layer, about half of them firing): no fitting."""
    model = random_model(
        seed=seed, d_vocab=9, n_ctx=8, act_fn="relu", d_model=8, n_heads=2, d_head=4, d_mlp=16, normalization_type=norm
    )
    rng = np.random.default_rng(seed)
    w = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    tcs = []
    for _ in range(2):
        W_enc, W_dec = rng.normal(0, 0.6, (8, 6)), rng.normal(0, 0.6, (6, 8))
        threshold = np.full(6, 0.1) if act == "jumprelu" else None
        tcs.append(Transcoder(W_enc, rng.normal(0, 0.3, 6), W_dec, rng.normal(0, 0.1, 8), act, threshold))
    corpus = [list(map(int, rng.integers(0, 9, rng.integers(3, 8)))) for _ in range(20)]
    return model, ACG(model.cfg, w, tuple(tcs)), corpus


def _net(acg, keep, edges=None):
    u = _Unroll(acg, keep, None, None, None, 0.0, None, "float64", edges)
    nodes, heads = u.plan()
    return edges_mod.CircuitNet(u, nodes, heads)


@pytest.mark.parametrize(("norm", "act"), [("LN", "jumprelu"), ("RMS", "relu"), (None, "relu")])
def test_the_torch_circuit_computes_the_unrolled_ir(norm, act):
    _, acg, corpus = _random_acg(norm, 81, act)
    keep = {0: [0, 2, 3, 5], 1: [1, 2, 4]}
    net = _net(acg, keep)
    exs = [Ex(corpus[i], 0) for i in range(8)]
    every = edges_mod.edge_attribution(net, exs)
    rng = np.random.default_rng(1)
    half = frozenset(e for e in sorted(every) if rng.random() < 0.5)
    for chosen in (None, half, frozenset()):  # every edge; half of them; none (the stream holds only biases)
        graph = unroll(acg, keep, edges=chosen, dtype="float64")
        net = _net(acg, keep, chosen)
        tokens = random_tokens(acg.cfg, batch=4, seq=7, seed=2)
        want = interpret.run(graph, tokens)["logits"]
        with torch.no_grad():
            got = net(torch.as_tensor(tokens)).numpy()
        assert rel_err(got, want) <= 1e-9
    graph = unroll(acg, keep, edges=half, dtype="float64")
    assert sorted(map(tuple, graph.meta["edges"])) == sorted(half)
    assert len(every) > len(half) > 0
    kinds = {len(e) for e in every} | {e[0][0] for e in every}
    assert kinds == {2, 3, "f", "L"}  # feature terms, key terms and pair terms all scored


def _target(net, ex):
    logits = net(torch.tensor([ex.ids]))[0, -1]
    return float(logits[ex.answer_id] - logits.mean())


def test_feature_edge_attribution_is_the_effect_of_deleting_it_where_linear():
    _, acg, corpus = _random_acg(None, 82)
    keep = {0: list(range(6)), 1: list(range(6))}
    net = _net(acg, keep)
    checked = 0
    for i in range(6):
        ex = Ex(corpus[i], int(corpus[i][0]))
        scores = edges_mod.edge_attribution(net, [ex])
        net(torch.tensor([ex.ids]), record=True)
        pre = net.seen[("pre", 1)][0, -1].detach().clone()
        N = net.seen[("in", 1)][0, -1].detach()
        base = _target(net, ex)
        W = net.feature_w[1]
        for r, c in torch.nonzero(W).tolist()[::7]:  # every 7th: the check costs a forward pass
            term = float(W[r, c] * N[r])
            if pre[c] <= 0 or pre[c] - term <= 0:  # the ReLU would change side: not linear
                continue
            feat = [n.name for n in net.stages[(1, "mlp")] if n.kind == "feat"][c]
            w = W[r, c].item()
            W[r, c] = 0.0
            with torch.no_grad():
                effect = base - _target(net, ex)
            W[r, c] = w
            assert abs(abs(effect) - scores[(feat, net.live[r].name)]) <= 1e-9 * max(1.0, abs(effect))
            checked += 1
    assert checked >= 10


def test_attention_edge_attribution_is_the_first_order_effect():
    _, acg, corpus = _random_acg("LN", 83)
    keep = {0: list(range(6)), 1: list(range(6))}
    net = _net(acg, keep)
    ex = Ex(corpus[3], 4)
    scores = edges_mod.edge_attribution(net, [ex])
    base, eps, checked = _target(net, ex), 1e-6, 0
    names = [n.name for n in net.live]
    for head, T in net.pair_w.items():
        hname = f"L{head[0]}H{head[1]}"
        for r, c in torch.nonzero(T).tolist()[:15]:
            v = T[r, c].item()
            T[r, c] = v * (1 - eps)
            with torch.no_grad():
                slope = (base - _target(net, ex)) / eps
            T[r, c] = v
            assert abs(abs(slope) - scores[(hname, names[r], names[c])]) <= 1e-4 * max(1e-3, abs(slope))
            checked += 1
        g = net.key_w[head]
        for (r,) in torch.nonzero(g).tolist()[:5]:
            v = g[r].item()
            g[r] = v * (1 - eps)
            with torch.no_grad():
                slope = (base - _target(net, ex)) / eps
            g[r] = v
            assert abs(abs(slope) - scores[(hname, names[r])]) <= 1e-4 * max(1e-3, abs(slope))
            checked += 1
    assert checked >= 20


def _planted() -> tuple[Transformer, ACG]:
    """One layer, no layer norm, attention writing nothing. Token 1 drives feature 0 (-> answer 3), token 2 feature 1
    (-> answer 4); token 0 (first in every prompt) also reads into both features with weight 0.3, below their
    threshold, so those two edges never matter. The true circuit is {tok_1 -> f0, tok_2 -> f1}."""
    d, V, n = 8, 6, 2
    cfg = TransformerConfig(
        n_layers=1, d_model=d, n_heads=1, d_head=d, d_mlp=n, d_vocab=V, n_ctx=4, act_fn="relu", normalization_type=None
    )
    e = np.eye(d)
    W_E = np.stack([e[5] + (e[k] if 0 < k < 5 else 0.3 * (e[1] + e[2]) if k == 0 else 0) for k in range(V)])
    W_enc = np.zeros((d, n))
    W_enc[1, 0] = W_enc[2, 1] = 1.0
    b_enc = np.full(n, -0.5)
    W_dec = np.zeros((n, d))
    W_dec[0, 3], W_dec[1, 4] = 2.0, 2.0
    W_U = np.zeros((d, V))
    W_U[3, 3] = W_U[4, 4] = 1.0
    return planted_one_layer(cfg, W_E, W_U, W_enc, b_enc, W_dec)


def test_the_search_finds_the_planted_edges():
    _, acg = _planted()
    data = [Ex([0, 1], 3), Ex([0, 2], 4), Ex([0, 5, 1], 3), Ex([0, 5, 2], 4)] * 5
    out = edges_mod.extract_edges(acg, {0: [0, 1]}, data, {"t": data}, {"t": 1.0}, tolerance=0.01)
    assert set(out.scores) == {("f0_0", "tok_1"), ("f0_0", "tok_0"), ("f0_1", "tok_2"), ("f0_1", "tok_0")}
    assert out.scores[("f0_0", "tok_0")] == out.scores[("f0_1", "tok_0")] == 0.0
    assert out.target_met and out.edges == {("f0_0", "tok_1"), ("f0_1", "tok_2")}
    assert out.report["n_edges_per_layer"] == {"L0.mlp": 2} and out.report["task_acc"] == {"t": 1.0}
    assert next(p for p in out.curve if p["k"] == 1)["task_acc"]["t"] == 0.5
    # the emitted IR is that circuit: it answers every prompt; token 0 stays in the stream, read by no feature
    assert "tok_0" in out.graph.meta["labels"]
    reads = {x for op in out.graph.ops if op.scope == "blocks.0.mlp" for x in op.inputs}
    assert "tok_1" in reads and "tok_2" in reads and "tok_0" not in reads
    for ex in data[:4]:
        logits = interpret.run(out.graph, np.array([ex.ids]))["logits"][0, -1]
        assert int(np.argmax(logits)) == ex.answer_id


def test_an_edge_circuit_folds_back_with_nothing_edited():
    """The IR records its edges, tokens and positions, so the round trip of edits rebuilds the same circuit."""
    from acg.roundtrip.edits import fold

    _, acg, corpus = _random_acg("LN", 84, "jumprelu")
    keep = {0: [0, 1, 2], 1: [3, 4]}
    scores = edges_mod.edge_attribution(_net(acg, keep), [Ex(corpus[i], 1) for i in range(6)])
    top = frozenset(sorted(scores, key=lambda e: (-scores[e], e))[: len(scores) // 3])
    graph = unroll(acg, keep, tokens=[0, 1, 2, 3, 4], positions=list(range(6)), edges=top)
    assert graph.meta["tokens"] == [0, 1, 2, 3, 4] and graph.meta["positions"] == list(range(6))
    _, _, report = fold(acg, graph)
    assert report["edited_features"] == []
