"""The ONNX backend: one `model.onnx` (opset 17) that onnxruntime runs, with dynamic `batch` and `seq` dims.

inputs: tokens int64 [batch, seq] (and any other graph input); outputs: as the IR names them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from acg.codegen.erf import ERFC_CHEB
from acg.ir.errors import ACGError
from acg.ir.graph import Graph, Op

OPSET = 17
_DTYPE = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
}
_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "neg": "Neg", "sqrt": "Sqrt"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "maximum": "Max", "matmul": "MatMul"}


class OnnxBackendError(ACGError):
    pass


class _Emitter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.dtype = {v.name: v.dtype for v in graph.values.values()}
        self._n = 0
        self._dims: dict[str, str] = {}  # symbolic dim -> 1-element int64 tensor holding its size

    def tmp(self, hint: str) -> str:
        self._n += 1
        return f"_{hint}_{self._n}"

    def node(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self.tmp(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{len(self.nodes)}", **attrs))
        return out

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.tmp(hint)
        self.inits[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def scalar(self, value: float, like: str) -> str:
        return self.const(np.array(value, dtype=np.float64 if self.dtype[like] == "float64" else np.float32))

    def dim(self, symbol: str) -> str:
        """A [1] int64 tensor with the runtime size of a symbolic dim (taken from the graph's first input)."""
        if symbol not in self._dims:
            first = self.graph.inputs[0]
            axis = list(first.shape).index(symbol)
            shape = self.node("Shape", [first.name])
            self._dims[symbol] = self.node(
                "Slice", [shape, self.const(np.array([axis])), self.const(np.array([axis + 1]))]
            )
        return self._dims[symbol]

    def shape_tensor(self, dims: tuple) -> str:
        parts = [self.dim(d) if isinstance(d, str) else self.const(np.array([d], dtype=np.int64)) for d in dims]
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, axis=0)

    def norm(self, x: str, op: Op, scale_only: bool) -> str:
        if op.attr("center"):
            x = self.node("Sub", [x, self.node("ReduceMean", [x], axes=[-1], keepdims=1)])
        ms = self.node("ReduceMean", [self.node("Mul", [x, x])], axes=[-1], keepdims=1)
        root = self.node("Sqrt", [self.node("Add", [ms, self.scalar(op.attr("eps"), op.inputs[0])])])
        if scale_only:
            return self.node("Reciprocal", [root])
        return self.node("Div", [x, root])

    def emit(self, op: Op) -> None:
        k, ins, out = op.kind, list(op.inputs), op.name
        if k == "const":
            t = self.graph.tensors[op.attr("tensor")]
            self.inits[out] = numpy_helper.from_array(np.asarray(t, order="C"), out)
        elif k in _BINARY:
            self.node(_BINARY[k], ins, out)
        elif k in _UNARY:
            self.node(_UNARY[k], ins, out)
        elif k == "rsqrt":
            self.node("Reciprocal", [self.node("Sqrt", ins)], out)
        elif k == "silu":
            self.node("Mul", [ins[0], self.node("Sigmoid", ins)], out)
        elif k == "gelu":
            x = ins[0]
            erf = self.erf(self.node("Div", [x, self.scalar(np.sqrt(2.0), x)]), x)
            self.node(
                "Mul", [self.node("Mul", [x, self.scalar(0.5, x)]), self.node("Add", [erf, self.scalar(1.0, x)])], out
            )
        elif k == "gelu_tanh":
            x = ins[0]
            cube = self.node("Mul", [self.node("Mul", [x, x]), x])
            inner = self.node("Add", [x, self.node("Mul", [cube, self.scalar(0.044715, x)])])
            t = self.node("Tanh", [self.node("Mul", [inner, self.scalar(np.sqrt(2.0 / np.pi), x)])])
            self.node(
                "Mul", [self.node("Mul", [x, self.scalar(0.5, x)]), self.node("Add", [t, self.scalar(1.0, x)])], out
            )
        elif k == "jumprelu":
            zero = self.scalar(0.0, ins[0])
            self.node("Where", [self.node("Greater", ins), ins[0], zero], out)
        elif k == "indicator":
            eq = self.node("Equal", [ins[0], self.const(np.array(op.attr("value"), dtype=np.int64))])
            self.node("Cast", [eq], out, to=_DTYPE[op.attr("dtype")])
        elif k == "embed":
            self.node("Gather", ins, out, axis=0)
        elif k == "pos_embed":
            self.node(
                "Slice", [ins[0], self.const(np.array([0])), self.dim_of(ins[1], 1), self.const(np.array([0]))], out
            )
        elif k == "einsum":
            self.node("Einsum", ins, out, equation=op.attr("equation"))
        elif k == "norm":
            self.node("Identity", [self.norm(ins[0], op, scale_only=False)], out)
        elif k == "norm_scale":
            self.node("Identity", [self.norm(ins[0], op, scale_only=True)], out)
        elif k == "softmax":
            self.node("Softmax", ins, out, axis=op.attr("axis"))
        elif k == "causal_mask":
            shape = self.node("Shape", ins)
            qk = self.node("Slice", [shape, self.const(np.array([-2])), self.const(np.array([2**62]))])
            ones = self.node("ConstantOfShape", [qk], value=numpy_helper.from_array(np.array([1], dtype=np.int64)))
            future = self.node(
                "Cast", [self.node("Trilu", [ones, self.const(np.array(1))], upper=1)], to=TensorProto.BOOL
            )
            self.node("Where", [future, self.scalar(-np.inf, ins[0]), ins[0]], out)
        elif k == "key_mask":
            low = np.finfo(np.float64 if self.dtype[ins[0]] == "float64" else np.float32).min
            zero = self.const(np.array(0, dtype=np.int64))
            masked = self.node("Equal", [self.node("Cast", [ins[1]], to=TensorProto.INT64), zero])
            masked = self.node("Unsqueeze", [masked, self.const(np.array([1, 2]))])
            self.node("Where", [masked, self.scalar(low, ins[0]), ins[0]], out)
        elif k in ("sum", "mean"):
            keep = int(bool(op.attr("keepdims", False)))
            if k == "sum":
                self.node("ReduceSum", [ins[0], self.const(np.array([op.attr("axis")]))], out, keepdims=keep)
            else:
                self.node("ReduceMean", ins, out, axes=[op.attr("axis")], keepdims=keep)
        elif k == "reshape":
            self.node("Reshape", [ins[0], self.shape_tensor(op.attr("shape"))], out)
        elif k == "transpose":
            self.node("Transpose", ins, out, perm=list(op.attr("perm")))
        elif k == "slice":
            self.node(
                "Slice",
                [
                    ins[0],
                    self.const(np.array([op.attr("start")])),
                    self.const(np.array([op.attr("stop")])),
                    self.const(np.array([op.attr("axis")])),
                ],
                out,
            )
        elif k == "concat":
            self.node("Concat", ins, out, axis=op.attr("axis"))
        elif k == "stack":
            axis = self.const(np.array([len(self.graph.values[ins[0]].shape)]))
            self.node("Concat", [self.node("Unsqueeze", [x, axis]) for x in ins], out, axis=-1)
        elif k == "where":
            self.node("Where", [ins[1], self.scalar(op.attr("value"), ins[0]), ins[0]], out)
        elif k == "hypothesis":
            raise OnnxBackendError(
                f"onnx backend: op {op.name!r} is a Python hypothesis ({op.attr('function')}()), which ONNX cannot "
                "hold; compile it with the python or numba backend"
            )
        else:
            raise OnnxBackendError(f"onnx backend: no mapping for op kind {k!r} (op {op.name!r})")

    def erf(self, x: str, like: str) -> str:
        """ONNX Runtime has no double-precision Erf: in float64, spell it from exp and a Chebyshev series."""
        if self.dtype[like] != "float64":
            return self.node("Erf", [x])
        one, two = self.scalar(1.0, like), self.scalar(2.0, like)
        z = self.node("Abs", [x])
        t = self.node("Div", [two, self.node("Add", [z, two])])
        u2 = self.node("Mul", [self.node("Sub", [self.node("Mul", [t, two]), one]), two])
        b1, b2 = self.scalar(0.0, like), self.scalar(0.0, like)
        for c in ERFC_CHEB[:0:-1]:  # Clenshaw's recurrence
            step = self.node("Sub", [self.node("Mul", [u2, b1]), b2])
            b1, b2 = self.node("Add", [step, self.scalar(c, like)]), b1
        half = self.node("Mul", [self.node("Mul", [u2, b1]), self.scalar(0.5, like)])
        series = self.node("Sub", [self.node("Add", [half, self.scalar(ERFC_CHEB[0], like)]), b2])
        erfc = self.node("Mul", [t, self.node("Exp", [self.node("Sub", [series, self.node("Mul", [z, z])])])])
        return self.node("Mul", [self.node("Sign", [x]), self.node("Sub", [one, erfc])])

    def dim_of(self, value: str, axis: int) -> str:
        shape = self.node("Shape", [value])
        return self.node("Slice", [shape, self.const(np.array([axis])), self.const(np.array([axis + 1]))])


def to_onnx(graph: Graph, title: str = "") -> onnx.ModelProto:
    em = _Emitter(graph)
    for op in graph.ops:
        em.emit(op)
    values = graph.values

    def info(name: str) -> onnx.ValueInfoProto:
        v = values[name]
        return helper.make_tensor_value_info(name, _DTYPE[v.dtype], [d if isinstance(d, int) else d for d in v.shape])

    g = helper.make_graph(
        em.nodes,
        "acg",
        [info(v.name) for v in graph.inputs],
        [info(o) for o in graph.outputs],
        initializer=[em.inits[k] for k in sorted(em.inits)],
    )
    model = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="acg",
        doc_string=str(title or graph.meta.get("title", "")),
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def emit_files(graph: Graph, module_name: str = "model", title: str = "") -> dict[str, bytes]:
    return {f"{module_name}.onnx": to_onnx(graph, title).SerializeToString(deterministic=True)}
