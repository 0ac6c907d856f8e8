"""Loading never runs code: acg reads safetensors and JSON. A pickled checkpoint (`model.pt`, `pytorch_model.bin`, ...)
is refused unless the user allows it (`acg --allow-pickle ...`, or `allow_pickle(True)`), and even then it is read
with `torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers only and refuses every other
object, so a file crafted to run code fails to load instead."""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path

from acg.ir.errors import ACGError

PICKLE_NAMES = ("model.pt", "model.pth", "model.bin", "pytorch_model.bin")
_allowed: ContextVar[bool] = ContextVar("acg_allow_pickle", default=False)


class PickleRefused(ACGError):
    pass


def allow_pickle(on: bool) -> None:
    _allowed.set(bool(on))


def pickled_weights(folder: Path) -> Path | None:
    """The pickled weights file in `folder`, if it has one."""
    return next((folder / n for n in PICKLE_NAMES if (folder / n).is_file()), None)


def load_pickled(file: Path) -> dict:
    """A state dict from a pickle, on the user's say-so only, and with torch's weights-only unpickler."""
    if not _allowed.get():
        raise PickleRefused(
            f"{file}: a pickled checkpoint; acg reads safetensors only, because unpickling can run code. Convert it "
            "to safetensors, or, for a file you trust, pass --allow-pickle (it is then read with "
            "torch.load(weights_only=True), which refuses anything but tensors)"
        )
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's UnpicklingError and friends: the reason is in the message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PickleRefused(f"{file}: refused by torch.load(weights_only=True): {reason}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PickleRefused(f"{file}: expected a dict of tensors (a state dict), found {type(state).__name__}")
    return state


__all__ = ["PICKLE_NAMES", "PickleRefused", "allow_pickle", "load_pickled", "pickled_weights"]
