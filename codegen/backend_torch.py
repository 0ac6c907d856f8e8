"""The torch backend: a standalone `nn.Module` source file (torch and safetensors only, never acg) plus its weights.
Float tensors become parameters, so the network can be fine-tuned like any other.

    Model()(tokens) -> logits          # torch tensors
    forward(tokens) -> logits          # numpy in, numpy out (the same signature as every backend)
"""

from __future__ import annotations

import libcst as cst
import numpy as np
from safetensors.numpy import save as st_save

from acg.codegen.cst_util import assign, docstring, expr, function, literal, ruff_format, stmt
from acg.codegen.escape import docstring_text
from acg.codegen.lowering import Program, Step, plan, shape_comment
from acg.codegen.names import RESERVED, NameTable
from acg.ir.errors import ACGError
from acg.ir.graph import Graph

TEMPLATES = {
    "embed": "{a0}[{a1}]",
    "pos_embed": "{a0}[: {a1}.shape[1]]",
    "add": "{a0} + {a1}",
    "sub": "{a0} - {a1}",
    "mul": "{a0} * {a1}",
    "div": "{a0} / {a1}",
    "maximum": "torch.maximum({a0}, {a1})",
    "matmul": "{a0} @ {a1}",
    "norm": "_norm({a0}, {eps}, {center})",
    "norm_scale": "_norm_scale({a0}, {eps}, {center})",
    "relu": "torch.relu({a0})",
    "gelu": "F.gelu({a0})",
    "gelu_tanh": 'F.gelu({a0}, approximate="tanh")',
    "silu": "F.silu({a0})",
    "sigmoid": "torch.sigmoid({a0})",
    "tanh": "torch.tanh({a0})",
    "exp": "torch.exp({a0})",
    "neg": "-{a0}",
    "sqrt": "torch.sqrt({a0})",
    "rsqrt": "torch.rsqrt({a0})",
    "jumprelu": "torch.where({a0} > {a1}, {a0}, torch.zeros_like({a0}))",
    "indicator": "({a0} == {value}).to(torch.{dtype})",
    "softmax": "torch.softmax({a0}, dim={axis})",
    "causal_mask": "_causal_mask({a0})",
    "key_mask": "_key_mask({a0}, {a1})",
    "sum": "{a0}.sum(dim={axis}, keepdim={keepdims})",
    "mean": "{a0}.mean(dim={axis}, keepdim={keepdims})",
    "transpose": "{a0}.permute({perm})",
    "where": "torch.where({a1}, torch.full_like({a0}, {value}), {a0})",
}

HELPERS = """
def _norm(x, eps, center):
    if center:
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _norm_scale(x, eps, center):
    if center:
        x = x - x.mean(-1, keepdim=True)
    return 1.0 / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _causal_mask(scores):
    q, k = scores.shape[-2:]
    future = torch.ones(q, k, dtype=torch.bool, device=scores.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def _key_mask(scores, mask):
    return scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
"""


class TorchBackendError(ACGError):
    pass


def _spell(step: Step, ref) -> cst.BaseExpression:
    a = {f"a{i}": ref(x) for i, x in enumerate(step.args)}
    at = step.attrs
    if step.kind == "einsum":
        return cst.Call(
            cst.parse_expression("torch.einsum"),
            [cst.Arg(literal(at["equation"])), *(cst.Arg(ref(x)) for x in step.args)],
        )
    if step.kind == "reshape":
        dims = [cst.Element(cst.Name(d) if isinstance(d, str) else literal(d)) for d in at["shape"]]
        return expr("{a0}.reshape({shape})", shape=cst.Tuple(dims), **a)
    if step.kind == "slice":
        return expr(
            "{a0}.narrow({axis}, {start}, {length})",
            axis=literal(at["axis"]),
            start=literal(at["start"]),
            length=literal(at["stop"] - at["start"]),
            **a,
        )
    if step.kind == "concat":
        return cst.Call(
            cst.parse_expression("torch.cat"),
            [
                cst.Arg(cst.Tuple([cst.Element(ref(x)) for x in step.args])),
                cst.Arg(literal(at["axis"]), keyword=cst.Name("dim")),
            ],
        )
    if step.kind == "stack":
        return cst.Call(
            cst.parse_expression("torch.stack"),
            [
                cst.Arg(cst.Tuple([cst.Element(ref(x)) for x in step.args])),
                cst.Arg(literal(-1), keyword=cst.Name("dim")),
            ],
        )
    template = TEMPLATES.get(step.kind)
    if step.kind == "hypothesis":
        raise TorchBackendError(
            f"torch backend: {step.ident} is a Python hypothesis ({at['function']}()), not torch ops; "
            "compile it with the python or numba backend"
        )
    if template is None:
        raise TorchBackendError(f"torch backend: no spelling for op kind {step.kind!r}")
    fields = {k: cst.Name(v) if k == "dtype" else literal(v) for k, v in at.items() if "{" + k + "}" in template}
    if "{keepdims}" in template and "keepdims" not in fields:
        fields["keepdims"] = literal(False)
    return expr(template, **a, **fields)


def emit_source(graph: Graph, module_name: str = "model", title: str = "") -> tuple[str, dict[str, np.ndarray]]:
    import torch

    names = NameTable(RESERVED | set(dir(torch.nn.Module)))
    program: Program = plan(graph, names)
    const_idents = {c.ident for c in program.consts}

    def ref(ident: str) -> cst.BaseExpression:
        return cst.parse_expression(f"self.{ident}") if ident in const_idents else cst.Name(ident)

    init: list[cst.BaseStatement] = [
        stmt("super().__init__()"),
        stmt("w = load_file(str(weights or Path(__file__).with_name({f})))", f=literal(f"{module_name}.safetensors")),
    ]
    for c in program.consts:
        kind = "nn.Parameter(w[{k}])" if np.dtype(c.dtype).kind == "f" else "w[{k}]"
        if np.dtype(c.dtype).kind == "f":
            init.append(
                stmt("self.{n} = " + kind, f"{c.tensor}: {c.dtype}{list(c.shape)}", n=c.ident, k=literal(c.ident))
            )
        else:
            init.append(stmt("self.register_buffer({s}, w[{k}])", s=literal(c.ident), k=literal(c.ident)))
    (tok, _), *rest = program.inputs
    body: list[cst.BaseStatement] = [docstring(f"tokens int [batch, seq] -> {', '.join(program.outputs)}.")]
    if any(b.symbols for b in program.blocks):
        body.append(stmt("batch, seq = {t}.shape", t=tok))
    for b in program.blocks:
        for s in b.steps:
            body.append(assign(s.ident, _spell(s, ref), shape_comment(s.value)))
    outs = [cst.Element(cst.Name(o)) for o in program.outputs]
    body.append(cst.SimpleStatementLine([cst.Return(outs[0].value if len(outs) == 1 else cst.Tuple(outs))]))
    params = ["self", tok, *(n for n, _ in rest)]
    init_fn = cst.FunctionDef(
        name=cst.Name("__init__"),
        params=cst.Parameters([cst.Param(cst.Name("self")), cst.Param(cst.Name("weights"), default=cst.Name("None"))]),
        body=cst.IndentedBlock(init),
    )
    fwd = function("forward", params, body).with_changes(leading_lines=[cst.EmptyLine()])
    cls = cst.ClassDef(
        name=cst.Name("Model"),
        bases=[cst.Arg(cst.parse_expression("nn.Module"))],
        body=cst.IndentedBlock([docstring(docstring_text(title or graph.meta.get("title", "a model"))), init_fn, fwd]),
        leading_lines=[cst.EmptyLine(), cst.EmptyLine()],
    )
    extra = "".join(f", {n}" for n, _ in rest)
    extra_conv = "".join(f", torch.as_tensor(np.asarray({n}))" for n, _ in rest)
    wrapper = (
        "_MODEL = None\n\n\n"
        f"def forward(tokens{extra}):\n"
        '    """numpy int [batch, seq] -> numpy logits, through `Model` (built on first use)."""\n'
        "    global _MODEL\n"
        "    if _MODEL is None:\n"
        "        _MODEL = Model().eval()\n"
        "    with torch.no_grad():\n"
        f"        out = _MODEL(torch.as_tensor(np.asarray(tokens, dtype=np.int64)){extra_conv})\n"
        "    return out.numpy()\n"
    )
    doc = (
        f"{docstring_text(title or graph.meta.get('title', 'a model'))}\n\nGenerated by acg from the IR "
        f"({len(graph.ops)} ops, {graph.n_params:,} parameters). Needs torch and safetensors only.\n"
    )
    header = cst.parse_module(
        "import math  # noqa: F401\nfrom pathlib import Path\n\nimport numpy as np\nimport torch\n"
        "import torch.nn.functional as F  # noqa: F401\nfrom safetensors.torch import load_file\nfrom torch import nn\n"
    )
    module = cst.Module(
        body=[
            docstring(doc),
            *header.body,
            *cst.parse_module(HELPERS).body,
            cls,
            *cst.parse_module("\n\n" + wrapper).body,
        ]
    )
    weights = {c.ident: graph.tensors[c.tensor] for c in program.consts}
    return ruff_format(module.code), weights


def emit_files(graph: Graph, module_name: str = "model", title: str = "") -> dict[str, bytes]:
    source, weights = emit_source(graph, module_name, title)
    tensors = {k: np.asarray(v, order="C") for k, v in sorted(weights.items())}
    return {f"{module_name}.py": source.encode(), f"{module_name}.safetensors": st_save(tensors)}
