"""The TransformerLens-layout transformer: its config, a plain torch implementation, and checkpoint folders.

A checkpoint is a folder with `config.json` (HookedTransformerConfig keys) and `model.safetensors` whose tensors are
named and shaped as a `HookedTransformer` state dict, so checkpoints made elsewhere load here and ours load there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from acg.compiler.safe import PickleRefused, load_pickled, pickled_weights
from acg.ir.atomic import atomic_dir, recover
from acg.ir.errors import ACGError

NORMALIZATION_TYPES = ("LN", "LNPre", "RMS", "RMSPre", None)
ACT_FNS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "solu_ln")
SUPPORTED_ACT_FNS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "jumprelu")
# "jumprelu" is acg's own: the MLP of a round-tripped JumpReLU dictionary, `pre if pre > threshold else 0` with one
# threshold per neuron (`blocks.{l}.mlp.threshold`). HookedTransformer and Hugging Face do not know it.
ATTENTION_DIRS = ("causal", "bidirectional")

# HookedTransformerConfig keys that change the computation; a value other than the one given here is refused.
_COMPUTATION_KEYS: dict[str, Any] = {
    "positional_embedding_type": "standard",
    "use_attn_scale": True,
    "use_local_attn": False,
    "parallel_attn_mlp": False,
    "gated_mlp": False,
    "final_rms": False,
    "use_split_qkv_input": False,
    "use_attn_result": None,  # hooks only; any value is fine
    "attn_scores_soft_cap": -1.0,
    "output_logits_soft_cap": -1.0,
    "n_key_value_heads": None,
    "rotary_dim": None,
    "use_qk_norm": False,
    "tie_word_embeddings": False,
    "scale_attn_by_inverse_layer_idx": False,
    "use_normalization_before_and_after": False,
    "post_embedding_ln": False,
    "num_experts": None,
    "relative_attention_max_distance": None,
    "relative_attention_num_buckets": None,
    "decoder_start_token_id": None,
}
_HOOK_ONLY = {"use_attn_result", "use_hook_mlp_in", "use_hook_tokens", "use_attn_in"}


class ConfigError(ACGError):
    """A model config that acg cannot compile exactly."""


@dataclass(frozen=True)
class TransformerConfig:
    """What changes the computation of a TransformerLens-layout transformer, and nothing else."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    d_vocab_out: int = -1
    act_fn: str = "gelu"
    normalization_type: str | None = "LN"
    attention_dir: str = "causal"
    attn_only: bool = False
    eps: float = 1e-5
    attn_scale: float = -1.0  # -1: sqrt(d_head), as TransformerLens computes it

    def __post_init__(self) -> None:
        if self.d_vocab_out == -1:
            object.__setattr__(self, "d_vocab_out", self.d_vocab)
        if self.attn_scale == -1.0:
            object.__setattr__(self, "attn_scale", math.sqrt(self.d_head))
        for name in ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx", "d_vocab_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if not self.attn_only and (not isinstance(self.d_mlp, int) or self.d_mlp <= 0):
            raise ConfigError(f"config field 'd_mlp' must be a positive integer, got {self.d_mlp!r}")
        if self.act_fn not in SUPPORTED_ACT_FNS and not self.attn_only:
            raise ConfigError(
                f"config field 'act_fn' = {self.act_fn!r} is not supported; supported: {', '.join(SUPPORTED_ACT_FNS)}"
            )
        if self.normalization_type not in NORMALIZATION_TYPES:
            raise ConfigError(
                f"config field 'normalization_type' = {self.normalization_type!r} is not supported; "
                f"supported: {', '.join(map(str, NORMALIZATION_TYPES))}"
            )
        if self.attention_dir not in ATTENTION_DIRS:
            raise ConfigError(
                f"config field 'attention_dir' = {self.attention_dir!r} is not supported; "
                "supported: causal, bidirectional"
            )
        if not (isinstance(self.eps, float | int) and self.eps > 0):
            raise ConfigError(f"config field 'eps' must be a positive number, got {self.eps!r}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> TransformerConfig:
        """Read HookedTransformerConfig keys: unknown keys that do not change the computation are ignored, keys that
        do (rotary embeddings, gated MLPs, ...) are refused by name unless they hold their neutral value."""
        for key, neutral in _COMPUTATION_KEYS.items():
            if key in _HOOK_ONLY or key not in raw:
                continue
            value = raw[key]
            if value != neutral and not (neutral is None and value in (None, 0, False)):
                raise ConfigError(
                    f"{source}: {key} = {value!r} changes the computation and is not supported "
                    f"(supported: {key} = {neutral!r})"
                )
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx") if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        kwargs = {k: raw[k] for k in known if k in raw}
        if kwargs.get("d_mlp") is None:
            kwargs["d_mlp"] = 0 if raw.get("attn_only") else kwargs.get("d_mlp")
        if "attn_scale" in raw and raw.get("use_attn_scale", True) is False:
            kwargs["attn_scale"] = 1.0
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """HookedTransformerConfig keys, enough for `HookedTransformerConfig(**d)`."""
        d = asdict(self)
        d["positional_embedding_type"] = "standard"
        d["original_architecture"] = "acg"
        return d


# ------------------------------------------------------------------------------------------------------------ modules


def activation(name: str, x: Tensor, threshold: Tensor | None = None) -> Tensor:
    if name == "jumprelu":
        if threshold is None:
            raise ConfigError("activation 'jumprelu' needs the MLP's per-neuron threshold")
        return torch.where(x > threshold, x, torch.zeros_like(x))
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    raise ConfigError(f"activation {name!r} is not supported; supported: {', '.join(SUPPORTED_ACT_FNS)}")


class Norm(nn.Module):
    """LayerNorm / RMSNorm, with or without weights, as TransformerLens defines them."""

    def __init__(self, kind: str | None, d_model: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        if kind in ("LN", "RMS"):
            self.w = nn.Parameter(torch.ones(d_model))
        if kind == "LN":
            self.b = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind is None:
            return x
        if self.kind in ("LN", "LNPre"):
            x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if self.kind == "LN":
            return x * self.w + self.b
        if self.kind == "RMS":
            return x * self.w
        return x


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(h, d, e))
        self.W_V = nn.Parameter(torch.empty(h, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(h, e))
        self.b_V = nn.Parameter(torch.zeros(h, e))
        self.b_O = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        q = torch.einsum("bpd,hde->bhpe", x, self.W_Q) + self.b_Q[None, :, None]
        k = torch.einsum("bpd,hde->bhpe", x, self.W_K) + self.b_K[None, :, None]
        v = torch.einsum("bpd,hde->bhpe", x, self.W_V) + self.b_V[None, :, None]
        scores = q @ k.transpose(-1, -2) / self.cfg.attn_scale  # (batch, head, query, key)
        if self.cfg.attention_dir == "causal":
            future = torch.ones_like(scores, dtype=torch.bool).triu(1)  # keys after the query
            scores = scores.masked_fill(future, float("-inf"))
        z = scores.softmax(-1) @ v  # (batch, head, query, d_head)
        return torch.einsum("bhpe,hed->bpd", z, self.W_O) + self.b_O


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.act_fn = cfg.act_fn
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        if cfg.act_fn == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_mlp))

    def forward(self, x: Tensor) -> Tensor:
        pre = x @ self.W_in + self.b_in
        return activation(self.act_fn, pre, getattr(self, "threshold", None)) @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = Norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        if not cfg.attn_only:
            self.ln2 = Norm(cfg.normalization_type, cfg.d_model, cfg.eps)
            self.mlp = MLP(cfg)

    def forward(self, resid: Tensor) -> Tensor:
        resid = resid + self.attn(self.ln1(resid))
        if hasattr(self, "mlp"):
            resid = resid + self.mlp(self.ln2(resid))
        return resid


class _Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))


class _PosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))


class _Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab_out: int):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(d_model, d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(d_vocab_out))


class Transformer(nn.Module):
    """A decoder (or encoder) transformer whose `state_dict()` is a `HookedTransformer` state dict."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = _Embed(cfg.d_vocab, cfg.d_model)
        self.pos_embed = _PosEmbed(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = Norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.unembed = _Unembed(cfg.d_model, cfg.d_vocab_out)

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> Transformer:
        """GPT-2-style init: normal(0, std) matrices, output projections scaled by 1/sqrt(2 n_layers)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith((".w",)):
                    p.fill_(1.0)
                elif p.ndim == 1 or name.split(".")[-1].startswith("b_") or name.endswith(".b"):
                    p.zero_()
                else:
                    scale = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("W_O", "W_out")) else std
                    p.normal_(0.0, scale, generator=generator)
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: int [batch, pos] -> logits [batch, pos, d_vocab_out]."""
        # F.embedding, not W_E[tokens]: the same lookup, but its backward accumulates deterministically on the CPU
        # (indexing's backward, index_put_ with accumulate, differs run to run with 2+ threads: seeds would not repeat)
        resid = F.embedding(tokens, self.embed.W_E) + self.pos_embed.W_pos[: tokens.shape[-1]]
        for block in self.blocks:
            resid = block(resid)
        return self.ln_final(resid) @ self.unembed.W_U + self.unembed.b_U


# -------------------------------------------------------------------------------------------------------- checkpoints

CONFIG_FILE, WEIGHTS_FILE, META_FILE = "config.json", "model.safetensors", "meta.json"


def expected_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the layout, with its shape."""
    return {name: tuple(p.shape) for name, p in Transformer(cfg).to("meta").named_parameters()}


def save_checkpoint(model: Transformer, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (+ `meta.json`) atomically."""
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {**dict(metadata or {}), "content_hash": checkpoint_hash(tmp)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(path)


def checkpoint_hash(path: Path) -> str:
    """sha256 over config.json and model.safetensors, as written: recorded in meta.json, checked on load."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update((path / name).read_bytes())
    return h.hexdigest()


def _check_hash(path: Path) -> None:
    file = path / META_FILE
    try:
        recorded = json.loads(file.read_text()).get("content_hash")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return  # a checkpoint written by another tool: nothing recorded to check
    if recorded is not None and recorded != checkpoint_hash(path):
        raise ConfigError(
            f"{path}: content hash mismatch: {CONFIG_FILE} or {WEIGHTS_FILE} changed after it was written "
            f"(meta.json records {recorded[:12]}...)"
        )


def read_config(path: str | os.PathLike) -> TransformerConfig:
    file = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: not found (a checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object, found {type(raw).__name__}")
    return TransformerConfig.from_dict(raw, source=str(file))


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a TransformerLens-layout folder; every tensor is checked against the config by name and shape."""
    path = recover(path)
    cfg = read_config(path)
    file = path / WEIGHTS_FILE
    pickled = None if file.exists() else pickled_weights(path)
    try:
        tensors = load_pickled(pickled) if pickled is not None else load_file(str(file))
    except FileNotFoundError:
        raise ConfigError(f"{file}: not found") from None
    except PickleRefused:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ConfigError(f"{file}: not a readable safetensors file ({e})") from None
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ConfigError(f"{file}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    state = {}
    for name, shape in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ConfigError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, config says {shape}")
        if not t.is_floating_point():
            raise ConfigError(f"{file}: tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
        if not torch.isfinite(t).all():
            raise ConfigError(f"{file}: tensor {name!r} holds NaN or Inf values")
        state[name] = t.to(dtype)
    _check_hash(path)  # after the specific checks, which say more about what is wrong
    model = Transformer(cfg).to(dtype)
    model.load_state_dict(state)  # tensors the layout does not use (attention masks, IGNORE) are left out above
    return model.eval()
