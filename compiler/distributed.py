"""Data-parallel transcoder training on `torch.distributed` (gloo on CPU, NCCL on GPU, launched with `torchrun`), from
the sharded activation store, with checkpoints and exact resume.

The data order belongs to `n_streams` logical streams (see `shards.py`); each process owns `n_streams / world` of
them. A step's batch is one block of `batch_size / n_streams` rows from every stream; the loss is the mean of the
streams' losses (BatchTopK taken within each stream's block), so the gradient does not depend on how many processes
share the streams: DDP all-reduces the processes' gradients (each process weights its streams by world / n_streams,
and DDP averages over the world). What else must agree across processes is made to:

- the units the fit trains in (spread of inputs and targets, mean target) come from one pass over all shards, summed
  across processes in float64 (`all_reduce`);
- the first step's output scale, dead-feature resampling and the final JumpReLU calibration use stream 0's rows on
  the process that owns it, and the new parameters are broadcast;
- dead-feature counts are summed across processes before the resampling decision.

So a 2-process run ends where a 1-process run with the same streams and seed ends, up to the order of floating-point
sums (tested). `fit_distributed` runs the whole fit this way: the sharded harvest, each layer data- or layer-parallel,
the end-to-end fine-tuning (each process its share of every batch), and the ACG's statistics from the store (counts
and error sums all-reduced; pair statistics and labels, both bounded, on rank 0).

Every `checkpoint_every` steps the dictionary, Adam's state, the dead-feature counts, the generator and every
stream's position are written (atomically, by rank 0, the positions gathered from every process); a run
restarted with the same arguments continues from the last checkpoint and ends exactly where an uninterrupted run
ends.

Per step each process sends and receives one all-reduce of the gradients: 2 x d_model x width + width + d_model (+ width
thresholds) floats, 4 bytes each (for testbed-m, d_model 256 x width 2,048: about 4 MB a step); the rest is a few
scalars, and a broadcast of the dictionary at each resampling.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import save_file as st_save_file

from acg.compiler.shards import Stream, read_manifest, streams
from acg.compiler.transcoder import FitConfig, TranscoderError, _Module, _resample
from acg.ir.atomic import atomic_dir

_LOCAL: ContextVar[bool] = ContextVar("acg_local_training", default=False)


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Train as if alone (layer-parallel: each process fits whole layers of its own)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def _world() -> tuple[int, int]:
    if not _LOCAL.get() and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group `torchrun` describes (gloo on CPU, NCCL where CUDA is); alone when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _world()


def leave_group() -> bool:
    """Leave torchrun's process group together: a barrier, then the group torn down (True; False where there was no
    group). A rank that exits while another still holds the group can abort in gloo's teardown ("terminate called
    without an active exception"); end the process with `exit_now` after it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def exit_now(code: int = 0) -> NoReturn:
    """End the process once its output is flushed, skipping the interpreter's finalisation: after `leave_group`,
    gloo's worker threads can still abort there (SIGABRT, "terminate called without an active exception"), rarely,
    and turn a run that finished and wrote its results into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fit_distributed(
    model,
    corpus: list[list[int]],
    spec,
    *,
    store: str | os.PathLike,
    n_streams: int | None = None,
    parallel: str = "data",
    checkpoint: str | os.PathLike | None = None,
    shard_tokens: int = 65536,
    meta: dict | None = None,
):
    """Every process calls this: harvest its slice into the store (kept and reused if complete for this model), fit
    each layer's transcoder data-parallel or layer-parallel, then rank 0 computes the usage statistics and labels on
    the corpus (`fit` with the trained dictionaries) and returns the ACG; the other ranks return None."""
    from acg.compiler.shards import ShardError, merge, write_part
    from acg.compiler.transcoder import to_transcoder

    rank, world = _world()
    if parallel not in ("data", "layers"):
        raise TranscoderError(f"--parallel {parallel!r}: data or layers")
    if spec.exact:
        raise TranscoderError("exact mode trains nothing: run it without --distributed")
    n_streams = n_streams or max(2, world)
    store = Path(store)
    t0 = time.perf_counter()
    try:
        read_manifest(store, model)
    except ShardError:
        write_part(model, corpus, store, rank=rank, world=world, shard_tokens=shard_tokens)
        _barrier()
        if rank == 0:
            merge(store, model, world)
        _barrier()
    t_harvest = time.perf_counter() - t0
    cfg = model.cfg
    trained: dict[int, Any] = {}
    for layer in range(cfg.n_layers):
        fc = _fit_config(spec, cfg, layer, n_streams)
        ckpt = None if checkpoint is None else Path(checkpoint) / f"L{layer}"
        if parallel == "data":
            module, _ = train_layer(store, layer, fc, n_streams=n_streams, checkpoint=ckpt)
            trained[layer] = to_transcoder(module, fc)
        elif layer % world == rank:
            with local():
                module, _ = train_layer(store, layer, fc, n_streams=n_streams, checkpoint=ckpt)
            tc = to_transcoder(module, fc)
            with atomic_dir(store / f"layer{layer}") as tmp:
                st_save_file({k: np.ascontiguousarray(v) for k, v in tc.tensors().items()}, str(tmp / "tc.safetensors"))
            trained[layer] = tc
    _barrier()
    if parallel == "layers" and spec.e2e_steps:  # every process needs every layer for the end-to-end phase
        trained = {layer: _load_layer(store, layer, spec, cfg) for layer in range(cfg.n_layers)}
    if spec.e2e_steps:
        trained = _end_to_end(model, corpus, spec, cfg, trained, store, n_streams)
    if parallel == "layers":
        for layer in range(cfg.n_layers):
            if layer not in trained:
                trained[layer] = _load_layer(store, layer, spec, cfg)
    transcoders = [trained[layer] for layer in range(cfg.n_layers)]
    info = {"world": world, "parallel": parallel, "streams": n_streams, "store": str(store)}
    done = _assemble(model, corpus, spec, transcoders, store, {**(meta or {}), "distributed": info})
    if done is None:
        return None
    acg, stats = done
    total = time.perf_counter() - t0
    stats["seconds"] = {"harvest": t_harvest, "total": total}
    stats["tokens_per_second_harvest"] = stats["n_tokens"] / max(t_harvest, 1e-9)
    return acg, stats


def _store_statistics(store: Path, cfg, transcoders) -> dict[str, np.ndarray]:
    """Counts and error sums over every token of the store, each process over its shards, summed (float64)."""
    from safetensors import safe_open

    rank, world = _world()
    shards = read_manifest(store)["shards"]
    d = cfg.d_model
    acc: dict[str, np.ndarray] = {"tok": np.zeros(cfg.d_vocab), "pos": np.zeros(cfg.n_ctx), "n": np.zeros(1)}
    for layer, tc in enumerate(transcoders):
        n_f = tc.n_features
        acc |= {f"count{layer}": np.zeros(n_f), f"mass{layer}": np.zeros(n_f)}
        acc |= {f"err{layer}": np.zeros(1), f"ysum{layer}": np.zeros(d), f"ysq{layer}": np.zeros(1)}
    for shard in shards[rank::world]:
        with safe_open(str(store / shard["file"]), framework="np") as f:
            toks, pos = f.get_tensor("tokens"), f.get_tensor("positions")
            acc["tok"] += np.bincount(toks, minlength=cfg.d_vocab)
            acc["pos"] += np.bincount(pos, minlength=cfg.n_ctx)
            acc["n"] += len(toks)
            for layer, tc in enumerate(transcoders):
                x = f.get_tensor(f"in.L{layer}").astype(np.float64)
                y = f.get_tensor(f"out.L{layer}").astype(np.float64)
                for start in range(0, len(x), 8192):
                    feats = tc.encode(x[start : start + 8192])
                    acc[f"count{layer}"] += (feats != 0).sum(0)
                    acc[f"mass{layer}"] += np.abs(feats).sum(0)
                    acc[f"err{layer}"] += ((tc.decode(feats) - y[start : start + 8192]) ** 2).sum()
                acc[f"ysum{layer}"] += y.sum(0)
                acc[f"ysq{layer}"] += (y * y).sum()
    if world > 1:
        for k in sorted(acc):
            t = torch.as_tensor(acc[k])
            dist.all_reduce(t)
            acc[k] = t.numpy()
    return acc


def _first_tokens(store: Path, cfg, limit: int):
    """The store's first `limit` tokens as `Activations` (for labels: bounded, in corpus order)."""
    from safetensors import safe_open

    from acg.compiler.harvest import Activations

    parts: dict[str, list[np.ndarray]] = {"tokens": [], "positions": []}
    ins: list[list[np.ndarray]] = [[] for _ in range(cfg.n_layers)]
    outs: list[list[np.ndarray]] = [[] for _ in range(cfg.n_layers)]
    have = 0
    for shard in read_manifest(store)["shards"]:
        if have >= limit:
            break
        with safe_open(str(store / shard["file"]), framework="np") as f:
            for k in parts:
                parts[k].append(f.get_tensor(k))
            for layer in range(cfg.n_layers):
                ins[layer].append(f.get_tensor(f"in.L{layer}"))
                outs[layer].append(f.get_tensor(f"out.L{layer}"))
        have += shard["tokens"]
    positions = np.concatenate(parts["positions"])[:limit]
    prompt = np.cumsum(positions == 0) - 1  # a prompt starts wherever the position is 0
    return Activations(
        [np.concatenate(x)[:limit] for x in ins],
        [np.concatenate(y)[:limit] for y in outs],
        np.concatenate(parts["tokens"])[:limit],
        positions,
        prompt,
        [],
    )


def _assemble(model, corpus, spec, transcoders, store: Path, meta: dict):
    """Rank 0's ACG from the store's statistics (computed by every process, so call this on every process): the
    per-layer metrics, counts and masses over every token; labels from the first tokens; QK pair statistics on the
    first `usage_prompts` prompts (bounded whatever the corpus) -- no second harvest of the corpus."""
    from dataclasses import asdict

    from acg.compiler.acg import ACG
    from acg.compiler.labels import label_features
    from acg.compiler.lower import lower
    from acg.compiler.usage import _reads, group_sizes, pair_statistics, qk_sources

    cfg = model.cfg
    acc = _store_statistics(store, cfg, transcoders)
    if _world()[0] != 0:
        return None
    n = float(acc["n"][0])
    usage = {"tok_count": acc["tok"].astype(np.float32), "pos_count": acc["pos"].astype(np.float32)}
    layers = []
    for layer, tc in enumerate(transcoders):
        usage[f"feat_count.L{layer}"] = acc[f"count{layer}"].astype(np.float32)
        usage[f"feat_mass.L{layer}"] = acc[f"mass{layer}"].astype(np.float32)
        mean = acc[f"ysum{layer}"] / n
        var = float(acc[f"ysq{layer}"][0] / n - mean @ mean)
        layers.append(
            {
                "layer": layer,
                "nmse": float(acc[f"err{layer}"][0] / n / max(var, 1e-30)),
                "l0": float(acc[f"count{layer}"].sum() / n),
                "dead_fraction": float((acc[f"count{layer}"] == 0).mean()),
                "n_features": tc.n_features,
            }
        )
    weights = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    exact = lower(ACG(cfg, weights, tuple(transcoders)), keep_errors=True, dtype="float32")
    prompts = [list(s) for s in corpus if len(s)]
    usage.update(pair_statistics(exact, cfg, transcoders, prompts[: spec.usage_prompts], spec.pair_budget))
    sizes = group_sizes(cfg, transcoders)
    layout = {
        "qk_sources": {
            str(layer): qk_sources(cfg, transcoders, layer, spec.pair_budget) for layer in range(cfg.n_layers)
        },
        "read_sources": {tag: [[g, sizes[g]] for g in groups] for tag, groups in _reads(exact).items()},
    }
    labels = label_features(model, transcoders, _first_tokens(store, cfg, 60_000))
    stats = {**layout, "layers": layers, "n_prompts": len(prompts), "n_tokens": int(n), "spec": asdict(spec)}
    acg = ACG(cfg, weights, tuple(transcoders), usage, labels, stats, meta)
    return acg, {**stats, "distributed": meta["distributed"]}


def _fit_config(spec, cfg, layer: int, n_streams: int) -> FitConfig:
    from acg.compiler.fit import layer_config

    return layer_config(spec, cfg, layer, batch_size=spec.batch_size - spec.batch_size % n_streams)


def _load_layer(store: Path, layer: int, spec, cfg):
    from safetensors.numpy import load_file

    from acg.compiler.transcoder import Transcoder

    t = load_file(str(store / f"layer{layer}" / "tc.safetensors"))
    fit_meta = {
        "kind": spec.kind,
        "width": spec.width or 8 * cfg.d_model,
        "steps": spec.steps,
        "seed": spec.seed + layer,
    }
    return Transcoder(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], spec.kind, t.get("threshold"), {"fit": fit_meta})


def _end_to_end(model, corpus, spec, cfg, trained: dict, store: Path, n_streams: int) -> dict:
    """The end-to-end fine-tuning with every process on its share of each batch (`finetune_end_to_end(group=...)`),
    then each JumpReLU threshold recalibrated to the target on rows of the store (read by index, not all loaded)."""
    from acg.compiler.transcoder import finetune_end_to_end, to_transcoder

    configs = [_fit_config(spec, cfg, layer, n_streams) for layer in range(cfg.n_layers)]
    modules = [_module_of(trained[layer], configs[layer]) for layer in range(cfg.n_layers)]
    group = dist.group.WORLD if _world()[1] > 1 else None
    finetune_end_to_end(
        model,
        modules,
        [list(s) for s in corpus if len(s)],
        configs[0],
        spec.e2e_steps,
        train_thresholds=spec.e2e_thresholds,
        mse_weight=spec.e2e_mse_weight,
        group=group,
    )
    if spec.kind == "jumprelu" and spec.target_l0 and not spec.e2e_thresholds:
        for layer, (m, fc) in enumerate(zip(modules, configs, strict=True)):
            gen = torch.Generator().manual_seed(fc.seed)
            n = read_manifest(store)["tokens"]
            idx = torch.randint(0, n, (min(16384, n),), generator=gen).numpy()
            X = torch.as_tensor(_rows(store, layer, idx))
            with torch.no_grad():
                m.calibrate(X @ m.W_enc + m.b_enc, spec.target_l0)
    return {layer: to_transcoder(m, fc) for layer, (m, fc) in enumerate(zip(modules, configs, strict=True))}


def _module_of(tc, fc: FitConfig) -> _Module:
    d, n = tc.W_enc.shape
    m = _Module(d, n, fc.kind, fc.init_threshold, torch.Generator().manual_seed(0), torch.zeros(d), 1.0)
    with torch.no_grad():
        m.W_enc.copy_(torch.as_tensor(tc.W_enc))
        m.b_enc.copy_(torch.as_tensor(tc.b_enc))
        m.W_dec.copy_(torch.as_tensor(tc.W_dec))
        m.b_dec.copy_(torch.as_tensor(tc.b_dec))
        if fc.kind == "jumprelu":
            tau = float(np.exp(np.log(np.asarray(tc.threshold)).mean()))
            m.log_threshold.copy_(torch.as_tensor(np.log(tc.threshold)))
            m.tau, m.calibrated = tau, True
    return m


def _rows(store: Path, layer: int, idx: np.ndarray) -> np.ndarray:
    """Rows `idx` of layer `layer`'s MLP inputs, in corpus order across shards; one shard open at a time."""
    from safetensors import safe_open

    shards = read_manifest(store)["shards"]
    starts = np.cumsum([0] + [s["tokens"] for s in shards])
    out = np.empty((len(idx), read_manifest(store)["d_model"]), dtype=np.float32)
    owner = np.searchsorted(starts, idx, side="right") - 1
    for k in np.unique(owner):
        where = np.flatnonzero(owner == k)
        with safe_open(str(store / shards[k]["file"]), framework="np") as f:
            x = f.get_tensor(f"in.L{layer}")
        out[where] = x[idx[where] - starts[k]]
    return out


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _sum(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast(module: torch.nn.Module, src: int = 0) -> None:
    if _world()[1] > 1:
        for p in module.parameters():
            dist.broadcast(p.data, src=src)


def _moments(folder: Path, layer: int, files: list[str]) -> torch.Tensor:
    """[n, sum x, sum x^2, sum y, sum y^2 (per dim)] over `files`, float64."""
    from safetensors import safe_open

    acc = None
    for name in files:
        with safe_open(str(folder / name), framework="np") as f:
            x = f.get_tensor(f"in.L{layer}").astype(np.float64)
            y = f.get_tensor(f"out.L{layer}").astype(np.float64)
        part = np.concatenate([[len(x)], x.sum(0), (x * x).sum(0), y.sum(0), (y * y).sum(0)])
        acc = part if acc is None else acc + part
    return torch.as_tensor(acc)


def train_layer(
    folder: str | os.PathLike,
    layer: int,
    cfg: FitConfig,
    *,
    n_streams: int = 2,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    stop_after: int | None = None,
    progress=None,
) -> tuple[_Module, dict[str, Any]]:
    """Fit layer `layer`'s transcoder from the store at `folder` (module docstring); every process calls this."""
    folder = Path(folder)
    rank, world = _world()
    if n_streams % world:
        raise TranscoderError(f"{n_streams} streams cannot be shared evenly by {world} processes")
    if cfg.batch_size % n_streams:
        raise TranscoderError(f"batch size {cfg.batch_size} is not a multiple of the {n_streams} streams")
    if cfg.kind not in ("relu", "jumprelu"):
        raise TranscoderError(f"transcoder kind {cfg.kind!r}; supported: relu, jumprelu")
    manifest = read_manifest(folder)
    d = manifest["d_model"]
    mine = list(range(rank, n_streams, world))
    own = streams(folder, layer, n_streams, cfg.seed, mine)
    files = [s["file"] for s in manifest["shards"]]
    # units: one pass over every shard, each process its streams' shards, summed in float64
    my_files = [f for i in mine for f in files[i::n_streams]]
    m = _sum(_moments(folder, layer, my_files))
    n = float(m[0])
    x_mean, y_mean64 = m[1 : 1 + d] / n, m[1 + 2 * d : 1 + 3 * d] / n
    x_var = (m[1 + d : 1 + 2 * d] / n - x_mean**2).clamp_min(0).sum()
    y_var_raw = (m[1 + 3 * d : 1 + 4 * d] / n - y_mean64**2).clamp_min(0).sum()
    x_unit = float(x_var.sqrt()) / math.sqrt(d) or 1.0
    y_unit = float(y_var_raw.sqrt()) / math.sqrt(d) or 1.0
    y_mean = (y_mean64 / y_unit).float()
    y_var = float(y_var_raw) / y_unit**2
    gen = torch.Generator().manual_seed(cfg.seed)
    scale = math.sqrt(y_var / max(cfg.width, 1)) * 4
    model = _Module(d, cfg.width, cfg.kind, cfg.init_threshold, gen, y_mean, scale)
    topk = cfg.target_l0 if cfg.kind == "jumprelu" and cfg.target_l0 else None
    block = cfg.batch_size // n_streams
    lead = own[0] if 0 in mine else None  # stream 0: resampling and calibration rows, on the process that owns it

    def units(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x / x_unit, y / y_unit

    with torch.no_grad():  # the first step's output scale, from stream 0's first rows (peeked, not consumed)
        ratio = torch.zeros(1, dtype=torch.float64)
        if lead is not None:
            saved = lead.state()
            xb, yb = units(*lead.batch(min(4096, cfg.batch_size)))
            lead.restore(saved)
            f, _, _ = model(xb, cfg.bandwidth, topk)
            ratio[0] = float((yb - y_mean).norm() / (f @ model.W_dec).norm().clamp_min(1e-12))
        ratio = float(_sum(ratio))
        model.W_dec.mul_(ratio)
        scale *= ratio
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    fired = torch.zeros(cfg.width)
    history: list[tuple[int, float, float]] = []
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and (ckpt / "state.pt").exists():
        start = _restore(ckpt, model, opt, fired, gen, own, mine)
        history = json.loads((ckpt / "history.json").read_text())
    for step in range(start, cfg.steps):
        if stop_after is not None and step >= stop_after:
            break
        lr = cfg.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        stats = torch.zeros(2, dtype=torch.float64)
        first = None
        for k, s in enumerate(own):
            xb, yb = units(*s.batch(block))
            last = k == len(own) - 1
            sync = ddp.no_sync() if world > 1 and not last else contextlib.nullcontext()
            with sync:  # gradients accumulate over this process's streams; one all-reduce per step
                f, recon, l0 = ddp(xb, cfg.bandwidth, topk)
                mse = ((recon - yb) ** 2).sum(-1).mean() / y_var
                sparsity = (
                    torch.zeros(()) if topk is not None else cfg.l1_coeff * (f * model.W_dec.norm(dim=1)).sum(-1).mean()
                )
                ((mse + sparsity) * (world / n_streams)).backward()
            fired += (f > 0).float().sum(0).detach()
            stats += torch.tensor([float(mse.detach()), float(l0.detach())], dtype=torch.float64)
            if first is None:
                first = (xb, yb)
        opt.step()
        if (step + 1) % cfg.resample_every == 0:
            total = _sum(fired.clone())
            if step < cfg.resample_until * cfg.steps:
                if lead is not None:
                    _resample(model, total == 0, first[0], first[1], gen, scale)
                _broadcast(model)
            fired.zero_()
        stats = _sum(stats) / n_streams
        if progress is not None:
            progress(step, float(stats[0]), float(stats[1]))
        if step % 50 == 0:
            history.append((step, float(stats[0]), float(stats[1])))
        if ckpt is not None and (step + 1) % checkpoint_every == 0:
            _save(ckpt, step + 1, model, opt, fired, gen, own, mine, history)
    else:
        if topk is not None:  # BatchTopK -> JumpReLU: the threshold at which target_l0 fire, on stream 0's rows
            with torch.no_grad():
                tau = torch.zeros(1, dtype=torch.float64)
                if lead is not None:
                    saved = lead.state()
                    xb, _ = units(*lead.batch(min(16 * cfg.batch_size, int(n))))
                    lead.restore(saved)
                    model.calibrate(xb @ model.W_enc + model.b_enc, cfg.target_l0)
                    tau[0] = model.tau
                tau = float(_sum(tau))
                model.log_threshold.fill_(math.log(tau))
                model.tau, model.calibrated = tau, True
        with torch.no_grad():
            model.W_enc.div_(x_unit)
            model.W_dec.mul_(y_unit)
            model.b_dec.mul_(y_unit)
    return model, {"history": history, "y_var": y_var * y_unit**2, "tokens": int(n), "world": world}


def _save(ckpt: Path, step: int, model, opt, fired, gen, own: list[Stream], mine: list[int], history) -> None:
    positions = {i: s.state() for i, s in zip(mine, own, strict=True)}
    rank, world = _world()
    total_fired = _sum(fired.clone())  # every process's counts (a collective: all call it)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, positions)
        positions = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        with atomic_dir(ckpt) as tmp:
            torch.save(
                {
                    "step": step,
                    "model": model.state_dict(),
                    "tau": model.tau,
                    "calibrated": model.calibrated,
                    "opt": opt.state_dict(),
                    "fired": total_fired,
                    "gen": gen.get_state(),
                },
                tmp / "state.pt",
            )
            (tmp / "streams.json").write_text(json.dumps({str(k): v for k, v in sorted(positions.items())}))
            (tmp / "history.json").write_text(json.dumps(history))
    if world > 1:
        dist.barrier()


def _restore(ckpt: Path, model, opt, fired, gen, own: list[Stream], mine: list[int]) -> int:
    state = torch.load(ckpt / "state.pt", weights_only=True)  # our own file: tensors and plain containers only
    model.load_state_dict(state["model"])
    model.tau, model.calibrated = state["tau"], state["calibrated"]
    opt.load_state_dict(state["opt"])
    fired.copy_(state["fired"] if _world()[0] == 0 else torch.zeros_like(fired))  # the sum lives on rank 0
    gen.set_state(state["gen"])
    positions = json.loads((ckpt / "streams.json").read_text())
    for i, s in zip(mine, own, strict=True):
        s.restore(positions[str(i)])
    return int(state["step"])


__all__ = ["train_layer"]
