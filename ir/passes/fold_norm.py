"""Fold layer-norm weights into the linear maps that read them: `(norm(x) * w + b) @ W` becomes
`norm(x) @ (w[:, None] * W) + b @ W`. Applied only where every reader is a linear map with a constant weight (matmul,
or a two-operand einsum contracting the normalised axis). Exact up to float summation order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acg.ir.graph import Graph, Op
from acg.ir.ops import parse_einsum
from acg.ir.passes import PassResult, register
from acg.ir.passes.rewrite import Rewriter


@dataclass(frozen=True)
class _Affine:
    normed: str  # the norm op's output
    w: np.ndarray | None
    b: np.ndarray | None


def _find_affines(graph: Graph) -> dict[str, _Affine]:
    """Values of the form norm(x) * w (+ b) with constant w, b of shape [d]: the final value -> its parts."""
    ops = {op.name: op for op in graph.ops}

    def const(name: str) -> np.ndarray | None:
        op = ops.get(name)
        return graph.tensors[op.attr("tensor")] if op is not None and op.kind == "const" else None

    found: dict[str, _Affine] = {}
    for op in graph.ops:
        if op.kind != "mul" or ops.get(op.inputs[0]) is None or ops[op.inputs[0]].kind != "norm":
            continue
        w = const(op.inputs[1])
        d = op.output.shape[-1]
        if w is None or w.shape != (d,):
            continue
        found[op.name] = _Affine(op.inputs[0], w, None)
    for op in graph.ops:
        if op.kind == "add" and op.inputs[0] in found:
            b = const(op.inputs[1])
            if b is not None and b.shape == (op.output.shape[-1],):
                found[op.name] = _Affine(found[op.inputs[0]].normed, found[op.inputs[0]].w, b)
    return found


def _linear_reader(op: Op, x: str, graph: Graph, consts: dict[str, np.ndarray]) -> str | None:
    """How `op` reads `x` linearly with a constant weight: 'matmul', an einsum equation, or None."""
    if len(op.inputs) != 2 or op.inputs[0] != x or op.inputs[1] not in consts:
        return None
    if op.kind == "matmul" and consts[op.inputs[1]].ndim == 2:
        return "matmul"
    if op.kind == "einsum":
        (tx, tw), to = parse_einsum(op.attr("equation"))
        d = tx[-1]
        if tw.count(d) == 1 and d not in to and all(c in to for c in tw if c != d):
            return op.attr("equation")
    return None


@register
@dataclass(frozen=True)
class FoldNorm:
    name = "fold-norm"

    def __call__(self, graph: Graph) -> PassResult:
        affines = _find_affines(graph)
        consts = {op.name: graph.tensors[op.attr("tensor")] for op in graph.ops if op.kind == "const"}
        users = graph.users()
        # fold only values all of whose readers are constant linear maps (and that are not graph outputs)
        foldable = {
            name: a
            for name, a in affines.items()
            if name not in graph.outputs
            and users[name]
            and all(_linear_reader(u, name, graph, consts) for u in users[name])
        }
        # a mul whose add is folded must not be folded on its own
        foldable = {
            n: a for n, a in foldable.items() if not any(u.kind == "add" and u.name in foldable for u in users[n])
        }
        count = 0

        def replace(op: Op, rw: Rewriter) -> str | None:
            nonlocal count
            x = next((i for i in op.inputs if i in foldable), None)
            if x is None:
                return None
            a = foldable[x]
            how = _linear_reader(op, x, graph, consts)
            W = consts[op.inputs[1]]
            count += 1
            if how == "matmul":
                Wf = W * a.w[:, None]
                y = rw.emit(
                    "matmul",
                    (a.normed, rw.const(Wf, hint=f"{op.name}.W_folded", scope=op.scope)),
                    hint=op.name + "_f",
                    scope=op.scope,
                )
                bias = None if a.b is None else a.b @ W
            else:
                (tx, tw), to = parse_einsum(how)
                d = tx[-1]
                axis = tw.index(d)
                shape = [1] * W.ndim
                shape[axis] = -1
                Wf = W * a.w.reshape(shape)
                y = rw.emit(
                    "einsum",
                    (a.normed, rw.const(Wf, hint=f"{op.name}.W_folded", scope=op.scope)),
                    hint=op.name + "_f",
                    scope=op.scope,
                    equation=how,
                )
                bias = None
                if a.b is not None:
                    rest = "".join(c for c in tw if c != d)
                    folded = np.einsum(f"{d},{tw}->{rest}", a.b, W)
                    order = [c for c in to if c in rest]
                    folded = folded.transpose([rest.index(c) for c in order])
                    sizes = dict(zip(order, folded.shape, strict=True))
                    bias = folded.reshape([sizes.get(c, 1) for c in to])
                    while bias.ndim > 1 and bias.shape[0] == 1:
                        bias = bias[0]  # leading 1s broadcast anyway
            if bias is None:
                return y
            return rw.emit(
                "add",
                (y, rw.const(bias.astype(W.dtype), hint=f"{op.name}.b_folded", scope=op.scope)),
                hint=op.name,
                scope=op.scope,
            )

        out = Rewriter(graph).run(replace)
        if count:
            from acg.ir.passes.dce import DeadCodeElimination

            out = DeadCodeElimination()(out).graph
        return PassResult(out, bool(count), {"linear_maps_folded": count, "norms_folded": len(foldable)})
