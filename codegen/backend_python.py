"""The readable Python backend: one numpy function per model part, named values, shapes in comments, constants in a
sidecar `.npz` next to the module (small ones inline). The module needs numpy only, never acg.

    forward(tokens) -> logits          # tokens: int [batch, seq]
"""

from __future__ import annotations

import re

import libcst as cst
import numpy as np

from acg.codegen.cst_util import assign, comment_line, docstring, expr, function, literal, ruff_format, stmt
from acg.codegen.erf import NUMPY_SOURCE as NUMPY_ERF
from acg.codegen.escape import docstring_text
from acg.codegen.lowering import Block, Program, Step, inline_literal, plan, shape_comment
from acg.codegen.sidecar import npz_bytes
from acg.ir.graph import Graph

# numpy spellings of each op; {a0}, {a1} are the arguments, other fields are attributes as literals
TEMPLATES = {
    "embed": "{a0}[{a1}]",
    "pos_embed": "{a0}[: {a1}.shape[1]]",
    "add": "{a0} + {a1}",
    "sub": "{a0} - {a1}",
    "mul": "{a0} * {a1}",
    "div": "{a0} / {a1}",
    "maximum": "np.maximum({a0}, {a1})",
    "matmul": "{a0} @ {a1}",
    "norm": "_norm({a0}, eps={eps}, center={center})",
    "norm_scale": "_norm_scale({a0}, eps={eps}, center={center})",
    "relu": "np.maximum({a0}, 0.0)",
    "gelu": "_gelu({a0})",
    "gelu_tanh": "_gelu_tanh({a0})",
    "silu": "{a0} / (1.0 + np.exp(-{a0}))",
    "sigmoid": "1.0 / (1.0 + np.exp(-{a0}))",
    "tanh": "np.tanh({a0})",
    "exp": "np.exp({a0})",
    "neg": "-{a0}",
    "sqrt": "np.sqrt({a0})",
    "rsqrt": "1.0 / np.sqrt({a0})",
    "jumprelu": "np.where({a0} > {a1}, {a0}, 0.0)",
    "indicator": "({a0} == {value}).astype(np.{dtype})",
    "softmax": "_softmax({a0}, axis={axis})",
    "causal_mask": "_causal_mask({a0})",
    "key_mask": "_key_mask({a0}, {a1})",
    "sum": "{a0}.sum(axis={axis}, keepdims={keepdims})",
    "mean": "{a0}.mean(axis={axis}, keepdims={keepdims})",
    "transpose": "{a0}.transpose({perm})",
    "where": "np.where({a1}, {value}, {a0})",
}

HELPERS = {
    "erf": NUMPY_ERF,
    "gelu": """
def _gelu(x):
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)
""",
    "gelu_tanh": """
def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
""",
    "norm_scale": """
def _norm_scale(x, eps, center):
    if center:
        x = x - x.mean(-1, keepdims=True)
    return 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
""",
    "norm": """
def _norm(x, eps, center):
    centred = x - x.mean(-1, keepdims=True) if center else x
    return centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + eps)
""",
    "softmax": """
def _softmax(x, axis):
    m = x.max(axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / e.sum(axis, keepdims=True)
""",
    "causal_mask": """
def _causal_mask(scores):
    q, k = scores.shape[-2:]
    return np.where(np.triu(np.ones((q, k), dtype=bool), 1), -np.inf, scores).astype(scores.dtype)
""",
    "key_mask": """
def _key_mask(scores, mask):
    return np.where(mask[:, None, None, :] == 0, np.finfo(scores.dtype).min, scores).astype(scores.dtype)
""",
}
HELPER_DEPS = {"gelu": ("erf",)}
HYPOTHESIS_DECORATOR = """
def hypothesis(fn):
    \"\"\"Marks a hypothesis: a function written by hand that stands in for one part (acg import-code keeps it).\"\"\"
    return fn
"""


def hypothesis_defs(graph: Graph) -> list[cst.BaseCompoundStatement]:
    """The decorator and each hypothesis function the graph calls, checked again before it is written."""
    from acg.ir.hypothesis import function_source

    sources: dict[str, str] = {}
    for op in graph.ops:
        if op.kind == "hypothesis":
            name, source = op.attr("function"), function_source(op.attr("source"), op.attr("function"))
            if sources.setdefault(name, source) != source:
                raise NotImplementedError(f"python backend: two different hypotheses are both named {name!r}")
    if not sources:
        return []
    body = list(cst.parse_module(HYPOTHESIS_DECORATOR.lstrip("\n")).body)
    for source in sources.values():
        fn = cst.parse_module(source).body[0]
        body.append(fn.with_changes(decorators=[cst.Decorator(cst.Name("hypothesis"))]))
    return body


PRECEDENCE = {"add": 1, "sub": 1, "mul": 2, "div": 2, "matmul": 2, "neg": 3}


def _slot_context(template: str, slot: str) -> str:
    """How a template uses an argument: 'atom' (followed by . or [), 'left'/'right' operand, or 'arg' (free)."""
    i = template.find("{" + slot + "}")
    after = template[i + len(slot) + 2 :]
    if after[:1] in (".", "["):
        return "atom"
    if after.startswith(" ") and template.startswith("{" + slot + "}"):
        return "left"
    if i > 0 and template[i - 1] == " " and template[i - 2] in "+-*/@":
        return "right"
    if i > 0 and template[i - 1] == "-":
        return "atom"
    return "arg"


def _wrap(node: cst.BaseExpression, child_prec: int, context: str, parent_prec: int, parent: str) -> cst.BaseExpression:
    need = False
    if child_prec < 4:
        if context == "atom":
            need = True
        elif context == "left":
            need = child_prec < parent_prec
        elif context == "right":  # Python groups a + b + c as (a + b) + c: a right operand of equal rank keeps
            need = child_prec <= parent_prec  # its parentheses, so the code rounds exactly as the IR does
    return node.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()]) if need else node


def _spell(step: Step, inline: dict[str, tuple[cst.BaseExpression, int]] | None = None) -> cst.BaseExpression:
    """The expression for `step`; `inline` maps argument identifiers to (expression, precedence) to substitute."""
    inline = inline or {}
    template = TEMPLATES.get(step.kind, "")
    a = {}
    for i, x in enumerate(step.args):
        if x in inline:
            node, prec = inline[x]
            a[f"a{i}"] = _wrap(node, prec, _slot_context(template, f"a{i}"), PRECEDENCE.get(step.kind, 4), step.kind)
        else:
            a[f"a{i}"] = cst.Name(x)
    at = step.attrs
    if step.kind == "einsum":
        return cst.Call(
            cst.parse_expression("np.einsum"),
            [
                cst.Arg(literal(at["equation"])),
                *(cst.Arg(inline[x][0] if x in inline else cst.Name(x)) for x in step.args),
            ],
        )
    if step.kind == "reshape":
        dims = [cst.Element(cst.Name(d) if isinstance(d, str) else literal(d)) for d in at["shape"]]
        if step.args[0] in inline:
            a["a0"] = _wrap(*inline[step.args[0]][:1], inline[step.args[0]][1], "atom", 4, "reshape")
        return expr("{a0}.reshape({shape})", shape=cst.Tuple(dims), **a)
    if step.kind == "slice":
        index = [cst.SubscriptElement(cst.Slice(None, None))] * at["axis"] + [
            cst.SubscriptElement(cst.Slice(literal(at["start"]), literal(at["stop"])))
        ]
        x = step.args[0]
        return cst.Subscript(
            _wrap(inline[x][0], inline[x][1], "atom", 4, "slice") if x in inline else cst.Name(x), index
        )
    if step.kind == "concat":
        return cst.Call(
            cst.parse_expression("np.concatenate"),
            [
                cst.Arg(cst.Tuple([cst.Element(inline[x][0] if x in inline else cst.Name(x)) for x in step.args])),
                cst.Arg(literal(at["axis"]), keyword=cst.Name("axis")),
            ],
        )
    if step.kind == "stack":
        return cst.Call(
            cst.parse_expression("np.stack"),
            [
                cst.Arg(cst.Tuple([cst.Element(inline[x][0] if x in inline else cst.Name(x)) for x in step.args])),
                cst.Arg(literal(-1), keyword=cst.Name("axis")),
            ],
        )
    if step.kind == "hypothesis":  # a user's checked function (acg.ir.hypothesis), defined in the module
        args = [cst.Arg(inline[x][0] if x in inline else cst.Name(x)) for x in step.args]
        call = cst.Call(cst.Name(at["function"]), args)
        return expr("np.asarray({c}, dtype=np.{d})", c=call, d=cst.Name(at["dtype"]))
    template = TEMPLATES.get(step.kind)
    if template is None:
        raise NotImplementedError(f"python backend: no spelling for op kind {step.kind!r}")
    fields = {k: cst.Name(v) if k == "dtype" else literal(v) for k, v in at.items() if "{" + k + "}" in template}
    if "{keepdims}" in template and "keepdims" not in fields:
        fields["keepdims"] = literal(False)
    return expr(template, **a, **fields)


# An inlined arithmetic expression holds at most this many ops; a longer sum continues in the next statement (it
# stays readable, and deep expressions would exhaust the recursion of libcst and of Python's own parser).
MAX_INLINE_OPS = 48


def _block_fn(
    block: Block, single_use: set[str], scalars: dict, labels: dict | None = None, keep: set[str] = frozenset()
) -> cst.FunctionDef:
    body: list[cst.BaseStatement] = [
        docstring(f"{docstring_text(block.scope or 'top level')}: {len(block.steps)} ops.")
    ]
    inline: dict[str, tuple[cst.BaseExpression, int]] = dict(scalars)
    size: dict[str, int] = {}  # ops folded into each inlined expression: long sums are cut into statements
    labels = labels or {}
    for step in block.steps:
        node = _spell(step, inline)
        generic = re.fullmatch(rf"{step.kind}(_\d+)?", step.op.name) is not None  # unnamed by the front end
        if (
            generic
            and step.ident in single_use
            and step.ident not in block.results
            and step.ident not in labels
            and step.ident not in keep
        ):
            n_ops = 1 + sum(size.get(x, 0) for x in step.args)
            code = cst.Module([]).code_for_node(node)
            arithmetic = step.kind in ("add", "sub", "mul", "neg") and n_ops <= MAX_INLINE_OPS
            if arithmetic or (len(code) <= 90 and "\n" not in code):
                inline[step.ident] = (node, PRECEDENCE.get(step.kind, 4))
                size[step.ident] = n_ops
                continue
        comment = shape_comment(step.value)
        if step.op.name in labels:
            comment += f"  {labels[step.op.name]}"
        body.append(assign(step.ident, node, comment))
    results = [cst.Element(cst.Name(r)) for r in block.results]
    ret = results[0].value if len(results) == 1 else cst.Tuple(results)
    body.append(cst.SimpleStatementLine([cst.Return(ret)]))
    return function(block.ident, [*block.params, *block.symbols], body)


def _single_forward(program: Program, single_use: set[str], scalars: dict, labels: dict) -> cst.FunctionDef:
    """The whole program in one function, each model part under a comment line."""
    (tok, _), *rest = program.inputs
    body: list[cst.BaseStatement] = [
        docstring("Run the circuit: tokens int [batch, seq] -> " + ", ".join(program.outputs) + "."),
        stmt("{t} = np.asarray({t}, dtype=np.int64)", t=tok),
        stmt("batch, seq = {t}.shape", t=tok),
    ]
    outputs = set(program.outputs)
    for block in program.blocks:
        fn = _block_fn(block, single_use, scalars, labels, keep=outputs)
        stmts = list(fn.body.body[1:-1])  # drop the docstring and the return
        if stmts:
            stmts[0] = stmts[0].with_changes(leading_lines=[cst.EmptyLine(), comment_line(block.scope or "top")])
        body.extend(stmts)
    outs = [cst.Element(cst.Name(o)) for o in program.outputs]
    body.append(cst.SimpleStatementLine([cst.Return(outs[0].value if len(outs) == 1 else cst.Tuple(outs))]))
    return function("forward", [tok, *(n for n, _ in rest)], body)


def _forward(program: Program) -> cst.FunctionDef:
    (tok, tok_value), *rest = program.inputs
    body: list[cst.BaseStatement] = [
        docstring("Run the model: tokens int [batch, seq] -> " + ", ".join(program.outputs) + "."),
        stmt("{t} = np.asarray({t}, dtype=np.int64)", t=tok),
    ]
    if any(b.symbols for b in program.blocks):
        body.append(stmt("batch, seq = {t}.shape", t=tok))
    for name, _ in rest:
        body.append(stmt("{m} = np.asarray({m})", m=name))
    for block in program.blocks:
        call = cst.Call(cst.Name(block.ident), [cst.Arg(cst.Name(p)) for p in [*block.params, *block.symbols]])
        if not block.results:
            continue
        targets = (
            cst.Name(block.results[0])
            if len(block.results) == 1
            else cst.Tuple([cst.Element(cst.Name(r)) for r in block.results])
        )
        body.append(cst.SimpleStatementLine([cst.Assign([cst.AssignTarget(targets)], call)]))
    outs = [cst.Element(cst.Name(o)) for o in program.outputs]
    body.append(cst.SimpleStatementLine([cst.Return(outs[0].value if len(outs) == 1 else cst.Tuple(outs))]))
    params = [tok, *(n for n, _ in rest)]
    return function("forward", params, body)


def emit_source(graph: Graph, module_name: str = "model", title: str = "") -> tuple[str, dict[str, np.ndarray]]:
    """The module's source and the tensors for its sidecar `.npz` (keyed by identifier)."""
    return _emit(graph, plan(graph), module_name, title)


def _emit(graph: Graph, program: Program, module_name: str, title: str) -> tuple[str, dict[str, np.ndarray]]:
    kinds = {s.kind for b in program.blocks for s in b.steps}
    needed: list[str] = []
    for k in sorted(kinds & set(HELPERS)):
        for dep in (*HELPER_DEPS.get(k, ()), k):
            if dep not in needed:
                needed.append(dep)
    sidecar: dict[str, np.ndarray] = {}
    const_lines: list[cst.BaseStatement] = []
    uses: dict[str, int] = {}
    for b in program.blocks:
        for st in b.steps:
            for x in st.args:
                uses[x] = uses.get(x, 0) + 1
    single_use = {x for x, n in uses.items() if n == 1}
    scalars: dict[str, tuple[cst.BaseExpression, int]] = {}
    for c in program.consts:
        t = graph.tensors[c.tensor]
        if t.ndim == 0 and t.dtype.kind == "f":  # scalars are written where they are used
            value = float(t)
            scalars[c.ident] = (literal(value), 3 if value < 0 else 4)
            continue
        if inline_literal(t) and t.dtype.kind == "f":
            value = expr("np.array({v}, dtype=np.{d})", v=literal(t.tolist() if t.ndim else float(t)), d=str(t.dtype))
        else:
            sidecar[c.ident] = t
            value = expr("_W[{k}]", k=literal(c.ident))
        const_lines.append(assign(c.ident, value, f"{c.tensor}: {shape_comment_of(c)}"))
    header = docstring_text(title or graph.meta.get("title", "a model"))
    doc = (
        f"{header}\n\nGenerated by acg from the IR ({len(graph.ops)} ops, {graph.n_params:,} parameters). "
        f"Needs numpy only.\nRegenerate with `acg compile ... --backend python`; edit with care.\n"
    )
    body: list[cst.BaseStatement | cst.BaseCompoundStatement] = [
        docstring(doc),
        stmt("import math"),
        stmt("from pathlib import Path"),
        cst.SimpleStatementLine(
            [cst.Import([cst.ImportAlias(cst.Name("numpy"), asname=cst.AsName(cst.Name("np")))])],
            leading_lines=[cst.EmptyLine()],
        ),
    ]
    if sidecar:
        body.append(
            stmt("_W = np.load(Path(__file__).with_name({f}))", f=literal(f"{module_name}.npz")).with_changes(
                leading_lines=[cst.EmptyLine(), comment_line("constants (large ones from the sidecar)")]
            )
        )
    body.extend(const_lines)
    for h in needed:
        body.extend(cst.parse_module(HELPERS[h].lstrip("\n")).body)
    body.extend(hypothesis_defs(graph))
    labels = {k: v for k, v in graph.meta.get("labels", {}).items()}
    if graph.meta.get("family") == "acg-circuit":  # a circuit reads best as one function, top to bottom
        body.append(_single_forward(program, single_use, scalars, labels))
    else:
        body.extend(_block_fn(b, single_use, scalars, labels) for b in program.blocks)
        body.append(_forward(program))
    module = cst.Module(body=body)
    return ruff_format(module.code), sidecar


def shape_comment_of(c) -> str:
    return f"{c.dtype}[{', '.join(map(str, c.shape))}]"


def emit_files(graph: Graph, module_name: str = "model", title: str = "") -> dict[str, bytes]:
    """`<module_name>.py`, `<module_name>.map.json` (the IR's names, for `acg import-code`) and, when there are large
    constants, `<module_name>.npz`."""
    from acg.codegen.importer import source_map

    program = plan(graph)
    source, sidecar = _emit(graph, program, module_name, title)
    files = {f"{module_name}.py": source.encode(), f"{module_name}.map.json": source_map(graph, program.idents)}
    if sidecar:
        files[f"{module_name}.npz"] = npz_bytes(sidecar)
    return files
