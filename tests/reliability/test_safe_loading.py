"""Loading never runs code: a pickled checkpoint is refused unless the user passes --allow-pickle, and a malicious
pickle (one that runs a command when unpickled) is never executed, with or without the flag."""

from __future__ import annotations

import json
import os
import pickle  # noqa: TID251 - to craft the hostile file the loader must refuse

import pytest
import torch
from helpers import random_model, torch_logits

from acg.cli import main
from acg.compiler.safe import PICKLE_NAMES, allow_pickle
from acg.compiler.transformer import load_checkpoint, save_checkpoint


class Payload:
    """Unpickling this runs a shell command that creates the canary file."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _folder(tmp_path, name: str, payload) -> tuple:
    model = random_model(seed=3)
    ckpt = save_checkpoint(model, tmp_path / name)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "meta.json").unlink()
    with open(ckpt / "model.pt", "wb") as f:
        pickle.dump(payload if payload is not None else model.state_dict(), f)
    return model, ckpt


@pytest.mark.parametrize("flag", [False, True], ids=["default", "--allow-pickle"])
def test_a_malicious_pickle_is_never_executed(tmp_path, capsys, flag):
    canary = tmp_path / "canary"
    _, ckpt = _folder(tmp_path, "evil", {"blocks.0.attn.W_Q": Payload(canary)})
    argv = (["--allow-pickle"] if flag else []) + ["compile", str(ckpt), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("weights_only" in err) and ("--allow-pickle" in err or flag)
    assert not canary.exists() and not (tmp_path / "out").exists()


def test_a_plain_state_dict_pickle_loads_only_with_the_flag(tmp_path, capsys):
    model, ckpt = _folder(tmp_path, "plain", None)
    torch.save(model.state_dict(), ckpt / "model.pt")
    assert main(["compile", str(ckpt), "-o", str(tmp_path / "out")]) == 2
    assert "pickled checkpoint" in capsys.readouterr().err
    assert main(["--allow-pickle", "compile", str(ckpt), "-o", str(tmp_path / "out")]) == 0
    allow_pickle(True)
    try:
        loaded = load_checkpoint(ckpt, dtype=torch.float64)
    finally:
        allow_pickle(False)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5)).numpy()
    assert abs(torch_logits(loaded, tokens) - torch_logits(model, tokens)).max() == 0.0
    assert main(["compile", str(ckpt), "-o", str(tmp_path / "out2")]) == 2  # the flag does not outlive its command
    capsys.readouterr()


def test_every_pickle_name_is_covered_and_json_is_plain_data(tmp_path):
    assert {"model.pt", "pytorch_model.bin"} <= set(PICKLE_NAMES)
    # config.json is parsed with json: a config that looks like code stays a string and fails as a bad value
    model = random_model(seed=4)
    ckpt = save_checkpoint(model, tmp_path / "cfg")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "act_fn": "__import__('os').system('touch x')"}))
    assert main(["compile", str(ckpt), "-o", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "o").exists()


def test_a_hugging_face_folder_with_pytorch_model_bin(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=11)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()  # the older format: weights as a pickle
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert main(["compile", str(tmp_path / "hf"), "-o", str(tmp_path / "out")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["--allow-pickle", "compile", str(tmp_path / "hf"), "-o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main(["--allow-pickle", "verify", str(tmp_path / "hf"), str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_err"] < 1e-4
