"""Small random models and graphs for tests: the shared fixtures of the conformance and property tests."""

from __future__ import annotations

import numpy as np
import torch

from acg.compiler.tlayout import to_ir
from acg.compiler.transformer import Transformer, TransformerConfig


def random_model(seed: int = 0, std: float = 0.4, **overrides) -> Transformer:
    """A small TL-layout transformer with random weights (layer-norm weights and biases random too)."""
    base = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=13, n_ctx=12, act_fn="gelu")
    cfg = TransformerConfig(**{**base, **overrides})
    model = Transformer(cfg).init_weights(torch.Generator().manual_seed(seed), std=std)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) or name.split(".")[-1].startswith("b_"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith(".w") else 0.0))
    return model.eval()


def dense_ir(model: Transformer, dtype: str = "float64"):
    return to_ir(model.cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()}, dtype=dtype)


def torch_logits(model: Transformer, tokens: np.ndarray, dtype=torch.float64) -> np.ndarray:
    with torch.no_grad():
        return model.to(dtype)(torch.as_tensor(tokens)).numpy()


def random_tokens(cfg: TransformerConfig, batch: int = 3, seq: int | None = None, seed: int | None = None):
    rng = np.random.default_rng(seed)
    seq = seq or int(rng.integers(1, cfg.n_ctx + 1))
    return rng.integers(0, cfg.d_vocab, (batch, seq))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def planted_one_layer(cfg, W_E, W_U, W_enc, b_enc, W_dec):
    """A one-layer model whose MLP is the given ReLU neurons (everything else zero) and the ACG with that MLP as its
    dictionary: circuits known by construction."""
    from acg.compiler.acg import ACG
    from acg.compiler.transcoder import Transcoder

    model = Transformer(cfg)
    w = {k: np.zeros(tuple(p.shape)) for k, p in model.state_dict().items()}
    w.update({"embed.W_E": W_E, "unembed.W_U": W_U})
    w.update({"blocks.0.mlp.W_in": W_enc, "blocks.0.mlp.b_in": b_enc, "blocks.0.mlp.W_out": W_dec})
    model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in w.items()})
    return model.eval(), ACG(cfg, w, (Transcoder(W_enc, b_enc, W_dec, np.zeros(cfg.d_model), "relu"),))
