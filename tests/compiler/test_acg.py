"""The ACG: lowering is exact with error terms (and with exact features), the replacement IR equals the torch
replacement model, capture drops only what was never used, the folder round-trips, dictionaries convert losslessly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import random_model, random_tokens, torch_logits

from acg.compiler import acg as acg_io
from acg.compiler import interop
from acg.compiler.acg import ACG
from acg.compiler.fit import FitSpec, fit
from acg.compiler.lower import lower
from acg.compiler.replacement import replacement_model
from acg.compiler.transcoder import Transcoder, TranscoderError, exact_transcoder
from acg.ir import interpret
from acg.ir.passes import get_pass, run_pipeline


@pytest.fixture(scope="module")
def fitted():
    model = random_model(seed=51, d_vocab=13, n_ctx=12, act_fn="relu")
    rng = np.random.default_rng(0)
    corpus = [list(map(int, rng.integers(0, 13, rng.integers(3, 12)))) for _ in range(200)]
    acg, stats = fit(model, corpus, FitSpec(width=48, steps=120, usage_prompts=80), progress=False)
    return model, acg, stats


def _exact_acg(model):
    w = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    tcs = tuple(
        exact_transcoder(
            w[f"blocks.{i}.mlp.W_in"],
            w[f"blocks.{i}.mlp.b_in"],
            w[f"blocks.{i}.mlp.W_out"],
            w[f"blocks.{i}.mlp.b_out"],
            model.cfg.act_fn,
        )
        for i in range(model.cfg.n_layers)
    )
    return ACG(model.cfg, w, tcs)


@pytest.mark.parametrize("norm", ["LN", "RMS", "LNPre", None])
@pytest.mark.parametrize("qk_tables", [False, True])
def test_exact_mode_is_exact_with_or_without_errors(norm, qk_tables):
    model = random_model(seed=52, normalization_type=norm, act_fn="gelu")
    acg = _exact_acg(model)
    tokens = random_tokens(model.cfg)
    ref = torch_logits(model, tokens)
    for keep in (True, False):
        graph = lower(acg, keep_errors=keep, dtype="float64", qk_tables=qk_tables)
        assert np.abs(interpret.run(graph, tokens)["logits"] - ref).max() <= 1e-9


@pytest.mark.parametrize("qk_tables", [False, True])
def test_fitted_acg_errors_kept_is_the_model_and_dropped_is_the_replacement(fitted, qk_tables):
    model, acg, _ = fitted
    tokens = random_tokens(model.cfg)
    exact = lower(acg, keep_errors=True, dtype="float64", qk_tables=qk_tables)
    assert np.abs(interpret.run(exact, tokens)["logits"] - torch_logits(model, tokens)).max() <= 1e-9
    repl = lower(acg, keep_errors=False, dtype="float64", qk_tables=qk_tables)
    ref = torch_logits(replacement_model(model.double(), acg.transcoders), tokens)
    assert np.abs(interpret.run(repl, tokens)["logits"] - ref).max() <= 1e-9


def test_attention_is_computed_from_features_not_frozen(fitted):
    """Change a key-side token: the replacement's attention pattern at the last query changes with it."""
    model, acg, _ = fitted
    graph = lower(acg, keep_errors=False, dtype="float64")
    a = np.array([[1, 2, 3, 4, 5, 6]])
    b = a.copy()
    b[0, 2] = 9
    pa = interpret.run(graph, a, keep=True)["L0_pattern"][0, :, -1]
    pb = interpret.run(graph, b, keep=True)["L0_pattern"][0, :, -1]
    assert not np.allclose(pa, pb)


def test_capture_drops_only_unused_entries(fitted):
    model, acg, _ = fitted
    graph = lower(acg, keep_errors=False, dtype="float64", usage=True, qk_tables=True)
    captured, [report] = run_pipeline(graph, ["capture"])
    assert report["changed"]
    kinds = report["by_kind"]
    assert {"edge", "feature", "qk", "ov"} <= set(kinds)
    for k, v in kinds.items():
        assert v["mass_dropped"] == 0.0, k  # threshold 0: exactly what never carried mass
    # on corpus-like prompts that only use seen tokens, behaviour stays close
    tokens = np.array([acg_seq[:6] for acg_seq in [[1, 2, 3, 4, 5, 6, 7]]])
    before = interpret.run(graph, tokens)["logits"]
    after = interpret.run(captured, tokens)["logits"]
    assert np.isfinite(after).all() and before.shape == after.shape


def test_capture_restricted_to_named_weights_touches_nothing_else(fitted):
    _, acg, _ = fitted
    graph = lower(acg, keep_errors=False, dtype="float64", usage=True, qk_tables=True)
    full, _ = run_pipeline(graph, ["capture"])
    only, [report] = run_pipeline(graph, [get_pass("capture", weights=("T.L0",))])
    assert set(report["by_kind"]) == {"qk"}
    np.testing.assert_array_equal(only.tensors["T.L0"], full.tensors["T.L0"])
    changed = {k for k in graph.tensors if not np.array_equal(graph.tensors[k], only.tensors[k])}
    assert changed == {"T.L0"}


def test_unseen_token_is_dropped_by_capture():
    model = random_model(seed=53, d_vocab=13, n_ctx=12, act_fn="relu")
    corpus = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]] * 30  # tokens 0 and 8..12 never occur
    threads = torch.get_num_threads()
    acg, _ = fit(model, corpus, FitSpec(width=32, steps=60, usage_prompts=40, threads=threads + 1), progress=False)
    assert torch.get_num_threads() == threads  # the fit's own threads, the caller's given back
    assert acg.usage["tok_count"][[0, 8, 12]].sum() == 0
    graph = lower(acg, keep_errors=False, dtype="float64", usage=True)
    captured, _ = run_pipeline(graph, [("capture")])
    assert not captured.tensors["D.tok"][12].any() and captured.tensors["D.tok"][3].any()
    assert not captured.tensors["V.L0.enc.tok"][12].any()


def test_acg_folder_round_trip_and_corruption(tmp_path, fitted):
    model, acg, _ = fitted
    acg_io.save(acg, tmp_path / "a")
    again = acg_io.load(tmp_path / "a")
    acg_io.save(again, tmp_path / "b")
    for f in ("acg.json", "tensors.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    doc = json.loads((tmp_path / "a" / "acg.json").read_text())
    doc["stats"]["n_prompts"] = 1
    (tmp_path / "a" / "acg.json").write_text(json.dumps(doc))
    with pytest.raises(acg_io.ACGFormatError, match="content hash"):
        acg_io.load(tmp_path / "a")
    with pytest.raises(acg_io.ACGFormatError, match="not an ACG folder"):
        acg_io.load(tmp_path / "nope")


def test_dictionary_for_another_model_is_refused(fitted):
    model, acg, _ = fitted
    other = Transcoder(np.zeros((7, 4)), np.zeros(4), np.zeros((4, 7)), np.zeros(7))
    with pytest.raises(acg_io.ACGFormatError, match="another model"):
        ACG(acg.cfg, acg.weights, (other, other))
    with pytest.raises(TranscoderError, match="W_dec"):
        Transcoder(np.zeros((7, 4)), np.zeros(4), np.zeros((5, 7)), np.zeros(7))


@pytest.mark.parametrize("fmt", ["saelens", "circuit-tracer", "circuit-tracer-clt"])
def test_interop_round_trips_bit_for_bit(tmp_path, fitted, fmt):
    _, acg, _ = fitted
    tcs = acg.transcoders
    if fmt == "saelens":
        back = interop.load_saelens(interop.save_saelens(tcs, tmp_path / "x"))
    else:
        back = interop.load_circuit_tracer(
            interop.save_circuit_tracer(tcs, tmp_path / "x", cross_layer=fmt.endswith("clt"))
        )
    for a, b in zip(tcs, back, strict=True):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            x, y = getattr(a, name), getattr(b, name)
            if x is None:
                assert y is None
            else:  # the formats store float32: the float32 dictionary comes back bit for bit
                assert np.array_equal(x.astype(np.float32), y.astype(np.float32)), name
        assert a.act == b.act
    # and a second export of the import is byte-identical
    if fmt == "saelens":
        again = interop.save_saelens(back, tmp_path / "y")
        for f in ("cfg.json", "sae_weights.safetensors"):
            assert (tmp_path / "x" / "layer_0" / f).read_bytes() == (again / "layer_0" / f).read_bytes()


def test_genuine_cross_layer_transcoders_are_refused(tmp_path, fitted):
    from safetensors.numpy import load_file, save_file

    _, acg, _ = fitted
    path = interop.save_circuit_tracer(acg.transcoders, tmp_path / "clt", cross_layer=True)
    dec = load_file(str(path / "W_dec_0.safetensors"))
    dec["W_dec_0"][:, 1] = 1.0
    save_file(dec, str(path / "W_dec_0.safetensors"))
    with pytest.raises(interop.InteropError, match="write into later layers"):
        interop.load_circuit_tracer(path)


def test_transcoder_fit_is_deterministic():
    from acg.compiler.transcoder import FitConfig, fit_transcoder

    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8))
    y = np.maximum(x @ rng.normal(size=(8, 8)), 0)
    cfg = FitConfig(width=16, steps=40, batch_size=128)
    a, _ = fit_transcoder(x, y, cfg)
    b, _ = fit_transcoder(x, y, cfg)
    assert np.array_equal(a.W_enc, b.W_enc) and np.array_equal(a.threshold, b.threshold)
    with pytest.raises(TranscoderError, match="empty corpus"):
        fit_transcoder(x[:0], y[:0], cfg)


def test_torch_replacement_matches_direct_transcoders(fitted):
    model, acg, _ = fitted
    repl = replacement_model(model.double(), acg.transcoders)
    assert isinstance(repl.blocks[0].mlp, torch.nn.Module)


def test_jumprelu_fit_lands_on_its_target_l0_and_beats_the_mean():
    """BatchTopK training, then one global JumpReLU threshold: on a small model's own MLP activations the dictionary
    fires `target_l0` features per token and reconstructs the MLP far better than its mean does (whatever the scale
    of the activations: the decoder starts at the targets' scale)."""
    from acg.compiler.harvest import harvest
    from acg.compiler.transcoder import FitConfig, evaluate_transcoder, fit_transcoder

    model = random_model(seed=51, d_vocab=13, n_ctx=12, act_fn="relu")
    rng = np.random.default_rng(0)
    acts = harvest(
        model, [list(map(int, rng.integers(0, 13, rng.integers(3, 12)))) for _ in range(400)], progress=False
    )
    x, y = acts.mlp_in[0], acts.mlp_out[0]
    for scale in (1.0, 50.0):
        tc, _ = fit_transcoder(x, y * scale, FitConfig(width=64, steps=300, batch_size=256, target_l0=8))
        metrics = evaluate_transcoder(tc, x, y * scale)
        assert 7.0 <= metrics["l0"] <= 9.0 and metrics["nmse"] < 0.4, (scale, metrics)
        assert tc.act == "jumprelu" and np.ptp(tc.threshold) == 0.0  # one global threshold after BatchTopK


def test_calibration_is_exact_whatever_the_features_scales():
    """The threshold puts exactly target_l0 * rows pre-activations above it, also when features differ in scale with a
    period that a strided sample of the flattened [rows, features] tensor would alias (this one had: l0 9% high)."""
    from acg.compiler.transcoder import _Module

    gen = torch.Generator().manual_seed(0)
    module = _Module(4, 2048, "jumprelu", 0.1, gen, torch.zeros(4), 1.0)
    scale = 1.0 + 3.0 * (torch.arange(2048) % 8 == 0)  # every 8th feature four times larger
    pre = torch.randn(3000, 2048, generator=gen) * scale
    module.calibrate(pre, 30.0)
    l0 = float((pre > module.tau).sum(1).float().mean())
    assert abs(l0 - 30.0) < 1e-3


def test_transcoder_metrics_do_not_depend_on_the_chunk_size():
    """evaluate_transcoder works in chunks of rows (a whole corpus's feature matrix does not fit): same figures."""
    from acg.compiler.transcoder import Transcoder, evaluate_transcoder

    rng = np.random.default_rng(5)
    tc = Transcoder(rng.normal(size=(8, 12)), rng.normal(size=12) - 1.0, rng.normal(size=(12, 8)), rng.normal(size=8))
    x, y = rng.normal(size=(301, 8)).astype(np.float32), rng.normal(size=(301, 8)).astype(np.float32)
    whole, chunked = evaluate_transcoder(tc, x, y, chunk=10**9), evaluate_transcoder(tc, x, y, chunk=7)
    assert whole.keys() == chunked.keys()
    for k in whole:
        assert chunked[k] == pytest.approx(whole[k], rel=1e-12)
    f = tc.encode(x.astype(np.float64))
    assert whole["l0"] == pytest.approx(float((f != 0).sum(-1).mean()))
    assert whole["dead_fraction"] == pytest.approx(float((~(f != 0).any(0)).mean()))
