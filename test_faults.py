"""Fault cases of issue 25: each ended badly (a deletion, random weights, a traceback, work lost) and
must now end well: a one-line error naming the file, flag or field, or a clean stop that --resume
continues. CPU, offline; the tests that need trained tiny models share one module-scoped fixture.
Run: pytest -q test_faults.py"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import errno
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import data
import eval as moe_eval
import moekd

ROOT = Path(__file__).resolve().parent
TINY = ROOT / "tiny_moe"
STUDENT = TINY / "student"


def quick(out, *extra):
    """The issue's S: a 2-step tiny run without dev evaluation."""
    return ["--tiny", "--max-steps", "2", "--no-dev-eval", "--synthetic-train", "32", "--batch-size", "8",
            "--log-every", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """T: a trained tiny MoE teacher (Llama-MoE, moekd's own loader); St: a trained tiny dense student
    (transformers' loader). Tests copy what they break."""
    root = tmp_path_factory.mktemp("runs")
    moekd.main(quick(root / "T", "--model", str(TINY)))
    moekd.main(quick(root / "St"))
    return root


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def sets(tmp_path):
    """A two-prompt MiniLLM-format set for eval.py."""
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "output": str(i + 1)}) + "\n"
                            for i in range(2)))
    return path


def eval_args(model, out, sets, *extra):
    return ["--model", str(model), "--sets", f"mini={sets}", "--out", str(out), "--max-new-tokens", "4",
            "--seeds", "10", "--no-plots", *extra]


def fails(pattern: str):
    """The one-line error (MoekdError) whose message matches `pattern`."""
    return pytest.raises(moekd.MoekdError, match=pattern)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if any model is loaded: the error must come first."""
    def refuse(*args, **kw):
        raise AssertionError("a model was loaded before the error")
    monkeypatch.setattr(checkpoints, "load_model", refuse)
    monkeypatch.setattr(moekd, "load_model", refuse)


# ----------------------------------------------------------------------------
# No silent random weights (M1, M2)

def test_trained_folder_without_weights_is_an_error(tmp_path, runs, sets, capsys):
    """M1, M2: a saved student whose weights are gone is `no weights`, in moekd.py and eval.py; a
    seeded config-only folder (tiny_moe/student) still initialises, and says so."""
    assert "moekd_init_seed" not in json.loads((runs / "St" / "final" / "config.json").read_text())
    model = copy(runs / "St" / "final", tmp_path / "m")
    (model / "model.safetensors").unlink()
    pattern = rf"^--model {model}: no weights \(.*\)"
    with fails(pattern):
        moekd.main(quick(tmp_path / "run", "--model", str(model)))
    with fails(pattern):
        moe_eval.main(eval_args(model, tmp_path / "ev", sets))
    assert not (tmp_path / "run").exists() and not (tmp_path / "ev").exists()
    old = json.loads((model / "config.json").read_text())  # a folder the previous version saved: seed kept
    (model / "config.json").write_text(json.dumps({**old, "moekd_init_seed": 1}))
    with fails(r"no weights .*saved with weights, which are gone"):
        moekd.load_model(str(model))
    moekd.load_model(str(STUDENT))
    assert f"--model {STUDENT}: no weights, initialising from moekd_init_seed=1" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Damaged model files (M5-M9, M11, M13, M22-M24, S6, F36, F37)

def truncate(path: Path, size) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:size(len(raw))])


@pytest.mark.parametrize("size", [lambda n: n // 2, lambda n: 50, lambda n: 0],
                         ids=["half", "50-bytes", "empty"])
def test_truncated_weights_are_one_line(tmp_path, runs, sets, size):
    """M5-M9: a truncated model.safetensors as --model (dense, transformers' loader), as --teacher
    (Llama-MoE, moekd's loader) and in eval.py names the file."""
    student = copy(runs / "St" / "final", tmp_path / "st")
    teacher = copy(runs / "T" / "final", tmp_path / "t")
    for d in (student, teacher):
        truncate(d / "model.safetensors", size)
    pattern = r"model.safetensors: not a complete safetensors file, truncated or damaged \(.+\)$"
    with fails(rf"^{student}/{pattern}"):
        moekd.main(quick(tmp_path / "a", "--model", str(student)))
    with fails(rf"^{teacher}/{pattern}"):
        moekd.main(quick(tmp_path / "b", "--method", "kd", "--teacher", str(teacher)))
    with fails(rf"^{teacher}/{pattern}"):
        moe_eval.main(eval_args(teacher, tmp_path / "ev", sets))


def test_weights_of_another_shape_than_the_config(tmp_path, runs):
    """M11: config.json's vocab_size 1000 against 2039 rows of weights names the key and both shapes."""
    model = copy(runs / "St" / "final", tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with fails(rf"^--model {model}: model.embed_tokens.weight has shape \(2039, 36\) "
               rf"in model.safetensors, {model}/config.json gives \(1000, 36\)$"):
        moekd.load_model(str(model))


def test_config_that_is_not_an_object(tmp_path, runs, no_model_load):
    """M13: a config.json holding a JSON list."""
    model = copy(runs / "St" / "final", tmp_path / "m")
    (model / "config.json").write_text("[1, 2]")
    with fails(rf"^{model}/config.json: expected a JSON object, got list$"):
        moekd.main(quick(tmp_path / "run", "--model", str(model)))


def with_nan(src: Path, dst: Path, key: str = "lm_head.weight") -> Path:
    model = copy(src, dst)
    weights = load_file(model / "model.safetensors")
    weights[key][3, 5] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def test_non_finite_weights_are_named_at_load(tmp_path, runs, sets):
    """M22, M23: NaN in lm_head, as --model, as --teacher and in eval.py (which leaves no eval.json)."""
    student = with_nan(runs / "St" / "final", tmp_path / "st")
    teacher = with_nan(runs / "T" / "final", tmp_path / "t")
    why = (r"weight lm_head.weight holds 1 non-finite value\(s\) \(NaN/inf\) of \d+; "
           r"the model's weights are damaged$")
    with fails(rf"^--model {student}: {why}"):
        moekd.main(quick(tmp_path / "a", "--model", str(student)))
    with fails(rf"^--teacher {teacher}: {why}"):
        moekd.main(quick(tmp_path / "b", "--method", "kd", "--teacher", str(teacher)))
    with fails(rf"^--model {student}: {why}"):
        moe_eval.main(eval_args(student, tmp_path / "ev", sets))
    assert not (tmp_path / "ev").exists()


def test_teacher_routers_that_are_not_safetensors(tmp_path):
    """M24: --teacher-routers naming a file of another kind."""
    bad = tmp_path / "routers.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    with fails(rf"^{bad}: not a complete safetensors file"):
        moekd.main(quick(tmp_path / "run", "--method", "kd", "--teacher-routers", str(bad)))


class Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_bin_that_runs_a_command_is_refused_with_advice(tmp_path, runs):
    """S6: a dense model's pytorch_model.bin whose __reduce__ runs a command: nothing runs, and the one
    line says to convert it to safetensors (never to pass weights_only=False)."""
    model = copy(runs / "St" / "final", tmp_path / "m")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": Planted(marker)}, model / "pytorch_model.bin")
    with fails(rf"^{model}/pytorch_model.bin: refused, it pickles objects other than "
               rf"tensors; convert it to safetensors$"):
        moekd.main(quick(tmp_path / "run", "--model", str(model)))
    assert not marker.exists()


@pytest.mark.parametrize("which", ["model", "trainer_state"])
def test_resume_from_a_truncated_checkpoint(tmp_path, runs, which):
    """F36, F37: a checkpoint's model.safetensors or trainer_state.pt cut short names the file."""
    run = copy(runs / "St", tmp_path / "St")
    ckpt = checkpoints.latest_checkpoint(run)
    name = {"model": "model.safetensors", "trainer_state": "trainer_state.pt"}[which]
    truncate(ckpt / name, lambda n: n // 2)
    why = "not a complete safetensors file, truncated or damaged" if which == "model" else \
        "unreadable, truncated or damaged"
    with fails(rf"^{ckpt}/{name}: {why} \(.+\)$"):
        moekd.main(["--out", str(run), "--resume"])


# ----------------------------------------------------------------------------
# Confinement: shard names (S8, S9)

@pytest.mark.parametrize("family", ["T", "St"], ids=["llama_moe", "transformers"])
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_shards_outside_the_model_folder_are_refused(tmp_path, runs, family, where):
    """S8, S9: an index naming ../../outside/model.safetensors or an absolute path is refused, not read."""
    outside = copy(runs / family / "final", tmp_path / "outside")
    model = tmp_path / "a" / "b"
    model.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(outside / name, model / name)
    shard = "../../outside/model.safetensors" if where == "relative" else str(outside / "model.safetensors")
    keys = load_file(outside / "model.safetensors").keys()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in keys}}))
    with fails(rf"^{model}/model.safetensors.index.json: shard "
               rf"'{re.escape(shard)}' lies outside {model}; refused$"):
        moekd.load_model(str(model))


# ----------------------------------------------------------------------------
# Data (A23)

def test_dev_size_is_honoured_for_raw_dolly_files(tmp_path):
    """A23: raw-Dolly rows keep MiniLLM's 500 test rows and hold out --dev-size dev rows; when the file is
    too small for even that, the advice is one that works."""
    def rows(n):
        return "".join(json.dumps({"instruction": f"q{i}", "context": "", "response": f"a{i}",
                                   "category": "open_qa"}) + "\n" for i in range(n))
    path = tmp_path / "dolly.jsonl"
    path.write_text(rows(600))
    cfg = moekd.Config(data=str(path), dev_size=10)
    train, dev = data.load_splits(cfg)
    assert [d["responses"] for d in dev] == [[f"a{i}"] for i in range(500, 510)] and len(train) == 90
    path.write_text(rows(80))
    with fails(r"80 rows leave no training rows after holding out the 500 test rows "
               r"of MiniLLM's split of raw Dolly \(rows 0-499\) \+ 10 dev rows; pass "
               r"--dev-data or a bigger --data$"):
        data.load_splits(moekd.Config(data=str(path), dev_size=10))
