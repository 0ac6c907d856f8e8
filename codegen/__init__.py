"""Backends: readable Python, Numba, a standalone torch module, ONNX. Each knows the IR and its target, never each
other. `compile` writes an artefact folder (atomically, with an `acg.json` manifest); `load` runs one as
`forward(tokens) -> logits` on numpy arrays."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from acg.ir.atomic import atomic_dir, recover
from acg.ir.errors import ACGError
from acg.ir.graph import Graph
from acg.ir.resources import check, compile_estimate
from acg.ir.serialize import content_hash, graph_to_dict, tensor_bytes

BACKENDS = ("python", "numba", "torch", "onnx")
MANIFEST = "acg.json"


class ArtefactError(ACGError):
    pass


def _emitter(backend: str) -> Callable[..., dict[str, bytes]]:
    if backend == "python":
        from acg.codegen.backend_python import emit_files
    elif backend == "numba":
        from acg.codegen.backend_numba import emit_files
    elif backend == "torch":
        from acg.codegen.backend_torch import emit_files
    elif backend == "onnx":
        from acg.codegen.backend_onnx import emit_files
    else:
        raise ArtefactError(f"unknown backend {backend!r}; supported: {', '.join(BACKENDS)}")
    return emit_files


def compile(
    graph: Graph,
    out_dir: str | os.PathLike,
    backend: str,
    *,
    title: str = "",
    module_name: str = "model",
    meta: dict[str, Any] | None = None,
) -> Path:
    """Generate `backend`'s artefact for `graph` into `out_dir` (replaced only when complete)."""
    emit = _emitter(backend)
    check(compile_estimate(graph, backend))
    files = emit(graph, module_name, title)
    inputs = [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in graph.inputs]
    manifest = {
        "backend": backend,
        "module": module_name,
        "files": sorted(files),
        "inputs": inputs,
        "outputs": list(graph.outputs),
        "ir_hash": content_hash(graph_to_dict(graph), tensor_bytes(graph)),
        "hashes": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
        "title": title or str(graph.meta.get("title", "")),
        **(meta or {}),
    }
    with atomic_dir(out_dir) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return Path(out_dir)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    file = recover(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtefactError(f"{path}: not an acg artefact (no {MANIFEST}); make one with `acg compile`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtefactError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtefactError(f"{file}: expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("backend") not in BACKENDS:
        raise ArtefactError(f"{file}: unknown backend {manifest.get('backend')!r}; supported: {', '.join(BACKENDS)}")
    module = manifest.get("module")
    if not isinstance(module, str) or not module.isidentifier():
        raise ArtefactError(f"{file}: field 'module' should be a module name, found {module!r}")
    hashes = manifest.get("hashes", {})
    if not isinstance(hashes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and Path(k).name == k for k, v in hashes.items()
    ):
        raise ArtefactError(f"{file}: field 'hashes' should map file names to sha256 digests")
    return manifest


def load(path: str | os.PathLike) -> Callable[..., np.ndarray]:
    """An artefact as `forward(tokens, *other_inputs) -> first output`, numpy in and out."""
    path = Path(path)
    manifest = read_manifest(path)
    backend, module = manifest["backend"], manifest["module"]
    for name, digest in manifest.get("hashes", {}).items():  # nothing runs unless it is what acg wrote
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise ArtefactError(f"{path / name}: missing (listed in {MANIFEST})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtefactError(
                f"{path / name}: content hash mismatch: changed after acg wrote it; recompile it, or import an "
                "edited module with `acg import-code` (which reads it without running it)"
            )
    if backend == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        onnx_file = path / f"{module}.onnx"
        if not onnx_file.is_file():
            raise ArtefactError(f"{onnx_file}: missing (the manifest names module {module!r})")
        try:
            session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types
            raise ArtefactError(f"{onnx_file}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        names = [i.name for i in session.get_inputs()]

        def run(tokens, *rest):
            feeds = {names[0]: np.asarray(tokens, dtype=np.int64)}
            feeds.update((n, np.asarray(x)) for n, x in zip(names[1:], rest, strict=False))
            return session.run(None, feeds)[0]

        return run
    file = path / f"{module}.py"
    if not file.is_file():
        raise ArtefactError(f"{file}: missing (the manifest names module {module!r})")
    name = f"acg_artefact_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ArtefactError(f"{file}: cannot be imported")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.forward


__all__ = ["BACKENDS", "ArtefactError", "compile", "load", "read_manifest"]
