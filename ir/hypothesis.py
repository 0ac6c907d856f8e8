"""Hypotheses as code: a user's Python function standing in for one part of a model (a feature, a head's pattern, a
layer's features), checked before it is ever run.

A hypothesis is a plain function of named arrays (`tokens`, earlier features, ...) returning an array, written in a
small, inert subset of Python: arithmetic, comparisons, `if`/`for`/`while`, local names, `numpy` (as `np`) and
`math` functions from an allow-list, a few builtins (`range`, `len`, `abs`, `min`, `max`, `int`, `float`, `bool`).
No imports, no attribute whose name starts with `_`, no `open`/`eval`/`exec`/`getattr`/`globals`, no nested
functions, classes, lambdas, `with`, `try`, `global`. The check works on the syntax tree (`ast.parse` never runs
anything); only a function that passes it is compiled, in a namespace that holds `np`, `math` and those builtins and
nothing else. The source is stored in the IR (`hypothesis` op, attribute `source`), so an IR folder that carries one
is checked again when it runs.
"""

from __future__ import annotations

import ast
import builtins
import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from acg.ir.errors import ACGError


class HypothesisError(ACGError):
    pass


NUMPY_FUNCTIONS = frozenset(
    """abs all any arange argmax argmin array asarray bool_ clip concatenate cumprod cumsum diff dot einsum equal exp
    flip float32 float64 full full_like int64 isin log log1p logical_and logical_not logical_or matmul max maximum
    mean min minimum ones ones_like pad roll sign sqrt stack sum take_along_axis tanh tril triu where zeros
    zeros_like expand_dims greater less greater_equal less_equal not_equal broadcast_to repeat tile sort argsort
    isfinite""".split()
)
MATH_FUNCTIONS = frozenset("exp log sqrt tanh pi e inf isfinite floor ceil fabs".split())
METHODS = frozenset(
    "shape ndim dtype size astype sum mean max min any all cumsum cumprod reshape argmax argmin copy clip T".split()
)
BUILTINS = {name: getattr(builtins, name) for name in ("range", "len", "abs", "min", "max", "int", "float", "bool")}
ALLOWED_NODES = (
    ast.Module,
    ast.FunctionDef,
    ast.arguments,
    ast.arg,
    ast.Return,
    ast.Assign,
    ast.AugAssign,
    ast.AnnAssign,
    ast.If,
    ast.For,
    ast.While,
    ast.Break,
    ast.Continue,
    ast.Pass,
    ast.Expr,
    ast.Name,
    ast.Load,
    ast.Store,
    ast.Constant,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Call,
    ast.keyword,
    ast.Attribute,
    ast.Subscript,
    ast.Slice,
    ast.Tuple,
    ast.List,
    ast.IfExp,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
)
ALLOWED_TOP = "import numpy as np", "import math"


def _where(node: ast.AST, path: str) -> str:
    return f"{path}:{getattr(node, 'lineno', '?')}:{getattr(node, 'col_offset', -1) + 1}"


def check(source: str, function: str, path: str = "<hypothesis>") -> ast.FunctionDef:
    """The function `function` of `source`, after checking it is in the allowed subset; raises HypothesisError with
    the file, line and column of the first construct that is not, and what is allowed. Nothing is executed."""
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise HypothesisError(f"{path}:{e.lineno}:{e.offset}: not valid Python ({e.msg})") from None
    found = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            found = node
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        elif isinstance(node, ast.Import | ast.ImportFrom) and ast.unparse(node) in ALLOWED_TOP:
            continue  # np and math are provided; nothing is imported
    if found is None:
        raise HypothesisError(f"{path}: no function {function!r} at the top level")
    check_function(found, path)
    return found


def check_function(fn: ast.FunctionDef, path: str) -> None:
    args = fn.args
    if args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs or args.defaults:
        raise HypothesisError(f"{_where(fn, path)}: a hypothesis takes plain named parameters (no *args, defaults)")
    for d in fn.decorator_list:
        if not (isinstance(d, ast.Name) and d.id == "hypothesis"):
            raise HypothesisError(f"{_where(d, path)}: the only decorator allowed is @hypothesis")
    local = {a.arg for a in args.args}
    for node in (n for part in fn.body for n in ast.walk(part)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            local.add(node.id)
    allowed_text = (
        "arithmetic, comparisons, if/for/while, local names, np.<function> and math.<function> from an allow-list, "
        f"array methods ({', '.join(sorted(METHODS))}) and {', '.join(BUILTINS)}"
    )
    for node in (n for part in (*fn.body, fn.args) for n in ast.walk(part)):
        if isinstance(node, ast.FunctionDef):
            raise HypothesisError(f"{_where(node, path)}: nested functions are not allowed in a hypothesis")
        if isinstance(node, ast.expr_context | ast.operator | ast.unaryop | ast.boolop | ast.cmpop):
            continue
        if not isinstance(node, ALLOWED_NODES):
            raise HypothesisError(
                f"{_where(node, path)}: {type(node).__name__} is not allowed in a hypothesis; allowed: {allowed_text}"
            )
        if isinstance(node, ast.Constant) and not isinstance(node.value, int | float | bool | str | type(None)):
            raise HypothesisError(f"{_where(node, path)}: constant of type {type(node.value).__name__} not allowed")
        if isinstance(node, ast.Attribute):
            base = node.value
            if node.attr.startswith("_"):
                raise HypothesisError(f"{_where(node, path)}: attribute {node.attr!r} is not allowed (starts with _)")
            module = base.id if isinstance(base, ast.Name) and base.id in ("np", "math") else None
            allowed = {"np": NUMPY_FUNCTIONS, "math": MATH_FUNCTIONS, None: METHODS}[module]
            if node.attr not in allowed:
                what = f"{module}.{node.attr}" if module else f"attribute .{node.attr}"
                raise HypothesisError(
                    f"{_where(node, path)}: {what} is not allowed; allowed: {', '.join(sorted(allowed))}"
                )
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id not in local and node.id not in BUILTINS and node.id not in ("np", "math"):
                raise HypothesisError(
                    f"{_where(node, path)}: name {node.id!r} is not a parameter, a local, np, math or an allowed "
                    f"builtin ({', '.join(BUILTINS)})"
                )
        if isinstance(node, ast.Name) and node.id.startswith("__"):
            raise HypothesisError(f"{_where(node, path)}: name {node.id!r} is not allowed")


def function_source(source: str, function: str, path: str = "<hypothesis>") -> str:
    """The checked function's own source, without decorators: what the IR stores."""
    fn = check(source, function, path)
    fn = ast.FunctionDef(
        name=fn.name, args=fn.args, body=fn.body, decorator_list=[], returns=None, type_comment=None, type_params=[]
    )
    return ast.unparse(ast.fix_missing_locations(fn)) + "\n"


@lru_cache(maxsize=64)
def compiled(source: str, function: str) -> Callable[..., np.ndarray]:
    """`function` from `source`, checked, then compiled in a namespace holding only np, math and the allowed
    builtins."""
    fn = check(source, function, "<IR hypothesis>")
    namespace: dict = {"__builtins__": dict(BUILTINS), "np": np, "math": math}
    module = ast.Module(body=[fn], type_ignores=[])
    exec(compile(ast.fix_missing_locations(module), f"<hypothesis {function}>", "exec"), namespace)  # noqa: S102
    return namespace[function]


def params(source: str, function: str) -> list[str]:
    return [a.arg for a in check(source, function).args.args]


__all__ = ["HypothesisError", "check", "compiled", "function_source", "params"]
