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
