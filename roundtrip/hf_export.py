"""Write a round-tripped (or any) TransformerLens-layout model as a Hugging Face GPT-2 directory that
`transformers.GPT2LMHeadModel.from_pretrained` loads offline: `config.json` + `model.safetensors`, written without
importing transformers.

GPT-2 has no unembedding bias; `b_U` is folded exactly into `ln_f.bias` (solving `delta @ W_U = b_U`), which needs
`b_U` in the row space of `W_U` (always so when d_vocab <= d_model and W_U has full rank); otherwise the export is
refused rather than written approximately.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from acg.compiler.transformer import Transformer
from acg.ir.atomic import atomic_dir
from acg.roundtrip.dense import RoundtripError

HF_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_fast": "gelu_fast", "silu": "silu"}


def gpt2_state(model: Transformer) -> tuple[dict, dict[str, np.ndarray]]:
    """(GPT-2 config dict, HF-named float32 tensors)."""
    cfg = model.cfg
    if cfg.normalization_type != "LN" or cfg.attention_dir != "causal" or cfg.attn_only:
        raise RoundtripError(
            "a GPT-2 directory needs LayerNorm (LN), causal attention and MLPs; this model has "
            f"normalization_type={cfg.normalization_type!r}, attention_dir={cfg.attention_dir!r}, "
            f"attn_only={cfg.attn_only}"
        )
    if cfg.act_fn not in HF_ACT:
        raise RoundtripError(
            f"act_fn {cfg.act_fn!r} has no GPT-2 equivalent (GPT-2 takes {', '.join(HF_ACT)}); a JumpReLU dictionary "
            "round-trips to acg's own TransformerLens layout only: fit with `--kind relu` for a Hugging Face export"
        )
    if cfg.n_heads * cfg.d_head != cfg.d_model or abs(cfg.attn_scale - cfg.d_head**0.5) > 1e-9:
        raise RoundtripError("GPT-2 needs n_heads * d_head == d_model and attention scaled by sqrt(d_head)")
    w = {k: v.detach().double().cpu().numpy() for k, v in model.state_dict().items()}
    d, H, E = cfg.d_model, cfg.n_heads, cfg.d_head
    W_U, b_U = w["unembed.W_U"], w["unembed.b_U"]
    delta, *_ = np.linalg.lstsq(W_U.T, b_U, rcond=None)
    if np.abs(delta @ W_U - b_U).max() > 1e-6 * max(1.0, np.abs(b_U).max()):
        raise RoundtripError(
            "unembed.b_U is not in the row space of unembed.W_U, so it cannot be folded into ln_f.bias; "
            "GPT-2's LM head has no bias"
        )
    t: dict[str, np.ndarray] = {
        "transformer.wte.weight": w["embed.W_E"],
        "transformer.wpe.weight": w["pos_embed.W_pos"],
        "transformer.ln_f.weight": w["ln_final.w"],
        "transformer.ln_f.bias": w["ln_final.b"] + delta,  # (n * w + b + delta) @ W_U = ... + b_U
        "lm_head.weight": W_U.T,
    }
    for layer in range(cfg.n_layers):
        p, h = f"blocks.{layer}", f"transformer.h.{layer}"
        t[f"{h}.ln_1.weight"], t[f"{h}.ln_1.bias"] = w[f"{p}.ln1.w"], w[f"{p}.ln1.b"]
        t[f"{h}.ln_2.weight"], t[f"{h}.ln_2.bias"] = w[f"{p}.ln2.w"], w[f"{p}.ln2.b"]
        qkv = [w[f"{p}.attn.W_{m}"].transpose(1, 0, 2).reshape(d, H * E) for m in "QKV"]
        t[f"{h}.attn.c_attn.weight"] = np.concatenate(qkv, axis=1)  # Conv1D: x @ W, W [d, 3d]
        t[f"{h}.attn.c_attn.bias"] = np.concatenate([w[f"{p}.attn.b_{m}"].reshape(H * E) for m in "QKV"])
        t[f"{h}.attn.c_proj.weight"] = w[f"{p}.attn.W_O"].reshape(H * E, d)
        t[f"{h}.attn.c_proj.bias"] = w[f"{p}.attn.b_O"]
        t[f"{h}.mlp.c_fc.weight"], t[f"{h}.mlp.c_fc.bias"] = w[f"{p}.mlp.W_in"], w[f"{p}.mlp.b_in"]
        t[f"{h}.mlp.c_proj.weight"], t[f"{h}.mlp.c_proj.bias"] = w[f"{p}.mlp.W_out"], w[f"{p}.mlp.b_out"]
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.d_vocab,
        "n_positions": cfg.n_ctx,
        "n_embd": d,
        "n_layer": cfg.n_layers,
        "n_head": H,
        "n_inner": cfg.d_mlp,
        "activation_function": HF_ACT[cfg.act_fn],
        "layer_norm_epsilon": float(cfg.eps),
        "tie_word_embeddings": False,
        "scale_attn_weights": True,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "torch_dtype": "float32",
    }
    return config, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}


def save_gpt2(model: Transformer, path: str | os.PathLike) -> Path:
    config, tensors = gpt2_state(model)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(path)
