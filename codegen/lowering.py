"""What to compute, for every backend: a graph becomes a `Program` of simple records (constants, blocks of steps with
their parameters and results), with identifiers from one name table. How to spell it is each backend's business."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from acg.codegen.names import NameTable
from acg.ir.graph import Graph, Op, Value


@dataclass(frozen=True)
class Const:
    ident: str
    tensor: str  # the IR tensor name
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Step:
    """`ident = kind(*args, **attrs)`; `args` are identifiers; `value` keeps the IR shape for comments."""

    ident: str
    kind: str
    args: tuple[str, ...]
    attrs: dict[str, Any]
    value: Value
    op: Op


@dataclass(frozen=True)
class Block:
    ident: str  # function name
    scope: str
    params: tuple[str, ...]  # identifiers read from outside (never constants)
    steps: tuple[Step, ...]
    results: tuple[str, ...]
    symbols: tuple[str, ...]  # symbolic dims the block needs (batch, seq)


@dataclass(frozen=True)
class Program:
    inputs: tuple[tuple[str, Value], ...]
    consts: tuple[Const, ...]
    blocks: tuple[Block, ...]
    outputs: tuple[str, ...]
    graph: Graph
    idents: dict[str, str]  # IR value name -> identifier


def _symbols(op: Op) -> set[str]:
    if op.kind != "reshape":
        return set()
    return {d for d in op.attr("shape") if isinstance(d, str)}


def plan(graph: Graph, names: NameTable | None = None) -> Program:
    """Group consecutive ops of one scope into blocks; constants become module-level identifiers."""
    names = names or NameTable()
    inputs = tuple((names(v.name), v) for v in graph.inputs)
    consts: list[Const] = []
    ident: dict[str, str] = {v.name: i for i, v in inputs}
    for op in graph.ops:
        if op.kind == "const":
            t = graph.tensors[op.attr("tensor")]
            ident[op.name] = names(op.name)
            consts.append(Const(ident[op.name], op.attr("tensor"), tuple(t.shape), str(t.dtype)))
    groups: list[tuple[str, list[Op]]] = []
    for op in graph.ops:
        if op.kind == "const":
            continue
        if not groups or groups[-1][0] != op.scope:
            groups.append((op.scope, []))
        groups[-1][1].append(op)
    const_names = {c.ident for c in consts}
    # which values each group defines, and which later groups (or outputs) read
    defined_in: dict[str, int] = {}
    for g, (_, ops) in enumerate(groups):
        for op in ops:
            defined_in[op.name] = g
    read_later: dict[int, set[str]] = {g: set() for g in range(len(groups))}
    for g, (_, ops) in enumerate(groups):
        for op in ops:
            for i in op.inputs:
                if i in defined_in and defined_in[i] != g:
                    read_later[defined_in[i]].add(i)
    for o in graph.outputs:
        if o in defined_in:
            read_later[defined_in[o]].add(o)
    blocks = []
    for g, (scope, ops) in enumerate(groups):
        steps = []
        params: list[str] = []
        symbols: set[str] = set()
        local = {op.name for op in ops}
        for op in ops:
            ident[op.name] = names(op.name)
            for i in op.inputs:
                if i not in local and ident[i] not in const_names and ident[i] not in params:
                    params.append(ident[i])
            symbols |= _symbols(op)
            steps.append(Step(ident[op.name], op.kind, tuple(ident[i] for i in op.inputs), op.attr_dict, op.output, op))
        results = tuple(ident[op.name] for op in ops if op.name in read_later[g])
        fn = names(f"block{g}:{scope}", scope.replace(".", "_") or "top")  # one table: never a value's name
        blocks.append(Block(fn, scope, tuple(params), tuple(steps), results, tuple(sorted(symbols))))
    outputs = tuple(ident[o] for o in graph.outputs)
    return Program(inputs, tuple(consts), tuple(blocks), outputs, graph, dict(ident))


def shape_comment(v: Value) -> str:
    return f"{v.dtype}[{', '.join(map(str, v.shape))}]"


def inline_literal(array: np.ndarray, max_size: int = 8) -> bool:
    """Small tensors are written into the source; large ones go to the sidecar file."""
    return array.size <= max_size
