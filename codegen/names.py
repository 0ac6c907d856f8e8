"""One name table per generated module: IR value names and labels -> legal, unique Python identifiers that are never
keywords, builtins or the module's own names. Label text itself never becomes an identifier."""

from __future__ import annotations

import builtins
import keyword
import re

_ILLEGAL = re.compile(r"[^0-9a-zA-Z_]+")
RESERVED = frozenset(
    {"np", "math", "torch", "nn", "F", "numba", "onnx", "Path", "forward", "self", "batch", "seq", "annotations"}
)


class NameTable:
    def __init__(self, reserved: frozenset[str] | set[str] = RESERVED):
        self._reserved = set(reserved)
        self._by_key: dict[str, str] = {}
        self._taken: set[str] = set()

    def __call__(self, key: str, hint: str | None = None) -> str:
        """The identifier for `key` (an IR value name, a tensor name, ...), made from `hint` or the key itself."""
        if key in self._by_key:
            return self._by_key[key]
        base = _ILLEGAL.sub("_", hint if hint is not None else key).strip("_")[:60] or "v"
        if not base.isascii():
            base = "v"
        if base[0].isdigit():
            base = "v_" + base
        if keyword.iskeyword(base) or keyword.issoftkeyword(base) or hasattr(builtins, base) or base in self._reserved:
            base += "_"
        name, n = base, 1
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        self._by_key[key] = name
        return name

    def reserve(self, name: str) -> None:
        self._taken.add(name)
