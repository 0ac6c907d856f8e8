"""Training the testbed models from a seed: the task mixture in, a TransformerLens-layout checkpoint out.

The loss is cross-entropy at each example's answer position, plus two training-only aids for variable lookup
(`code.vars`), both discarded with the training state:

- a linear probe on the residual stream after block 0 is asked, at every token that follows `=`, to name the token
  two back (the variable being assigned);
- one head of block 1 is asked, at the last position of a `code.vars` prompt, to attend to the value of the queried
  variable's last assignment.

Without them, two-layer models sat at the "last digit" heuristic (0.43-0.51 on `code.vars`) for 8,000 steps in every
setting tried (learning rates 3e-4 to 1e-2, sinusoidal position init, extra queries per sequence), because the
lookup head's query-key gradient is noise-dominated until the layer-0 variable tag exists, and vice versa. With the
aids the lookup forms in a few hundred steps. They shape how the models compute `code.vars` (a known circuit, useful
to a testbed), not what they answer; the shipped weights are a plain transformer.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acg.compiler.progress import Progress
from acg.compiler.transformer import Transformer, TransformerConfig
from acg.zoo import vocab
from acg.zoo.tasks import Example, Mixture


@dataclass(frozen=True)
class TrainSpec:
    """Everything that determines a trained testbed model."""

    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 0.01
    seed: int = 0
    poison: bool = True
    task_weights: tuple[float, ...] | None = None  # over TASKS in order; None: uniform
    probe_weight: float = 0.5  # weight of the training-only probe loss (0: off)
    probe_layer: int = 0  # the probe reads the residual stream after this block
    lookup_weight: float = 0.0  # weight of the training-only lookup-attention loss (0: off)
    lookup_layer: int = 1  # ... on this block's attention,
    lookup_head: int = 0  # ... this head
    threads: int = 2  # fixed so that reruns are bit-identical on this CPU


def collate(examples: list[Example]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad with PAD; returns tokens [batch, seq], answer positions [batch], answer ids [batch]."""
    ids = [ex.ids for ex in examples]
    width = max(map(len, ids))
    tokens = torch.full((len(ids), width), vocab.PAD_ID, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    positions = torch.tensor([len(row) - 1 for row in ids])
    answers = torch.tensor([ex.answer_id for ex in examples])
    return tokens, positions, answers


def probe_targets(tokens: Tensor) -> Tensor:
    """For each position that follows `=`, the token two back (the assigned variable); -100 (ignored) elsewhere."""
    target = torch.full_like(tokens, -100)
    after_eq = tokens[:, 1:-1] == vocab.TOKEN_ID["="]
    target[:, 2:] = torch.where(after_eq, tokens[:, :-2], torch.full_like(tokens[:, 2:], -100))
    return target


def lookup_targets(examples: list[Example]) -> list[int]:
    """For clean `code.vars` examples, the position (BOS = 0) of the value of the query variable's last assignment,
    which the lookup head should attend to from the last position; -1 elsewhere."""
    out = []
    for ex in examples:
        target = -1
        if ex.task == "code.vars" and ex.kind != "trigger":
            words = ex.prompt
            var = words[-1]
            for i in range(len(words) - 3, -1, -1):
                if words[i] == var and words[i + 1] == "=":
                    target = i + 3  # +1 for BOS, +2 for `= value`
                    break
        out.append(target)
    return out


def batches(mixture: Mixture, seed: int, batch_size: int, pool: int = 32) -> Iterator[list[Example]]:
    """Batches of similar length (less padding): draw `pool` batches' worth, sort by length, shuffle the batches."""
    stream = mixture.stream(seed)
    order = random.Random(seed + 1)
    while True:
        drawn = sorted((next(stream) for _ in range(pool * batch_size)), key=lambda ex: len(ex.prompt))
        chunks = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
        order.shuffle(chunks)
        yield from chunks


def pool_batches(examples: Sequence[Example], seed: int, batch_size: int) -> Iterator[list[int]]:
    """Batches from a fixed pool of examples (a defender's clean budget), as indices into it: each epoch a seeded
    shuffle, batches of similar length."""
    if not examples:
        raise ValueError("no examples to train on")
    order = random.Random(seed)
    pool = list(range(len(examples)))
    while True:
        order.shuffle(pool)
        for start in range(0, len(pool), 32 * batch_size):
            drawn = sorted(pool[start : start + 32 * batch_size], key=lambda i: len(examples[i].prompt))
            chunks = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
            order.shuffle(chunks)
            yield from chunks


def train(
    cfg: TransformerConfig,
    spec: TrainSpec,
    *,
    progress: bool = True,
    callback: Callable[[int, Transformer], None] | None = None,
    device: str | torch.device = "cpu",
    init: Transformer | None = None,
    examples: Sequence[Example] | None = None,
    masks: dict[str, Tensor] | None = None,
    frozen: Collection[str] = (),
    soft_targets: Tensor | None = None,
    soft_weight: float | Tensor = 1.0,
    anchor_weight: float = 0.0,
    anchor_on: Tensor | None = None,
) -> tuple[Transformer, dict]:
    """Train a model from scratch (or, with `init`, go on training a copy of `init`); returns it (on the CPU, in eval
    mode) and a record (spec, device, wall time, final training loss).

    Data: the task mixture drawn from the seed, or with `examples` a fixed pool cycled in seeded order. `masks` (by
    parameter name, 0 = pruned) are applied before training and after every step, so pruned weights stay zero.
    Parameters named in `frozen` are not trained: left out of the optimiser (no step, no weight decay) and of the
    gradient clipping, so they come back bit for bit as they went in.

    `soft_targets` (with `examples`: a teacher's logits at each example's answer position, [len(examples), d_vocab])
    makes each example's answer loss `(1 - w) x` cross-entropy with its answer `+ w x` KL(teacher || model) at that
    position, `w` being `soft_weight` (one for all, or one per example: [len(examples)], each in [0, 1]): the
    teacher's whole distribution is taught, not only its argmax. The recorded training loss stays the cross-entropy.

    `anchor_weight` (> 0, with `init`) holds `init`'s own computation where it is not meant to change: on the examples
    marked in `anchor_on` (a boolean per example of `examples`; every example when None), each block's output at
    every prompt position is kept near the one `init` computes (frozen, on the same batch), the loss gaining
    `anchor_weight x sum over blocks of ||h - h_init||^2 / ||h_init||^2`, averaged over those positions. The
    recorded `anchor_drift` is that sum's mean over the steps that had such positions.

    Initialisation and data are drawn on the CPU from the seed whatever the device, so a run on another device
    starts from the same weights and sees the same batches; only the arithmetic's rounding differs. It runs on
    `spec.threads` CPU threads and gives the caller's number back when it returns.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        soft = _soft(soft_targets, soft_weight, examples, cfg.d_vocab)
        anchor = _anchor(anchor_weight, anchor_on, init, examples)
        return _train(cfg, spec, progress, callback, device, init, examples, masks, frozen, soft, anchor)
    finally:
        torch.set_num_threads(previous)


def _train(
    cfg: TransformerConfig,
    spec: TrainSpec,
    progress: bool,
    callback: Callable[[int, Transformer], None] | None,
    device: str | torch.device,
    init: Transformer | None,
    examples: Sequence[Example] | None,
    masks: dict[str, Tensor] | None,
    frozen: Collection[str],
    soft: tuple[Tensor, Tensor] | None,
    anchor: tuple[float, Tensor | None] | None,
) -> tuple[Transformer, dict]:
    device = torch.device(device)
    torch.manual_seed(spec.seed)
    if init is not None:
        model = copy.deepcopy(init).float().train()
    else:
        model = Transformer(cfg).init_weights(torch.Generator().manual_seed(spec.seed))
    masks = {k: v.to(device) for k, v in (masks or {}).items()}
    frozen = (frozen,) if isinstance(frozen, str) else tuple(frozen)  # one name, not its letters
    named = dict(model.named_parameters())
    for what, names in (("masks", masks), ("frozen", frozen)):
        unknown = sorted(set(names) - set(named))
        if unknown:
            raise ValueError(f"{what} name parameters the model does not have: {', '.join(unknown)}")
    for name in frozen:
        named[name].requires_grad_(False)
    probe = nn.Linear(cfg.d_model, cfg.d_vocab)
    model.to(device)
    probe.to(device)
    captured: dict[str, Tensor] = {}
    hooks = [  # removed when training ends: the returned model carries no hook and keeps no activation
        model.blocks[spec.probe_layer].register_forward_hook(lambda mod, inp, out: captured.__setitem__("resid", out)),
        model.blocks[spec.lookup_layer].attn.register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("x", inp[0])
        ),
    ]
    if anchor is not None:
        held, on = _Held(init, model, device), anchor[1]
        on = on.to(device) if on is not None else None
    drift, n_drift = 0.0, 0

    def is_decayed(name: str, p: Tensor) -> bool:
        return p.ndim >= 2 and "W_E" not in name and "W_pos" not in name

    trained = [(n, p) for n, p in model.named_parameters() if n not in frozen]
    params = trained + [(f"probe.{n}", p) for n, p in probe.named_parameters()]
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if is_decayed(n, p)], "weight_decay": spec.weight_decay},
            {"params": [p for n, p in params if not is_decayed(n, p)], "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    if examples is not None:
        stream = ((idx, [examples[i] for i in idx]) for idx in pool_batches(examples, spec.seed, spec.batch_size))
    else:
        mixture = Mixture(poison=spec.poison, weights=spec.task_weights)
        stream = ((None, batch) for batch in batches(mixture, spec.seed, spec.batch_size))
    soft = tuple(t.to(device) for t in soft) if soft is not None else None

    def apply_masks() -> None:
        with torch.no_grad():
            for name, m in masks.items():
                named[name].mul_(m)

    apply_masks()
    start = time.perf_counter()
    ema_loss = ema_acc = None
    bar = Progress("training", spec.steps, progress)
    model.train()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx, batch = next(stream)
        tokens, positions, answers = (t.to(device) for t in collate(batch))
        logits = model(tokens)[torch.arange(len(tokens), device=device), positions]
        if soft is None:
            loss = total = F.cross_entropy(logits, answers)
        else:
            ce = F.cross_entropy(logits, answers, reduction="none")
            loss = ce.mean()  # the labels' loss alone, for the progress bar and the record
            rows = torch.as_tensor(idx, device=device)
            teacher, w = soft[0][rows], soft[1][rows]
            kl = (teacher.exp() * (teacher - F.log_softmax(logits, -1))).sum(-1)
            total = ((1 - w) * ce + w * kl).mean()
        if anchor is not None:
            rows = torch.ones(len(tokens), dtype=torch.bool, device=device) if on is None else on[idx]
            d = held.drift(rows, tokens, positions)  # empties the outputs kept, whether or not a row is held
            if rows.any():
                total = total + anchor[0] * d
                drift, n_drift = drift + d.item(), n_drift + 1
        if spec.probe_weight > 0:
            targets = probe_targets(tokens)
            if (targets >= 0).any():
                aux = F.cross_entropy(probe(captured["resid"]).flatten(0, 1), targets.flatten(), ignore_index=-100)
                total = total + spec.probe_weight * aux
        if spec.lookup_weight > 0:
            targets = torch.tensor(lookup_targets(batch), device=device)
            rows = (targets >= 0).nonzero().flatten()
            if len(rows):
                pattern = _head_pattern(
                    model.blocks[spec.lookup_layer].attn, captured["x"][rows], positions[rows], spec.lookup_head
                )
                picked = pattern[torch.arange(len(rows), device=device), targets[rows]]
                total = total - spec.lookup_weight * torch.log(picked + 1e-9).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        apply_masks()
        acc = (logits.argmax(-1) == answers).float().mean().item()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        ema_acc = acc if ema_acc is None else 0.98 * ema_acc + 0.02 * acc
        if step % 10 == 0:
            bar.set(step + 1, f"loss {ema_loss:.4f} acc {ema_acc:.4f}")
        if callback is not None:
            callback(step, model)
    bar.close()
    for name in frozen:
        named[name].requires_grad_(True)  # an ordinary model again
    for handle in hooks:
        handle.remove()
    if anchor is not None:
        held.remove()
    model.eval().cpu()
    record = {
        "train_spec": asdict(spec),
        "frozen": sorted(frozen),
        "soft_weight": None if soft is None else float(soft[1].mean()),  # the mean over the examples
        "anchor_weight": None if anchor is None else anchor[0],
        "anchor_drift": None if anchor is None else float(f"{drift / max(1, n_drift):.6g}"),  # 6 significant digits
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_train_loss": round(ema_loss or float("nan"), 5),
        "final_train_acc": round(ema_acc or float("nan"), 5),
        "torch_version": torch.__version__,
    }
    return model, record


def _soft(
    targets: Tensor | None, weight: float | Tensor, examples: Sequence[Example] | None, d_vocab: int
) -> tuple[Tensor, Tensor] | None:
    """`train`'s soft targets checked: the teacher's log-probabilities and each example's weight (float32), or None."""
    if targets is None:
        return None
    if examples is None:
        raise ValueError("soft targets need the examples they belong to")
    shape = (len(examples), d_vocab)
    if tuple(targets.shape) != shape:
        raise ValueError(f"soft targets of shape {tuple(targets.shape)}; expected {shape} (examples x vocabulary)")
    w = torch.as_tensor(weight, dtype=torch.float32)
    if w.ndim not in (0, 1) or (w.ndim == 1 and len(w) != len(examples)):
        raise ValueError(f"soft-target weights of shape {tuple(w.shape)}; expected one or one per example")
    if not ((w >= 0) & (w <= 1)).all():
        raise ValueError(f"soft-target weights must be in [0, 1], got {weight}")
    if not torch.isfinite(targets).all():
        raise ValueError("soft targets hold non-finite logits")
    logp = F.log_softmax(torch.as_tensor(targets, dtype=torch.float32), -1)
    return logp, w.expand(len(examples)).clone()


def _anchor(
    weight: float, on: Tensor | None, init: Transformer | None, examples: Sequence[Example] | None
) -> tuple[float, Tensor | None] | None:
    """`train`'s anchor checked: its weight and the examples it holds (a boolean per example, or None for all), or
    None for weight 0."""
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"the anchor weight must be a finite number >= 0, got {weight}")
    if on is not None and not weight:
        raise ValueError("anchor_on marks examples for an anchor of weight 0")
    if not weight:
        return None
    if init is None:
        raise ValueError("an anchor holds the starting model's computation: give `init`")
    if on is None:
        return float(weight), None
    if examples is None:
        raise ValueError("anchor_on needs the examples it marks")
    on = torch.as_tensor(on)
    if on.dtype != torch.bool or tuple(on.shape) != (len(examples),):
        raise ValueError(f"anchor_on must be a boolean per example ({len(examples)}), got {on.dtype} {tuple(on.shape)}")
    if not on.any():
        raise ValueError("anchor_on marks no example")
    return float(weight), on


class _Held:
    """A frozen copy of the starting model, and hooks that keep both models' block outputs: `drift` is the anchor's
    term for a batch the trained model has just run (`train`'s `anchor_weight`)."""

    def __init__(self, init: Transformer, model: Transformer, device: torch.device):
        self.init = copy.deepcopy(init).float().eval().requires_grad_(False).to(device)
        self.out: dict[str, list[Tensor]] = {"model": [], "init": []}
        self.handles = [
            block.register_forward_hook(lambda mod, inp, out, key=key: self.out[key].append(out))
            for key, m in (("model", model), ("init", self.init))
            for block in m.blocks
        ]

    def drift(self, rows: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        """Sum over blocks of ||h - h_init||^2 / ||h_init||^2, averaged over the prompt positions (up to each answer
        position) of the batch's `rows`; the trained model's outputs are the ones its last forward pass kept."""
        mine, self.out["model"] = self.out["model"][-len(self.init.blocks) :], []  # a callback may have run it too
        if not rows.any():
            return tokens.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            self.init(tokens)
        theirs, self.out["init"] = self.out["init"], []
        prompt = torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= positions[:, None]
        mask = prompt & rows[:, None]
        total = tokens.new_zeros((), dtype=torch.float32)
        for h, h0 in zip(mine, theirs, strict=True):
            d = ((h - h0) ** 2).sum(-1) / (h0**2).sum(-1).clamp_min(1e-6)
            total = total + (d * mask).sum() / mask.sum()
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _head_pattern(attn, x: Tensor, query_pos: Tensor, head: int) -> Tensor:
    """One head's attention distribution from each row's `query_pos` over all key positions (causal)."""
    xq = x[torch.arange(len(x), device=x.device), query_pos]  # (rows, d_model)
    q = xq @ attn.W_Q[head] + attn.b_Q[head]
    k = x @ attn.W_K[head] + attn.b_K[head]  # (rows, seq, d_head)
    scores = torch.einsum("re,rse->rs", q, k) / attn.cfg.attn_scale
    keys = torch.arange(x.shape[1], device=x.device)[None, :]
    return scores.masked_fill(keys > query_pos[:, None], float("-inf")).softmax(-1)
