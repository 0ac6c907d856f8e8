"""Fold a hand-edited circuit back into weights, so that an edited program goes through the round trip like any
other: the readable code of an unrolled circuit (`acg compile --acg ... --top/--features`), edited and imported
(`acg import-code`), becomes an ACG whose dictionaries compute the edited formulas, and from there a dense checkpoint.

What folds, and how (feature z of layer l reads the circuit's live nodes n with virtual weights
`V[n, z] = (centre(write_n) * w_ln2) . W_enc[:, z]`, and adds `c_z = b_ln2 . W_enc[:, z] + b_enc[z]`):

- a changed, added or removed term `w * node` in z's pre-activation: the encoder column moves by the smallest
  `dW` with `(centre(write_n) * w_ln2) . dW = w'_n - w_n` for every live node of that stage (edited or not, so the
  unedited terms stay as they were). Exact when the live nodes' writes are linearly independent (at most d_model of
  them); otherwise the least-squares residual is reported and the fold refused. Nodes outside the circuit see
  their weights move by `spill` (reported): the code never mentioned them.
- the constant: `b_enc[z]` absorbs what is left, so `c_z` is the edited value.
- the activation: a JumpReLU threshold edited, or `np.maximum(pre, 0.0)` (threshold 0) on a JumpReLU dictionary.
- a deleted feature: left out of the round trip.

What does not fold, refused with the reason: a `@hypothesis` function (Python, not weights), a formula that is no
longer `s * (sum of weight * node) + c` (a product of two nodes, a non-ReLU activation), and edits outside feature
formulas (head scores, layer-norm scales, the unembedding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from acg.compiler.acg import ACG
from acg.compiler.lower import centre
from acg.compiler.unroll import candidate_nodes, unroll
from acg.ir.graph import Graph, Op
from acg.roundtrip.dense import RoundtripError, Selection

ATOL = 1e-6  # relative residual above which a fold is refused


@dataclass
class Formula:
    terms: dict[str, float]  # node -> weight (inside the layer-norm scale)
    const: float
    act: str
    threshold: float | None
    ops: set[str]  # the ops that make it up


class _Reader:
    """Reads feature formulas out of an unrolled-circuit IR."""

    def __init__(self, graph: Graph, nodes: set[str]):
        self.graph, self.nodes = graph, nodes  # node values are read as themselves, never looked into
        self.ops = {op.name: op for op in graph.ops}

    def scalar(self, name: str) -> float | None:
        op = self.ops.get(name)
        if op is None or op.kind != "const":
            return None
        t = self.graph.tensors[op.attr("tensor")]
        return float(t) if t.ndim == 0 else None

    def linear(self, name: str, used: set[str], where: str) -> dict[str, float]:
        """`name` as sum of weight * node ("1" is the constant term)."""
        op = self.ops.get(name)
        if op is None or name in self.nodes or name == "zeros":
            return {name: 1.0}  # a node or a graph input
        v = self.scalar(name)
        if v is not None:
            used.add(name)
            return {"1": v}
        if op.kind in ("add", "sub", "mul"):
            used.add(name)
            a, b = op.inputs
            if op.kind == "mul":
                wa, wb = self.scalar(a), self.scalar(b)
                if wa is None and wb is None:
                    raise RoundtripError(
                        f"{where}: `{op.name}` multiplies {a} by {b}, which is not linear in the nodes"
                    )
                used.add(a if wa is not None else b)
                w, x = (wa, b) if wa is not None else (wb, a)
                return {k: w * c for k, c in self.linear(x, used, where).items()}
            out = dict(self.linear(a, used, where))
            sign = -1.0 if op.kind == "sub" else 1.0
            for k, c in self.linear(b, used, where).items():
                out[k] = out.get(k, 0.0) + sign * c
            return out
        return {name: 1.0}  # a node (a named value computed elsewhere)

    def formula(self, feature: str, scale: str | None) -> Formula:
        op = self.ops.get(feature)
        if op is None:
            raise KeyError(feature)
        used = {feature}
        if op.kind == "jumprelu":
            threshold = self.scalar(op.inputs[1])
            if threshold is None:
                raise RoundtripError(f"{feature}: the JumpReLU threshold must be a number to fold into weights")
            used.add(op.inputs[1])
            act = "jumprelu"
        elif op.kind == "relu":
            threshold, act = None, "relu"
        else:
            raise RoundtripError(f"{feature}: activation `{op.kind}` does not fold into a ReLU/JumpReLU dictionary")
        pre = op.inputs[0]
        where = f"{feature} (through {pre})"
        affine = self._affine(pre, scale, used, where)
        const = affine.pop("1", 0.0)
        return Formula(affine, const, act, threshold, used)

    def _affine(self, name: str, scale: str | None, used: set[str], where: str) -> dict[str, float]:
        """pre = s * (sum w n) + c: the terms inside the scale by node, the constant as "1"."""
        op = self.ops.get(name)
        if scale is not None and op is not None and op.kind == "mul" and scale in op.inputs:
            used.add(name)
            inner = op.inputs[1] if op.inputs[0] == scale else op.inputs[0]
            terms = self.linear(inner, used, where)
            if "1" in terms and terms["1"] != 0.0:
                raise RoundtripError(f"{where}: a constant inside the layer-norm scale does not fold")
            terms.pop("1", None)
            return terms
        if op is not None and op.kind in ("add", "sub"):
            used.add(name)
            a, b = op.inputs
            out = self._affine(a, scale, used, where)
            sign = -1.0 if op.kind == "sub" else 1.0
            for k, c in self._affine(b, scale, used, where).items():
                out[k] = out.get(k, 0.0) + sign * c
            return out
        v = self.scalar(name)
        if v is not None:
            used.add(name)
            return {"1": v}
        if scale is None:
            return self.linear(name, used, where)
        raise RoundtripError(f"{where}: `{name}` is outside the layer-norm scale s; only constants may be")


def fold(acg: ACG, edited: Graph) -> tuple[ACG, Selection, dict[str, Any]]:
    """(the ACG with the edits folded into its dictionaries, the round trip's selection, a report)."""
    hyps = [op for op in edited.ops if op.kind == "hypothesis"]
    if hyps:
        op = hyps[0]
        raise RoundtripError(
            f"{op.name} is the Python hypothesis {op.attr('function')}(): a function, not weights, so it does not "
            "fold into a dense checkpoint (linear and ReLU/JumpReLU edits of the circuit's formulas do); run it "
            "with the interpreter, the python or the numba backend"
        )
    meta = edited.meta
    if meta.get("family") != "acg-circuit" or "kept" not in meta:
        raise RoundtripError(
            "only an unrolled circuit folds back into weights (its code from `acg compile --acg ... --top N` or "
            "--features, edited and imported); this IR is not one"
        )
    if meta.get("config") != acg.cfg.to_dict():
        raise RoundtripError("the edited circuit was made from another model than this ACG's (configs differ)")
    keep = {int(k): list(v) for k, v in meta["kept"].items()}
    dtype = next((op.output.dtype for op in edited.ops if op.output.dtype.startswith("float")), "float32")
    edges = frozenset(tuple(e) for e in meta["edges"]) if "edges" in meta else None
    base = unroll(
        acg,
        keep,
        tokens=meta.get("tokens"),
        positions=meta.get("positions"),
        min_weight=meta.get("min_weight", 0.0),
        max_terms=meta.get("max_terms"),
        edges=edges,
        dtype=dtype,
    )
    nodes = candidate_nodes(acg, keep, dtype)
    norm = acg.cfg.normalization_type
    center = norm in ("LN", "LNPre")
    by_name = {n.name: i for i, n in enumerate(nodes)}
    rb, re_ = _Reader(base, set(by_name)), _Reader(edited, set(by_name))
    deleted = sorted(
        (f"f{layer}_{i}" for layer, idx in keep.items() for i in idx if f"f{layer}_{i}" not in re_.ops),
        key=_feature_key,
    )
    transcoders = list(acg.transcoders)
    touched: set[str] = set()
    features = []
    for layer, idx in sorted(keep.items()):
        tc = transcoders[layer]
        d = acg.cfg.d_model
        w2 = acg.weights[f"blocks.{layer}.ln2.w"] if norm in ("LN", "RMS") else np.ones(d)
        b2 = acg.weights[f"blocks.{layer}.ln2.b"] if norm == "LN" else np.zeros(d)
        scale = f"s_L{layer}_mlp" if acg.cfg.normalization_type is not None else None
        stage = [n for n in nodes if _before(n.name, layer)]
        live = [n for n in stage if n.name in rb.ops and np.any(n.write)]
        A = np.stack([centre(n.write, center) * w2 for n in live]) if live else np.zeros((0, len(w2)))
        for i in idx:
            f = f"f{layer}_{i}"
            was = rb.formula(f, scale)
            touched |= was.ops
            if f in deleted:
                continue
            now = re_.formula(f, scale)
            touched |= now.ops
            unknown = [k for k in now.terms if k != "zeros" and k not in by_name]
            if unknown:
                raise RoundtripError(f"{f}: `{unknown[0]}` is not a node of the circuit, so its weight cannot fold")
            delta = {k: now.terms.get(k, 0.0) - was.terms.get(k, 0.0) for k in set(now.terms) | set(was.terms)}
            delta.pop("zeros", None)
            for k in [k for k in delta if k in deleted]:  # reads of a deleted feature: the feature is gone anyway
                delta.pop(k)
            changed = {k: d for k, d in delta.items() if d != 0.0}
            act_changed = (now.act, now.threshold) != (was.act, was.threshold)
            if not changed and now.const == was.const and not act_changed:
                continue
            target = np.array([delta.get(n.name, 0.0) for n in live])
            dW = np.linalg.lstsq(A, target, rcond=None)[0] if len(live) else np.zeros(len(w2))
            residual = float(np.abs(A @ dW - target).max()) if len(live) else 0.0
            if residual > ATOL * max(1.0, float(np.abs(target).max())):
                raise RoundtripError(
                    f"{f}: the edited weights cannot all hold at once in weights ({len(live)} live nodes write into "
                    f"{len(w2)} dimensions; residual {residual:.2e}); edit fewer terms or use a smaller circuit"
                )
            outside = [n for n in stage if n.name not in rb.ops and np.any(n.write)]
            spill = (
                float(np.abs(np.stack([centre(n.write, center) * w2 for n in outside]) @ dW).max()) if outside else 0.0
            )
            W_enc, b_enc = tc.W_enc.copy(), tc.b_enc.copy()
            W_enc[:, i] += dW
            b_enc[i] = now.const - b2 @ W_enc[:, i]
            threshold = None if tc.threshold is None else tc.threshold.copy()
            if now.act == "jumprelu" or (now.act == "relu" and tc.act == "jumprelu"):
                if tc.act != "jumprelu":
                    raise RoundtripError(
                        f"{f}: a JumpReLU threshold needs a JumpReLU dictionary; layer {layer} is {tc.act}"
                    )
                threshold[i] = now.threshold if now.act == "jumprelu" else 0.0
            tc = dataclasses.replace(tc, W_enc=W_enc, b_enc=b_enc, threshold=threshold)
            features.append(
                {
                    "feature": f,
                    "terms": [
                        {"node": k, "was": was.terms.get(k, 0.0), "now": now.terms.get(k, 0.0)} for k in sorted(changed)
                    ],
                    "const": {"was": was.const, "now": now.const},
                    "activation": {"was": [was.act, was.threshold], "now": [now.act, now.threshold]},
                    "residual": residual,
                    "spill": spill,
                }
            )
        transcoders[layer] = tc
    formulas = {f"f{layer}_{i}{suffix}" for layer, idx in keep.items() for i in idx for suffix in ("", "_pre")}
    _check_the_rest(base, edited, formulas, set(deleted))
    folded = acg.replace(transcoders=tuple(transcoders))
    kept = tuple(
        np.array([i for i in keep.get(layer, []) if f"f{layer}_{i}" not in deleted], dtype=np.int64)
        for layer in range(acg.cfg.n_layers)
    )
    tokens = np.zeros(acg.cfg.d_vocab, bool)
    positions = np.zeros(acg.cfg.n_ctx, bool)
    for name in re_.ops:
        if name.startswith("tok_") and name[4:].isdigit():
            tokens[int(name[4:])] = True
        elif name.startswith("pos_") and name[4:].isdigit():
            positions[int(name[4:])] = True
    sel = Selection(kept, tokens, positions, restrict_attention=True, source="edited circuit")
    report = {"edited_features": features, "deleted": deleted, "n_features": [len(k) for k in kept]}
    return folded, sel, report


def _feature_key(name: str) -> tuple[int, int]:
    layer, i = name[1:].split("_")
    return int(layer), int(i)


def _before(node: str, layer: int) -> bool:
    """Is `node` written before layer `layer`'s MLP reads the stream?"""
    if node.startswith(("tok_", "pos_")):
        return True
    if node.startswith("f"):
        return _feature_key(node)[0] < layer
    if node.startswith("bias_L"):
        k = int(node[6:].split("_")[0])
        return k < layer or (k == layer and node.endswith("_attn"))
    if node.startswith("L"):
        return int(node[1:].split("H")[0]) <= layer
    return False


def _check_the_rest(base: Graph, edited: Graph, formulas: set[str], deleted: set[str]) -> None:
    """Every named value outside the feature formulas (head nodes, scores, patterns, layer-norm scales, the logits)
    must compute what it did, compared by structure down to named values and constants (by content); reads of a
    deleted feature read `zeros`. Names of the ops in between do not matter."""
    mine = {op.name: op for op in edited.ops}
    theirs = {op.name: op for op in base.ops}
    sig_b: dict[str, str] = {}
    sig_e: dict[str, str] = {}
    for op in base.ops:
        if not _named(op) or op.name in formulas or op.name.removesuffix("_pre") in deleted or op.name in deleted:
            continue
        if op.name not in mine:
            raise RoundtripError(f"{op.name} was removed: edits outside feature formulas do not fold into weights")
        if _signature(base, theirs, op.name, sig_b, deleted, True) != _signature(
            edited, mine, op.name, sig_e, set(), True
        ):
            raise RoundtripError(
                f"{op.name} ({op.kind}, scope {op.scope or 'top'}) was edited: edits outside feature formulas (head "
                "scores, layer-norm scales, the unembedding) do not fold into weights yet"
            )
    extra = [op.name for op in edited.ops if _named(op) and op.name not in theirs]
    if extra:
        raise RoundtripError(f"{extra[0]} was added outside a feature formula: it does not fold into weights")


def _named(op: Op) -> bool:
    return op.kind != "const" and re.fullmatch(rf"{op.kind}(_\d+)?", op.name) is None


def _signature(graph: Graph, ops: dict[str, Op], name: str, memo: dict[str, str], deleted: set[str], top=False) -> str:
    """What `name` computes, down to named values and constants (by content); `top` expands `name` itself even when
    named. Iterative: a circuit's sums are chains of adds thousands long."""

    def leaf(n: str) -> str | None:
        if n in deleted:
            return "n:zeros"
        op = ops.get(n)
        if op is None:
            return f"in:{n}"
        if op.kind == "const":
            t = np.ascontiguousarray(graph.tensors[op.attr("tensor")])
            return f"c:{t.dtype}{t.shape}:{hashlib.sha1(t.tobytes()).hexdigest()}"
        return f"n:{n}" if _named(op) else None

    def composite(op: Op) -> str:
        return f"{op.kind}{op.attrs}({','.join(memo[x] for x in op.inputs)})"

    def resolve(n: str) -> str:
        stack = [n]
        while stack:
            cur = stack[-1]
            if cur in memo:
                stack.pop()
                continue
            sig = leaf(cur)
            if sig is None:
                pending = [x for x in ops[cur].inputs if x not in memo]
                if pending:
                    stack.extend(pending)
                    continue
                sig = composite(ops[cur])
            memo[cur] = sig
            stack.pop()
        return memo[n]

    if not top:
        return resolve(name)
    if name in deleted:
        return "n:zeros"
    op = ops.get(name)
    if op is None or op.kind == "const":
        return leaf(name)
    for x in op.inputs:
        resolve(x)
    return composite(op)


__all__ = ["fold"]
