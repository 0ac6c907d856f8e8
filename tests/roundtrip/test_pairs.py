"""Layer 0's captured QK pairs carried into dense weights: the wider checkpoint computes the IR with layer 0's pair
table captured (float32, relative error <= 1e-5) on fresh random inputs, which differs from the plain round trip on
prompts that mix tokens the corpus never put together; it loads through the front end; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_model, rel_err

from acg.compiler.fit import FitSpec, fit
from acg.compiler.lower import lower
from acg.compiler.transformer import load_checkpoint
from acg.ir import interpret
from acg.roundtrip import dense, pairs
from acg.roundtrip.dense import RoundtripError


def _fit(seed: int, kind: str = "jumprelu", **cfg):
    """An ACG fitted on prompts drawn from one of two token groups, never both: pairs across groups are never seen."""
    model = random_model(seed=seed, act_fn="relu", **{"d_model": 32, "n_heads": 2, "d_head": 6, **cfg})
    rng = np.random.default_rng(seed)
    groups = (np.arange(0, 5), np.arange(5, 10))
    corpus = [list(map(int, rng.choice(groups[i % 2], rng.integers(3, model.cfg.n_ctx)))) for i in range(200)]
    acg, _ = fit(
        model,
        corpus,
        FitSpec(width=40, steps=80, kind=kind, target_l0=8, e2e_steps=0, usage_prompts=200),
        progress=False,
    )
    return acg


def _mixed(cfg, seed: int, batch: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10, (batch, int(rng.integers(4, cfg.n_ctx + 1))))


@pytest.mark.parametrize(
    "seed,kind,cfg,block",
    [(0, "jumprelu", {}, None), (1, "relu", {"n_layers": 3, "n_heads": 3}, None), (2, "relu", {}, 1.0)],
)
def test_carried_checkpoint_computes_the_ir_with_layer0_pairs_captured(tmp_path, seed, kind, cfg, block):
    acg = _fit(seed, kind, **cfg)
    pruned, _ = dense.prune(acg, dense.select_captured(acg))
    wide, report = pairs.carry(pruned, block=block)
    assert report["pairs"]["dropped"] > 0
    assert report["blocked"] == (0 if block is None else report["pairs"]["dropped"])
    assert report["table_error"] < 1e-9
    assert wide.cfg.d_head == report["d_head"] > pruned.cfg.d_head
    assert wide.cfg.attn_scale == pruned.cfg.attn_scale
    model = dense.to_dense(wide)
    dense.save(model, tmp_path / "ckpt", {"pairs": report})
    loaded = load_checkpoint(tmp_path / "ckpt")
    reference, _ = pairs.reference_ir(pruned, block=block, dtype="float32")
    # the plain round trip, or (blocked) the one whose dropped pairs add 0: the carried table must differ from it
    plain = lower(pruned, keep_errors=False, dtype="float32") if block is None else pairs.reference_ir(pruned)[0]
    moved = 0.0
    for trial in range(3):
        toks = _mixed(pruned.cfg, 100 * seed + trial)
        want = interpret.run(reference, toks, dtype="float32")["logits"]
        with torch.no_grad():
            got = model(torch.as_tensor(toks)).numpy()
            again = loaded(torch.as_tensor(toks)).numpy()
        assert rel_err(got, want) <= 1e-5
        np.testing.assert_array_equal(got, again)
        moved = max(moved, rel_err(interpret.run(plain, toks, dtype="float32")["logits"], want))
    assert moved > 1e-3  # the dropped pairs matter on mixed prompts: the test can tell the two apart


def test_left_out_tokens_read_as_the_mean_read_the_kept_tokens_pairs_as_the_mean():
    """A mean ablation makes every left-out token's row the kept rows' mean: the captured table's entries for them are
    that mean of the kept tokens' captured entries (`pairs.read_as_mean`), which the carried heads compute; captured
    each on its own instead, the table is no bilinear form of the rows."""
    acg = _fit(4)
    captured = dense.select_captured(acg)
    kept = captured.tokens & (np.arange(acg.cfg.d_vocab) < 6)  # 6-9 (seen) and 10-12 (never seen) read as the mean
    sel = dense.Selection(captured.features, kept, captured.positions, token_fill=acg.usage["tok_count"])
    model, pruned, report = dense.roundtrip(acg, sel, block=1.0)
    assert report["token_fill"] == "mean" and report["pairs"]["table_error"] < 1e-9
    reference, ir_report = pairs.reference_ir(pruned, block=1.0, dtype="float32")
    assert ir_report["filled"] == acg.cfg.d_vocab - 6 and ir_report["blocked"] > 0
    T = reference.tensors["T.L0"]
    w = np.asarray(pruned.meta["roundtrip"]["fill"]["weights"])
    np.testing.assert_allclose(T[:, 8, 20], np.einsum("s,hs->h", w, T[:, : len(w), 20]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(T[:, 3, 11], np.einsum("t,ht->h", w, T[:, 3, : len(w)]), rtol=1e-5, atol=1e-6)
    toks = np.random.default_rng(4).integers(0, acg.cfg.d_vocab, (6, acg.cfg.n_ctx))
    with torch.no_grad():
        got = model(torch.as_tensor(toks)).numpy()
    assert rel_err(got, interpret.run(reference, toks, dtype="float32")["logits"]) <= 1e-5
    meta = {**pruned.meta, "roundtrip": {k: v for k, v in pruned.meta["roundtrip"].items() if k != "fill"}}
    with pytest.raises(RoundtripError, match="not a bilinear form"):
        pairs.carry(pruned.replace(meta=meta), block=1.0)


def test_padding_is_not_counted_as_parameters():
    acg = _fit(0)
    pruned, _ = dense.prune(acg, dense.select_captured(acg))
    wide, report = pairs.carry(pruned)
    before, after = dense.n_params(dense.to_dense(pruned)), dense.n_params(dense.to_dense(wide))
    cfg = pruned.cfg
    extra_qk = sum(report["rank_per_head"]) - cfg.n_heads * cfg.d_head  # layer 0's query / key dims, added
    assert after["n_params"] - before["n_params"] == extra_qk * (2 * cfg.d_model + 2)
    assert after["n_params_mlp"] == before["n_params_mlp"]


def test_refuses_what_it_cannot_carry():
    acg = _fit(0)
    pruned, _ = dense.prune(acg, dense.select_captured(acg))
    with pytest.raises(RoundtripError, match="no layer-0 QK pair statistics"):
        pairs.carry(pruned.replace(usage={k: v for k, v in pruned.usage.items() if k != "qk.L0"}))
    with pytest.raises(RoundtripError, match="centring layer norm"):
        pairs.carry(pruned.replace(cfg=pruned.cfg.__class__(**{**pruned.cfg.__dict__, "normalization_type": "RMS"})))
    with pytest.raises(RoundtripError, match="block must be positive"):
        pairs.carry(pruned, block=0.0)
    w = dict(pruned.weights)
    w["embed.W_E"] = w["embed.W_E"].copy()
    w["embed.W_E"][7] = w["embed.W_E"][1]  # one row for two tokens of different groups: their captured rows differ
    with pytest.raises(RoundtripError, match="not a bilinear form"):
        pairs.carry(pruned.replace(weights=w))
    narrow = _fit(2, d_model=16, n_heads=2, d_head=4)  # 13 tokens + 12 positions in 15 centred dimensions
    pruned, _ = dense.prune(narrow, dense.select_captured(narrow))
    with pytest.raises(RoundtripError, match="cannot be linearly independent"):
        pairs.carry(pruned)


def test_hooked_transformer_runs_the_widened_checkpoint():
    tl = pytest.importorskip("transformer_lens")
    acg = _fit(3, kind="relu")
    rt, _, report = dense.roundtrip(acg, dense.select_captured(acg), block=1.0)
    assert rt.cfg.d_head == report["pairs"]["d_head"] and rt.cfg.attn_scale != rt.cfg.d_head**0.5
    keys = {k: v for k, v in rt.cfg.to_dict().items() if k != "original_architecture"}
    hooked = tl.HookedTransformer(tl.HookedTransformerConfig(**keys))
    missing, unexpected = hooked.load_state_dict(rt.state_dict(), strict=False)
    assert not unexpected and all(k.endswith((".mask", ".IGNORE")) for k in missing)
    toks = _mixed(rt.cfg, 5)
    with torch.no_grad():
        assert rel_err(hooked(torch.as_tensor(toks)).numpy(), rt(torch.as_tensor(toks)).numpy()) <= 1e-5


def test_blocked_roundtrip_is_skipped_with_the_reason_where_the_shape_does_not_allow_it():
    from acg.roundtrip.backdoor import blocked_roundtrip

    said: list[str] = []
    model, _, report = blocked_roundtrip(_fit(0), said.append)
    assert report["pairs"]["block"] == 1.0 and not said
    narrow = _fit(2, d_model=16, n_heads=2, d_head=4)
    assert blocked_roundtrip(narrow, said.append) is None
    assert len(said) == 1 and "cannot be linearly independent" in said[0]
