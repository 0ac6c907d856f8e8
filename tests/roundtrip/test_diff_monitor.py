"""The behaviour diff (two models that differ in one known feature; attribution against ablation) and the pathway
monitor (a hand-built corpus where one token pair never meets)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import random_model

from acg.compiler.fit import FitSpec, fit
from acg.roundtrip import dense
from acg.roundtrip.data import Pair
from acg.roundtrip.diff import NodeModel, Nodes, diff, resolve
from acg.roundtrip.monitor import Monitor, MonitorError, auroc, detection_at_fpr, profile_from_corpus

X, Y = 11, 12  # the monitor's corpus never puts these two tokens in one prompt


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = random_model(seed=61, d_vocab=13, n_ctx=12, act_fn="relu", normalization_type=None)
    rng = np.random.default_rng(1)
    corpus = []
    while len(corpus) < 300:
        row = list(map(int, rng.integers(0, 13, rng.integers(3, 12))))
        if not (X in row and Y in row):
            corpus.append(row)
    acg, _ = fit(
        model, corpus, FitSpec(width=48, steps=100, e2e_steps=20, usage_prompts=300, kind="relu"), progress=False
    )
    return model, acg, corpus


def _pairs(cfg, n, seed):
    rng = np.random.default_rng(seed)
    return [Pair(list(map(int, rng.integers(0, cfg.d_vocab, rng.integers(2, cfg.n_ctx)))), 0) for _ in range(n)]


def test_node_model_is_exact_with_every_node_and_the_replacement_without_errors(fitted):
    model, acg, _ = fitted
    nm = NodeModel(acg)
    toks = torch.as_tensor(np.random.default_rng(2).integers(0, 13, (4, 9)))
    with torch.no_grad():
        full = nm.run(toks, Nodes(None, True))
        repl = nm.run(toks, Nodes(None, False))
        assert torch.allclose(full, model.double()(toks), atol=1e-9)
        assert torch.allclose(repl.float(), dense.to_dense(acg)(toks), atol=1e-4)


def test_diff_of_two_models_that_differ_in_one_feature(fitted, tmp_path):
    model, acg, _ = fitted
    last = acg.cfg.n_layers - 1
    k = int(np.argmax(acg.usage[f"feat_mass.L{last}"]))
    sel = dense.select_all(acg)
    feats = list(sel.features)
    feats[last] = np.delete(feats[last], k)
    sel = dense.Selection(tuple(feats), sel.tokens, sel.positions, restrict_attention=False, source="minus-one")
    rt, _, report = dense.roundtrip(acg, sel)
    dense.save(rt, tmp_path / "rt", report)
    dense.save(dense.to_dense(acg), tmp_path / "all", dense.roundtrip(acg)[2])
    a, b = resolve(str(tmp_path / "all")), resolve(str(tmp_path / "rt"))
    assert a.kind == b.kind == "roundtrip"
    data = {"random": _pairs(acg.cfg, 300, 3)}
    out = diff(a, b, data, acg=acg, n_divergent=4)
    t = out["tasks"]["random"]
    assert t["agreement"] < 1.0, "removing the most used last-layer feature changed no answer"
    explained = [p for p in t["divergent"] if "a_only" in p]
    assert explained
    for p in explained:
        ex = p["a_only"]
        assert [r["node"] for r in ex["nodes"]] == [f"L{last}.f{k}"]  # the one node A has and B lacks
        # no final norm: the logit is linear in a last-layer feature, so attribution = ablation
        assert ex["attribution_sum"] == pytest.approx(ex["ablation"], rel=1e-6, abs=1e-9)
        assert ex["explained"] == pytest.approx(1.0, rel=1e-6)
        assert p["b_only"]["nodes"] == []  # B has nothing A lacks


def test_attribution_of_an_earlier_feature_is_first_order_and_checked(fitted):
    _, acg, _ = fitted
    nm = NodeModel(acg)
    mine = Nodes(None, False)
    k = int(np.argmax(acg.usage["feat_mass.L0"]))
    feats = [np.arange(n) for n in acg.n_features()]
    feats[0] = np.delete(feats[0], k)
    other = Nodes(tuple(feats), False)
    ids = [1, 4, 7, 2, 9, 3]
    res = nm.explain(ids, 0, 1, mine, other)
    assert [r["node"] for r in res["nodes"]] in ([f"L0.f{k}"], [])
    # ablation is the real margin change, computed independently here
    with torch.no_grad():
        lm = nm.run(torch.tensor([ids]), mine)[0, -1]
        lo = nm.run(torch.tensor([ids]), other)[0, -1]
    assert res["ablation"] == pytest.approx(float((lm[0] - lm[1]) - (lo[0] - lo[1])), abs=1e-9)


def test_monitor_scores_every_profiled_prompt_zero(fitted):
    _, acg, corpus = fitted
    for mon, prompts in (
        (Monitor(acg), corpus[:120]),
        (Monitor(acg, profile_from_corpus(acg, corpus[:80])), corpus[:80]),
    ):
        s = mon.score(prompts)
        for k in ("score", "enc", "qk", "ov"):
            assert np.all(s[k] == 0), k  # every pathway of a profiled prompt was seen, by construction
    assert mon.profile.att  # the corpus profile has attention edges too


def test_attention_edges_count_in_the_enc_site(fitted):
    _, acg, corpus = fitted
    prof = profile_from_corpus(acg, corpus)
    mon = Monitor(acg, prof)
    unseen_everything = Monitor(acg, replace(prof, att={k: np.zeros_like(v) for k, v in prof.att.items()}))
    prompt = corpus[0]
    # with every attention edge unseen, the enc site can only grow, and does (attention carries mass)
    assert unseen_everything.score([prompt])["enc"][0] > mon.score([prompt])["enc"][0]


def test_monitor_flags_the_new_pair_and_names_it(fitted):
    _, acg, corpus = fitted
    mon = Monitor(acg)
    # a profiled prompt with Y put next to an X: only the (X, Y) pathways are new
    base = next(r for r in corpus if X in r and len(r) < 10)
    at = base.index(X)
    prompt = [*base[: at + 1], Y, *base[at + 1 :]]
    scan = mon.scan(prompt)
    assert scan.score > 0
    assert scan.sites["qk"].max() > 0
    qk = [p for p in scan.pathways if p["site"] == "qk"]
    assert qk
    pairs = {pair for p in qk for pair in p["pairs"]}
    assert any({f"tok:{X}", f"tok:{Y}"} == set(pair) for pair in pairs)


def test_monitor_refuses_bad_prompts(fitted):
    _, acg, _ = fitted
    mon = Monitor(acg)
    with pytest.raises(MonitorError, match="outside the vocabulary"):
        mon.score([[1, 2, 99]])
    with pytest.raises(MonitorError, match="1 to 12"):
        mon.score([list(range(13)) + [0]])


def test_auroc_and_detection_rate():
    neg, pos = np.arange(100.0), np.arange(50.0, 150.0)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(neg, pos) == pytest.approx(brute)
    assert auroc(np.zeros(5), np.ones(5)) == 1.0
    assert auroc(np.ones(5), np.ones(5)) == 0.5
    rate, thr = detection_at_fpr(neg, pos, 0.01)
    assert thr == 98.0 and rate == pytest.approx(51 / 100)


def test_diff_runs_every_kind_of_side(fitted, tmp_path):
    from helpers import dense_ir

    from acg import codegen
    from acg.compiler import acg as acg_io
    from acg.compiler.transformer import save_checkpoint
    from acg.ir import serialize

    model, acg, _ = fitted
    save_checkpoint(model, tmp_path / "ckpt")
    graph = dense_ir(model, "float32")
    serialize.save(graph, tmp_path / "ir")
    codegen.compile(graph, tmp_path / "py", "python")
    acg_io.save(acg, tmp_path / "acg")
    sides = {k: resolve(str(tmp_path / k)) for k in ("ckpt", "ir", "py", "acg")}
    assert {k: s.kind for k, s in sides.items()} == {"ckpt": "model", "ir": "ir", "py": "artefact", "acg": "acg"}
    data = {"random": _pairs(acg.cfg, 40, 5)}
    for k in ("ir", "py"):  # exact compilations: the same behaviour, nothing to explain
        out = diff(sides["ckpt"], sides[k], data, acg=acg)
        assert out["tasks"]["random"]["agreement"] == 1.0 and out["tasks"]["random"]["kl"] < 1e-6
    out = diff(sides["ckpt"], sides["acg"], data)  # the ACG side brings its own feature basis
    assert out["explained"] and out["kinds"] == ["model", "acg"]
