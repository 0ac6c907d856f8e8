"""Front ends are exact: torch.fx, Hugging Face GPT-2 / BERT (objects and local folders), a live HookedTransformer,
the testbed by name; unsupported ops and configs fail with one clear error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_model, random_tokens, torch_logits
from torch import nn

from acg.compiler import frontend
from acg.compiler import fx as acg_fx
from acg.compiler.transformer import ConfigError
from acg.ir import interpret


def _run(graph, tokens, **extra):
    return interpret.run(graph, {graph.inputs[0].name: tokens, **extra})[graph.outputs[0]]


class Block(nn.Module):
    """nanoGPT's block: fused qkv Linear, split, view/transpose, a tril buffer or SDPA, GELU(tanh) MLP, RMSNorm."""

    def __init__(self, d, h, n_ctx, sdpa):
        super().__init__()
        self.h, self.sdpa = h, sdpa
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.RMSNorm(d, eps=1e-6)
        self.fc = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d), nn.Dropout(0.1))
        self.register_buffer("bias", torch.tril(torch.ones(n_ctx, n_ctx)))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(self.ln(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.fc(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, sdpa=False, vocab=20, d=32, n_ctx=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_ctx, d)
        self.blocks = nn.ModuleList([Block(d, 4, n_ctx, sdpa) for _ in range(2)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        b, t = idx.size()
        x = self.wte(idx) + self.wpe(torch.arange(0, t, dtype=torch.long, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("sdpa", [False, True])
def test_fx_nanogpt_is_exact(sdpa):
    torch.manual_seed(0)
    model = TinyGPT(sdpa).double().eval()
    graph = acg_fx.to_ir(model, "float64")
    for seq in (1, 7, 16):
        tokens = np.random.default_rng(seq).integers(0, 20, (2, seq))
        with torch.no_grad():
            ref = model(torch.as_tensor(tokens)).numpy()
        assert np.abs(_run(graph, tokens) - ref).max() <= 1e-9


def test_fx_traces_the_testbed_architecture():
    model = random_model(seed=31).double()
    graph = acg_fx.to_ir(model, "float64")
    tokens = random_tokens(model.cfg)
    assert np.abs(_run(graph, tokens) - torch_logits(model, tokens)).max() <= 1e-9


def test_fx_unsupported_op_names_op_target_and_line():
    class UsesFFT(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x.float()).real

    with pytest.raises(acg_fx.UnsupportedOpError) as info:
        acg_fx.to_ir(UsesFFT())
    msg = str(info.value)
    assert "fft" in msg and "test_frontends.py" in msg and "torch.fft.fft(x.float())" in msg and "Supported:" in msg


def test_hf_gpt2_objects_and_folders(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    for cls in (transformers.GPT2LMHeadModel, transformers.GPT2Model):
        model = cls(cfg).eval().double()
        model.save_pretrained(tmp_path / cls.__name__, safe_serialization=True)
        for ref_obj in (model, tmp_path / cls.__name__):
            loaded = frontend.load(ref_obj, "float64")
            tokens = np.random.default_rng(1).integers(0, 50, (2, 9))
            got = _run(loaded.graph, tokens)
            assert np.abs(got - loaded.original(tokens)).max() <= 1e-9
            expected = (2, 9, 50) if cls is transformers.GPT2LMHeadModel else (2, 9, 32)
            assert got.shape == expected


def test_hf_bert_with_padding_mask(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval().double()
    model.save_pretrained(tmp_path / "bert", safe_serialization=True)
    loaded = frontend.load(tmp_path / "bert", "float64")
    tokens = np.random.default_rng(2).integers(0, 50, (3, 10))
    mask = np.ones_like(tokens)
    mask[1, 6:] = 0
    got = _run(loaded.graph, tokens, attention_mask=mask)
    ref = loaded.original(tokens, mask)
    keep = mask.astype(bool)
    assert np.abs(got[keep] - ref[keep]).max() <= 1e-9  # padded positions are don't-cares in HF too


def test_live_hooked_transformer():
    tl = pytest.importorskip("transformer_lens")
    model = random_model(seed=32).double()
    keys = {k: v for k, v in model.cfg.to_dict().items() if k not in ("attn_scale", "original_architecture")}
    hooked = tl.HookedTransformer(tl.HookedTransformerConfig(**keys, dtype=torch.float64))
    missing, unexpected = hooked.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.endswith((".mask", ".IGNORE")) for k in missing)
    loaded = frontend.load(hooked, "float64")
    tokens = random_tokens(model.cfg)
    assert np.abs(_run(loaded.graph, tokens) - torch_logits(model, tokens)).max() <= 1e-9


def test_testbed_by_name():
    from acg.zoo.registry import ZOO

    if not (ZOO["testbed-s"].path / "model.safetensors").exists():
        pytest.skip("testbed weights not shipped yet")
    loaded = frontend.load("testbed-s", "float64")
    tokens = np.random.default_rng(3).integers(0, loaded.graph.meta["config"]["d_vocab"], (4, 20))
    assert np.abs(_run(loaded.graph, tokens) - loaded.original(tokens)).max() <= 1e-9


def test_config_keys_that_change_the_computation_are_refused(tmp_path):
    from acg.compiler.transformer import save_checkpoint

    model = random_model(seed=33)
    path = save_checkpoint(model, tmp_path / "m")
    (path / "meta.json").unlink()  # a checkpoint from another tool, with its own config keys (no hash recorded)
    cfg = json.loads((path / "config.json").read_text())
    for key, value in (("rotary_dim", 8), ("gated_mlp", True), ("positional_embedding_type", "rotary")):
        (path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ConfigError, match=key):
            frontend.load(path)
    (path / "config.json").write_text(json.dumps({**cfg, "model_name": "anything", "tokenizer_name": None}))
    frontend.load(path)  # keys that do not change the computation are ignored


def test_zero_blocks_are_handled_like_any_other():
    model = random_model(seed=34)
    with torch.no_grad():
        for p in model.blocks[1].parameters():
            p.zero_()
    loaded = frontend.load(model, "float64")
    tokens = random_tokens(model.cfg)
    assert np.abs(_run(loaded.graph, tokens) - torch_logits(model, tokens)).max() <= 1e-9
