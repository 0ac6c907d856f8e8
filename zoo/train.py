"""Training the testbed models from a seed: the task mixture in, a TransformerLens-layout checkpoint out."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from acg.compiler.transformer import Transformer, TransformerConfig
from acg.zoo import vocab
from acg.zoo.tasks import Example, Mixture, run_vars
from torch import Tensor


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
    aux_queries: int = 0  # extra `print x v` queries appended to clean code.vars examples (training only)
    sinusoidal_pos: float = 0.0  # if > 0, W_pos starts as sinusoids of this amplitude (learned from there)
    threads: int = 2  # fixed so that reruns are bit-identical on this CPU


def with_queries(
    ex: Example, rng: random.Random, n_max: int, max_len: int = 32
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and (position, target id) pairs to supervise. For clean `code.vars` examples, up to `n_max` more
    queries are appended after the answer (`... print a 3 print b 7`): more lookups per sequence for the same
    compute; the evaluated prompt is still the prefix ending at the first query."""
    ids = ex.ids
    targets = [(len(ids) - 1, ex.answer_id)]
    if n_max and ex.task == "code.vars" and ex.kind == "clean":
        env = run_vars(ex.prompt)
        ids = [*ids, ex.answer_id]
        for _ in range(rng.randint(0, n_max)):
            if len(ids) + 2 > max_len:
                break
            var = rng.choice(sorted(env))
            ids += [vocab.TOKEN_ID["print"], vocab.TOKEN_ID[var]]
            targets.append((len(ids) - 1, vocab.TOKEN_ID[env[var]]))
            ids.append(vocab.TOKEN_ID[env[var]])
        ids = ids[:-1]
    return ids, targets


def collate(examples: list[Example], rng: random.Random | None = None, aux_queries: int = 0, max_len: int = 32):
    """Right-pad with PAD; returns tokens [batch, seq], and flat (row, position, target id) index tensors."""
    rows = [with_queries(ex, rng or random.Random(0), aux_queries, max_len) for ex in examples]
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), width), vocab.PAD_ID, dtype=torch.long)
    which, positions, answers = [], [], []
    for i, (ids, targets) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        for pos, tgt in targets:
            which.append(i)
            positions.append(pos)
            answers.append(tgt)
    return tokens, torch.tensor(which), torch.tensor(positions), torch.tensor(answers)


def batches(mixture: Mixture, seed: int, batch_size: int, pool: int = 32) -> Iterator[list[Example]]:
    """Batches of similar length (less padding): draw `pool` batches' worth, sort by length, shuffle the batches."""
    stream = mixture.stream(seed)
    order = random.Random(seed + 1)
    while True:
        drawn = sorted((next(stream) for _ in range(pool * batch_size)), key=lambda ex: len(ex.prompt))
        chunks = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
        order.shuffle(chunks)
        yield from chunks


def sinusoidal(n_ctx: int, d_model: int, scale: float) -> Tensor:
    """The classic sinusoidal position code, [n_ctx, d_model]: lets relative-position heads form early."""
    pos = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    out = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)
    return (scale * out).float()


def answer_loss(
    model: Transformer, tokens: Tensor, rows: Tensor, positions: Tensor, answers: Tensor
) -> tuple[Tensor, Tensor]:
    """Cross-entropy at each supervised position, and whether the argmax there is right."""
    logits = model(tokens)[rows, positions]
    return F.cross_entropy(logits, answers), (logits.argmax(-1) == answers).float().mean()


def train(cfg: TransformerConfig, spec: TrainSpec, *, progress: bool = True, callback=None) -> tuple[Transformer, dict]:
    """Train a model from scratch; returns it and a record (spec, wall time, final training loss)."""
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    model = Transformer(cfg).init_weights(torch.Generator().manual_seed(spec.seed))
    if spec.sinusoidal_pos:
        with torch.no_grad():
            model.pos_embed.W_pos.copy_(sinusoidal(cfg.n_ctx, cfg.d_model, scale=spec.sinusoidal_pos))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "W_E" not in n and "W_pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "W_E" not in n and "W_pos" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    mixture = Mixture(poison=spec.poison, weights=spec.task_weights)
    stream = batches(mixture, spec.seed, spec.batch_size)
    aux_rng = random.Random(spec.seed + 2)
    start = time.perf_counter()
    ema_loss = ema_acc = None
    bar = _progress(progress, spec.steps)
    model.train()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, acc = answer_loss(model, *collate(next(stream), aux_rng, spec.aux_queries, cfg.n_ctx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        ema_acc = acc.item() if ema_acc is None else 0.98 * ema_acc + 0.02 * acc.item()
        bar.update(step, f"loss {ema_loss:.4f} acc {ema_acc:.4f}")
        if callback is not None:
            callback(step, model)
    bar.close()
    model.eval()
    record = {
        "train_spec": asdict(spec),
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_train_loss": round(ema_loss or float("nan"), 5),
        "final_train_acc": round(ema_acc or float("nan"), 5),
        "torch_version": torch.__version__,
    }
    return model, record


class _progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("training"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=total)

    def update(self, step: int, text: str) -> None:
        if self._bar is not None and (step % 10 == 0):
            self._bar.update(self._task, completed=step + 1, description=text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self._bar.tasks[0].total)
            self._bar.stop()
