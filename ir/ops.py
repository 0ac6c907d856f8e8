"""The op set: for each kind, its arity, required attributes and shape/dtype rule. What each op computes is defined by
the reference interpreter (`interpret.py`); this module only says what is well-formed."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from acg.ir.graph import Dim, IRError, Op, Shape, Value

ShapeRule = Callable[[Op, list[Value]], tuple[Shape, str]]


@dataclass(frozen=True)
class OpSpec:
    kind: str
    arity: tuple[int, int]  # (min, max) inputs; max -1 = any
    attrs: tuple[str, ...]  # required attributes
    rule: ShapeRule
    doc: str


def _fail(op: Op, msg: str) -> IRError:
    return IRError(f"op {op.name!r} ({op.kind}{', scope ' + op.scope if op.scope else ''}): {msg}")


def broadcast(a: Shape, b: Shape, op: Op) -> Shape:
    """numpy broadcasting over int and symbolic dims."""
    out: list[Dim] = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise _fail(op, f"shapes {a} and {b} do not broadcast")
    return tuple(reversed(out))


def _same(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    return ins[0].shape, ins[0].dtype


def _float(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    if ins[0].dtype not in ("float32", "float64"):
        raise _fail(op, f"expects a float input, got {ins[0].dtype}")
    return ins[0].shape, ins[0].dtype


def _binary(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    a, b = ins
    return broadcast(a.shape, b.shape, op), _result_dtype(a.dtype, b.dtype)


def _result_dtype(a: str, b: str) -> str:
    order = ("bool", "int64", "float32", "float64")
    return max(a, b, key=order.index)


def _const(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    return op.output.shape, op.output.dtype  # checked against the tensor by verify()


def _embed(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    table, tokens = ins
    if len(table.shape) != 2 or tokens.dtype != "int64":
        raise _fail(op, f"expects a [n, d] table and int64 ids, got {table} and {tokens}")
    return (*tokens.shape, table.shape[1]), table.dtype


def _pos_embed(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    table, tokens = ins
    if len(table.shape) != 2 or len(tokens.shape) != 2:
        raise _fail(op, f"expects a [n_ctx, d] table and [batch, seq] ids, got {table} and {tokens}")
    return (tokens.shape[1], table.shape[1]), table.dtype


def _matmul(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    a, b = ins
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise _fail(op, f"expects operands of rank >= 2, got {a} and {b}")
    if a.shape[-1] != b.shape[-2]:
        raise _fail(op, f"inner dims differ: {a.shape} @ {b.shape}")
    batch = broadcast(a.shape[:-2], b.shape[:-2], op)
    return (*batch, a.shape[-2], b.shape[-1]), _result_dtype(a.dtype, b.dtype)


EINSUM_RE = re.compile(r"^([a-z]+)(,[a-z]+)*->[a-z]*$")


def parse_einsum(equation: str) -> tuple[list[str], str]:
    """`"bpd,hde->bhpe"` -> (["bpd", "hde"], "bhpe"); the supported subset: explicit output, lowercase letters, no
    repeated letter within one operand, every output letter present in some input."""
    eq = equation.replace(" ", "")
    if not EINSUM_RE.match(eq):
        raise ValueError(f"einsum {equation!r}: only explicit 'ab,bc->ac' forms with lowercase letters are supported")
    lhs, out = eq.split("->")
    operands = lhs.split(",")
    for term in [*operands, out]:
        if len(set(term)) != len(term):
            raise ValueError(
                f"einsum {equation!r}: repeated index within one operand (traces/diagonals) is not supported"
            )
    if set(out) - set("".join(operands)):
        raise ValueError(f"einsum {equation!r}: output index not present in any input")
    return operands, out


def _einsum(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    try:
        operands, out = parse_einsum(op.attr("equation"))
    except ValueError as e:
        raise _fail(op, str(e)) from None
    if len(operands) != len(ins):
        raise _fail(op, f"equation has {len(operands)} operands, op has {len(ins)} inputs")
    sizes: dict[str, Dim] = {}
    for term, v in zip(operands, ins, strict=True):
        if len(term) != len(v.shape):
            raise _fail(op, f"operand {v.name!r} has rank {len(v.shape)}, equation term {term!r} has {len(term)}")
        for letter, dim in zip(term, v.shape, strict=True):
            if letter in sizes and sizes[letter] != dim and 1 not in (dim, sizes[letter]):
                raise _fail(op, f"index {letter!r} is {sizes[letter]} in one operand and {dim} in another")
            if letter not in sizes or sizes[letter] == 1:
                sizes[letter] = dim
    dtype = ins[0].dtype
    for v in ins[1:]:
        dtype = _result_dtype(dtype, v.dtype)
    return tuple(sizes[c] for c in out), dtype


def _norm(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    if op.attr("eps") is None or op.attr("center") is None:
        raise _fail(op, "needs attributes eps and center")
    return _float(op, ins)


def _scale(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    shape, dtype = _float(op, ins)
    return (*shape[:-1], 1), dtype


def _axis(op: Op, ins: list[Value]) -> int:
    axis = op.attr("axis")
    rank = len(ins[0].shape)
    if not isinstance(axis, int) or not -rank <= axis < rank:
        raise _fail(op, f"axis {axis!r} is out of range for rank {rank}")
    return axis % rank


def _softmax(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    _axis(op, ins)
    return _float(op, ins)


def _mask(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    if len(ins[0].shape) < 2:
        raise _fail(op, "expects scores of rank >= 2 (..., query, key)")
    return _float(op, ins)


def _key_mask(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    scores, mask = ins
    if len(scores.shape) != 4 or len(mask.shape) != 2:
        raise _fail(op, f"expects scores [batch, head, query, key] and a mask [batch, key], got {scores} and {mask}")
    return scores.shape, scores.dtype


def _reduce(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    axis = _axis(op, ins)
    shape = list(ins[0].shape)
    if op.attr("keepdims", False):
        shape[axis] = 1
    else:
        del shape[axis]
    return tuple(shape), ins[0].dtype


def _reshape(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    target = op.attr("shape")
    if not isinstance(target, tuple) or sum(1 for d in target if d == -1) > 1:
        raise _fail(op, f"shape attribute must be a tuple with at most one -1, got {target!r}")
    src = ins[0].shape
    known = _product([d for d in src])
    fixed = _product([d for d in target if d != -1])
    if -1 in target:
        rest = _divide(known, fixed)
        if rest is None:
            raise _fail(op, f"cannot reshape {src} into {target}")
        return tuple(rest if d == -1 else d for d in target), ins[0].dtype
    if known != fixed:
        raise _fail(op, f"cannot reshape {src} ({known}) into {target} ({fixed})")
    return target, ins[0].dtype


def _product(dims: list[Dim]) -> tuple[int, tuple[str, ...]]:
    """A product of dims as (int part, sorted symbolic factors)."""
    n, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            n *= d
        else:
            syms.append(d)
    return n, tuple(sorted(syms))


def _divide(a: tuple[int, tuple[str, ...]], b: tuple[int, tuple[str, ...]]) -> Dim | None:
    (na, sa), (nb, sb) = a, b
    if nb == 0 or na % nb:
        return None
    rest = list(sa)
    for s in sb:
        if s not in rest:
            return None
        rest.remove(s)
    n = na // nb
    if not rest:
        return n
    if n == 1 and len(rest) == 1:
        return rest[0]
    return None


def _transpose(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    perm = op.attr("perm")
    shape = ins[0].shape
    if not isinstance(perm, tuple) or sorted(perm) != list(range(len(shape))):
        raise _fail(op, f"perm {perm!r} is not a permutation of {len(shape)} axes")
    return tuple(shape[p] for p in perm), ins[0].dtype


def _slice(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    axis = _axis(op, ins)
    start, stop = op.attr("start"), op.attr("stop")
    dim = ins[0].shape[axis]
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
        raise _fail(op, f"slice [{start}:{stop}] must have 0 <= start < stop")
    if isinstance(dim, int) and stop > dim:
        raise _fail(op, f"slice [{start}:{stop}] exceeds dim {dim}")
    shape = list(ins[0].shape)
    shape[axis] = stop - start
    return tuple(shape), ins[0].dtype


def _concat(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    axis = _axis(op, ins)
    total = 0
    for v in ins:
        if len(v.shape) != len(ins[0].shape) or any(
            a != b for i, (a, b) in enumerate(zip(v.shape, ins[0].shape, strict=True)) if i != axis
        ):
            raise _fail(op, f"inputs {[str(v) for v in ins]} differ off axis {axis}")
        if not isinstance(v.shape[axis], int):
            raise _fail(op, "cannot concatenate along a symbolic dim")
        total += v.shape[axis]
    shape = list(ins[0].shape)
    shape[axis] = total
    return tuple(shape), ins[0].dtype


def _stack(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    if any(v.shape != ins[0].shape or v.dtype != ins[0].dtype for v in ins):
        raise _fail(op, f"inputs {[str(v) for v in ins]} differ in shape or dtype")
    return (*ins[0].shape, len(ins)), ins[0].dtype


def _where(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    x, mask = ins
    if mask.dtype != "bool":
        raise _fail(op, f"mask must be bool, got {mask.dtype}")
    return broadcast(x.shape, mask.shape, op), x.dtype


def _indicator(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    if (
        ins[0].dtype != "int64"
        or not isinstance(op.attr("value"), int)
        or op.attr("dtype") not in ("float32", "float64")
    ):
        raise _fail(op, "expects int64 input, an int `value` and dtype float32/float64")
    return ins[0].shape, op.attr("dtype")


def _hypothesis(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    lead = ins[0].shape[:2]
    if any(v.shape[:2] != lead for v in ins) or len(lead) != 2:
        raise _fail(op, f"inputs must all start with [batch, seq], got {[str(v) for v in ins]}")
    tail = op.attr("tail", ())
    if op.attr("dtype") not in ("float32", "float64") or not isinstance(tail, tuple):
        raise _fail(op, "needs dtype float32/float64 and a tuple `tail` (the output's dims after [batch, seq])")
    return (*lead, *tail), op.attr("dtype")


def _jumprelu(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    x, theta = ins
    return broadcast(x.shape, theta.shape, op), x.dtype


_UNARY = {
    "relu": "max(x, 0)",
    "gelu": "x * Phi(x), Phi the normal CDF (erf form)",
    "gelu_tanh": "the tanh approximation of gelu (gelu_new)",
    "silu": "x * sigmoid(x)",
    "sigmoid": "1 / (1 + exp(-x))",
    "tanh": "tanh(x)",
    "exp": "exp(x)",
    "neg": "-x",
    "sqrt": "sqrt(x)",
    "rsqrt": "1 / sqrt(x)",
}

SPECS: dict[str, OpSpec] = {
    s.kind: s
    for s in (
        OpSpec("const", (0, 0), ("tensor",), _const, "a stored tensor, by name"),
        OpSpec("embed", (2, 2), (), _embed, "table[ids]: [n, d], [batch, seq] -> [batch, seq, d]"),
        OpSpec("pos_embed", (2, 2), (), _pos_embed, "table[:seq]: [n_ctx, d], [batch, seq] -> [seq, d]"),
        *(
            OpSpec(k, (2, 2), (), _binary, f"elementwise {k} with numpy broadcasting")
            for k in ("add", "sub", "mul", "div", "maximum")
        ),
        OpSpec("matmul", (2, 2), (), _matmul, "numpy matmul (batched, broadcasting)"),
        OpSpec("einsum", (1, 3), ("equation",), _einsum, "einsum, explicit form, no repeated index per operand"),
        OpSpec(
            "norm",
            (1, 1),
            ("eps", "center"),
            _norm,
            "x (minus its mean over the last axis if center) divided by sqrt(mean square + eps); no weights",
        ),
        OpSpec(
            "norm_scale",
            (1, 1),
            ("eps", "center"),
            _scale,
            "the per-position factor 1/sqrt(mean square + eps) of `norm`, shape [..., 1]",
        ),
        *(OpSpec(k, (1, 1), (), _float, doc) for k, doc in _UNARY.items()),
        OpSpec("jumprelu", (2, 2), (), _jumprelu, "x where x > threshold, else 0"),
        OpSpec("indicator", (1, 1), ("value", "dtype"), _indicator, "1.0 where x == value, else 0.0 (a token feature)"),
        OpSpec("softmax", (1, 1), ("axis",), _softmax, "softmax along axis"),
        OpSpec("causal_mask", (1, 1), (), _mask, "scores [..., q, k] with entries k > q set to -inf"),
        OpSpec(
            "key_mask",
            (2, 2),
            (),
            _key_mask,
            "scores [batch, head, q, k] with keys whose mask [batch, k] is 0 set to the dtype's lowest value",
        ),
        OpSpec("sum", (1, 1), ("axis",), _reduce, "sum along axis (keepdims attr)"),
        OpSpec("mean", (1, 1), ("axis",), _reduce, "mean along axis (keepdims attr)"),
        OpSpec("reshape", (1, 1), ("shape",), _reshape, "reshape; dims may name symbolic sizes; one -1 allowed"),
        OpSpec("transpose", (1, 1), ("perm",), _transpose, "permute axes"),
        OpSpec("slice", (1, 1), ("axis", "start", "stop"), _slice, "x[start:stop] along axis"),
        OpSpec("concat", (1, -1), ("axis",), _concat, "concatenate along axis"),
        OpSpec("stack", (1, -1), (), _stack, "stack equal-shaped inputs along a new last axis"),
        OpSpec("where", (2, 2), ("value",), _where, "x with entries where mask is true replaced by value"),
        OpSpec(
            "hypothesis",
            (1, -1),
            ("source", "function", "dtype"),
            _hypothesis,
            "a user's checked Python function of named [batch, seq, ...] inputs (see ir/hypothesis.py)",
        ),
    )
}


def infer(op: Op, ins: list[Value]) -> tuple[Shape, str]:
    """The shape and dtype `op` produces from inputs `ins`; raises IRError naming the op if malformed."""
    spec = SPECS.get(op.kind)
    if spec is None:
        raise _fail(op, f"unknown op kind; supported: {', '.join(sorted(SPECS))}")
    lo, hi = spec.arity
    if len(ins) < lo or (hi != -1 and len(ins) > hi):
        raise _fail(op, f"takes {lo}{'' if hi == lo else '..' + ('*' if hi == -1 else str(hi))} inputs, got {len(ins)}")
    missing = [a for a in spec.attrs if op.attr(a) is None]
    if missing:
        raise _fail(op, f"missing attribute(s) {', '.join(missing)}")
    return spec.rule(op, ins)
