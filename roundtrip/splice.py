"""Splice a hypothesis in place of one part of a model, and measure how much of the part's behaviour it reproduces.

The model is the ACG's exact feature-level IR (every MLP written as its dictionary's features plus the error term,
`lower(acg, keep_errors=True)`, which computes the original model), so only the part changes. Parts:

- `L{l}.f{i}`: feature i of layer l's dictionary, a [batch, seq] value;
- `L{l}.H{h}`: head h of layer l's attention pattern, [batch, query, key];
- `L{l}.mlp`: all of layer l's features at once, [batch, seq, n_features].

A hypothesis is a Python function (checked by `acg.ir.hypothesis`, never given anything but arrays) whose parameter
names say what it reads: `tokens` (int [batch, seq]) and any earlier feature `f{k}_{j}` (k < l, [batch, seq]). It
returns the part's value. Splicing writes the difference `delta = hypothesis - original` into the model exactly where
the part acts: a feature's or layer's decoder writes change by `delta @ W_dec` (the residual stream, and with it every
later read and layer-norm scale, included; the error term keeps the value it had, so the rest of the MLP is
untouched); a head's pattern is replaced for that head alone. Ablation is the same splice with the value 0.

The verdict: the share of the part's effect the hypothesis reproduces, `1 - KL(orig || hyp) / KL(orig || ablated)`
at the answer positions (1: indistinguishable from the original; 0: no better than deleting the part; negative:
worse). It is left out (None, with a note) where ablating the part moves the answers by less than `MIN_EFFECT`
nats: a share of nothing is noise. Beside it, the loss view `loss_recovered = (CE_ablated - CE_hyp) / (CE_ablated -
CE_orig)` on the expected answers, and the `local_verdict`, `1 - sum (hyp - part)^2 / sum part^2` over every
position: how well the hypothesis reproduces the part's own values, whatever their downstream weight (a single
feature of a wide dictionary often matters little alone: its meaning can be right while its behavioural effect is
too small to measure). All come with per-task `task_acc`, `agreement` and `kl` of the spliced model against the
original, and the prompts that changed most.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from acg.compiler.acg import ACG
from acg.compiler.lower import lower
from acg.ir import interpret
from acg.ir.builder import GraphBuilder
from acg.ir.errors import ACGError
from acg.ir.graph import Graph, Op
from acg.ir.hypothesis import HypothesisError, check, function_source
from acg.roundtrip.evaluate import accuracy, agreement, answer_logits, kl_per_prompt

PART_RE = re.compile(r"^L(\d+)\.(?:f(\d+)|H(\d+)|(mlp))$")


class SpliceError(ACGError):
    pass


@dataclass(frozen=True)
class Part:
    layer: int
    kind: str  # feature | head | layer
    index: int | None = None

    @property
    def name(self) -> str:
        return {"feature": f"L{self.layer}.f{self.index}", "head": f"L{self.layer}.H{self.index}"}.get(
            self.kind, f"L{self.layer}.mlp"
        )


def parse_part(text: str, acg: ACG) -> Part:
    m = PART_RE.match(text.strip())
    if not m:
        raise SpliceError(f"part {text!r}: write L<layer>.f<feature>, L<layer>.H<head> or L<layer>.mlp (e.g. L1.f17)")
    layer = int(m.group(1))
    cfg = acg.cfg
    if layer >= cfg.n_layers:
        raise SpliceError(f"part {text!r}: the model has layers 0..{cfg.n_layers - 1}")
    if m.group(3) is not None:
        h = int(m.group(3))
        if h >= cfg.n_heads:
            raise SpliceError(f"part {text!r}: layer {layer} has heads 0..{cfg.n_heads - 1}")
        return Part(layer, "head", h)
    if cfg.attn_only:
        raise SpliceError(f"part {text!r}: the model has no MLPs, so no features")
    n = acg.transcoders[layer].n_features
    if m.group(2) is not None:
        i = int(m.group(2))
        if i >= n:
            raise SpliceError(f"part {text!r}: layer {layer}'s dictionary has features 0..{n - 1}")
        return Part(layer, "feature", i)
    return Part(layer, "layer")


def inputs_available(part: Part, acg: ACG) -> str:
    earlier = ", ".join(f"f{k}_<j> (j < {acg.transcoders[k].n_features})" for k in range(part.layer))
    return "tokens" + (f", {earlier}" if earlier else "")


def stub(part: Part, acg: ACG) -> str:
    """The signature generated for a hypothesis of `part`, to fill in."""
    shape = {"feature": "[batch, seq]", "head": "[batch, query, key] (rows sum to 1)", "layer": "[batch, seq, n]"}
    n = acg.transcoders[part.layer].n_features if part.kind == "layer" else None
    return (
        f"import numpy as np\n\n\ndef hypothesis(tokens):\n"
        f'    """{part.name}: return float {shape[part.kind]}{f" with n = {n}" if n else ""}.\n'
        f'    Parameters you may name: {inputs_available(part, acg)}."""\n'
        f"    return np.zeros(tokens.shape, dtype=np.float64)\n"
    )


def load_hypothesis(ref: str) -> tuple[str, str]:
    """`FILE.py:func` -> (the checked function's source, its name). The file is parsed, never run."""
    from pathlib import Path

    file, _, func = ref.rpartition(":")
    if not file or not func:
        raise SpliceError(f"hypothesis {ref!r}: write FILE.py:function")
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpliceError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise SpliceError(f"{path}: not UTF-8 text ({e})") from None
    try:
        return function_source(text, func, str(path)), func
    except HypothesisError as e:
        raise SpliceError(str(e)) from None


def splice(acg: ACG, part: Part, value: tuple[str, str] | None, dtype: str = "float64") -> Graph:
    """The exact feature-level IR of `acg` with `part` replaced by the hypothesis `value` = (source, function), or
    by 0 (ablation) when `value` is None."""
    base = lower(acg, keep_errors=True, dtype=dtype)
    params = check(value[0], value[1]).args.args if value else []
    return _Splicer(base, acg, part, value, [a.arg for a in params], dtype).build()


class _Splicer:
    def __init__(self, base: Graph, acg: ACG, part: Part, value, params: list[str], dtype: str):
        self.base, self.acg, self.part, self.value, self.params, self.dtype = base, acg, part, value, params, dtype
        layer = part.layer
        if part.kind == "head":
            self.target, self.resid = f"L{layer}_pattern", None
        else:
            self.target, self.resid = f"mlp{layer}", f"resid_{layer + 1}"
        names = {op.name for op in base.ops}
        for need in filter(None, (self.target, self.resid)):
            if need not in names:
                raise SpliceError(f"the IR has no value {need!r} to splice at (is {part.name} in this model?)")
        # the reconstruction feeding the error term keeps the original features: the error stays what it was
        self.recon = None
        if part.kind != "head":
            self.recon = next(
                op.name
                for op in base.ops
                if op.kind == "matmul"
                and op.inputs[0] == self.target
                and self._tensor_of(op.inputs[1]) == f"D.mlp{layer}"
            )

    def _tensor_of(self, value: str) -> str | None:
        for op in self.base.ops:
            if op.name == value and op.kind == "const":
                return op.attr("tensor")
        return None

    def build(self) -> Graph:
        b = GraphBuilder()
        for v in self.base.inputs:
            b.input(v.name, v.shape, v.dtype)
        b.tensors.update({k: v for k, v in self.base.tensors.items() if not k.startswith("usage.")})
        b.values.update(self.base.values)  # every base name is taken before new ops are named
        rename: dict[str, str] = {}
        for op in self.base.ops:
            inputs = tuple(x if (op.name == self.recon and x == self.target) else rename.get(x, x) for x in op.inputs)
            b.values[op.name] = op.output
            b.ops.append(Op(op.kind, inputs, op.output, op.attrs, op.scope))
            if op.kind == "const":
                b._const_of.setdefault(op.attr("tensor"), op.name)
            if op.name == self.target:
                with b.scope(op.scope):
                    rename[self.target] = self._replace(b)
            elif op.name == self.resid:
                with b.scope(op.scope):
                    rename[self.resid] = b.op("add", self.resid, self.write, name=f"{self.resid}_spliced")
        meta = {
            **self.base.meta,
            "spliced": {"part": self.part.name, "hypothesis": self.value[1] if self.value else None},
        }
        return b.build(list(self.base.outputs), meta=meta)

    def _replace(self, b: GraphBuilder) -> str:
        """Ops computing the part's new value and the spliced tensor; sets `self.write` (the residual change)."""
        p, layer = self.part, self.part.layer
        x = self.target
        if p.kind == "feature":
            old = b.op("slice", x, axis=2, start=p.index, stop=p.index + 1, name=_names(p)[0])
        elif p.kind == "head":
            old = b.op("slice", x, axis=1, start=p.index, stop=p.index + 1, name=_names(p)[0])
        else:
            old = x
        new = self._value(b, old)
        delta = b.op("sub", new, old, name=f"{p.name}_delta".replace(".", "_"))
        if p.kind == "layer":
            out = new
        else:
            n = self.base.values[x].shape[2 if p.kind == "feature" else 1]
            onehot = np.zeros((n,) if p.kind == "feature" else (n, 1, 1), dtype=self.dtype)
            onehot[p.index] = 1.0
            mask = b.const(f"splice.{p.name}.mask", onehot, hint="splice_mask")
            out = b.op("add", x, b.op("mul", delta, mask), name=f"{x}_spliced")
        if p.kind != "head":
            W_dec = np.asarray(self.acg.transcoders[layer].W_dec, dtype=self.dtype)
            rows = W_dec[p.index : p.index + 1] if p.kind == "feature" else W_dec
            self.write = b.op("matmul", delta, b.const(f"splice.{p.name}.W_dec", rows, hint="splice_W_dec"))
        return out

    def _value(self, b: GraphBuilder, old: str) -> str:
        p = self.part
        if self.value is None:  # ablation: the part's value times 0
            return b.op("mul", old, b.const("splice.zero", np.array(0.0, dtype=self.dtype), hint="zero"))
        args = []
        for name in self.params:
            m = re.fullmatch(r"f(\d+)_(\d+)", name)
            if name == "tokens":
                args.append(self.base.inputs[0].name)
            elif m and int(m.group(1)) < p.layer and int(m.group(2)) < self.acg.transcoders[int(m.group(1))].n_features:
                k, j = int(m.group(1)), int(m.group(2))
                col = b.op("slice", f"mlp{k}", axis=2, start=j, stop=j + 1)
                args.append(b.op("reshape", col, shape=("batch", "seq"), name=name))
            else:
                raise SpliceError(
                    f"hypothesis {self.value[1]}() asks for {name!r}; a hypothesis of {p.name} may read "
                    f"{inputs_available(p, self.acg)}"
                )
        if not args:
            raise SpliceError(f"hypothesis {self.value[1]}() takes no inputs; give it `tokens` at least")
        tail = {"feature": (), "head": ("seq",), "layer": (self.acg.transcoders[p.layer].n_features,)}[p.kind]
        h = b.op(
            "hypothesis",
            *args,
            source=self.value[0],
            function=self.value[1],
            dtype=self.dtype,
            tail=tail,
            name=_names(p)[1],
        )
        if p.kind == "feature":
            return b.op("reshape", h, shape=("batch", "seq", 1))
        if p.kind == "head":
            return b.op("reshape", h, shape=("batch", 1, "seq", "seq"))
        return h


# ------------------------------------------------------------------------------------------------------ verdict


def runner(graph: Graph, part: Part | None = None, acc: dict[str, float] | None = None):
    """`tokens -> logits` through the interpreter; for a spliced graph, also accumulates in `acc` the squared error
    of the hypothesis against the part's own value, and the part's squared value, over every position."""
    original, hypothesis = _names(part) if part is not None else (None, None)

    def run(tokens: np.ndarray) -> np.ndarray:
        env = interpret.run(graph, tokens, dtype="float64", keep=acc is not None)
        if acc is not None:
            f = env[original].reshape(env[hypothesis].shape)
            acc["sq_err"] = acc.get("sq_err", 0.0) + float(((env[hypothesis] - f) ** 2).sum())
            acc["sq"] = acc.get("sq", 0.0) + float((f**2).sum())
        return env[graph.outputs[0]]

    return run


def _names(part: Part) -> tuple[str, str]:
    stem = part.name.replace(".", "_")
    return (f"mlp{part.layer}" if part.kind == "layer" else f"{stem}_original"), f"{stem}_hypothesis"


def _ce(logits: np.ndarray, answers: np.ndarray) -> float:
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(answers)), answers].mean())


def measure(
    acg: ACG,
    part: Part,
    value: tuple[str, str],
    data: dict[str, Sequence[Any]],
    n_changed: int = 5,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> dict[str, Any]:
    """Splice `value` in place of `part`, run original, ablated and spliced models through the IR interpreter on
    `data` ({task: examples}), and report the verdict (module docstring)."""
    decode = decode or (lambda ids: " ".join(map(str, ids)))
    original = lower(acg, keep_errors=True, dtype="float64")
    ablated, spliced = splice(acg, part, None), splice(acg, part, value)
    out: dict[str, Any] = {"part": part.name, "hypothesis": value[1], "tasks": {}}
    totals = {"kl_hyp": 0.0, "kl_ablated": 0.0, "ce": np.zeros(3), "n": 0}
    for task, examples in data.items():
        if not examples:
            raise SpliceError(f"task {task!r} has no prompts")
        local: dict[str, float] = {}
        lo, la = answer_logits(runner(original), examples), answer_logits(runner(ablated), examples)
        lh = answer_logits(runner(spliced, part, local), examples)
        answers = np.array([ex.answer_id for ex in examples])
        kl_h, kl_a = kl_per_prompt(lo, lh), kl_per_prompt(lo, la)
        ce = np.array([_ce(x, answers) for x in (lo, la, lh)])
        order = np.argsort(-kl_h)[:n_changed]
        out["tasks"][task] = {
            "n": len(examples),
            "task_acc": {
                "original": accuracy(lo, examples),
                "ablated": accuracy(la, examples),
                "spliced": accuracy(lh, examples),
            },
            "agreement": agreement(lo, lh),
            "kl": float(kl_h.mean()),
            "kl_ablated": float(kl_a.mean()),
            "verdict": _verdict(kl_h.mean(), kl_a.mean()),
            "local_verdict": _local(local),
            "changed": [
                {
                    "prompt": decode(examples[i].ids),
                    "expected": decode([examples[i].answer_id]),
                    "original": decode([int(lo[i].argmax())]),
                    "spliced": decode([int(lh[i].argmax())]),
                    "ablated": decode([int(la[i].argmax())]),
                    "kl": float(kl_h[i]),
                }
                for i in order
            ],
        }
        totals["kl_hyp"] += float(kl_h.sum())
        totals["kl_ablated"] += float(kl_a.sum())
        totals["ce"] += ce * len(examples)
        totals["n"] += len(examples)
        for k, v in local.items():
            totals[k] = totals.get(k, 0.0) + v
    n = totals["n"]
    ce_o, ce_a, ce_h = totals["ce"] / n
    out["kl"] = totals["kl_hyp"] / n
    out["kl_ablated"] = totals["kl_ablated"] / n
    out["verdict"] = _verdict(out["kl"], out["kl_ablated"])
    out["local_verdict"] = _local(totals)
    out["loss"] = {"original": ce_o, "ablated": ce_a, "spliced": ce_h}
    out["loss_recovered"] = float((ce_a - ce_h) / (ce_a - ce_o)) if abs(ce_a - ce_o) >= MIN_EFFECT else None
    if out["verdict"] is None:
        out["note"] = (
            f"ablating {part.name} moves the answers by {out['kl_ablated']:.1e} nats on this data, below the "
            f"{MIN_EFFECT:g} needed for a behavioural share; local_verdict says how well the values match"
        )
    return out


MIN_EFFECT = 1e-3  # nats: below this, ablating the part barely moves the answers and a share of it is noise


def _verdict(kl_hyp: float, kl_ablated: float) -> float | None:
    return float(1.0 - kl_hyp / kl_ablated) if kl_ablated >= MIN_EFFECT else None


def _local(acc: dict[str, float]) -> float | None:
    """1 - sum (hypothesis - part)^2 / sum part^2 over every position: the share of the part's values reproduced."""
    return float(1.0 - acc["sq_err"] / acc["sq"]) if acc.get("sq", 0.0) > 0 else None


__all__ = ["Part", "SpliceError", "load_hypothesis", "measure", "parse_part", "splice", "stub"]
