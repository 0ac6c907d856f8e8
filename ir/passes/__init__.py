"""IR passes: small frozen dataclasses with a kebab-case `name`, `__call__(graph) -> PassResult`, one per module,
collected in `REGISTRY`, run by `run_pipeline`, which verifies after each pass and names the failing one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from acg.ir.graph import Graph, IRError
from acg.ir.verify import verify


@dataclass(frozen=True, eq=False)
class PassResult:
    graph: Graph
    changed: bool
    report: Mapping[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def __call__(self, graph: Graph) -> PassResult: ...


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str, **params: Any) -> Pass:
    _load_all()
    try:
        return REGISTRY[name](**params)
    except KeyError:
        raise IRError(f"unknown pass {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def run_pipeline(graph: Graph, passes: Iterable[Pass | str]) -> tuple[Graph, list[dict[str, Any]]]:
    """Run passes in order, verifying after each; returns the final graph and one report per pass."""
    done: list[str] = []
    reports = []
    for p in passes:
        p = get_pass(p) if isinstance(p, str) else p
        result = p(graph)
        try:
            verify(result.graph, allow_nonfinite=bool(result.graph.meta.get("allow_nonfinite", False)))
        except IRError as e:
            raise IRError(
                f"pass {p.name!r} produced an invalid graph (pipeline so far: {' -> '.join(done) or '-'}): {e}"
            ) from e
        done.append(p.name)
        reports.append({"pass": p.name, "changed": result.changed, **dict(result.report)})
        graph = result.graph
    return graph, reports


def _load_all() -> None:
    from acg.ir.passes import capture, dce, fold_norm, fuse_heads, lower_einsum  # noqa: F401


__all__ = ["REGISTRY", "Pass", "PassResult", "get_pass", "register", "run_pipeline"]
