"""Fuse per-head attention weights: `einsum(x, W[h, d, e])` becomes one matmul with W as [d, h*e] plus a reshape, and
`einsum(z, W_O[h, e, d])` one matmul over the concatenated heads. Exact up to float summation order."""

from __future__ import annotations

from dataclasses import dataclass

from acg.ir.graph import Graph, Op
from acg.ir.ops import parse_einsum
from acg.ir.passes import PassResult, register
from acg.ir.passes.rewrite import Rewriter


def _const_tensor(graph: Graph, producers: dict[str, Op], name: str):
    op = producers.get(name)
    return graph.tensors[op.attr("tensor")] if op is not None and op.kind == "const" else None


def _is_head_projection(eq: str) -> bool:
    (x, w), out = parse_einsum(eq)
    # x: A p d ; w: h d e ; out: A h p e
    if len(x) != 3 or len(w) != 3 or len(out) != 4:
        return False
    a, p, d = x
    h, d2, e = w
    return d == d2 and out == a + h + p + e and len({a, p, d, h, e}) == 5


def _is_head_output(eq: str) -> bool:
    (z, w), out = parse_einsum(eq)
    # z: A h q e ; w: h e d ; out: A q d
    if len(z) != 4 or len(w) != 3 or len(out) != 3:
        return False
    a, h, q, e = z
    return w == h + e + w[2] and out == a + q + w[2] and len({a, h, q, e, w[2]}) == 5


@register
@dataclass(frozen=True)
class FuseHeads:
    name = "fuse-heads"

    def __call__(self, graph: Graph) -> PassResult:
        producers = {op.name: op for op in graph.ops}
        count = 0

        def replace(op: Op, rw: Rewriter) -> str | None:
            nonlocal count
            if op.kind != "einsum" or len(op.inputs) != 2:
                return None
            eq = op.attr("equation")
            try:
                proj, out = _is_head_projection(eq), _is_head_output(eq)
            except ValueError:
                return None
            W = _const_tensor(graph, producers, op.inputs[1])
            if W is None or not (proj or out):
                return None
            x = op.inputs[0]
            xs = rw.values[rw.alias.get(x, x)].shape
            count += 1
            if proj:
                h, d, e = W.shape
                Wf = rw.const(W.transpose(1, 0, 2).reshape(d, h * e), hint=f"{op.name}.W_fused", scope=op.scope)
                y = rw.emit("matmul", (x, Wf), hint=f"{op.name}_fused", scope=op.scope)
                y = rw.emit("reshape", (y,), hint=f"{op.name}_heads", scope=op.scope, shape=(*xs[:-1], h, e))
                return rw.emit("transpose", (y,), hint=op.name + "_t", scope=op.scope, perm=(0, 2, 1, 3))
            h, e, d = W.shape
            Wf = rw.const(W.reshape(h * e, d), hint=f"{op.name}.W_fused", scope=op.scope)
            zt = rw.emit("transpose", (x,), hint=f"{op.name}_zt", scope=op.scope, perm=(0, 2, 1, 3))
            zc = rw.emit("reshape", (zt,), hint=f"{op.name}_zcat", scope=op.scope, shape=(xs[0], xs[2], h * e))
            return rw.emit("matmul", (zc, Wf), hint=op.name + "_fused", scope=op.scope)

        out = Rewriter(graph).run(replace)
        if count:
            from acg.ir.passes.dce import DeadCodeElimination

            out = DeadCodeElimination()(out).graph
        return PassResult(out, bool(count), {"einsums_fused": count})
