"""Human-readable text for a graph, in the spirit of MLIR and fx's `print_readable`."""

from __future__ import annotations

import json

from acg.ir.graph import Graph, Op


def _attr(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_attr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def format_op(op: Op) -> str:
    args = ", ".join(f"%{i}" for i in op.inputs)
    attrs = {k: v for k, v in op.attrs if k != "tensor"}
    text = f"%{op.name} = {op.kind}"
    if op.kind == "const":
        text += f" {json.dumps(op.attr('tensor'))}"
    else:
        text += f"({args})"
    if attrs:
        text += " {" + ", ".join(f"{k}={_attr(v)}" for k, v in attrs.items()) + "}"
    return f"{text} : {op.output}"


def format_graph(graph: Graph, max_ops: int | None = None) -> str:
    ins = ", ".join(f"%{v.name}: {v}" for v in graph.inputs)
    outs = ", ".join(f"%{o}" for o in graph.outputs)
    lines = [f"graph({ins}) -> ({outs}) {{"]
    scope = None
    ops = graph.ops if max_ops is None else graph.ops[:max_ops]
    for op in ops:
        if op.scope != scope:
            scope = op.scope
            lines.append(f"  // {scope or '(top)'}")
        lines.append("  " + format_op(op))
    if max_ops is not None and len(graph.ops) > max_ops:
        lines.append(f"  ... {len(graph.ops) - max_ops} more ops")
    lines.append(f"  return {outs}")
    lines.append("}")
    n_tensors = len(graph.tensors)
    lines.append(f"// {len(graph.ops)} ops, {n_tensors} tensors, {graph.n_params:,} parameters")
    return "\n".join(lines)
