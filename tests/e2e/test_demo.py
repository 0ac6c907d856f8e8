"""The README's main job, end to end (slow: about 10 minutes on 2 cores): the demo on the shipped testbed model ends by
writing the HTML report and printing its path."""

from __future__ import annotations

import json

import pytest

from acg.cli import main


@pytest.mark.slow
def test_demo_writes_the_report(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    report = tmp_path / "demo" / "report.html"
    assert summary["acg"]["distilled"]["report"] == str(report)
    text = report.read_text()
    for fig in ("fig-layers", "fig-task-acc", "fig-asr", "fig-kl", "fig-monitor", "circuit"):
        assert f'id="{fig}"' in text
    assert "<details" in text and "Diff: original vs roundtrip code" in text
    assert summary["acg"]["circuit"]["imports_back_identical"]
    rows = summary["acg"]["distilled"]["rows"]
    circuit = summary["acg"]["distilled"]["circuit"]  # held to the table's bound on its MLP parameters
    assert circuit["budget"]["max_features"] >= circuit["k"]
    assert circuit["mlp_share"] <= 0.25
    assert circuit["mlp_share"] == rows["roundtrip code"]["n_params_mlp"] / rows["original"]["n_params_mlp"]
    assert rows["roundtrip full"]["asr"]["token"] < 0.1  # the unseen trigger token is not captured
    pairs = rows[
        "roundtrip full + layer-0 pairs blocked"
    ]  # `h` and `big` never met in one prompt of the fitting corpus
    assert pairs["asr"]["conj"] < rows["roundtrip full"]["asr"]["conj"] - 0.3
    for backend, r in summary["backends"].items():
        assert r["max_abs_err"] < 1e-3, backend
