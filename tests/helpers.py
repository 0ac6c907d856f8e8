"""Small random models and graphs for tests: the shared fixtures of the conformance and property tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from acg.compiler.tlayout import to_ir
from acg.compiler.transformer import Transformer, TransformerConfig

if TYPE_CHECKING:
    from acg.compiler.acg import ACG


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


def planted_task_model(redundant: bool = False) -> tuple[Transformer, ACG]:
    """One layer, no layer norm, attention writing nothing. Token 1 drives feature 0, which writes answer 3's logit;
    token 2 drives feature 1 -> answer 4; features 2..9 fire on every token and write where the unembedding does not
    read. The true circuit for "1 -> 3, 2 -> 4" is features {0, 1}.

    `redundant`: token 1 drives feature 2 too, which also writes answer 3 on its own (either of 0 and 2 is enough),
    and feature 1 writes answer 4 less strongly, so that it scores below both: the top 2 by attribution are 0 and 2,
    which answer half the prompts; the smallest faithful circuit is {1} and one of {0, 2}."""
    d, V, n = 8, 6, 10
    cfg = TransformerConfig(
        n_layers=1, d_model=d, n_heads=1, d_head=d, d_mlp=n, d_vocab=V, n_ctx=4, act_fn="relu", normalization_type=None
    )
    e = np.eye(d)
    first = 3 if redundant else 2  # the first feature firing on every token
    W_E = np.stack([e[5] + (e[k] if k < 5 else 0) for k in range(V)])
    W_enc = np.zeros((d, n))
    W_enc[1, 0] = W_enc[2, 1] = 1.0
    W_enc[5, first:] = 1.0
    b_enc = np.zeros(n)
    b_enc[:first] = -0.5
    W_dec = np.zeros((n, d))
    W_dec[0, 3], W_dec[1, 4] = 2.0, 2.0
    W_dec[first:, 6] = 1.0
    if redundant:
        W_enc[1, 2], W_dec[2, 3], W_dec[1, 4] = 1.0, 2.0, 1.5
    W_U = np.zeros((d, V))
    W_U[3, 3] = W_U[4, 4] = 1.0
    return planted_one_layer(cfg, W_E, W_U, W_enc, b_enc, W_dec)
