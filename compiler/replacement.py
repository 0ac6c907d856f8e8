"""The replacement model in torch: the original with every MLP swapped for its transcoder (errors dropped). It computes
what the feature-level IR without error terms computes (tested), only faster; fitting and evaluation use it."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from acg.compiler.transcoder import Transcoder
from acg.compiler.transformer import Transformer


class TranscoderMLP(nn.Module):
    def __init__(self, tc: Transcoder, dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, arr in tc.tensors().items():
            self.register_buffer(name, torch.as_tensor(arr, dtype=dtype))
        self.act = tc.act

    def features(self, x: Tensor) -> Tensor:
        pre = x @ self.W_enc + self.b_enc
        if self.act == "relu":
            return pre.relu()
        if self.act == "jumprelu":
            return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))
        if self.act == "gelu":
            return torch.nn.functional.gelu(pre)
        if self.act == "gelu_tanh":
            return torch.nn.functional.gelu(pre, approximate="tanh")
        return torch.nn.functional.silu(pre)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x) @ self.W_dec + self.b_dec


def replacement_model(
    model: Transformer, transcoders: tuple[Transcoder, ...] | list[Transcoder], layers: list[int] | None = None
) -> Transformer:
    """A copy of `model` whose MLPs (all, or those in `layers`) are transcoders."""
    out = copy.deepcopy(model)
    dtype = next(out.parameters()).dtype
    for layer, tc in enumerate(transcoders):
        if layers is None or layer in layers:
            out.blocks[layer].mlp = TranscoderMLP(tc, dtype)
    return out.eval()


def replacement_fidelity(model, transcoders, n: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Replacement model (every MLP its transcoder, errors dropped) against the original on held-out testbed prompts:
    `agreement`, `kl` and `task_acc` of both."""
    import numpy as np

    from acg.roundtrip.evaluate import accuracy, agreement, answer_logits, kl
    from acg.zoo.tasks import TASKS, heldout

    repl = replacement_model(model, transcoders)
    out: dict[str, Any] = {"task_acc": {}, "task_acc_original": {}}
    all_a, all_b = [], []
    for task in TASKS:
        exs = heldout(task, n, seed)
        a, b = answer_logits(model, exs), answer_logits(repl, exs)
        out["task_acc_original"][task] = accuracy(a, exs)
        out["task_acc"][task] = accuracy(b, exs)
        all_a.append(a)
        all_b.append(b)
    a, b = np.concatenate(all_a), np.concatenate(all_b)
    out["agreement"] = agreement(a, b)
    out["kl"] = kl(a, b)
    return out
