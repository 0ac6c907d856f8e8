"""The defender's side of the backdoor evaluation: the clean budget, the baselines acg is compared with, and DER.

- `clean_budget`: `ratio` x as many clean examples as the model was trained on (BackdoorBench's default defender
  ratio is 5%), drawn from the clean mixture (partial insertions included, no trigger) with a seed of its own; the
  same examples serve every method, the ACG fit included.
- `finetune` (FT): go on training the original on the budget.
- `fine_prune` (FP, Liu, Dolan-Gavitt & Garg 2018): rank every MLP neuron by its mean activation on the budget, prune
  the least active in steps of 5% until clean accuracy (on a held-out tenth of the budget) has dropped by `margin`
  (4 points, the paper's choice), keep the last step within it, then fine-tune with the pruned neurons held at zero.
- `scratch`: a fresh model of the same shape trained on the budget alone, with the testbed's own recipe.

All three train for the same number of optimiser steps (by default the ACG fit's: local + end-to-end steps).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch

from acg.compiler.transformer import Transformer, activation
from acg.roundtrip.evaluate import accuracy, answer_logits, length_batches
from acg.zoo.tasks import Example, Mixture
from acg.zoo.train import TrainSpec, train


def clean_budget(train_spec: TrainSpec, ratio: float = 0.05, seed: int = 0) -> list[Example]:
    """`ratio` x (steps x batch size of the model's training) clean examples, training split, seeded."""
    if not 0 < ratio <= 1:
        raise ValueError(f"the clean-data ratio must be in (0, 1], got {ratio}")
    n = max(1, round(ratio * train_spec.steps * train_spec.batch_size))
    stream = Mixture(poison=False, weights=train_spec.task_weights).stream(10_000 + seed)
    return [next(stream) for _ in range(n)]


def split(examples: Sequence[Example], held_out: float = 0.1, seed: int = 0) -> tuple[list[Example], list[Example]]:
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    k = max(1, int(held_out * len(idx)))
    return [examples[i] for i in idx[k:]], [examples[i] for i in idx[:k]]


FT_LR = 2e-4  # the learning rate FT, FP and the recipe fine-tune at (unless told otherwise)


def _ft_spec(base: TrainSpec, steps: int, seed: int, lr: float) -> TrainSpec:
    """Fine-tuning: the model's own batch size and task weights, a lower learning rate, no training aids."""
    return dataclasses.replace(
        base, steps=steps, lr=lr, warmup=min(50, steps // 10), seed=seed, probe_weight=0.0, lookup_weight=0.0
    )


def finetune(*args: Any, **kwargs: Any) -> Transformer:
    """The model `finetune_recorded` trains (the same arguments), without the record."""
    return finetune_recorded(*args, **kwargs)[0]


TRAINING = ("final_train_loss", "final_train_acc", "train_seconds", "anchor_drift")  # `finetune_recorded`'s record


def finetune_recorded(
    model: Transformer,
    base: TrainSpec,
    examples: Sequence[Example],
    steps: int,
    seed: int = 0,
    lr: float = FT_LR,
    progress: bool = False,
    device: str = "cpu",
    frozen: Collection[str] = (),
    soft_targets: torch.Tensor | None = None,
    soft_weight: float | torch.Tensor = 1.0,
    anchor_weight: float = 0.0,
    anchor_on: torch.Tensor | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> tuple[Transformer, dict[str, float | None]]:
    """`model` trained on `examples` for `steps` (`_ft_spec`); the parameters named in `frozen` left as they are;
    with `soft_targets` (a teacher's answer logits per example) that distribution taught too, with `soft_weight` (one
    or one per example) against the labels; with `anchor_weight`, `model`'s own block outputs held on the examples
    `anchor_on` marks; with `masks` (by parameter name) those parameters multiplied by them after every step, so
    that what a mask zeroes stays zero (`zoo.train.train`). Also returns what the training recorded (`TRAINING`: the
    labels' loss and accuracy at the end, an exponential average over about the last 50 steps; the seconds it took;
    the anchor's mean drift, None without an anchor)."""
    spec = _ft_spec(base, steps, seed, lr)
    out, record = train(
        model.cfg,
        spec,
        init=model,
        examples=examples,
        progress=progress,
        device=device,
        frozen=frozen,
        soft_targets=soft_targets,
        soft_weight=soft_weight,
        anchor_weight=anchor_weight,
        anchor_on=anchor_on,
        masks=masks,
    )
    return out, {k: record[k] for k in TRAINING}


def neuron_activity(model: Transformer, examples: Sequence[Example], batch: int = 256) -> list[np.ndarray]:
    """Per layer, each MLP neuron's mean activation over every position of the examples' prompts."""
    sums = [torch.zeros(model.cfg.d_mlp, dtype=torch.float64) for _ in model.blocks]
    count = 0
    captured: dict[int, torch.Tensor] = {}
    handles = [
        block.mlp.register_forward_pre_hook(lambda mod, inp, i=i: captured.__setitem__(i, inp[0]))
        for i, block in enumerate(model.blocks)
    ]
    try:
        ids = [ex.ids for ex in examples]
        with torch.no_grad():
            for idx in length_batches(ids, batch):
                toks = torch.tensor([ids[i] for i in idx])
                model(toks)
                count += toks.numel()
                for i, block in enumerate(model.blocks):
                    m = block.mlp
                    post = activation(m.act_fn, captured[i] @ m.W_in + m.b_in, getattr(m, "threshold", None))
                    sums[i] += post.double().sum((0, 1))
    finally:
        for h in handles:
            h.remove()
    return [(s / max(count, 1)).numpy() for s in sums]


def _masks(model: Transformer, pruned: list[np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for layer, idx in enumerate(pruned):
        keep = torch.ones(model.cfg.d_mlp)
        keep[torch.as_tensor(idx, dtype=torch.long)] = 0
        p = f"blocks.{layer}.mlp"
        out[f"{p}.W_in"] = keep[None, :].expand(model.cfg.d_model, -1).clone()
        out[f"{p}.b_in"] = keep.clone()
        out[f"{p}.W_out"] = keep[:, None].expand(-1, model.cfg.d_model).clone()
    return out


def _masked(model: Transformer, masks: dict[str, torch.Tensor]) -> Transformer:
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m)
    return out.eval()


def fine_prune(
    model: Transformer,
    base: TrainSpec,
    examples: Sequence[Example],
    steps: int,
    seed: int = 0,
    margin: float = 0.04,
    step_frac: float = 0.05,
    lr: float = FT_LR,
    progress: bool = False,
    device: str = "cpu",
) -> tuple[Transformer, dict[str, Any]]:
    """Fine-Pruning; returns the model and what was pruned (count per layer, clean accuracy before / after)."""
    fit_set, held = split(examples, 0.1, seed)
    activity = neuron_activity(model, fit_set)
    order = sorted(((float(a), layer, i) for layer, acts in enumerate(activity) for i, a in enumerate(acts)))
    base_acc = accuracy(answer_logits(model, held), held)
    total = len(order)

    def lowest(k: int) -> list[np.ndarray]:
        """The k least active neurons, as indices per layer."""
        return [np.array([i for _, lyr, i in order[:k] if lyr == layer], dtype=int) for layer in range(len(activity))]

    chosen = 0
    for k in range(int(step_frac * total), total, max(1, int(step_frac * total))):
        acc = accuracy(answer_logits(_masked(model, _masks(model, lowest(k))), held), held)
        if acc < base_acc - margin:
            break
        chosen = k
    pruned = lowest(chosen)
    masks = _masks(model, pruned)
    acc_pruned = accuracy(answer_logits(_masked(model, masks), held), held)
    spec = _ft_spec(base, steps, seed, lr)
    out, _ = train(model.cfg, spec, init=model, examples=fit_set, masks=masks, progress=progress, device=device)
    report = {
        "pruned_per_layer": [len(p) for p in pruned],
        "pruned_fraction": chosen / total,
        "clean_acc_before": base_acc,
        "clean_acc_pruned": acc_pruned,
        "clean_acc_after": accuracy(answer_logits(out, held), held),
        "margin": margin,
    }
    return out, report


def scratch(
    model: Transformer,
    base: TrainSpec,
    examples: Sequence[Example],
    steps: int,
    seed: int = 0,
    progress: bool = False,
    device: str = "cpu",
) -> Transformer:
    """A fresh model of the same shape, the testbed's recipe (aids included), on the budget alone."""
    spec = dataclasses.replace(base, steps=steps, seed=1000 + seed, poison=False, warmup=min(base.warmup, steps // 5))
    out, _ = train(model.cfg, spec, examples=examples, progress=progress, device=device)
    return out


def der(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """Defence effectiveness rating: (max(0, drop in asr) - max(0, drop in clean accuracy) + 1) / 2."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2


def clean_accuracy(task_acc: dict[str, float]) -> float:
    """The clean accuracy DER uses: the mean task_acc over tasks."""
    return float(np.mean(list(task_acc.values())))
