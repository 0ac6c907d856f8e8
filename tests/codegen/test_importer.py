"""Importing the readable Python backend's output back into the IR (`acg import-code`): unchanged code gives the same
IR byte for byte; each kind of hand edit changes exactly what it touched and the imported IR computes what the edited
code computes (checked by running the edited module itself on fresh random tokens); hostile code is refused, never
run."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import dense_ir, random_model

from acg import codegen
from acg.codegen.importer import CodeImportError, import_code
from acg.compiler import harvest
from acg.compiler.fit import FitSpec, fit
from acg.compiler.frontend import load as load_model
from acg.compiler.lower import lower
from acg.compiler.unroll import unroll
from acg.ir import interpret, serialize

CANARY = "acg_import_canary"


@pytest.fixture(scope="module")
def circuit(tmp_path_factory):
    """A testbed-s circuit (a quickly fitted ACG, its 6 most used features per layer) compiled to readable Python."""
    root = tmp_path_factory.mktemp("imp")
    loaded = load_model("testbed-s", "float32")
    corpus = harvest.testbed_corpus(300, seed=5)
    spec = FitSpec(width=64, steps=80, e2e_steps=0, usage_prompts=100, target_l0=8)
    acg, _ = fit(loaded.module, corpus, spec, progress=False)
    keep = {layer: np.argsort(-acg.usage[f"feat_mass.L{layer}"])[:6].tolist() for layer in range(acg.cfg.n_layers)}
    graph = unroll(acg, keep, min_weight=0.05, max_terms=6)
    path = codegen.compile(graph, root / "code", "python", title="testbed-s circuit")
    return graph, path, root


def _same_files(a, b, tmp: Path) -> bool:
    serialize.save(a, tmp / "a")
    serialize.save(b, tmp / "b")
    return all(
        (tmp / "a" / f).read_bytes() == (tmp / "b" / f).read_bytes() for f in ("graph.json", "tensors.safetensors")
    )


def _variant(src_dir: Path, dst: Path, edit) -> Path:
    shutil.copytree(src_dir, dst)
    file = dst / "model.py"
    file.write_text(edit(file.read_text()))
    return file


def _tokens(seed: int, d_vocab: int = 60, n: int = 4, seq: int = 14) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, d_vocab - 1, (n, seq))


def _run_edited(folder: Path, tokens: np.ndarray) -> np.ndarray:
    """Run an edited module as plain Python (codegen.load refuses it: its hash no longer matches the manifest)."""
    spec = importlib.util.spec_from_file_location(f"edited_{abs(hash(str(folder)))}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.forward(tokens)


def _agrees_with_the_code(graph, folder: Path, seed: int) -> None:
    """The imported IR computes what the (edited) module computes, run as plain Python."""
    tokens = _tokens(seed)
    want = _run_edited(folder, tokens)
    got = interpret.run(graph, tokens, dtype="float32")[graph.outputs[0]]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_unchanged_testbed_circuit_imports_to_the_same_bytes(circuit, tmp_path):
    graph, path, _ = circuit
    imported, report = import_code(path / "model.py")
    assert report.mapped and not any(report.changes.values())
    assert _same_files(graph, imported, tmp_path)


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new", "silu"])
@pytest.mark.parametrize("norm", ["LN", "RMS", None])
def test_unchanged_dense_models_import_to_the_same_bytes(act, norm, tmp_path):
    graph = dense_ir(random_model(seed=5, act_fn=act, normalization_type=norm), "float32")
    path = codegen.compile(graph, tmp_path / "code", "python")
    imported, _ = import_code(path / "model.py")
    assert _same_files(graph, imported, tmp_path)


def test_unchanged_feature_level_ir_with_error_terms_imports_to_the_same_bytes(tmp_path):
    model = random_model(seed=7, act_fn="relu", d_vocab=11, n_ctx=8)
    rng = np.random.default_rng(1)
    corpus = [list(map(int, rng.integers(0, 11, rng.integers(3, 8)))) for _ in range(60)]
    acg, _ = fit(model, corpus, FitSpec(width=12, steps=30, e2e_steps=0, usage_prompts=20, target_l0=3), progress=False)
    for keep_errors, qk in ((True, False), (False, True)):
        graph = lower(acg, keep_errors=keep_errors, qk_tables=qk)
        path = codegen.compile(graph, tmp_path / f"c{keep_errors}", "python")
        imported, _ = import_code(path / "model.py")
        assert _same_files(graph, imported, tmp_path / f"s{keep_errors}")


def _first_term(source: str) -> tuple[str, str, str]:
    """(feature, the whole `w * node` term, node) of the first term of the first feature's pre-activation."""
    m = re.search(r"(f\d+_\d+)_pre = \(\s*s_\w+\s*\*\s*\(\s*(-?\d+\.\d+(?:e-?\d+)? \* (\w+))", source)
    assert m, "no feature formula found"
    return m.group(1), m.group(2), m.group(3)


def test_editing_one_weight_changes_exactly_that_edge(circuit, tmp_path):
    graph, path, _ = circuit
    source = (path / "model.py").read_text()
    feature, term, node = _first_term(source)
    file = _variant(path, tmp_path / "w", lambda s: s.replace(term, f"-1.25 * {node}", 1))
    edited, report = import_code(file)
    c = report.changes
    assert len(c["changed"]) == 1 and c["changed"][0]["fields"] == ["inputs"]
    op = edited.op(c["changed"][0]["op"])
    assert op.kind == "mul" and node in op.inputs
    const = edited.op(next(i for i in op.inputs if i != node))
    assert float(edited.tensors[const.attr("tensor")]) == -1.25
    assert c["added"] == [const.name]  # the new weight; the old one is gone only where nothing else used it
    assert set(c["removed"]) <= {o.name for o in graph.ops if o.kind == "const"}
    assert edited.meta["edited"]["n_changed"] == 1
    _agrees_with_the_code(edited, file.parent, seed=1)


def test_terms_added_and_removed_and_activation_replaced(circuit, tmp_path):
    graph, path, _ = circuit
    source = (path / "model.py").read_text()
    feature, term, node = _first_term(source)
    other = "tok_5" if node != "tok_5" and "tok_5 = " in source else "zeros"

    added = _variant(path, tmp_path / "add", lambda s: s.replace(term, f"{term} + 0.75 * {other}", 1))
    g, report = import_code(added)
    kinds = sorted(g.op(n).kind for n in report.changes["added"])
    assert kinds == ["add", "const", "mul"] and len(report.changes["changed"]) == 1
    _agrees_with_the_code(g, added.parent, seed=2)

    removed = _variant(path, tmp_path / "rm", lambda s: s)  # drop the term after the first one
    text = removed.read_text()
    start = text.index(term) + len(term)
    nxt = re.match(r"\s*\+ (-?\d+\.\d+(?:e-?\d+)? \* \w+)", text[start:])
    assert nxt
    removed.write_text(text[:start] + text[start + nxt.end() :])
    g, report = import_code(removed)
    assert report.changes["added"] == [] and len(report.changes["removed"]) >= 2  # the term (mul) and its add
    _agrees_with_the_code(g, removed.parent, seed=3)

    m = re.search(rf"{feature} = np\.where\({feature}_pre > [^,]+, {feature}_pre, 0\.0\)", source)
    act = _variant(
        path, tmp_path / "act", lambda s: s.replace(m.group(0), f"{feature} = np.maximum({feature}_pre, 0.0)")
    )
    g, report = import_code(act)
    (change,) = report.changes["changed"]
    assert change["op"] == feature and g.op(feature).kind == "relu"
    _agrees_with_the_code(g, act.parent, seed=4)


def test_deleting_a_feature_reads_zeros_downstream(circuit, tmp_path):
    graph, path, _ = circuit
    source = (path / "model.py").read_text()
    feature, _, _ = _first_term(source)
    line = re.search(rf"\n    {feature} = np\.where\([^\n]*\n", source)
    deleted = _variant(path, tmp_path / "del", lambda s: s.replace(line.group(0), "\n", 1))
    g, report = import_code(deleted)
    assert report.deleted == [feature] and feature not in {o.name for o in g.ops}
    assert feature in report.changes["removed"]
    # the same as the code with the feature set to zero everywhere
    zeroed = _variant(
        path, tmp_path / "zero", lambda s: s.replace(line.group(0), f"\n    {feature} = zeros * 1.0\n", 1)
    )
    tokens = _tokens(5)
    want = _run_edited(zeroed.parent, tokens)
    assert np.abs(interpret.run(g, tokens, dtype="float32")["logits"] - want).max() <= 1e-5


def test_a_hypothesis_function_is_spliced_in_and_runs(circuit, tmp_path):
    graph, path, _ = circuit
    source = (path / "model.py").read_text()
    feature, _, _ = _first_term(source)
    line = re.search(rf"    {feature} = np\.where\([^\n]*", source).group(0)
    hyp = "\n\n@hypothesis\ndef guess(tokens):\n    return 0.5 * (tokens == 24)\n"

    def edit(s: str) -> str:
        s = s.replace("\n\ndef forward", hyp + "\n\ndef forward", 1)
        return s.replace(line, f"    {feature} = guess(tokens)", 1)

    file = _variant(path, tmp_path / "hyp", edit)
    g, report = import_code(file)
    assert report.hypotheses == ["guess"] and g.op(feature).kind == "hypothesis"
    runnable = file.read_text().replace("@hypothesis\n", "")  # as plain Python the decorator is not needed
    file.write_text(runnable)
    _agrees_with_the_code(g, file.parent, seed=6)
    serialize.save(g, tmp_path / "ir")  # an IR holding a hypothesis saves and loads like any other
    assert serialize.load(tmp_path / "ir").op(feature).attr("function") == "guess"


HOSTILE = [
    ("import math\n", f"import math\nimport os\nos.system('touch {CANARY}')\n", "import refused"),
    ("import math\n", f"import math\nopen('{CANARY}', 'w')\n", "not one the python backend writes"),
    ("FEATURE = np.where", f"FEATURE = __import__('os').system('touch {CANARY}') + np.where", "cannot map"),
    ("FEATURE = np.where", f"FEATURE = np.load('{CANARY}') + np.where", "cannot map"),
    ("FEATURE = np.where", "FEATURE = np.where.__globals__ + np.where", "cannot map"),
    (
        "\n\ndef forward",
        f"\n\n@hypothesis\ndef evil(tokens):\n    open('{CANARY}', 'w')\n    return tokens\n\n\ndef forward",
        "name 'open'",
    ),
    (
        "\n\ndef forward",
        "\n\n@hypothesis\ndef evil(tokens):\n    import os\n    return tokens\n\n\ndef forward",
        "Import is not allowed",
    ),
    (
        "\n\ndef forward",
        "\n\n@hypothesis\ndef evil(tokens):\n    return tokens.__class__\n\n\ndef forward",
        "attribute '__class__'",
    ),
    (
        "\n\ndef forward",
        "\n\n@hypothesis\ndef evil(tokens):\n    return np.fromfile('x')\n\n\ndef forward",
        "np.fromfile is not allowed",
    ),
    (
        "\n\ndef forward",
        f"\n\ndef _softmax(x, axis):\n    open('{CANARY}', 'w')\n\n\ndef forward",
        "helper _softmax was changed",
    ),
    (
        '_W = np.load(Path(__file__).with_name("model.npz"))',
        "_W = np.load(Path(__file__).with_name('../../etc.npz'))",
        "plain file name",
    ),
]


@pytest.mark.parametrize("old, new, message", HOSTILE)
def test_hostile_edits_are_refused_and_never_run(circuit, tmp_path, monkeypatch, old, new, message):
    _, path, _ = circuit
    source = (path / "model.py").read_text()
    feature, _, _ = _first_term(source)
    old, new = old.replace("FEATURE", feature), new.replace("FEATURE", feature)
    assert old in source, old
    file = _variant(path, tmp_path / "h", lambda s: s.replace(old, new, 1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CodeImportError, match=message) as err:
        import_code(file)
    assert re.search(r"model\.py:\d+(:\d+)?: ", str(err.value))  # file, line (and column)
    assert not (tmp_path / CANARY).exists()


def test_without_a_source_map_the_import_still_computes_the_same(circuit, tmp_path):
    graph, path, _ = circuit
    file = _variant(path, tmp_path / "nomap", lambda s: s)
    (file.parent / "model.map.json").unlink()
    g, report = import_code(file)
    assert not report.mapped
    tokens = _tokens(8)
    a = interpret.run(graph, tokens, dtype="float32")["logits"]
    assert np.abs(interpret.run(g, tokens, dtype="float32")["logits"] - a).max() <= 1e-6


def test_bad_files_give_one_clear_error(circuit, tmp_path):
    _, path, _ = circuit
    with pytest.raises(CodeImportError, match="no such file"):
        import_code(tmp_path / "missing.py")
    broken = _variant(path, tmp_path / "syntax", lambda s: s.replace("def forward(tokens):", "def forward(tokens:", 1))
    with pytest.raises(CodeImportError, match="not valid Python"):
        import_code(broken)
    undefined = _variant(path, tmp_path / "undef", lambda s: s.replace("@ writes_L0_attn", "@ writes_nowhere", 1))
    with pytest.raises(CodeImportError, match="'writes_nowhere' is not defined"):
        import_code(undefined)
    (tmp_path / "npz").mkdir()
    shutil.copytree(path, tmp_path / "npz" / "c")
    (tmp_path / "npz" / "c" / "model.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CodeImportError, match="model.npz: not a readable .npz"):
        import_code(tmp_path / "npz" / "c" / "model.py")


def test_a_head_score_edit_imports_and_computes_what_the_code_computes(circuit, tmp_path):
    _, path, _ = circuit
    source = (path / "model.py").read_text()
    m = re.search(r"(L\dH\d)_score = \(\s*\(\s*(-?\d+\.\d+(?:e-?\d+)?) \*", source)
    assert m, "no head score with pair terms"
    head, w = m.groups()
    file = _variant(path, tmp_path / "head", lambda s: s.replace(m.group(0), m.group(0).replace(w, "0.75"), 1))
    g, report = import_code(file)
    assert len(report.changes["changed"]) == 1 and report.changes["added"] and g.op(f"{head}_score")
    _agrees_with_the_code(g, file.parent, seed=9)


def test_an_edited_module_is_not_run_by_codegen_load(circuit, tmp_path):
    _, path, _ = circuit
    file = _variant(path, tmp_path / "tampered", lambda s: s.replace("import math\n", "import math\nimport os\n", 1))
    with pytest.raises(codegen.ArtefactError, match="content hash mismatch"):
        codegen.load(file.parent)
