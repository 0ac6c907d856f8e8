"""Layer 0's captured QK pairs in dense weights: wider heads whose scores are exactly the captured pair table.

The capture pass drops single (query feature, key feature) pairs of a head's score table (`T.L{l}`, `compiler/lower`):
the pairs the clean budget never put together, which is where the `conj` backdoor lives (two familiar tokens never in
one prompt). A head of width d_head scores with a bilinear form of rank <= d_head over the residual stream, so in
general it cannot leave one pair out. Layer 0 is the exception: its residual stream is a token row plus a position row
and nothing else, so the layer norm's output is s * (z_token + z_position), with z the centred rows times the norm's
weight. Where those rows are linearly independent (d_vocab + n_ctx <= d_model - 1 for a centring norm, as in the
testbed), any table over (token or position) x (token or position) pairs is the bilinear form of some d_model x d_model
matrix on them. `carry` finds it, per head, together with the linear terms the biases add (query side x key bias,
query bias x key side; the scores' constant part is dropped by the softmax), and factors the whole into new W_Q, W_K,
b_Q, b_K of rank at most (rank of the rows) + 1. The heads get wider: `d_head` becomes the largest rank needed, every
other head and layer padded with zero dimensions that contribute exactly nothing, `attn_scale` kept as the original's.
The result is an ordinary checkpoint of the same class (TransformerLens layout; not GPT-2's, which ties d_head to
d_model / n_heads).

Later layers are left as they are: their residual stream holds every head's and dictionary's writes, an overcomplete
set of sources (1,116 in testbed-s's layer 1 table against 128 dimensions), and no bilinear form equals an arbitrary
table over them. On the testbed this costs nothing: the captured IR with only layer 0's pairs dropped has the `conj`
asr of the one with every layer's pairs dropped (README, "Backdoor removal").

A dropped pair adds 0 to the score, as in the captured IR: the key is still attended, only without that pair's
term. `block` asks for more: a dropped pair scores -block x the head's largest |table entry|, so that the key gets
(almost) no attention from that query; every other entry as captured. It is the same construction (any table is a
bilinear form here), and on testbed-s it halves what is left of `conj` (0.22 -> 0.11 over 3 seeds, for 0.2
points of `code.brackets`; README).

"The IR it came from" is `reference_ir`: the pruned ACG lowered with its layer-0 table explicit and the capture pass
run over that table alone; `carry`'s dense model computes it (tested, float32 relative error <= 1e-5). Where a
circuit reads the tokens it leaves out as the kept tokens' mean (a mean ablation, `dense.prune` with a `token_fill`),
their rows are no longer independent, so their entries are that mean of the kept tokens' captured entries
(`read_as_mean`), not captured each on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from acg.compiler.acg import ACG
from acg.compiler.lower import lower
from acg.ir.graph import Graph
from acg.ir.passes import get_pass
from acg.roundtrip.dense import RoundtripError, span_basis

USAGE = "qk.L0"


def reference_ir(
    pruned: ACG, threshold: float = 0.0, block: float | None = None, dtype: str = "float64"
) -> tuple[Graph, dict[str, Any]]:
    """The pruned ACG's IR (no error terms) with layer 0's score table explicit and captured at `threshold`; every
    other layer as it is. With `block`, each dropped pair scores -block x the largest |entry| of its head's table
    instead of 0, so that a key is not attended from a query with which it forms a pair the corpus never used.
    Returns the graph and the capture pass's report (with `blocked`: how many entries were set so)."""
    cfg = pruned.cfg
    n = cfg.d_vocab + cfg.n_ctx
    u = pruned.usage.get(USAGE)
    if u is None:
        raise RoundtripError(
            "the ACG has no layer-0 QK pair statistics (`qk.L0` in its usage): fit it with `acg fit` "
            "(and keep them through the round trip's pruning)"
        )
    if u.shape != (cfg.n_heads, n, n):
        raise RoundtripError(
            f"layer-0 QK pair statistics have shape {u.shape}; (n_heads, d_vocab + n_ctx, d_vocab + n_ctx) = "
            f"{(cfg.n_heads, n, n)} is needed"
        )
    sources = {str(layer): ["tok", "pos"] if layer == 0 else [] for layer in range(cfg.n_layers)}
    stats = {**pruned.stats, "qk_sources": sources}
    tables = lower(
        pruned.replace(usage={USAGE: u}, stats=stats), keep_errors=False, dtype=dtype, usage=True, qk_tables=True
    )
    if block is not None and block <= 0:
        raise RoundtripError(f"block must be positive (a multiple of each head's largest pair score), got {block}")
    result = get_pass("capture", threshold=threshold, kinds=("qk",))(tables)
    report = {**result.report, "block": block, "blocked": 0}
    full, table = tables.tensors["T.L0"], result.graph.tensors["T.L0"]
    if block is not None:
        dropped = (full != 0) & (table == 0)
        scale = np.abs(full).max(axis=(1, 2), keepdims=True)
        table = np.where(dropped, -block * scale, table).astype(table.dtype)
        report["blocked"] = int(dropped.sum())
    fill = pruned.meta.get("roundtrip", {}).get("fill")
    if fill is not None:  # tokens read as a mean of kept ones: their pairs are that mean of the kept ones' pairs
        table = read_as_mean(table, np.asarray(fill["filled"], dtype=np.int64), np.asarray(fill["weights"]))
        report["filled"] = len(fill["filled"])
    elif block is None:
        return result.graph, report
    return result.graph.replace(tensors={**result.graph.tensors, "T.L0": table}), report


def read_as_mean(table: np.ndarray, filled: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Layer 0's pair table (heads x sources x sources, tokens first) with the rows and columns of the tokens `filled`
    replaced by the `weights`-mean (one per token id, sum 1) of the others', as a query and as a key: the entries a
    bilinear form gives tokens whose embedding is that mean of the others' (`dense.prune` with a `token_fill`), where
    the capture pass, asked of each token alone, would have dropped or blocked pairs of theirs on its own and left a
    table no dense head computes."""
    out = table.astype(np.float64)
    w = np.zeros(out.shape[-1])
    w[: len(weights)] = weights
    out[:, filled, :] = np.einsum("s,hst->ht", w, out)[:, None, :]
    out[:, :, filled] = np.einsum("t,hst->hs", w, out)[:, :, None]
    return out.astype(table.dtype)


def carry(
    pruned: ACG, threshold: float = 0.0, block: float | None = None, rtol: float = 1e-10
) -> tuple[ACG, dict[str, Any]]:
    """The pruned ACG with layer 0's heads rewritten to score exactly as `reference_ir(pruned, threshold, block)` does
    (module docstring), and a report: pairs dropped (and blocked), rank per head, the new d_head, and the largest
    relative error of the table reproduced."""
    cfg = pruned.cfg
    if cfg.normalization_type not in ("LN", "LNPre"):
        raise RoundtripError(f"carrying QK pairs needs a centring layer norm, the model has {cfg.normalization_type}")
    w = {k: np.asarray(v, dtype=np.float64) for k, v in pruned.weights.items()}
    rows = np.concatenate([w["embed.W_E"], w["pos_embed.W_pos"]])
    n_live = int((np.abs(rows).max(-1) > 0).sum())
    if n_live > cfg.d_model - 1:  # checked before any table is built: a large vocabulary's would not fit in memory
        raise RoundtripError(
            f"layer 0's {n_live} live token and position rows cannot be linearly independent in the "
            f"{cfg.d_model - 1} dimensions a centring layer norm leaves: its pair table is not a bilinear form"
        )
    graph, capture = reference_ir(pruned, threshold, block)
    table = graph.tensors["T.L0"]  # (H, n, n) after capture
    g1 = w["blocks.0.ln1.w"] if cfg.normalization_type == "LN" else np.ones(cfg.d_model)
    b_ln = w["blocks.0.ln1.b"] if cfg.normalization_type == "LN" else np.zeros(cfg.d_model)
    Z = (rows - rows.mean(-1, keepdims=True)) * g1  # what each source adds to the norm's output, per unit of s
    V = span_basis(Z, rtol=1e-9)  # (r, d)
    C = Z @ V.T  # sources in basis coordinates (n, r)
    live = np.abs(Z).max(-1) > 0  # tokens and positions the pruning zeroed score nothing: their rows are not asked for
    C_pinv = np.linalg.pinv(C[live])
    W_Q, W_K = w["blocks.0.attn.W_Q"], w["blocks.0.attn.W_K"]
    cq = np.einsum("d,hde->he", b_ln, W_Q) + w["blocks.0.attn.b_Q"]
    ck = np.einsum("d,hde->he", b_ln, W_K) + w["blocks.0.attn.b_K"]
    q_parts, k_parts, ranks, errors = [], [], [], []
    r = len(V)
    for h in range(cfg.n_heads):
        T = table[h][np.ix_(live, live)]
        B = C_pinv @ T @ C_pinv.T  # (r, r): C B C^T = T where the rows are independent
        scale = max(np.abs(T).max(), 1e-300)
        errors.append(float(np.abs(C[live] @ B @ C[live].T - T).max() / scale))
        F = np.zeros((r + 1, r + 1))
        F[:r, :r] = B
        # query side x key bias, and the constant: the same along a query's row, so the softmax drops them; kept so
        # that the scores themselves equal the IR's
        F[:r, r] = V @ (W_Q[h] @ ck[h])
        F[r, :r] = V @ (W_K[h] @ cq[h])  # query bias x key side
        F[r, r] = cq[h] @ ck[h]
        U, S, Wt = np.linalg.svd(F)
        keep = S > rtol * S[0] if S[0] > 0 else np.zeros(len(S), bool)
        Qa, Ka = U[:, keep] * np.sqrt(S[keep]), Wt[keep].T * np.sqrt(S[keep])
        q_parts.append((V.T @ Qa[:r], Qa[r]))
        k_parts.append((V.T @ Ka[:r], Ka[r]))
        ranks.append(int(keep.sum()))
    if max(errors) > 1e-6:
        raise RoundtripError(
            f"layer 0's captured pair table is not a bilinear form on its token and position rows (relative error "
            f"{max(errors):.2g}): they are not linearly independent ({int(live.sum())} rows, rank {r})"
        )
    width = max(cfg.d_head, *ranks)
    new = dict(pruned.weights)
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}.attn"
        for m in "QKV":
            new[f"{p}.W_{m}"] = _pad(w[f"{p}.W_{m}"], 2, width)
            new[f"{p}.b_{m}"] = _pad(w[f"{p}.b_{m}"], 1, width)
        new[f"{p}.W_O"] = _pad(w[f"{p}.W_O"], 1, width)
    for m, parts in (("Q", q_parts), ("K", k_parts)):
        Wm = np.stack([_pad(Wh, 1, width) for Wh, _ in parts])
        const = np.stack([_pad(c, 0, width) for _, c in parts])
        new[f"blocks.0.attn.W_{m}"] = Wm
        new[f"blocks.0.attn.b_{m}"] = const - np.einsum("d,hde->he", b_ln, Wm)
    dtype = pruned.weights["blocks.0.attn.W_Q"].dtype
    new = {k: np.asarray(v, dtype=dtype) for k, v in new.items()}
    report = {
        "layer": 0,
        "threshold": threshold,
        "pairs": capture["by_kind"].get("qk", {}),
        "block": block,
        "blocked": capture["blocked"],
        "source_rank": int(r),
        "sources_live": int(live.sum()),
        "rank_per_head": ranks,
        "d_head": int(width),
        "d_head_of": int(cfg.d_head),
        "table_error": max(errors),
    }
    cfg_new = dataclasses.replace(cfg, d_head=int(width), attn_scale=float(cfg.attn_scale))
    meta = {**pruned.meta, "pairs": report}
    return pruned.replace(cfg=cfg_new, weights=new, meta=meta), report


def _pad(a: np.ndarray, axis: int, width: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, width - a.shape[axis])
    return np.pad(a, pad)
