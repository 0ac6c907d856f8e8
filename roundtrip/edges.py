"""Edge-level circuits: which terms of an unrolled circuit a task needs, kept by attribution and a faithfulness target.

An unrolled circuit (`compiler/unroll.py`) is a sum of explicit edges: each feature's pre-activation sums terms
`w * node` (edges from tokens, positions, biases, earlier features and what each head brings from each node), and
each head's score sums pair terms `v * a(i) * b(j)` and key terms `g * b(j)`, scaled by the layer-norm factors. Here
the circuit runs as a torch module, `CircuitNet`, that computes what the IR computes (tested against the
interpreter), so every edge gets its gradient x activation attribution on the circuit itself: for a task prompt,
the answer's logit minus the mean logit, differentiated with respect to the sum the edge feeds, times the edge's
term, summed over positions (a feature term: `d target / d pre_j(i) * s(i) * w * node(i)`; a pair term:
`d target / d score(i, j) * s(i) s(j) * v * a(i) * b(j)` over query and key positions). Where the logit is linear
in the sum (a last-layer feature staying on the same side of its threshold, no final layer norm) that is exactly the
logit change from deleting the edge (tested); elsewhere the first-order estimate. An edge's score is the mean over
prompts of |its attribution|.

Selection ranks every edge of every sum together and keeps the top k; the faithfulness curve gives `task_acc` of the
circuit with only those edges against the fraction of edges kept, and k is the smallest on a geometric grid, refined
by bisection, whose `task_acc` is within `tolerance` of the reference on every task. Leaving an edge out removes a
term from a sum, never a node from the circuit: the residual stream (so the layer-norm scales) and every node's write
to the logits stay those of the feature circuit (what feature selection scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from acg.compiler.acg import ACG
from acg.compiler.lower import centre
from acg.compiler.progress import Progress
from acg.compiler.transcoder import ACTIVATIONS
from acg.compiler.unroll import Head, Node, _Unroll, stage_of, unroll
from acg.ir.graph import Graph
from acg.roundtrip.circuit import smallest_passing
from acg.roundtrip.evaluate import accuracy, answer_logits, length_batches
from acg.zoo.tasks import Example

Edge = tuple[str, ...]

ACT = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}
assert set(ACT) | {"jumprelu"} == set(ACTIVATIONS)


class CircuitNet(torch.nn.Module):
    """An unrolled circuit as one torch module: tokens [batch, seq] -> logits [batch, seq, vocab], computing what
    `unroll(...)` lowers to the IR (the same nodes, terms, layer-norm scales and attention), in float64.

    Node values live in one tensor [batch, seq, n_live] whose columns are the live nodes in creation order. Each
    feature's terms form a column of a matrix over the nodes before its stage (`feature_w[layer]`), each head's pair
    terms a matrix over query x key nodes (`pair_w[head]`) and its key terms a vector (`key_w[head]`): editing an
    entry edits that edge. `record=True` keeps the tensors the attribution needs (`self.seen`)."""

    def __init__(self, u: _Unroll, nodes: list[Node], heads: list[Head]):
        super().__init__()
        need = u.needed(nodes, heads)
        cfg, w = u.cfg, u.w
        self.cfg, self.center = cfg, u.center
        self.live = [n for n in nodes if n.name in need]
        self.index = {n.name: i for i, n in enumerate(self.live)}
        self.stages: dict[tuple[int, str], list[Node]] = {}
        for n in self.live:
            self.stages.setdefault(stage_of(n), []).append(n)
        f64 = torch.float64
        self.writes = torch.tensor(np.stack([n.write for n in self.live]), dtype=f64)
        self.tok_ids = [int(n.name[4:]) if n.kind == "tok" else -1 for n in self.live if n.kind in ("tok", "pos")]
        self.pos_ids = [int(n.name[4:]) if n.kind == "pos" else -1 for n in self.live if n.kind in ("tok", "pos")]
        self.act = "relu"
        self.feature_w: dict[int, torch.Tensor] = {}
        self.feature_c: dict[int, torch.Tensor] = {}
        self.threshold: dict[int, torch.Tensor] = {}
        self.pair_w: dict[tuple[int, int], torch.Tensor] = {}
        self.key_w: dict[tuple[int, int], torch.Tensor] = {}
        for layer in range(cfg.n_layers):
            before = self._before(layer, "attn")
            for n in self.stages.get((layer, "attn"), []):
                if n.kind != "head" or n.head in self.pair_w:
                    continue
                pairs, keys = u.scores[n.head]
                T = torch.zeros(before, before, dtype=f64)
                for a, c, v in pairs:
                    T[self.index[a], self.index[c]] = v
                g = torch.zeros(before, dtype=f64)
                for k, v in keys:
                    g[self.index[k]] = v
                self.pair_w[n.head], self.key_w[n.head] = T, g
            if cfg.attn_only:
                continue
            feats = [n for n in self.stages.get((layer, "mlp"), []) if n.kind == "feat"]
            before = self._before(layer, "mlp")
            W = torch.zeros(before, len(feats), dtype=f64)
            tc = u.acg.transcoders[layer]
            _, b2 = u.ln(f"blocks.{layer}.ln2")
            idx = [int(n.name.split("_")[1]) for n in feats]
            for j, n in enumerate(feats):
                for k, v in u.terms[n.name]:
                    W[self.index[k], j] = v
            self.feature_w[layer] = W
            self.feature_c[layer] = torch.tensor(b2 @ tc.W_enc[:, idx] + tc.b_enc[idx], dtype=f64)
            if tc.act == "jumprelu":
                self.threshold[layer] = torch.tensor(tc.threshold[idx], dtype=f64)
            self.act = tc.act
        wf, bf = u.ln("ln_final")
        table = np.stack([centre(n.write, self.center) for n in self.live]) @ (wf[:, None] * w["unembed.W_U"])
        self.unembed_w = torch.tensor(table, dtype=f64)
        self.unembed_c = torch.tensor(bf @ w["unembed.W_U"] + w["unembed.b_U"], dtype=f64)
        self.seen: dict[Any, torch.Tensor] = {}

    def _before(self, layer: int, where: str) -> int:
        """How many live nodes come before stage (layer, where)."""
        order = [(-1, "embed")] + [(lay, s) for lay in range(self.cfg.n_layers) for s in ("attn", "mlp")]
        stop = order.index((layer, where))
        return sum(len(self.stages.get(st, [])) for st in order[:stop])

    def scale(self, N: torch.Tensor) -> torch.Tensor | None:
        """The layer-norm factor of the circuit's own stream (the sum of the live nodes' writes): [batch, seq]."""
        if self.cfg.normalization_type is None:
            return None
        x = N @ self.writes[: N.shape[-1]]
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return 1.0 / torch.sqrt((x * x).mean(-1) + self.cfg.eps)

    def forward(self, tokens: torch.Tensor, record: bool = False) -> torch.Tensor:
        tokens = torch.as_tensor(tokens)
        batch, seq = tokens.shape
        pos = torch.arange(seq).expand(batch, seq)
        tok = torch.tensor(self.tok_ids, dtype=torch.long)
        where = torch.tensor(self.pos_ids, dtype=torch.long)
        cols = ((tokens[..., None] == tok) | (pos[..., None] == where)).double()  # [batch, seq, n_embed_nodes]
        cols.requires_grad_(record)  # so that every sum downstream can keep its gradient
        self.seen = {}
        for layer in range(self.cfg.n_layers):
            s = self.scale(cols)
            new = []
            patterns: dict[int, torch.Tensor] = {}
            for n in self.stages.get((layer, "attn"), []):
                if n.kind == "bias":
                    new.append(torch.ones(batch, seq, dtype=torch.float64))
                    continue
                h = n.head[1]
                if h not in patterns:
                    patterns[h] = self._pattern(n.head, cols, s, record)
                src = cols[..., self.index[n.source]]
                new.append((patterns[h] @ (src * s if s is not None else src)[..., None])[..., 0])
            cols = torch.cat([cols, torch.stack(new, -1)], -1) if new else cols
            if self.cfg.attn_only:
                continue
            s = self.scale(cols)
            pre = cols @ self.feature_w[layer]
            if s is not None:
                pre = pre * s[..., None]
            pre = pre + self.feature_c[layer]
            if record:
                pre.retain_grad()
                self.seen[("pre", layer)] = pre
                self.seen[("in", layer)] = cols
                self.seen[("s_mlp", layer)] = s
            if self.act == "jumprelu":
                f = torch.where(pre > self.threshold[layer], pre, torch.zeros_like(pre))
            else:
                f = ACT[self.act](pre)
            out, j = [], 0
            for n in self.stages.get((layer, "mlp"), []):
                if n.kind == "bias":
                    out.append(torch.ones(batch, seq, dtype=torch.float64))
                else:
                    out.append(f[..., j])
                    j += 1
            cols = torch.cat([cols, torch.stack(out, -1)], -1) if out else cols
        s = self.scale(cols)
        x = cols @ self.unembed_w
        if s is not None:
            x = x * s[..., None]
        return x + self.unembed_c

    def _pattern(self, head: tuple[int, int], N: torch.Tensor, s: torch.Tensor | None, record: bool) -> torch.Tensor:
        T, g = self.pair_w[head], self.key_w[head]
        Ns = N * s[..., None] if s is not None else N
        score = (Ns @ T) @ Ns.transpose(1, 2) + (Ns @ g)[:, None, :]
        if record:
            score.retain_grad()
            self.seen[("score", head)] = score
            self.seen[("in_attn", head)] = Ns
        if self.cfg.attention_dir == "causal":
            seq = N.shape[1]
            future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
            score = score.masked_fill(future, float("-inf"))
        return torch.softmax(score, -1)


def edge_attribution(
    net: CircuitNet, examples: Sequence[Example], batch: int = 64, progress: bool = False
) -> dict[Edge, float]:
    """Every edge of `net` -> the mean over `examples` of |its gradient x activation attribution| (module docstring)."""
    feat = {layer: torch.zeros_like(W) for layer, W in net.feature_w.items()}
    pair = {head: torch.zeros_like(T) for head, T in net.pair_w.items()}
    key = {head: torch.zeros_like(g) for head, g in net.key_w.items()}
    bar = Progress("edge attribution", len(examples), progress)
    for idx in length_batches([ex.ids for ex in examples], batch):
        chunk = [examples[i] for i in idx]
        bar.advance(len(chunk))
        logits = net(torch.tensor([ex.ids for ex in chunk]), record=True)[:, -1]
        answers = torch.tensor([ex.answer_id for ex in chunk])
        (logits.gather(1, answers[:, None]).squeeze(1) - logits.mean(-1)).sum().backward()
        with torch.no_grad():
            for layer, W in net.feature_w.items():
                G, s, N = net.seen[("pre", layer)].grad, net.seen[("s_mlp", layer)], net.seen[("in", layer)]
                if G is None:  # nothing downstream reads this layer's features (or it keeps none)
                    continue
                if s is not None:
                    G = G * s[..., None]
                feat[layer] += (torch.einsum("bpj,bpn->bnj", G, N) * W).abs().sum(0)
            for head, T in net.pair_w.items():
                G, Ns = net.seen[("score", head)].grad, net.seen[("in_attn", head)]
                if G is None:
                    continue
                pair[head] += ((Ns.transpose(1, 2) @ G @ Ns) * T).abs().sum(0)
                key[head] += (torch.einsum("bj,bjn->bn", G.sum(1), Ns) * net.key_w[head]).abs().sum(0)
    bar.close()
    n = max(1, len(examples))
    names = [node.name for node in net.live]
    feats_of = {
        layer: [node.name for node in net.stages.get((layer, "mlp"), []) if node.kind == "feat"] for layer in feat
    }
    out: dict[Edge, float] = {}
    for layer, W in net.feature_w.items():
        for r, c in torch.nonzero(W).tolist():
            out[(feats_of[layer][c], names[r])] = float(feat[layer][r, c]) / n
    for head, T in net.pair_w.items():
        hname = f"L{head[0]}H{head[1]}"
        for r, c in torch.nonzero(T).tolist():
            out[(hname, names[r], names[c])] = float(pair[head][r, c]) / n
        for (r,) in torch.nonzero(net.key_w[head]).tolist():
            out[(hname, names[r])] = float(key[head][r]) / n
    return out


def edge_layer(edge: Edge) -> str:
    """Where an edge ends: `L{layer}.mlp` (a feature's term) or `L{layer}.attn` (a head's score term)."""
    target = edge[0]
    if target.startswith("f"):
        return f"L{target[1:].split('_')[0]}.mlp"
    return f"L{target[1:].split('H')[0]}.attn"


@dataclass
class EdgeCircuit:
    edges: frozenset[Edge]
    graph: Graph  # the unrolled IR with exactly these edges
    curve: list[dict[str, Any]]
    scores: dict[Edge, float]
    target_met: bool
    report: dict[str, Any] = field(default_factory=dict)


def extract_edges(
    acg: ACG,
    keep: dict[int, list[int]],
    fit_examples: Sequence[Example],
    eval_examples: dict[str, Sequence[Example]],
    reference: dict[str, float],
    tolerance: float = 0.01,
    tokens: list[int] | None = None,
    positions: list[int] | None = None,
    bisect_steps: int = 6,
    dtype: str = "float32",
    progress: bool = False,
) -> EdgeCircuit:
    """The smallest top-k edge set of the circuit of `keep` whose `task_acc` stays within `tolerance` of `reference`
    on every task in `eval_examples` (module docstring). Where no k meets it, every edge stays, `target_met` False."""
    base = _Unroll(acg, keep, tokens, positions, None, 0.0, None, "float64")
    nodes, heads = base.plan()
    scores = edge_attribution(CircuitNet(base, nodes, heads), fit_examples, progress=progress)
    ranked = sorted(scores, key=lambda e: (-scores[e], e))
    total = len(ranked)
    cache: dict[int, dict[str, float]] = {}
    ks = sorted({min(total, 2**i) for i in range(max(1, total).bit_length() + 1)} | {total})
    bar = Progress("edge search", len(ks) + bisect_steps, progress)

    def measure(k: int) -> dict[str, float]:
        if k not in cache:
            bar.advance(text=f"{k:,} of {total:,} edges")
            u = _Unroll(acg, keep, tokens, positions, None, 0.0, None, "float64", frozenset(ranked[:k]))
            net = CircuitNet(u, nodes, heads)
            cache[k] = {t: accuracy(answer_logits(net, exs), exs) for t, exs in eval_examples.items()}
        return cache[k]

    def ok(k: int) -> bool:
        acc = measure(k)
        return all(acc[t] >= reference[t] - tolerance for t in eval_examples)

    good = smallest_passing(ks, ok, bisect_steps)
    target_met = good is not None
    good = total if good is None else good
    bar.close()
    kept = frozenset(ranked[:good])
    graph = unroll(acg, keep, tokens=tokens, positions=positions, edges=kept, dtype=dtype)
    per_layer: dict[str, int] = {}
    for e in kept:
        per_layer[edge_layer(e)] = per_layer.get(edge_layer(e), 0) + 1
    curve = [{"k": k, "fraction": k / max(1, total), "task_acc": cache[k]} for k in sorted(cache)]
    report = {
        "n_edges": good,
        "n_edges_of": total,
        "fraction": good / max(1, total),
        "n_edges_per_layer": dict(sorted(per_layer.items())),
        "n_features": {str(layer): len(v) for layer, v in sorted(keep.items())},
        "n_nodes": graph.meta["n_nodes"],
        "task_acc": measure(good),
        "reference": reference,
        "target_met": target_met,
    }
    return EdgeCircuit(kept, graph, curve, scores, target_met, report)
