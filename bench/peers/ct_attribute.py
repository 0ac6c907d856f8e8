"""Runs inside the peers venv (circuit-tracer 0.5.0, transformer-lens 3.x), offline: loads an acg model export
(TransformerLens config + state dict) and its transcoders in circuit-tracer's PLT layout, computes one prompt's
attribution graph, and writes plain arrays (.npy) and a JSON summary. No pickles cross the boundary.

    python ct_attribute.py WORK_DIR
WORK_DIR holds config.json, model.safetensors, vocab.json, prompt.json and ct_cache/local/acg/ (PLT transcoders).
"""

import json
import os
import sys
import time

work = sys.argv[1]
os.environ["CIRCUIT_TRACER_CACHE_DIR"] = os.path.join(work, "ct_cache")
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
os.environ["WANDB_MODE"] = "disabled"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

torch.set_num_threads(2)
t0 = time.perf_counter()
from circuit_tracer import ReplacementModel, attribute  # noqa: E402
from circuit_tracer.graph import compute_graph_scores  # noqa: E402
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

cfg_raw = json.load(open(os.path.join(work, "config.json")))
vocab = json.load(open(os.path.join(work, "vocab.json")))
prompt = json.load(open(os.path.join(work, "prompt.json")))["tokens"]

tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
hf_tok = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token=vocab[1], pad_token=vocab[0], eos_token=vocab[1], unk_token=vocab[0]
)
tok_dir = os.path.join(work, "tok")
hf_tok.save_pretrained(tok_dir)
from transformers import AutoTokenizer  # noqa: E402

hf_tok = AutoTokenizer.from_pretrained(tok_dir)

keys = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "act_fn",
    "normalization_type",
    "attention_dir",
    "d_vocab_out",
    "eps",
)
cfg = HookedTransformerConfig(
    **{k: cfg_raw[k] for k in keys if k in cfg_raw},
    positional_embedding_type="standard",
    model_name="acg-testbed",
    original_architecture="GPT2LMHeadModel",
    tokenizer_name=tok_dir,
    device="cpu",
    dtype=torch.float32,
)
transcoders, _ = load_transcoder_from_hub(
    "local/acg", device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False, lazy_decoder=False
)
model = ReplacementModel.from_config(cfg, transcoders, backend="transformerlens", tokenizer=hf_tok)
sd = load_file(os.path.join(work, "model.safetensors"))
sd = {k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."): v.float() for k, v in sd.items()}
missing, unexpected = model.load_state_dict(sd, strict=False)
assert not unexpected, unexpected
load_s = time.perf_counter() - t0

t1 = time.perf_counter()
graph = attribute(torch.tensor(prompt), model, max_n_logits=10, desired_logit_prob=0.95, batch_size=64, verbose=False)
attr_s = time.perf_counter() - t1
replacement, completeness = compute_graph_scores(graph)
np.save(os.path.join(work, "ct_adjacency.npy"), graph.adjacency_matrix.float().numpy())
np.save(os.path.join(work, "ct_active_features.npy"), graph.active_features.numpy())
np.save(os.path.join(work, "ct_selected_features.npy"), graph.selected_features.numpy())
np.save(os.path.join(work, "ct_activation_values.npy"), graph.activation_values.float().numpy())
logit_ids = [t.vocab_idx for t in graph.logit_targets] if hasattr(graph, "logit_targets") else []
json.dump(
    {
        "load_s": load_s,
        "attribute_s": attr_s,
        "replacement_score": replacement,
        "completeness_score": completeness,
        "logit_tokens": logit_ids,
        "n_pos": len(prompt),
        "circuit_tracer": __import__("importlib.metadata").metadata.version("circuit-tracer"),
    },
    open(os.path.join(work, "ct_result.json"), "w"),
)
print("ok")
