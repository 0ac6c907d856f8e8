"""Property test: random small configurations (1-3 layers, 1-4 heads, every normalisation type, relu/gelu,
causal/bidirectional, attention-only or not), every backend against the original torch model on fresh tokens."""

from __future__ import annotations

import numpy as np
from helpers import dense_ir, random_model, torch_logits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acg import codegen

configs = st.fixed_dictionaries(
    {
        "n_layers": st.integers(1, 3),
        "n_heads": st.integers(1, 4),
        "d_head": st.sampled_from([2, 4, 8]),
        "d_model": st.sampled_from([8, 12, 16]),
        "d_mlp": st.sampled_from([8, 24]),
        "normalization_type": st.sampled_from(["LN", "LNPre", "RMS", "RMSPre", None]),
        "act_fn": st.sampled_from(["relu", "gelu", "gelu_new"]),
        "attention_dir": st.sampled_from(["causal", "bidirectional"]),
        "attn_only": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs, batch=st.integers(1, 3), seq=st.integers(1, 10), data=st.data())
def test_every_backend_matches_the_original(tmp_path_factory, cfg, batch, seq, data):
    kw = dict(cfg)
    seed = kw.pop("seed")
    model = random_model(seed=seed, std=0.3, d_vocab=11, n_ctx=10, **kw)
    tokens = np.asarray(
        data.draw(st.lists(st.lists(st.integers(0, 10), min_size=seq, max_size=seq), min_size=batch, max_size=batch))
    )
    ref = torch_logits(model, tokens)
    graph = dense_ir(model, "float64")
    root = tmp_path_factory.mktemp("prop")
    for backend in codegen.BACKENDS:
        forward = codegen.load(codegen.compile(graph, root / backend, backend))
        got = np.asarray(forward(tokens))
        assert np.abs(got - ref).max() <= 1e-9, backend
