"""Round trip: an ACG (whole, captured, or a distilled circuit) -> an ordinary dense checkpoint again.

Two steps, so that "the IR it came from" is well defined and the checkpoint can be checked against it:

1. `prune(acg, selection)` keeps what the selection names and nothing else, as an ACG again: the kept transcoder
   features (sliced out of each dictionary), the kept token and position embeddings (the others set to zero; with a
   `token_fill`, to the kept ones' mean, which layer 0's captured pairs then read linearly too: `pairs`), and, with
   `restrict_attention`, every head's output projected onto the subspace S that the kept writers span (kept
   embedding rows, kept decoder rows, the biases). Every other writer then writes into S, so every read (queries,
   keys, values, encoders, the unembedding) sees only S: restricting the writes restricts the reads. Lowering the
   pruned ACG without error terms gives the IR that the checkpoint computes.
2. `to_dense(pruned)` writes that IR as a TransformerLens-layout model of the same class, with MLP width = the most
   features kept in any layer (layers with fewer are padded with neurons whose weights are zero and contribute
   exactly 0). The MLP is the dictionary: `W_in = W_enc`, `b_in = b_enc`, `W_out = W_dec`, `b_out = b_dec`, with the
   dictionary's activation: ReLU dictionaries give `act_fn = "relu"` (a standard model HookedTransformer and Hugging
   Face load), JumpReLU dictionaries give acg's `act_fn = "jumprelu"` with one threshold per neuron
   (`blocks.{l}.mlp.threshold`), which acg's front end, the IR and every backend run, and other tools do not.

Error terms are left out: a round-tripped model is the pure replacement model, restricted.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acg.compiler.acg import ACG
from acg.compiler.transcoder import Transcoder
from acg.compiler.transformer import Transformer, save_checkpoint
from acg.ir.errors import ACGError

TL_ACT = {"relu": "relu", "jumprelu": "jumprelu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


class RoundtripError(ACGError):
    pass


@dataclass(frozen=True)
class Selection:
    """What a round trip keeps: feature indices per layer, and which token / position embeddings. `token_fill`
    (a weight per token id, or None) says what a token left out reads as: None, nothing (its embedding zeroed, it reads
    as its position alone); weights, the mean of the kept tokens' embeddings under them (a mean ablation: a task
    circuit's are how often its prompts hold each token, `circuit.select`)."""

    features: tuple[np.ndarray, ...]
    tokens: np.ndarray  # bool [d_vocab]
    positions: np.ndarray  # bool [n_ctx]
    restrict_attention: bool = True
    source: str = "all"
    meta: dict[str, Any] = field(default_factory=dict)
    token_fill: np.ndarray | None = None  # float [d_vocab] >= 0, or None

    def n_features(self) -> list[int]:
        return [len(f) for f in self.features]


def select_all(acg: ACG) -> Selection:
    """Everything the ACG has (the replacement model itself)."""
    return Selection(
        tuple(np.arange(n) for n in acg.n_features()),
        np.ones(acg.cfg.d_vocab, bool),
        np.ones(acg.cfg.n_ctx, bool),
        restrict_attention=False,
        source="all",
    )


def select_captured(acg: ACG, min_count: float = 1.0, restrict_attention: bool = True) -> Selection:
    """ "Captured means seen": the features that fired on at least `min_count` tokens of the fitting corpus, and the
    tokens and positions that occurred in it."""
    u = acg.usage
    needed = ["tok_count", "pos_count"] + [f"feat_count.L{layer}" for layer in range(acg.cfg.n_layers)]
    missing = [k for k in needed if k not in u]
    if missing:
        raise RoundtripError(
            f"the ACG has no usage statistics ({', '.join(missing[:3])} missing): fit it with `acg fit` "
            "(an imported dictionary has none until it is fitted on a corpus)"
        )
    return Selection(
        tuple(np.flatnonzero(u[f"feat_count.L{layer}"] >= min_count) for layer in range(acg.cfg.n_layers)),
        u["tok_count"] > 0,
        u["pos_count"] > 0,
        restrict_attention=restrict_attention,
        source="captured",
        meta={"min_count": min_count},
    )


def span_basis(vectors: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """An orthonormal basis [k, d] of the rows' span (singular values below rtol * the largest are dropped)."""
    if len(vectors) == 0:
        return np.zeros((0, vectors.shape[-1]))
    _, sv, vt = np.linalg.svd(vectors, full_matrices=False)
    return vt[sv > rtol * sv[0]] if sv[0] > 0 else np.zeros((0, vectors.shape[-1]))


def prune(acg: ACG, sel: Selection) -> tuple[ACG, dict[str, Any]]:
    """The ACG restricted to `sel` (see the module docstring), and a report of what was kept."""
    cfg = acg.cfg
    if len(sel.features) != cfg.n_layers:
        raise RoundtripError(f"the selection names {len(sel.features)} layers, the ACG has {cfg.n_layers}")
    if sel.tokens.shape != (cfg.d_vocab,) or sel.positions.shape != (cfg.n_ctx,):
        raise RoundtripError(
            f"the selection's token / position masks have shapes {sel.tokens.shape} / {sel.positions.shape}, "
            f"the ACG needs ({cfg.d_vocab},) / ({cfg.n_ctx},)"
        )
    transcoders = []
    for layer, (tc, keep) in enumerate(zip(acg.transcoders, sel.features, strict=True)):
        keep = np.asarray(keep, dtype=np.int64)
        if len(keep) and (keep.min() < 0 or keep.max() >= tc.n_features):
            raise RoundtripError(f"layer {layer}: feature index out of range (the dictionary has {tc.n_features})")
        transcoders.append(
            Transcoder(
                tc.W_enc[:, keep],
                tc.b_enc[keep],
                tc.W_dec[keep],
                tc.b_dec,
                tc.act,
                None if tc.threshold is None else tc.threshold[keep],
                {**tc.meta, "kept_from": int(tc.n_features)},
            )
        )
    w = dict(acg.weights)
    weights = fill_weights(sel)
    fill = None if weights is None else (weights @ w["embed.W_E"]).astype(w["embed.W_E"].dtype)
    w["embed.W_E"] = np.where(sel.tokens[:, None], w["embed.W_E"], 0.0 if fill is None else fill)
    w["pos_embed.W_pos"] = np.where(sel.positions[:, None], w["pos_embed.W_pos"], 0.0)
    report: dict[str, Any] = {
        "source": sel.source,
        "n_features": sel.n_features(),
        "n_features_of": acg.n_features(),
        "tokens_dropped": int((~sel.tokens).sum()),
        "positions_dropped": int((~sel.positions).sum()),
        "restrict_attention": sel.restrict_attention,
        "token_fill": "zero" if fill is None else "mean",
    }
    if sel.restrict_attention:
        writers = [w["embed.W_E"][sel.tokens], w["pos_embed.W_pos"][sel.positions]]
        for layer, tc in enumerate(transcoders):
            writers += [tc.W_dec, tc.b_dec[None], w[f"blocks.{layer}.attn.b_O"][None]]
        basis = span_basis(np.concatenate(writers))
        P = basis.T @ basis
        for layer in range(cfg.n_layers):
            w[f"blocks.{layer}.attn.W_O"] = w[f"blocks.{layer}.attn.W_O"] @ P
        report["subspace_rank"] = int(len(basis))
        report["d_model"] = cfg.d_model
    labels = _relabel(acg.labels, sel)
    # layer 0's QK pair statistics index tokens and positions only, which pruning does not renumber (`pairs.carry`)
    usage = {k: v for k, v in acg.usage.items() if k in ("tok_count", "pos_count", "qk.L0")}
    for layer, keep in enumerate(sel.features):
        for key in (f"feat_count.L{layer}", f"feat_mass.L{layer}"):
            if key in acg.usage:
                usage[key] = acg.usage[key][keep]
    meta = {**acg.meta, "roundtrip": {**report, "kept": [np.asarray(f).tolist() for f in sel.features]}}
    if weights is not None:  # which tokens read as which mean: `pairs.reference_ir` carries it into layer 0's pairs
        meta["roundtrip"]["fill"] = {"filled": np.flatnonzero(~sel.tokens).tolist(), "weights": weights.tolist()}
    pruned = ACG(cfg, w, tuple(transcoders), usage, labels, {}, meta)
    return pruned, report


def fill_weights(sel: Selection) -> np.ndarray | None:
    """The weight of each kept token in what every token `sel` leaves out reads as (`Selection.token_fill`,
    normalised to sum 1 over the kept tokens, 0 elsewhere), or None (zeros) where it has none, or gives the kept
    tokens no weight."""
    if sel.token_fill is None:
        return None
    weights = np.asarray(sel.token_fill, dtype=np.float64)
    if weights.shape != sel.tokens.shape or not np.all(weights >= 0):
        raise RoundtripError(f"token_fill must be {sel.tokens.shape[0]} weights >= 0 (one per token id)")
    weights = weights * sel.tokens
    return weights / weights.sum() if weights.sum() > 0 else None


def _relabel(labels: dict[str, dict], sel: Selection) -> dict[str, dict]:
    out = {k: v for k, v in labels.items() if not k.startswith("L") or ".f" not in k}
    for layer, keep in enumerate(sel.features):
        for new, old in enumerate(np.asarray(keep).tolist()):
            if f"L{layer}.f{old}" in labels:
                out[f"L{layer}.f{new}"] = labels[f"L{layer}.f{old}"]
    return out


def to_dense(acg: ACG, dtype: torch.dtype = torch.float32) -> Transformer:
    """The ACG's replacement model (errors dropped) as a dense model of the ordinary class (module docstring)."""
    cfg = acg.cfg
    acts = {tc.act for tc in acg.transcoders}
    if len(acts) != 1:
        raise RoundtripError(f"the dictionaries use different activations ({', '.join(sorted(acts))}); one is needed")
    act = acts.pop()
    width = max(1, *acg.n_features())
    dense_cfg = dataclasses.replace(cfg, d_mlp=width, act_fn=TL_ACT[act])
    state = {k: torch.as_tensor(np.asarray(v), dtype=dtype) for k, v in acg.weights.items() if ".mlp." not in k}
    for layer, tc in enumerate(acg.transcoders):
        n, p = tc.n_features, f"blocks.{layer}.mlp"
        pad = width - n
        state[f"{p}.W_in"] = torch.as_tensor(np.pad(tc.W_enc, ((0, 0), (0, pad))), dtype=dtype)
        state[f"{p}.b_in"] = torch.as_tensor(np.pad(tc.b_enc, (0, pad)), dtype=dtype)
        state[f"{p}.W_out"] = torch.as_tensor(np.pad(tc.W_dec, ((0, pad), (0, 0))), dtype=dtype)
        state[f"{p}.b_out"] = torch.as_tensor(tc.b_dec, dtype=dtype)
        if act == "jumprelu":  # padding neurons: pre = 0, threshold 0 -> 0 > 0 is false -> exactly 0
            state[f"{p}.threshold"] = torch.as_tensor(np.pad(tc.threshold, (0, pad)), dtype=dtype)
    model = Transformer(dense_cfg).to(dtype)
    model.load_state_dict(state)
    return model.eval()


def n_params(model_or_acg: Transformer | ACG) -> dict[str, int]:
    """Parameters that carry anything: MLP parameters count kept neurons only, attention parameters the head
    dimensions in use (a query / key dimension: its W_Q, W_K, b_Q, b_K columns; a value dimension: its W_V, b_V
    column and W_O row), so the zero padding of `to_dense` and `pairs.carry` is excluded."""
    if isinstance(model_or_acg, ACG):
        model_or_acg = to_dense(model_or_acg)
    cfg = model_or_acg.cfg
    mlp = 0
    other = 0
    for name, p in model_or_acg.named_parameters():
        if ".mlp." in name or ".attn." in name:
            continue
        other += p.numel()
    for block in model_or_acg.blocks:
        a = block.attn
        qk = (a.W_Q.abs().sum(1) + a.W_K.abs().sum(1) + a.b_Q.abs() + a.b_K.abs()) > 0  # (heads, d_head)
        ov = (a.W_V.abs().sum(1) + a.W_O.abs().sum(2) + a.b_V.abs()) > 0
        other += int(qk.sum()) * (2 * cfg.d_model + 2) + int(ov.sum()) * (2 * cfg.d_model + 1) + cfg.d_model
        if not hasattr(block, "mlp"):
            continue
        live = (block.mlp.W_in.abs().sum(0) + block.mlp.W_out.abs().sum(1) + block.mlp.b_in.abs()) > 0
        mlp += int(live.sum()) * neuron_params(cfg.d_model, cfg.act_fn) + cfg.d_model
    return {"n_params": mlp + other, "n_params_mlp": mlp}


def mlp_feature_budget(original: Transformer, acg: ACG, fraction: float) -> int:
    """The most features a round trip of `acg` may keep with its MLP parameters (as `n_params` counts them: each kept
    feature's encoder column, bias, decoder row and, for JumpReLU, threshold; each layer's output bias) at most
    `fraction` of `original`'s."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the MLP share must be in (0, 1], got {fraction}")
    d = acg.cfg.d_model
    per = neuron_params(d, acg.transcoders[0].act)  # one activation for all: `to_dense` refuses a mix
    whole = n_params(original)["n_params_mlp"]
    room = fraction * whole - len(acg.transcoders) * d
    if room < per:
        raise RoundtripError(
            f"{fraction:.1%} of the original's MLP parameters ({whole:,}) holds no feature ({per} parameters each, "
            f"{d} per layer for the output bias)"
        )
    return int(room // per)


def neuron_params(d_model: int, act: str) -> int:
    """The parameters of one MLP neuron (a kept feature): its input column and bias, its output row, and a JumpReLU's
    threshold."""
    return 2 * d_model + 1 + (act == "jumprelu")


def roundtrip(
    acg: ACG, sel: Selection | None = None, pairs: bool = False, block: float | None = None
) -> tuple[Transformer, ACG, dict[str, Any]]:
    """(dense model, the pruned ACG whose IR it computes, report). With `pairs`, layer 0's heads are rewritten to leave
    out the QK pairs the corpus never used, or with `block` to keep those pairs' keys unattended (`pairs.carry`; the IR
    it computes is then `pairs.reference_ir(pruned, block=block)`)."""
    pruned, report = prune(acg, sel or select_all(acg))
    if pairs or block is not None:
        from acg.roundtrip.pairs import carry  # pairs builds on this module

        widened, report["pairs"] = carry(pruned, block=block)
        model = to_dense(widened)
    else:
        model = to_dense(pruned)
    report.update(n_params(model))
    report["act_fn"] = model.cfg.act_fn
    report["d_mlp"] = model.cfg.d_mlp
    report["kept"] = pruned.meta["roundtrip"]["kept"]  # feature indices per layer, for `acg diff`
    return model, pruned, report


def save(model: Transformer, path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """A TransformerLens-layout folder (`config.json`, `model.safetensors`, `meta.json` with the report)."""
    return save_checkpoint(model, path, {"roundtrip": report})
