"""Dictionaries in the field's formats, both ways, so users compile with dictionaries trained elsewhere and view ours
with their tools.

- SAELens: a folder per layer with `cfg.json` and `sae_weights.safetensors`; `W_enc` [d_in, d_sae] (our orientation),
  architecture `transcoder` or `jumprelu_transcoder` (`threshold` [d_sae]).
- circuit-tracer per-layer transcoders (PLT): `config.yaml` (`model_kind: transcoder_set`) + `layer_{i}.safetensors`
  with `W_enc` [d_transcoder, d_model] (transposed), `W_dec`, `b_enc`, `b_dec`, optional
  `activation_function.threshold`.
- circuit-tracer cross-layer transcoders (CLT): `config.yaml` (`model_kind: cross_layer_transcoder`) +
  `W_enc_{i}.safetensors` (`W_enc_{i}` [F, d_model], `b_enc_{i}`, `b_dec_{i}`, optional `threshold_{i}`) and
  `W_dec_{i}.safetensors` (`W_dec_{i}` [F, n_layers - i, d_model]). acg's ACG has one decoder per feature; a CLT is
  imported when its writes into later layers are all zero (as in one acg exports) and refused otherwise.

All inputs are the MLP input after its layer norm (`blocks.{l}.mlp.hook_in`, circuit-tracer's `mlp.hook_in`) and the
MLP output (`hook_mlp_out`). Writing is atomic; reading checks every shape and names the file at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file, save

from acg.compiler.transcoder import Transcoder
from acg.ir.atomic import atomic_dir
from acg.ir.errors import ACGError

IN_HOOKS = ("blocks.{l}.mlp.hook_in", "mlp.hook_in")


class InteropError(ACGError):
    pass


def _read(file: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise InteropError(f"{file}: missing") from None
    except Exception as e:
        raise InteropError(f"{file}: not a readable safetensors file ({e})") from None


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32, order="C")


# ------------------------------------------------------------------------------------------------------- SAELens


def save_saelens(
    transcoders: list[Transcoder] | tuple[Transcoder, ...], path: str | os.PathLike, model_name: str = "acg-model"
) -> Path:
    """One SAELens folder per layer: `path/layer_{l}/{cfg.json, sae_weights.safetensors}`."""
    with atomic_dir(path) as tmp:
        for layer, tc in enumerate(transcoders):
            sub = tmp / f"layer_{layer}"
            sub.mkdir()
            arch = "jumprelu_transcoder" if tc.act == "jumprelu" else "transcoder"
            if tc.act not in ("relu", "jumprelu"):
                raise InteropError(f"transcoder {layer}: SAELens transcoders are ReLU or JumpReLU, not {tc.act!r}")
            cfg = {
                "architecture": arch,
                "d_in": tc.d_model,
                "d_sae": tc.n_features,
                "d_out": tc.d_model,
                "dtype": "float32",
                "device": "cpu",
                "apply_b_dec_to_input": False,
                "normalize_activations": "none",
                "reshape_activations": "none",
                "hook_name_out": f"blocks.{layer}.hook_mlp_out",
                "hook_layer_out": layer,
                "hook_head_index_out": None,
                "metadata": {
                    "model_name": model_name,
                    "hook_name": f"blocks.{layer}.mlp.hook_in",
                    "hook_head_index": None,
                    "prepend_bos": True,
                    "exported_by": "acg",
                },
            }
            (sub / "cfg.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            tensors = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
            if tc.act == "jumprelu":
                tensors["threshold"] = tc.threshold
            (sub / "sae_weights.safetensors").write_bytes(save({k: _f32(v) for k, v in sorted(tensors.items())}))
    return Path(path)


def load_saelens(path: str | os.PathLike) -> list[Transcoder]:
    """A folder of `layer_{l}` SAELens transcoders (or a single SAELens folder, for a one-layer model)."""
    path = Path(path)
    dirs = sorted((d for d in path.glob("layer_*") if d.is_dir()), key=lambda d: int(d.name.split("_")[1]))
    if not dirs and (path / "cfg.json").exists():
        dirs = [path]
    if not dirs:
        raise InteropError(f"{path}: no SAELens transcoder (expected cfg.json, or layer_0/cfg.json, ...)")
    out = []
    for layer, d in enumerate(dirs):
        cfg_file = d / "cfg.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise InteropError(f"{cfg_file}: unreadable ({e})") from None
        arch = cfg.get("architecture")
        if arch not in ("transcoder", "jumprelu_transcoder"):
            raise InteropError(
                f"{cfg_file}: architecture {arch!r} is not a transcoder; supported: transcoder, jumprelu_transcoder"
            )
        hook = (cfg.get("metadata") or {}).get("hook_name", cfg.get("hook_name", ""))
        if hook and not hook.endswith("mlp.hook_in"):
            raise InteropError(
                f"{cfg_file}: input hook {hook!r}; acg reads transcoders on the MLP input after its "
                "layer norm (blocks.{l}.mlp.hook_in)"
            )
        t = _read(d / "sae_weights.safetensors")
        d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
        _expect(
            d / "sae_weights.safetensors",
            t,
            {
                "W_enc": (d_in, d_sae),
                "W_dec": (d_sae, cfg.get("d_out", d_in)),
                "b_enc": (d_sae,),
                "b_dec": (cfg.get("d_out", d_in),),
            },
        )
        threshold = t.get("threshold") if arch == "jumprelu_transcoder" else None
        if arch == "jumprelu_transcoder" and threshold is None:
            raise InteropError(f"{d / 'sae_weights.safetensors'}: jumprelu_transcoder without a 'threshold' tensor")
        out.append(
            Transcoder(
                _f64(t["W_enc"]),
                _f64(t["b_enc"]),
                _f64(t["W_dec"]),
                _f64(t["b_dec"]),
                "jumprelu" if threshold is not None else "relu",
                None if threshold is None else _f64(threshold),
                {"imported": "saelens", "layer": layer},
            )
        )
    return out


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _expect(file: Path, tensors: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        if name not in tensors:
            raise InteropError(f"{file}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise InteropError(f"{file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


# ------------------------------------------------------------------------------------------------- circuit-tracer


def _ct_config(kind: str, n_layers: int, scan: str) -> str:
    cfg = {"model_kind": kind, "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out", "scan": scan}
    return yaml.safe_dump(cfg, sort_keys=True)


def save_circuit_tracer(transcoders, path: str | os.PathLike, cross_layer: bool = False, scan: str = "acg") -> Path:
    """circuit-tracer's transcoder-set (PLT) layout, or with `cross_layer` its CLT layout (later decoders zero)."""
    n = len(transcoders)
    with atomic_dir(path) as tmp:
        (tmp / "config.yaml").write_text(
            _ct_config("cross_layer_transcoder" if cross_layer else "transcoder_set", n, scan)
        )
        for i, tc in enumerate(transcoders):
            if tc.act not in ("relu", "jumprelu"):
                raise InteropError(f"transcoder {i}: circuit-tracer transcoders are ReLU or JumpReLU, not {tc.act!r}")
            if not cross_layer:
                t = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
                if tc.act == "jumprelu":
                    t["activation_function.threshold"] = tc.threshold
                (tmp / f"layer_{i}.safetensors").write_bytes(save({k: _f32(v) for k, v in sorted(t.items())}))
            else:
                enc = {f"W_enc_{i}": tc.W_enc.T, f"b_enc_{i}": tc.b_enc, f"b_dec_{i}": tc.b_dec}
                if tc.act == "jumprelu":
                    enc[f"threshold_{i}"] = tc.threshold
                dec = np.zeros((tc.n_features, n - i, tc.d_model))
                dec[:, 0] = tc.W_dec
                (tmp / f"W_enc_{i}.safetensors").write_bytes(save({k: _f32(v) for k, v in sorted(enc.items())}))
                (tmp / f"W_dec_{i}.safetensors").write_bytes(save({f"W_dec_{i}": _f32(dec)}))
    return Path(path)


def load_circuit_tracer(path: str | os.PathLike) -> list[Transcoder]:
    path = Path(path)
    cfg_file = path / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except FileNotFoundError:
        raise InteropError(f"{cfg_file}: missing (a circuit-tracer transcoder folder has config.yaml)") from None
    except yaml.YAMLError as e:
        raise InteropError(f"{cfg_file}: not valid YAML ({e})") from None
    hook = cfg.get("feature_input_hook", "mlp.hook_in")
    if hook != "mlp.hook_in":
        raise InteropError(f"{cfg_file}: feature_input_hook {hook!r}; acg reads transcoders on mlp.hook_in")
    kind = cfg.get("model_kind")
    out = []
    if kind == "transcoder_set":
        files = sorted(path.glob("layer_*.safetensors"), key=lambda f: int(f.stem.split("_")[1]))
        if not files:
            raise InteropError(f"{path}: no layer_{{i}}.safetensors files")
        for i, f in enumerate(files):
            t = _read(f)
            if "log_thresholds" in t:
                raise InteropError(f"{f}: 'log_thresholds' is not supported (circuit-tracer rejects it too)")
            if "W_skip" in t:
                raise InteropError(f"{f}: skip transcoders (W_skip) are not supported by acg's ACG yet")
            n, d = t["b_enc"].shape[0], t["b_dec"].shape[0]
            _expect(f, t, {"W_enc": (n, d), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)})
            th = t.get("activation_function.threshold")
            out.append(
                Transcoder(
                    _f64(t["W_enc"]).T,
                    _f64(t["b_enc"]),
                    _f64(t["W_dec"]),
                    _f64(t["b_dec"]),
                    "jumprelu" if th is not None else "relu",
                    None if th is None else _f64(th),
                    {"imported": "circuit-tracer", "layer": i},
                )
            )
    elif kind == "cross_layer_transcoder":
        encs = sorted(path.glob("W_enc_*.safetensors"), key=lambda f: int(f.stem.split("_")[2]))
        n_layers = len(encs)
        for i in range(n_layers):
            e = _read(path / f"W_enc_{i}.safetensors")
            dfile = path / f"W_dec_{i}.safetensors"
            dec = _read(dfile)[f"W_dec_{i}"]
            n, d = e[f"b_enc_{i}"].shape[0], e[f"b_dec_{i}"].shape[0]
            _expect(path / f"W_enc_{i}.safetensors", e, {f"W_enc_{i}": (n, d), f"b_dec_{i}": (d,)})
            if dec.shape != (n, n_layers - i, d):
                raise InteropError(f"{dfile}: W_dec_{i} has shape {dec.shape}, expected {(n, n_layers - i, d)}")
            if np.any(dec[:, 1:]):
                raise InteropError(
                    f"{dfile}: features of layer {i} write into later layers; acg's ACG holds one "
                    "decoder per feature (per-layer transcoders), so genuine cross-layer transcoders "
                    "are not supported yet"
                )
            th = e.get(f"threshold_{i}")
            out.append(
                Transcoder(
                    _f64(e[f"W_enc_{i}"]).T,
                    _f64(e[f"b_enc_{i}"]),
                    _f64(dec[:, 0]),
                    _f64(e[f"b_dec_{i}"]),
                    "jumprelu" if th is not None else "relu",
                    None if th is None else _f64(th),
                    {"imported": "circuit-tracer-clt", "layer": i},
                )
            )
    else:
        raise InteropError(f"{cfg_file}: model_kind {kind!r}; supported: transcoder_set, cross_layer_transcoder")
    return out


def load_dictionary(path: str | os.PathLike) -> tuple[list[Transcoder], str]:
    """Transcoders from a folder in either format, told apart by their files; returns them and the format's name."""
    path = Path(path)
    if not path.is_dir():
        raise InteropError(f"{path}: not a folder (a SAELens or circuit-tracer transcoder folder was expected)")
    if (path / "config.yaml").exists():
        return load_circuit_tracer(path), "circuit-tracer"
    if (path / "cfg.json").exists() or (path / "layer_0" / "cfg.json").exists():
        return load_saelens(path), "saelens"
    raise InteropError(
        f"{path}: neither a circuit-tracer transcoder set (config.yaml) nor SAELens transcoders "
        "(cfg.json, or layer_0/cfg.json, ...)"
    )
