"""Front end for a live TransformerLens `HookedTransformer` (transformer-lens 3.x): its config and state dict are the
TransformerLens layout already, so they go through the same importer as a checkpoint folder."""

from __future__ import annotations

from typing import Any

from acg.compiler.tlayout import to_ir as tl_to_ir
from acg.compiler.transformer import TransformerConfig
from acg.ir.graph import Graph


def config_of(model: Any) -> TransformerConfig:
    cfg = model.cfg
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return TransformerConfig.from_dict(raw, source=f"HookedTransformer config ({raw.get('model_name', '?')})")


def to_ir(model: Any, dtype: str = "float32") -> Graph:
    cfg = config_of(model)
    weights = {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items()}
    return tl_to_ir(cfg, weights, dtype, source="HookedTransformer", meta={"title": "HookedTransformer"})
