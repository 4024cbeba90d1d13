"""Distributed (torchrun): the split of a global batch over ranks does not change a run; stream seeds, launch
errors, resume across world sizes, gradient checkpointing. The torchrun tests: `pytest -m distributed`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import errors
import moekd
import parallel

from conftest import ROOT, TINY, assert_close, run_args

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


def test_stream_seeds_are_distinct_and_reproducible():
    seeds = {moekd.stream_seed(10, step, i, s) for step in range(3) for i in range(8)
             for s in ("sample", "train0")}
    assert len(seeds) == 48 and all(0 <= x < 2**63 for x in seeds)
    assert moekd.stream_seed(10, 2, 5, "sample") == moekd.stream_seed(10, 2, 5, "sample")


def test_split_global_batch():
    cfg = moekd.Config(batch_size=4, global_batch_size=16)
    assert cfg.grad_accum is None and parallel.split_global_batch(cfg, 2) == 16 and cfg.grad_accum == 2
    assert parallel.split_global_batch(moekd.Config(batch_size=4, grad_accum=3), 2) == 24
    with pytest.raises(errors.MoekdError,
                       match="--global-batch-size 16 is not a multiple of --batch-size 4 x 3"):
        parallel.split_global_batch(moekd.Config(batch_size=4, global_batch_size=16), 3)
    with pytest.raises(errors.MoekdError, match="--grad-accum 1 contradicts --global-batch-size 16"):
        parallel.split_global_batch(moekd.Config(batch_size=4, grad_accum=1, global_batch_size=16), 2)


def test_launch_errors(tmp_path, monkeypatch):
    for flag in ("--shard-teacher", "--shard-student"):
        with pytest.raises(errors.MoekdError, match=f"{flag} needs several processes"):
            moekd.main(run_args(tmp_path / "run", "gkd", flag))
    if not torch.cuda.is_available():  # a CUDA-only option on a CPU machine
        for flag in ("--device", "--teacher-device"):
            with pytest.raises(errors.MoekdError, match=f"^{flag} cuda: CUDA is not available"):
                moekd.main(run_args(tmp_path / "run", "gkd", flag, "cuda"))
    with pytest.raises(errors.MoekdError, match="^--teacher-device gpu7: not a device"):
        moekd.main(run_args(tmp_path / "run", "gkd", "--teacher-device", "gpu7"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(errors.MoekdError,
                       match="--device cpu:0: under torchrun every rank picks its own device"):
        moekd.main(run_args(tmp_path / "run", "gkd", "--device", "cpu:0"))
    with pytest.raises(errors.MoekdError, match="--teacher-device cpu:0: under torchrun the teacher lives"):
        moekd.main(run_args(tmp_path / "run", "gkd", "--teacher-device", "cpu:0"))
    assert not (tmp_path / "run").exists()


def test_resume_keeps_the_global_batch(tmp_path):
    moekd.main(run_args(tmp_path / "run", "gkd", "--stop-after", "1"))
    with pytest.raises(errors.MoekdError, match=r"global batch 8 \(4 x 1 device\(s\) x 2\) differs .* \(4\)"):
        moekd.main(run_args(tmp_path / "run", "gkd", "--resume", "--grad-accum", "2"))
    result = moekd.main(run_args(tmp_path / "run", "gkd", "--resume", "--batch-size", "2",
                                 "--grad-accum", "2"))
    assert result["finished"]


def torchrun(*args: str, nproc: int = 2) -> None:
    """Run moekd.py under torchrun on CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "moekd.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def assert_same_run(a: Path, b: Path, method: str) -> None:
    """Same trained weights (and SAR routers) and the same logged losses, to float tolerance."""
    for name in ["model.safetensors"] + ([checkpoints.ROUTERS_FILE] if method == "sar" else []):
        x, y = load_file(a / "final" / name), load_file(b / "final" / name)
        assert x.keys() == y.keys()
        for k in x:
            assert_close(x[k], y[k], msg=f"{name}: {k}")
    ha, hb = (json.loads((d / "metrics.json").read_text())["history"] for d in (a, b))
    assert [h.keys() for h in ha] == [h.keys() for h in hb]
    for x, y in zip(ha, hb):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("method,extra", [
    ("sft", ["--model", str(TINY)]),  # an MoE student: DDP with experts that may get no tokens, gate noise
    ("gkd", []), ("ka", ["--ka-lambda", "0"]), ("ka", ["--ka-lambda", "0.5"]),
    ("sar", ["--router-lr", "1e-2"]),
    ("gkd", ["--shard-teacher"]), ("sar", ["--router-lr", "1e-2", "--shard-teacher"]),
    ("sft", ["--model", str(TINY), "--shard-student", "--dev-eval", "--synthetic-dev", "8",
             "--dev-num", "4"]),
    ("gkd", ["--shard-student", "--shard-teacher"]),
    ("sar", ["--router-lr", "1e-2", "--shard-student", "--shard-teacher", "--grad-checkpointing"])],
    ids=["sft-moe", "gkd", "ka-0", "ka-0.5", "sar", "gkd-sharded-teacher", "sar-sharded-teacher",
         "sft-moe-sharded-with-dev-eval", "gkd-both-sharded", "sar-both-sharded-checkpointed"])
def test_two_ranks_match_one_process(tmp_path, method, extra):
    """torchrun 2 ranks x micro-batch 4 == 1 process x micro-batch 4 x 2 accumulation (global batch 8).
    Both generate 4 rows at a time: every row has its own sampling stream either way, but other batch
    shapes change the logits in the last float bits, which can flip a near-tie between two tokens."""
    extra = [*extra] + (["--gen-batch-size", "4"] if method != "sft" else [])
    torchrun(*run_args(tmp_path / "two", method, *extra))
    single = [e for e in extra if not e.startswith("--shard")]
    moekd.main(run_args(tmp_path / "one", method, "--grad-accum", "2", *single))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert_same_run(tmp_path / "two", tmp_path / "one", method)
    # each rank holds half of what it shards (the state the README's memory table counts), all of the rest
    two, one = (json.loads((tmp_path / d / "metrics.json").read_text())["memory"] for d in ("two", "one"))
    assert len(two) == 2 and len(one) == 1
    for key, flag in (("student_mb", "--shard-student"), ("teacher_mb", "--shard-teacher"),
                      ("optimizer_mb", "--shard-student")):
        share = two[0][key] / one[0][key] if one[0][key] else 1.0
        assert share == pytest.approx(0.5 if flag in extra else 1.0, abs=0.05), key


@pytest.mark.distributed
@pytest.mark.parametrize("shard", [[], ["--shard-teacher", "--shard-student"]], ids=["ddp", "fsdp"])
def test_resume_across_world_sizes(tmp_path, shard):
    """SAR (student and router optimizers) stopped after 2 of 4 steps on 2 ranks, resumed on 2 ranks
    and on 1 process, ends where an uninterrupted 1-process run ends."""
    args = lambda out, *e: run_args(out, "sar", "--router-lr", "1e-2", "--synthetic-train",
                                    "32",  # noqa: E731
                                    "--max-steps", "4", "--gen-batch-size", "4", *e)
    moekd.main(args(tmp_path / "whole", "--grad-accum", "2"))
    torchrun(*args(tmp_path / "two", "--stop-after", "2", *shard))
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    torchrun(*args(tmp_path / "two", "--resume", *shard))
    moekd.main(args(tmp_path / "one", "--resume", "--grad-accum", "2"))
    assert_same_run(tmp_path / "two", tmp_path / "whole", "sar")
    assert_same_run(tmp_path / "one", tmp_path / "whole", "sar")


@pytest.mark.parametrize("method,extra", [("sft", ["--model", str(TINY)]), ("sar", ["--router-lr", "1e-2"])])
def test_grad_checkpointing_changes_memory_not_results(tmp_path, method, extra):
    """Recomputed activations (gate noise replayed) give the same training run."""
    moekd.main(run_args(tmp_path / "plain", method, *extra))
    moekd.main(run_args(tmp_path / "ckpt", method, "--grad-checkpointing", *extra))
    assert_same_run(tmp_path / "plain", tmp_path / "ckpt", method)
