"""Fitting an ACG: harvest activations, fit (or, in exact mode, take) a transcoder per layer, measure it, record the
usage statistics of every feature, edge, QK pair and OV entry on the fitting corpus, and label the features."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from acg.compiler.acg import ACG
from acg.compiler.harvest import harvest
from acg.compiler.progress import Progress
from acg.compiler.transcoder import (
    FitConfig,
    Transcoder,
    calibrate_on,
    evaluate_transcoder,
    exact_transcoder,
    finetune_end_to_end,
    fit_module,
    to_transcoder,
)
from acg.compiler.transformer import Transformer
from acg.ir.errors import ACGError
from acg.ir.resources import check, fit_estimate


class FitError(ACGError):
    pass


@dataclass(frozen=True)
class FitSpec:
    width: int | None = None  # default: 8 * d_model
    kind: str = "jumprelu"
    exact: bool = False
    steps: int = 600  # layer-local steps per transcoder (BatchTopK at target_l0 for jumprelu)
    e2e_steps: int = 500  # end-to-end fine-tuning steps (all transcoders together; 0: off)
    e2e_thresholds: bool = False  # train the JumpReLU thresholds end to end (else: recalibrated to target_l0)
    e2e_mse_weight: float = 0.1  # end to end, also keep each transcoder close to its MLP (faithful features)
    l0_coeff: float = 1e-3  # jumprelu: L0 penalty, where thresholds are trained (target_l0 None, or e2e_thresholds)
    target_l0: float | None = 30.0  # jumprelu: active features per token the thresholds are set for
    l1_coeff: float = 3e-3
    lr: float = 2e-3
    batch_size: int = 1024
    seed: int = 0
    usage_prompts: int = 1000  # prompts used for pair statistics (QK pairs, OV entries)
    pair_budget: int = 1 << 26  # max n_heads * n_sources^2 for exact QK-pair statistics in a layer
    threads: int = 2  # torch CPU threads


def fit(
    model: Transformer,
    corpus: list[list[int]],
    spec: FitSpec = FitSpec(),
    *,
    progress: bool = True,
    meta: dict | None = None,
    transcoders: Sequence[Transcoder] | None = None,
) -> tuple[ACG, dict]:
    """Fit an ACG to `model` on `corpus`; returns it and a report (per-layer metrics, timings).

    `transcoders`: dictionaries trained elsewhere (`interop.load_dictionary`), used as they are instead of fitting;
    the usage statistics, labels and metrics are still computed on `corpus`. It runs on `spec.threads` CPU threads
    and gives the caller's number back when it returns."""
    previous = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        return _fit(model, corpus, spec, progress, meta, transcoders)
    finally:
        torch.set_num_threads(previous)


def _fit(model, corpus, spec: FitSpec, progress: bool, meta, transcoders) -> tuple[ACG, dict]:
    check(fit_estimate(model.cfg, spec, sum(len(seq) for seq in corpus)))  # refuse before a long run that cannot fit
    t0 = time.perf_counter()
    model = model.float().eval()
    acts = harvest(model, corpus, progress=progress)
    t_harvest = time.perf_counter() - t0
    weights = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    cfg = model.cfg
    t1 = time.perf_counter()
    t_local = None
    if transcoders is not None:
        transcoders = _check_dictionary(list(transcoders), cfg)
    elif spec.exact:
        transcoders = []
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}"
            transcoders.append(
                exact_transcoder(
                    weights[f"{p}.mlp.W_in"],
                    weights[f"{p}.mlp.b_in"],
                    weights[f"{p}.mlp.W_out"],
                    weights[f"{p}.mlp.b_out"],
                    cfg.act_fn,
                    weights.get(f"{p}.mlp.threshold"),
                )
            )
    else:
        modules, configs = [], []
        for layer in range(cfg.n_layers):
            fc = layer_config(spec, cfg, layer)
            with Progress(f"transcoder L{layer}", fc.steps, progress) as bar:
                module, _ = fit_module(
                    acts.mlp_in[layer],
                    acts.mlp_out[layer],
                    fc,
                    progress=lambda s, mse, l0, bar=bar: (
                        bar.set(s + 1, f"nmse {mse:.4f} l0 {l0:.1f}") if s % 25 == 0 else None
                    ),
                )
            modules.append(module)
            configs.append(fc)
        t_local = time.perf_counter() - t1
        if spec.e2e_steps:
            with Progress("end-to-end", spec.e2e_steps, progress) as bar:
                finetune_end_to_end(
                    model,
                    modules,
                    acts.sequences,
                    configs[0],
                    spec.e2e_steps,
                    train_thresholds=spec.e2e_thresholds,
                    mse_weight=spec.e2e_mse_weight,
                    progress=lambda s, kl, l0: bar.set(s + 1, f"kl {kl:.4f} l0 {l0:.1f}") if s % 10 == 0 else None,
                )
            if spec.kind == "jumprelu" and spec.target_l0 and not spec.e2e_thresholds:
                for layer, (m, fc) in enumerate(zip(modules, configs, strict=True)):  # l0 as measured: on the corpus
                    calibrate_on(m, acts.mlp_in[layer], spec.target_l0, fc.seed)
        transcoders = [to_transcoder(m, fc) for m, fc in zip(modules, configs, strict=True)]
    layers = [
        {"layer": layer, **evaluate_transcoder(tc, acts.mlp_in[layer], acts.mlp_out[layer])}
        for layer, tc in enumerate(transcoders)
    ]
    t_fit = time.perf_counter() - t1
    t2 = time.perf_counter()
    from acg.compiler.usage import usage_statistics

    usage, layout = usage_statistics(model, transcoders, acts, spec)
    t_usage = time.perf_counter() - t2
    t3 = time.perf_counter()
    from acg.compiler.labels import label_features

    labels = label_features(model, transcoders, acts)
    t_labels = time.perf_counter() - t3
    stats = {
        **layout,
        "layers": layers,
        "n_prompts": len(acts.sequences),
        "n_tokens": acts.n_tokens,
        "spec": asdict(spec),
        "seconds": {
            "harvest": t_harvest,
            "transcoders": t_fit,
            **({"transcoders_local": t_local, "transcoders_e2e": t_fit - t_local} if t_local is not None else {}),
            "usage": t_usage,
            "labels": t_labels,
            "total": time.perf_counter() - t0,
        },
        "tokens_per_second_harvest": acts.n_tokens / max(t_harvest, 1e-9),
    }
    # timings describe this run, not the ACG: they stay out of it, so the same inputs and seed give the same bytes
    kept = {k: v for k, v in stats.items() if k not in ("seconds", "tokens_per_second_harvest")}
    acg = ACG(cfg, weights, tuple(transcoders), usage, labels, kept, dict(meta or {}))
    return acg, stats


def layer_config(spec: FitSpec, cfg, layer: int, batch_size: int | None = None) -> FitConfig:
    """Layer `layer`'s transcoder fit, from the whole fit's spec (seeded per layer)."""
    return FitConfig(
        width=spec.width or 8 * cfg.d_model,
        kind=spec.kind,
        l0_coeff=spec.l0_coeff,
        target_l0=spec.target_l0,
        l1_coeff=spec.l1_coeff,
        steps=spec.steps,
        batch_size=spec.batch_size if batch_size is None else batch_size,
        lr=spec.lr,
        seed=spec.seed + layer,
    )


def _check_dictionary(transcoders: list[Transcoder], cfg) -> list[Transcoder]:
    """Refuse a dictionary made for another model, naming what does not match."""
    if len(transcoders) != cfg.n_layers:
        raise FitError(f"the dictionary has {len(transcoders)} layers of transcoders; the model has {cfg.n_layers}")
    for layer, tc in enumerate(transcoders):
        if tc.d_model != cfg.d_model or tc.W_dec.shape[1] != cfg.d_model:
            raise FitError(
                f"transcoder {layer} reads and writes d_model {tc.d_model}/{tc.W_dec.shape[1]}; "
                f"the model's d_model is {cfg.d_model} (a dictionary fitted for another model?)"
            )
    return transcoders
