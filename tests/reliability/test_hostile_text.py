"""Text from data never becomes code: tensor names, op names, scopes, titles and feature labels full of quotes,
triple quotes, backslashes, newlines, carriage returns, NUL, Unicode line separators, `__import__('os').system(...)`
and very long strings go into every source backend; each generated module parses, holds the text only inside
comments and docstrings (escaped), runs nothing but itself when imported, and computes what the IR computes."""

from __future__ import annotations

import ast
import io
import tokenize

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acg import codegen
from acg.ir import interpret
from acg.ir.builder import GraphBuilder

MARK = "PWNED"
NASTY = [
    f"\n__import__('os').system('touch {MARK}')\n",
    f'"""\nimport os; os.system("touch {MARK}")\n"""',
    f"'''{MARK}'''",
    f"\\\n{MARK} = 1",
    f"\r{MARK}()\r",
    f"\x00{MARK}\x00",
    f"\u2028{MARK}\u2029{MARK}\x85",
    f"# {MARK}\n\t{MARK}",
    f"{MARK}" * 500,
    f"\\N{{{MARK}}} \\x00 \\u2028 {{}} %s {MARK}",
]
texts = st.one_of(
    st.sampled_from(NASTY),
    st.builds(lambda a, b: a + MARK + b, st.text(max_size=40), st.sampled_from(NASTY)),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60).map(lambda t: t + "\n" + MARK + "()"),
)


def _graph(text: str):
    """A small model whose tensor names, op names, scope, title and labels are all `text` (variants)."""
    b = GraphBuilder()
    tokens = b.input("tokens", ("batch", "seq"), "int64")
    rng = np.random.default_rng(0)
    with b.scope(text[:80]):
        emb = b.const(f"{text}.W_E", rng.standard_normal((7, 4)).astype(np.float32))
        x = b.op("embed", emb, tokens, name=f"{text}_x")
        w = b.const(f"W {text}", rng.standard_normal((4, 7)).astype(np.float32))
        h = b.op("relu", b.op("matmul", x, w), name="feature")
        c = b.const(f"scalar {text}", np.asarray(0.5, dtype=np.float32))
        logits = b.op("add", b.op("mul", h, c), h, name="logits")
    labels = {"feature": text, f"{text}_x": text[::-1]}
    return b.build([logits], meta={"title": text, "labels": labels})


def _text_in_code(source: str) -> list[str]:
    """Tokens outside comments and docstrings that carry the hostile text other than as an identifier (names are
    sanitised into identifiers; the sidecar is keyed by them)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and ast.get_docstring(node, clean=False):
            docstrings.add(node.body[0].value.lineno)
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            name = n.func.id if isinstance(n.func, ast.Name) else None
            attr = n.func.attr if isinstance(n.func, ast.Attribute) else None
            assert name not in ("__import__", "exec", "eval", "compile", "open") and attr not in ("system", "popen")
    bad = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.start[0] in docstrings):
            continue
        if MARK in tok.string and not (
            tok.type == tokenize.NAME or (tok.type == tokenize.STRING and ast.literal_eval(tok.string).isidentifier())
        ):
            bad.append(tok.string)
    return bad


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
@pytest.mark.parametrize("backend", ["python", "numba", "torch"])
def test_generated_sources_stay_inert(tmp_path_factory, backend, text):
    graph = _graph(text)
    out = codegen.compile(graph, tmp_path_factory.mktemp(backend) / "a", backend)
    source = (out / "model.py").read_text(encoding="utf-8")
    assert source.isascii() and "\x00" not in source and "\r" not in source
    assert _text_in_code(source) == []  # parses (ast and tokenize raise otherwise); text only in comments/docs
    for line in source.splitlines():
        if "#" in line and MARK in line.split("#", 1)[1]:
            assert "\n" not in line  # a comment never spills onto a code line


@pytest.mark.parametrize("backend", ["python", "numba", "torch"])
@pytest.mark.parametrize("text", NASTY)
def test_importing_a_module_runs_nothing_else_and_computes_the_ir(tmp_path, monkeypatch, backend, text):
    monkeypatch.chdir(tmp_path)
    graph = _graph(text)
    out = codegen.compile(graph, tmp_path / "a", backend)
    tokens = np.random.default_rng(1).integers(0, 7, (2, 5))
    got = np.asarray(codegen.load(out)(tokens))
    want = interpret.run(graph, tokens, dtype="float32")["logits"]
    assert np.abs(got - want).max() <= 1e-5
    assert not (tmp_path / MARK).exists() and not any(MARK in p.name for p in tmp_path.iterdir())


def test_imported_code_keeps_hostile_labels_out_of_the_ir_names(tmp_path):
    from acg.codegen.importer import import_code

    graph = _graph(NASTY[0])
    out = codegen.compile(graph, tmp_path / "a", "python")
    imported, _ = import_code(out / "model.py")
    assert [op.name for op in imported.ops] == [op.name for op in graph.ops]
    assert dict(imported.meta) == dict(graph.meta)
