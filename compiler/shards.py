"""A sharded activation store: harvested MLP inputs and outputs as fixed-size safetensors shards with a manifest, so
that any number of workers can write disjoint slices of a corpus and any number of readers can stream them in a
shuffled, seeded order while holding one shard at a time.

    folder/
      manifest.json                  schema, model hash, config, layers, shard list (prompt range, token count)
      parts/rank{r}.json             what worker r wrote (merged into manifest.json by `merge`)
      shards/shard{k:05d}.safetensors   tensors in.L{l}, out.L{l} (float32 [rows, d_model]), tokens, positions

The corpus is cut, in order, into chunks of about `shard_tokens` tokens; shard k is chunk k, and worker r of w writes
shards r, r + w, ...: the store is the same whatever the number of workers, and memory stays bounded by one chunk.
Each shard is written atomically and records the model's hash and its prompt range, so a stopped harvest resumes:
shards already written for this model and these prompts are kept, the rest are harvested.

Reading: the shards are dealt to `n_streams` logical streams (shard k to stream k mod n_streams); a stream walks its
shards in a seeded random order each epoch and the rows of each shard in a seeded random order, and hands out fixed-size
batches. Its position is three integers (epoch, shard, row), saved in checkpoints, so a resumed run reads exactly what
an uninterrupted one would have. Streams, not processes, define the data order: two processes owning one stream each
read what one process owning both reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as st_save

from acg.compiler.harvest import check_corpus, harvest
from acg.ir.atomic import atomic_file
from acg.ir.errors import ACGError

SCHEMA, VERSION = "acg.shards", 1


class ShardError(ACGError):
    pass


def model_hash(model) -> str:
    """sha256 of the model's config and weights: a store is only read for the model it was harvested from."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def chunks(corpus: list[list[int]], shard_tokens: int) -> list[list[int]]:
    """The corpus (empty prompts left out) cut in order into chunks of about `shard_tokens` tokens: shard k holds
    chunk k whoever writes it, so the store does not depend on the number of workers."""
    out, chunk, size = [], [], 0
    for i, seq in enumerate(corpus):
        if not seq:
            continue
        chunk.append(i)
        size += len(seq)
        if size >= shard_tokens:
            out.append(chunk)
            chunk, size = [], 0
    if chunk:
        out.append(chunk)
    return out


def write_part(
    model, corpus: list[list[int]], folder: str | os.PathLike, *, rank: int = 0, world: int = 1, shard_tokens=65536
) -> dict[str, Any]:
    """Harvest shards rank, rank + world, ... of `corpus` into `folder/shards/` (each written atomically), and record
    them in `folder/parts/rank{rank}.json`."""
    folder = Path(folder)
    cfg = model.cfg
    seqs = [list(s) for s in corpus]
    check_corpus([s for s in seqs if s], cfg.d_vocab, n_ctx=cfg.n_ctx)
    shards = []
    digest = model_hash(model)
    for k, chunk in enumerate(chunks(seqs, shard_tokens)):
        if k % world != rank:
            continue
        name = f"shards/shard{k:05d}.safetensors"
        done = _written(folder / name, digest, chunk)
        if done is not None:  # written (atomically) by an earlier run that was stopped: harvesting resumes after it
            shards.append({"index": k, "file": name, "tokens": done, "prompts": [chunk[0], chunk[-1] + 1]})
            continue
        acts = harvest(model, [seqs[i] for i in chunk])
        tensors = {"tokens": acts.tokens, "positions": acts.positions}
        for layer in range(cfg.n_layers):
            tensors[f"in.L{layer}"] = np.asarray(acts.mlp_in[layer])
            tensors[f"out.L{layer}"] = np.asarray(acts.mlp_out[layer])
        with atomic_file(folder / name, "wb") as f:
            # one metadata key: safetensors writes several in no fixed order, and the store must be byte-stable
            f.write(st_save(tensors, metadata={"acg": _stamp(digest, chunk)}))
        shards.append({"index": k, "file": name, "tokens": int(acts.n_tokens), "prompts": [chunk[0], chunk[-1] + 1]})
    part = {
        "rank": rank,
        "world": world,
        "model_hash": model_hash(model),
        "shards": shards,
        "shard_tokens": shard_tokens,
    }
    with atomic_file(folder / "parts" / f"rank{rank}.json") as f:
        f.write(json.dumps(part, indent=1, sort_keys=True) + "\n")
    return part


def _stamp(digest: str, chunk: list[int]) -> str:
    return json.dumps({"model_hash": digest, "prompts": [chunk[0], chunk[-1] + 1]}, sort_keys=True)


def _written(file: Path, digest: str, chunk: list[int]) -> int | None:
    """The token count of a shard an earlier run wrote for this model and these prompts, else None."""
    if not file.exists():
        return None
    try:
        with safe_open(str(file), framework="np") as f:
            if (f.metadata() or {}).get("acg") != _stamp(digest, chunk):
                return None
            return int(f.get_slice("tokens").get_shape()[0])
    except Exception:  # unreadable: harvest it again
        return None


def merge(folder: str | os.PathLike, model, world: int) -> dict[str, Any]:
    """Join the workers' parts into `manifest.json` (checking they all harvested this model), shards in order."""
    folder = Path(folder)
    digest = model_hash(model)
    shards = []
    for rank in range(world):
        file = folder / "parts" / f"rank{rank}.json"
        try:
            part = json.loads(file.read_text())
        except FileNotFoundError:
            raise ShardError(f"{file}: missing (worker {rank} of {world} has not written its part)") from None
        if part.get("model_hash") != digest:
            raise ShardError(f"{file}: harvested from another model (its model hash differs)")
        shards += part["shards"]
    shards.sort(key=lambda s: s["index"])
    if [s["index"] for s in shards] != list(range(len(shards))):
        raise ShardError(f"{folder}: the parts do not cover shards 0..{len(shards) - 1} once each")
    manifest = {
        "schema": SCHEMA,
        "version": VERSION,
        "model_hash": digest,
        "config": model.cfg.to_dict(),
        "layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "workers": world,
        "shards": shards,
        "tokens": sum(s["tokens"] for s in shards),
    }
    with atomic_file(folder / "manifest.json") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike, model=None) -> dict[str, Any]:
    file = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ShardError(f"{file}: missing (harvest with `write_part` on every worker, then `merge`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or manifest.get("version") != VERSION:
        raise ShardError(f"{file}: not an acg shard manifest (schema {SCHEMA!r}, version {VERSION})")
    if model is not None and manifest["model_hash"] != model_hash(model):
        raise ShardError(f"{file}: harvested from another model (its model hash differs)")
    return manifest


@dataclass
class Stream:
    """One logical stream of rows of one layer: its shards, seed and position (epoch, shard, row)."""

    folder: Path
    files: list[str]
    layer: int
    seed: int
    epoch: int = 0
    shard: int = 0
    row: int = 0

    def __post_init__(self) -> None:
        if not self.files:
            raise ShardError("a stream with no shards: use fewer streams than shards")
        self._cache: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "row": self.row}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.shard, self.row = int(state["epoch"]), int(state["shard"]), int(state["row"])

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The current shard's (x, y), rows permuted; one shard in memory at a time."""
        key = (self.epoch, self.shard)
        if self._cache is None or self._cache[0] != key:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files))
            file = self.folder / self.files[order[self.shard]]
            with safe_open(str(file), framework="np") as f:
                x, y = f.get_tensor(f"in.L{self.layer}"), f.get_tensor(f"out.L{self.layer}")
            perm = np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(len(x))
            self._cache = (key, x[perm], y[perm])
        return self._cache[1], self._cache[2]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, need = [], [], n
        while need:
            x, y = self._rows()
            take = min(need, len(x) - self.row)
            xs.append(x[self.row : self.row + take])
            ys.append(y[self.row : self.row + take])
            self.row += take
            need -= take
            if self.row == len(x):
                self.row, self.shard = 0, self.shard + 1
                if self.shard == len(self.files):
                    self.shard, self.epoch = 0, self.epoch + 1
        return torch.as_tensor(np.concatenate(xs)), torch.as_tensor(np.concatenate(ys))


def streams(folder: str | os.PathLike, layer: int, n_streams: int, seed: int, ids: list[int]) -> list[Stream]:
    """Streams `ids` of `n_streams` over the store's shards for `layer` (shard k goes to stream k mod n_streams)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = [s["file"] for s in manifest["shards"]]
    if len(files) < n_streams:
        raise ShardError(f"{folder}: {len(files)} shard(s) for {n_streams} streams; harvest smaller shards")
    return [Stream(folder, files[i::n_streams], layer, seed * 1000 + i) for i in ids]


__all__ = ["ShardError", "Stream", "merge", "model_hash", "read_manifest", "streams", "write_part"]
