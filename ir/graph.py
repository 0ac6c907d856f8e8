"""The IR: an immutable typed graph in SSA form. Values have shapes (ints or symbolic `batch`/`seq`) and dtypes; ops
have attributes; large tensors are held by reference in `Graph.tensors` and named by `const` ops."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from acg.ir.errors import ACGError

Dim = int | str  # a symbolic dim is a name such as "batch" or "seq"
Shape = tuple[Dim, ...]
DTYPES = ("float32", "float64", "int64", "bool")


class IRError(ACGError):
    """A graph that breaks an invariant; the message names the op, value or tensor at fault."""


@dataclass(frozen=True)
class Value:
    """A named SSA value: every op defines exactly one."""

    name: str
    shape: Shape
    dtype: str = "float32"

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


def freeze_attrs(attrs: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> tuple[tuple[str, Any], ...]:
    """Attributes as a sorted tuple of (key, value), lists turned into tuples, so ops stay hashable and comparable."""
    items = attrs.items() if isinstance(attrs, Mapping) else attrs

    def freeze(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return tuple(freeze(x) for x in v)
        if isinstance(v, Mapping):
            return tuple(sorted((k, freeze(x)) for k, x in v.items()))
        if isinstance(v, np.generic):
            return v.item()
        return v

    return tuple(sorted((k, freeze(v)) for k, v in items))


@dataclass(frozen=True)
class Op:
    """`output = kind(*inputs, **attrs)`. `scope` names the model part the op belongs to (e.g. `blocks.0.attn`),
    which backends use to group ops into functions; it never changes what the op computes."""

    kind: str
    inputs: tuple[str, ...]
    output: Value
    attrs: tuple[tuple[str, Any], ...] = ()
    scope: str = ""

    @property
    def name(self) -> str:
        return self.output.name

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)


@dataclass(frozen=True, eq=False)
class Graph:
    """A whole program: graph inputs, ops in topological order, outputs, and the tensors `const` ops refer to."""

    inputs: tuple[Value, ...]
    ops: tuple[Op, ...]
    outputs: tuple[str, ...]
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    # ------------------------------------------------------------------------------------------------------ queries

    @property
    def values(self) -> dict[str, Value]:
        out = {v.name: v for v in self.inputs}
        out.update((op.name, op.output) for op in self.ops)
        return out

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def users(self) -> dict[str, list[Op]]:
        """For each value, the ops that read it."""
        out: dict[str, list[Op]] = {name: [] for name in self.values}
        for op in self.ops:
            for i in op.inputs:
                out[i].append(op)
        return out

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def replace(self, **changes: Any) -> Graph:
        return replace(self, **changes)

    @property
    def n_params(self) -> int:
        """Parameters actually referenced by the graph's `const` ops."""
        used = {op.attr("tensor") for op in self.ops if op.kind == "const"}
        return int(sum(self.tensors[name].size for name in used if name in self.tensors))

    def __str__(self) -> str:
        from acg.ir.printer import format_graph

        return format_graph(self)
