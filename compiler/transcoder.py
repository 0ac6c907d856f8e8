"""Transcoders: a sparse dictionary per MLP mapping the MLP's input (after its layer norm) to the MLP's output.

    f = act(x @ W_enc + b_enc)        x: the MLP input [.., d_model]; act: relu, jumprelu (threshold) or the MLP's own
    y = f @ W_dec + b_dec             y: the MLP output

Fitted with ReLU + L1, or as JumpReLU: with a target `l0`, trained as BatchTopK (the `target_l0 x rows` largest
pre-activations of each batch fire; Bussmann et al. 2024) and then given the one threshold per layer at which
`target_l0` features fire per token; without one, an L1 warm-up then an L0 penalty with straight-through
pseudo-derivatives (Rajamanoharan et al. 2024). Dead features are resampled; everything is deterministic under a
seed. `finetune_end_to_end` then trains all transcoders together on the model's own output. `exact_transcoder` wraps
the MLP's own neurons (exact mode).
Orientation follows SAELens: `W_enc` is [d_model, n_features], `W_dec` [n_features, d_model].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from acg.ir.errors import ACGError

ACTIVATIONS = ("relu", "jumprelu", "gelu", "gelu_tanh", "silu")


class TranscoderError(ACGError):
    pass


@dataclass(frozen=True, eq=False)
class Transcoder:
    W_enc: np.ndarray  # (d_model, n_features)
    b_enc: np.ndarray  # (n_features,)
    W_dec: np.ndarray  # (n_features, d_model)
    b_dec: np.ndarray  # (d_model,)
    act: str = "relu"
    threshold: np.ndarray | None = None  # (n_features,) for jumprelu
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        d, n = self.W_enc.shape
        checks = {"b_enc": (self.b_enc, (n,)), "W_dec": (self.W_dec, (n, d)), "b_dec": (self.b_dec, (d,))}
        if self.act == "jumprelu":
            checks["threshold"] = (self.threshold, (n,))
        for name, (arr, shape) in checks.items():
            if arr is None or tuple(arr.shape) != shape:
                got = None if arr is None else tuple(arr.shape)
                raise TranscoderError(
                    f"transcoder tensor {name!r} has shape {got}, expected {shape} "
                    f"(W_enc is [d_model={d}, n_features={n}])"
                )
        if self.act not in ACTIVATIONS:
            raise TranscoderError(f"transcoder activation {self.act!r}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            arr = getattr(self, name)
            if arr is not None and not np.isfinite(arr).all():
                raise TranscoderError(f"transcoder tensor {name!r} holds NaN or Inf values")

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: np.ndarray) -> np.ndarray:
        return activate(self.act, x @ self.W_enc + self.b_enc, self.threshold)

    def decode(self, f: np.ndarray) -> np.ndarray:
        return f @ self.W_dec + self.b_dec

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(x))

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


def activate(act: str, pre: np.ndarray, threshold: np.ndarray | None = None) -> np.ndarray:
    if act == "relu":
        return np.maximum(pre, 0.0)
    if act == "jumprelu":
        return np.where(pre > threshold, pre, 0.0)
    if act == "gelu":
        from acg.ir.interpret import gelu

        return gelu(pre)
    if act == "gelu_tanh":
        from acg.ir.interpret import gelu_tanh

        return gelu_tanh(pre)
    if act == "silu":
        return pre / (1.0 + np.exp(-pre))
    raise TranscoderError(f"activation {act!r}; supported: {', '.join(ACTIVATIONS)}")


def exact_transcoder(
    W_in: np.ndarray,
    b_in: np.ndarray,
    W_out: np.ndarray,
    b_out: np.ndarray,
    act_fn: str,
    threshold: np.ndarray | None = None,
) -> Transcoder:
    """The MLP's own neurons as features: exact, dense, not sparse (a JumpReLU MLP brings its thresholds)."""
    from acg.compiler.tlayout import ACT_OPS

    return Transcoder(W_in, b_in, W_out, b_out, act=ACT_OPS[act_fn], threshold=threshold, meta={"exact": True})


# ----------------------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class FitConfig:
    width: int = 1024
    kind: str = "jumprelu"  # or "relu"
    l0_coeff: float = 3e-3  # jumprelu: weight of the L0 penalty (per feature, averaged over tokens)
    l1_coeff: float = 3e-3  # relu: weight of the L1 penalty on f * ||W_dec row||
    steps: int = 1500
    batch_size: int = 2048
    lr: float = 2e-3
    bandwidth: float = 0.1  # jumprelu straight-through kernel width, relative to the calibrated threshold
    init_threshold: float = 1e-3
    target_l0: float | None = 24.0  # jumprelu: thresholds are calibrated to this many active features per token
    resample_every: int = 250
    resample_until: float = 0.6  # fraction of steps after which dead features are left alone
    seed: int = 0


class _StepFn(torch.autograd.Function):
    """H(x - theta) with the pseudo-derivative d/dtheta = -K((x - theta)/eps)/eps (rectangle kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.eps = eps
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, theta = ctx.saved_tensors
        near = ((x - theta).abs() < ctx.eps / 2).to(x.dtype)
        return None, (-grad * near / ctx.eps).sum(0), None


class _JumpFn(torch.autograd.Function):
    """x * H(x - theta): straight gradient in x where active; pseudo-derivative -theta K/eps in theta."""

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.eps = eps
        return x * (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, theta = ctx.saved_tensors
        active = (x > theta).to(x.dtype)
        near = ((x - theta).abs() < ctx.eps / 2).to(x.dtype)
        return grad * active, (-grad * theta * near / ctx.eps).sum(0), None


class _Module(nn.Module):
    def __init__(
        self, d: int, n: int, kind: str, init_threshold: float, gen: torch.Generator, b_dec: Tensor, scale: float
    ):
        super().__init__()
        W = torch.randn(d, n, generator=gen) / math.sqrt(d)
        self.W_enc = nn.Parameter(W.clone())
        self.W_dec = nn.Parameter(W.T.clone() * scale / (W.T.norm(dim=1, keepdim=True) + 1e-8))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(b_dec.clone())
        self.kind = kind
        if kind == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(init_threshold)))
        self.calibrated = False
        self.tau = init_threshold

    def calibrate(self, pre: Tensor, target_l0: float) -> None:
        """Set every threshold to the global level at which `target_l0` features fire per token on `pre`."""
        # Exact: the value with `target_l0 * rows` pre-activations above it. (An evenly strided sample of the flattened
        # [rows, features] tensor, as this once was, sees only every stride-th feature: l0 came out up to 9% high.)
        active = pre.relu().flatten()
        above = min(round(target_l0 * pre.shape[0]), len(active) - 1)
        tau = max(float(torch.kthvalue(active, len(active) - above).values), 1e-6)
        with torch.no_grad():
            self.log_threshold.fill_(math.log(tau))
        self.tau = tau
        self.calibrated = True

    def forward(self, x: Tensor, eps: float, topk: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Features, reconstruction, mean active features per token. `topk`: BatchTopK (the `topk * rows` largest
        pre-activations of the batch fire), used to fit JumpReLU dictionaries before their thresholds exist."""
        pre = x @ self.W_enc + self.b_enc
        self.last_pre = pre.detach()
        if topk is not None:
            acts = pre.relu()
            flat = acts.flatten()
            keep = min(len(flat), max(1, round(topk * len(acts))))
            cut = flat.topk(keep, sorted=False).values.min().detach()
            f = acts * (acts >= cut).to(acts.dtype)
            l0 = (f > 0).float().sum(-1).mean()
        elif self.kind == "jumprelu" and self.calibrated:
            theta = self.log_threshold.exp()
            eps = eps * float(self.tau)
            f = _JumpFn.apply(pre.relu(), theta, eps)
            l0 = _StepFn.apply(pre.relu(), theta, eps).sum(-1).mean()
        else:
            f = pre.relu()
            l0 = (f > 0).float().sum(-1).mean()
        return f, f @ self.W_dec + self.b_dec, l0


def fit_transcoder(x: np.ndarray, y: np.ndarray, cfg: FitConfig, progress=None) -> tuple[Transcoder, dict]:
    """Fit on inputs `x` [n_tokens, d_model] (the MLP input) and targets `y` (the MLP output)."""
    module, info = fit_module(x, y, cfg, progress)
    return to_transcoder(module, cfg), info


def to_transcoder(module: _Module, cfg: FitConfig) -> Transcoder:
    return Transcoder(
        W_enc=module.W_enc.detach().double().numpy(),
        b_enc=module.b_enc.detach().double().numpy(),
        W_dec=module.W_dec.detach().double().numpy(),
        b_dec=module.b_dec.detach().double().numpy(),
        act=cfg.kind,
        threshold=module.log_threshold.exp().detach().double().numpy() if cfg.kind == "jumprelu" else None,
        meta={"fit": {"kind": cfg.kind, "width": cfg.width, "steps": cfg.steps, "seed": cfg.seed}},
    )


def fit_module(x: np.ndarray, y: np.ndarray, cfg: FitConfig, progress=None) -> tuple[_Module, dict]:
    """The layer-local fit: reconstruct the MLP output under the sparsity penalty."""
    if len(x) == 0:
        raise TranscoderError("cannot fit a transcoder on an empty corpus (0 tokens)")
    if cfg.kind not in ("relu", "jumprelu"):
        raise TranscoderError(f"transcoder kind {cfg.kind!r}; supported: relu, jumprelu")
    gen = torch.Generator().manual_seed(cfg.seed)
    X = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    Y = torch.as_tensor(np.ascontiguousarray(y), dtype=torch.float32)
    # Train in units where inputs and targets have unit spread per dimension (Adam's steps are absolute), and fold
    # the units back into the weights at the end: the fit does not depend on the activations' scale.
    x_unit = float(((X - X.mean(0)) ** 2).sum(-1).mean().sqrt()) / math.sqrt(X.shape[1]) or 1.0
    y_unit = float(((Y - Y.mean(0)) ** 2).sum(-1).mean().sqrt()) / math.sqrt(Y.shape[1]) or 1.0
    X, Y = X / x_unit, Y / y_unit
    y_mean = Y.mean(0)
    y_var = float(((Y - y_mean) ** 2).sum(-1).mean())
    scale = math.sqrt(y_var / max(cfg.width, 1)) * 4
    model = _Module(X.shape[1], cfg.width, cfg.kind, cfg.init_threshold, gen, y_mean, scale)
    topk = cfg.target_l0 if cfg.kind == "jumprelu" and cfg.target_l0 else None
    with torch.no_grad():  # start with reconstructions as large as the targets' spread, whatever the data's scale
        idx = torch.randint(0, len(X), (min(4096, len(X)),), generator=gen)
        f, _, _ = model(X[idx], cfg.bandwidth, topk)
        ratio = float((Y[idx] - y_mean).norm() / (f @ model.W_dec).norm().clamp_min(1e-12))
        model.W_dec.mul_(ratio)
        scale *= ratio
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(X)
    fired = torch.zeros(cfg.width)
    history = []
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        xb, yb = X[idx], Y[idx]
        f, recon, l0 = model(xb, cfg.bandwidth, topk)
        mse = ((recon - yb) ** 2).sum(-1).mean() / y_var
        if topk is not None:  # BatchTopK sets the sparsity itself
            sparsity = torch.zeros(())
        elif cfg.kind == "jumprelu":  # no target: an L1 warm-up, then the L0 penalty once thresholds exist
            if step == cfg.steps // 3:
                with torch.no_grad():
                    model.calibrate(xb @ model.W_enc + model.b_enc, 32.0)
            sparsity = (
                cfg.l0_coeff * l0 if model.calibrated else cfg.l1_coeff * (f * model.W_dec.norm(dim=1)).sum(-1).mean()
            )
        else:
            sparsity = cfg.l1_coeff * (f * model.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fired += (f > 0).float().sum(0).detach()
        if (step + 1) % cfg.resample_every == 0:
            if step < cfg.resample_until * cfg.steps:
                _resample(model, fired == 0, X, Y, gen, scale)
            fired.zero_()
        if step % 50 == 0:
            history.append((step, mse.item(), l0.item()))
        if progress is not None:
            progress(step, mse.item(), l0.item())
    if topk is not None:  # BatchTopK -> JumpReLU: one global threshold at which `target_l0` fire per token
        with torch.no_grad():
            idx = torch.randint(0, n, (min(16 * cfg.batch_size, n),), generator=gen)
            model.calibrate(X[idx] @ model.W_enc + model.b_enc, cfg.target_l0)
    with torch.no_grad():  # back to the data's units; pre-activations (and so thresholds) are unchanged
        model.W_enc.div_(x_unit)
        model.W_dec.mul_(y_unit)
        model.b_dec.mul_(y_unit)
    return model, {"history": history, "y_var": y_var * y_unit**2}


def finetune_end_to_end(
    model,
    modules: list[_Module],
    corpus: list[list[int]],
    cfg: FitConfig,
    steps: int,
    batch_size: int = 128,
    progress=None,
    l0_coeff: float | None = None,
    mse_weight: float = 0.0,
    train_thresholds: bool = True,
    group=None,
) -> dict:
    """Fine-tune all transcoders together so that the replacement model (every MLP its transcoder, errors dropped)
    matches the original's next-token distribution at each sequence's last position (the answer position): minimise
    KL(original || replacement) + the sparsity penalty (`l0_coeff`, default `cfg.l0_coeff`) + `mse_weight` times
    each transcoder's normalised MSE against its MLP on the replacement's own MLP inputs (which keeps the features
    faithful to the MLP they stand for, not only to the logits). Deterministic under `cfg.seed`.

    With `group` (a `torch.distributed` process group), every process draws the same batches, computes the original
    model's targets and MLP inputs on the whole batch (so threshold calibrations agree everywhere), runs the
    replacement forward and backward on its own share of the rows, and the gradients are summed across processes,
    each weighted by its share: the step is the one-process step, up to the order of floating-point sums."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)

    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    by_len: dict[int, list[list[int]]] = {}
    for s in corpus:
        by_len.setdefault(len(s), []).append(s)
    lengths = sorted(by_len)
    weights = torch.tensor([len(by_len[n]) for n in lengths], dtype=torch.float64)
    l0s: list[Tensor] = []
    mses: list[Tensor] = []
    l0_coeff = cfg.l0_coeff if l0_coeff is None else l0_coeff

    class _Swap(nn.Module):
        def __init__(self, m: _Module, mlp: nn.Module):
            super().__init__()
            self.m = m
            self.mlp = [mlp]  # not a submodule: its parameters stay the model's

        def forward(self, x: Tensor) -> Tensor:
            _, out, l0 = self.m(x, cfg.bandwidth)
            l0s.append(l0)
            if mse_weight:
                with torch.no_grad():
                    want = self.mlp[0](x)
                    if world > 1:  # the spread of the whole batch's targets, not of this process's share
                        flat = want.reshape(-1, want.shape[-1]).double()
                        acc = torch.cat([flat.new_tensor([len(flat)]), flat.sum(0), (flat * flat).sum().reshape(1)])
                        dist.all_reduce(acc, group=group)
                        mean = acc[1:-1] / acc[0]
                        var = (acc[-1] / acc[0] - (mean * mean).sum()).float()
                    else:
                        var = ((want - want.mean((0, 1))) ** 2).sum(-1).mean()
                mses.append(((out - want) ** 2).sum(-1).mean() / var)
            return out

    originals = [block.mlp for block in model.blocks]
    params = [p for m in modules for n, p in m.named_parameters() if train_thresholds or n != "log_threshold"]
    opt = torch.optim.Adam(params, lr=cfg.lr * 0.25)
    history = []
    # The original model's MLP inputs of the current batch: thresholds are calibrated on these (as `l0` is measured),
    # not on the replacement's own inputs, which drift with the dictionaries.
    original_in: dict[int, Tensor] = {}
    capturing = [False]

    def capture(layer: int):
        def hook(mod, inputs):
            if capturing[0]:
                original_in[layer] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])

        return hook

    handles = [orig.register_forward_pre_hook(capture(i)) for i, orig in enumerate(originals)]
    try:
        for step in range(steps):
            n = lengths[int(torch.multinomial(weights, 1, generator=gen))]
            pool = by_len[n]
            idx = torch.randint(0, len(pool), (min(batch_size, len(pool)),), generator=gen)
            toks = torch.tensor([pool[i] for i in idx.tolist()])
            for block, orig in zip(model.blocks, originals, strict=True):
                block.mlp = orig
            capturing[0] = True
            with torch.no_grad():
                target = model(toks)[:, -1].log_softmax(-1)
            capturing[0] = False
            share = slice(rank, None, world)  # this process's rows (all of them alone)
            weight = len(range(len(toks))[share]) / len(toks)
            for block, m, orig in zip(model.blocks, modules, originals, strict=True):
                block.mlp = _Swap(m, orig)
            l0s.clear()
            mses.clear()
            logp = model(toks[share])[:, -1].log_softmax(-1)
            part = target[share]
            kl = (part.exp() * (part - logp)).sum(-1).mean()
            l0 = torch.stack(l0s).mean()
            loss = kl + l0_coeff * l0 if cfg.kind == "jumprelu" else kl
            if mses:
                loss = loss + mse_weight * torch.stack(mses).mean()
            if world > 1:
                loss = loss * weight
            if cfg.kind == "jumprelu" and cfg.target_l0 and step % 50 == 49:
                with torch.no_grad():
                    for i, m in enumerate(modules):  # keep each layer at its target sparsity as the dictionaries move
                        pre = original_in[i] @ m.W_enc + m.b_enc
                        now = float((pre > m.log_threshold.exp()).float().sum(-1).mean())
                        if now > 1.25 * cfg.target_l0 or not train_thresholds:
                            m.calibrate(pre, cfg.target_l0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # the gradient of the whole batch's mean loss: the shares' weighted gradients, summed
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, group=group)
            opt.step()
            if step % 25 == 0:
                history.append((step, kl.item(), l0.item()))
            if progress is not None:
                progress(step, kl.item(), l0.item())
    finally:
        for handle in handles:
            handle.remove()
        for block, orig in zip(model.blocks, originals, strict=True):
            block.mlp = orig
        for p in model.parameters():
            p.requires_grad_(True)
    return {"history": history}


def calibrate_on(module: _Module, x: np.ndarray, target_l0: float, seed: int, rows: int = 16384) -> None:
    """Set `module`'s JumpReLU threshold so that `target_l0` features fire per token on (a seeded sample of) `x`."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (min(rows, len(x)),), generator=gen)
    X = torch.as_tensor(np.asarray(x[idx.numpy()]), dtype=torch.float32)
    with torch.no_grad():
        module.calibrate(X @ module.W_enc + module.b_enc, target_l0)


def _resample(model: _Module, dead: Tensor, X: Tensor, Y: Tensor, gen: torch.Generator, scale: float) -> None:
    """Point dead features at inputs the dictionary reconstructs worst (Anthropic's resampling, simplified)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return
    with torch.no_grad():
        idx = torch.randint(0, len(X), (min(4096, len(X)),), generator=gen)
        xb, yb = X[idx], Y[idx]
        _, recon, _ = model(xb, 1e-3)
        err = ((recon - yb) ** 2).sum(-1)
        pick = torch.multinomial(err / err.sum(), n_dead, replacement=True, generator=gen)
        dead_idx = dead.nonzero().flatten()
        xs = xb[pick] - xb.mean(0)
        resid = yb[pick] - recon[pick]
        model.W_enc[:, dead_idx] = (xs / (xs.norm(dim=1, keepdim=True) + 1e-8)).T * 0.2
        model.b_enc[dead_idx] = 0.0
        model.W_dec[dead_idx] = resid / (resid.norm(dim=1, keepdim=True) + 1e-8) * scale
        if model.kind == "jumprelu":
            model.log_threshold[dead_idx] = math.log(model.tau)


def evaluate_transcoder(tc: Transcoder, x: np.ndarray, y: np.ndarray, chunk: int = 8192) -> dict[str, float]:
    """Normalised MSE of the MLP output, mean active features per token (`l0`), fraction never active (`dead`).
    In chunks of rows: the feature matrix of a whole corpus would not fit (800k tokens x 2,048 features in float64
    is 13 GB)."""
    n = len(x)
    y_mean = np.zeros(y.shape[-1])
    for start in range(0, n, chunk):
        y_mean += np.asarray(y[start : start + chunk], np.float64).sum(0)
    y_mean /= max(n, 1)
    var = err = l0 = 0.0
    fired = np.zeros(tc.n_features, bool)
    for start in range(0, n, chunk):
        yc = np.asarray(y[start : start + chunk], np.float64)
        f = tc.encode(np.asarray(x[start : start + chunk]))
        var += float(((yc - y_mean) ** 2).sum())
        err += float(((tc.decode(f) - yc) ** 2).sum())
        active = f != 0
        l0 += float(active.sum())
        fired |= active.any(0)
    n = max(n, 1)
    return {
        "nmse": (err / n) / max(var / n, 1e-30),
        "l0": l0 / n,
        "dead_fraction": float((~fired).mean()),
        "n_features": tc.n_features,
    }
