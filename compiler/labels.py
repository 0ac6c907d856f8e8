"""Feature labels: each transcoder feature's top-activating contexts (token windows from the fitting corpus) and top
output-token effects, and a short deterministic label derived from them, e.g. `'print' <- '=' -> '7'`."""

from __future__ import annotations

from collections import Counter

import numpy as np

from acg.compiler.harvest import Activations


def token_names(d_vocab: int) -> list[str]:
    """The testbed's words when the vocabulary matches, else `#id`."""
    from acg.zoo import vocab

    if d_vocab == vocab.D_VOCAB:
        return list(vocab.TOKENS)
    return [f"#{i}" for i in range(d_vocab)]


def _top(values: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(values))
    idx = np.argpartition(-values, k - 1)[:k]
    return idx[np.lexsort((idx, -values[idx]))]  # by value, ties by index: deterministic


def label_features(
    model, transcoders, acts: Activations, k_contexts: int = 8, window: int = 6, max_tokens: int = 60_000
) -> dict[str, dict]:
    """Labels from the first `max_tokens` harvested tokens (enough for top contexts, bounded memory)."""
    cfg = model.cfg
    n_tokens = min(acts.n_tokens, max_tokens)
    names = token_names(cfg.d_vocab)
    w = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    wf = w["ln_final.w"] if cfg.normalization_type in ("LN", "RMS") else np.ones(cfg.d_model)
    read_out = wf[:, None] * w["unembed.W_U"]  # (d_model, d_vocab)
    center = cfg.normalization_type in ("LN", "LNPre")
    starts = {}
    for row, (p, pos) in enumerate(zip(acts.prompt[:n_tokens], acts.positions[:n_tokens], strict=True)):
        if pos == 0:
            starts[int(p)] = row
    labels: dict[str, dict] = {}
    for layer, tc in enumerate(transcoders):
        f = np.zeros((n_tokens, tc.n_features), dtype=np.float32)
        for start in range(0, n_tokens, 8192):
            stop = min(start + 8192, n_tokens)
            f[start:stop] = tc.encode(np.asarray(acts.mlp_in[layer][start:stop], np.float64))
        D = tc.W_dec - tc.W_dec.mean(-1, keepdims=True) if center else tc.W_dec
        effects = D @ read_out  # (n_features, d_vocab): direct logit effects
        for i in range(tc.n_features):
            col = f[:, i]
            fired = int((col != 0).sum())
            top_out = [names[t] for t in _top(effects[i], 3)]
            entry: dict = {"fired": fired, "top_tokens": top_out}
            if fired == 0:
                entry["label"] = "dead"
                entry["contexts"] = []
            else:
                rows = _top(col, min(k_contexts, fired))
                rows = rows[col[rows] != 0]
                contexts = []
                for r in rows:
                    start = starts.get(int(acts.prompt[r]), r - int(acts.positions[r]))
                    lo = max(start, r - window + 1)
                    contexts.append(
                        {"tokens": [names[t] for t in acts.tokens[lo : r + 1]], "activation": round(float(col[r]), 4)}
                    )
                entry["contexts"] = contexts
                entry["label"] = _label(contexts, top_out[0])
            labels[f"L{layer}.f{i}"] = entry
    return labels


def _label(contexts: list[dict], top_out: str) -> str:
    cur = Counter(c["tokens"][-1] for c in contexts).most_common(1)[0]
    prev = Counter(c["tokens"][-2] for c in contexts if len(c["tokens"]) > 1).most_common(1)
    text = repr(cur[0]) if cur[1] * 2 >= len(contexts) else "mixed"
    if prev and prev[0][1] * 2 >= len(contexts):
        text += f" after {prev[0][0]!r}"
    return f"{text} -> {top_out!r}"
