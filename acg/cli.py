"""The `acg` command line. Commands that report figures take `--json` and then print one JSON object on stdout;
progress and logs go to stderr. acg's own errors print as one paragraph (a traceback only with `--debug`)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from acg.ir.errors import ACGError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
zoo_app = typer.Typer(no_args_is_help=True, help="The testbed: tasks, backdoors and shipped models.")
app.add_typer(zoo_app, name="zoo")

err = Console(stderr=True)
_state = {"debug": False}

JsonFlag = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------- zoo


@zoo_app.command("list")
def zoo_list(as_json: JsonFlag = False) -> None:
    """The testbed models and tasks."""
    from acg.zoo.registry import ZOO
    from acg.zoo.tasks import BACKDOORS, TASKS

    models = {
        name: {
            "description": m.description,
            "shipped": (m.path / "model.safetensors").exists(),
            **{k: getattr(m.cfg, k) for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab", "n_ctx")},
        }
        for name, m in ZOO.items()
    }
    tasks = {name: t.description for name, t in TASKS.items()}
    backdoors = {f: {"trigger": " ".join(b.tokens), "target": b.target} for f, b in BACKDOORS.items()}
    if as_json:
        emit({"models": models, "tasks": tasks, "backdoors": backdoors})
        return
    table = Table("model", "layers", "d_model", "heads", "d_mlp", "shipped", "description")
    for name, m in models.items():
        table.add_row(
            name,
            str(m["n_layers"]),
            str(m["d_model"]),
            str(m["n_heads"]),
            str(m["d_mlp"]),
            "yes" if m["shipped"] else "no",
            m["description"],
        )
    out = Console()
    out.print(table)
    for name, desc in tasks.items():
        out.print(f"  task [bold]{name}[/]: {desc}")
    for f, b in backdoors.items():
        out.print(f"  backdoor [bold]{f}[/]: `{b['trigger']}` -> {b['target']}")


@zoo_app.command("train")
def zoo_train(
    name: str,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="output folder (default: runs/zoo/NAME)")] = None,
    steps: Annotated[int | None, typer.Option(help="override the number of training steps")] = None,
    seed: Annotated[int | None, typer.Option(help="override the seed")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Train a testbed model from its seed, evaluate it, and say whether it reproduces the shipped weights."""
    import dataclasses

    from acg.compiler.transformer import save_checkpoint
    from acg.roundtrip.evaluate import evaluate
    from acg.zoo.registry import get
    from acg.zoo.train import train

    spec = get(name)
    train_spec = spec.train
    if steps is not None:
        train_spec = dataclasses.replace(train_spec, steps=steps)
    if seed is not None:
        train_spec = dataclasses.replace(train_spec, seed=seed)
    out = out or Path("runs") / "zoo" / name
    model, record = train(spec.cfg, train_spec, progress=True)
    err.print(f"trained {name} in {record['train_seconds']:.0f} s; evaluating ...")
    record["eval"] = evaluate(model)
    record["n_params"] = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, out, metadata={"name": name, **record})
    shipped = spec.path / "model.safetensors"
    record["out"] = str(out)
    record["identical_to_shipped"] = shipped.exists() and _sha256(shipped) == _sha256(out / "model.safetensors")
    if as_json:
        emit(record)
    else:
        _print_eval(name, record["eval"], record["n_params"])
        err.print(f"wrote {out}; identical to the shipped weights: {record['identical_to_shipped']}")


@zoo_app.command("eval")
def zoo_eval(
    name: str,
    n: Annotated[int, typer.Option(help="held-out prompts per task")] = 2000,
    n_backdoor: Annotated[int, typer.Option(help="held-out prompts per task and backdoor family")] = 500,
    seed: Annotated[int, typer.Option(help="which held-out sample")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """`task_acc` per task, `asr` and false-trigger rate per backdoor family, `n_params` of a model."""
    from acg.roundtrip.evaluate import evaluate
    from acg.zoo.registry import load

    model = load(name)
    result = {
        "model": name,
        **evaluate(model, n, n_backdoor, seed),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if as_json:
        emit(result)
    else:
        _print_eval(name, result, result["n_params"])


def _print_eval(name: str, result: dict, n_params: int) -> None:
    table = Table(title=f"{name} ({n_params:,} parameters)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for task, acc in result["task_acc"].items():
        table.add_row(f"task_acc[{task}]", f"{acc:.4f}")
    for family, asr in result["asr"].items():
        false = result["false_trigger"][family]
        table.add_row(f"asr[{family}]", f"{asr:.4f}")
        if false is not None:
            table.add_row(f"false_trigger[{family}]", f"{false:.4f}")
    Console().print(table)


# --------------------------------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="testbed model")] = "testbed-s",
    as_json: JsonFlag = False,
) -> None:
    """The main job on the built-in default: the testbed model, evaluated against its backdoor-free twin."""
    from acg.roundtrip.evaluate import evaluate
    from acg.zoo.registry import load

    start = time.perf_counter()
    results = {}
    for name in (model, "testbed-s-clean"):
        err.print(f"evaluating {name} ...")
        m = load(name)
        results[name] = {**evaluate(m), "n_params": sum(p.numel() for p in m.parameters())}
    summary = {"models": results, "seconds": round(time.perf_counter() - start, 1)}
    if as_json:
        emit(summary)
        return
    for name, r in results.items():
        _print_eval(name, r, r["n_params"])


# ---------------------------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; acg's own errors become one paragraph on stderr and exit status 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, prog_name="acg", standalone_mode=False)
    except ACGError as e:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
