"""The model's parameter layout is a HookedTransformer state dict, and checkpoints load back exactly."""

from __future__ import annotations

import json

import pytest
import torch

from acg.compiler.transformer import ConfigError, Transformer, TransformerConfig, load_checkpoint, save_checkpoint


def small_cfg(**kw):
    base = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=12)
    return TransformerConfig(**{**base, **kw})


EXPECTED = {
    "embed.W_E": (11, 16),
    "pos_embed.W_pos": (12, 16),
    "unembed.W_U": (16, 11),
    "unembed.b_U": (11,),
    "ln_final.w": (16,),
    "ln_final.b": (16,),
    **{
        f"blocks.{layer}.{name}": shape
        for layer in range(2)
        for name, shape in {
            "ln1.w": (16,),
            "ln1.b": (16,),
            "ln2.w": (16,),
            "ln2.b": (16,),
            "attn.W_Q": (2, 16, 8),
            "attn.W_K": (2, 16, 8),
            "attn.W_V": (2, 16, 8),
            "attn.W_O": (2, 8, 16),
            "attn.b_Q": (2, 8),
            "attn.b_K": (2, 8),
            "attn.b_V": (2, 8),
            "attn.b_O": (16,),
            "mlp.W_in": (16, 32),
            "mlp.b_in": (32,),
            "mlp.W_out": (32, 16),
            "mlp.b_out": (16,),
        }.items()
    },
}


def test_state_dict_names_and_shapes_are_transformerlens():
    model = Transformer(small_cfg())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == EXPECTED


def test_shipped_testbed_layout():
    from acg.zoo.registry import ZOO, load

    for name, spec in ZOO.items():
        if not (spec.path / "model.safetensors").exists():
            pytest.skip(f"{name} weights not shipped yet")
        model = load(name)
        sd = model.state_dict()
        cfg = spec.cfg
        assert sd["blocks.0.attn.W_Q"].shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
        assert sd["blocks.0.attn.W_O"].shape == (cfg.n_heads, cfg.d_head, cfg.d_model)
        assert sd["blocks.0.mlp.W_in"].shape == (cfg.d_model, cfg.d_mlp)
        assert sd["unembed.W_U"].shape == (cfg.d_model, cfg.d_vocab_out)
        assert len(model.blocks) == cfg.n_layers
        config = json.loads((spec.path / "config.json").read_text())
        assert config["normalization_type"] == "LN" and config["act_fn"] == "gelu"
        assert config["positional_embedding_type"] == "standard"


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = Transformer(small_cfg()).init_weights(torch.Generator().manual_seed(0))
    save_checkpoint(model, tmp_path / "ckpt")
    again = load_checkpoint(tmp_path / "ckpt")
    tokens = torch.randint(0, 11, (3, 12))
    assert torch.equal(model(tokens), again(tokens))


def test_layer_norm_matches_torch_and_causality_holds():
    model = Transformer(small_cfg()).init_weights(torch.Generator().manual_seed(1)).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = torch.nn.functional.layer_norm(x, (16,), model.blocks[0].ln1.w, model.blocks[0].ln1.b, eps=1e-5)
    assert torch.allclose(model.blocks[0].ln1(x), ref, atol=1e-12)
    tokens = torch.randint(0, 11, (2, 8))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    assert torch.allclose(model(tokens)[:, :5], model(changed)[:, :5], atol=1e-12)  # the past ignores the future


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="normalization_type"):
        small_cfg(normalization_type="BatchNorm")
    with pytest.raises(ConfigError, match="act_fn"):
        small_cfg(act_fn="swiglu")
    with pytest.raises(ConfigError, match="rotary_dim"):
        TransformerConfig.from_dict({**small_cfg().to_dict(), "rotary_dim": 4})
    with pytest.raises(ConfigError, match="missing required key"):
        TransformerConfig.from_dict({"n_layers": 1})
    cfg = TransformerConfig.from_dict({**small_cfg().to_dict(), "model_name": "x", "use_hook_tokens": True})
    assert cfg == small_cfg()


def test_corrupt_checkpoints_are_refused(tmp_path):
    model = Transformer(small_cfg()).init_weights(torch.Generator().manual_seed(0))
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="model.safetensors"):
        load_checkpoint(ckpt)
    bad = dict(small_cfg().to_dict(), d_model=17)
    save_checkpoint(model, ckpt)
    (ckpt / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="shape"):
        load_checkpoint(ckpt)
    with torch.no_grad():
        model.blocks[0].mlp.W_in[0, 0] = float("nan")
    save_checkpoint(model, ckpt)
    with pytest.raises(ConfigError, match="NaN"):
        load_checkpoint(ckpt)


def test_a_checkpoint_changed_after_it_was_written_is_refused(tmp_path):
    model = Transformer(small_cfg()).init_weights(torch.Generator().manual_seed(0))
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    assert len(json.loads((ckpt / "meta.json").read_text())["content_hash"]) == 64
    with torch.no_grad():
        model.blocks[0].mlp.W_in[0, 0] += 1.0
    other = save_checkpoint(model, tmp_path / "other")
    (ckpt / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())  # valid, but not this one
    with pytest.raises(ConfigError, match="content hash mismatch"):
        load_checkpoint(ckpt)


def test_the_embedding_gradient_repeats_bit_for_bit_with_two_threads():
    """A seed must give the same fine-tuned model every run: the token lookup's backward has to add up the gradients
    of repeated tokens in a fixed order (indexing's backward, index_put_ with accumulate, does not on 2+ threads)."""
    cfg = TransformerConfig(n_layers=1, d_model=128, n_heads=2, d_head=8, d_mlp=32, d_vocab=64, n_ctx=40)
    model = Transformer(cfg).init_weights(torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 64, (512, 40), generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            model(tokens).square().mean().backward()
            grads.append(model.embed.W_E.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])
