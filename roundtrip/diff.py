"""Behaviour diff of any two of: an original model, an IR folder, a compiled artefact, an ACG (its replacement
model), a round-tripped checkpoint.

Per task: `task_acc` of each side, `agreement`, `kl` (KL(A || B) at the answer position), and the N most divergent
prompts (answers that differ first, then the largest KL), decoded to text with both answers. Given the ACG both sides
are expressed in, each divergent prompt is explained: the nodes (transcoder features, error terms) present in one
side and absent from the other, ranked by their gradient x activation attribution to that side's margin (its answer's
logit minus the other side's answer's logit), computed on the ACG's node model with that side's nodes switched on.
The attribution is checked against the real effect: `ablation` is the margin's change when all those nodes are
switched off at once, and `explained` their summed attribution over it (1 where the margin is linear in them: the
last layer's features and error terms, where the model has no final layer norm; with one, the norm's scale makes
it a first-order estimate).

Which nodes a side has: an original model, its dense IR or an artefact compiled from it has every feature and every
error term; an ACG or a feature-level IR without errors, every feature and no error; a round-tripped checkpoint, the
features its `meta.json` names and no error. (A round trip's attention restriction and dropped tokens are not nodes;
their effect shows as the part of the divergence the node model does not reproduce.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acg.compiler.acg import ACG
from acg.compiler.transformer import Transformer
from acg.ir.errors import ACGError
from acg.roundtrip.data import Pair
from acg.roundtrip.evaluate import accuracy, agreement, answer_logits, kl, kl_per_prompt
from acg.zoo.tasks import Example

LogitsFn = Callable[[np.ndarray], np.ndarray]


class DiffError(ACGError):
    pass


@dataclass(frozen=True)
class Nodes:
    """The ACG nodes a side computes with: kept feature indices per layer (None: all), error terms on or off."""

    features: tuple[np.ndarray, ...] | None
    errors: bool

    def masks(self, widths: Sequence[int]) -> list[torch.Tensor]:
        if self.features is None:
            return [torch.ones(n, dtype=torch.float64) for n in widths]
        out = []
        for n, keep in zip(widths, self.features, strict=True):
            m = torch.zeros(n, dtype=torch.float64)
            m[torch.as_tensor(np.asarray(keep, dtype=np.int64))] = 1.0
            out.append(m)
        return out


@dataclass
class Side:
    name: str
    kind: str  # model | ir | artefact | acg | roundtrip
    logits: LogitsFn
    nodes: Nodes | None  # None: unknown in ACG terms (no explanation)
    acg: ACG | None = None
    d_vocab: int | None = None


def resolve(ref: str) -> Side:
    """A side from a testbed name or a folder: compiled artefact, IR folder, ACG folder or checkpoint."""
    from acg import codegen
    from acg.compiler.frontend import FrontendError, kind_of
    from acg.compiler.frontend import load as load_model

    path = Path(ref)
    if path.is_dir() and (path / "acg.json").exists() and (path / "tensors.safetensors").exists():
        from acg.compiler import acg as acg_io
        from acg.roundtrip.dense import to_dense

        acg = acg_io.load(path)
        return Side(ref, "acg", answer_fn(to_dense(acg, torch.float64)), Nodes(None, False), acg, acg.cfg.d_vocab)
    if path.is_dir() and (path / "acg.json").exists():
        manifest = codegen.read_manifest(path)
        fn = codegen.load(path)
        return Side(ref, "artefact", lambda t: np.asarray(fn(t)), _artefact_nodes(manifest))
    try:
        kind = kind_of(path) if path.is_dir() else None
    except FrontendError:
        kind = None
    if kind == "ir":
        from acg.ir import interpret, serialize

        graph = serialize.load(path)
        meta = graph.meta
        nodes = None
        if meta.get("family") == "acg" or "keep_errors" in meta:
            nodes = Nodes(None, bool(meta.get("keep_errors")))
        elif "config" in meta:
            nodes = Nodes(None, True)

        def run(t: np.ndarray) -> np.ndarray:
            return interpret.run(graph, t, dtype="float32")[graph.outputs[0]]

        return Side(ref, "ir", run, nodes, None, meta.get("config", {}).get("d_vocab"))
    loaded = load_model(ref, "float32")
    if loaded.original is None:
        raise DiffError(f"{ref}: cannot be run as a model")
    nodes = Nodes(None, True)
    kind = "model"
    meta_file = path / "meta.json" if path.is_dir() else None
    if meta_file is not None and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if "roundtrip" in meta:
            kept = meta["roundtrip"].get("kept")
            nodes = Nodes(tuple(np.asarray(k, dtype=np.int64) for k in kept), False) if kept is not None else None
            kind = "roundtrip"
    return Side(ref, kind, loaded.original, nodes, None, loaded.graph.meta.get("config", {}).get("d_vocab"))


def _artefact_nodes(manifest: dict[str, Any]) -> Nodes | None:
    title = str(manifest.get("title", ""))
    if "(exact)" in title or "ACG" not in title:
        return Nodes(None, True)
    return None


def answer_fn(model: torch.nn.Module) -> LogitsFn:
    dtype = next(model.parameters()).dtype

    def run(tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(tokens)).to(dtype).numpy()

    return run


# ------------------------------------------------------------------------------------------------- node model


class NodeModel:
    """The original model (built from the ACG's weights) with every MLP written as its dictionary's features plus
    an error term (the MLP's output minus the full reconstruction), each switchable: all features and errors on is
    the original exactly; errors off, the replacement model; some features off, a circuit."""

    def __init__(self, acg: ACG):
        self.acg = acg
        self.model = Transformer(acg.cfg).double()
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in acg.weights.items()}, strict=True)
        self.model.eval()
        self.widths = acg.n_features()
        self.tc = [
            {k: torch.as_tensor(v, dtype=torch.float64) for k, v in tc.tensors().items()} for tc in acg.transcoders
        ]
        self.acts = [tc.act for tc in acg.transcoders]

    def _features(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        t = self.tc[layer]
        pre = x @ t["W_enc"] + t["b_enc"]
        act = self.acts[layer]
        if act == "relu":
            return pre.relu()
        if act == "jumprelu":
            return torch.where(pre > t["threshold"], pre, torch.zeros_like(pre))
        raise DiffError(f"node model: dictionary activation {act!r} is not supported (relu, jumprelu)")

    def run(self, tokens: torch.Tensor, nodes: Nodes, keep: bool = False):
        """Logits [b, s, v]; with `keep`, also the features [per layer, b, s, n] and errors [b, s, d] (grads kept)."""
        masks = nodes.masks(self.widths)
        saved: dict[str, list[torch.Tensor]] = {"features": [], "errors": []}
        handles = []
        for layer, block in enumerate(self.model.blocks):

            def hook(mod, inp, out, layer=layer):
                x = inp[0]
                f = self._features(layer, x) * masks[layer]
                recon_full = self._features(layer, x) @ self.tc[layer]["W_dec"] + self.tc[layer]["b_dec"]
                e = (out - recon_full) * (1.0 if nodes.errors else 0.0)
                if keep:
                    f.retain_grad()
                    e.retain_grad()
                    saved["features"].append(f)
                    saved["errors"].append(e)
                return f @ self.tc[layer]["W_dec"] + self.tc[layer]["b_dec"] + e

            handles.append(block.mlp.register_forward_hook(hook))
        try:
            logits = self.model(tokens)
        finally:
            for h in handles:
                h.remove()
        return (logits, saved) if keep else logits

    def explain(self, ids: Sequence[int], a: int, b: int, mine: Nodes, other: Nodes, top: int = 8) -> dict[str, Any]:
        """Why `mine` answers `a` rather than `b` where `other` does not: the nodes of `mine` absent from `other`,
        by gradient x activation on `mine`'s margin logit[a] - logit[b] (module docstring)."""
        toks = torch.as_tensor([list(ids)])
        logits, saved = self.run(toks, mine, keep=True)
        margin = logits[0, -1, a] - logits[0, -1, b]
        margin.backward()
        only = _difference(mine, other, self.widths)
        rows = []
        for layer, idx in enumerate(only["features"]):
            f = saved["features"][layer]
            attr = (f * f.grad)[0].sum(0).detach().numpy()
            for i in idx:
                if attr[i] != 0:
                    rows.append(
                        {
                            "node": f"L{layer}.f{int(i)}",
                            "label": self.acg.label(f"L{layer}.f{int(i)}"),
                            "attribution": float(attr[i]),
                        }
                    )
        if only["errors"]:
            for layer, e in enumerate(saved["errors"]):
                attr = float((e * e.grad).sum().detach())
                rows.append({"node": f"L{layer}.err", "label": "error term", "attribution": attr})
        rows.sort(key=lambda r: -abs(r["attribution"]))
        with torch.no_grad():
            reduced = self.run(toks, _intersection(mine, other, self.widths))
            ablation = float(margin - (reduced[0, -1, a] - reduced[0, -1, b]))
        total = float(sum(r["attribution"] for r in rows))
        return {
            "margin": float(margin.detach()),
            "ablation": ablation,
            "attribution_sum": total,
            "explained": total / ablation if abs(ablation) > 1e-12 else None,
            "nodes": rows[:top],
            "n_nodes": len(rows),
        }


def _difference(mine: Nodes, other: Nodes, widths: Sequence[int]) -> dict[str, Any]:
    m, o = mine.masks(widths), other.masks(widths)
    feats = [np.flatnonzero(((a > 0) & (b == 0)).numpy()) for a, b in zip(m, o, strict=True)]
    return {"features": feats, "errors": mine.errors and not other.errors}


def _intersection(mine: Nodes, other: Nodes, widths: Sequence[int]) -> Nodes:
    m, o = mine.masks(widths), other.masks(widths)
    feats = tuple(np.flatnonzero(((a > 0) & (b > 0)).numpy()) for a, b in zip(m, o, strict=True))
    return Nodes(feats, mine.errors and other.errors)


# ----------------------------------------------------------------------------------------------------- the diff


def diff(
    a: Side,
    b: Side,
    data: dict[str, Sequence[Example | Pair]],
    acg: ACG | None = None,
    n_divergent: int = 5,
    top: int = 8,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> dict[str, Any]:
    """The diff of `a` and `b` on `data` ({task: examples}); explanations where `acg` and both sides' nodes are
    known."""
    acg = acg or a.acg or b.acg
    explain = acg is not None and a.nodes is not None and b.nodes is not None
    model = NodeModel(acg) if explain else None
    decode = decode or (lambda ids: " ".join(map(str, ids)))
    out: dict[str, Any] = {"a": a.name, "b": b.name, "kinds": [a.kind, b.kind], "tasks": {}, "explained": explain}
    if not explain:
        out["why_not_explained"] = (
            "no ACG given (--acg)" if acg is None else "one side's nodes are not known in the ACG's terms"
        )
    for task, examples in data.items():
        if not examples:
            raise DiffError(f"task {task!r} has no prompts")
        la, lb = answer_logits(a.logits, examples), answer_logits(b.logits, examples)
        per_kl = kl_per_prompt(la, lb)
        ans_a, ans_b = la.argmax(-1), lb.argmax(-1)
        order = np.lexsort((-per_kl, ans_a == ans_b))[:n_divergent]
        prompts = []
        for i in order:
            ex = examples[int(i)]
            row = {
                "prompt": decode(ex.ids),
                "expected": decode([ex.answer_id]),
                "answer_a": decode([int(ans_a[i])]),
                "answer_b": decode([int(ans_b[i])]),
                "kl": float(per_kl[i]),
            }
            if explain and ans_a[i] != ans_b[i]:
                row["a_only"] = model.explain(ex.ids, int(ans_a[i]), int(ans_b[i]), a.nodes, b.nodes, top)
                row["b_only"] = model.explain(ex.ids, int(ans_b[i]), int(ans_a[i]), b.nodes, a.nodes, top)
            prompts.append(row)
        out["tasks"][task] = {
            "n": len(examples),
            "task_acc": {"a": accuracy(la, examples), "b": accuracy(lb, examples)},
            "agreement": agreement(la, lb),
            "kl": kl(la, lb),
            "divergent": prompts,
        }
    return out
