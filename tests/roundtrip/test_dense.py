"""Round trip: the dense checkpoint computes what the IR of the pruned ACG computes (float32, relative error <= 1e-5),
on random configurations and fresh random inputs; it loads through the front end, and as GPT-2 through transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_model, random_tokens, rel_err

from acg.compiler.fit import FitSpec, fit
from acg.compiler.lower import lower
from acg.compiler.replacement import replacement_model
from acg.compiler.transformer import load_checkpoint
from acg.ir import interpret
from acg.roundtrip import dense
from acg.roundtrip.hf_export import save_gpt2


def _fit(seed: int, kind: str = "jumprelu", **cfg):
    model = random_model(seed=seed, act_fn="relu", **cfg)
    rng = np.random.default_rng(seed)
    V = model.cfg.d_vocab
    corpus = [list(map(int, rng.integers(0, V - 3, rng.integers(3, model.cfg.n_ctx)))) for _ in range(150)]
    acg, _ = fit(
        model,
        corpus,
        FitSpec(width=40, steps=80, kind=kind, target_l0=8, e2e_steps=0, usage_prompts=60),
        progress=False,
    )
    return model, acg


def _logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).numpy()


@pytest.mark.parametrize(
    "seed,kind,cfg",
    [
        (0, "jumprelu", {}),
        (1, "relu", {"normalization_type": "RMS"}),
        (2, "jumprelu", {"n_layers": 3, "n_heads": 4, "d_head": 4}),
        (3, "relu", {"normalization_type": None, "attention_dir": "bidirectional"}),
    ],
)
def test_checkpoint_computes_the_ir_it_came_from(tmp_path, seed, kind, cfg):
    _, acg = _fit(seed, kind, **cfg)
    sel = dense.select_captured(acg)
    model, pruned, report = dense.roundtrip(acg, sel)
    assert report["n_features"] == [len(f) for f in sel.features]
    assert report["tokens_dropped"] == 3  # the corpus never uses the last three tokens
    dense.save(model, tmp_path / "ckpt", report)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg.act_fn == {"jumprelu": "jumprelu", "relu": "relu"}[kind]
    graph = lower(pruned, keep_errors=False, dtype="float32")
    for trial in range(3):
        toks = random_tokens(model.cfg, batch=4, seed=100 * seed + trial)
        ir = interpret.run(graph, toks, dtype="float32")["logits"]
        assert rel_err(_logits(loaded, toks), ir) <= 1e-5
        # and the dense checkpoint is the torch replacement model of the pruned ACG
        assert rel_err(_logits(loaded, toks), _logits(replacement_model(loaded, pruned.transcoders), toks)) <= 1e-5


def test_select_all_is_the_replacement_model_and_dropped_tokens_are_gone():
    model, acg = _fit(5)
    full, _, report = dense.roundtrip(acg)
    toks = random_tokens(model.cfg, batch=3, seed=1)
    assert rel_err(_logits(full, toks), _logits(replacement_model(model, acg.transcoders), toks)) <= 1e-5
    assert report["tokens_dropped"] == 0 and report["n_features"] == acg.n_features()
    captured, _, _ = dense.roundtrip(acg, dense.select_captured(acg))
    assert not captured.embed.W_E[-3:].any() and captured.embed.W_E[0].any()


def test_attention_writes_are_restricted_to_the_kept_span():
    _, acg = _fit(6, d_model=32, n_heads=2, d_head=16, d_vocab=9)
    keep = (np.arange(2), np.arange(3))  # 2 + 3 decoder rows, <= 6 tokens, 12 positions: rank < 32
    sel = dense.Selection(keep, np.arange(9) < 6, np.ones(12, bool), restrict_attention=True, source="test")
    model, pruned, report = dense.roundtrip(acg, sel)
    assert report["subspace_rank"] < 32 and report["n_features"] == [2, 3]
    basis = dense.span_basis(
        np.concatenate(
            [pruned.weights["embed.W_E"][:6], pruned.weights["pos_embed.W_pos"]]
            + [tc.W_dec for tc in pruned.transcoders]
            + [tc.b_dec[None] for tc in pruned.transcoders]
            + [pruned.weights[f"blocks.{i}.attn.b_O"][None] for i in range(2)]
        )
    )
    W_O = model.blocks[1].attn.W_O.detach().double().numpy().reshape(-1, 32)
    assert np.abs(W_O - W_O @ basis.T @ basis).max() < 1e-5
    assert report["n_params_mlp"] == (2 + 3) * (2 * 32 + 2) + 2 * 32


def test_a_mean_ablation_reads_left_out_tokens_as_the_kept_ones_weighted_mean():
    model, acg = _fit(8)
    V = acg.cfg.d_vocab
    kept = np.arange(V) < 6
    weights = np.arange(V, dtype=float)  # weights on tokens left out count for nothing
    sel = dense.Selection(tuple(np.arange(n) for n in acg.n_features()), kept, np.ones(acg.cfg.n_ctx, bool))
    filled = dense.Selection(sel.features, kept, sel.positions, token_fill=weights)
    rt, pruned, report = dense.roundtrip(acg, filled)
    W_E = acg.weights["embed.W_E"]
    want = (weights[:6] @ W_E[:6]) / weights[:6].sum()
    np.testing.assert_allclose(pruned.weights["embed.W_E"][6:], np.broadcast_to(want, (V - 6, W_E.shape[1])))
    np.testing.assert_array_equal(pruned.weights["embed.W_E"][:6], W_E[:6])
    assert report["token_fill"] == "mean" and dense.roundtrip(acg, sel)[2]["token_fill"] == "zero"
    graph = lower(pruned, keep_errors=False, dtype="float32")
    toks = random_tokens(model.cfg, batch=4, seed=3)
    assert rel_err(_logits(rt, toks), interpret.run(graph, toks, dtype="float32")["logits"]) <= 1e-5
    assert rel_err(_logits(rt, toks), _logits(dense.roundtrip(acg, sel)[0], toks)) > 1e-3  # the fill is read
    fill = pruned.meta["roundtrip"]["fill"]  # for layer 0's pair table (`pairs.reference_ir`)
    assert fill["filled"] == list(range(6, V)) and np.allclose(fill["weights"], np.r_[weights[:6], [0] * (V - 6)] / 15)
    for bad in (np.ones(V - 1), -np.ones(V)):
        with pytest.raises(dense.RoundtripError, match="token_fill must be"):
            dense.prune(acg, dense.Selection(sel.features, kept, sel.positions, token_fill=bad))
    # no weight on any kept token: nothing to average, the left-out tokens are zeroed as without a fill
    unweighted, _ = dense.prune(acg, dense.Selection(sel.features, kept, sel.positions, token_fill=1.0 * ~kept))
    assert not unweighted.weights["embed.W_E"][6:].any()


def test_bad_selection_is_refused():
    _, acg = _fit(7)
    with pytest.raises(dense.RoundtripError, match="layers"):
        dense.prune(acg, dense.Selection((np.arange(2),), np.ones(13, bool), np.ones(12, bool)))
    with pytest.raises(dense.RoundtripError, match="out of range"):
        dense.prune(acg, dense.Selection((np.arange(2), np.array([99])), np.ones(13, bool), np.ones(12, bool)))
    with pytest.raises(dense.RoundtripError, match="usage statistics"):
        dense.select_captured(acg.replace(usage={}))


def test_gpt2_directory_loads_in_transformers_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    _, acg = _fit(8, kind="relu", d_vocab=13, d_model=16)  # d_vocab <= d_model: b_U folds into ln_f exactly
    b_U = np.random.default_rng(0).normal(size=13)
    rt, _, _ = dense.roundtrip(acg.replace(weights={**acg.weights, "unembed.b_U": b_U}))
    save_gpt2(rt, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    toks = random_tokens(rt.cfg, batch=3, seed=2)
    with torch.no_grad():
        got = hf(torch.as_tensor(toks)).logits.numpy()
    assert rel_err(got, _logits(rt, toks)) <= 1e-5


def test_gpt2_export_refuses_jumprelu(tmp_path):
    _, acg = _fit(9)
    rt, _, _ = dense.roundtrip(acg)
    with pytest.raises(dense.RoundtripError, match="kind relu"):
        save_gpt2(rt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hooked_transformer_loads_a_relu_round_trip(tmp_path):
    tl = pytest.importorskip("transformer_lens")
    _, acg = _fit(10, kind="relu")
    rt, _, report = dense.roundtrip(acg, dense.select_captured(acg))
    keys = {k: v for k, v in rt.cfg.to_dict().items() if k not in ("attn_scale", "original_architecture")}
    hooked = tl.HookedTransformer(tl.HookedTransformerConfig(**keys))
    missing, unexpected = hooked.load_state_dict(rt.state_dict(), strict=False)
    assert not unexpected and all(k.endswith((".mask", ".IGNORE")) for k in missing)
    toks = random_tokens(rt.cfg, batch=2, seed=3)
    with torch.no_grad():
        got = hooked(torch.as_tensor(toks)).numpy()
    assert rel_err(got, _logits(rt, toks)) <= 1e-5
