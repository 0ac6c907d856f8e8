"""`verify(graph)`: every invariant a later stage relies on, checked in one place, naming what is at fault."""

from __future__ import annotations

import numpy as np

from acg.ir.graph import DTYPES, Graph, IRError
from acg.ir.ops import infer

_NP_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "bool": np.bool_}


def verify(graph: Graph, *, allow_nonfinite: bool = False) -> Graph:
    """Check SSA form, topological order, op arity/attributes/shapes, tensors present with the declared shape and
    dtype and finite, outputs defined. Returns the graph so calls chain."""
    defined: dict[str, object] = {}
    for v in graph.inputs:
        if v.dtype not in DTYPES:
            raise IRError(f"graph input {v.name!r} has dtype {v.dtype!r}; supported: {', '.join(DTYPES)}")
        if v.name in defined:
            raise IRError(f"graph input {v.name!r} is declared twice")
        defined[v.name] = v
    used_tensors: set[str] = set()
    for op in graph.ops:
        if op.name in defined:
            raise IRError(f"op {op.name!r} ({op.kind}) redefines a value (the IR is SSA: one definition per name)")
        for i in op.inputs:
            if i not in defined:
                raise IRError(f"op {op.name!r} ({op.kind}) reads {i!r}, which is not defined before it")
        if op.output.dtype not in DTYPES:
            raise IRError(f"op {op.name!r} declares dtype {op.output.dtype!r}; supported: {', '.join(DTYPES)}")
        if op.kind == "const":
            _check_tensor(graph, op, allow_nonfinite)
            used_tensors.add(op.attr("tensor"))
        shape, dtype = infer(op, [defined[i] for i in op.inputs])  # type: ignore[misc]
        if tuple(shape) != tuple(op.output.shape) or dtype != op.output.dtype:
            raise IRError(
                f"op {op.name!r} ({op.kind}) declares {op.output} but computes {dtype}[{', '.join(map(str, shape))}]"
            )
        defined[op.name] = op.output
    for name in graph.outputs:
        if name not in defined:
            raise IRError(f"graph output {name!r} is not defined")
    if not graph.outputs:
        raise IRError("graph has no outputs")
    for weight, spec in graph.meta.get("usage", {}).items():
        for name in (weight, spec.get("usage")):
            if name not in graph.tensors:
                raise IRError(f"usage statistics name tensor {name!r}, which the graph does not hold")
        try:
            np.broadcast_shapes(graph.tensors[spec["usage"]].shape, graph.tensors[weight].shape)
        except ValueError:
            raise IRError(
                f"usage tensor {spec['usage']!r} {graph.tensors[spec['usage']].shape} does not broadcast to "
                f"weight {weight!r} {graph.tensors[weight].shape}"
            ) from None
    return graph


def _check_tensor(graph: Graph, op, allow_nonfinite: bool) -> None:
    name = op.attr("tensor")
    if name not in graph.tensors:
        raise IRError(f"op {op.name!r} refers to tensor {name!r}, which the graph does not hold")
    t = graph.tensors[name]
    if tuple(t.shape) != tuple(op.output.shape):
        raise IRError(f"tensor {name!r} has shape {tuple(t.shape)}, op {op.name!r} declares {tuple(op.output.shape)}")
    if t.dtype != _NP_DTYPES[op.output.dtype]:
        raise IRError(f"tensor {name!r} has dtype {t.dtype}, op {op.name!r} declares {op.output.dtype}")
    if not allow_nonfinite and t.dtype.kind == "f" and not np.isfinite(t).all():
        raise IRError(f"tensor {name!r} holds NaN or Inf values")
