"""Import readable Python back into the IR: the inverse of the python backend, so that generated code can be edited
by hand (a weight changed, a term removed or added, an activation replaced, a feature deleted, a part replaced by a
hypothesis function) and become a model again.

The module is parsed with libcst and never executed. Every statement must be one the backend writes: the fixed
imports, the sidecar load, constants (`_W[...]` or a small `np.array(...)`), the backend's helper functions
unchanged, and in `forward` (and the per-part functions it calls) assignments whose expressions are spellings of IR
ops -- the backend's own templates, matched structurally (whitespace and redundant parentheses do not matter). A
function decorated `@hypothesis` is an opaque hypothesis: its body is checked by `acg.ir.hypothesis` (no imports, no
files, no dunders) and stored in a `hypothesis` op. Anything else is refused with the file, line and column and what
is allowed.

Names: the backend writes `model.map.json` beside the module (the IR's op names, scopes, tensor names and meta, and
the identifier each value got). With it, every reconstructed op is aligned with the op it came from, so importing an
unchanged module gives the same IR, byte for byte, and an edit shows as exactly the ops it touched. Numbers come from
the code and the sidecar only, never from the map. Without a map the IR is still built, with names from the
identifiers.

Deleting a feature's line deletes the feature: every later read of it reads `zeros` (its write to the residual
stream and its terms in later sums become 0), and the report lists it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libcst as cst
import numpy as np
from libcst.metadata import MetadataWrapper, PositionProvider

from acg.codegen.backend_python import HELPERS, HYPOTHESIS_DECORATOR, TEMPLATES
from acg.codegen.erf import NUMPY_SOURCE as NUMPY_ERF
from acg.ir.errors import ACGError
from acg.ir.graph import Graph, IRError, Op, Value, freeze_attrs
from acg.ir.hypothesis import HypothesisError, function_source
from acg.ir.ops import infer
from acg.ir.serialize import _from_json, graph_to_dict
from acg.ir.verify import verify

MAP_SCHEMA = "acg.codemap"
MAP_VERSION = 1
ALLOWED_IMPORTS = ("import math", "from pathlib import Path", "import numpy as np")
ALLOWED_TEXT = (
    "the imports the backend writes (math, pathlib.Path, numpy as np), the sidecar load, constants, the backend's "
    "helper functions unchanged, functions marked @hypothesis, and in forward (or the functions it calls) "
    "assignments `name = <expression>` built from the spellings of IR ops (+ - * / @, np.maximum, np.where, "
    "np.stack, np.einsum, .reshape, .sum, _softmax, _norm_scale, ...), names defined above, and number literals"
)


class CodeImportError(ACGError):
    pass


def source_map(graph: Graph, idents: dict[str, str]) -> bytes:
    """What the importer needs besides the code: the IR's names, scopes, attributes and meta (no tensor data but the
    values of small tensors, for the edit report), and each value's identifier in the code."""
    small = {
        name: np.asarray(t).tolist() for name, t in sorted(graph.tensors.items()) if t.size <= 8 and t.dtype.kind == "f"
    }
    doc = {
        "schema": MAP_SCHEMA,
        "version": MAP_VERSION,
        "graph": graph_to_dict(graph),
        "idents": idents,
        "small": small,
    }
    return (json.dumps(doc, indent=None, sort_keys=True, separators=(",", ":")) + "\n").encode()


# ------------------------------------------------------------------------------------------------ structural match

_SKIP = {"lpar", "rpar", "comma", "equal", "semicolon", "colon", "dot", "lbracket", "rbracket", "lbrace", "rbrace"}


def _same(p: Any, n: Any, binds: dict[str, cst.CSTNode] | None) -> bool:
    """Does node `n` have the shape of pattern `p`? Names `__x` in the pattern bind subtrees (`binds`; a second
    occurrence must equal the first); whitespace, commas and parentheses are ignored."""
    if binds is not None and isinstance(p, cst.Name) and p.value.startswith("__"):
        key = p.value[2:]
        if key in binds:
            return _same(binds[key], n, None)
        binds[key] = n
        return True
    if type(p) is not type(n) and not (isinstance(p, list | tuple) and isinstance(n, list | tuple)):
        return False
    if isinstance(p, cst.SimpleString):
        return p.evaluated_value == n.evaluated_value
    if isinstance(p, list | tuple) and isinstance(n, list | tuple):
        return len(p) == len(n) and all(_same(a, b, binds) for a, b in zip(p, n, strict=True))
    if not isinstance(p, cst.CSTNode):
        return p == n
    for f in dataclasses.fields(p):
        if f.name in _SKIP or f.name.startswith("whitespace"):
            continue
        a, b = getattr(p, f.name), getattr(n, f.name)
        if isinstance(a, cst.CSTNode | list | tuple) or isinstance(b, cst.CSTNode | list | tuple):
            if isinstance(a, cst.MaybeSentinel) or isinstance(b, cst.MaybeSentinel):
                if type(a) is not type(b):
                    return False
                continue
            if not _same(a, b, binds):
                return False
        elif not isinstance(a, cst.MaybeSentinel) and a != b:
            return False
    return True


def _pattern(template: str) -> cst.BaseExpression:
    return cst.parse_expression(re.sub(r"\{(\w+)\}", r"__\1", template))


# Most specific spellings first: silu/sigmoid/rsqrt are divisions, relu a maximum, jumprelu a where, pos_embed a
# subscript, neg a unary minus (number literals are recognised before any of these).
_ORDER = ["silu", "sigmoid", "rsqrt", "relu", "jumprelu", "pos_embed", "indicator"]
PATTERNS = [(k, _pattern(TEMPLATES[k])) for k in _ORDER] + [
    (k, _pattern(t)) for k, t in TEMPLATES.items() if k not in _ORDER
]
_HELPER_NAMES = {f"_{k}": k for k in HELPERS}


def _literal(node: cst.CSTNode) -> Any:
    """The Python value of a literal node (numbers, True/False/None, tuples, math.inf/nan), or raise ValueError."""
    if isinstance(node, cst.Name) and node.value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[node.value]
    if isinstance(node, cst.Attribute) and isinstance(node.value, cst.Name) and node.value.value == "math":
        if node.attr.value in ("inf", "nan"):
            return float(node.attr.value)
    if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
        v = _literal(node.expression)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return -v
    if isinstance(node, cst.Integer | cst.Float):
        return ast.literal_eval(node.value)
    if isinstance(node, cst.SimpleString):
        return node.evaluated_value
    if isinstance(node, cst.Tuple | cst.List):
        return tuple(_literal(e.value) for e in node.elements)
    raise ValueError("not a literal")


def _number(node: cst.CSTNode) -> float | None:
    try:
        v = _literal(node)
    except ValueError:
        return None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


# ------------------------------------------------------------------------------------------------------ drafts


@dataclass
class Draft:
    """One op rebuilt from the code, before names are settled."""

    kind: str
    inputs: list[int]
    attrs: dict[str, Any]
    scope: str
    line: int
    col: int
    array: np.ndarray | None = None  # const ops
    tensor: str | None = None
    ident: str | None = None  # the identifier a statement assigned it to
    statement: str | None = None  # the identifier of the statement it is part of
    literal: bool = False  # a number written inline


@dataclass
class Report:
    path: str
    mapped: bool
    deleted: list[str] = field(default_factory=list)
    hypotheses: list[str] = field(default_factory=list)
    changes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Importer:
    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        try:
            module = cst.parse_module(self.text)
        except cst.ParserSyntaxError as e:
            raise CodeImportError(f"{path}:{e.raw_line}:{e.raw_column + 1}: not valid Python ({e.message})") from None
        self.wrapper = MetadataWrapper(module)
        self.module = self.wrapper.module
        self.pos = self.wrapper.resolve(PositionProvider)
        self.map = self._read_map()
        self.drafts: list[Draft] = []
        self.consts: dict[str, int] = {}  # module-level identifier -> draft
        self.functions: dict[str, cst.FunctionDef] = {}
        self.hypotheses: dict[str, str] = {}  # name -> checked source
        self.sidecar: dict[str, np.ndarray] | None = None
        self.inputs: list[Value] = []
        self.outputs: list[int] = []
        self.deleted: list[str] = []
        self.scope = ""
        graph = self.map["graph"] if self.map else None
        self.base_ops = {o["name"]: o for o in graph["ops"]} if graph else {}
        self.base_index = {o["name"]: i for i, o in enumerate(graph["ops"])} if graph else {}
        self.by_ident = {ident: name for name, ident in (self.map or {}).get("idents", {}).items()}
        self.float_dtype = self._float_dtype()

    # ----------------------------------------------------------------------------------------------- errors, map

    def where(self, node: cst.CSTNode) -> str:
        p = self.pos[node].start
        return f"{self.path}:{p.line}:{p.column + 1}"

    def fail(self, node: cst.CSTNode, msg: str) -> CodeImportError:
        return CodeImportError(f"{self.where(node)}: {msg}")

    def _read_map(self) -> dict | None:
        file = self.path.with_suffix(".map.json")
        if not file.exists():
            return None
        try:
            doc = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CodeImportError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("schema") != MAP_SCHEMA:
            raise CodeImportError(f"{file}: not an acg source map (field 'schema' should be {MAP_SCHEMA!r})")
        if doc.get("version") != MAP_VERSION:
            raise CodeImportError(f"{file}: source map version {doc.get('version')!r} is not supported ({MAP_VERSION})")
        return doc

    def _float_dtype(self) -> str:
        if self.map:
            kinds = [o["dtype"] for o in self.map["graph"]["ops"] if o["dtype"] in ("float32", "float64")]
            if kinds:
                return max(set(kinds), key=kinds.count)
        return "float32"

    # -------------------------------------------------------------------------------------------------- module

    def run(self) -> tuple[Graph, Report]:
        body = list(self.module.body)
        if body and _is_docstring(body[0]):
            body = body[1:]
        forward = None
        for st in body:
            if isinstance(st, cst.FunctionDef):
                if any(_decorator_name(d) == "hypothesis" for d in st.decorators):
                    self._hypothesis_def(st)
                elif st.name.value in _HELPER_NAMES or st.name.value in ("_erf", "hypothesis"):
                    self._helper(st)
                elif st.name.value == "forward":
                    forward = st
                else:
                    self._block_def(st)
                continue
            if not isinstance(st, cst.SimpleStatementLine) or len(st.body) != 1:
                raise self.fail(st, f"this statement is not one the python backend writes; allowed: {ALLOWED_TEXT}")
            small = st.body[0]
            code = self.module.code_for_node(small).strip()
            if isinstance(small, cst.Import | cst.ImportFrom):
                if code not in ALLOWED_IMPORTS:
                    raise self.fail(
                        st, f"import refused: `{code}`; the only imports allowed: {', '.join(ALLOWED_IMPORTS)}"
                    )
                continue
            if isinstance(small, cst.Assign):
                self._module_assign(st, small)
                continue
            raise self.fail(st, f"this statement is not one the python backend writes; allowed: {ALLOWED_TEXT}")
        if forward is None:
            raise CodeImportError(f"{self.path}: no `forward` function")
        self._forward(forward)
        return self._graph()

    def _helper(self, fn: cst.FunctionDef) -> None:
        name = fn.name.value
        text = {"_erf": NUMPY_ERF, "hypothesis": HYPOTHESIS_DECORATOR}.get(name) or HELPERS[_HELPER_NAMES[name]]
        want = [s for s in cst.parse_module(text.lstrip("\n")).body if isinstance(s, cst.FunctionDef)]
        want = [s for s in want if s.name.value == name]
        if not want or not _same(want[0].with_changes(leading_lines=[]), fn.with_changes(leading_lines=[]), None):
            raise self.fail(
                fn,
                f"helper {name} was changed; helpers are the backend's own (edit the formulas in forward, or write "
                "your version as a function marked @hypothesis)",
            )

    def _hypothesis_def(self, fn: cst.FunctionDef) -> None:
        line = self.pos[fn].start.line
        # check the function alone, at its own line numbers, so that errors point into this file
        source = "\n" * (line - 1) + self.module.code_for_node(fn.with_changes(leading_lines=[]))
        try:
            self.hypotheses[fn.name.value] = function_source(source, fn.name.value, str(self.path))
        except HypothesisError as e:
            raise CodeImportError(str(e)) from None

    def _block_def(self, fn: cst.FunctionDef) -> None:
        if fn.decorators:
            raise self.fail(fn, "decorators are not allowed here (only @hypothesis marks a hypothesis)")
        self.functions[fn.name.value] = fn

    def _module_assign(self, line: cst.SimpleStatementLine, node: cst.Assign) -> None:
        if len(node.targets) != 1 or not isinstance(node.targets[0].target, cst.Name):
            raise self.fail(node, "constants must be assigned to one name")
        ident = node.targets[0].target.value
        value = node.value
        binds: dict = {}
        if ident == "_ERFC_CHEB":  # the erf helper's table, which must be the backend's own
            want = cst.parse_module(NUMPY_ERF.lstrip("\n")).body[0].body[0]
            if not _same(want, node, None):
                raise self.fail(node, "the erf helper's table _ERFC_CHEB was changed; helpers are the backend's own")
            return
        if ident == "_W":
            if not _same(_pattern("np.load(Path(__file__).with_name({f}))"), value, binds):
                raise self.fail(node, "_W must be `np.load(Path(__file__).with_name('<module>.npz'))`")
            self._load_sidecar(node, _literal(binds["f"]) if isinstance(binds["f"], cst.SimpleString) else None)
            return
        comment = line.trailing_whitespace.comment.value if line.trailing_whitespace.comment else ""
        tensor = self._base_tensor(ident) or (re.match(r"#\s*([\w.]+):", comment) or [None, ident])[1]
        if _same(_pattern("_W[{k}]"), value, binds) and isinstance(binds["k"], cst.SimpleString):
            key = binds["k"].evaluated_value
            if self.sidecar is None or key not in self.sidecar:
                raise self.fail(node, f"the sidecar has no array {key!r}")
            array = self.sidecar[key]
        elif _same(_pattern("np.array({v}, dtype=np.{d})"), value, binds):
            try:
                array = np.asarray(_literal(binds["v"]), dtype=binds["d"].value)
            except (ValueError, TypeError, AttributeError):
                raise self.fail(node, "np.array(...) takes number literals and a numpy float dtype") from None
        else:
            raise self.fail(
                node, f"a module-level constant must be _W[<key>] or np.array(<numbers>, dtype=...); {ALLOWED_TEXT}"
            )
        p = self.pos[node].start
        self.consts[ident] = self._add(
            Draft("const", [], {}, "", p.line, p.column + 1, array=array, tensor=tensor, ident=ident)
        )

    def _base_tensor(self, ident: str) -> str | None:
        name = self.by_ident.get(ident)
        op = self.base_ops.get(name) if name else None
        return op["attrs"]["tensor"] if op and op["kind"] == "const" else None

    def _load_sidecar(self, node: cst.CSTNode, name: str | None) -> None:
        if not name or os.path.basename(name) != name or name.startswith(".") or not name.endswith(".npz"):
            raise self.fail(
                node, f"the sidecar must be a plain file name ending in .npz beside the module, got {name!r}"
            )
        file = self.path.with_name(name)
        try:
            with np.load(file, allow_pickle=False) as z:
                self.sidecar = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise CodeImportError(f"{file}: missing (the module's sidecar of large constants)") from None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise CodeImportError(f"{file}: not a readable .npz of arrays ({e})") from None

    # ------------------------------------------------------------------------------------------------- forward

    def _forward(self, fn: cst.FunctionDef) -> None:
        env: dict[str, int] = dict(self.consts)
        params = [p.name.value for p in fn.params.params]
        base_inputs = {v["name"]: v for v in (self.map["graph"]["inputs"] if self.map else [])}
        idents = (self.map or {}).get("idents", {})
        for p in params:
            name = next((n for n, i in idents.items() if i == p and n in base_inputs), None)
            spec = base_inputs.get(name) if name else None
            if spec is None and p == "tokens":
                spec = {"name": "tokens", "shape": ["batch", "seq"], "dtype": "int64"}
            if spec is None:
                raise self.fail(fn, f"forward parameter {p!r} is not an input of the IR this code came from")
            v = Value(spec["name"], tuple(spec["shape"]), spec["dtype"])
            self.inputs.append(v)
            env[p] = self._add(Draft("input", [], {"value": v}, "", 0, 0, ident=p))
        self._body(fn, env, top=True)

    def _body(self, fn: cst.FunctionDef, env: dict[str, int], top: bool) -> list[int]:
        stmts = list(fn.body.body)
        if stmts and _is_docstring(stmts[0]):
            if not top:
                doc = stmts[0].body[0].value.evaluated_value
                self.scope = doc.split(":")[0] if doc.split(":")[0] != "top level" else ""
            stmts = stmts[1:]
        for st in stmts:
            for line in getattr(st, "leading_lines", ()):
                if top and line.comment is not None:
                    text = line.comment.value[1:].strip()
                    self.scope = "" if text == "top" else text
            if not isinstance(st, cst.SimpleStatementLine) or len(st.body) != 1:
                raise self.fail(
                    st, f"control flow is not allowed outside a @hypothesis function; allowed: {ALLOWED_TEXT}"
                )
            small = st.body[0]
            code = self.module.code_for_node(small).strip()
            if top and code in ("tokens = np.asarray(tokens, dtype=np.int64)", "batch, seq = tokens.shape"):
                continue
            if top and re.fullmatch(r"(\w+) = np\.asarray\(\1\)", code) and code.split(" ")[0] in env:
                continue
            if isinstance(small, cst.Return):
                vals = [e.value for e in small.value.elements] if isinstance(small.value, cst.Tuple) else [small.value]
                out = [self._expr(v, env, None) for v in vals]
                if top:
                    self.outputs = out
                return out
            if not isinstance(small, cst.Assign) or len(small.targets) != 1:
                raise self.fail(st, f"only `name = <expression>` statements are allowed here; {ALLOWED_TEXT}")
            target = small.targets[0].target
            value = small.value
            if isinstance(value, cst.Call) and isinstance(value.func, cst.Name) and value.func.value in self.functions:
                results = self._call_block(value, env)
                names = [e.value for e in target.elements] if isinstance(target, cst.Tuple) else [target]
                if len(names) != len(results):
                    raise self.fail(st, f"{value.func.value} returns {len(results)} values, {len(names)} assigned")
                for t, r in zip(names, results, strict=True):
                    if not isinstance(t, cst.Name):
                        raise self.fail(st, "assign results to plain names")
                    env[t.value] = r  # the function's own statement named it
                continue
            if not isinstance(target, cst.Name):
                raise self.fail(st, "assign to one plain name")
            ident = target.value
            if ident in ("np", "math", "Path", "_W", "batch", "seq") or ident in self.functions:
                raise self.fail(st, f"{ident!r} is a reserved name here")
            env[ident] = self._name(self._expr(value, env, ident), ident)
        return []

    def _name(self, d: int, ident: str) -> int:
        """Give draft `d` the statement name `ident` (or an identity reshape-free alias if it already has one)."""
        draft = self.drafts[d]
        if draft.ident is None and draft.kind not in ("input",) and not draft.literal:
            draft.ident = ident
            return d
        raise CodeImportError(
            f"{self.path}:{draft.line}: `{ident} = ...` only renames another value; write the expression or use the "
            "other name"
        )

    def _call_block(self, call: cst.Call, env: dict[str, int]) -> list[int]:
        fn = self.functions[call.func.value]
        params = [p.name.value for p in fn.params.params]
        args = [a.value for a in call.args]
        if len(args) != len(params) or any(not isinstance(a.value, cst.Name) or a.keyword for a in call.args):
            raise self.fail(call, f"{fn.name.value}() takes {len(params)} names")
        local = dict(self.consts)
        for p, a in zip(params, args, strict=True):
            if a.value in ("batch", "seq"):
                continue
            if a.value not in env:
                raise self.fail(a, f"name {a.value!r} is not defined")
            local[p] = env[a.value]
        saved = self.scope
        out = self._body(fn, local, top=False)
        self.scope = saved
        return out

    # ---------------------------------------------------------------------------------------------- expressions

    def _add(self, draft: Draft) -> int:
        self.drafts.append(draft)
        return len(self.drafts) - 1

    def _op(self, node: cst.CSTNode, kind: str, inputs: list[int], stmt: str | None, **attrs: Any) -> int:
        p = self.pos[node].start
        return self._add(Draft(kind, inputs, attrs, self.scope, p.line, p.column + 1, statement=stmt))

    def _expr(self, node: cst.BaseExpression, env: dict[str, int], stmt: str | None) -> int:
        v = _number(node)
        if v is not None:
            p = self.pos[node].start
            array = np.asarray(v, dtype=self.float_dtype)
            return self._add(
                Draft("const", [], {}, self.scope, p.line, p.column + 1, array=array, statement=stmt, literal=True)
            )
        if isinstance(node, cst.Name):
            return self._read(node, env)
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value in self.hypotheses:
            return self._call_hypothesis(node, env, stmt, self.float_dtype)
        binds: dict[str, cst.CSTNode] = {}
        if _same(_pattern("np.asarray({c}, dtype=np.{d})"), node, binds):  # how the backend writes a hypothesis
            call = binds["c"]
            if isinstance(call, cst.Call) and isinstance(call.func, cst.Name) and call.func.value in self.hypotheses:
                if binds["d"].value not in ("float32", "float64"):
                    raise self.fail(node, "a hypothesis's value is float32 or float64")
                return self._call_hypothesis(call, env, stmt, binds["d"].value)
        special = self._special(node, env, stmt)
        if special is not None:
            return special
        for kind, pattern in PATTERNS:
            binds: dict[str, cst.CSTNode] = {}
            if not _same(pattern, node, binds):
                continue
            args = sorted(k for k in binds if re.fullmatch(r"a\d", k))
            attrs = {}
            for k, b in binds.items():
                if k in args:
                    continue
                if k == "dtype":
                    attrs[k] = b.value
                    continue
                try:
                    attrs[k] = _literal(b)
                except ValueError:
                    raise self.fail(b, f"{kind}: attribute {k} must be a literal") from None
            inputs = [self._expr(binds[a], env, stmt) for a in args]
            return self._op(node, kind, inputs, stmt, **attrs)
        code = self.module.code_for_node(node)
        if len(code) > 80:
            code = code[:77] + "..."
        raise self.fail(node, f"cannot map `{code}` to IR ops; allowed: {ALLOWED_TEXT}")

    def _read(self, node: cst.Name, env: dict[str, int]) -> int:
        name = node.value
        if name in env:
            return env[name]
        base = self.by_ident.get(name)
        op = self.base_ops.get(base) if base else None
        if op is not None and op["kind"] != "const" and op["shape"] == ["batch", "seq"] and "zeros" in env:
            if name not in self.deleted:
                self.deleted.append(name)
            return env["zeros"]
        raise self.fail(node, f"name {name!r} is not defined above")

    def _call_hypothesis(self, node: cst.Call, env: dict[str, int], stmt: str | None, dtype: str) -> int:
        fname = node.func.value
        if any(a.keyword or a.star for a in node.args):
            raise self.fail(node, f"call {fname}() with plain names, in the order of its parameters")
        inputs = [self._expr(a.value, env, stmt) for a in node.args]
        tail = ()
        name = self.by_ident.get(stmt or "")
        if name in self.base_ops:
            tail = tuple(self.base_ops[name]["shape"][2:])
        return self._op(
            node,
            "hypothesis",
            inputs,
            stmt,
            source=self.hypotheses[fname],
            function=fname,
            dtype=dtype,
            tail=tail,
        )

    def _special(self, node: cst.BaseExpression, env: dict[str, int], stmt: str | None) -> int | None:
        """The spellings with a variable shape: reshape, slice, stack, concatenate, einsum."""
        binds: dict[str, cst.CSTNode] = {}
        if _same(_pattern("{a0}.reshape({shape})"), node, binds):
            shape_node = binds["shape"]
            if not isinstance(shape_node, cst.Tuple):
                raise self.fail(node, "reshape takes a tuple of ints, batch and seq")
            dims: list[Any] = []
            for e in shape_node.elements:
                if isinstance(e.value, cst.Name) and e.value.value in ("batch", "seq"):
                    dims.append(e.value.value)
                else:
                    n = _number(e.value)
                    if n is None or n != int(n):
                        raise self.fail(e.value, "reshape dims are ints, batch or seq")
                    dims.append(int(n))
            return self._op(node, "reshape", [self._expr(binds["a0"], env, stmt)], stmt, shape=tuple(dims))
        if isinstance(node, cst.Subscript) and len(node.slice) >= 1:
            parts = [e.slice for e in node.slice]
            if all(isinstance(p, cst.Slice) for p in parts) and all(
                p.lower is None and p.upper is None and p.step is None for p in parts[:-1]
            ):
                last = parts[-1]
                lo, hi = (_number(last.lower) if last.lower else None), (_number(last.upper) if last.upper else None)
                if lo is not None and hi is not None and last.step is None:
                    x = self._expr(node.value, env, stmt)
                    return self._op(node, "slice", [x], stmt, axis=len(parts) - 1, start=int(lo), stop=int(hi))
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute):
            f = self.module.code_for_node(node.func)
            if f in ("np.stack", "np.concatenate") and len(node.args) == 2 and node.args[1].keyword:
                items = node.args[0].value
                axis = _literal(node.args[1].value)
                if not isinstance(items, cst.Tuple | cst.List) or node.args[1].keyword.value != "axis":
                    raise self.fail(node, f"{f}((a, b, ...), axis=k)")
                inputs = [self._expr(e.value, env, stmt) for e in items.elements]
                if f == "np.stack":
                    if axis != -1:
                        raise self.fail(node, "np.stack is supported along axis=-1 (a new last axis)")
                    return self._op(node, "stack", inputs, stmt)
                return self._op(node, "concat", inputs, stmt, axis=axis)
            if f == "np.einsum" and node.args and isinstance(node.args[0].value, cst.SimpleString):
                eq = node.args[0].value.evaluated_value
                inputs = [self._expr(a.value, env, stmt) for a in node.args[1:]]
                return self._op(node, "einsum", inputs, stmt, equation=eq)
        return None

    # ----------------------------------------------------------------------------------------------- the graph

    def _graph(self) -> tuple[Graph, Report]:
        names = self._settle_names()
        order = self._order(names)
        tensors: dict[str, np.ndarray] = {}
        const_op: dict[str, str] = {}
        values: dict[str, Value] = {v.name: v for v in self.inputs}
        ops: list[Op] = []
        done: dict[str, str] = {}  # settled name -> the op that defines it (merged duplicates of one const)
        for d in order:
            draft = self.drafts[d]
            name = names[d]
            if name in done:
                continue
            base = self.base_ops.get(name)
            aligned = base is not None and base["kind"] == draft.kind
            scope = base.get("scope", "") if aligned else draft.scope
            if draft.kind == "const":
                if draft.tensor in tensors and not np.array_equal(tensors[draft.tensor], draft.array):
                    raise CodeImportError(f"{self.path}:{draft.line}: tensor {draft.tensor!r} given two values")
                tensors[draft.tensor] = np.array(draft.array, order="C")
                const_op[draft.tensor] = name
                out = Value(name, tuple(draft.array.shape), str(draft.array.dtype))
                op = Op("const", (), out, freeze_attrs({"tensor": draft.tensor}), scope)
            else:
                inputs = tuple(names[i] for i in draft.inputs)
                attrs = freeze_attrs(draft.attrs)
                if aligned:
                    theirs = freeze_attrs({k: _from_json(v) for k, v in base.get("attrs", {}).items()})
                    if _with_defaults(theirs) == _with_defaults(attrs):
                        attrs = theirs  # the same attributes, spelt as the IR had them (defaults left implicit)
                probe = Op(draft.kind, inputs, Value("?", ()), attrs, scope)
                try:
                    shape, dtype = infer(probe, [values[i] for i in inputs])
                except IRError as e:
                    raise CodeImportError(f"{self.path}:{draft.line}:{draft.col}: {e}") from None
                op = Op(draft.kind, inputs, Value(name, shape, dtype), probe.attrs, draft.scope)
            ops.append(op)
            values[name] = op.output
            done[name] = name
        outputs = tuple(names[d] for d in self.outputs)
        meta = (
            dict(self.map["graph"]["meta"]) if self.map else {"title": self.path.stem, "imported_from": self.path.name}
        )
        graph = Graph(tuple(self.inputs), tuple(ops), outputs, tensors, meta)
        report = Report(str(self.path), self.map is not None, list(self.deleted), sorted(self.hypotheses))
        if self.map:
            report.changes = changes(self.map, graph)
            if any(report.changes.values()) or self.deleted:
                graph = graph.replace(meta={**meta, "edited": _edit_summary(report)})
        try:
            verify(graph)
        except IRError as e:
            raise CodeImportError(f"{self.path}: the imported program is not a valid IR: {e}") from None
        return graph, report

    def _settle_names(self) -> dict[int, str]:
        """Each draft's IR name: statement targets by their identifier's IR name, the ops inlined in a statement by
        aligning them with the base op tree of that statement, everything else fresh."""
        names: dict[int, str] = {}
        taken: set[str] = set()
        never = set(self.base_ops)  # fresh names never reuse a name the base had: a new op reads as new
        counters: dict[str, int] = {}
        for i, d in enumerate(self.drafts):
            if d.kind == "input":
                names[i] = d.attrs["value"].name
                taken.add(names[i])
        for i, d in enumerate(self.drafts):
            if d.ident is not None and d.kind != "input":
                base = self.by_ident.get(d.ident)
                if base and base not in taken:
                    names[i] = base
                    taken.add(base)
        self._leaves = set(names.values())  # values the code names: statement targets, inputs, constants
        for i, d in enumerate(self.drafts):
            if i in names and d.kind != "input" and d.ident is not None and names[i] in self.base_ops:
                self._match_subtrees(i, names[i], names, taken)
                self._align(i, names[i], names, taken)
        for i, d in enumerate(self.drafts):
            if d.kind == "const" and d.tensor is None:
                d.tensor = f"scalar.{float(d.array)!r}" if d.array.ndim == 0 else f"const.{i}"
        # one const op per tensor (the builder shares them): new literals join an op with the same tensor
        by_tensor: dict[str, str] = {}
        for i, d in enumerate(self.drafts):
            if d.kind == "const" and i in names:
                by_tensor.setdefault(d.tensor, names[i])
        for i, d in enumerate(self.drafts):
            if i in names:
                continue
            if d.kind == "const" and d.tensor in by_tensor:
                names[i] = by_tensor[d.tensor]
                continue
            if d.kind == "const" and d.array.ndim == 0:  # a new number equal to a base constant shares it
                same = self._base_scalar(d.array)
                if same is not None:
                    names[i], d.tensor = same
                    by_tensor.setdefault(d.tensor, names[i])
                    continue
            hint = d.ident or ("c" if d.kind == "const" else d.kind)
            names[i] = _fresh(hint, taken, never, counters)
            if d.kind == "const":
                by_tensor[d.tensor] = names[i]
        return names

    def _base_scalar(self, value: np.ndarray) -> tuple[str, str] | None:
        """(const op, tensor) of a 0-d base constant holding `value`, if any."""
        if not hasattr(self, "_scalars"):
            self._scalars: dict[tuple[str, float], tuple[str, str]] = {}
            small = (self.map or {}).get("small", {})
            for o in self.base_ops.values():
                t = o.get("attrs", {}).get("tensor") if o["kind"] == "const" else None
                if t in small and o["shape"] == []:
                    self._scalars.setdefault((o["dtype"], float(np.asarray(small[t], o["dtype"]))), (o["name"], t))
        return self._scalars.get((str(value.dtype), float(value)))

    def _signature(self, d: int, names: dict[int, str], memo: dict[int, str]) -> str:
        """What a draft computes, as text: named values by name, numbers by value, ops by kind and attributes."""
        if d in memo:
            return memo[d]
        draft = self.drafts[d]
        if draft.kind == "const" and draft.literal:
            sig = f"c:{float(draft.array)!r}"
        elif d in names and (draft.ident is not None or draft.kind in ("input", "const")):
            sig = f"n:{names[d]}"
        else:
            args = ",".join(self._signature(i, names, memo) for i in draft.inputs)
            sig = f"{draft.kind}{sorted(_with_defaults(freeze_attrs(draft.attrs)).items())}({args})"
        memo[d] = sig
        return sig

    def _base_signature(self, name: str, memo: dict[str, str], top: bool = True) -> str:
        if name in memo:
            return memo[name]
        op = self.base_ops.get(name)
        if op is None or (not top and name in self._leaves and op["kind"] != "const"):
            sig = f"n:{name}"
        elif op["kind"] == "const":
            small = self.map.get("small", {})
            t = op["attrs"]["tensor"]
            sig = f"c:{float(np.asarray(small[t], op['dtype']))!r}" if t in small and op["shape"] == [] else f"n:{name}"
        else:
            attrs = _with_defaults(freeze_attrs({k: _from_json(v) for k, v in op.get("attrs", {}).items()}))
            args = ",".join(self._base_signature(i, memo, False) for i in op["inputs"])
            sig = f"{op['kind']}{sorted(attrs.items())}({args})"
        memo[name] = sig
        return sig

    def _match_subtrees(self, d: int, base: str, names: dict[int, str], taken: set[str]) -> None:
        """Name the unchanged parts of an edited statement: an inlined op computing exactly what an inlined base op
        of the same statement computed takes its name (so adding one term shows as one new term)."""
        memo_b: dict[str, str] = {}
        by_sig: dict[str, list[str]] = {}

        def collect(name: str, top: bool) -> None:
            op = self.base_ops.get(name)
            if op is None or op["kind"] == "const" or (not top and name in self._leaves):
                return
            by_sig.setdefault(self._base_signature(name, memo_b, top), []).append(name)
            for i in op["inputs"]:
                collect(i, False)

        collect(base, True)
        memo_d: dict[int, str] = {}

        def visit(i: int, top: bool) -> None:
            draft = self.drafts[i]
            if i in names and not top:
                return
            if not top and draft.kind != "const":
                free = [b for b in by_sig.get(self._signature(i, names, memo_d), []) if b not in taken]
                if free:
                    names[i] = free[0]
                    taken.add(free[0])
                    self._align(i, free[0], names, taken)
                    return
            for j in draft.inputs:
                visit(j, False)

        visit(d, True)

    def _align(self, d: int, base: str, names: dict[int, str], taken: set[str]) -> None:
        """Name the ops inlined below draft `d` after the base op tree below `base`, where kind and arity agree."""
        draft, op = self.drafts[d], self.base_ops[base]
        if draft.kind != op["kind"] or len(draft.inputs) != len(op["inputs"]):
            return
        for di, bi in zip(draft.inputs, op["inputs"], strict=True):
            sub = self.drafts[di]
            if di in names or bi not in self.base_ops:  # named already: a statement target, an input, a constant
                continue
            if sub.kind == "const":
                self._align_const(di, bi, names, taken)
            elif bi not in taken:
                names[di] = bi
                taken.add(bi)
                self._align(di, bi, names, taken)

    def _align_const(self, d: int, base: str, names: dict[int, str], taken: set[str]) -> None:
        """An inline number keeps its base constant (shared ones included) if its value is unchanged."""
        draft, op = self.drafts[d], self.base_ops[base]
        if op["kind"] != "const":
            return
        tensor = op["attrs"]["tensor"]
        old = (self.map or {}).get("small", {}).get(tensor)
        if old is None or not np.array_equal(np.asarray(old, dtype=op["dtype"]), draft.array.astype(op["dtype"])):
            return  # an edited number becomes a new constant
        draft.array = draft.array.astype(op["dtype"])
        draft.tensor = tensor
        names[d] = base
        taken.add(base)

    def _order(self, names: dict[int, str]) -> list[int]:
        """A topological order that follows the base IR's order wherever ops come from it; new ops go just before
        their first reader."""
        n = len(self.drafts)
        key: list[float] = [float("inf")] * n
        for i in range(n):
            if self.drafts[i].kind == "input":
                key[i] = -1.0
            elif names[i] in self.base_index:
                key[i] = float(self.base_index[names[i]])
        readers: dict[int, list[int]] = {i: [] for i in range(n)}
        for i, d in enumerate(self.drafts):
            for j in d.inputs:
                readers[j].append(i)
        for i in reversed(range(n)):  # drafts are created before their readers: one backward sweep settles keys
            if key[i] == float("inf") and readers[i]:
                key[i] = min(key[r] for r in readers[i]) - 0.5
        order, placed = [], set()
        import heapq

        deps = {i: set(self.drafts[i].inputs) for i in range(n)}
        waiting = {i: len(deps[i]) for i in range(n)}
        heap = [(key[i], i) for i in range(n) if waiting[i] == 0]
        heapq.heapify(heap)
        while heap:
            _, i = heapq.heappop(heap)
            if i in placed:
                continue
            placed.add(i)
            if self.drafts[i].kind != "input":
                order.append(i)
            for r in set(readers[i]):
                waiting[r] -= 1
                if waiting[r] == 0:
                    heapq.heappush(heap, (key[r], r))
        return order


def _with_defaults(attrs: tuple) -> dict:
    return {"keepdims": False, **dict(attrs)}


def _fresh(hint: str, taken: set[str], never: set[str] = frozenset(), counters: dict | None = None) -> str:
    """A name from `hint` in neither set (added to `taken`); `counters` resumes each hint's search where it stopped."""
    base = re.sub(r"[^0-9a-zA-Z_]+", "_", hint).strip("_") or "v"
    counters = {} if counters is None else counters
    n = counters.get(base, 1)
    name = base if n == 1 else f"{base}_{n}"
    while name in taken or name in never:
        n += 1
        name = f"{base}_{n}"
    counters[base] = n
    taken.add(name)
    return name


def _is_docstring(st: cst.CSTNode) -> bool:
    return (
        isinstance(st, cst.SimpleStatementLine)
        and len(st.body) == 1
        and isinstance(st.body[0], cst.Expr)
        and isinstance(st.body[0].value, cst.SimpleString | cst.ConcatenatedString)
    )


def _decorator_name(d: cst.Decorator) -> str | None:
    return d.decorator.value if isinstance(d.decorator, cst.Name) else None


# ---------------------------------------------------------------------------------------------------- changes


def changes(source: dict, graph: Graph) -> dict[str, Any]:
    """What differs between the IR a module was generated from (its source map) and `graph`: ops added, removed or
    changed (kind, inputs or attributes), and tensors whose values changed (where the map holds them)."""
    base = {o["name"]: o for o in source["graph"]["ops"]}
    now = graph_to_dict(graph)
    mine = {o["name"]: o for o in now["ops"]}
    changed = []
    for name in base.keys() & mine.keys():
        a, b = base[name], mine[name]
        fields = [
            k for k in ("kind", "inputs", "attrs", "shape", "dtype") if _from_json(a.get(k)) != _from_json(b.get(k))
        ]
        if fields:
            changed.append(
                {
                    "op": name,
                    "fields": fields,
                    "was": {k: a.get(k) for k in fields},
                    "now": {k: b.get(k) for k in fields},
                }
            )
    small = source.get("small", {})
    values = []
    for name, t in graph.tensors.items():
        if name in small and not np.array_equal(np.asarray(small[name], dtype=t.dtype), t):
            values.append({"tensor": name, "was": small[name], "now": np.asarray(t).tolist()})
    return {
        "added": sorted(mine.keys() - base.keys()),
        "removed": sorted(base.keys() - mine.keys()),
        "changed": sorted(changed, key=lambda c: c["op"]),
        "values": values,
    }


def _edit_summary(report: Report) -> dict[str, Any]:
    c = report.changes
    return {
        "from": Path(report.path).name,
        "n_added": len(c.get("added", [])),
        "n_removed": len(c.get("removed", [])),
        "n_changed": len(c.get("changed", [])),
        "deleted": report.deleted,
        "hypotheses": report.hypotheses,
    }


def import_code(path: str | os.PathLike) -> tuple[Graph, Report]:
    """The IR of a module written by the python backend (edited or not); see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise CodeImportError(f"{path}: no such file")
    return _Importer(path).run()


__all__ = ["CodeImportError", "Report", "changes", "import_code", "source_map"]
