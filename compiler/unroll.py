"""Unrolled circuits: an ACG restricted to chosen features, lowered so that every node is its own named value
[batch, seq] computed from earlier ones with scalar weights -- the IR behind readable code such as

    f1_17_pre = s_L1_mlp * (0.84 * f0_3 + 1.20 * tok_9 + ...) - 0.11

Nodes: token features `tok_{id}` and position features `pos_{p}` (indicators), bias nodes `bias_{where}` (constant 1,
writing the biases added at that point), transcoder features `f{l}_{i}`, and what each attention head brings from
each earlier node, `L{l}H{h}_{node}` = sum_j A(i, j) s_j node(j). Every read of the stream is
`s * (sum_n w_n node_n) + c`; a head's score is `s_i s_j sum_(a, b) T_ab a(i) b(j) + s_j sum_b g_b b(j)` (terms that
depend on the query alone cancel in the softmax and are left out), masked and softmaxed over keys: attention is
computed from features, never frozen. The layer-norm scales come from the circuit's own residual stream (the sum of
the kept nodes' writes).

Which nodes appear is decided backwards from the kept features: each kept sum (a feature's pre-activation, a kept
head's pair scores and key scores) keeps the terms of weight at least `min_weight` times its largest, at most
`max_terms` of them, largest first; a node is kept when a kept term reads it.
With every feature kept and `min_weight=0` the program computes exactly the ACG's replacement model (tested);
otherwise it is that model restricted to the circuit -- a lossy pruning, measured by whoever uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from acg.compiler.acg import ACG
from acg.compiler.labels import token_names
from acg.compiler.lower import centre
from acg.ir.builder import GraphBuilder
from acg.ir.graph import Graph


@dataclass
class Node:
    name: str  # also its IR value
    kind: str  # tok / pos / bias / head / feat
    write: np.ndarray  # (d_model,) what one unit of the node adds to the residual stream
    label: str
    source: str | None = None  # head nodes: the node the head brings
    head: tuple[int, int] | None = None
    deps: dict[str, float] = field(default_factory=dict)  # node -> |weight| into this node (features)


@dataclass
class Head:
    layer: int
    h: int
    nodes: list[str]  # the nodes available to it
    T: np.ndarray  # (n, n) query-node x key-node score weights
    g: np.ndarray  # (n,) key-only score weights


def head_name(hd: Head) -> str:
    """The name a head's score terms go by in an edge set: `L{layer}H{h}`."""
    return f"L{hd.layer}H{hd.h}"


def stage_of(n: Node) -> tuple[int, str]:
    """(layer, "attn" | "mlp") of the stage that computes `n`; (-1, "embed") for token and position nodes."""
    if n.kind in ("tok", "pos"):
        return -1, "embed"
    if n.kind == "head":
        return n.head[0], "attn"
    if n.kind == "feat":
        return int(n.name[1:].split("_")[0]), "mlp"
    _, layer, where = n.name.split("_")  # bias_L{layer}_{attn|mlp}
    return int(layer[1:]), where


class _Unroll:
    def __init__(
        self,
        acg: ACG,
        keep: dict[int, list[int]],
        tokens,
        positions,
        heads,
        min_weight: float,
        max_terms,
        dtype: str,
        edges: frozenset[tuple[str, ...]] | None = None,
    ):
        self.acg, self.cfg, self.w = acg, acg.cfg, acg.weights
        self.edges = edges
        self.keep = {layer: sorted(set(v)) for layer, v in keep.items()}
        self.min_weight, self.max_terms, self.dtype = min_weight, max_terms, dtype
        self.center = self.cfg.normalization_type in ("LN", "LNPre")
        self.names = token_names(self.cfg.d_vocab)
        u = acg.usage
        self.token_ids = sorted(
            set(
                tokens
                if tokens is not None
                else [t for t in range(self.cfg.d_vocab) if "tok_count" not in u or u["tok_count"][t]]
            )
        )
        self.positions = sorted(
            set(
                positions
                if positions is not None
                else [p for p in range(self.cfg.n_ctx) if "pos_count" not in u or u["pos_count"][p]]
            )
        )
        self.head_set = heads
        self.chosen = {
            **({} if tokens is None else {"tokens": self.token_ids}),
            **({} if positions is None else {"positions": self.positions}),
        }

    def ln(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        kind, d = self.cfg.normalization_type, self.cfg.d_model
        w = self.w[f"{prefix}.w"] if kind in ("LN", "RMS") else np.ones(d)
        b = self.w[f"{prefix}.b"] if kind == "LN" else np.zeros(d)
        return w, b

    # ----------------------------------------------------------------------------------------- plan (numpy only)

    def plan(self) -> tuple[list[Node], list[Head], list[tuple[str, list[str], np.ndarray]]]:
        """Every candidate node in creation order, every head's score weights, and each stage's node list (for the
        layer-norm scale) as (stage, node names, -)."""
        cfg, w = self.cfg, self.w
        nodes: list[Node] = [
            Node(f"tok_{t}", "tok", w["embed.W_E"][t], f"token {self.names[t]!r}") for t in self.token_ids
        ]
        nodes += [Node(f"pos_{p}", "pos", w["pos_embed.W_pos"][p], f"position {p}") for p in self.positions]
        heads: list[Head] = []
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}"
            w1, b1 = self.ln(f"{p}.ln1")
            Cw = np.stack([centre(n.write, self.center) for n in nodes])
            new, bias = [], w[f"{p}.attn.b_O"].copy()
            for h in range(cfg.n_heads):
                R = {m: w1[:, None] * w[f"{p}.attn.W_{m}"][h] for m in "QKV"}
                c = {m: b1 @ w[f"{p}.attn.W_{m}"][h] + w[f"{p}.attn.b_{m}"][h] for m in "QKV"}
                bias += c["V"] @ w[f"{p}.attn.W_O"][h]  # the value bias: sum_j A(i, j) = 1
                if self.head_set is not None and (layer, h) not in self.head_set:
                    continue
                Q, K = Cw @ R["Q"], Cw @ R["K"]
                scale = 1.0 / cfg.attn_scale
                heads.append(Head(layer, h, [n.name for n in nodes], (Q @ K.T) * scale, (K @ c["Q"]) * scale))
                writes = (Cw @ R["V"]) @ w[f"{p}.attn.W_O"][h]
                for n, write in zip(nodes, writes, strict=True):
                    if np.any(write):
                        new.append(
                            Node(
                                f"L{layer}H{h}_{n.name}",
                                "head",
                                write,
                                f"head {layer}.{h} brings {n.label}",
                                source=n.name,
                                head=(layer, h),
                            )
                        )
            nodes = nodes + new + [Node(f"bias_L{layer}_attn", "bias", bias, f"biases of attention {layer}")]
            if cfg.attn_only:
                continue
            tc = self.acg.transcoders[layer]
            w2, _ = self.ln(f"{p}.ln2")
            Cw = np.stack([centre(n.write, self.center) for n in nodes])
            kept = self.keep.get(layer, [])
            V = Cw @ (w2[:, None] * tc.W_enc[:, kept])
            feats = []
            for j, i in enumerate(kept):
                deps = {n.name: float(V[k, j]) for k, n in enumerate(nodes) if V[k, j] != 0}
                feats.append(Node(f"f{layer}_{i}", "feat", tc.W_dec[i], self.acg.label(f"L{layer}.f{i}"), deps=deps))
            nodes = nodes + feats + [Node(f"bias_L{layer}_mlp", "bias", tc.b_dec, f"biases of transcoder {layer}")]
        return nodes, heads

    def pick(self, weights: dict[str, float]) -> list[tuple[str, float]]:
        """The terms of one sum that stay: weight >= `min_weight` x the largest, at most `max_terms`, largest first."""
        top = max([abs(v) for v in weights.values()] + [0.0])
        kept = sorted(
            ((k, v) for k, v in weights.items() if v and abs(v) >= self.min_weight * top),
            key=lambda t: (-abs(t[1]), t[0]),
        )
        return kept if self.max_terms is None else kept[: self.max_terms]

    def allowed(self, edges, target: str, weights: dict[str, float]) -> dict[str, float]:
        """The terms of `target`'s sum that the edge set keeps (all of them without one)."""
        if edges is None:
            return weights
        return {k: v for k, v in weights.items() if (target, k) in edges}

    def needed(self, nodes: list[Node], heads: list[Head]) -> set[str]:
        """Backwards from the kept features: the terms each kept sum keeps (`pick`), and the nodes they read. Fills
        `self.terms` (feature -> its pre-activation's terms) and `self.scores` (head -> its pair and key terms).
        With an edge set, the nodes are those of the circuit without it (its residual stream, hence its layer-norm
        scales and what reaches the logits, stay) and only the terms are left out."""
        if self.edges is None:
            return self._walk(nodes, heads, None, set())
        stream = self._walk(nodes, heads, None, set())
        self._walk(nodes, heads, self.edges, stream)
        return stream

    def _walk(self, nodes: list[Node], heads: list[Head], edges, start: set[str]) -> set[str]:
        by_name = {n.name: n for n in nodes}
        head_of = {(hd.layer, hd.h): hd for hd in heads}
        need = {n.name for n in nodes if n.kind in ("feat", "bias")} | start
        self.terms: dict[str, list[tuple[str, float]]] = {}
        self.scores: dict[tuple[int, int], tuple[list[tuple[str, str, float]], list[tuple[str, float]]]] = {}
        for n in reversed(nodes):
            if n.name not in need:
                continue
            if n.kind == "feat":
                self.terms[n.name] = self.pick(self.allowed(edges, n.name, n.deps))
                need.update(k for k, _ in self.terms[n.name])
            elif n.kind == "head":
                need.add(n.source)
                if n.head not in self.scores:
                    hd = head_of[n.head]
                    name = head_name(hd)
                    rows, cols = np.nonzero(hd.T)
                    pairs = {
                        f"{r},{c}": float(hd.T[r, c])
                        for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
                        if edges is None or (name, hd.nodes[r], hd.nodes[c]) in edges
                    }
                    picked = []
                    for key, v in self.pick(pairs):
                        r, c = map(int, key.split(","))
                        picked.append((hd.nodes[r], hd.nodes[c], v))
                        need.update((hd.nodes[r], hd.nodes[c]))
                    g = self.pick(self.allowed(edges, name, dict(zip(hd.nodes, hd.g.tolist(), strict=True))))
                    need.update(k for k, _ in g)
                    self.scores[n.head] = (picked, g)
        return {name for name in need if name in by_name}

    # ------------------------------------------------------------------------------------------------ build (IR)

    def build(self) -> Graph:
        nodes, heads = self.plan()
        need = self.needed(nodes, heads)
        cfg, w = self.cfg, self.w
        b = self.b = GraphBuilder()
        labels: dict[str, str] = {}
        self.tokens = b.input("tokens", ("batch", "seq"), "int64")
        by_head = {(hd.layer, hd.h): hd for hd in heads}
        live: list[Node] = []
        with b.scope("embed"):
            zeros = self.zeros = b.op("indicator", self.tokens, value=-1, dtype=self.dtype, name="zeros")  # never -1
            pos_ids = None
            for n in nodes:
                if n.kind == "tok" and n.name in need:
                    b.op("indicator", self.tokens, value=int(n.name[4:]), dtype=self.dtype, name=n.name)
                elif n.kind == "pos" and n.name in need:
                    if pos_ids is None:
                        table = b.const("positions", np.arange(cfg.n_ctx)[:, None])
                        pos_ids = b.op(
                            "reshape", b.op("pos_embed", table, self.tokens), shape=(1, "seq"), name="position"
                        )
                    ind = b.op("indicator", pos_ids, value=int(n.name[4:]), dtype=self.dtype)
                    b.op("add", zeros, ind, name=n.name)
                else:
                    continue
                live.append(n)
                labels[n.name] = n.label
        stages: dict[tuple[int, str], list[Node]] = {}
        for n in nodes:
            if n.name in need:
                stages.setdefault(stage_of(n), []).append(n)
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}"
            with b.scope(f"{p}.attn"):
                s = self.scale(live, f"L{layer}_attn")
                patterns: dict[int, str] = {}
                for n in stages.get((layer, "attn"), []):
                    if n.kind == "bias":
                        b.op("add", zeros, self.scalar(1.0), name=n.name)
                    else:
                        h = n.head[1]
                        if h not in patterns:
                            patterns[h] = self.pattern(by_head[n.head], s)
                        src = b.op("mul", n.source, s) if s is not None else n.source
                        col = b.op("reshape", src, shape=("batch", "seq", 1))
                        b.op("reshape", b.op("matmul", patterns[h], col), shape=("batch", "seq"), name=n.name)
                    live.append(n)
                    labels[n.name] = n.label
            if cfg.attn_only:
                continue
            tc = self.acg.transcoders[layer]
            with b.scope(f"{p}.mlp"):
                s = self.scale(live, f"L{layer}_mlp")
                w2, b2 = self.ln(f"{p}.ln2")
                for n in stages.get((layer, "mlp"), []):
                    if n.kind == "bias":
                        b.op("add", zeros, self.scalar(1.0), name=n.name)
                    else:
                        i = int(n.name.split("_")[1])
                        pre = self.wsum(self.terms[n.name])
                        pre = zeros if pre is None else pre  # [batch, seq] even with no terms
                        if s is not None:
                            pre = b.op("mul", s, pre)
                        c = float(b2 @ tc.W_enc[:, i] + tc.b_enc[i])
                        pre = b.op("add", pre, self.scalar(c), name=f"{n.name}_pre")
                        if tc.act == "jumprelu":
                            b.op("jumprelu", pre, self.scalar(float(tc.threshold[i])), name=n.name)
                        else:
                            b.op(tc.act, pre, name=n.name)
                    live.append(n)
                    labels[n.name] = n.label
        with b.scope("unembed"):
            s = self.scale(live, "final")
            wf, bf = self.ln("ln_final")
            table = np.stack([centre(n.write, self.center) for n in live]) @ (wf[:, None] * w["unembed.W_U"])
            x = b.op("matmul", self.stack(live), self.const("unembed.nodes", table))
            if s is not None:
                x = b.op("mul", x, b.op("reshape", s, shape=("batch", "seq", 1)))
            logits = b.op("add", x, self.const("unembed.c", bf @ w["unembed.W_U"] + w["unembed.b_U"]), name="logits")
        meta = {
            "family": "acg-circuit",
            "config": cfg.to_dict(),
            "title": self.acg.meta.get("title", "ACG circuit"),
            "labels": labels,
            "kept": {str(k): v for k, v in self.keep.items()},
            "min_weight": self.min_weight,
            "max_terms": self.max_terms,
            **self.chosen,
            **({} if self.edges is None else {"edges": sorted(list(e) for e in self.edges)}),
            "n_nodes": len(live),
        }
        return b.build([logits], meta=meta)

    # ----------------------------------------------------------------------------------------------- IR helpers

    def const(self, name: str, arr) -> str:
        return self.b.const(name, np.asarray(arr, dtype=self.dtype), hint=name.replace(".", "_"))

    def scalar(self, v: float) -> str:
        return self.b.const(f"scalar.{float(v)!r}", np.asarray(v, dtype=self.dtype), hint="c")

    def stack(self, nodes: list[Node]) -> str:
        return self.b.op("stack", *(n.name for n in nodes))

    def scale(self, live: list[Node], tag: str) -> str | None:
        """The layer-norm factor of the circuit's own stream (the sum of the live nodes' writes)."""
        if self.cfg.normalization_type is None:
            return None
        b = self.b
        if not live:  # an empty stream: its scale is 1 / sqrt(eps) everywhere
            return b.op("add", self.zeros, self.scalar(1.0 / np.sqrt(float(self.cfg.eps))), name=f"s_{tag}")
        x = b.op(
            "matmul",
            self.stack(live),
            self.const(f"writes.{tag}", np.stack([n.write for n in live])),
            name=f"resid_{tag}",
        )
        s = b.op("norm_scale", x, eps=float(self.cfg.eps), center=self.center)
        return b.op("reshape", s, shape=("batch", "seq"), name=f"s_{tag}")

    def wsum(self, terms: list[tuple[str, float]]) -> str | None:
        """sum_i w_i * x_i, largest |w| first (the readable order)."""
        total = None
        for x, v in sorted(terms, key=lambda t: (-abs(t[1]), t[0])):
            term = self.b.op("mul", self.scalar(v), x)
            total = term if total is None else self.b.op("add", total, term)
        return total

    def pattern(self, hd: Head, s: str | None) -> str:
        """softmax_k( s_i s_j sum_(a,b) T_ab a(i) b(j) + s_j sum_b g_b b(j) ) over the picked terms."""
        b = self.b
        pairs, g = self.scores[(hd.layer, hd.h)]
        score = None
        for a, c, v in pairs:
            qi = b.op("reshape", a, shape=("batch", "seq", 1))
            kj = b.op("reshape", c, shape=("batch", 1, "seq"))
            term = b.op("mul", self.scalar(v), b.op("mul", qi, kj))
            score = term if score is None else b.op("add", score, term)
        if score is not None and s is not None:
            score = b.op(
                "mul",
                b.op("mul", score, b.op("reshape", s, shape=("batch", "seq", 1))),
                b.op("reshape", s, shape=("batch", 1, "seq")),
            )
        key = self.wsum(g)
        if key is not None:
            if s is not None:
                key = b.op("mul", s, key)
            key = b.op("reshape", key, shape=("batch", 1, "seq"))
            score = key if score is None else b.op("add", score, key)
        anchor = b.op("reshape", self.zeros, shape=("batch", "seq", 1))
        if score is None:  # no terms left: equal scores, [batch, query, key] still
            score = b.op("reshape", self.zeros, shape=("batch", 1, "seq"))
        score = b.op("add", score, anchor)  # [batch, query, key] in every case
        score = b.op("add", score, self.scalar(0.0), name=f"L{hd.layer}H{hd.h}_score")
        if self.cfg.attention_dir == "causal":
            score = b.op("causal_mask", score)
        return b.op("softmax", score, axis=2, name=f"L{hd.layer}H{hd.h}_pattern")


def unroll(
    acg: ACG,
    keep: dict[int, list[int]] | None = None,
    *,
    tokens: list[int] | None = None,
    positions: list[int] | None = None,
    heads: set[tuple[int, int]] | None = None,
    min_weight: float = 0.0,
    max_terms: int | None = None,
    edges: frozenset[tuple[str, ...]] | None = None,
    dtype: str = "float32",
) -> Graph:
    """The unrolled IR of `acg` restricted to `keep` (layer -> feature indices; default every feature), the token
    features `tokens` and position features `positions` (default: those seen in the fitting corpus), and `heads`
    (default all), with weights below `min_weight` x the largest in their sum left out, and at most `max_terms` terms
    (the largest) in any sum: a feature's pre-activation, a head's pair scores, a head's key scores. With `edges`, only
    the terms it names stay: `(feature, node)` for a feature's pre-activation, `(head, node)` for a head's key scores
    and `(head, query node, key node)` for its pair scores, heads named `L{layer}H{h}` (`roundtrip/edges.py`)."""
    if keep is None:
        keep = {layer: list(range(tc.n_features)) for layer, tc in enumerate(acg.transcoders)}
    return _Unroll(acg, keep, tokens, positions, heads, min_weight, max_terms, dtype, edges).build()


def candidate_nodes(acg: ACG, keep: dict[int, list[int]], dtype: str = "float64") -> list[Node]:
    """Every node an unrolled circuit of `keep` may read (token, position, head, bias and kept feature nodes), in
    creation order, each with its write and, for features, the virtual weights it reads (`deps`)."""
    nodes, _ = _Unroll(acg, keep, None, None, None, 0.0, None, dtype).plan()
    return nodes
