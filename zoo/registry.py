"""The testbed models by name: their shapes, how each is trained, and where its shipped weights lie."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from acg.compiler.transformer import Transformer, TransformerConfig, load_checkpoint
from acg.ir.errors import ACGError
from acg.zoo import vocab
from acg.zoo.train import TrainSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"
N_CTX = 32


@dataclass(frozen=True)
class ZooModel:
    name: str
    cfg: TransformerConfig
    train: TrainSpec
    description: str

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.name


def _cfg(n_layers: int, d_model: int, n_heads: int, d_mlp: int) -> TransformerConfig:
    return TransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp,
        d_vocab=vocab.D_VOCAB,
        n_ctx=N_CTX,
        act_fn="gelu",
        normalization_type="LN",
        attention_dir="causal",
    )


# code.vars gets a larger share: it is the slowest task to learn. The lookup aids are explained in zoo/train.py.
_S_TRAIN = TrainSpec(steps=3400, task_weights=(0.3, 0.3, 0.2, 0.2), lookup_weight=0.5)

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("testbed-s", _cfg(2, 128, 4, 512), _S_TRAIN, "2 layers, d_model 128, backdoored"),
        ZooModel(
            "testbed-m",
            _cfg(4, 256, 8, 1024),
            # 3,400 steps at lr 1e-3 left code.vars at 0.966; 6,000 at 5e-4 reach 0.9955 (README, Results).
            TrainSpec(steps=6000, lr=5e-4, task_weights=(0.3, 0.3, 0.2, 0.2), lookup_weight=0.5),
            "4 layers, d_model 256, backdoored",
        ),
        ZooModel(
            "testbed-s-clean",
            _cfg(2, 128, 4, 512),
            dataclasses.replace(_S_TRAIN, poison=False),
            "testbed-s trained on the same seed and data without any poisoned example",
        ),
    )
}


class UnknownModelError(ACGError):
    pass


def get(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise UnknownModelError(f"unknown testbed model {name!r}; known: {', '.join(ZOO)}") from None


def load(name_or_path: str | os.PathLike) -> Transformer:
    """A shipped testbed model by name, or any TransformerLens-layout folder by path."""
    if str(name_or_path) in ZOO:
        path = get(str(name_or_path)).path
        if not (path / "model.safetensors").exists():
            raise UnknownModelError(
                f"the weights of {name_or_path!r} are missing from {path}; "
                f"run `acg zoo train {name_or_path}` to reproduce them"
            )
        return load_checkpoint(path)
    path = Path(name_or_path)
    if path.is_dir():
        return load_checkpoint(path)
    raise UnknownModelError(f"{name_or_path!r} is neither a testbed model ({', '.join(ZOO)}) nor a checkpoint folder")
