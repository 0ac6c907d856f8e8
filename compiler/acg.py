"""The ACG container: the model's own weights (embeddings, attention, layer norms, unembedding), one transcoder per
layer, usage statistics from the fitting corpus, feature labels and fit metrics. Saved as a folder
(`acg.json` + `tensors.safetensors`), validated on load.

Feature ids: `tok:{id}`, `pos:{p}`, `L{l}.f{i}` (transcoder features), `L{l}.h{h}` (attention head outputs),
`L{l}.err` (error terms).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from acg.compiler.transcoder import Transcoder
from acg.compiler.transformer import TransformerConfig, expected_shapes
from acg.ir.atomic import atomic_dir, recover
from acg.ir.errors import ACGError

SCHEMA, VERSION = "acg.acg", 1


class ACGFormatError(ACGError):
    pass


@dataclass(frozen=True, eq=False)
class ACG:
    cfg: TransformerConfig
    weights: dict[str, np.ndarray]  # TransformerLens names, float64
    transcoders: tuple[Transcoder, ...]
    usage: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, dict] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.transcoders) != self.cfg.n_layers:
            raise ACGFormatError(
                f"an ACG needs one transcoder per layer: {self.cfg.n_layers} layers, "
                f"{len(self.transcoders)} transcoders"
            )
        for layer, tc in enumerate(self.transcoders):
            if tc.d_model != self.cfg.d_model:
                raise ACGFormatError(
                    f"transcoder {layer} has d_model {tc.d_model}, the model has {self.cfg.d_model} "
                    "(a dictionary fitted for another model?)"
                )

    @property
    def exact(self) -> bool:
        return all(tc.meta.get("exact") for tc in self.transcoders)

    def replace(self, **kw: Any) -> ACG:
        return replace(self, **kw)

    def n_features(self) -> list[int]:
        return [tc.n_features for tc in self.transcoders]

    def label(self, feature_id: str) -> str:
        return self.labels.get(feature_id, {}).get("label", feature_id)


def _tensors(acg: ACG) -> dict[str, np.ndarray]:
    out = {f"model.{k}": v for k, v in acg.weights.items()}
    for layer, tc in enumerate(acg.transcoders):
        out.update({f"transcoder.{layer}.{k}": v for k, v in tc.tensors().items()})
    out.update({f"usage.{k}": v for k, v in acg.usage.items()})
    return {k: np.asarray(v, order="C") for k, v in sorted(out.items())}


def save(acg: ACG, path: str | os.PathLike) -> Path:
    """Write the ACG folder atomically; a content hash of both files is recorded and checked on load."""
    blob = st_save(_tensors(acg))
    body = {
        "config": acg.cfg.to_dict(),
        "transcoders": [{"act": tc.act, "meta": tc.meta} for tc in acg.transcoders],
        "labels": acg.labels,
        "stats": acg.stats,
        "meta": acg.meta,
    }
    body = json.loads(json.dumps(body, sort_keys=True, default=_json_default))
    doc = {"schema": SCHEMA, "version": VERSION, "content_hash": _hash(body, blob), **body}
    with atomic_dir(path) as tmp:
        (tmp / "acg.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        (tmp / "tensors.safetensors").write_bytes(blob)
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _hash(body: dict, blob: bytes) -> str:
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h.update(blob)
    return h.hexdigest()


def load(path: str | os.PathLike) -> ACG:
    path = recover(path)
    jfile, tfile = path / "acg.json", path / "tensors.safetensors"
    if not path.is_dir():
        raise ACGFormatError(
            f"{path}: not an ACG folder (expected acg.json and tensors.safetensors); make one with `acg fit`"
        )
    try:
        doc = json.loads(jfile.read_text())
    except FileNotFoundError:
        raise ACGFormatError(f"{jfile}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ACGFormatError(f"{jfile}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ACGFormatError(f"{jfile}: not an acg ACG file (field 'schema' should be {SCHEMA!r})")
    if doc.get("version") != VERSION:
        raise ACGFormatError(f"{jfile}: version {doc.get('version')!r} is not supported (this acg reads {VERSION})")
    try:
        blob = tfile.read_bytes()
        tensors = st_load(blob)
    except FileNotFoundError:
        raise ACGFormatError(f"{tfile}: missing") from None
    except Exception as e:
        raise ACGFormatError(f"{tfile}: not a readable safetensors file ({e})") from None
    try:
        cfg = TransformerConfig.from_dict(doc["config"], source=str(jfile))
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        for name, shape in expected_shapes(cfg).items():
            if name not in weights or weights[name].shape != shape:
                got = weights[name].shape if name in weights else "missing"
                raise ACGFormatError(f"{tfile}: model tensor {name!r} is {got}, the config implies {shape}")
        transcoders = []
        for layer, spec in enumerate(doc["transcoders"]):
            t = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"transcoder.{layer}.")}
            missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(t)
            if missing:
                raise ACGFormatError(f"{tfile}: transcoder {layer} lacks {', '.join(sorted(missing))}")
            transcoders.append(
                Transcoder(
                    t["W_enc"],
                    t["b_enc"],
                    t["W_dec"],
                    t["b_dec"],
                    spec["act"],
                    t.get("threshold"),
                    spec.get("meta", {}),
                )
            )
        usage = {k[len("usage.") :]: v for k, v in tensors.items() if k.startswith("usage.")}
        acg = ACG(
            cfg, weights, tuple(transcoders), usage, doc.get("labels", {}), doc.get("stats", {}), doc.get("meta", {})
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ACGFormatError(f"{jfile}: malformed ({type(e).__name__}: {e})") from None
    missing = [k for k in ("config", "transcoders", "labels", "stats", "meta") if k not in doc]
    if missing:
        raise ACGFormatError(f"{jfile}: malformed (field {missing[0]!r} is missing)")
    body = {k: doc[k] for k in ("config", "transcoders", "labels", "stats", "meta")}
    if doc.get("content_hash") != _hash(body, blob):
        raise ACGFormatError(
            f"{path}: content hash mismatch: acg.json or tensors.safetensors was changed after it was written"
        )
    for name, t in weights.items():
        if not np.isfinite(t).all():
            raise ACGFormatError(f"{tfile}: model tensor {name!r} holds NaN or Inf values")
    return acg
