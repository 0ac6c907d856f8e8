"""Resource guards: before a fit or a compilation starts, estimate its peak memory (and, roughly, its time) from the
sizes involved, and refuse with a clear message when it would not fit in the memory this machine has free; the
user can override (`acg --no-memory-check ...`, or `memory_check(False)`).

The estimates count the large arrays each stage holds at once, not Python's overheads, and add a fixed margin for
the interpreter, torch and numpy themselves; they are meant to catch "this needs 40 GB on a 24 GB machine", not to
predict the last megabyte."""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass

from acg.ir.errors import ACGError

BASE = 1.0e9  # bytes for Python, torch, numpy and the model itself, whatever the job
HEADROOM = 0.9  # refuse above this share of the memory available
_enabled: ContextVar[bool] = ContextVar("acg_memory_check", default=True)


class ResourceError(ACGError):
    pass


def memory_check(on: bool) -> None:
    _enabled.set(bool(on))


def available_memory() -> int:
    """Bytes this machine can give a new job now (MemAvailable on Linux; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never refuse


@dataclass(frozen=True)
class Estimate:
    what: str
    bytes: float
    seconds: float
    parts: dict[str, float]

    def describe(self) -> str:
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1])[:4])
        return f"{self.what}: about {_gb(self.bytes)} at peak ({parts}), roughly {_duration(self.seconds)}"


def fit_estimate(cfg, spec, n_tokens: int) -> Estimate:
    """A fit: the harvested MLP inputs and outputs (float32, every layer), one layer's training tensors (its inputs and
    targets rescaled to unit spread, and the temporaries of that scale: 4 x one layer's harvest), one layer's
    dictionary with its Adam state (float32 x 4) and a training batch, and the exact QK pair statistics (float64,
    capped by `pair_budget`). Measured on testbed-m's 5% budget (802,339 tokens): 10.4 GB peak, estimated 11.3."""
    d, layers = cfg.d_model, cfg.n_layers
    width = spec.width or 8 * d
    if getattr(spec, "exact", False):
        width = cfg.d_mlp
    harvest = 2.0 * n_tokens * d * layers * 4
    training = 4.0 * n_tokens * d * 4
    dictionary = 4.0 * (2 * width * d + width + d) * 4 + spec.batch_size * (width + 2 * d) * 4 * 3
    end_to_end = (layers * 4.0 * (2 * width * d) * 4) if spec.e2e_steps else 0.0
    pairs = 8.0 * min(spec.pair_budget, cfg.n_heads * (cfg.d_vocab + cfg.n_ctx + width) ** 2)
    parts = {
        "harvested activations": harvest,
        "one layer's training tensors": training,
        "dictionary and optimiser": dictionary + end_to_end,
        "pair statistics": pairs,
    }
    flops = 6.0 * (spec.steps * layers + spec.e2e_steps * layers) * spec.batch_size * width * d
    flops += 2.0 * n_tokens * layers * (4 * d * d + 2 * d * cfg.d_mlp)
    return Estimate("the fit", BASE + sum(parts.values()), flops / 2e10, parts)


def compile_estimate(graph, backend: str) -> Estimate:
    """A compilation: the graph's tensors (held by the IR, by the backend's copy and by the file written), and, for
    source backends, the syntax tree of every op (a few kilobytes each) and its text."""
    tensors = float(sum(t.nbytes for t in graph.tensors.values()))
    per_op = 6e3 if backend in ("python", "numba", "torch") else 1e3
    parts = {"tensors": 3.0 * tensors, "syntax trees": per_op * len(graph.ops)}
    return Estimate(f"compiling to {backend}", BASE + sum(parts.values()), len(graph.ops) * 2e-3, parts)


def check(estimate: Estimate, available: int | None = None) -> Estimate:
    """Refuse `estimate` when it would not fit (unless the check is off); returns it for logging."""
    if not _enabled.get():
        return estimate
    free = available_memory() if available is None else available
    if estimate.bytes > HEADROOM * free:
        raise ResourceError(
            f"{estimate.describe()}; this machine has {_gb(free)} available. Reduce the sizes (fewer prompts, a "
            "narrower dictionary, a smaller circuit) or, if you know better, pass --no-memory-check"
        )
    return estimate


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


__all__ = ["Estimate", "ResourceError", "available_memory", "check", "compile_estimate", "fit_estimate", "memory_check"]
