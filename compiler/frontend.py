"""One entry point for every front end: a model reference (testbed name, TransformerLens-layout folder, Hugging Face
folder or object, IR folder, torch module) -> the dense IR, and the original model as a logits function for checks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from acg.ir.errors import ACGError
from acg.ir.graph import Graph


class FrontendError(ACGError):
    pass


@dataclass(frozen=True, eq=False)
class Loaded:
    """A model brought in by a front end: its dense IR, and the original as `tokens -> logits` (None for an IR)."""

    graph: Graph
    original: Callable[[np.ndarray], np.ndarray] | None
    source: str
    module: Any = None  # the torch module, where there is one


def _torch_fn(module, dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    tdtype = torch.float64 if dtype == "float64" else torch.float32
    module = module.to(tdtype).eval()

    def run(tokens: np.ndarray, *rest: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            args = [torch.as_tensor(np.asarray(tokens, dtype=np.int64))]
            args += [torch.as_tensor(np.asarray(r)) for r in rest]
            out = module(*args)
            if hasattr(out, "logits"):
                out = out.logits
            elif hasattr(out, "last_hidden_state"):
                out = out.last_hidden_state
            return out.numpy()

    return run


def kind_of(path: Path) -> str:
    """What a folder holds: `ir`, `transformer-lens` or `hf`."""
    if (path / "graph.json").exists():
        return "ir"
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FrontendError(f"{path}: neither an IR folder (graph.json) nor a model folder (config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise FrontendError(f"{cfg_file}: not valid JSON ({e})") from None
    if isinstance(cfg, dict) and "model_type" in cfg:
        return "hf"
    return "transformer-lens"


def load(ref: Any, dtype: str = "float32") -> Loaded:
    """Bring a model in through the right front end."""
    from acg.compiler import tlayout
    from acg.compiler.transformer import Transformer, load_checkpoint

    if dtype not in ("float32", "float64"):
        raise FrontendError(f"dtype must be float32 or float64, got {dtype!r}")
    if isinstance(ref, Graph):
        return Loaded(ref, None, "ir")
    if not isinstance(ref, str | os.PathLike):
        return _load_object(ref, dtype)
    from acg.zoo.registry import ZOO, get

    path = get(str(ref)).path if str(ref) in ZOO else Path(ref)
    if not path.exists():
        known = ", ".join(ZOO)
        raise FrontendError(f"{ref!r} is neither a testbed model ({known}) nor an existing folder")
    kind = kind_of(path)
    if kind == "ir":
        from acg.ir import serialize

        return Loaded(serialize.load(path), None, str(path))
    if kind == "hf":
        from acg.compiler import hf

        module = hf.load_dir(path)
        return Loaded(hf.to_ir(module, dtype), _torch_fn(module, dtype), str(path), module)
    model: Transformer = load_checkpoint(path, dtype=_torch_dtype("float64"))
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    graph = tlayout.to_ir(model.cfg, weights, dtype, source=str(path), meta={"title": str(ref)})
    return Loaded(graph, _torch_fn(model, dtype), str(path), model)


def _torch_dtype(dtype: str):
    import torch

    return torch.float64 if dtype == "float64" else torch.float32


def _load_object(obj: Any, dtype: str) -> Loaded:
    import torch

    from acg.compiler import tlayout
    from acg.compiler.transformer import Transformer

    if isinstance(obj, Transformer):
        weights = {k: v.detach().double().numpy() for k, v in obj.state_dict().items()}
        return Loaded(tlayout.to_ir(obj.cfg, weights, dtype), _torch_fn(obj, dtype), type(obj).__name__, obj)
    name = type(obj).__name__
    if name == "HookedTransformer":
        from acg.compiler import hooked

        return Loaded(hooked.to_ir(obj, dtype), _torch_fn(obj, dtype), name, obj)
    if name in ("GPT2LMHeadModel", "GPT2Model", "BertModel"):
        from acg.compiler import hf

        return Loaded(hf.to_ir(obj, dtype), _torch_fn(obj, dtype), name, obj)
    if isinstance(obj, torch.nn.Module):
        from acg.compiler import fx

        return Loaded(fx.to_ir(obj, dtype), _torch_fn(obj, dtype), name, obj)
    raise FrontendError(
        f"cannot compile a {name}: pass a torch module, a HookedTransformer, a Hugging Face "
        "GPT-2/BERT model, a folder (TransformerLens layout, Hugging Face, IR) or a testbed name"
    )
