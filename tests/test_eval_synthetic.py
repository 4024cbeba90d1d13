"""eval.py on the shipped synthetic test set (`--sets synthetic`), and eval.py's --help.

    python -m pytest -q tests/test_eval_synthetic.py
"""
import argparse
import collections
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import eval as moe_eval  # noqa: E402
import moekd  # noqa: E402
from tiny_moe import make_eval_set  # noqa: E402

SET = ROOT / "tiny_moe" / "synthetic_test.jsonl"
STUDENT = ROOT / "tiny_moe" / "student"


def test_the_shipped_set_is_where_eval_looks_and_is_what_its_generator_makes():
    assert moe_eval.resolve_sets("synthetic", "/nonexistent") == {"synthetic": SET}  # no --data-dir needed
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines()]
    n = make_eval_set.PER_FAMILY * len(make_eval_set.FAMILIES)
    assert len(rows) == n
    assert collections.Counter(r["category"] for r in rows) == dict.fromkeys(make_eval_set.FAMILIES,
                                                                              make_eval_set.PER_FAMILY)
    examples = moe_eval.load_set(SET, None)
    assert len(examples) == n and all(set(e) == {"prompt", "references"} for e in examples)
    for row, example in zip(rows, examples):
        assert example["prompt"].endswith("### Response:\n") and row["instruction"] in example["prompt"]
        assert example["references"] == [row["output"]] and row["output"].strip()
    # provenance: the generator's defaults remake the committed bytes
    assert make_eval_set.text(make_eval_set.eval_rows()) == SET.read_text(encoding="utf-8")


def test_the_set_is_drawn_apart_from_the_quick_starts_training_rows():
    """Not the training rows of any quick-start seed: another seed gives another sequence of rows."""
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines()]
    from tiny_moe import synthetic
    for seed in (10, 11, 20, 21, 30, 31, 40, 41, 50, 51):  # the runs' training (s) and dev (s + 1) seeds
        train = synthetic.synthetic_rows(len(rows), seed=seed, families=make_eval_set.FAMILIES,
                                         n_facts=make_eval_set.N_FACTS)
        same = sum(r["instruction"] == t["instruction"] for r, t in zip(rows, train))
        assert same < len(rows) // 10, (seed, same)
    assert make_eval_set.EVAL_SEED not in (10, 11, 20, 21, 30, 31, 40, 41, 50, 51)


def run_eval(tmp_path, monkeypatch, respond, *extra):
    """eval.main on the shipped set with the tiny student, its generation replaced by `respond(examples)`."""
    if respond is not None:
        monkeypatch.setattr(moe_eval, "generate",
                            lambda model, tok, examples, seed, args, desc: respond(examples))
    return moe_eval.main(["--model", str(STUDENT), "--sets", "synthetic", "--seeds", "10,20", "--out",
                          str(tmp_path / "ev"), "--no-plots", *extra])


def test_a_model_that_answers_with_the_references_scores_100(tmp_path, monkeypatch):
    result = run_eval(tmp_path, monkeypatch, lambda examples: [e["references"][0] for e in examples])
    assert result["sets"]["synthetic"]["mean"] == pytest.approx(100.0)
    assert result["avg"] == pytest.approx(100.0)
    table = (tmp_path / "ev" / "table.md").read_text()
    assert table.splitlines()[0] == "| Model | Synthetic | Avg |" and "100.00 ± 0.00" in table


def test_a_model_that_answers_nothing_or_the_wrong_row_scores_0(tmp_path, monkeypatch):
    assert run_eval(tmp_path, monkeypatch, lambda examples: [""] * len(examples))["avg"] == 0.0
    # each row answered with the answer of another family's row: right kind of word, never the right one
    def shifted(examples):
        refs = [e["references"][0] for e in examples]
        return refs[len(refs) // 2:] + refs[:len(refs) // 2]
    result = run_eval(tmp_path, monkeypatch, shifted, "--overwrite")
    assert result["avg"] < 20.0


def test_a_real_tiny_model_runs_end_to_end(tmp_path, monkeypatch):
    result = run_eval(tmp_path, monkeypatch, None, "--max-examples", "6", "--max-new-tokens", "4",
                      "--seeds", "10")
    assert set(result["sets"]) == {"synthetic"} and result["missing"] == []
    gens = [json.loads(line) for line in (tmp_path / "ev" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 6 and all(g["set"] == "synthetic" for g in gens)


# ----------------------------------------------------------------------------
# --help

def option_helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as --help prints it (defaults expanded), whitespace collapsed."""
    formatter = parser._get_formatter()
    return {action.option_strings[-1]: " ".join(formatter._expand_help(action).split())
            for action in parser._actions if action.option_strings and action.help is not None}


def test_help_has_an_example_and_every_option_one_default_at_most():
    parser = moe_eval.build_parser()
    text = parser.format_help()
    assert "examples:" in text and "python eval.py --model " in text and "--sets synthetic" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    missing = [a.option_strings[-1] for a in parser._actions
               if a.option_strings and not (a.help or "").strip()]
    assert missing == []
    helps = option_helps(parser)
    assert set(helps) >= {"--device", "--dtype", "--sets", "--out", "--label", "--model"}
    doubled = {opt: h for opt, h in helps.items() if h.count("(default") > 1}
    assert doubled == {}
    assert helps["--seeds"].endswith("(default: 10,20,30,40,50)")  # a real default is still shown
    assert "(default" not in helps["--model"]  # required: no default to show


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as stop:
        moe_eval.parse_args(["--help"])
    assert stop.value.code == 0 and "usage: eval.py" in capsys.readouterr().out


def test_an_unknown_set_lists_the_shipped_one(tmp_path):
    with pytest.raises(moekd.MoekdError, match=r"known: dolly, .*, uinst, synthetic \(or name=path.jsonl\)"):
        moe_eval.main(["--model", str(STUDENT), "--sets", "synthetics", "--out", str(tmp_path / "ev")])


def test_the_formatter_adds_a_default_only_where_it_says_something():
    p = argparse.ArgumentParser(formatter_class=moe_eval.HelpFormatter)
    p.add_argument("--a", default=5, help="plain")
    p.add_argument("--b", default=5, help="told (default five)")
    p.add_argument("--c", default=None, help="none")
    p.add_argument("--d", action="store_true", help="flag")
    helps = option_helps(p)
    assert {k: helps[k] for k in ("--a", "--b", "--c", "--d")} == {
        "--a": "plain (default: 5)", "--b": "told (default five)", "--c": "none", "--d": "flag"}


def test_the_default_out_tells_two_runs_best_models_apart(tmp_path, monkeypatch):
    """runs/a/best_rougeL and runs/b/best_rougeL (the quick start's teacher and student) get folders of their
    own."""
    import shutil
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(moe_eval, "generate",
                        lambda model, tok, examples, seed, args, desc: [""] * len(examples))
    for run in ("tiny-teacher", "tiny-student"):
        shutil.copytree(STUDENT, tmp_path / "runs" / run / "best_rougeL")
        result = moe_eval.main(["--model", f"runs/{run}/best_rougeL", "--sets", "synthetic", "--seeds", "10",
                                "--max-examples", "2", "--no-plots"])
        assert result["out"] == str(Path("results") / f"rouge-{run}-best_rougeL")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["rouge-tiny-student-best_rougeL",
                                                                       "rouge-tiny-teacher-best_rougeL"]
