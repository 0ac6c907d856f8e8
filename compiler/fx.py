"""Front end for arbitrary `nn.Module`s through torch.fx: trace symbolically, then map each node onto IR ops.

Sizes read from tensors (`x.shape`, `x.size(1)`) are tracked as symbolic dims (`batch`, `seq`) or ints, so the IR stays
shape-polymorphic. Causal masks are recognised by how they are built (`triu`/`tril` of ones, a lower-triangular
buffer sliced to the sequence, `is_causal=True`) and become one `causal_mask` op. Anything outside the supported set
fails with one error naming the op, its target and the user's source line.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from acg.ir.builder import GraphBuilder
from acg.ir.errors import ACGError
from acg.ir.graph import Graph


class UnsupportedOpError(ACGError):
    pass


@dataclass(frozen=True)
class T:
    """An IR value standing for a traced tensor."""

    name: str


@dataclass(frozen=True)
class Mask:
    """A boolean mask known by construction: `future` is True above the diagonal (keys after the query)."""

    future: bool


@dataclass(frozen=True)
class Tri:
    """A lower- or upper-triangular 0/1 matrix (a buffer or `torch.ones(..).tril()`), possibly sliced."""

    lower: bool
    diagonal: int = 0


@dataclass(frozen=True)
class Ones:
    shape: tuple


@dataclass(frozen=True)
class Positions:
    """`torch.arange(seq)`: position ids."""


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True  # buffers (e.g. a causal mask) become get_attr nodes

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(
            m,
            nn.Linear
            | nn.LayerNorm
            | nn.Embedding
            | nn.Dropout
            | nn.ReLU
            | nn.GELU
            | nn.SiLU
            | nn.Softmax
            | nn.Identity
            | nn.Tanh
            | nn.Sigmoid
            | getattr(nn, "RMSNorm", nn.Identity),
        )


SUPPORTED = (
    "nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.Dropout (eval), nn.ReLU/GELU/SiLU/Tanh/Sigmoid/Softmax; "
    "torch.matmul/bmm/@, einsum (explicit, no repeated index), + - * / and pow(2), mean/sum, sqrt/rsqrt/exp/tanh, "
    "F.linear/layer_norm/rms_norm/embedding/softmax/relu/gelu/silu/scaled_dot_product_attention, "
    "view/reshape/transpose/permute/unsqueeze/split/chunk/contiguous/size/shape, indexing with slices and None, "
    "causal masks via triu/tril of ones or a triangular buffer with masked_fill/where, torch.arange positions"
)


class _Importer:
    def __init__(self, gm: fx.GraphModule, dtype: str, n_inputs: int):
        self.gm = gm
        self.dtype = dtype
        self.b = GraphBuilder()
        self.env: dict[str, Any] = {}
        self.tokens: str | None = None
        self.n_inputs = n_inputs
        self._params = dict(gm.named_parameters()) | dict(gm.named_buffers())

    # ------------------------------------------------------------------------------------------------- helpers

    def fail(self, node: fx.Node, what: str) -> UnsupportedOpError:
        trace = (node.stack_trace or "").strip().splitlines()
        where, code = "", ""
        for i in range(len(trace) - 1, -1, -1):  # the innermost frame of user code, not torch's own
            line = trace[i].strip()
            if line.startswith("File ") and "/torch/" not in line:
                where = " at " + line
                code = trace[i + 1].strip() if i + 1 < len(trace) else ""
                break
        return UnsupportedOpError(
            f"torch.fx front end: unsupported {what} (node {node.name!r}, {node.op} "
            f"{_target_name(node.target)}){where}{': ' + code if code else ''}. "
            f"Supported: {SUPPORTED}"
        )

    def val(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            return self.env[x.name]
        if isinstance(x, tuple | list):
            return type(x)(self.val(v) for v in x)
        if isinstance(x, slice):
            return slice(self.val(x.start), self.val(x.stop), self.val(x.step))
        return x

    def const(self, name: str, t: torch.Tensor) -> T:
        arr = t.detach().cpu().numpy()
        if arr.dtype.kind == "f":
            arr = arr.astype(self.dtype)
        return T(self.b.const(name, arr, hint=name.replace(".", "_")))

    def scalar(self, v: float) -> T:
        return T(self.b.const(f"scalar_{v!r}", np.array(v, dtype=self.dtype), hint="c"))

    def shape(self, t: T) -> tuple:
        return self.b.shape(t.name)

    def op(self, kind: str, *ins: T, **attrs) -> T:
        return T(self.b.op(kind, *(i.name for i in ins), **attrs))

    def tensorize(self, x: Any) -> T:
        if isinstance(x, T):
            return x
        if isinstance(x, int | float) and not isinstance(x, bool):
            return self.scalar(float(x))
        raise TypeError(type(x).__name__)

    def axis(self, t: T, axis: int) -> int:
        return axis % len(self.shape(t))

    def reshape(self, t: T, dims: tuple) -> T:
        dims = tuple(dims)
        if len(dims) == 1 and isinstance(dims[0], tuple | list):
            dims = tuple(dims[0])
        return self.op("reshape", t, shape=dims)

    def transpose(self, t: T, a: int, c: int) -> T:
        rank = len(self.shape(t))
        perm = list(range(rank))
        a, c = a % rank, c % rank
        perm[a], perm[c] = perm[c], perm[a]
        return self.op("transpose", t, perm=tuple(perm))

    def linear(self, x: T, weight: T, bias: T | None) -> T:
        wt = self.op("transpose", weight, perm=(1, 0))
        y = self.op("matmul", x, wt)
        return self.op("add", y, bias) if bias is not None else y

    def norm(self, x: T, weight: T | None, bias: T | None, eps: float, center: bool) -> T:
        y = self.op("norm", x, eps=float(eps), center=center)
        if weight is not None:
            y = self.op("mul", y, weight)
        if bias is not None:
            y = self.op("add", y, bias)
        return y

    def softmax(self, x: T, dim: int) -> T:
        return self.op("softmax", x, axis=self.axis(x, dim))

    def masked_fill(self, node, x: T, mask: Any, value: float) -> T:
        if isinstance(mask, Mask) and mask.future and value == -math.inf:
            return self.op("causal_mask", x)
        if isinstance(mask, T) and self.b.values[mask.name].dtype == "bool":
            return self.op("where", x, mask, value=float(value))
        raise self.fail(node, "masked_fill with a mask that is not a recognised causal mask")

    def sdpa(self, node, q: T, k: T, v: T, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> T:
        if attn_mask is not None:
            raise self.fail(node, "scaled_dot_product_attention with attn_mask")
        d = self.shape(q)[-1]
        kt = self.transpose(k, -1, -2)
        scores = self.op("mul", self.op("matmul", q, kt), self.scalar(scale if scale is not None else 1 / math.sqrt(d)))
        if is_causal:
            scores = self.op("causal_mask", scores)
        return self.op("matmul", self.op("softmax", scores, axis=len(self.shape(scores)) - 1), v)

    def index(self, node, x: Any, idx: Any) -> Any:
        if isinstance(x, tuple | list | torch.Size):
            return x[idx]
        if isinstance(x, Tri):
            return x  # slicing a triangular buffer to [:seq, :seq] keeps it triangular
        if not isinstance(x, T):
            raise self.fail(node, f"indexing a {type(x).__name__}")
        if isinstance(idx, T):  # table[ids]
            return self.op("embed", x, idx)
        if isinstance(idx, Positions):
            return self.op("pos_embed", x, T(self.tokens))
        if not isinstance(idx, tuple):
            idx = (idx,)
        shape = list(self.shape(x))
        out, axis = x, 0
        new_shape: list = []
        for item in idx:
            if item is None:
                new_shape.append(1)
                continue
            if isinstance(item, slice) and item.step in (None, 1):
                start = item.start or 0
                stop = item.stop if item.stop is not None else shape[axis]
                if start == 0 and stop == shape[axis]:
                    new_shape.append(shape[axis])
                elif axis == 0 and start == 0 and isinstance(stop, str) and len(shape) == 2:
                    out = self.op("pos_embed", out, T(self.tokens))  # W_pos[:seq]
                    new_shape.append(stop)
                elif isinstance(start, int) and isinstance(stop, int):
                    stop = stop if stop >= 0 else shape[axis] + stop
                    out = self.op("slice", out, axis=axis, start=start, stop=stop)
                    new_shape.append(stop - start)
                else:
                    raise self.fail(node, f"slice [{start}:{stop}] on axis {axis}")
                axis += 1
                continue
            if item is Ellipsis:
                raise self.fail(node, "indexing with ...")
            if isinstance(item, int):
                out = self.op("slice", out, axis=axis, start=item % shape[axis], stop=item % shape[axis] + 1)
                axis += 1
                continue  # dropped below
            raise self.fail(node, f"index {item!r}")
        rest = shape[axis:]
        want = [*new_shape, *rest]
        dropped = [i for i, item in enumerate(idx) if isinstance(item, int)]
        if dropped or any(i is None for i in idx):
            out = self.op("reshape", out, shape=tuple(want))
        return out

    # ----------------------------------------------------------------------------------------------------- run

    def run(self) -> Graph:
        inputs = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if inputs == 0:
                    self.tokens = self.b.input("tokens", ("batch", "seq"), "int64")
                    self.env[node.name] = T(self.tokens)
                else:
                    self.env[node.name] = T(self.b.input(node.name, ("batch", "seq"), "int64"))
                inputs += 1
            elif node.op == "get_attr":
                obj = _fetch(self.gm, node.target)
                self.env[node.name] = self._attr(node, obj)
            elif node.op == "call_module":
                self.env[node.name] = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.env[node.name] = self.call(node)
            elif node.op == "output":
                out = self.val(node.args[0])
                if isinstance(out, tuple | list):
                    out = out[0]
                if hasattr(out, "logits"):
                    out = out.logits
                self.b.rename(out.name, "logits")
                return self.b.build(["logits"], meta={"family": "torch.fx", "title": type(self.gm).__name__})
        raise UnsupportedOpError("torch.fx front end: the traced graph has no output")

    def _attr(self, node, obj) -> Any:
        if isinstance(obj, torch.Tensor):
            if (
                obj.ndim == 2
                and obj.shape[0] == obj.shape[1]
                and obj.dtype in (torch.bool, torch.float32, torch.float64, torch.uint8)
            ):
                m = obj.float()
                if torch.equal(m, torch.ones_like(m).tril()):
                    return Tri(lower=True)
                if torch.equal(m, torch.ones_like(m).triu(1)):
                    return Mask(future=True)
            return self.const(node.target, obj)
        return obj

    def call_module(self, node: fx.Node) -> Any:
        mod = self.gm.get_submodule(node.target)
        args = [self.val(a) for a in node.args]
        prefix = node.target

        def p(name: str) -> T | None:
            t = getattr(mod, name, None)
            return self.const(f"{prefix}.{name}", t) if isinstance(t, torch.Tensor) else None

        x = args[0]
        if isinstance(mod, nn.Linear):
            return self.linear(x, p("weight"), p("bias"))
        if isinstance(mod, nn.LayerNorm):
            return self.norm(x, p("weight"), p("bias"), mod.eps, True)
        if hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm):
            eps = mod.eps if mod.eps is not None else torch.finfo(torch.float32).eps
            return self.norm(x, p("weight"), None, eps, False)
        if isinstance(mod, nn.Embedding):
            table = p("weight")
            return (
                self.op("pos_embed", table, T(self.tokens)) if isinstance(x, Positions) else self.op("embed", table, x)
            )
        if isinstance(mod, nn.Dropout | nn.Identity):
            return x
        if isinstance(mod, nn.ReLU):
            return self.op("relu", x)
        if isinstance(mod, nn.GELU):
            return self.op("gelu_tanh" if mod.approximate == "tanh" else "gelu", x)
        if isinstance(mod, nn.SiLU):
            return self.op("silu", x)
        if isinstance(mod, nn.Tanh):
            return self.op("tanh", x)
        if isinstance(mod, nn.Sigmoid):
            return self.op("sigmoid", x)
        if isinstance(mod, nn.Softmax):
            return self.softmax(x, mod.dim)
        raise self.fail(node, f"module {type(mod).__name__}")

    def call(self, node: fx.Node) -> Any:
        target = node.target
        args = [self.val(a) for a in node.args]
        kwargs = {k: self.val(v) for k, v in node.kwargs.items()}
        if node.op == "call_method":
            handler = METHODS.get(target)
        else:
            handler = FUNCTIONS.get(target)
        if handler is None:
            raise self.fail(node, "op")
        try:
            return handler(self, node, *args, **kwargs)
        except UnsupportedOpError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise self.fail(node, f"use ({type(e).__name__}: {e})") from None


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", "") or ""
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


# ------------------------------------------------------------------------------------------------- op handlers


def _binary(kind: str) -> Callable:
    def handle(im: _Importer, node, a, b, **kw):
        if not isinstance(a, T) and not isinstance(b, T):  # size arithmetic
            return {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[kind](a, b)
        return im.op(kind, im.tensorize(a), im.tensorize(b))

    return handle


def _rbinary(kind: str) -> Callable:
    def handle(im: _Importer, node, a, b, **kw):
        return im.op(kind, im.tensorize(b), im.tensorize(a))

    return handle


def _unary(kind: str) -> Callable:
    return lambda im, node, x, **kw: im.op(kind, x)


def _pow(im: _Importer, node, x, exponent):
    if exponent == 2:
        return im.op("mul", x, x)
    if exponent == 0.5:
        return im.op("sqrt", x)
    if exponent == -0.5:
        return im.op("rsqrt", x)
    raise im.fail(node, f"pow with exponent {exponent!r}")


def _reduce(kind: str) -> Callable:
    def handle(im: _Importer, node, x, dim=None, keepdim=False, **kw):
        if dim is None or isinstance(dim, tuple | list) and len(dim) != 1:
            raise im.fail(node, f"{kind} over {dim!r} (one axis only)")
        dim = dim[0] if isinstance(dim, tuple | list) else dim
        return im.op(kind, x, axis=im.axis(x, dim), keepdims=bool(keepdim))

    return handle


def _shape_of(im: _Importer, node, x, *dims):
    shape = im.shape(x) if isinstance(x, T) else x.shape
    return shape[dims[0]] if dims else tuple(shape)


def _getattr(im: _Importer, node, x, name):
    if name == "shape":
        return tuple(im.shape(x))
    if name == "device":
        return "cpu"
    if name == "dtype":
        return im.dtype
    if name == "T" and isinstance(x, T):
        return im.op("transpose", x, perm=tuple(reversed(range(len(im.shape(x))))))
    raise im.fail(node, f"attribute .{name}")


def _view(im: _Importer, node, x, *dims, **kw):
    return im.reshape(x, dims)


def _unsqueeze(im: _Importer, node, x, dim):
    shape = list(im.shape(x))
    dim = dim % (len(shape) + 1)
    shape.insert(dim, 1)
    return im.op("reshape", x, shape=tuple(shape))


def _permute(im: _Importer, node, x, *dims):
    if len(dims) == 1 and isinstance(dims[0], tuple | list):
        dims = tuple(dims[0])
    rank = len(im.shape(x))
    return im.op("transpose", x, perm=tuple(d % rank for d in dims))


def _split(im: _Importer, node, x, size, dim=-1):
    shape = im.shape(x)
    axis = im.axis(x, dim)
    total = shape[axis]
    if not isinstance(total, int):
        raise im.fail(node, "split along a symbolic dim")
    sizes = [size] * (total // size) if isinstance(size, int) else list(size)
    out, start = [], 0
    for s in sizes:
        out.append(im.op("slice", x, axis=axis, start=start, stop=start + s))
        start += s
    return tuple(out)


def _chunk(im: _Importer, node, x, chunks, dim=0):
    total = im.shape(x)[im.axis(x, dim)]
    return _split(im, node, x, total // chunks, dim)


def _ones(im: _Importer, node, *size, **kw):
    if len(size) == 1 and isinstance(size[0], tuple | list):
        size = tuple(size[0])
    return Ones(tuple(size))


def _ones_like(im: _Importer, node, x, *a, **kw):
    return Ones(tuple(im.shape(x)))


def _tri(lower: bool) -> Callable:
    def handle(im: _Importer, node, x, diagonal=0, **kw):
        if isinstance(x, Ones | Tri):
            if lower and diagonal == 0:
                return Tri(lower=True)
            if not lower and diagonal == 1:
                return Mask(future=True)
        raise im.fail(node, f"{'tril' if lower else 'triu'}(diagonal={diagonal}) of anything but a matrix of ones")

    return handle


def _eq(im: _Importer, node, a, b):
    if isinstance(a, Tri) and a.lower and b == 0:
        return Mask(future=True)
    if isinstance(a, T) or isinstance(b, T):
        raise im.fail(node, "elementwise == on tensors")
    return a == b


def _logical_not(im: _Importer, node, a):
    if isinstance(a, Tri) and a.lower:
        return Mask(future=True)
    raise im.fail(node, "logical not of a tensor")


def _to(im: _Importer, node, x, *args, **kw):
    return x  # dtype/device moves: the IR computes in one dtype


def _where(im: _Importer, node, cond, x, y):
    if isinstance(cond, Tri) and cond.lower and isinstance(x, T) and y == -math.inf:
        return im.op("causal_mask", x)
    if isinstance(cond, Mask) and cond.future and isinstance(y, T) and x == -math.inf:
        return im.op("causal_mask", y)
    raise im.fail(node, "torch.where with a mask that is not a recognised causal mask")


def _arange(im: _Importer, node, *args, **kw):
    if len(args) == 1 and args[0] == "seq":
        return Positions()
    if len(args) == 2 and args[0] == 0 and args[1] == "seq":
        return Positions()
    raise im.fail(node, f"torch.arange{tuple(args)} (only arange(seq) position ids)")


def _einsum(im: _Importer, node, equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], tuple | list):
        operands = tuple(operands[0])
    from acg.ir.ops import parse_einsum

    try:
        parse_einsum(equation)
    except ValueError as e:
        raise im.fail(node, str(e)) from None
    return im.op("einsum", *operands, equation=equation.replace(" ", ""))


def _matmul(im: _Importer, node, a, b):
    return im.op("matmul", a, b)


def _softmax_fn(im: _Importer, node, x, dim=None, *a, **kw):
    return im.softmax(x, dim if dim is not None else kw.get("dim", -1))


def _gelu(im: _Importer, node, x, approximate="none"):
    return im.op("gelu_tanh" if approximate == "tanh" else "gelu", x)


def _layer_norm(im: _Importer, node, x, shape, weight=None, bias=None, eps=1e-5):
    if len(tuple(shape)) != 1:
        raise im.fail(node, "layer_norm over more than the last axis")
    return im.norm(x, weight, bias, eps, True)


def _rms_norm(im: _Importer, node, x, shape, weight=None, eps=None):
    return im.norm(x, weight, None, eps if eps is not None else float(np.finfo(np.float32).eps), False)


def _embedding(im: _Importer, node, ids, table, *a, **kw):
    return im.op("pos_embed", table, T(im.tokens)) if isinstance(ids, Positions) else im.op("embed", table, ids)


def _size(im: _Importer, node, x, dim=None):
    shape = tuple(im.shape(x))
    return shape if dim is None else shape[dim]


def _math(fn: Callable) -> Callable:
    def handle(im: _Importer, node, *args):
        if any(isinstance(a, T) for a in args):
            raise im.fail(node, f"math.{fn.__name__} on a tensor")
        return fn(*args)

    return handle


FUNCTIONS: dict[Any, Callable] = {
    math.sqrt: _math(math.sqrt),
    math.log: _math(math.log),
    math.exp: _math(math.exp),
    operator.add: _binary("add"),
    operator.sub: _binary("sub"),
    operator.mul: _binary("mul"),
    operator.truediv: _binary("div"),
    operator.floordiv: lambda im, n, a, b: a // b,
    operator.matmul: _matmul,
    operator.getitem: lambda im, node, x, i: im.index(node, x, i),
    operator.neg: _unary("neg"),
    operator.pow: _pow,
    operator.eq: _eq,
    operator.invert: _logical_not,
    getattr: _getattr,
    torch.add: _binary("add"),
    torch.sub: _binary("sub"),
    torch.mul: _binary("mul"),
    torch.div: _binary("div"),
    torch.matmul: _matmul,
    torch.bmm: _matmul,
    torch.einsum: _einsum,
    torch.relu: _unary("relu"),
    F.relu: _unary("relu"),
    F.gelu: _gelu,
    F.silu: _unary("silu"),
    torch.tanh: _unary("tanh"),
    torch.sigmoid: _unary("sigmoid"),
    torch.exp: _unary("exp"),
    torch.sqrt: _unary("sqrt"),
    torch.rsqrt: _unary("rsqrt"),
    torch.pow: _pow,
    torch.softmax: _softmax_fn,
    F.softmax: _softmax_fn,
    F.layer_norm: _layer_norm,
    F.linear: lambda im, node, x, w, b=None: im.linear(x, w, b),
    F.embedding: _embedding,
    F.scaled_dot_product_attention: lambda im, node, *a, **kw: im.sdpa(node, *a, **kw),
    F.dropout: lambda im, node, x, *a, **kw: x,
    torch.ones: _ones,
    torch.ones_like: _ones_like,
    torch.tril: _tri(True),
    torch.triu: _tri(False),
    torch.where: _where,
    torch.arange: _arange,
    torch.mean: _reduce("mean"),
    torch.sum: _reduce("sum"),
    torch.transpose: lambda im, node, x, a, c: im.transpose(x, a, c),
    torch.permute: _permute,
    torch.reshape: lambda im, node, x, shape: im.reshape(x, shape),
    torch.split: _split,
    torch.chunk: _chunk,
    torch.unsqueeze: _unsqueeze,
    torch.logical_not: _logical_not,
}
if hasattr(F, "rms_norm"):
    FUNCTIONS[F.rms_norm] = _rms_norm

METHODS: dict[str, Callable] = {
    "view": _view,
    "reshape": _view,
    "transpose": lambda im, node, x, a, c: im.transpose(x, a, c),
    "permute": _permute,
    "contiguous": lambda im, node, x, *a, **kw: x,
    "size": _size,
    "unsqueeze": _unsqueeze,
    "split": _split,
    "chunk": _chunk,
    "masked_fill": lambda im, node, x, mask, value: im.masked_fill(node, x, mask, value),
    "softmax": _softmax_fn,
    "mean": _reduce("mean"),
    "sum": _reduce("sum"),
    "pow": _pow,
    "sqrt": _unary("sqrt"),
    "rsqrt": _unary("rsqrt"),
    "exp": _unary("exp"),
    "tanh": _unary("tanh"),
    "relu": _unary("relu"),
    "sigmoid": _unary("sigmoid"),
    "neg": _unary("neg"),
    "add": _binary("add"),
    "sub": _binary("sub"),
    "mul": _binary("mul"),
    "div": _binary("div"),
    "__radd__": _rbinary("add"),
    "__rsub__": _rbinary("sub"),
    "__rmul__": _rbinary("mul"),
    "__rtruediv__": _rbinary("div"),
    "matmul": _matmul,
    "triu": _tri(False),
    "tril": _tri(True),
    "to": _to,
    "type_as": _to,
    "float": _to,
    "bool": _to,
    "double": _to,
    "__eq__": _eq,
    "eq": _eq,
    "logical_not": _logical_not,
}


def to_ir(module: nn.Module, dtype: str = "float32") -> Graph:
    """Trace `module` (its first input: token ids [batch, seq]) and import the graph."""
    try:
        graph = _Tracer().trace(module)
    except Exception as e:  # tracing runs user code; report, never hide
        raise UnsupportedOpError(f"torch.fx could not trace {type(module).__name__}: {type(e).__name__}: {e}") from e
    gm = fx.GraphModule(module, graph)
    n_inputs = sum(1 for n in graph.nodes if n.op == "placeholder")
    return _Importer(gm, dtype, n_inputs).run()
