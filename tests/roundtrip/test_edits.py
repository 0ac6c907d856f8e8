"""An edited circuit goes through the round trip: weight, constant and threshold edits fold into the dictionary
(checked by reading the folded ACG's virtual weights back), a deleted feature is left out, and what does not fold (a
hypothesis, a product of nodes, an edit to a head's score) is refused with the reason."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from acg import codegen
from acg.cli import main
from acg.codegen.importer import import_code
from acg.compiler import acg as acg_io
from acg.compiler import harvest
from acg.compiler.fit import FitSpec, fit
from acg.compiler.frontend import load as load_model
from acg.compiler.unroll import candidate_nodes, unroll
from acg.ir import serialize
from acg.roundtrip import dense
from acg.roundtrip.dense import RoundtripError
from acg.roundtrip.edits import fold

TERM = r"(f1_\d+)_pre = \(\s*s_\w+\s*\*\s*\(\s*(-?\d+\.\d+(?:e-?\d+)?) \* (\w+)"


@pytest.fixture(scope="module")
def circuit(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    spec = FitSpec(width=64, steps=80, e2e_steps=0, usage_prompts=100, target_l0=8)
    acg, _ = fit(load_model("testbed-s", "float32").module, harvest.testbed_corpus(300, seed=5), spec, progress=False)
    keep = {layer: np.argsort(-acg.usage[f"feat_mass.L{layer}"])[:6].tolist() for layer in range(acg.cfg.n_layers)}
    graph = unroll(acg, keep, min_weight=0.05, max_terms=6)
    path = codegen.compile(graph, root / "code", "python")
    return acg, keep, graph, path


def _edit(path, tmp_path, edit):
    shutil.copytree(path, tmp_path / "e")
    file = tmp_path / "e" / "model.py"
    file.write_text(edit(file.read_text()))
    return import_code(file)[0]


def _deps(acg, keep, feature):
    return {n.name: n for n in candidate_nodes(acg, keep)}[feature].deps


def test_a_weight_a_constant_and_a_threshold_fold_into_the_dictionary(circuit, tmp_path):
    acg, keep, graph, path = circuit
    source = path.joinpath("model.py").read_text()
    feature, w, node = re.search(TERM, source).groups()
    const = re.search(rf"{feature}_pre = \([^=]*?\+ (-?\d+\.\d+(?:e-?\d+)?)\n\s*\)", source, re.S).group(1)
    thr = re.search(rf"{feature} = np\.where\({feature}_pre > (\d+\.\d+(?:e-?\d+)?),", source).group(1)

    def edit(s: str) -> str:
        s = s.replace(f"{w} * {node}", f"-2.0 * {node}", 1)
        s = re.sub(rf"(\+ ){re.escape(const)}(\n\s*\)\s*# float32\[batch, seq\]\n\s*{feature} = )", r"\g<1>0.125\2", s)
        return s.replace(f"{feature}_pre > {thr},", f"{feature}_pre > 0.75,", 1)

    edited = _edit(path, tmp_path, edit)
    folded, sel, report = fold(acg, edited)
    (entry,) = report["edited_features"]
    assert entry["feature"] == feature and entry["terms"] == [
        {"node": node, "was": pytest.approx(float(w)), "now": -2.0}
    ]
    before, after = _deps(acg, keep, feature), _deps(folded, keep, feature)
    assert after[node] == pytest.approx(-2.0, abs=1e-6)
    live = {op.name for op in graph.ops}
    assert max(abs(after.get(k, 0.0) - v) for k, v in before.items() if k in live and k != node) <= 1e-9
    layer, i = map(int, feature[1:].split("_"))
    tc = folded.transcoders[layer]
    ln_b = acg.weights[f"blocks.{layer}.ln2.b"]
    assert float(ln_b @ tc.W_enc[:, i] + tc.b_enc[i]) == pytest.approx(0.125, abs=1e-6)
    assert float(tc.threshold[i]) == pytest.approx(0.75)
    others = [j for j in range(tc.n_features) if j != i]
    assert np.array_equal(tc.W_enc[:, others], acg.transcoders[layer].W_enc[:, others])
    model, _, rt = dense.roundtrip(folded, sel)  # and it is a checkpoint like any other
    assert rt["n_features"] == [len(keep[0]), len(keep[1])]


def test_a_deleted_feature_is_left_out_and_relu_folds_as_threshold_zero(circuit, tmp_path):
    acg, keep, _, path = circuit
    source = path.joinpath("model.py").read_text()
    feature = f"f0_{keep[0][0]}"
    line = re.search(rf"\n    {feature} = np\.where\([^\n]*\n", source).group(0)
    other = f"f1_{keep[1][0]}"
    relu = re.search(rf"{other} = np\.where\({other}_pre > [^,]+, {other}_pre, 0\.0\)", source).group(0)
    edited = _edit(
        path, tmp_path, lambda s: s.replace(line, "\n", 1).replace(relu, f"{other} = np.maximum({other}_pre, 0.0)")
    )
    folded, sel, report = fold(acg, edited)
    assert report["deleted"] == [feature] and keep[0][0] not in sel.features[0].tolist()
    assert float(folded.transcoders[1].threshold[keep[1][0]]) == 0.0


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s, f: s.replace(
                "\n\ndef forward", "\n\n@hypothesis\ndef h(tokens):\n    return tokens * 0.0\n\n\ndef forward", 1
            ).replace(f"    {f} = np.where", f"    {f} = h(tokens)\n    unused_{f} = np.where", 1),
            "Python hypothesis",
        ),
        (lambda s, f: re.sub(TERM, lambda m: m.group(0).replace(m.group(2), m.group(3)), s, count=1), "not linear"),
        (lambda s, f: re.sub(r"(L\dH\d_score = \(\s*\(\s*)(-?\d+\.\d+)", r"\g<1>0.5", s, count=1), "head"),
    ],
    ids=["hypothesis", "product", "head score"],
)
def test_what_does_not_fold_is_refused(circuit, tmp_path, edit, message):
    acg, keep, _, path = circuit
    feature = f"f1_{keep[1][0]}"
    edited = _edit(path, tmp_path, lambda s: edit(s, feature))
    with pytest.raises(RoundtripError, match=message):
        fold(acg, edited)


def test_cli_roundtrip_of_an_edited_circuit(circuit, tmp_path, capsys):
    acg, keep, _, path = circuit
    acg_io.save(acg, tmp_path / "acg")
    source = path.joinpath("model.py").read_text()
    _, w, node = re.search(TERM, source).groups()
    shutil.copytree(path, tmp_path / "e")
    (tmp_path / "e" / "model.py").write_text(source.replace(f"{w} * {node}", f"1.5 * {node}", 1))
    assert main(["import-code", str(tmp_path / "e" / "model.py"), "-o", str(tmp_path / "ir")]) == 0
    args = ["roundtrip", "testbed-s", "--acg", str(tmp_path / "acg"), "--ir", str(tmp_path / "ir")]
    assert main([*args, "-o", str(tmp_path / "ckpt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["edits"]["edited_features"][0]["terms"][0]["now"] == 1.5
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    assert serialize.load(tmp_path / "ir").meta["edited"]["n_changed"] >= 1
