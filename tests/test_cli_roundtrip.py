"""`acg roundtrip` and `acg eval` end to end on a small model over the testbed vocabulary: captured, all, a task
circuit, a user's JSONL circuit; bad input is refused with one paragraph and no output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import planted_task_model, random_model

from acg.cli import main
from acg.compiler.transformer import load_checkpoint, save_checkpoint
from acg.roundtrip.dense import n_params
from acg.zoo import vocab


def _fitted(root, seed: int, d_model: int):
    """A checkpoint over the testbed vocabulary and its ACG (`root / "acg"`), fitted by `acg fit` on a small corpus."""
    model = random_model(seed=seed, d_vocab=vocab.D_VOCAB, n_ctx=32, d_model=d_model, d_mlp=32, act_fn="relu")
    ckpt = save_checkpoint(model, root / "ckpt")
    rng = np.random.default_rng(seed)
    corpus = root / "corpus.jsonl"
    rows = (rng.integers(1, vocab.D_VOCAB - 1, rng.integers(3, 16)).tolist() for _ in range(120))
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = ["--width", "24", "--steps", "30", "--e2e-steps", "0", "--target-l0", "6", "--json"]
    assert main([str(a) for a in ["fit", ckpt, "-o", root / "acg", "--corpus", corpus, *small]]) == 0
    return model, ckpt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    return root, _fitted(root, 81, 16)[1]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_roundtrip_captured_then_eval(capsys, setup, tmp_path):
    root, ckpt = setup
    code, out, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "-o", tmp_path / "rt", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["source"] == "captured" and report["tokens_dropped"] >= 1  # BOS .. D_VOCAB-2 only in the corpus
    loaded = load_checkpoint(tmp_path / "rt")
    assert loaded.cfg.act_fn == "jumprelu" and loaded.cfg.d_mlp == max(report["n_features"])
    assert not loaded.embed.W_E[vocab.D_VOCAB - 1].any()
    code, out, err = cli(capsys, "eval", tmp_path / "rt", "--n", "20", "--n-backdoor", "5", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["asr"]) == {"token", "conj", "phrase"} and result["n_params"] == report["n_params"]
    code, out, err = cli(capsys, "eval", ckpt, "--acg", root / "acg", "--n", "20", "--n-backdoor", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["what"] == "ACG replacement"


def test_roundtrip_all_is_the_replacement_model(capsys, setup, tmp_path):
    root, ckpt = setup
    code, out, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "-o", tmp_path / "rt", "--all", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens_dropped"] == 0


def test_roundtrip_a_circuit_from_a_task_and_from_jsonl(capsys, setup, tmp_path):
    root, ckpt = setup
    code, out, err = cli(
        capsys,
        "roundtrip",
        ckpt,
        "--acg",
        root / "acg",
        "-o",
        tmp_path / "c",
        "--task",
        "code",
        "--n-prompts",
        "200",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert set(report["circuit"]["task_acc"]) == {"code.vars", "code.brackets"} and report["curve"]
    defaults = (report["circuit"]["block"], report["circuit"]["token_ablation"], report["token_fill"])
    assert defaults == (64, "mean", "mean")  # the backdoor table's circuit unless told otherwise
    assert sum(report["n_edges"].values()) > 0
    original_mlp = n_params(load_checkpoint(ckpt))["n_params_mlp"]
    assert report["circuit"]["budget"]["max_features"] >= report["circuit"]["k"]  # the table's bound: 25% of the MLP
    assert report["n_params_mlp"] <= 0.25 * original_mlp
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a = 3 ; a", "answer": "3"}\n{"prompt": [1, 5, 6], "answer": 7}\n' * 10)
    args = ["roundtrip", ckpt, "--acg", root / "acg", "-o", tmp_path / "d", "--data", data, "--json"]
    code, out, err = cli(capsys, *args, "--block", "8", "--ablation", "zero")
    assert code == 0, err
    report = json.loads(out)
    assert report["token_fill"] == "zero"  # the left-out tokens read as their positions alone
    report = report["circuit"]
    assert report["k"] >= 1 and set(report["task_acc"]) == {"pairs"}  # the file's name
    assert report["block"] == 8 and report["token_ablation"] == "zero"  # the elimination's tries: up to 8 each
    code, out, err = cli(capsys, *args[:-1], "--max-mlp", "0.1")  # 214 of 2,144 MLP parameters: 5 features of 34
    assert code == 0, err
    report = json.loads((tmp_path / "d" / "meta.json").read_text())["roundtrip"]
    if report["circuit"]["budget"]["cut"]:  # said where it cut, and whether the target still held
        assert "to keep MLP parameters within 10% of the original's" in " ".join(err.split())
    assert report["circuit"]["budget"]["max_features"] == 5 and report["circuit"]["k"] <= 5
    assert report["n_params_mlp"] <= 0.1 * original_mlp
    code, out, err = cli(capsys, *args, "--max-mlp", "0")
    assert code == 0, err
    assert json.loads(out)["circuit"]["budget"] is None  # no bound
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text(
        '{"prompt": "a = 3 ; a", "answer": "3", "task": "vars"}\n{"prompt": [1, 5, 6], "answer": 7, "task": "ids"}\n'
        * 10
    )
    args[args.index(data)] = tagged
    code, out, err = cli(capsys, *[a if a != tmp_path / "d" else tmp_path / "e" for a in args])
    assert code == 0, err
    assert set(json.loads(out)["circuit"]["task_acc"]) == {"vars", "ids"}  # each line's task: a target each


def test_the_clis_token_ablations_are_the_libraries():
    """`acg.cli.TokenAblation` repeats `circuit.TOKEN_ABLATIONS` (the CLI imports torch lazily): they must agree."""
    from acg.cli import TokenAblation
    from acg.roundtrip.circuit import TOKEN_ABLATIONS

    assert tuple(a.value for a in TokenAblation) == TOKEN_ABLATIONS


def test_compile_a_task_circuit_features_then_edges(capsys, setup, tmp_path):
    from acg import codegen
    from acg.ir import interpret, serialize

    root, ckpt = setup
    args = ["compile", ckpt, "--acg", root / "acg", "--task", "code", "--n-prompts", "120", "-o", tmp_path / "py"]
    code, out, err = cli(capsys, *args, "--save-ir", tmp_path / "ir", "--json")
    assert code == 0, err
    result = json.loads(out)
    edges = result["edges"]
    assert result["graph"] == "acg-task-circuit" and result["curve"] and result["edge_curve"]
    assert result["circuit"]["block"] == 64  # the backdoor table's: up to 64 features a try
    assert result["circuit"]["token_ablation"] == "zero"  # the edge pass reads a left-out token as its position
    assert 0 < edges["n_edges"] <= edges["n_edges_of"]
    assert sum(edges["n_edges_per_layer"].values()) == edges["n_edges"]
    assert edges["n_features"] == {str(k): v for k, v in enumerate(result["circuit"]["n_features"])}
    graph = serialize.load(tmp_path / "ir")
    assert len(graph.meta["edges"]) == edges["n_edges"] and graph.meta["tokens"]
    tokens = np.random.default_rng(3).integers(1, vocab.D_VOCAB - 1, (3, 9))
    want = interpret.run(graph, tokens, "float32")["logits"]
    got = codegen.load(tmp_path / "py")(tokens)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    code, _, err = cli(
        capsys, "compile", ckpt, "--acg", root / "acg", "--task", "code", "--top", "3", "-o", tmp_path / "x"
    )
    assert code == 2 and "drop --keep-errors" in err and not (tmp_path / "x").exists()
    code, _, err = cli(capsys, "compile", ckpt, "--acg", root / "acg", "--block", "8", "-o", tmp_path / "x")
    assert code == 2 and "give --task or --data" in " ".join(err.split()) and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "line,message",
    [
        ("not json", "not valid JSON"),
        ('{"prompt": [1, 2]}', '"prompt" and "answer"'),
        ('{"prompt": [1, 999], "answer": 3}', "outside the model's vocabulary"),
        ('{"prompt": "a = zzz", "answer": "3"}', "not in the testbed vocabulary"),
    ],
)
def test_bad_task_data_is_refused_and_writes_nothing(capsys, setup, tmp_path, line, message):
    root, ckpt = setup
    data = tmp_path / "bad.jsonl"
    data.write_text(line + "\n")
    code, _, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "-o", tmp_path / "out", "--data", data)
    assert code == 2 and message in " ".join(err.split()) and not (tmp_path / "out").exists()


def test_a_task_circuit_over_its_mlp_bound_is_cut_and_says_so(capsys, tmp_path):
    """The planted model's circuit for "1 -> 3, 2 -> 4" is feature 1 and one of the redundant 0 / 2; 15% of its 178
    MLP parameters hold one feature of 17: the circuit is cut to it, and the target no longer holds."""
    from acg.compiler import acg as acg_io

    model, acg = planted_task_model(redundant=True)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    acg_io.save(acg, tmp_path / "acg")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": [0, 1], "answer": 3}\n{"prompt": [0, 2], "answer": 4}\n' * 10)
    args = ["roundtrip", ckpt, "--acg", tmp_path / "acg", "--data", data, "--block", "1", "--ablation", "zero"]
    code, _, err = cli(capsys, *args, "-o", tmp_path / "two")
    assert code == 0, err
    two = json.loads((tmp_path / "two" / "meta.json").read_text())["roundtrip"]["circuit"]
    assert two["k"] == 2 and two["task_acc"] == {"pairs": 1.0} and two["budget"]["cut"] == 0  # 25%: 2 features fit
    code, _, err = cli(capsys, *args, "--max-mlp", "0.15", "-o", tmp_path / "one")
    assert code == 0, err
    one = json.loads((tmp_path / "one" / "meta.json").read_text())["roundtrip"]["circuit"]
    assert one["k"] == 1 and one["budget"] == {
        "max_features": 1, "k_before": 2, "cut": 1, "trials": 2, "met": False, "validated": None
    }  # fmt: skip
    said = " ".join(err.split())
    assert "cut from 2 to 1 features to keep MLP parameters within 15% of the original's: the target NOT met" in said


def test_an_acg_of_another_model_is_refused(capsys, setup, tmp_path):
    root, _ = setup
    other = random_model(seed=82, d_vocab=vocab.D_VOCAB, n_ctx=32, d_model=16, d_mlp=32, act_fn="relu")
    ckpt = save_checkpoint(other, tmp_path / "other")
    code, _, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "-o", tmp_path / "out")
    assert code == 2 and "another model" in err and not (tmp_path / "out").exists()
    code, _, err = cli(capsys, "roundtrip", setup[1], "--acg", root / "acg", "-o", tmp_path / "out", "--task", "nope")
    assert code == 2 and "unknown task" in err and not (tmp_path / "out").exists()
    args = ["roundtrip", setup[1], "--acg", root / "acg", "-o", tmp_path / "out", "--task", "code", "--block", "0"]
    code, _, err = cli(capsys, *args)
    assert code == 2 and "--block" in err and not (tmp_path / "out").exists()
    code, _, err = cli(capsys, *args[:-1], "1", "--ablation", "resample")
    assert code == 2 and "--ablation" in err and not (tmp_path / "out").exists()
    whole = ["roundtrip", setup[1], "--acg", root / "acg", "-o", tmp_path / "out", "--ablation", "mean"]
    code, _, err = cli(capsys, *whole)
    assert code == 2 and "give --task or --data" in " ".join(err.split()) and not (tmp_path / "out").exists()
    code, _, err = cli(capsys, *whole[:-2], "--max-mlp", "0.5")
    assert code == 2 and "give --task or --data" in " ".join(err.split()) and not (tmp_path / "out").exists()
    code, _, err = cli(capsys, *args[:-1], "1", "--max-mlp", "1.5")
    assert code == 2 and "--max-mlp" in err and not (tmp_path / "out").exists()


def test_hf_export_of_a_jumprelu_round_trip_is_refused(capsys, setup, tmp_path):
    root, ckpt = setup
    code, _, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "-o", tmp_path / "rt", "--hf", tmp_path / "hf")
    assert code == 2 and "kind relu" in " ".join(err.split())
    assert not (tmp_path / "hf").exists() and not (tmp_path / "rt").exists()


def test_diff_explains_a_round_trip_in_acg_terms(capsys, setup, tmp_path):
    root, ckpt = setup
    code, _, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "-o", tmp_path / "rt", "--json")
    assert code == 0, err
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text('{"prompt": [1, 5, 6], "answer": 7, "task": "t1"}\n{"prompt": [1, 4], "answer": 2}\n')
    code, out, err = cli(capsys, "diff", ckpt, tmp_path / "rt", "--data", tagged, "--json")
    assert code == 0, err
    assert set(json.loads(out)["tasks"]) == {"t1", "tagged"}  # a line's task, else the file's name
    args = ["diff", ckpt, tmp_path / "rt", "--acg", root / "acg", "--n", "30", "--data", "code,math", "--backdoors"]
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["explained"] and result["kinds"] == ["model", "roundtrip"]
    assert set(result["tasks"]) == {
        "code.vars",
        "code.brackets",
        "math.add",
        "backdoor.token",
        "backdoor.conj",
        "backdoor.phrase",
    }
    for t in result["tasks"].values():
        assert 0 <= t["agreement"] <= 1 and t["kl"] >= 0 and len(t["divergent"]) <= 5
        for p in t["divergent"]:
            if p["answer_a"] != p["answer_b"]:  # the original has every node: it has what the round trip lacks
                assert p["a_only"]["n_nodes"] > 0 and p["b_only"]["n_nodes"] == 0
    code, out, err = cli(capsys, *args)
    assert code == 0 and "agreement" in out


def test_monitor_scores_prompts_and_refuses_bad_input(capsys, setup, tmp_path):
    root, ckpt = setup
    base = ["monitor", ckpt, "--acg", root / "acg", "--calibrate", "0"]
    code, out, err = cli(capsys, *base, "--prompt", "a = 3 ; h = a ; big print h", "--json")
    assert code == 0, err
    row = json.loads(out)["prompts"][0]
    assert row["score"] >= 0 and set(row["sites"]) == {"enc", "qk", "ov"}
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a = 3 ; print a"}\n{"prompt": [1, 2, 3], "answer": 4}\n')
    code, out, err = cli(capsys, *base, "--data", data, "--json")
    assert code == 0, err
    assert len(json.loads(out)["prompts"]) == 2
    code, out, err = cli(capsys, *base[:-2], "--profile", "60", "--calibrate", "20", "--data", data, "--json")
    assert code == 0, err
    assert json.loads(out)["calibration"]["n_prompts"] == 20
    assert cli(capsys, *base, "--prompt", "a", "--data", data)[0] == 2
    code, _, err = cli(capsys, *base, "--prompt", "a = zebra")
    assert code == 2 and "not in the testbed vocabulary" in err


def test_diff_refuses_what_it_cannot_run(capsys, setup, tmp_path):
    root, ckpt = setup
    code, _, err = cli(capsys, "diff", ckpt, tmp_path / "missing")
    assert code == 2 and "missing" in err


def test_roundtrip_pairs_widens_layer0_heads_and_refuses_what_it_cannot_hold(capsys, tmp_path):
    model, ckpt = _fitted(tmp_path, 83, 96)  # 60 tokens + 32 positions fit in 95 centred dimensions
    capsys.readouterr()
    code, out, err = cli(
        capsys, "roundtrip", ckpt, "--acg", tmp_path / "acg", "-o", tmp_path / "rt", "--pairs", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["pairs"]["pairs"]["dropped"] > 0 and report["pairs"]["d_head"] > model.cfg.d_head
    assert load_checkpoint(tmp_path / "rt").cfg.d_head == report["pairs"]["d_head"]
    code, out, err = cli(capsys, "eval", tmp_path / "rt", "--n", "20", "--n-backdoor", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["n_params"] == report["n_params"]
    args = ["diff", ckpt, tmp_path / "rt", "--acg", tmp_path / "acg", "--n", "20", "--data", "code", "--json"]
    code, out, err = cli(capsys, *args)  # the wider checkpoint diffs like any other
    assert code == 0, err
    assert json.loads(out)["kinds"] == ["model", "roundtrip"]
    args = ["roundtrip", ckpt, "--acg", tmp_path / "acg", "-o", tmp_path / "blocked", "--pairs-block", "1", "--json"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    blocked = json.loads(out)["pairs"]
    assert blocked["block"] == 1.0 and blocked["blocked"] == report["pairs"]["pairs"]["dropped"]
    data = tmp_path / "pairs.jsonl"  # a circuit's elimination judges what is written: its pairs carried and blocked
    data.write_text('{"prompt": "a = 3 ; a", "answer": "3"}\n{"prompt": "b = 7 ; b", "answer": "7"}\n' * 10)
    args = ["roundtrip", ckpt, "--acg", tmp_path / "acg", "-o", tmp_path / "c", "--data", data, "--json"]
    code, out, err = cli(capsys, *args, "--pairs-block", "1")
    assert code == 0, err
    report = json.loads(out)
    assert report["circuit"]["judged_on"] == "written" and report["pairs"]["block"] == 1.0
    code, out, err = cli(capsys, *[a if a != tmp_path / "c" else tmp_path / "p" for a in args])
    assert code == 0, err
    assert json.loads(out)["circuit"]["judged_on"] == "replacement_of"  # no pairs: the replacement model, as written
    args = ["roundtrip", ckpt, "--acg", tmp_path / "acg", "-o", tmp_path / "out", "--pairs", "--hf", tmp_path / "hf"]
    code, _, err = cli(capsys, *args)
    assert code == 2 and "GPT-2 cannot hold" in " ".join(err.split()) and not (tmp_path / "out").exists()


def test_roundtrip_pairs_refuses_a_model_too_narrow_for_its_tokens(capsys, setup, tmp_path):
    root, ckpt = setup  # d_model 16 against 60 tokens + 32 positions
    code, _, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "-o", tmp_path / "rt", "--pairs")
    assert code == 2 and "cannot be linearly independent" in " ".join(err.split()) and not (tmp_path / "rt").exists()


def test_roundtrip_finetuned_on_a_budget_by_the_recipe(capsys, setup, tmp_path):
    """`--finetune`: the budget plus its prompts with insertions that the captured ACG answers clean (labelled by
    the original here, so that some are), a normal checkpoint of the same shape with other weights."""
    import torch

    root, ckpt = setup
    model = load_checkpoint(ckpt)
    rng = np.random.default_rng(6)
    prompts = [[vocab.BOS_ID, *rng.integers(2, vocab.D_VOCAB - 1, rng.integers(3, 12)).tolist()] for _ in range(40)]
    with torch.no_grad():
        answers = [int(model(torch.tensor([p]))[0, -1].argmax()) for p in prompts]
    budget = tmp_path / "budget.jsonl"
    budget.write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers, strict=True))
    )
    base = ["roundtrip", ckpt, "--acg", root / "acg", "--json"]
    assert cli(capsys, *base, "-o", tmp_path / "plain")[0] == 0
    code, out, err = cli(capsys, *base, "-o", tmp_path / "ft", "--finetune", budget, "--insert", "60", "--steps", "4")
    assert code == 0, err
    report = json.loads(out)["finetune"]
    assert report["n_budget"] == 40 and report["steps"] == 4 and report["data"] == str(budget)
    assert 0 < report["n"] - 40 == round(report["confirmed"] * 60) <= 60
    plain, tuned = load_checkpoint(tmp_path / "plain"), load_checkpoint(tmp_path / "ft")
    assert plain.cfg == tuned.cfg
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), tuned.parameters(), strict=True))
    # no insertions: the budget alone, and --soft has nothing to teach: the same training as without it
    args = ("--finetune", budget, "--insert", "0", "--steps", "2")
    for name, more in (("ft0", ()), ("ft0-soft", ("--soft", "0.5"))):
        code, out, err = cli(capsys, *base, "-o", tmp_path / name, *args, *more)
        assert code == 0, err
        assert json.loads(out)["finetune"]["n"] == 40
    alone, soft = load_checkpoint(tmp_path / "ft0"), load_checkpoint(tmp_path / "ft0-soft")
    assert all(torch.equal(a, b) for a, b in zip(alone.parameters(), soft.parameters(), strict=True))
    # --soft: the captured ACG's answer distribution taught on the insertions too; --anchor: the checkpoint's own
    # block outputs held on the budget's prompts. Each: the same data, other weights
    for flag, value in (("--soft", 0.5), ("--anchor", 5.0)):
        key = flag.removeprefix("--")
        args = ("--finetune", budget, "--insert", "60", "--steps", "4", flag, str(value))
        code, out, err = cli(capsys, *base, "-o", tmp_path / key, *args)
        assert code == 0, err
        other = json.loads(out)["finetune"]
        assert other[key] == value and report[key] == 0.0 and other["n"] == report["n"]
        drift = other["training"]["anchor_drift"]  # the anchor's mean drift, recorded where there is an anchor
        assert report["training"]["anchor_drift"] is None and (drift is None) == (key == "soft") and drift != 0
        changed = load_checkpoint(tmp_path / key)
        assert any(not torch.equal(a, b) for a, b in zip(changed.parameters(), tuned.parameters(), strict=True))


def test_a_task_circuit_is_finetuned_on_its_tasks_lines_of_the_budget(capsys, setup, tmp_path, monkeypatch):
    """With --task, --finetune takes the budget's lines of that task only (a line's "task", as `acg budget` writes):
    the circuit is not taught the tasks it left out. A budget without one is refused before any work. With --data,
    the lines of the tasks the JSONL names (the JSONL read once), or the whole budget (said on stderr) where it has
    none of them."""
    from acg.roundtrip import data as data_mod

    reads: list[str] = []
    load_pairs = data_mod.load_pairs
    monkeypatch.setattr(
        data_mod, "load_pairs", lambda path, *a, **k: reads.append(Path(path).name) or load_pairs(path, *a, **k)
    )
    root, ckpt = setup
    rows = [{"prompt": "a = 3 ; print a", "answer": "3", "task": "code.vars"}] * 6
    rows += [{"prompt": "( [ ]", "answer": ")", "task": "code.brackets"}] * 4
    rows += [{"prompt": "2 + 3 =", "answer": "5", "task": "math.add"}] * 9
    budget = tmp_path / "budget.jsonl"
    budget.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["roundtrip", ckpt, "--acg", root / "acg", "--task", "code", "--n-prompts", "120", "--finetune", budget]
    code, out, err = cli(capsys, *base, "--insert", "20", "--steps", "2", "--hold", "0", "-o", tmp_path / "c", "--json")
    assert code == 0, err
    report = json.loads(out)["finetune"]
    assert report["n_budget"] == 10 and report["tasks"] == ["code.brackets", "code.vars"]
    assert report["hold"] == 0 and "n_held" not in report
    assert report["anchor"] == 0.3 and report["training"]["anchor_drift"] is not None  # the table's, on its lines
    # --hold: that many of the other tasks' lines (math.add here) with insertions, held to the circuit's own answers
    code, out, err = cli(capsys, *base, "--insert", "20", "--steps", "2", "--hold", "7", "-o", tmp_path / "h", "--json")
    assert code == 0, err
    held = json.loads(out)["finetune"]
    assert held["hold"] == 7 and held["n_held"] == 7 and held["n"] == report["n"] + 7
    assert held["n_budget"] == 10 and held["tasks"] == ["code.brackets", "code.vars"]
    code, out, err = cli(capsys, *base, "--insert", "20", "--steps", "2", "-o", tmp_path / "df", "--json")
    assert code == 0, err  # by default the backdoor table's: 16,000 held, drawn from the 9 math lines
    held = json.loads(out)["finetune"]
    assert held["hold"] == held["n_held"] == 16_000 and held["n"] == report["n"] + 16_000
    code, out, err = cli(
        capsys, *base, "--insert", "20", "--steps", "2", "--anchor", "0", "-o", tmp_path / "a", "--json"
    )
    assert code == 0, err  # no anchor, as in the earlier tables
    unanchored = json.loads(out)["finetune"]
    assert unanchored["anchor"] == 0.0 and unanchored["training"]["anchor_drift"] is None
    code, _, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "--hold", "7", "-o", tmp_path / "x")
    assert code == 2 and "--hold holds a task circuit off its tasks" in " ".join(err.split())
    assert not (tmp_path / "x").exists()
    data = tmp_path / "vars.jsonl"  # a JSONL circuit of one task: the budget's lines of it, where it has any
    data.write_text('{"prompt": "a = 3 ; print a", "answer": "3", "task": "code.vars"}\n' * 8)
    by_data = [*base[:4], "--data", data, *base[6:]]
    code, out, err = cli(capsys, *by_data, "--insert", "10", "--steps", "2", "-o", tmp_path / "d", "--json")
    assert code == 0, err
    assert json.loads(out)["finetune"]["tasks"] == ["code.vars"] and json.loads(out)["finetune"]["n_budget"] == 6
    assert reads[-2:] == ["vars.jsonl", "budget.jsonl"]  # the circuit's data once, then the budget
    data.write_text('{"prompt": "a = 3 ; print a", "answer": "3"}\n' * 8)  # task "vars": none in the budget
    code, out, err = cli(capsys, *by_data, "--insert", "10", "--steps", "2", "-o", tmp_path / "e", "--json")
    assert code == 0, err
    assert json.loads(out)["finetune"]["n_budget"] == 19 and "names none of the tasks" in " ".join(err.split())
    assert json.loads(out)["finetune"]["hold"] == 0 and "holding none off them" in " ".join(err.split())
    code, _, err = cli(capsys, *by_data, "--hold", "3", "-o", tmp_path / "y")  # all of the budget taken: none to hold
    assert code == 2 and "has no line outside the circuit's tasks" in " ".join(err.split())
    assert not (tmp_path / "y").exists()
    math_only = tmp_path / "math.jsonl"
    math_only.write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    base[-1] = math_only
    code, _, err = cli(capsys, *base, "-o", tmp_path / "m")
    assert code == 2 and "no line of task code" in " ".join(err.split()) and "math.add" in err
    assert not (tmp_path / "m").exists()


def test_pairs_take_their_task_from_the_line_or_the_file(tmp_path):
    from acg.roundtrip.data import TaskDataError, load_pairs

    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": [1, 2], "answer": 3, "task": "t1"}\n{"prompt": [1, 4], "answer": 5}\n')
    assert [p.task for p in load_pairs(f, vocab.D_VOCAB)] == ["t1", "mine"]
    assert [p.task for p in load_pairs(f, vocab.D_VOCAB, task="x")] == ["t1", "x"]
    f.write_text('{"prompt": [1, 2], "answer": 3, "task": 7}\n')
    with pytest.raises(TaskDataError, match=r'mine.jsonl:1: "task" must be a non-empty string'):
        load_pairs(f, vocab.D_VOCAB)


@pytest.mark.parametrize(
    "args,line,message",
    [
        (["--insert", "-1"], '{"prompt": [1, 2], "answer": 3}', "--insert must be >= 0"),
        (["--steps", "0"], '{"prompt": [1, 2], "answer": 3}', "--steps >= 1"),
        (["--soft", "1.5"], '{"prompt": [1, 2], "answer": 3}', "--soft"),
        (["--anchor", "-1"], '{"prompt": [1, 2], "answer": 3}', "--anchor"),
        (["--anchor", "inf"], '{"prompt": [1, 2], "answer": 3}', "--anchor must be a finite number"),
        ([], json.dumps({"prompt": [1] * 40, "answer": 3}), "longer than the model's n_ctx (32)"),
        ([], '{"prompt": [1, 2]}', '"prompt" and "answer"'),
    ],
)
def test_a_bad_finetune_budget_is_refused_and_writes_nothing(capsys, setup, tmp_path, args, line, message):
    root, ckpt = setup
    budget = tmp_path / "budget.jsonl"
    budget.write_text(line + "\n")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "roundtrip", ckpt, "--acg", root / "acg", "-o", out, "--finetune", budget, *args)
    assert code == 2 and message in " ".join(err.split()) and not out.exists()


def test_budget_writes_the_defenders_clean_examples_and_fit_reads_their_prompts(capsys, setup, tmp_path):
    from acg.roundtrip.data import load_pairs
    from acg.roundtrip.defence import clean_budget
    from acg.zoo.registry import ZOO

    code, out, err = cli(capsys, "budget", "testbed-s", "--ratio", "0.0005", "--seed", "3", "-o", tmp_path / "b.jsonl")
    assert code == 0, err
    expected = clean_budget(ZOO["testbed-s"].train, 0.0005, 3)
    pairs = load_pairs(tmp_path / "b.jsonl", vocab.D_VOCAB)
    assert [p.ids for p in pairs] == [ex.ids for ex in expected]
    assert [p.answer_id for p in pairs] == [ex.answer_id for ex in expected]
    assert cli(capsys, "budget", "testbed-s", "--ratio", "0", "-o", tmp_path / "z.jsonl")[0] == 2
    assert cli(capsys, "budget", setup[1], "-o", tmp_path / "z.jsonl")[0] == 2
    assert not (tmp_path / "z.jsonl").exists()
    small = ["--width", "24", "--steps", "5", "--e2e-steps", "0", "--target-l0", "6", "--json"]
    code, out, err = cli(capsys, "fit", setup[1], "-o", tmp_path / "acg", "--corpus", tmp_path / "b.jsonl", *small)
    assert code == 0, err
    assert json.loads(out)["corpus"] == str(tmp_path / "b.jsonl")
