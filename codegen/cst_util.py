"""libcst helpers shared by the source-emitting backends: literals from values, statements from templates, comments,
and the one formatting step at the end."""

from __future__ import annotations

import math
import shutil
import subprocess
from typing import Any

import libcst as cst
from libcst.helpers import parse_template_expression, parse_template_statement

from acg.codegen.escape import comment_text


def literal(value: Any) -> cst.BaseExpression:
    """A libcst node for a plain value (bool, int, float, str, None, tuple); strings via repr, never raw text."""
    if value is None or isinstance(value, bool):
        return cst.Name(str(value))
    if isinstance(value, int):
        node = cst.Integer(str(abs(value)))
        return cst.UnaryOperation(cst.Minus(), node) if value < 0 else node
    if isinstance(value, float):
        if math.isnan(value):
            return cst.parse_expression("math.nan")
        if math.isinf(value):
            return cst.parse_expression("-math.inf" if value < 0 else "math.inf")
        node = cst.Float(repr(abs(value)))
        return cst.UnaryOperation(cst.Minus(), node) if value < 0 or math.copysign(1, value) < 0 else node
    if isinstance(value, str):
        return cst.SimpleString(repr(value))
    if isinstance(value, tuple | list):
        elements = [cst.Element(literal(v)) for v in value]
        if len(elements) == 1:
            return cst.Tuple(elements, lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        return cst.Tuple(elements)
    raise TypeError(f"no literal for {type(value).__name__}")


def expr(template: str, **parts: cst.BaseExpression | str) -> cst.BaseExpression:
    """A template expression: string parts are identifiers (cst.Name), nodes are used as they are."""
    return parse_template_expression(
        template, **{k: cst.Name(v) if isinstance(v, str) else v for k, v in parts.items()}
    )


def stmt(template: str, comment: str | None = None, **parts: cst.BaseExpression | str) -> cst.BaseStatement:
    node = parse_template_statement(template, **{k: cst.Name(v) if isinstance(v, str) else v for k, v in parts.items()})
    if comment and isinstance(node, cst.SimpleStatementLine):
        node = node.with_changes(
            trailing_whitespace=cst.TrailingWhitespace(
                whitespace=cst.SimpleWhitespace("  "), comment=cst.Comment("# " + comment_text(comment))
            )
        )
    return node


def comment_line(text: str) -> cst.EmptyLine:
    return cst.EmptyLine(comment=cst.Comment("# " + comment_text(text)))


def docstring(text: str) -> cst.SimpleStatementLine:
    """`text` must already be docstring-safe (see escape.docstring_text)."""
    return cst.SimpleStatementLine([cst.Expr(cst.SimpleString(f'"""{text}"""'))])


def assign(target: str, value: cst.BaseExpression, comment: str | None = None) -> cst.SimpleStatementLine:
    line = cst.SimpleStatementLine([cst.Assign([cst.AssignTarget(cst.Name(target))], value)])
    if comment:
        line = line.with_changes(
            trailing_whitespace=cst.TrailingWhitespace(
                whitespace=cst.SimpleWhitespace("  "), comment=cst.Comment("# " + comment_text(comment))
            )
        )
    return line


def function(
    name: str,
    params: list[str],
    body: list[cst.BaseStatement],
    decorators: list[str] = (),
    leading: list[cst.EmptyLine] = (),
) -> cst.FunctionDef:
    return cst.FunctionDef(
        name=cst.Name(name),
        params=cst.Parameters([cst.Param(cst.Name(p)) for p in params]),
        body=cst.IndentedBlock(body),
        decorators=[cst.Decorator(cst.parse_expression(d)) for d in decorators],
        leading_lines=[cst.EmptyLine(), cst.EmptyLine(), *leading],
    )


def ruff_format(source: str, line_length: int = 120) -> str:
    """Format with ruff when it is installed (it is a dependency); the same ruff gives the same bytes."""
    exe = _ruff()
    if exe is None:
        return source
    proc = subprocess.run(
        [exe, "format", "--isolated", f"--line-length={line_length}", "--stdin-filename", "generated.py", "-"],
        input=source,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout if proc.returncode == 0 else source


def _ruff() -> str | None:
    try:
        from ruff.__main__ import find_ruff_bin

        return find_ruff_bin()
    except Exception:
        return shutil.which("ruff")
