"""The Numba backend: a plain-Python `forward` calling `@njit` kernels op by op (numpy for elementwise ops, which are
compiled already). Einsums are first lowered to matmuls by IR passes.

The kernels' source is embedded in each module; at import it is written once, under its content hash, to a shared
cache folder (`$ACG_NUMBA_DIR`, default `~/.cache/acg/numba`) and imported from there, so Numba's on-disk cache
compiles each kernel once per machine rather than once per artefact.

    forward(tokens) -> logits          # tokens: int [batch, seq]
"""

from __future__ import annotations

import libcst as cst

from acg.codegen.cst_util import assign, docstring, expr, function, literal, ruff_format, stmt
from acg.codegen.escape import comment_text, docstring_text
from acg.codegen.lowering import Program, Step, plan, shape_comment
from acg.codegen.sidecar import npz_bytes
from acg.ir.errors import ACGError
from acg.ir.graph import Graph
from acg.ir.passes import run_pipeline

PIPELINE = ("fuse-heads", "lower-einsum", "dce")

KERNELS = '''import math

import numba
import numpy as np


@numba.njit(cache=True)
def _embed(table, ids):
    batch, seq = ids.shape
    out = np.empty((batch, seq, table.shape[1]), dtype=table.dtype)
    for b in range(batch):
        for s in range(seq):
            out[b, s] = table[ids[b, s]]
    return out


@numba.njit(cache=True)
def _rows(x):
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


@numba.njit(cache=True)
def _norm(x, eps, center):
    rows = _rows(x)
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        v = rows[r]
        if center:
            v = v - v.mean()
        out[r] = v / np.sqrt((v * v).mean() + eps)
    return out.reshape(x.shape)


@numba.njit(cache=True)
def _norm_scale(x, eps, center):
    rows = _rows(x)
    out = np.empty((rows.shape[0], 1), dtype=x.dtype)
    for r in range(rows.shape[0]):
        v = rows[r]
        if center:
            v = v - v.mean()
        out[r, 0] = 1.0 / np.sqrt((v * v).mean() + eps)
    return out.reshape(x.shape[:-1] + (1,))


@numba.njit(cache=True)
def _softmax_last(x):
    rows = _rows(x)
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        v = rows[r]
        m = v.max()
        if not np.isfinite(m):
            m = 0.0
        e = np.exp(v - m)
        out[r] = e / e.sum()
    return out.reshape(x.shape)


@numba.njit(cache=True)
def _causal_mask(x):
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-2], x.shape[-1]).copy()
    for r in range(rows.shape[0]):
        for q in range(rows.shape[1]):
            for k in range(q + 1, rows.shape[2]):
                rows[r, q, k] = -np.inf
    return rows.reshape(x.shape)


@numba.njit(cache=True)
def _key_mask(x, mask):
    out = x.copy()
    low = np.finfo(x.dtype).min
    for b in range(x.shape[0]):
        for k in range(x.shape[3]):
            if mask[b, k] == 0:
                out[b, :, :, k] = low
    return out


@numba.njit(cache=True)
def _gelu(x):
    flat = np.ascontiguousarray(x).ravel()
    out = np.empty_like(flat)
    for i in range(flat.shape[0]):
        v = flat[i]
        out[i] = 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))
    return out.reshape(x.shape)


@numba.njit(cache=True)
def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@numba.njit(cache=True)
def _mm2(a, b):
    """a [..., k] @ b [k, n]: one BLAS call on the flattened rows."""
    rows = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
    out = np.dot(rows, np.ascontiguousarray(b))
    return out.reshape(a.shape[:-1] + (b.shape[1],))


@numba.njit(cache=True)
def _bmm4(a, b):
    """Batched matmul over two broadcast batch axes: a [A0, A1, m, k] @ b [B0, B1, k, n]."""
    n0 = max(a.shape[0], b.shape[0])
    n1 = max(a.shape[1], b.shape[1])
    out = np.empty((n0, n1, a.shape[2], b.shape[3]), dtype=a.dtype)
    for i in range(n0):
        for j in range(n1):
            x = np.ascontiguousarray(a[i if a.shape[0] > 1 else 0, j if a.shape[1] > 1 else 0])
            y = np.ascontiguousarray(b[i if b.shape[0] > 1 else 0, j if b.shape[1] > 1 else 0])
            out[i, j] = np.dot(x, y)
    return out
'''


KERNEL_NAMES = (
    "_embed",
    "_norm",
    "_norm_scale",
    "_softmax_last",
    "_causal_mask",
    "_key_mask",
    "_gelu",
    "_gelu_tanh",
    "_mm2",
    "_bmm4",
)

LOADER = '''def _load_kernels():
    """Import the kernels from a shared cache folder, keyed by their source's hash (written once, atomically)."""
    root = Path(os.environ.get("ACG_NUMBA_DIR", Path.home() / ".cache" / "acg" / "numba"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "acg-numba"
        root.mkdir(parents=True, exist_ok=True)
    name = "acg_kernels_" + hashlib.sha256(_KERNELS_SOURCE.encode()).hexdigest()[:16]
    path = root / (name + ".py")
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(_KERNELS_SOURCE)
        os.replace(tmp, path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Numba's on-disk cache finds the kernels' module by name
    spec.loader.exec_module(module)
    return module'''


class NumbaBackendError(ACGError):
    pass


def _as4(name: str, rank: int) -> cst.BaseExpression:
    """`x` of rank <= 4 reshaped to rank 4 by prepending axes of size 1."""
    if rank == 4:
        return cst.Name(name)
    pad = ", ".join(["1"] * (4 - rank))
    dims = ", ".join(f"{name}.shape[{i}]" for i in range(rank))
    return cst.parse_expression(f"np.ascontiguousarray({name}).reshape(({pad}, {dims}))")


def _spell(step: Step, ranks: dict[str, int]) -> cst.BaseExpression:
    a = {f"a{i}": x for i, x in enumerate(step.args)}
    at = step.attrs
    k = step.kind
    simple = {
        "add": "{a0} + {a1}",
        "sub": "{a0} - {a1}",
        "mul": "{a0} * {a1}",
        "div": "{a0} / {a1}",
        "maximum": "np.maximum({a0}, {a1})",
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
        "embed": "_embed({a0}, {a1})",
        "pos_embed": "{a0}[: {a1}.shape[1]]",
        "causal_mask": "_causal_mask({a0})",
        "key_mask": "_key_mask({a0}, {a1})",
    }
    if k in simple:
        return expr(simple[k], **a)
    if k == "indicator":
        return expr("({a0} == {v}).astype(np.{d})", v=literal(at["value"]), d=cst.Name(at["dtype"]), **a)
    if k in ("norm", "norm_scale"):
        return expr(
            f"_{k}({{a0}}, {{eps}}, {{center}})", eps=literal(float(at["eps"])), center=literal(at["center"]), **a
        )
    if k == "softmax":
        if at["axis"] != ranks[step.args[0]] - 1:
            raise NumbaBackendError(f"numba backend: softmax over axis {at['axis']} (only the last axis is supported)")
        return expr("_softmax_last({a0})", **a)
    if k == "matmul":
        ra, rb = ranks[step.args[0]], ranks[step.args[1]]
        if rb == 2:
            return expr("_mm2({a0}, {a1})", **a)
        if max(ra, rb) > 4:
            raise NumbaBackendError("numba backend: matmul of rank > 4 is not supported")
        out_rank = len(step.value.shape)
        mm = cst.Call(cst.Name("_bmm4"), [cst.Arg(_as4(step.args[0], ra)), cst.Arg(_as4(step.args[1], rb))])
        if out_rank == 4:
            return mm
        return cst.Call(
            cst.Attribute(mm, cst.Name("reshape")),
            [
                cst.Arg(
                    cst.parse_expression(
                        "("
                        + ", ".join(f"{step.ident}_r[{i}]" for i in range(out_rank))
                        + ("," if out_rank == 1 else "")
                        + ")"
                    )
                )
            ],
        )
    if k == "reshape":
        dims = [cst.Element(cst.Name(d) if isinstance(d, str) else literal(d)) for d in at["shape"]]
        return expr("np.ascontiguousarray({a0}).reshape({shape})", shape=cst.Tuple(dims), **a)
    if k == "transpose":
        return expr("np.transpose({a0}, {perm})", perm=literal(at["perm"]), **a)
    if k in ("sum", "mean"):
        axis = at["axis"]
        body = expr("np.sum({a0}, axis={axis})", axis=literal(axis), **a)
        if k == "mean":
            body = expr("{s} / {a0}.shape[{axis}]", s=body, axis=literal(axis), **a)
        if at.get("keepdims"):
            dims = [
                cst.Element(cst.parse_expression(f"{step.args[0]}.shape[{i}]") if i != axis else literal(1))
                for i in range(ranks[step.args[0]])
            ]
            body = cst.Call(
                cst.Attribute(
                    cst.Call(cst.parse_expression("np.ascontiguousarray"), [cst.Arg(body)]), cst.Name("reshape")
                ),
                [cst.Arg(cst.Tuple(dims))],
            )
        return body
    if k == "slice":
        index = [cst.SubscriptElement(cst.Slice(None, None))] * at["axis"] + [
            cst.SubscriptElement(cst.Slice(literal(at["start"]), literal(at["stop"])))
        ]
        return cst.Subscript(cst.Name(step.args[0]), index)
    if k == "concat":
        return cst.Call(
            cst.parse_expression("np.concatenate"),
            [
                cst.Arg(cst.Tuple([cst.Element(cst.Name(x)) for x in step.args])),
                cst.Arg(literal(at["axis"]), keyword=cst.Name("axis")),
            ],
        )
    if k == "stack":
        return cst.Call(
            cst.parse_expression("np.stack"),
            [
                cst.Arg(cst.Tuple([cst.Element(cst.Name(x)) for x in step.args])),
                cst.Arg(literal(len(step.value.shape) - 1), keyword=cst.Name("axis")),
            ],
        )
    if k == "where":
        return expr("np.where({a1}, {v}, {a0})", v=literal(float(at["value"])), **a)
    if k == "hypothesis":
        call = cst.Call(cst.Name(at["function"]), [cst.Arg(cst.Name(x)) for x in step.args])
        return expr("np.asarray({c}, dtype=np.{d})", c=call, d=cst.Name(at["dtype"]))
    if k == "einsum":
        raise NumbaBackendError(
            f"numba backend: einsum {at['equation']!r} could not be lowered to matmuls "
            "(several contracted indices); supported: two-operand einsums with one contracted index"
        )
    raise NumbaBackendError(f"numba backend: no kernel for op kind {k!r}")


def hypotheses(graph: Graph) -> str:
    """Each hypothesis the graph calls, as `@numba.njit` functions; compiled here once for the input types it will
    get, so that one Numba cannot compile is refused now, with Numba's reason, rather than at the first call."""
    import numba

    from acg.ir.hypothesis import compiled, function_source

    values = graph.values
    out, seen = [], {}
    for op in graph.ops:
        if op.kind != "hypothesis" or op.attr("function") in seen:
            continue
        name, source = op.attr("function"), function_source(op.attr("source"), op.attr("function"))
        seen[name] = source
        types = []
        for x in op.inputs:
            v = values[x]
            base = {"int64": numba.int64, "float32": numba.float32, "float64": numba.float64, "bool": numba.boolean}
            types.append(numba.types.Array(base[v.dtype], len(v.shape), "A"))
        try:
            numba.njit(tuple(types))(compiled(op.attr("source"), name))
        except Exception as e:  # numba's typing errors are many classes; the message is what matters
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NumbaBackendError(
                f"numba backend: hypothesis {name}() is not Numba-compilable ({first}); run it with the python "
                "backend or the interpreter"
            ) from None
        out.append(f"@numba.njit(cache=False)\n{source}")
    return ("\n\n".join(out) + "\n") if out else ""


def emit_source(graph: Graph, module_name: str = "model", title: str = "") -> tuple[str, dict]:
    """Source of a module whose `forward` is plain Python calling njit kernels op by op (numpy for elementwise ops,
    which are compiled already): each kernel compiles once per signature and is cached on disk, so compile time stays
    small whatever the model's size."""
    graph, _ = run_pipeline(graph, PIPELINE)
    program: Program = plan(graph)
    rank = {ident: len(v.shape) for ident, v in program.inputs}
    rank.update((c.ident, len(c.shape)) for c in program.consts)
    for b in program.blocks:
        rank.update((s.ident, len(s.value.shape)) for s in b.steps)
    (tok, _), *rest = program.inputs
    body: list[cst.BaseStatement] = [
        docstring(f"Run the model: tokens int [batch, seq] -> {', '.join(program.outputs)}."),
        stmt("{t} = np.ascontiguousarray({t}, dtype=np.int64)", t=tok),
        stmt("batch, seq = {t}.shape", t=tok),
    ]
    body += [stmt("{m} = np.ascontiguousarray({m})", m=n) for n, _ in rest]
    for b in program.blocks:
        for s in b.steps:
            if s.kind == "matmul" and len(s.value.shape) != 4 and rank[s.args[1]] != 2:
                dims = [cst.Element(cst.Name(d) if isinstance(d, str) else literal(d)) for d in s.value.shape]
                body.append(assign(f"{s.ident}_r", cst.Tuple(dims)))
            body.append(assign(s.ident, _spell(s, rank), shape_comment(s.value)))
    outs = [cst.Element(cst.Name(o)) for o in program.outputs]
    body.append(cst.SimpleStatementLine([cst.Return(outs[0].value if len(outs) == 1 else cst.Tuple(outs))]))
    forward = function("forward", [tok, *(n for n, _ in rest)], body)
    sidecar = {c.ident: graph.tensors[c.tensor] for c in program.consts}
    consts = "".join(
        f"{c.ident} = np.ascontiguousarray(_W[{c.ident!r}])  # {comment_text(c.tensor)}\n" for c in program.consts
    )
    doc = (
        f"{docstring_text(title or graph.meta.get('title', 'a model'))}\n\nGenerated by acg from the IR "
        f"({len(graph.ops)} ops, {graph.n_params:,} parameters): numpy driving Numba kernels cached on disk.\n"
    )
    forward_code = cst.Module([forward]).code
    hyps = hypotheses(graph)
    used = sorted(k for k in KERNEL_NAMES if f"{k}(" in forward_code)
    assert "'''" not in KERNELS and "\\" not in KERNELS  # embedded verbatim in a triple-quoted string
    header = cst.parse_module(
        "import hashlib\nimport importlib.util\nimport os\nimport sys\nimport tempfile\nfrom pathlib import Path\n\n"
        "import numpy as np\n\n"
        f"_KERNELS_SOURCE = '''{KERNELS}'''\n\n\n{LOADER}\n\n"
        f"_k = _load_kernels()\n"
        + "".join(f"{k} = _k.{k}\n" for k in used)
        + f"_W = np.load(Path(__file__).with_name({module_name + '.npz'!r}))\n{consts}"
        + (f"\n\nimport math\n\nimport numba\n\n\n{hyps}" if hyps else "")
    )
    module = cst.Module(body=[docstring(doc), *header.body, forward])
    return ruff_format(module.code), sidecar


def emit_files(graph: Graph, module_name: str = "model", title: str = "") -> dict[str, bytes]:
    source, sidecar = emit_source(graph, module_name, title)
    return {f"{module_name}.py": source.encode(), f"{module_name}.npz": npz_bytes(sidecar)}
