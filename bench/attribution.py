"""Per-prompt attribution graphs: acg's against circuit-tracer 0.5.0's on the same model, transcoders and prompt.

    python bench/attribution.py --acg ACG_DIR [--prompt "a = 3 ; b = a ; print b"] [--json]

circuit-tracer runs in its own venv (`.venv-peers`, made on first use: torch 2.13.0 + circuit-tracer 0.5.0, which pins
transformers < 4.58 and transformer-lens 3.x, and sae-lens for bench/fit.py; nothing is downloaded but packages),
fully offline on our exported model and transcoders. Reported: the feature-to-feature (and feature-to-logit) edge
weights on the nodes both graphs hold, their largest absolute and relative difference, both tools' scores and run
times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".venv-peers"


def ensure_peers() -> Path:
    py = PEERS / "bin" / "python"
    probe = [py, "-c", "import circuit_tracer, sae_lens"]
    if not py.exists() or subprocess.run(probe, capture_output=True).returncode:
        print("making .venv-peers (circuit-tracer 0.5.0 and sae-lens beside torch 2.13.0) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", PEERS], check=True)
        pip = [PEERS / "bin" / "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "circuit-tracer==0.5.0", "sae-lens", "torch==2.13.0"], check=True)
    return py


def main() -> None:
    from acg.compiler import acg as acg_io
    from acg.compiler import interop
    from acg.compiler.attribution import attribute, graph_scores
    from acg.compiler.labels import token_names
    from acg.zoo import vocab

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acg", type=Path, required=True)
    ap.add_argument("--prompt", default="a = 3 ; b = 7 ; a = b ; print a")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    acg = acg_io.load(args.acg)
    tokens = vocab.encode(args.prompt.split())
    py = ensure_peers()
    with tempfile.TemporaryDirectory(prefix="acg-attr-") as tmp:
        work = Path(tmp)
        (work / "config.json").write_text(json.dumps(acg.cfg.to_dict()))
        save_file({k: np.asarray(v, np.float32) for k, v in acg.weights.items()}, str(work / "model.safetensors"))
        (work / "vocab.json").write_text(json.dumps(token_names(acg.cfg.d_vocab)))
        (work / "prompt.json").write_text(json.dumps({"tokens": tokens}))
        interop.save_circuit_tracer(acg.transcoders, work / "ct_cache" / "local" / "acg")
        t0 = time.perf_counter()
        ours = attribute(acg, tokens)
        ours_s = time.perf_counter() - t0
        proc = subprocess.run([py, REPO / "bench" / "peers" / "ct_attribute.py", work], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"circuit-tracer failed:\n{proc.stderr[-3000:]}")
        ct = json.loads((work / "ct_result.json").read_text())
        ct_adj = np.load(work / "ct_adjacency.npy")
        ct_active = np.load(work / "ct_active_features.npy")
        ct_sel = np.load(work / "ct_selected_features.npy")
    ct_feats = [tuple(map(int, ct_active[i])) for i in ct_sel]
    our_feats = [tuple(map(int, f)) for f in ours.active_features]
    common = sorted(set(ct_feats) & set(our_feats))
    ci = np.array([ct_feats.index(f) for f in common])
    oi = np.array([our_feats.index(f) for f in common])
    ff_ct, ff_ours = ct_adj[np.ix_(ci, ci)], ours.adjacency[np.ix_(oi, oi)]
    n_ct_logits = len(ct["logit_tokens"])
    same_logits = ct["logit_tokens"] == ours.logit_tokens.tolist()
    lf_ct = ct_adj[-n_ct_logits:, ci] if same_logits else None
    lf_ours = ours.adjacency[ours.slices["logits"]][:, oi] if same_logits else None
    scale = max(float(np.abs(ff_ours).max()), 1e-12)
    result = {
        "prompt": args.prompt,
        "n_features_ours": len(our_feats),
        "n_features_circuit_tracer": len(ct_feats),
        "n_common_features": len(common),
        "feature_edges_compared": int(ff_ours.size),
        "feature_edge_max_abs_diff": float(np.abs(ff_ct - ff_ours).max()) if common else None,
        "feature_edge_max_rel_diff": float(np.abs(ff_ct - ff_ours).max() / scale) if common else None,
        "same_logit_targets": same_logits,
        "logit_edge_max_abs_diff": float(np.abs(lf_ct - lf_ours).max()) if same_logits and common else None,
        "ours": {**graph_scores(ours), "attribute_s": ours_s},
        "circuit_tracer": {
            "replacement_score": ct["replacement_score"],
            "completeness_score": ct["completeness_score"],
            "attribute_s": ct["attribute_s"],
            "load_s": ct["load_s"],
            "version": ct["circuit_tracer"],
        },
    }
    if args.json:
        print(json.dumps({"benchmark": "attribution", **result}, indent=2))
        return
    for k, v in result.items():
        print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
