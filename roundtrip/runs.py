"""Saved runs of the backdoor benches (`bench/backdoor.py`, `bench/recipe_freeze.py`): the code a run was made with,
the options both take, their JSON output, and the runs of several outputs (one seed per session on a slow machine)
joined into one table.

An output is `{"benchmark": NAME, "seconds": ..., "results": [{"model", "ratio", "runs": [{"seed", "rows": {method:
{...}}, ...}]}]}`; every run's rows hold the original's (each row's DER is against it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from acg.roundtrip.backdoor import summarise


class MergeError(ValueError):
    """Outputs that cannot be joined into one table: unreadable, of another bench, or the same seed twice."""


def code_version(where: Path | None = None) -> dict[str, str | bool | None]:
    """The commit of the git checkout holding `where` (this file by default) and whether its tracked files had
    uncommitted changes; None for both outside a git checkout."""

    def git(*a: str) -> str | None:
        cwd = Path(where or __file__).resolve()
        cwd = cwd if cwd.is_dir() else cwd.parent
        try:
            done = subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True)
        except OSError:  # no git on the machine
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


PACKAGES = ("torch", "numpy", "scipy", "numba", "onnx", "onnxruntime")  # what the fit and the evaluation run on
WIDE = 240  # columns for tables written to a file or a pipe (the backdoor table is about 240 wide)


def environment() -> dict[str, Any]:
    """What a run's figures may depend on besides the code: Python, the packages in PACKAGES (None where not
    installed), torch's thread count, the platform and the CPU's model name (Linux's /proc/cpuinfo; the platform's
    processor string elsewhere). The same code fits differently on two machines or package sets (README: the
    testbed-s fits of 28 November and 2 December), so each output says which it ran on."""
    import platform
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name") and ":" in ln]
    cpu = names[0] if names else platform.processor() or None
    return {
        "python": platform.python_version(),
        "packages": {p: version(p) for p in PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": len(names) or None,
    }


def add_options(ap: argparse.ArgumentParser, ratios: str) -> None:
    """The options the backdoor benches share: what to run (models, ratios — `ratios` by default —, seeds, prompts,
    threads) and what to do with it (--json, --out, --merge, --markdown)."""
    ap.add_argument("--models", default="testbed-s")
    ap.add_argument("--ratios", default=ratios)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out prompts per task")
    ap.add_argument("--n-trig", type=int, default=200, help="triggered prompts per task and family")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", type=Path, help="also write the JSON here (after every seed)")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge these JSON outputs (their runs) into one table")
    ap.add_argument("--markdown", action="store_true", help="print the tables in Markdown (as in the README)")


def document(benchmark: str, entries: dict[tuple[str, float], list[dict]], seconds: float, **extra: Any) -> str:
    """`benchmark`'s output (the module docstring's shape): the runs per (model, ratio) with their `summarise`,
    `seconds` and whatever `extra` says (the code's version, the files merged)."""
    results = [{"model": m, "ratio": r, "runs": runs, "summary": summarise(runs)} for (m, r), runs in entries.items()]
    return json.dumps(
        {"benchmark": benchmark, "seconds": seconds, **extra, "results": results}, indent=1, default=float
    )


def bench_main(
    args: argparse.Namespace,
    benchmark: str,
    where: Path,
    measurer: Callable[[], Callable[[str, float, int], dict]],
    show: Callable[[Any, str, float, list[dict], bool], None],
) -> None:
    """A backdoor bench's main after its options are parsed: the runs `merged` from `args.merge`, or `measured` by
    what `measurer()` gives (called only then, so that it may refuse its options before any work; on `args.threads`
    torch threads); each (model,
    ratio)'s `show(console, model, ratio, runs, as_markdown)` (on stderr under --json); the JSON `emit`ted. A merge
    refused exits with its reason."""
    from rich.console import Console

    try:
        if args.merge:
            entries, extra = merged(args.merge, benchmark)
        else:
            measure = measurer()
            torch.set_num_threads(args.threads)
            entries, extra = measured(args, benchmark, where, measure)
    except MergeError as e:
        raise SystemExit(str(e)) from e
    console = Console(stderr=args.json)
    if not console.is_terminal:  # a log file or a pipe: rich's 80 columns would wrap the wide tables cell by cell
        console = Console(stderr=args.json, width=WIDE)
    for (model, ratio), runs in entries.items():
        show(console, model, ratio, runs, args.markdown)
    emit(document(benchmark, entries, **extra), args.out, args.json)


def measured(
    args: argparse.Namespace, benchmark: str, where: Path, measure: Callable[[str, float, int], dict]
) -> tuple[dict[tuple[str, float], list[dict]], dict[str, Any]]:
    """`measure(model, ratio, seed)` for every model, ratio and seed of `args` (`add_options`), in that order: the
    runs per (model, ratio), and the output's `seconds`, `code` (the version of the checkout holding `where` at
    launch) and `environment` (`environment()`, at launch). With `args.out` the output so far is written there after
    every seed, so that a run killed part way keeps what it measured."""
    entries: dict[tuple[str, float], list[dict]] = {}
    start, version, env = time.perf_counter(), code_version(where), environment()

    def extra() -> dict[str, Any]:
        return {"seconds": time.perf_counter() - start, "code": version, "environment": env}

    for model in args.models.split(","):
        for ratio in map(float, args.ratios.split(",")):
            runs = entries.setdefault((model, ratio), [])
            for seed in map(int, args.seeds.split(",")):
                runs.append(measure(model, ratio, seed))
                if args.out:
                    args.out.write_text(document(benchmark, entries, **extra()) + "\n")
    return entries, extra()


def merged(files: list[Path], benchmark: str) -> tuple[dict[tuple[str, float], list[dict]], dict[str, Any]]:
    """`merge_runs` of `files` (MergeError as it raises them), and the output's `seconds` and `merged_from`."""
    entries, seconds = merge_runs(files, benchmark)
    return entries, {"seconds": seconds, "merged_from": [str(f) for f in files]}


def log(line: str) -> None:
    """A bench's progress line, on stderr at once (stdout is the JSON's under --json)."""
    print(line, file=sys.stderr, flush=True)


def emit(doc: str, out: Path | None, as_json: bool) -> None:
    """A bench's JSON: written to `out` where one is given, printed on stdout under --json."""
    if out:
        out.write_text(doc + "\n")
    if as_json:
        print(doc)


def _runs_of(f: Path, benchmark: str) -> tuple[dict[str, Any], list[tuple[str, float, list[dict]]]]:
    """The output in `f` and its (model, ratio, runs); MergeError where it is not `benchmark`'s."""
    what = f"not a bench/{benchmark}.py JSON output"
    try:
        doc = json.loads(f.read_text())
        named = doc.get("benchmark", benchmark)
        found = [(e["model"], e["ratio"], e["runs"]) for e in doc["results"]]
        for _, _, listed in found:
            for r in listed:
                if "seed" not in r or "original" not in r["rows"]:  # DER needs the original's row
                    raise KeyError("seed" if "seed" not in r else "rows.original")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise MergeError(f"{f}: {what} ({type(e).__name__}: {e})") from e
    if named != benchmark:
        raise MergeError(f"{f}: {what} (it is bench/{named}.py's)")
    return doc, found


def merge_runs(files: list[Path], benchmark: str) -> tuple[dict[tuple[str, float], list[dict]], float]:
    """The runs of `benchmark`'s outputs in `files` per (model, ratio), sorted by seed, and the seconds they took in
    all. Refused (MergeError, naming the file): a file that is not such an output, a (model, ratio, seed) present
    twice (it would count twice), and runs whose rows differ (runs of different versions of the bench)."""
    entries: dict[tuple[str, float], list[dict]] = {}
    seconds = 0.0
    for f in files:
        doc, found = _runs_of(f, benchmark)
        seconds += doc.get("seconds", 0.0)
        for model, ratio, new in found:
            runs = entries.setdefault((model, ratio), [])
            seen = {r["seed"] for r in runs}
            for r in new:
                if r["seed"] in seen:
                    raise MergeError(f"{f}: {model} ratio {ratio} seed {r['seed']} is already in an earlier file")
                if runs and list(r["rows"]) != list(runs[0]["rows"]):
                    theirs, ours = set(r["rows"]), set(runs[0]["rows"])
                    raise MergeError(
                        f"{f}: {model} ratio {ratio} seed {r['seed']} has other rows than seed {runs[0]['seed']} "
                        f"(only here: {sorted(theirs - ours) or 'none'}; only there: {sorted(ours - theirs) or 'none'})"
                        ": runs of different versions of the bench do not make one table"
                    )
                runs.append(r)
    for runs in entries.values():
        runs.sort(key=lambda r: r["seed"])
    return entries, seconds
