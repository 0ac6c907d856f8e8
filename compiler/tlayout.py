"""Front end for the TransformerLens layout: a config plus HookedTransformer-named weights -> the dense IR.

The IR spells out exactly what `HookedTransformer.forward` computes (and what `acg.compiler.transformer.Transformer`
computes): embeddings, pre-norm blocks with per-head attention, the unembedding. The emitters for the parts
(`norm`, `attention`, `mlp`) are shared with the Hugging Face front end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from acg.compiler.transformer import ConfigError, TransformerConfig, expected_shapes
from acg.ir.builder import GraphBuilder
from acg.ir.graph import Graph

ACT_OPS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "jumprelu": "jumprelu",
}

Const = Callable[[str], str]  # tensor name -> const value


def check_weights(
    cfg: TransformerConfig, weights: Mapping[str, np.ndarray], source: str = "weights", unembed: bool = True
) -> None:
    """Every tensor the layout needs is present, with its shape, finite. Extra tensors (masks, IGNORE) are ignored."""
    for name, shape in expected_shapes(cfg).items():
        if not unembed and name.startswith("unembed."):
            continue
        if name not in weights:
            raise ConfigError(f"{source}: missing tensor {name!r} (shape {shape})")
        t = weights[name]
        if tuple(t.shape) != shape:
            raise ConfigError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the config implies {shape}")
        if not np.isfinite(t).all():
            raise ConfigError(f"{source}: tensor {name!r} holds NaN or Inf values")


def emit_norm(
    b: GraphBuilder, w: Const, x: str, prefix: str, kind: str | None, eps: float, w_name: str = "w", b_name: str = "b"
) -> str:
    """TransformerLens's LN / LNPre / RMS / RMSPre / None."""
    if kind is None:
        return x
    y = b.op("norm", x, eps=float(eps), center=kind in ("LN", "LNPre"), name=f"{prefix}_normed")
    if kind in ("LN", "RMS"):
        y = b.op("mul", y, w(f"{prefix}.{w_name}"), name=f"{prefix}_scaled")
    if kind == "LN":
        y = b.op("add", y, w(f"{prefix}.{b_name}"), name=f"{prefix}_out")
    return y


def emit_attention(
    b: GraphBuilder,
    w: Const,
    x: str,
    p: str,
    layer: int,
    cfg: TransformerConfig,
    dtype: str,
    key_mask: str | None = None,
) -> str:
    """One attention layer in TransformerLens's per-head layout (`{p}.attn.W_Q` [n_heads, d_model, d_head], ...)."""
    heads = {}
    for m in "QKV":
        proj = b.op("einsum", x, w(f"{p}.attn.W_{m}"), equation="bpd,hde->bhpe", name=f"L{layer}_{m.lower()}")
        bias = b.op("reshape", w(f"{p}.attn.b_{m}"), shape=(cfg.n_heads, 1, cfg.d_head), name=f"L{layer}_b_{m}")
        heads[m] = b.op("add", proj, bias, name=f"L{layer}_{m.lower()}_b")
    scores = b.op("einsum", heads["Q"], heads["K"], equation="bhqe,bhke->bhqk", name=f"L{layer}_qk")
    scale = b.const(f"{p}.attn.scale", np.array(1.0 / cfg.attn_scale, dtype=dtype), hint=f"L{layer}_inv_scale")
    scores = b.op("mul", scores, scale, name=f"L{layer}_scores")
    if cfg.attention_dir == "causal":
        scores = b.op("causal_mask", scores, name=f"L{layer}_masked")
    if key_mask is not None:
        scores = b.op("key_mask", scores, key_mask, name=f"L{layer}_key_masked")
    pattern = b.op("softmax", scores, axis=3, name=f"L{layer}_pattern")
    z = b.op("einsum", pattern, heads["V"], equation="bhqk,bhke->bhqe", name=f"L{layer}_z")
    out = b.op("einsum", z, w(f"{p}.attn.W_O"), equation="bhqe,hed->bqd", name=f"L{layer}_attn")
    return b.op("add", out, w(f"{p}.attn.b_O"), name=f"L{layer}_attn_out")


def emit_mlp(b: GraphBuilder, w: Const, x: str, p: str, layer: int, act_fn: str) -> str:
    pre = b.op("add", b.op("matmul", x, w(f"{p}.mlp.W_in")), w(f"{p}.mlp.b_in"), name=f"L{layer}_mlp_pre")
    if act_fn == "jumprelu":
        post = b.op("jumprelu", pre, w(f"{p}.mlp.threshold"), name=f"L{layer}_mlp_post")
    else:
        post = b.op(ACT_OPS[act_fn], pre, name=f"L{layer}_mlp_post")
    return b.op("add", b.op("matmul", post, w(f"{p}.mlp.W_out")), w(f"{p}.mlp.b_out"), name=f"L{layer}_mlp_out")


def const_reader(b: GraphBuilder, weights: Mapping[str, np.ndarray], dtype: str) -> Const:
    def w(name: str) -> str:
        return b.const(name, np.asarray(weights[name]).astype(dtype), hint=name.replace("blocks.", "L"))

    return w


def to_ir(
    cfg: TransformerConfig,
    weights: Mapping[str, np.ndarray],
    dtype: str = "float32",
    source: str = "weights",
    meta: Mapping | None = None,
    unembed: bool = True,
) -> Graph:
    """The dense IR of a TransformerLens-layout model. `weights` maps state-dict names to arrays. With
    `unembed=False` the output is the final normalised residual stream (`hidden`)."""
    weights = {k: np.asarray(v) for k, v in weights.items()}
    check_weights(cfg, weights, source, unembed)
    b = GraphBuilder()
    w = const_reader(b, weights, dtype)
    tokens = b.input("tokens", ("batch", "seq"), "int64")
    with b.scope("embed"):
        resid = b.op(
            "add",
            b.op("embed", w("embed.W_E"), tokens, name="tok_embed"),
            b.op("pos_embed", w("pos_embed.W_pos"), tokens, name="pos_embed"),
            name="resid_0",
        )
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        with b.scope(f"{p}.attn"):
            x = emit_norm(b, w, resid, f"{p}.ln1", cfg.normalization_type, cfg.eps)
            resid = b.op("add", resid, emit_attention(b, w, x, p, layer, cfg, dtype), name=f"resid_mid_{layer}")
        if cfg.attn_only:
            continue
        with b.scope(f"{p}.mlp"):
            x = emit_norm(b, w, resid, f"{p}.ln2", cfg.normalization_type, cfg.eps)
            resid = b.op("add", resid, emit_mlp(b, w, x, p, layer, cfg.act_fn), name=f"resid_{layer + 1}")
    with b.scope("unembed"):
        x = emit_norm(b, w, resid, "ln_final", cfg.normalization_type, cfg.eps)
        out = b.op("add", b.op("matmul", x, w("unembed.W_U")), w("unembed.b_U"), name="logits") if unembed else x
    return b.build([out], meta={"family": "transformer-lens", "config": cfg.to_dict(), **(meta or {})})
