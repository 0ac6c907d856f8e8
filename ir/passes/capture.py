"""Capture: drop what carried (almost) no mass on the fitting corpus ("captured means seen", DESIGN.md).

Lossy by design. The graph lists, in `meta["usage"]`, weight tensors with a usage tensor each (broadcastable to the
weight): the entry's carried mass is |weight| * usage. Entries whose mass is at most `threshold` times the largest
mass in their tensor are set to zero (with the default 0, exactly the entries that never carried anything). The
report gives, per kind of weight, how many entries were dropped and what share of the recorded mass they held.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from acg.ir.graph import Graph
from acg.ir.passes import PassResult, register


@register
@dataclass(frozen=True)
class Capture:
    threshold: float = 0.0
    kinds: tuple[str, ...] = ()  # restrict to these kinds (e.g. "token", "qk", "edge", "feature", "ov"); () = all
    weights: tuple[str, ...] = ()  # restrict to these weight tensors (e.g. "T.L0": layer 0's QK pairs); () = all

    name = "capture"

    def __call__(self, graph: Graph) -> PassResult:
        usage = graph.meta.get("usage", {})
        tensors = dict(graph.tensors)
        report: dict[str, dict[str, float]] = defaultdict(
            lambda: {"dropped": 0, "total": 0, "mass_dropped": 0.0, "mass_total": 0.0}
        )
        changed = False
        for weight, spec in sorted(usage.items()):
            kind = spec["kind"]
            if (self.kinds and kind not in self.kinds) or (self.weights and weight not in self.weights):
                continue
            W = tensors[weight]
            U = np.broadcast_to(tensors[spec["usage"]], W.shape)
            mass = np.abs(W) * U
            cutoff = self.threshold * float(mass.max()) if mass.size else 0.0
            drop = (mass <= cutoff) & (W != 0)
            r = report[kind]
            r["dropped"] += int(drop.sum())
            r["total"] += int((W != 0).sum())
            r["mass_dropped"] += float(mass[drop].sum())
            r["mass_total"] += float(mass.sum())
            if drop.any():
                tensors[weight] = np.where(drop, 0, W).astype(W.dtype)
                changed = True
        out = graph.replace(
            tensors=tensors,
            meta={
                **graph.meta,
                "captured": {"threshold": self.threshold, "kinds": list(self.kinds), "weights": list(self.weights)},
            },
        )
        summary = {k: {**v, "fraction_dropped": v["dropped"] / max(v["total"], 1)} for k, v in report.items()}
        return PassResult(out, changed, {"threshold": self.threshold, "by_kind": summary})
