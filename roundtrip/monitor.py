"""The off-distribution pathway monitor: flag inputs whose features are reached through pathways the fitting corpus
never used (DESIGN.md, "Z = 10C + 20D where C and D never co-occur in distribution").

The profile is what the ACG's usage statistics recorded on the fitting corpus ("captured means seen"), or the same
statistics gathered again on a corpus of the user's (`profile_from_corpus`). A pathway is *unseen* where it carried
no mass there. An input is run through the exact feature-level IR (error terms kept, so the activations are the
model's own) and scored at three kinds of site, each a fraction in [0, 1] per layer and position:

- `enc`: the share of the firing features' pre-activation mass from sparse sources (tokens, positions, earlier
  features) that arrives over unseen edges (source, feature), and, with a corpus profile, over unseen attention
  edges (a token or position at a key position, moved by a head, into the feature: DESIGN.md's OV in feature terms);
- `qk`: per head, the attention mass from the query position to key positions joined to it by a (query feature, key
  feature) pair that never co-occurred at that head; pairs of two position features are left out, since they only
  say that a prompt is longer than those seen;
- `ov`: per head, the share of the value mass the head moved that came from sources never seen feeding it.

A prompt's score is the largest value over sites, layers, heads and positions; `scan` lists the pathways behind it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from acg.compiler.acg import ACG
from acg.compiler.lower import SPARSE_KINDS, lower
from acg.compiler.usage import group_activations, group_sizes, pair_statistics
from acg.ir import interpret
from acg.ir.errors import ACGError
from acg.roundtrip.evaluate import length_batches

SITES = ("enc", "qk", "ov")


def _spmm(F: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Sparse activations [N, n] (mostly zeros) times a dense matrix [n, m]."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return F.to_sparse_csr() @ W


class MonitorError(ACGError):
    pass


def _sparse(group: str) -> bool:
    return group.rstrip("0123456789") in SPARSE_KINDS


def _at_layer(table: dict[str, np.ndarray], layer: int) -> list[tuple[str, np.ndarray]]:
    """(source group, seen mask) of a profile table keyed `L{layer}.{group}`, for one layer."""
    return [(key.split(".", 1)[1], seen) for key, seen in table.items() if key.split(".", 1)[0] == f"L{layer}"]


@dataclass(frozen=True, eq=False)
class Profile:
    """Seen pathways: `enc["L{l}.{g}"]` bool [n_source, n_features], `qk[l]` bool [n_heads, n, n] over the groups
    `qk_groups[l]` (concatenated), `ov["L{l}.{g}"]` bool [n_heads, n_source]; from a corpus also `att["L{k}.L{l}.{g}"]`
    bool [n_heads, n_source, n_features]: a token or position source moved by layer k's head into layer l's feature
    (attention edges; the usage statistics do not record them)."""

    enc: dict[str, np.ndarray]
    qk: dict[int, np.ndarray]
    ov: dict[str, np.ndarray]
    qk_groups: dict[int, list[str]]
    source: str = "usage"
    n_prompts: int | None = None
    att: dict[str, np.ndarray] = field(default_factory=dict)


def profile_from_usage(acg: ACG, stats: dict[str, np.ndarray] | None = None, **meta: Any) -> Profile:
    """The profile the ACG's own usage statistics (or `stats` laid out the same way) describe."""
    usage = acg.usage if stats is None else stats
    layout = acg.stats
    if not usage or "read_sources" not in layout or "qk_sources" not in layout:
        raise MonitorError(
            "this ACG carries no usage statistics (fitted with an older acg, or built by hand); "
            "refit it with `acg fit`, or build the profile from a corpus (`--corpus`)"
        )
    enc, ov, qk = {}, {}, {}
    for layer in range(acg.cfg.n_layers):
        for g, _ in layout["read_sources"][f"L{layer}.enc"]:
            if _sparse(g):
                enc[f"L{layer}.{g}"] = usage[f"edge.L{layer}.enc.{g}"] > 0
        at = 0
        for g, n in layout["read_sources"][f"L{layer}.V"]:
            if _sparse(g):
                ov[f"L{layer}.{g}"] = usage[f"ov.L{layer}"][:, at : at + n] > 0
            at += n
        qk[layer] = usage[f"qk.L{layer}"] > 0
    groups = {int(k): list(v) for k, v in layout["qk_sources"].items()}
    n_prompts = meta.get("n_prompts", layout.get("spec", {}).get("usage_prompts"))
    return Profile(enc, qk, ov, groups, meta.get("source", "usage"), n_prompts)


def profile_from_corpus(acg: ACG, corpus: Sequence[Sequence[int]], pair_budget: int | None = None) -> Profile:
    """The same statistics gathered on `corpus` (token id lists) with the exact ACG (error terms kept)."""
    if not corpus:
        raise MonitorError("the corpus to profile is empty")
    budget = pair_budget or acg.stats.get("spec", {}).get("pair_budget", 1 << 26)
    graph = lower(acg, keep_errors=True, dtype="float32")
    seqs = [list(s) for s in corpus]
    stats = pair_statistics(graph, acg.cfg, acg.transcoders, seqs, budget)
    profile = profile_from_usage(acg, stats, source="corpus", n_prompts=len(corpus))
    return replace(profile, att=attention_edges(graph, acg, seqs))


ATT_SOURCES = ("tok", "pos")


def attention_edges(graph, acg: ACG, seqs: list[list[int]]) -> dict[str, np.ndarray]:
    """Seen attention edges on `seqs`: source b (a token or position) at key j, moved by layer k's head h, into a
    feature z of layer l >= k firing at query i, where sum A_h(i, j) s_j |f_b(j)| [z fired at i] > 0."""
    cfg = acg.cfg
    sizes = group_sizes(cfg, acg.transcoders)
    acc: dict[str, torch.Tensor] = {}
    for idx in length_batches(seqs, 128):
        toks = np.array([seqs[i] for i in idx], dtype=np.int64)
        env = interpret.run(graph, toks, dtype="float32", keep=True)
        act = group_activations(env, toks, cfg, sizes)
        for k in range(cfg.n_layers):
            A = torch.as_tensor(env[f"L{k}_pattern"])
            sv = np.abs(env[f"s_L{k}_Q"]) if cfg.normalization_type is not None else 1.0
            for layer in range(k, cfg.n_layers):
                T = torch.einsum("bhij,bif->bhjf", A, torch.as_tensor(env[f"mlp{layer}"] != 0, dtype=torch.float32))
                for g in ATT_SOURCES:
                    F = torch.as_tensor(np.abs(act[g]) * sv, dtype=torch.float32)
                    key = f"L{k}.L{layer}.{g}"
                    acc[key] = acc.get(key, 0) + torch.einsum("bjs,bhjf->hsf", F, T)
    return {k: (v > 0).numpy() for k, v in acc.items()}


@dataclass
class Scan:
    """One prompt: `sites[kind]` [n_layers, n_pos] (the head-wise maximum for qk and ov), `score`, and `pathways`,
    the unseen pathways behind the largest site values (dicts with site, layer, position, weight and feature ids)."""

    tokens: list[int]
    sites: dict[str, np.ndarray]
    score: float
    pathways: list[dict[str, Any]] = field(default_factory=list)


class Monitor:
    """Scores prompts against a profile; see the module docstring."""

    def __init__(
        self,
        acg: ACG,
        profile: Profile | None = None,
        pair_kinds: tuple[str, ...] = ("tok", "pos"),
        threads: int | None = None,
    ):
        self.acg, self.cfg = acg, acg.cfg
        self.profile = profile or profile_from_usage(acg)
        self.graph = lower(acg, keep_errors=True, dtype="float32")
        self.sizes = group_sizes(self.cfg, acg.transcoders)
        self.threads = threads
        self._att_cache: dict[tuple[int, int, str], torch.Tensor] = {}
        self.scale = {k: 1.0 for k in SITES}  # `calibrate` sets these
        self.calibration: dict[str, Any] = {}
        self.V = {k: np.abs(t).astype(np.float32) for k, t in self.graph.tensors.items() if k.startswith("V.")}
        self._qk_unseen = {}
        for layer, seen in self.profile.qk.items():
            unseen = torch.as_tensor(~seen, dtype=torch.float32)  # (h, a, c)
            groups = self.profile.qk_groups[layer]
            kinds = np.concatenate([[g.rstrip("0123456789")] * self.sizes[g] for g in groups])
            allowed = torch.as_tensor(np.isin(kinds, pair_kinds))
            unseen *= (allowed[:, None] & allowed[None, :])[None]
            if "pos" in groups:  # pos x pos pairs only say "longer than seen"
                at = sum(self.sizes[g] for g in groups[: groups.index("pos")])
                sl = slice(at, at + self.sizes["pos"])
                unseen[:, sl, sl] = 0
            h, n, _ = unseen.shape
            self._qk_unseen[layer] = unseen.permute(1, 0, 2).reshape(n, h * n).contiguous()

    # ------------------------------------------------------------------------------------------------- per batch

    def _run(self, toks: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        env = interpret.run(self.graph, toks, dtype="float32", keep=True)
        return env, group_activations(env, toks, self.cfg, self.sizes)

    def _s(self, env: dict, name: str, shape: tuple[int, int]) -> np.ndarray:
        if self.cfg.normalization_type is None:
            return np.ones((*shape, 1), dtype=np.float32)
        return env[name]

    def _enc(self, env, act, layer: int, toks) -> tuple[torch.Tensor, torch.Tensor]:
        """(unseen mass, total mass) of each feature's sparse pre-activation [b, s, n_features]."""
        s = torch.as_tensor(self._s(env, f"s_L{layer}_enc", toks.shape))
        unseen = total = 0
        for g, seen in _at_layer(self.profile.enc, layer):
            W = torch.as_tensor(self.V[f"V.L{layer}.enc.{g}"])
            F = torch.as_tensor(np.abs(act[g]), dtype=torch.float32)
            b, n_pos, n_src = F.shape
            F = F.reshape(-1, n_src)
            mm = _spmm if g.startswith("mlp") else torch.matmul
            Wu = W * torch.as_tensor(~seen, dtype=torch.float32)
            unseen = unseen + mm(F, Wu).reshape(b, n_pos, -1)
            total = total + mm(F, W).reshape(b, n_pos, -1)
        for key, seen in self.profile.att.items():  # attention edges into this layer's features
            k, target, g = key.split(".")
            if target != f"L{layer}":
                continue
            W = self._att_weight(int(k[1:]), layer, g)  # (h, n_src, n_features)
            sv = np.abs(self._s(env, f"s_L{k[1:]}_Q", toks.shape)) if self.cfg.normalization_type else 1.0
            F = torch.as_tensor(np.abs(act[g]) * sv, dtype=torch.float32)
            A = torch.as_tensor(env[f"{k}_pattern"])
            for Wx, into in ((W * torch.as_tensor(~seen, dtype=torch.float32), "unseen"), (W, "total")):
                moved = torch.einsum("bhij,bhjz->biz", A, torch.einsum("bjs,hsz->bhjz", F, Wx))
                if into == "unseen":
                    unseen = unseen + moved
                else:
                    total = total + moved
        return unseen * s, total * s

    def _att_weight(self, k: int, layer: int, g: str) -> torch.Tensor:
        """|virtual weight| of source g through each head of layer k into layer `layer`'s encoder [h, n_src, n_feat]."""
        key = (k, layer, g)
        if key not in self._att_cache:
            h, dh = self.cfg.n_heads, self.cfg.d_head
            into_v = self.graph.tensors[f"V.L{k}.V.{g}"].reshape(-1, h, dh)  # (n_src, h, d_head)
            out_enc = self.graph.tensors[f"V.L{layer}.enc.attn{k}"].reshape(h, dh, -1)  # (h, d_head, n_feat)
            self._att_cache[key] = torch.as_tensor(
                np.abs(np.einsum("shd,hdz->hsz", into_v, out_enc)), dtype=torch.float32
            )
        return self._att_cache[key]

    def _presence(self, act, groups: list[str]) -> torch.Tensor:
        return torch.as_tensor(np.concatenate([(act[g] != 0) for g in groups], -1), dtype=torch.float32)

    def _qk(self, env, act, layer: int) -> torch.Tensor:
        """Attention mass over keys joined to the query by an unseen pair [b, h, q, k]."""
        P = self._presence(act, self.profile.qk_groups[layer])  # (b, s, n)
        b, n_pos, n = P.shape
        h = self.cfg.n_heads
        Q = _spmm(P.reshape(-1, n), self._qk_unseen[layer]).reshape(b, n_pos, h, n)
        joined = torch.einsum("bihc,bjc->bhij", Q, P) > 0
        return torch.as_tensor(env[f"L{layer}_pattern"]) * joined

    def _ov(self, env, act, layer: int, toks) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head and key position, value mass from unseen sources and in all [b, h, k]."""
        s = np.abs(self._s(env, f"s_L{layer}_Q", toks.shape))
        unseen = total = 0
        for g, seen in _at_layer(self.profile.ov, layer):
            F = torch.as_tensor(np.abs(act[g]) * s, dtype=torch.float32)  # (b, s, n)
            unseen = unseen + torch.einsum("bjn,hn->bhj", F, torch.as_tensor(~seen, dtype=torch.float32))
            total = total + F.sum(-1)[:, None, :]
        if not torch.is_tensor(unseen):
            raise MonitorError(f"layer {layer}: the profile records no sparse source feeding the heads' values")
        return unseen, total

    def _sites(self, toks: np.ndarray) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """Per site kind, [b, n_layers, n_pos] (qk / ov: the largest over heads), and the raw pieces for `scan`."""
        env, act = self._run(toks)
        out: dict[str, list[torch.Tensor]] = {k: [] for k in SITES}
        raw: dict[str, Any] = {}
        for layer in range(self.cfg.n_layers):
            fired = torch.as_tensor(env[f"mlp{layer}"] != 0)
            u, t = self._enc(env, act, layer, toks)
            share = torch.where(fired & (t > 0), u / t.clamp_min(1e-30), torch.zeros_like(t))
            fu, ft = (u * fired).sum(-1), (t * fired).sum(-1)
            out["enc"].append(torch.where(ft > 0, fu / ft.clamp_min(1e-30), torch.zeros_like(ft)))
            qk = self._qk(env, act, layer)
            out["qk"].append(qk.sum(-1).max(1).values)
            A = torch.as_tensor(env[f"L{layer}_pattern"])
            ou, ot = self._ov(env, act, layer, toks)
            num = torch.einsum("bhij,bhj->bhi", A, ou)
            den = torch.einsum("bhij,bhj->bhi", A, ot.expand_as(ou))
            out["ov"].append(torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)).max(1).values)
            raw[layer] = {"share": share, "qk": qk, "ov": (A, ou, ot)}
        return {k: torch.stack(v, 1) for k, v in out.items()}, raw, {"env": env, "act": act}

    # ---------------------------------------------------------------------------------------------------- public

    def score(self, prompts: Sequence[Sequence[int]], batch: int = 128) -> dict[str, np.ndarray]:
        """Per prompt: `score` (the largest site value), and `enc` / `qk` / `ov` (the largest of each kind)."""
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            out = {k: np.zeros(len(prompts)) for k in ("score", *SITES)}
            for p in prompts:
                self._check(p)
            for idx in length_batches(prompts, batch):
                sites, _, _ = self._sites(np.array([prompts[i] for i in idx], dtype=np.int64))
                for k, v in sites.items():
                    out[k][idx] = v.flatten(1).max(-1).values.double().numpy()
            out["score"] = np.max([out[k] / self.scale[k] for k in SITES], axis=0)
            return out
        finally:
            torch.set_num_threads(threads)

    def calibrate(self, prompts: Sequence[Sequence[int]], quantile: float = 0.99, floor: float = 1e-3) -> dict:
        """Put the site kinds on one scale: each kind's values are divided by their `quantile` on `prompts` (clean
        prompts the profile did not see), at least `floor`, so that the score is how far past its normal range the most
        unusual kind went (1 = at the calibration quantile)."""
        self.scale = {k: 1.0 for k in SITES}
        raw = self.score(prompts)
        self.scale = {k: max(float(np.quantile(raw[k], quantile)), floor) for k in SITES}
        self.calibration = {"n_prompts": len(prompts), "quantile": quantile, "floor": floor, "scale": self.scale}
        return self.calibration

    def _check(self, prompt: Sequence[int]) -> None:
        if not 0 < len(prompt) <= self.cfg.n_ctx:
            raise MonitorError(f"a prompt of {len(prompt)} tokens; this model takes 1 to {self.cfg.n_ctx}")
        bad = [t for t in prompt if not 0 <= int(t) < self.cfg.d_vocab]
        if bad:
            raise MonitorError(f"token ids {bad[:5]} are outside the vocabulary (0 .. {self.cfg.d_vocab - 1})")

    def scan(self, prompt: Sequence[int], top: int = 8) -> Scan:
        """One prompt: the site values per layer and position, and the `top` unseen pathways behind them."""
        self._check(prompt)
        toks = np.array([list(prompt)], dtype=np.int64)
        sites, raw, run = self._sites(toks)
        values = {k: v[0].double().numpy() for k, v in sites.items()}
        score = float(max(values[k].max() / self.scale[k] for k in SITES))
        paths: list[dict[str, Any]] = []
        for layer in range(self.cfg.n_layers):
            paths += self._enc_paths(layer, raw[layer]["share"][0], run, toks)
            paths += self._qk_paths(layer, raw[layer]["qk"][0], run["act"])
            paths += self._ov_paths(layer, *raw[layer]["ov"], run)
        paths.sort(key=lambda p: -p["weight"])
        return Scan(list(map(int, prompt)), values, score, paths[:top])

    # ----------------------------------------------------------------------------------------- pathway listings

    def _fid(self, group: str, index: int) -> str:
        if group in ("tok", "pos"):
            return f"{group}:{index}"
        return f"L{group[3:]}.f{index}"

    def _active(self, act, groups: list[str], pos: int) -> list[tuple[str, int, int]]:
        """(group, index within group, index in the concatenation) of the sources active at `pos`."""
        out, at = [], 0
        for g in groups:
            idx = np.flatnonzero(act[g][0, pos])
            out += [(g, int(i), at + int(i)) for i in idx]
            at += self.sizes[g]
        return out

    def _enc_paths(self, layer, share, run, toks) -> list[dict[str, Any]]:
        env, act = run["env"], run["act"]
        s = self._s(env, f"s_L{layer}_enc", toks.shape)[0, :, 0]
        out = []
        for pos, z in zip(*np.nonzero(share.numpy() > 0), strict=True):
            for g, seen in _at_layer(self.profile.enc, layer):
                for i in np.flatnonzero(act[g][0, pos]):
                    if not seen[i, z]:
                        w = float(s[pos] * act[g][0, pos, i] * self.graph.tensors[f"V.L{layer}.enc.{g}"][i, z])
                        out.append(
                            {
                                "site": "enc",
                                "layer": layer,
                                "position": int(pos),
                                "source": self._fid(g, int(i)),
                                "target": f"L{layer}.f{int(z)}",
                                "contribution": w,
                                "share": float(share[pos, z]),
                                "weight": float(share[pos, z]),
                            }
                        )
        return out

    def _qk_paths(self, layer, qk, act) -> list[dict[str, Any]]:
        groups = self.profile.qk_groups[layer]
        seen = self.profile.qk[layer]
        out = []
        for h, i, j in zip(*np.nonzero(qk.numpy() > 0), strict=True):
            pairs = [
                (self._fid(ga, a), self._fid(gb, b))
                for ga, a, ca in self._active(act, groups, int(i))
                for gb, b, cb in self._active(act, groups, int(j))
                if not seen[h, ca, cb] and not (ga == gb == "pos")
            ]
            out.append(
                {
                    "site": "qk",
                    "layer": layer,
                    "head": int(h),
                    "position": int(i),
                    "key_position": int(j),
                    "pairs": pairs[:6],
                    "weight": float(qk[h, i, j]),
                }
            )
        return out

    def _ov_paths(self, layer, A, ou, ot, run) -> list[dict[str, Any]]:
        act = run["act"]
        out = []
        A, ou = A[0].numpy(), ou[0].numpy()
        denom = np.einsum("hij,hj->hi", A, np.broadcast_to(ot[0].numpy(), ou.shape))
        for h, j in zip(*np.nonzero(ou > 0), strict=True):
            i = int(np.argmax(A[h, :, j]))
            sources = []
            for g, seen in _at_layer(self.profile.ov, layer):
                sources += [self._fid(g, int(b)) for b in np.flatnonzero(act[g][0, j]) if not seen[h, b]]
            w = float(A[h, i, j] * ou[h, j] / max(denom[h, i], 1e-30))
            out.append(
                {
                    "site": "ov",
                    "layer": layer,
                    "head": int(h),
                    "position": i,
                    "key_position": int(j),
                    "sources": sources[:6],
                    "weight": w,
                }
            )
        return out


def testbed_profile(acg: ACG, n: int) -> Profile:
    """The profile gathered on the first `n` prompts of the testbed's clean fitting corpus (`acg demo`'s)."""
    from acg.compiler.harvest import testbed_corpus
    from acg.zoo import vocab

    if acg.cfg.d_vocab != vocab.D_VOCAB:
        raise MonitorError("a testbed profile needs a model on the testbed vocabulary; use profile_from_corpus")
    return profile_from_corpus(acg, testbed_corpus(n, seed=1000))


def calibration_prompts(acg, n: int, skip: int | None = None) -> list[list[int]]:
    """Clean prompts of the fitting distribution (testbed models only) past the first `skip` (default: those the
    usage statistics saw), so that the profile has not seen them."""
    from acg.compiler.harvest import testbed_corpus
    from acg.zoo import vocab

    if acg.cfg.d_vocab != vocab.D_VOCAB:
        raise MonitorError("calibration draws testbed prompts; this model has another vocabulary: pass --calibrate 0")
    seen = int(skip if skip is not None else acg.stats.get("spec", {}).get("usage_prompts", 1000))
    return testbed_corpus(seen + n, seed=1000)[seen:]


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive scores above a negative (ties count half)."""
    from scipy.stats import mannwhitneyu

    if len(negatives) == 0 or len(positives) == 0:
        raise ValueError("auroc needs at least one negative and one positive score")
    u = mannwhitneyu(positives, negatives, alternative="two-sided").statistic
    return float(u / (len(positives) * len(negatives)))


def detection_at_fpr(negatives: np.ndarray, positives: np.ndarray, fpr: float = 0.01) -> tuple[float, float]:
    """(the fraction of positives flagged, the threshold) when the threshold lets through at most `fpr` of the
    negatives: flagged means score > threshold, the threshold being the (1 - fpr) quantile of the negatives."""
    negatives = np.sort(np.asarray(negatives, dtype=np.float64))
    k = int(np.floor(fpr * len(negatives)))  # at most k negatives may lie above the threshold
    threshold = negatives[len(negatives) - 1 - k] if k < len(negatives) else -np.inf
    return float((np.asarray(positives) > threshold).mean()), float(threshold)
