"""Dead-code elimination: drop ops no output depends on, and tensors no op reads."""

from __future__ import annotations

from dataclasses import dataclass

from acg.ir.graph import Graph
from acg.ir.passes import PassResult, register


def live_ops(graph: Graph) -> set[str]:
    live = set(graph.outputs)
    for op in reversed(graph.ops):
        if op.name in live:
            live.update(op.inputs)
    return live


@register
@dataclass(frozen=True)
class DeadCodeElimination:
    """Remove ops whose values reach no graph output; exact (changes no output)."""

    name = "dce"

    def __call__(self, graph: Graph) -> PassResult:
        live = live_ops(graph)
        ops = tuple(op for op in graph.ops if op.name in live)
        used = {op.attr("tensor") for op in ops if op.kind == "const"}
        usage = {w: u for w, u in graph.meta.get("usage", {}).items() if w in used}
        used |= {u["usage"] for u in usage.values()}  # usage statistics travel with the weights they describe
        tensors = {k: v for k, v in graph.tensors.items() if k in used}
        removed = len(graph.ops) - len(ops)
        dropped = len(graph.tensors) - len(tensors)
        meta = {**graph.meta, "usage": usage} if "usage" in graph.meta else graph.meta
        out = graph.replace(ops=ops, tensors=tensors, meta=meta)
        return PassResult(out, bool(removed or dropped), {"ops_removed": removed, "tensors_dropped": dropped})
