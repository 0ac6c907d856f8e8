"""Text from data (labels, token strings, model names) made inert before it enters generated source: printable ASCII
only, every other character as an escape, so it can never end a comment, a string or a line."""

from __future__ import annotations


def comment_text(text: object, limit: int = 200) -> str:
    """Safe for a `#` comment: one line of printable ASCII."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "..."
    out = s.encode("unicode_escape").decode("ascii")
    return "".join(c if 32 <= ord(c) < 127 else f"\\x{ord(c):02x}" for c in out)


def docstring_text(text: object, limit: int = 200) -> str:
    """Safe inside a triple-quoted docstring: escapes stay escapes, quotes cannot close it."""
    return comment_text(text, limit).replace("\\", "\\\\").replace('"', '\\"')
