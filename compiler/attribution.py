"""Per-prompt attribution graphs in circuit-tracer's terms: direct linear effects between active transcoder features,
error nodes, token embeddings and the top logits, with attention patterns and layer-norm scales frozen at their values
on the prompt (the model is then linear in the residual stream; MLPs are cut at their features and errors).

Node order and scores follow circuit-tracer 0.5: [features, errors (layer-major), tokens, logits]; adjacency rows are
targets, columns sources; logit targets use mean-centred unembedding columns; `replacement_score` and
`completeness_score` as its `compute_graph_scores` defines them. `to_graph_json` writes the graph JSON its viewer
(and Neuronpedia's) reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from acg.compiler.acg import ACG
from acg.ir.atomic import atomic_file


@dataclass(frozen=True, eq=False)
class AttributionGraph:
    tokens: np.ndarray  # (n_pos,)
    active_features: np.ndarray  # (n_features, 3) = (layer, pos, feature)
    activation_values: np.ndarray  # (n_features,)
    logit_tokens: np.ndarray  # (n_logits,)
    logit_probabilities: np.ndarray  # (n_logits,)
    adjacency: np.ndarray  # (N, N), rows targets, columns sources
    n_layers: int
    meta: dict = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def slices(self) -> dict[str, slice]:
        nf, L, p = len(self.active_features), self.n_layers, self.n_pos
        return {
            "features": slice(0, nf),
            "errors": slice(nf, nf + L * p),
            "tokens": slice(nf + L * p, nf + L * p + p),
            "logits": slice(nf + L * p + p, nf + L * p + p + len(self.logit_tokens)),
        }


def _prepare(acg: ACG, tokens: list[int]):
    """One exact forward pass (float64) recording what the linearised model freezes."""
    cfg, w = acg.cfg, {k: torch.as_tensor(v) for k, v in acg.weights.items()}
    toks = torch.as_tensor(tokens)
    n = len(tokens)
    center = cfg.normalization_type in ("LN", "LNPre")

    def ln(x, prefix):
        y = x - x.mean(-1, keepdim=True) if center else x
        s = 1.0 / torch.sqrt((y * y).mean(-1, keepdim=True) + cfg.eps)
        if cfg.normalization_type is None:
            return x, torch.ones(n, 1, dtype=x.dtype)
        wt = w[f"{prefix}.w"] if cfg.normalization_type in ("LN", "RMS") else torch.ones(cfg.d_model)
        bt = w[f"{prefix}.b"] if cfg.normalization_type == "LN" else torch.zeros(cfg.d_model)
        return y * s * wt + bt, s

    rec = {"attn": [], "s1": [], "s2": [], "feats": [], "errs": []}
    x = w["embed.W_E"][toks] + w["pos_embed.W_pos"][:n]
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        h, s1 = ln(x, f"{p}.ln1")
        q = torch.einsum("pd,hde->hpe", h, w[f"{p}.attn.W_Q"]) + w[f"{p}.attn.b_Q"][:, None]
        k = torch.einsum("pd,hde->hpe", h, w[f"{p}.attn.W_K"]) + w[f"{p}.attn.b_K"][:, None]
        v = torch.einsum("pd,hde->hpe", h, w[f"{p}.attn.W_V"]) + w[f"{p}.attn.b_V"][:, None]
        scores = q @ k.transpose(-1, -2) / cfg.attn_scale
        if cfg.attention_dir == "causal":
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        A = scores.softmax(-1)
        x = x + torch.einsum("hpe,hed->pd", A @ v, w[f"{p}.attn.W_O"]) + w[f"{p}.attn.b_O"]
        rec["attn"].append(A)
        rec["s1"].append(s1)
        h2, s2 = ln(x, f"{p}.ln2")
        tc = acg.transcoders[layer]
        f = torch.as_tensor(tc.encode(h2.numpy()))
        recon = f @ torch.as_tensor(tc.W_dec) + torch.as_tensor(tc.b_dec)
        from acg.compiler.transformer import activation

        mlp = (
            activation(cfg.act_fn, h2 @ w[f"{p}.mlp.W_in"] + w[f"{p}.mlp.b_in"], w.get(f"{p}.mlp.threshold"))
            @ w[f"{p}.mlp.W_out"]
            + w[f"{p}.mlp.b_out"]
        )
        rec["s2"].append(s2)
        rec["feats"].append(f)
        rec["errs"].append(mlp - recon)
        x = x + mlp
    hf, sf = ln(x, "ln_final")
    logits = hf @ w["unembed.W_U"] + w["unembed.b_U"]
    rec["sf"] = sf
    rec["logits"] = logits
    return rec


def attribute(
    acg: ACG, tokens: list[int], max_n_logits: int = 10, desired_logit_prob: float = 0.95, batch_size: int = 256
) -> AttributionGraph:
    """The attribution graph of the last position's top logits (cumulative probability >= `desired_logit_prob`)."""
    cfg = acg.cfg
    w = {k: torch.as_tensor(v) for k, v in acg.weights.items()}
    rec = _prepare(acg, tokens)
    n, d, L = len(tokens), cfg.d_model, cfg.n_layers
    center = cfg.normalization_type in ("LN", "LNPre")

    def lnw(prefix):
        if cfg.normalization_type in ("LN", "RMS"):
            return w[f"{prefix}.w"]
        return torch.ones(d, dtype=torch.float64)

    def lin_norm(x, s, prefix):  # the layer norm with its scale frozen: linear in x
        y = x - x.mean(-1, keepdim=True) if center else x
        return y * s * lnw(prefix)

    def forward(E, M, Err):
        """Linearised model: returns every feature pre-activation [L, n, width] (as a list) and the final stream."""
        x = E
        pres = []
        for layer in range(L):
            p = f"blocks.{layer}"
            h = lin_norm(x, rec["s1"][layer], f"{p}.ln1")
            v = torch.einsum("pd,hde->hpe", h, w[f"{p}.attn.W_V"])
            x = x + torch.einsum("hpe,hed->pd", rec["attn"][layer] @ v, w[f"{p}.attn.W_O"])
            h2 = lin_norm(x, rec["s2"][layer], f"{p}.ln2")
            pres.append(h2 @ torch.as_tensor(acg.transcoders[layer].W_enc))
            x = x + M[layer] + Err[layer]
        return pres, lin_norm(x, rec["sf"], "ln_final")

    feats = rec["feats"]
    active = [
        (layer, pos, int(i))
        for layer in range(L)
        for pos in range(n)
        for i in torch.nonzero(feats[layer][pos]).flatten().tolist()
    ]
    act_vals = np.array([float(feats[lay][pos, i]) for lay, pos, i in active])
    probs = rec["logits"][-1].softmax(-1)
    order = torch.argsort(probs, descending=True)
    cum = torch.cumsum(probs[order], 0)
    k = min(max_n_logits, int(torch.searchsorted(cum, torch.tensor(desired_logit_prob, dtype=cum.dtype)).item()) + 1)
    logit_tokens = order[:k]
    W_U = w["unembed.W_U"]
    U_centred = W_U - W_U.mean(-1, keepdim=True)

    E0 = w["embed.W_E"][torch.as_tensor(tokens)]
    Err0 = torch.stack(rec["errs"])
    E = E0.clone().requires_grad_(True)
    M = torch.zeros(L, n, d, dtype=torch.float64, requires_grad=True)
    Err = torch.zeros(L, n, d, dtype=torch.float64, requires_grad=True)
    pres, final = forward(E, M, Err)
    # targets: feature pre-activations, then logits (mean-centred unembedding at the last position)
    # (one gather per layer: a select per feature would make every batched backward pass scatter into a full
    # [positions, width] tensor per feature)
    lays = torch.as_tensor([a[0] for a in active], dtype=torch.int64)
    poss = torch.as_tensor([a[1] for a in active], dtype=torch.int64)
    idxs = torch.as_tensor([a[2] for a in active], dtype=torch.int64)
    parts = [pres[lay][poss[lays == lay], idxs[lays == lay]] for lay in range(L)]  # `active` is layer-major
    parts.append(final[-1] @ U_centred[:, logit_tokens])
    targets = torch.cat(parts)
    nf = len(active)
    N = nf + L * n + n + k
    full = np.zeros((N, N))
    node_row = np.concatenate([np.arange(nf), nf + L * n + n + np.arange(k)])  # target index -> node row
    W_decs = [torch.as_tensor(tc.W_dec) for tc in acg.transcoders]
    lay_idx = np.array([a[0] for a in active], dtype=np.int64)
    pos_idx = np.array([a[1] for a in active], dtype=np.int64)
    dec_rows = torch.stack([W_decs[lay][i] for lay, _, i in active]) if active else torch.zeros(0, d)
    for start in range(0, len(targets), batch_size):
        rows = np.arange(start, min(start + batch_size, len(targets)))
        grads = torch.eye(len(targets), dtype=torch.float64)[torch.as_tensor(rows)]
        gE, gM, gErr = torch.autograd.grad(
            targets, (E, M, Err), grad_outputs=grads, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        out = node_row[rows]
        if nf:  # feature sources: activation * (decoder row . gradient at the feature's layer and position)
            g_at = gM[:, lay_idx, pos_idx]  # (rows, nf, d)
            full[out[:, None], np.arange(nf)[None, :]] = act_vals[None] * (g_at * dec_rows[None]).sum(-1).numpy()
        full[out[:, None], nf + np.arange(L * n)[None, :]] = (gErr * Err0[None]).sum(-1).reshape(len(rows), -1).numpy()
        full[out[:, None], nf + L * n + np.arange(n)[None, :]] = (gE * E0[None]).sum(-1).numpy()
    return AttributionGraph(
        np.asarray(tokens),
        np.array(active, dtype=np.int64).reshape(-1, 3),
        act_vals,
        logit_tokens.numpy(),
        probs[logit_tokens].numpy(),
        full,
        L,
    )


def normalize(matrix: np.ndarray) -> np.ndarray:
    m = np.abs(matrix)
    return m / np.maximum(m.sum(1, keepdims=True), 1e-10)


def influence(A: np.ndarray, logit_weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    current = logit_weights @ A
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A
        total += current
    raise RuntimeError("influence computation did not converge")


def graph_scores(g: AttributionGraph) -> dict[str, float]:
    """circuit-tracer's replacement and completeness scores."""
    sl = g.slices
    lw = np.zeros(len(g.adjacency))
    lw[sl["logits"]] = g.logit_probabilities
    A = normalize(g.adjacency)
    inf = influence(A, lw)
    tok, err = inf[sl["tokens"]].sum(), inf[sl["errors"]].sum()
    replacement = float(tok / (tok + err)) if tok + err > 0 else 0.0
    non_error = 1 - A[:, sl["errors"]].sum(1)
    out = inf + lw
    completeness = float((non_error * out).sum() / out.sum()) if out.sum() > 0 else 0.0
    return {"replacement_score": replacement, "completeness_score": completeness}


def to_graph_json(
    g: AttributionGraph,
    acg: ACG,
    path: str | os.PathLike,
    slug: str = "acg-graph",
    token_names: list[str] | None = None,
    edge_threshold: float = 0.0,
) -> Path:
    """The graph JSON circuit-tracer's and Neuronpedia's viewers read (a view, not acg's storage format)."""
    names = token_names or [f"#{i}" for i in range(acg.cfg.d_vocab)]
    sl = g.slices
    L = g.n_layers
    lw = np.zeros(len(g.adjacency))
    lw[sl["logits"]] = g.logit_probabilities
    inf = influence(normalize(g.adjacency), lw) + lw
    nodes, ids = [], []

    def cantor(a: int, b: int) -> int:
        return (a + b) * (a + b + 1) // 2 + b

    for c, (layer, pos, feat) in enumerate(g.active_features.tolist()):
        nid = f"{layer}_{feat}_{pos}"
        nodes.append(
            {
                "node_id": nid,
                "feature": cantor(layer, feat),
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "cross layer transcoder",
                "token_prob": 0.0,
                "is_target_logit": False,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": f"{layer}_{feat}-{pos}",
                "clerp": acg.label(f"L{layer}.f{feat}"),
                "influence": float(inf[c]),
                "activation": float(g.activation_values[c]),
            }
        )
        ids.append(nid)
    for layer in range(L):
        for pos in range(g.n_pos):
            nid = f"0_{layer}_{pos}"
            c = sl["errors"].start + layer * g.n_pos + pos
            nodes.append(
                {
                    "node_id": nid,
                    "feature": -1,
                    "layer": str(layer),
                    "ctx_idx": pos,
                    "feature_type": "mlp reconstruction error",
                    "token_prob": 0.0,
                    "is_target_logit": False,
                    "run_idx": 0,
                    "reverse_ctx_idx": 0,
                    "jsNodeId": f"0_{layer}-{pos}",
                    "clerp": "",
                    "influence": float(inf[c]),
                    "activation": 0.0,
                }
            )
            ids.append(nid)
    for pos, tok in enumerate(g.tokens.tolist()):
        nid = f"E_{tok}_{pos}"
        nodes.append(
            {
                "node_id": nid,
                "feature": pos,
                "layer": "E",
                "ctx_idx": pos,
                "feature_type": "embedding",
                "token_prob": 0.0,
                "is_target_logit": False,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": f"E_{tok}-{pos}",
                "clerp": "",
                "influence": float(inf[sl["tokens"].start + pos]),
                "activation": 0.0,
            }
        )
        ids.append(nid)
    last = g.n_pos - 1
    for j, (tok, prob) in enumerate(zip(g.logit_tokens.tolist(), g.logit_probabilities.tolist(), strict=True)):
        nid = f"{L + 1}_{tok}_{last}"
        nodes.append(
            {
                "node_id": nid,
                "feature": j,
                "layer": str(L + 1),
                "ctx_idx": last,
                "feature_type": "logit",
                "token_prob": float(prob),
                "is_target_logit": j == 0,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": f"L_{tok}-{last}",
                "clerp": f'Output "{names[tok]}" (p={prob:.3f})',
                "influence": float(inf[sl["logits"].start + j]),
                "activation": 0.0,
            }
        )
        ids.append(nid)
    links = []
    rows, cols = np.nonzero(np.abs(g.adjacency) > edge_threshold)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        links.append({"source": ids[c], "target": ids[r], "weight": float(g.adjacency[r, c])})
    doc = {
        "metadata": {
            "slug": slug,
            "scan": acg.meta.get("scan", "acg"),
            "transcoder_list": [],
            "prompt_tokens": [names[t] for t in g.tokens.tolist()],
            "prompt": " ".join(names[t] for t in g.tokens.tolist()),
            "node_threshold": 1.0,
            "schema_version": 1,
            **graph_scores(g),
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
    with atomic_file(path) as f:
        f.write(json.dumps(doc, indent=1))
    return Path(path)
