"""Usage statistics: what carried mass on the fitting corpus ("captured means seen", DESIGN.md).

Recorded (float32 arrays, keys as stored in the ACG):
- `feat_count.L{l}` / `feat_mass.L{l}` [n_features]: tokens on which a transcoder feature fired / its summed value;
  `tok_count` [d_vocab], `pos_count` [n_ctx]: how often each token / position feature occurred.
- `edge.{read}.{group}`: for transcoder encoders (`L{l}.enc`), the co-activation [n_source, n_features] =
  sum over tokens of s * |source| * [target fired]; an edge's carried mass is |virtual weight| times this. For reads
  into attention and the unembedding (`L{l}.Q`/`K`/`V`, `logits`) the per-source mass sum of s * |source| [n_source].
- `qk.L{l}` [n_heads, n, n]: attention-weighted co-occurrence sum_{i,j} A(i,j) [a present at i] [b present at j] of
  query-side feature a and key-side feature b, over the sparse sources listed in `stats["qk_sources"]`.
- `ov.L{l}` [n_heads, n_source]: sum_{i,j} A(i,j) s_j |source b at j|: how much each source fed each head's output.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from acg.compiler.acg import ACG
from acg.compiler.harvest import Activations
from acg.compiler.lower import lower
from acg.ir import interpret


def group_sizes(cfg, transcoders) -> dict[str, int]:
    sizes = {"tok": cfg.d_vocab, "pos": cfg.n_ctx, "bias": 1}
    for layer, tc in enumerate(transcoders):
        sizes[f"attn{layer}"] = cfg.n_heads * cfg.d_head
        sizes[f"mlp{layer}"] = tc.n_features
        sizes[f"err{layer}"] = cfg.d_model
    return sizes


def usage_statistics(model, transcoders, acts: Activations, spec) -> tuple[dict[str, np.ndarray], dict]:
    """The statistics, and a description of their layout (`qk_sources` per layer, `read_sources` per read)."""
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    out["tok_count"] = np.bincount(acts.tokens, minlength=cfg.d_vocab).astype(np.float32)
    out["pos_count"] = np.bincount(acts.positions, minlength=cfg.n_ctx).astype(np.float32)
    for layer, tc in enumerate(transcoders):
        count = np.zeros(tc.n_features)
        mass = np.zeros(tc.n_features)
        x = acts.mlp_in[layer]
        for start in range(0, len(x), 8192):
            f = tc.encode(np.asarray(x[start : start + 8192], dtype=np.float64))
            count += (f != 0).sum(0)
            mass += np.abs(f).sum(0)
        out[f"feat_count.L{layer}"] = count.astype(np.float32)
        out[f"feat_mass.L{layer}"] = mass.astype(np.float32)
    weights = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    exact = lower(ACG(cfg, weights, tuple(transcoders)), keep_errors=True, dtype="float32")
    out.update(pair_statistics(exact, cfg, transcoders, acts.sequences[: spec.usage_prompts], spec.pair_budget))
    sizes = group_sizes(cfg, transcoders)
    layout = {
        "qk_sources": {
            str(layer): qk_sources(cfg, transcoders, layer, spec.pair_budget) for layer in range(cfg.n_layers)
        },
        "read_sources": {tag: [[g, sizes[g]] for g in groups] for tag, groups in _reads(exact).items()},
    }
    return out, layout


def _reads(graph) -> dict[str, list[str]]:
    reads = defaultdict(list)  # read tag -> its source groups, in lowering order
    for link in graph.meta["usage_links"]:
        reads[link["target"]].append(link["source"])
    return dict(reads)


def qk_sources(cfg, transcoders, layer: int, budget: int) -> list[str]:
    """The sparse source groups whose QK pairs are recorded at `layer` (transcoder features only within budget)."""
    groups = ["tok", "pos"]
    n = cfg.d_vocab + cfg.n_ctx
    for prev in range(layer):
        if cfg.n_heads * (n + transcoders[prev].n_features) ** 2 > budget:
            break
        groups.append(f"mlp{prev}")
        n += transcoders[prev].n_features
    return groups


def pair_statistics(graph, cfg, transcoders, seqs: list[list[int]], budget: int) -> dict[str, np.ndarray]:
    sizes = group_sizes(cfg, transcoders)
    reads = _reads(graph)
    acc: dict[str, np.ndarray] = {}
    qk_groups = {layer: qk_sources(cfg, transcoders, layer, budget) for layer in range(cfg.n_layers)}
    by_len: dict[int, list[list[int]]] = defaultdict(list)
    for s in seqs:
        by_len[len(s)].append(s)
    for _, group in sorted(by_len.items()):
        for start in range(0, len(group), 128):
            toks = np.array(group[start : start + 128], dtype=np.int64)
            env = interpret.run(graph, toks, dtype="float32", keep=True)
            act = group_activations(env, toks, cfg, sizes)
            for tag, sources in reads.items():
                s_name = "s_" + (tag[:-2] + "_Q" if tag[-2:] in (".Q", ".K", ".V") else tag).replace(".", "_")
                s = env[s_name] if cfg.normalization_type is not None else 1.0
                for g in sources:
                    F = np.abs(act[g]) * s  # (b, s, n_g)
                    key = f"edge.{tag}.{g}"
                    if tag.endswith(".enc"):
                        fired = (env[f"mlp{tag.split('.')[0][1:]}"] != 0).astype(np.float32)
                        contrib = F.reshape(-1, F.shape[-1]).T @ fired.reshape(-1, fired.shape[-1])
                    else:
                        contrib = F.reshape(-1, F.shape[-1]).sum(0)
                    acc[key] = acc.get(key, 0) + contrib
            for layer in range(cfg.n_layers):
                A = torch.as_tensor(env[f"L{layer}_pattern"])  # (b, h, q, k)
                P = torch.as_tensor(np.concatenate([(act[g] != 0).astype(np.float32) for g in qk_groups[layer]], -1))
                acc[f"qk.L{layer}"] = acc.get(f"qk.L{layer}", 0) + torch.einsum("bia,bhij,bjc->hac", P, A, P).numpy()
                s1 = env[f"s_L{layer}_Q"] if cfg.normalization_type is not None else np.ones((*toks.shape, 1))
                srcs = reads[f"L{layer}.V"]
                F = torch.as_tensor(np.concatenate([np.abs(act[g]) * s1 for g in srcs], -1).astype(np.float32))
                acc[f"ov.L{layer}"] = acc.get(f"ov.L{layer}", 0) + torch.einsum("bhij,bja->ha", A, F).numpy()
    return {k: np.asarray(v, dtype=np.float32) for k, v in acc.items()}


def group_activations(env, toks: np.ndarray, cfg, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Each source group's activations [b, s, n] (one-hot for tokens and positions, 1 for the bias)."""
    b, s = toks.shape
    act = {
        "tok": np.eye(cfg.d_vocab, dtype=np.float32)[toks],
        "pos": np.broadcast_to(np.eye(cfg.n_ctx, dtype=np.float32)[:s], (b, s, cfg.n_ctx)),
        "bias": np.ones((b, s, 1), dtype=np.float32),
    }
    for name in sizes:
        if name not in act and name in env:
            act[name] = env[name]
    return act
