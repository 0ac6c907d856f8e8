"""`GraphBuilder`: the one way front ends and passes construct graphs. Shapes are inferred op by op, names are kept
unique, and the current scope is recorded on every op."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from acg.ir.graph import Graph, Op, Shape, Value, freeze_attrs
from acg.ir.ops import infer
from acg.ir.verify import verify

_NAME_RE = re.compile(r"[^0-9a-zA-Z_]+")


class GraphBuilder:
    def __init__(self) -> None:
        self.inputs: list[Value] = []
        self.ops: list[Op] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.values: dict[str, Value] = {}
        self._scope: list[str] = []
        self._const_of: dict[str, str] = {}  # tensor name -> the const op that reads it
        self._counters: dict[str, int] = {}

    # ----------------------------------------------------------------------------------------------------- naming

    def fresh(self, hint: str) -> str:
        base = _NAME_RE.sub("_", hint).strip("_") or "v"
        if base[0].isdigit():
            base = "v" + base
        name, n = base, self._counters.get(base, 1)
        while name in self.values:  # resumes where the last search for this base stopped: linear overall
            n += 1
            name = f"{base}_{n}"
        self._counters[base] = n
        return name

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    @property
    def current_scope(self) -> str:
        return ".".join(self._scope)

    # -------------------------------------------------------------------------------------------------------- ops

    def input(self, name: str, shape: Shape, dtype: str = "int64") -> str:
        v = Value(self.fresh(name), tuple(shape), dtype)
        self.inputs.append(v)
        self.values[v.name] = v
        return v.name

    def const(self, tensor_name: str, array: np.ndarray, *, hint: str | None = None) -> str:
        """A `const` op reading `array`, stored under `tensor_name` (shared if the same name is used again)."""
        if tensor_name in self._const_of:
            return self._const_of[tensor_name]
        array = np.array(array, order="C")  # ascontiguousarray would turn 0-d into 1-d
        self.tensors[tensor_name] = array
        out = Value(self.fresh(hint or tensor_name), tuple(array.shape), str(array.dtype))
        op = Op("const", (), out, freeze_attrs({"tensor": tensor_name}), self.current_scope)
        self._append(op)
        self._const_of[tensor_name] = out.name
        return out.name

    def op(self, kind: str, *inputs: str, name: str | None = None, **attrs: Any) -> str:
        """Append `kind(*inputs, **attrs)`; its output shape and dtype are inferred."""
        frozen = freeze_attrs(attrs)
        probe = Op(kind, tuple(inputs), Value("?", (), "float32"), frozen, self.current_scope)
        shape, dtype = infer(probe, [self.values[i] for i in inputs])
        out = Value(self.fresh(name or kind), tuple(shape), dtype)
        self._append(Op(kind, tuple(inputs), out, frozen, self.current_scope))
        return out.name

    def _append(self, op: Op) -> None:
        self.ops.append(op)
        self.values[op.name] = op.output

    def rename(self, old: str, new: str) -> None:
        """Give the value `old` the name `new` (free), updating every reader; used to name graph outputs."""
        if old == new:
            return
        if new in self.values:
            raise ValueError(f"name {new!r} is taken")
        for i, op in enumerate(self.ops):
            out = Value(new, op.output.shape, op.output.dtype) if op.name == old else op.output
            self.ops[i] = Op(op.kind, tuple(new if x == old else x for x in op.inputs), out, op.attrs, op.scope)
        self.inputs = [Value(new, v.shape, v.dtype) if v.name == old else v for v in self.inputs]
        self.values[new] = Value(new, self.values[old].shape, self.values[old].dtype)
        del self.values[old]
        self._const_of = {k: new if v == old else v for k, v in self._const_of.items()}

    def shape(self, name: str) -> Shape:
        return self.values[name].shape

    def build(self, outputs: list[str] | tuple[str, ...], meta: Mapping[str, Any] | None = None) -> Graph:
        graph = Graph(tuple(self.inputs), tuple(self.ops), tuple(outputs), dict(self.tensors), dict(meta or {}))
        return verify(graph)
