"""Front end for Hugging Face models, as objects or local folders (never downloads): GPT-2 (`GPT2LMHeadModel`,
`GPT2Model`) maps key by key onto the TransformerLens layout; BERT-family encoders (`BertModel`, post-norm, with an
attention mask) get their own emitter built from the same parts. Output: logits for an LM head, else the final
hidden states [batch, seq, d_model]."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from acg.compiler.safe import load_pickled, pickled_weights
from acg.compiler.tlayout import ACT_OPS, const_reader, emit_attention, emit_mlp, emit_norm
from acg.compiler.tlayout import to_ir as tl_to_ir
from acg.compiler.transformer import ConfigError, TransformerConfig
from acg.ir.builder import GraphBuilder
from acg.ir.graph import Graph

HF_ACTS = {
    "gelu_new": "gelu_new",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "gelu_fast": "gelu_fast",
}


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _act(name: str, source: str) -> str:
    if name not in HF_ACTS:
        raise ConfigError(f"{source}: activation {name!r} is not supported; supported: {', '.join(HF_ACTS)}")
    return HF_ACTS[name]


def load_dir(path: str | os.PathLike):
    """A local Hugging Face folder as a model object (`local_files_only`: nothing is downloaded; safetensors only)."""
    try:
        from transformers import AutoConfig, BertModel, GPT2LMHeadModel, GPT2Model
    except ImportError:
        raise ConfigError(f"{path}: a Hugging Face folder needs `transformers` (pip install transformers)") from None
    path = Path(path)
    state = None
    if not (path / "model.safetensors").exists():
        pickled = pickled_weights(path)
        if pickled is None:
            raise ConfigError(f"{path}: no model.safetensors (acg loads safetensors; pickles only with --allow-pickle)")
        state = load_pickled(pickled)  # refused unless allowed; weights-only unpickler
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    archs = config.architectures or []
    if config.model_type == "gpt2":
        cls = GPT2Model if archs == ["GPT2Model"] else GPT2LMHeadModel
    elif config.model_type == "bert":
        cls = BertModel
    else:
        raise ConfigError(f"{path}: model_type {config.model_type!r} is not supported; supported: gpt2, bert")
    if state is not None:
        model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise ConfigError(f"{path}: the pickled weights lack {', '.join(missing[:5])}")
        return model.eval()
    return cls.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()


def gpt2_weights(model) -> tuple[TransformerConfig, dict[str, np.ndarray], bool]:
    """GPT-2 -> (TransformerLens config, TL-named weights, has an LM head), key by key."""
    c = model.config
    source = type(model).__name__
    for key, neutral in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if getattr(c, key, neutral) != neutral:
            raise ConfigError(f"{source}: config {key} = {getattr(c, key)!r} is not supported")
    if not getattr(c, "scale_attn_weights", True):
        raise ConfigError(f"{source}: config scale_attn_weights = False is not supported")
    has_head = hasattr(model, "lm_head")
    tr = model.transformer if has_head else model
    d, h = c.n_embd, c.n_head
    e = d // h
    cfg = TransformerConfig(
        n_layers=c.n_layer,
        d_model=d,
        n_heads=h,
        d_head=e,
        d_mlp=c.n_inner or 4 * d,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn=_act(c.activation_function, source),
        normalization_type="LN",
        eps=float(c.layer_norm_epsilon),
    )
    w: dict[str, np.ndarray] = {"embed.W_E": _np(tr.wte.weight), "pos_embed.W_pos": _np(tr.wpe.weight)}
    for layer, block in enumerate(tr.h):
        p = f"blocks.{layer}"
        w[f"{p}.ln1.w"], w[f"{p}.ln1.b"] = _np(block.ln_1.weight), _np(block.ln_1.bias)
        w[f"{p}.ln2.w"], w[f"{p}.ln2.b"] = _np(block.ln_2.weight), _np(block.ln_2.bias)
        qkv, qkv_b = _np(block.attn.c_attn.weight), _np(block.attn.c_attn.bias)  # Conv1D: x @ W, W [d, 3d]
        for i, m in enumerate("QKV"):
            w[f"{p}.attn.W_{m}"] = qkv[:, i * d : (i + 1) * d].reshape(d, h, e).transpose(1, 0, 2)
            w[f"{p}.attn.b_{m}"] = qkv_b[i * d : (i + 1) * d].reshape(h, e)
        w[f"{p}.attn.W_O"] = _np(block.attn.c_proj.weight).reshape(h, e, d)
        w[f"{p}.attn.b_O"] = _np(block.attn.c_proj.bias)
        w[f"{p}.mlp.W_in"], w[f"{p}.mlp.b_in"] = _np(block.mlp.c_fc.weight), _np(block.mlp.c_fc.bias)
        w[f"{p}.mlp.W_out"], w[f"{p}.mlp.b_out"] = _np(block.mlp.c_proj.weight), _np(block.mlp.c_proj.bias)
    w["ln_final.w"], w["ln_final.b"] = _np(tr.ln_f.weight), _np(tr.ln_f.bias)
    if has_head:
        w["unembed.W_U"] = _np(model.lm_head.weight).T
        w["unembed.b_U"] = np.zeros(c.vocab_size)
    return cfg, w, has_head


def bert_to_ir(model, dtype: str) -> Graph:
    """A BERT encoder: embeddings (word + position + token type 0) -> LayerNorm, then post-norm blocks; inputs
    `tokens` and `attention_mask` (1 keep, 0 pad); output the last hidden state."""
    c = model.config
    source = type(model).__name__
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{source}: position_embedding_type {c.position_embedding_type!r} is not supported")
    if getattr(c, "is_decoder", False):
        raise ConfigError(f"{source}: decoder BERT is not supported")
    d, h = c.hidden_size, c.num_attention_heads
    e = d // h
    cfg = TransformerConfig(
        n_layers=c.num_hidden_layers,
        d_model=d,
        n_heads=h,
        d_head=e,
        d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size,
        n_ctx=c.max_position_embeddings,
        act_fn=_act(c.hidden_act, source),
        normalization_type="LN",
        attention_dir="bidirectional",
        eps=float(c.layer_norm_eps),
    )
    emb = model.embeddings
    weights: dict[str, np.ndarray] = {
        "embed.W_E": _np(emb.word_embeddings.weight),
        "pos_embed.W_pos": _np(emb.position_embeddings.weight),
        "embed.token_type_0": _np(emb.token_type_embeddings.weight[0]),
        "embed.ln.w": _np(emb.LayerNorm.weight),
        "embed.ln.b": _np(emb.LayerNorm.bias),
    }
    for layer, block in enumerate(model.encoder.layer):
        p = f"blocks.{layer}"
        att = block.attention
        for m, lin in zip("QKV", (att.self.query, att.self.key, att.self.value), strict=True):
            weights[f"{p}.attn.W_{m}"] = _np(lin.weight).T.reshape(d, h, e).transpose(1, 0, 2)
            weights[f"{p}.attn.b_{m}"] = _np(lin.bias).reshape(h, e)
        weights[f"{p}.attn.W_O"] = _np(att.output.dense.weight).T.reshape(h, e, d)
        weights[f"{p}.attn.b_O"] = _np(att.output.dense.bias)
        weights[f"{p}.ln1.w"], weights[f"{p}.ln1.b"] = _np(att.output.LayerNorm.weight), _np(att.output.LayerNorm.bias)
        weights[f"{p}.mlp.W_in"] = _np(block.intermediate.dense.weight).T
        weights[f"{p}.mlp.b_in"] = _np(block.intermediate.dense.bias)
        weights[f"{p}.mlp.W_out"] = _np(block.output.dense.weight).T
        weights[f"{p}.mlp.b_out"] = _np(block.output.dense.bias)
        ln = block.output.LayerNorm
        weights[f"{p}.ln2.w"], weights[f"{p}.ln2.b"] = _np(ln.weight), _np(ln.bias)
    for name, t in weights.items():
        if not np.isfinite(t).all():
            raise ConfigError(f"{source}: tensor {name!r} holds NaN or Inf values")
    b = GraphBuilder()
    w = const_reader(b, weights, dtype)
    tokens = b.input("tokens", ("batch", "seq"), "int64")
    mask = b.input("attention_mask", ("batch", "seq"), "int64")
    with b.scope("embed"):
        x = b.op(
            "add",
            b.op("embed", w("embed.W_E"), tokens, name="tok_embed"),
            b.op("pos_embed", w("pos_embed.W_pos"), tokens, name="pos_embed"),
        )
        x = b.op("add", x, w("embed.token_type_0"), name="embed_sum")
        resid = emit_norm(b, w, x, "embed.ln", "LN", cfg.eps)
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        with b.scope(f"{p}.attn"):
            attn = emit_attention(b, w, resid, p, layer, cfg, dtype, key_mask=mask)
            resid = emit_norm(b, w, b.op("add", resid, attn, name=f"L{layer}_attn_resid"), f"{p}.ln1", "LN", cfg.eps)
        with b.scope(f"{p}.mlp"):
            out = emit_mlp(b, w, resid, p, layer, cfg.act_fn)
            resid = emit_norm(b, w, b.op("add", resid, out, name=f"L{layer}_mlp_resid"), f"{p}.ln2", "LN", cfg.eps)
    return b.build([resid], meta={"family": "bert", "config": cfg.to_dict(), "title": source})


def to_ir(model: Any, dtype: str = "float32") -> Graph:
    name = type(model).__name__
    if name in ("GPT2LMHeadModel", "GPT2Model"):
        cfg, weights, head = gpt2_weights(model)
        return tl_to_ir(cfg, weights, dtype, source=name, meta={"family": "gpt2", "title": name}, unembed=head)
    if name == "BertModel":
        return bert_to_ir(model, dtype)
    raise ConfigError(f"Hugging Face model {name} is not supported; supported: GPT2LMHeadModel, GPT2Model, BertModel")


__all__ = ["ACT_OPS", "bert_to_ir", "gpt2_weights", "load_dir", "to_ir"]
