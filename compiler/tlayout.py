"""Front end for the TransformerLens layout: a config plus HookedTransformer-named weights -> the dense IR.

The IR spells out exactly what `HookedTransformer.forward` computes (and what `acg.compiler.transformer.Transformer`
computes): embeddings, pre-norm blocks with per-head attention, the unembedding.
"""

from __future__ import annotations

from collections.abc import Mapping

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
}


def check_weights(cfg: TransformerConfig, weights: Mapping[str, np.ndarray], source: str = "weights") -> None:
    """Every tensor the layout needs is present, with its shape, finite. Extra tensors (masks, IGNORE) are ignored."""
    for name, shape in expected_shapes(cfg).items():
        if name not in weights:
            raise ConfigError(f"{source}: missing tensor {name!r} (shape {shape})")
        t = weights[name]
        if tuple(t.shape) != shape:
            raise ConfigError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the config implies {shape}")
        if not np.isfinite(t).all():
            raise ConfigError(f"{source}: tensor {name!r} holds NaN or Inf values")


def to_ir(
    cfg: TransformerConfig,
    weights: Mapping[str, np.ndarray],
    dtype: str = "float32",
    source: str = "weights",
    meta: Mapping | None = None,
) -> Graph:
    """The dense IR of a TransformerLens-layout model. `weights` maps state-dict names to arrays."""
    weights = {k: np.asarray(v) for k, v in weights.items()}
    check_weights(cfg, weights, source)
    b = GraphBuilder()

    def w(name: str) -> str:
        return b.const(name, weights[name].astype(dtype), hint=name.replace("blocks.", "L"))

    def norm(x: str, prefix: str) -> str:
        kind = cfg.normalization_type
        if kind is None:
            return x
        y = b.op("norm", x, eps=float(cfg.eps), center=kind in ("LN", "LNPre"), name=f"{prefix}_normed")
        if kind in ("LN", "RMS"):
            y = b.op("mul", y, w(f"{prefix}.w"), name=f"{prefix}_scaled")
        if kind == "LN":
            y = b.op("add", y, w(f"{prefix}.b"), name=f"{prefix}_out")
        return y

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
            x = norm(resid, f"{p}.ln1")
            heads = {}
            for m in "QKV":
                proj = b.op("einsum", x, w(f"{p}.attn.W_{m}"), equation="bpd,hde->bhpe", name=f"L{layer}_{m.lower()}")
                bias = b.op("reshape", w(f"{p}.attn.b_{m}"), shape=(cfg.n_heads, 1, cfg.d_head))
                heads[m] = b.op("add", proj, bias, name=f"L{layer}_{m.lower()}_b")
            scores = b.op("einsum", heads["Q"], heads["K"], equation="bhqe,bhke->bhqk", name=f"L{layer}_qk")
            scale = b.const(f"{p}.attn.scale", np.array(1.0 / cfg.attn_scale, dtype=dtype), hint=f"L{layer}_inv_scale")
            scores = b.op("mul", scores, scale, name=f"L{layer}_scores")
            if cfg.attention_dir == "causal":
                scores = b.op("causal_mask", scores, name=f"L{layer}_masked")
            pattern = b.op("softmax", scores, axis=3, name=f"L{layer}_pattern")
            z = b.op("einsum", pattern, heads["V"], equation="bhqk,bhke->bhqe", name=f"L{layer}_z")
            out = b.op("einsum", z, w(f"{p}.attn.W_O"), equation="bhqe,hed->bqd", name=f"L{layer}_attn")
            out = b.op("add", out, w(f"{p}.attn.b_O"), name=f"L{layer}_attn_out")
            resid = b.op("add", resid, out, name=f"resid_mid_{layer}")
        if cfg.attn_only:
            continue
        with b.scope(f"{p}.mlp"):
            x = norm(resid, f"{p}.ln2")
            pre = b.op("add", b.op("matmul", x, w(f"{p}.mlp.W_in")), w(f"{p}.mlp.b_in"), name=f"L{layer}_mlp_pre")
            post = b.op(ACT_OPS[cfg.act_fn], pre, name=f"L{layer}_mlp_post")
            out = b.op("add", b.op("matmul", post, w(f"{p}.mlp.W_out")), w(f"{p}.mlp.b_out"), name=f"L{layer}_mlp_out")
            resid = b.op("add", resid, out, name=f"resid_{layer + 1}")
    with b.scope("unembed"):
        x = norm(resid, "ln_final")
        logits = b.op("add", b.op("matmul", x, w("unembed.W_U")), w("unembed.b_U"), name="logits")
    return b.build([logits], meta={"family": "transformer-lens", "config": cfg.to_dict(), **(meta or {})})
