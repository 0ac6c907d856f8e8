"""The reference interpreter: what every op means, in plain numpy. Short and obviously correct on purpose; it is the
oracle every backend is tested against. Speed comes from the backends."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from acg.ir.graph import Graph, IRError, Op

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def norm_scale(x: np.ndarray, eps: float, center: bool) -> np.ndarray:
    if center:
        x = x - x.mean(-1, keepdims=True)
    return 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def norm(x: np.ndarray, eps: float, center: bool) -> np.ndarray:
    centred = x - x.mean(-1, keepdims=True) if center else x
    return centred * norm_scale(x, eps, center)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / e.sum(axis, keepdims=True)


def causal_mask(x: np.ndarray) -> np.ndarray:
    q, k = x.shape[-2:]
    future = np.triu(np.ones((q, k), dtype=bool), 1)
    return np.where(future, -np.inf, x).astype(x.dtype)


def key_mask(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask[:, None, None, :] == 0, np.finfo(x.dtype).min, x).astype(x.dtype)


Kernel = Callable[[Op, list[np.ndarray]], np.ndarray]

KERNELS: dict[str, Kernel] = {
    "embed": lambda op, a: a[0][a[1]],
    "pos_embed": lambda op, a: a[0][: a[1].shape[1]],
    "add": lambda op, a: a[0] + a[1],
    "sub": lambda op, a: a[0] - a[1],
    "mul": lambda op, a: a[0] * a[1],
    "div": lambda op, a: a[0] / a[1],
    "maximum": lambda op, a: np.maximum(a[0], a[1]),
    "matmul": lambda op, a: a[0] @ a[1],
    "einsum": lambda op, a: np.einsum(op.attr("equation"), *a),
    "norm": lambda op, a: norm(a[0], op.attr("eps"), op.attr("center")),
    "norm_scale": lambda op, a: norm_scale(a[0], op.attr("eps"), op.attr("center")),
    "relu": lambda op, a: np.maximum(a[0], 0),
    "gelu": lambda op, a: gelu(a[0]),
    "gelu_tanh": lambda op, a: gelu_tanh(a[0]),
    "silu": lambda op, a: a[0] / (1.0 + np.exp(-a[0])),
    "sigmoid": lambda op, a: 1.0 / (1.0 + np.exp(-a[0])),
    "tanh": lambda op, a: np.tanh(a[0]),
    "exp": lambda op, a: np.exp(a[0]),
    "neg": lambda op, a: -a[0],
    "sqrt": lambda op, a: np.sqrt(a[0]),
    "rsqrt": lambda op, a: 1.0 / np.sqrt(a[0]),
    "indicator": lambda op, a: (a[0] == op.attr("value")).astype(op.attr("dtype")),
    "jumprelu": lambda op, a: np.where(a[0] > a[1], a[0], 0.0).astype(a[0].dtype),
    "softmax": lambda op, a: softmax(a[0], op.attr("axis")),
    "causal_mask": lambda op, a: causal_mask(a[0]),
    "key_mask": lambda op, a: key_mask(a[0], a[1]),
    "sum": lambda op, a: a[0].sum(op.attr("axis"), keepdims=op.attr("keepdims", False)),
    "mean": lambda op, a: a[0].mean(op.attr("axis"), keepdims=op.attr("keepdims", False)),
    "transpose": lambda op, a: a[0].transpose(op.attr("perm")),
    "slice": lambda op, a: np.take(a[0], range(op.attr("start"), op.attr("stop")), axis=op.attr("axis")),
    "concat": lambda op, a: np.concatenate(a, axis=op.attr("axis")),
    "stack": lambda op, a: np.stack(a, axis=-1),
    "where": lambda op, a: np.where(a[1], np.asarray(op.attr("value"), dtype=a[0].dtype), a[0]),
    "hypothesis": lambda op, a: run_hypothesis(op, a),
}


def run_hypothesis(op: Op, args: list[np.ndarray]) -> np.ndarray:
    """Call the op's checked function; its result must have the declared shape (any float dtype is cast)."""
    from acg.ir.hypothesis import compiled

    fn = compiled(op.attr("source"), op.attr("function"))
    out = np.asarray(fn(*args))
    lead = args[0].shape[:2]
    sizes = {"batch": lead[0], "seq": lead[1]}
    want = (*lead, *(sizes.get(d, d) for d in op.attr("tail", ())))
    if out.shape != want:
        try:
            out = np.broadcast_to(out, want)
        except ValueError:
            raise IRError(
                f"op {op.name!r}: hypothesis {op.attr('function')}() returned shape {out.shape}, expected {want}"
            ) from None
    if out.dtype.kind not in "fiub":
        raise IRError(f"op {op.name!r}: hypothesis {op.attr('function')}() returned {out.dtype}, expected numbers")
    return out.astype(op.attr("dtype"))


def run(
    graph: Graph,
    inputs: Mapping[str, Any] | np.ndarray,
    dtype: str = "float64",
    *,
    keep: bool = False,
) -> dict[str, np.ndarray]:
    """Run `graph` on `inputs` (a mapping by input name, or one array for a one-input graph), computing in `dtype`.

    Returns the outputs by name, or every value when `keep` is true (for attribution and debugging).
    """
    if not isinstance(inputs, Mapping):
        if len(graph.inputs) != 1:
            raise IRError(f"graph has inputs {[v.name for v in graph.inputs]}; pass a mapping")
        inputs = {graph.inputs[0].name: inputs}
    env: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        if v.name not in inputs:
            raise IRError(f"missing graph input {v.name!r}")
        env[v.name] = _input(v.name, inputs[v.name], v.dtype, dtype, v.shape)
    sizes = _symbolic_sizes(graph, env)
    for op in graph.ops:
        env[op.name] = _eval(op, env, graph, dtype, sizes)
    if keep:
        return env
    return {name: env[name] for name in graph.outputs}


def _eval(op: Op, env: dict[str, np.ndarray], graph: Graph, dtype: str, sizes: dict[str, int]) -> np.ndarray:
    if op.kind == "const":
        t = graph.tensors[op.attr("tensor")]
        return t.astype(dtype) if t.dtype.kind == "f" else t
    args = [env[i] for i in op.inputs]
    if op.kind == "reshape":
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in op.attr("shape"))
        return args[0].reshape(shape)
    return KERNELS[op.kind](op, args)


def _input(name: str, x: Any, declared: str, dtype: str, shape: tuple) -> np.ndarray:
    arr = np.asarray(x)
    if declared == "int64":
        if arr.dtype.kind not in "iu":
            raise IRError(f"graph input {name!r} must hold integers, got {arr.dtype}")
        arr = arr.astype(np.int64)
    elif declared in ("float32", "float64"):
        arr = arr.astype(dtype)
    if arr.ndim != len(shape):
        raise IRError(f"graph input {name!r} must have rank {len(shape)} {shape}, got shape {arr.shape}")
    return arr


def _symbolic_sizes(graph: Graph, env: dict[str, np.ndarray]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for v in graph.inputs:
        for dim, n in zip(v.shape, env[v.name].shape, strict=True):
            if isinstance(dim, str):
                if sizes.setdefault(dim, n) != n:
                    raise IRError(f"symbolic dim {dim!r} is {sizes[dim]} in one input and {n} in {v.name!r}")
            elif dim != n:
                raise IRError(f"graph input {v.name!r} has size {n} where {dim} is declared")
    return sizes


__all__ = ["KERNELS", "gelu", "gelu_tanh", "norm", "norm_scale", "run", "softmax"]
