"""Lower two-operand einsums to transpose / reshape / broadcasting matmul, so that backends without einsum (Numba)
need only matmul. Exact up to float summation order. An einsum outside the lowerable form is left as it is."""

from __future__ import annotations

from dataclasses import dataclass

from acg.ir.graph import Op
from acg.ir.ops import parse_einsum
from acg.ir.passes import PassResult, register
from acg.ir.passes.rewrite import Rewriter


def _arrange(rw: Rewriter, x: str, term: str, order: str, scope: str, hint: str) -> str:
    """Transpose `x` (indexed by `term`) to the letters of `order` it has, then insert size-1 axes for the others."""
    present = [c for c in order if c in term]
    perm = tuple(term.index(c) for c in present)
    if perm != tuple(range(len(term))):
        x = rw.emit("transpose", (x,), hint=hint + "_t", scope=scope, perm=perm)
    if len(present) != len(order):
        shape = rw.values[x].shape
        sizes = dict(zip(present, shape, strict=True))
        x = rw.emit("reshape", (x,), hint=hint + "_r", scope=scope, shape=tuple(sizes.get(c, 1) for c in order))
    return x


def lower(op: Op, rw: Rewriter) -> str | None:
    if op.kind != "einsum" or len(op.inputs) != 2:
        return None
    (ta, tb), to = parse_einsum(op.attr("equation"))
    if len([c for c in ta if c in tb and c not in to]) > 1:
        return None  # several contracted indices would need a reshape across symbolic dims
    a, b = op.inputs
    scope, hint = op.scope, op.name
    # letters summed out of one operand only: sum them first
    for side, (term, other) in enumerate(((ta, tb), (tb, ta))):
        for c in [c for c in term if c not in other and c not in to]:
            x = a if side == 0 else b
            x = rw.emit("sum", (x,), hint=hint + "_sum", scope=scope, axis=term.index(c))
            term = term.replace(c, "")
            if side == 0:
                a, ta = x, term
            else:
                b, tb = x, term
    contracted = [c for c in ta if c in tb and c not in to]
    batch = [c for c in to if c in ta and c in tb]
    left = [c for c in to if c in ta and c not in tb]
    right = [c for c in to if c in tb and c not in ta]
    row = left[-1] if left else ""
    col = right[-1] if right else ""
    k = contracted[0] if contracted else ""
    bt = "".join(batch + [c for c in left if c != row] + [c for c in right if c != col])
    # dummy letters stand for size-1 axes where a role is empty
    R, C, K = row or "1", col or "2", k or "3"
    xa = _arrange(rw, a, ta, bt + R + K, scope, hint + "_a")
    xb = _arrange(rw, b, tb, bt + K + C, scope, hint + "_b")
    y = rw.emit("matmul", (xa, xb), hint=hint + "_mm", scope=scope)
    cur = bt + R + C
    shape = rw.values[y].shape
    keep = [(c, s) for c, s in zip(cur, shape, strict=True) if c in to]
    if len(keep) != len(cur):
        y = rw.emit("reshape", (y,), hint=hint + "_sq", scope=scope, shape=tuple(s for _, s in keep))
    cur = "".join(c for c, _ in keep)
    if cur != to:
        y = rw.emit("transpose", (y,), hint=hint + "_o", scope=scope, perm=tuple(cur.index(c) for c in to))
    return y


@register
@dataclass(frozen=True)
class LowerEinsum:
    name = "lower-einsum"

    def __call__(self, graph) -> PassResult:
        count = 0

        def replace(op: Op, rw: Rewriter) -> str | None:
            nonlocal count
            out = lower(op, rw)
            count += out is not None
            return out

        out = Rewriter(graph).run(replace)
        left = sum(op.kind == "einsum" for op in out.ops)
        return PassResult(out, bool(count), {"einsums_lowered": count, "einsums_left": left})
