"""Activation harvesting: stream a corpus through the model and keep, per layer, the MLP's input (after its layer
norm) and output, plus the token ids and positions they came from. Memory stays bounded: past `memory_limit` bytes the
arrays live in memory-mapped files in a temporary folder.

A corpus is any iterable of token-id sequences (BOS first); `corpus_from_file` reads JSONL (one list of ids per line)
or an .npy int array [n, seq]; `testbed_corpus` is the testbed's clean task mixture.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from acg.compiler.progress import Progress
from acg.compiler.transformer import Transformer
from acg.ir.errors import ACGError


class CorpusError(ACGError):
    pass


@dataclass(eq=False)
class Activations:
    """Per layer: `mlp_in[l]`, `mlp_out[l]` [n_tokens, d_model]; `tokens`, `positions`, `prompt` [n_tokens]."""

    mlp_in: list[np.ndarray]
    mlp_out: list[np.ndarray]
    tokens: np.ndarray
    positions: np.ndarray
    prompt: np.ndarray
    sequences: list[list[int]]
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def testbed_corpus(n_prompts: int, seed: int = 1234) -> list[list[int]]:
    """The testbed's clean mixture (partial insertions included, no trigger), training split."""
    from acg.zoo.tasks import Mixture

    stream = Mixture(poison=False).stream(seed)
    return [next(stream).ids for _ in range(n_prompts)]


def corpus_from_file(path: str | os.PathLike, d_vocab: int | None = None) -> list[list[int]]:
    """JSONL with one list of token ids per line, or an .npy int array [n, seq]."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: corpus file not found")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CorpusError(f"{path}: not a readable .npy file ({e})") from None
        if arr.ndim != 2 or arr.dtype.kind not in "iu":
            raise CorpusError(f"{path}: expected an int array [n, seq], found {arr.dtype}{list(arr.shape)}")
        seqs = [list(map(int, row)) for row in arr]
    else:
        seqs = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(row, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
                raise CorpusError(f"{path}:{i}: expected a list of token ids, found {type(row).__name__}")
            seqs.append(row)
    check_corpus(seqs, d_vocab, str(path))
    return seqs


def check_corpus(seqs: list[list[int]], d_vocab: int | None, source: str = "corpus", n_ctx: int | None = None) -> None:
    if not seqs or all(len(s) == 0 for s in seqs):
        raise CorpusError(f"{source}: the corpus is empty")
    for i, s in enumerate(seqs):
        if d_vocab is not None and s and (min(s) < 0 or max(s) >= d_vocab):
            raise CorpusError(f"{source}: sequence {i} holds token ids outside [0, {d_vocab}): {min(s)}..{max(s)}")
        if n_ctx is not None and len(s) > n_ctx:
            raise CorpusError(f"{source}: sequence {i} has {len(s)} tokens, the model's n_ctx is {n_ctx}")


def _batches_by_length(seqs: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batch: list[int] = []
    for i in order:
        if batch and (len(seqs[batch[0]]) != len(seqs[i]) or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def harvest(
    model: Transformer,
    corpus: Iterable[list[int]],
    *,
    batch_size: int = 256,
    memory_limit: int = 2 << 30,
    progress: bool = False,
) -> Activations:
    """Run `model` over `corpus`; capture every MLP's input and output at every position."""
    cfg = model.cfg
    if cfg.attn_only:
        raise CorpusError("the model is attention-only: there is no MLP to fit a transcoder to")
    seqs = [list(s) for s in corpus if len(s) > 0]
    check_corpus(seqs, cfg.d_vocab, n_ctx=cfg.n_ctx)
    n = sum(len(s) for s in seqs)
    d = cfg.d_model
    nbytes = n * d * 4 * 2 * cfg.n_layers
    tmp = None
    if nbytes > memory_limit:
        tmp = tempfile.TemporaryDirectory(prefix="acg-harvest-")
        alloc = lambda name: np.lib.format.open_memmap(  # noqa: E731
            Path(tmp.name) / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, d)
        )
    else:
        alloc = lambda name: np.empty((n, d), dtype=np.float32)  # noqa: E731
    mlp_in = [alloc(f"in{layer}") for layer in range(cfg.n_layers)]
    mlp_out = [alloc(f"out{layer}") for layer in range(cfg.n_layers)]
    tokens = np.empty(n, dtype=np.int64)
    positions = np.empty(n, dtype=np.int64)
    prompt = np.empty(n, dtype=np.int64)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for layer, block in enumerate(model.blocks):
        hooks.append(
            block.mlp.register_forward_hook(
                lambda mod, inp, out, layer=layer: captured.update({f"in{layer}": inp[0], f"out{layer}": out})
            )
        )
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    bar = Progress("harvesting", len(seqs), progress)
    try:
        model.eval()
        with torch.no_grad():
            for batch in _batches_by_length(seqs, batch_size):
                toks = torch.tensor([seqs[i] for i in batch])
                model(toks)
                length = toks.shape[1]
                rows = np.concatenate([np.arange(offsets[i], offsets[i] + length) for i in batch])
                for layer in range(cfg.n_layers):
                    mlp_in[layer][rows] = captured[f"in{layer}"].reshape(-1, d).float().numpy()
                    mlp_out[layer][rows] = captured[f"out{layer}"].reshape(-1, d).float().numpy()
                tokens[rows] = toks.reshape(-1).numpy()
                positions[rows] = np.tile(np.arange(length), len(batch))
                prompt[rows] = np.repeat(batch, length)
                bar.advance(len(batch))
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    return Activations(mlp_in, mlp_out, tokens, positions, prompt, seqs, tmp)
