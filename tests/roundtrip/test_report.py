"""The HTML report: every section built from real measurements on a small fitted model, the page self-contained,
and rendered by headless Chromium (figures and the circuit drawing visible in the screenshot)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from helpers import random_model

from acg import codegen
from acg.compiler.fit import FitSpec, fit
from acg.compiler.unroll import unroll
from acg.roundtrip import dense, report
from acg.roundtrip.data import Pair
from acg.roundtrip.diff import Nodes, Side, answer_fn, diff
from acg.roundtrip.evaluate import accuracy, answer_logits, kl_per_prompt
from acg.roundtrip.monitor import Monitor, auroc, detection_at_fpr

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page_data(tmp_path_factory):
    torch.manual_seed(0)
    model = random_model(seed=71, d_vocab=13, n_ctx=12, act_fn="relu")
    rng = np.random.default_rng(3)
    corpus = [list(map(int, rng.integers(0, 12, rng.integers(3, 12)))) for _ in range(300)]  # token 12 unseen
    acg, _ = fit(model, corpus, FitSpec(width=48, steps=100, e2e_steps=20, usage_prompts=300), progress=False)
    out = tmp_path_factory.mktemp("report")
    tasks = {
        name: [Pair(list(map(int, rng.integers(0, 12, 8))), int(rng.integers(0, 13))) for _ in range(60)]
        for name in ("task.a", "task.b")
    }
    captured, _, _ = dense.roundtrip(acg, dense.select_captured(acg))
    candidates = {"ACG replacement": dense.to_dense(acg), "roundtrip full": captured}
    # "attack": the unseen token 12 inserted, "target" 0 (a random model has no backdoor; the rate is still real)
    trig = [Pair([*ex.ids[:3], 12, *ex.ids[3:]], 0) for ex in tasks["task.a"]]
    rows = {}
    for name, m in {"original": model, **candidates}.items():
        rows[name] = {
            "task_acc": {t: accuracy(answer_logits(m, exs), exs) for t, exs in tasks.items()},
            "asr": {"token": accuracy(answer_logits(m, trig), trig)},
            "n_params": dense.n_params(m)["n_params"],
        }
    clean = [ex for exs in tasks.values() for ex in exs]
    ref = answer_logits(model, clean)
    kl = {n: kl_per_prompt(ref, answer_logits(m, clean)) for n, m in candidates.items()}
    mon = Monitor(acg)
    s_clean = mon.score(corpus[:60])["score"]
    s_new = mon.score([[*p[:3], 12, *p[3:]] for p in corpus[:30]])["score"]
    scores = [acg.usage[f"feat_mass.L{layer}"] for layer in range(acg.cfg.n_layers)]
    g = report.circuit_graph(acg, scores, per_layer=5)
    keep = {la: [int(n["id"].split(".f")[1]) for n in g["nodes"] if n["layer"] == la] for la in range(2)}
    code_dir = codegen.compile(unroll(acg, keep, min_weight=0.01, max_terms=4), out / "code", "python")
    side_a = Side("original", "model", answer_fn(model), Nodes(None, True))
    side_b = Side("roundtrip", "roundtrip", answer_fn(captured), Nodes(dense.select_captured(acg).features, False))
    data = {
        "model": "random <tiny> & 'model'",
        "config": {"n_layers": 2, "d_model": 16},
        "fit": {"layers": acg.stats["layers"]},
        "rows": rows,
        "kl": kl,
        "monitor": {
            "families": {
                "new token": {"auroc": auroc(s_clean, s_new), "detection": detection_at_fpr(s_clean, s_new)[0]}
            },
            "scores": {"clean": s_clean, "new token inserted": s_new},
        },
        "circuit": {
            "task": "test",
            "summary": "the most used features",
            "svg": report.circuit_svg(g),
            "code": report.code_excerpt((code_dir / "model.py").read_text()),
            "code_path": str(code_dir / "model.py"),
        },
        "diffs": {"original vs roundtrip": diff(side_a, side_b, tasks, acg, 2, 4)},
        "tree": report.explanation_tree(acg, corpus[0], 3, depth=2, width=3),
    }
    return data, out, s_clean, s_new


def test_report_is_self_contained_and_has_every_section(page_data):
    data, out, s_clean, s_new = page_data
    assert s_new.mean() > s_clean.mean()  # the unseen token shows in the monitor
    path = report.write(data, out / "report.html")
    text = path.read_text()
    assert "<script" not in text and "<link" not in text
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", text)  # nothing fetched from the network
    assert "random &lt;tiny&gt; &amp; &#x27;model&#x27;" in text  # text from data is escaped
    for fig in ("fig-layers", "fig-task-acc", "fig-asr", "fig-kl", "fig-monitor", "circuit"):
        assert f'id="{fig}"' in text, fig
    assert text.count("<details") >= 1 + 3  # the logit and its drivers
    assert "f1_" in text or "f0_" in text  # the code excerpt
    tree = data["tree"]
    assert tree["children"] and all("attribution" in c for c in tree["children"])


def _tree_nodes(n):
    yield n
    for c in n.get("children", []):
        yield from _tree_nodes(c)


def test_explanation_tree_structure(page_data):
    data, *_ = page_data
    tree = data["tree"]
    assert len(tree["children"]) == 3  # width
    for n in _tree_nodes(tree):
        if n is tree:
            continue
        assert n["kind"] in ("feature", "error", "embedding")
        if n["kind"] == "feature":
            assert n["activation"] > 0  # only active features carry attribution
            for c in n["children"]:  # a feature's inputs come from strictly earlier layers or the embeddings
                assert c["kind"] == "embedding" or c["layer"] < n["layer"]
        else:
            assert n["children"] == []


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (make test installs it)"
)
def test_report_renders_in_headless_chromium(page_data, tmp_path):
    import matplotlib.image as mpimg

    data, out, *_ = page_data
    path = report.write(data, out / "render.html")
    shot = tmp_path / "shot.png"
    cmd = [
        "chromium",
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,9000",
        path.as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    dom = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", path.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
        text=True,
    ).stdout
    assert len(re.findall(r"<svg[^>]*class=\"figure\"", dom)) >= 6  # the browser parsed every figure
    img = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)

    def count(rgb, tol=8):
        return int((np.abs(img - np.array(rgb)).max(-1) <= tol).sum())

    assert count((31, 119, 180)) > 2000, "matplotlib's blue bars did not render"
    assert count((255, 127, 14)) > 1000, "matplotlib's orange bars did not render"
    node = tuple(int(report.NODE_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    assert count(node) > 500, "the circuit drawing's nodes did not render"


def test_the_demo_reads_the_readmes_table_where_there_is_one(tmp_path):
    """The demo's report takes the baselines from the README's 5% table (`-table`) before the model's earlier run, and
    goes without where neither holds the model at 5%."""
    from acg.cli import _saved_bench

    def saved(path, asr: float, model: str = "testbed-s", ratio: float = 0.05) -> None:
        summary = {"FT": {"asr": {"token": {"mean": asr, "sd": 0.0}}}}
        entry = {"model": model, "ratio": ratio, "runs": [{}], "summary": summary}
        path.write_text(json.dumps({"results": [entry]}))

    assert _saved_bench("testbed-s", tmp_path) is None
    saved(tmp_path / "backdoor-testbed-s-5pct.json", 0.5)
    assert _saved_bench("testbed-s", tmp_path)["rows"]["FT"]["token"] == 0.5
    saved(tmp_path / "backdoor-testbed-s-5pct-table.json", 0.25, ratio=0.01)  # not the 5% budget: the earlier run
    assert _saved_bench("testbed-s", tmp_path)["rows"]["FT"]["token"] == 0.5
    saved(tmp_path / "backdoor-testbed-s-5pct-table.json", 0.25)
    assert _saved_bench("testbed-s", tmp_path)["rows"]["FT"]["token"] == 0.25
    assert _saved_bench("testbed-m", tmp_path) is None


def test_circuit_summary_says_where_the_mlp_bound_cut_it():
    c = {"k": 254, "fraction": 0.0621, "reference": {"code.vars": 0.964}, "task_acc": {"code.vars": 0.9612}}
    fits = report.circuit_summary({**c, "budget": {"max_features": 254, "k_before": 248, "cut": 0}}, 40)
    assert fits == (
        "254 features kept (6.2% of the dictionary); task_acc code.vars 0.961 (original 0.964); drawn: the top 40 by "
        "attribution and their strongest edges."
    )
    assert report.circuit_summary(c, 40) == fits  # no bound (older reports: no key)
    cut = report.circuit_summary({**c, "budget": {"max_features": 254, "k_before": 302, "cut": 48}}, 40)
    assert "(6.2% of the dictionary, cut from 302 to the MLP bound of 254)" in cut
