"""A small helper for passes that replace ops: rebuild a graph op by op, substituting a few of them with new ops."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from acg.ir.graph import Graph, Op, Value, freeze_attrs
from acg.ir.ops import infer


class Rewriter:
    """Copies `graph` op by op; `emit` adds new ops (shapes inferred), `alias` maps an old value to a new one."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.ops: list[Op] = []
        self.values: dict[str, Value] = {v.name: v for v in graph.inputs}
        self.tensors: dict[str, np.ndarray] = dict(graph.tensors)
        self.alias: dict[str, str] = {}
        self._taken = set(graph.values)

    def name(self, hint: str) -> str:
        n, name = 1, hint
        while name in self._taken:
            n += 1
            name = f"{hint}_{n}"
        self._taken.add(name)
        return name

    def emit(self, kind: str, inputs: tuple[str, ...], *, hint: str, scope: str, **attrs) -> str:
        frozen = freeze_attrs(attrs)
        ins = tuple(self.alias.get(i, i) for i in inputs)
        probe = Op(kind, ins, Value("?", ()), frozen, scope)
        shape, dtype = infer(probe, [self.values[i] for i in ins])
        op = Op(kind, ins, Value(self.name(hint), tuple(shape), dtype), frozen, scope)
        self.ops.append(op)
        self.values[op.name] = op.output
        return op.name

    def const(self, array: np.ndarray, *, hint: str, scope: str) -> str:
        tname = hint
        n = 1
        while tname in self.tensors:
            n += 1
            tname = f"{hint}#{n}"
        self.tensors[tname] = np.array(array, order="C")
        out = Value(self.name(hint.replace(".", "_").replace("#", "_")), tuple(array.shape), str(array.dtype))
        op = Op("const", (), out, freeze_attrs({"tensor": tname}), scope)
        self.ops.append(op)
        self.values[out.name] = out
        return out.name

    def keep(self, op: Op) -> None:
        ins = tuple(self.alias.get(i, i) for i in op.inputs)
        new = Op(op.kind, ins, op.output, op.attrs, op.scope) if ins != op.inputs else op
        self.ops.append(new)
        self.values[new.name] = new.output

    def run(self, replace: Callable[[Op, Rewriter], str | None]) -> Graph:
        """For each op, `replace(op, self)` returns the name of a value standing for it (after emitting ops), or None
        to keep the op as it is."""
        for op in self.graph.ops:
            new = replace(op, self)
            if new is None:
                self.keep(op)
            elif op.name in self.graph.outputs and new != op.name:
                self._rename(new, op.name)  # graph outputs keep their names
            else:
                self.alias[op.name] = new
        return self.graph.replace(ops=tuple(self.ops), tensors=self.tensors)

    def _rename(self, old: str, new: str) -> None:
        for i, op in enumerate(self.ops):
            if op.name == old:
                self.ops[i] = Op(op.kind, op.inputs, Value(new, op.output.shape, op.output.dtype), op.attrs, op.scope)
            elif old in op.inputs:
                self.ops[i] = Op(
                    op.kind, tuple(new if x == old else x for x in op.inputs), op.output, op.attrs, op.scope
                )
        self.values[new] = self.values.pop(old)
        for k, v in self.alias.items():
            if v == old:
                self.alias[k] = new
