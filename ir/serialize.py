"""IR folders: `graph.json` (versioned schema) + `tensors.safetensors`, written atomically and validated on load.

The JSON is written with sorted keys and the tensors in name order, so the same graph gives byte-identical files; a
content hash of both is recorded in the JSON and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from acg.ir.atomic import atomic_dir, recover
from acg.ir.graph import Graph, IRError, Op, Value, freeze_attrs
from acg.ir.verify import verify

SCHEMA = "acg.ir"
SCHEMA_VERSION = 1
GRAPH_FILE, TENSORS_FILE = "graph.json", "tensors.safetensors"


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return {"float": repr(v)}  # JSON has no inf/nan literal
    return v


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_from_json(x) for x in v)
    if isinstance(v, dict) and set(v) == {"float"}:
        return float(v["float"])
    return v


def graph_to_dict(graph: Graph) -> dict[str, Any]:
    return {
        "inputs": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in graph.inputs],
        "ops": [
            {
                "kind": op.kind,
                "name": op.name,
                "inputs": list(op.inputs),
                "shape": list(op.output.shape),
                "dtype": op.output.dtype,
                **({"attrs": {k: _jsonable(v) for k, v in op.attrs}} if op.attrs else {}),
                **({"scope": op.scope} if op.scope else {}),
            }
            for op in graph.ops
        ],
        "outputs": list(graph.outputs),
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in sorted(graph.tensors.items())},
        "meta": _jsonable_meta(dict(graph.meta)),
    }


def _jsonable_meta(meta: Any) -> Any:
    return json.loads(json.dumps(meta, sort_keys=True, default=str))


def tensor_bytes(graph: Graph) -> bytes:
    tensors = {name: np.asarray(graph.tensors[name], order="C") for name in sorted(graph.tensors)}
    return st_save(tensors) if tensors else st_save({"__empty__": np.zeros(0, np.float32)})


def content_hash(body: dict[str, Any], tensors: bytes) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h.update(tensors)
    return h.hexdigest()


def save(graph: Graph, path: str | os.PathLike) -> Path:
    """Verify and write `graph` as an IR folder; the previous folder at `path`, if any, stays until this succeeds."""
    verify(graph, allow_nonfinite=bool(graph.meta.get("allow_nonfinite", False)))
    body = graph_to_dict(graph)
    blob = tensor_bytes(graph)
    doc = {"schema": SCHEMA, "version": SCHEMA_VERSION, "content_hash": content_hash(body, blob), **body}
    with atomic_dir(path) as tmp:
        (tmp / GRAPH_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        (tmp / TENSORS_FILE).write_bytes(blob)
    return Path(path)


def load(path: str | os.PathLike) -> Graph:
    """Read and validate an IR folder: schema and version, every tensor present with its declared shape and dtype,
    no NaN/Inf unless the graph allows it, `verify`, then the content hash."""
    path = recover(path)
    gfile, tfile = path / GRAPH_FILE, path / TENSORS_FILE
    if not path.is_dir():
        raise IRError(f"{path}: not an IR folder (expected a folder with {GRAPH_FILE} and {TENSORS_FILE})")
    try:
        doc = json.loads(gfile.read_text())
    except FileNotFoundError:
        raise IRError(f"{gfile}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IRError(f"{gfile}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise IRError(f"{gfile}: not an acg IR file (field 'schema' should be {SCHEMA!r})")
    if doc.get("version") != SCHEMA_VERSION:
        raise IRError(
            f"{gfile}: schema version {doc.get('version')!r} is not supported (this acg reads version {SCHEMA_VERSION})"
        )
    try:
        blob = tfile.read_bytes()
    except FileNotFoundError:
        raise IRError(f"{tfile}: missing") from None
    try:
        tensors = st_load(blob)
    except (SafetensorError, Exception) as e:
        raise IRError(f"{tfile}: not a readable safetensors file ({e})") from None
    tensors.pop("__empty__", None)
    _check_shape_of(doc, gfile)
    try:
        graph = _graph_from_dict(doc, tensors, gfile, tfile)
        verify(graph, allow_nonfinite=bool(graph.meta.get("allow_nonfinite", False)))  # the specific errors first
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise IRError(f"{gfile}: malformed ({type(e).__name__}: {e})") from None
    body = {k: doc[k] for k in ("inputs", "ops", "outputs", "tensors", "meta")}
    if doc.get("content_hash") != content_hash(body, blob):
        raise IRError(f"{path}: content hash mismatch: {GRAPH_FILE} or {TENSORS_FILE} was changed after it was written")
    return graph


_DIM = (int, str)


def _check_shape_of(doc: dict, gfile: Path) -> None:
    """The document's structure, field by field, before anything is built from it (named in the error)."""

    def need(ok: bool, field: str, want: str, got: Any) -> None:
        if not ok:
            raise IRError(f"{gfile}: field {field} should be {want}, found {type(got).__name__} {str(got)[:60]!r}")

    def value(v: Any, field: str) -> None:
        need(isinstance(v, dict), field, "an object", v)
        need(isinstance(v.get("name"), str), f"{field}.name", "a string", v.get("name"))
        shape = v.get("shape")
        need(
            isinstance(shape, list) and all(isinstance(d, _DIM) and not isinstance(d, bool) for d in shape),
            f"{field}.shape",
            "a list of ints and dim names",
            shape,
        )
        need(isinstance(v.get("dtype"), str), f"{field}.dtype", "a string", v.get("dtype"))

    for key, kind in (("inputs", list), ("ops", list), ("outputs", list), ("tensors", dict), ("meta", dict)):
        need(isinstance(doc.get(key), kind), key, f"a {kind.__name__}", doc.get(key))
    for i, v in enumerate(doc["inputs"]):
        value(v, f"inputs[{i}]")
    for i, op in enumerate(doc["ops"]):
        value(op, f"ops[{i}]")
        need(isinstance(op.get("kind"), str), f"ops[{i}].kind", "a string", op.get("kind"))
        ins = op.get("inputs")
        need(isinstance(ins, list) and all(isinstance(x, str) for x in ins), f"ops[{i}].inputs", "a list of names", ins)
        need(isinstance(op.get("attrs", {}), dict), f"ops[{i}].attrs", "an object", op.get("attrs"))
        need(isinstance(op.get("scope", ""), str), f"ops[{i}].scope", "a string", op.get("scope"))
    need(all(isinstance(o, str) for o in doc["outputs"]), "outputs", "a list of names", doc["outputs"])
    for name, spec in doc["tensors"].items():
        need(isinstance(spec, dict), f"tensors.{name}", "an object", spec)
        shape = spec.get("shape")
        need(
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape),
            f"tensors.{name}.shape",
            "a list of ints",
            shape,
        )
        need(isinstance(spec.get("dtype"), str), f"tensors.{name}.dtype", "a string", spec.get("dtype"))


def _graph_from_dict(doc: dict, tensors: dict[str, np.ndarray], gfile: Path, tfile: Path) -> Graph:
    declared = doc["tensors"]
    for name, spec in declared.items():
        if name not in tensors:
            raise IRError(f"{tfile}: tensor {name!r} declared in {gfile.name} is missing")
        t = tensors[name]
        if list(t.shape) != list(spec["shape"]) or str(t.dtype) != spec["dtype"]:
            raise IRError(
                f"{tfile}: tensor {name!r} is {t.dtype}{list(t.shape)}, {gfile.name} declares "
                f"{spec['dtype']}{spec['shape']}"
            )
    extra = set(tensors) - set(declared)
    if extra:
        raise IRError(f"{tfile}: holds undeclared tensor(s) {', '.join(sorted(extra)[:5])}")
    inputs = tuple(Value(v["name"], tuple(v["shape"]), v["dtype"]) for v in doc["inputs"])
    ops = tuple(
        Op(
            kind=o["kind"],
            inputs=tuple(o["inputs"]),
            output=Value(o["name"], tuple(o["shape"]), o["dtype"]),
            attrs=freeze_attrs({k: _from_json(v) for k, v in o.get("attrs", {}).items()}),
            scope=o.get("scope", ""),
        )
        for o in doc["ops"]
    )
    return Graph(inputs, ops, tuple(doc["outputs"]), tensors, doc.get("meta", {}))
