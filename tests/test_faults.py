"""Fault cases of issue 25: each ended badly (a deletion, random weights, a traceback, work lost) and
must now end well: a one-line error naming the file, flag or field, or a clean stop that --resume
continues. CPU, offline; the tests that need trained tiny models share one module-scoped fixture.
Run: pytest -q tests/test_faults.py"""
import errno
import json
import os
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
import errors
import eval as moe_eval
import moekd

from conftest import ROOT, TINY, STUDENT, without_timing


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
    return pytest.raises(errors.MoekdError, match=pattern)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if any model is loaded: the error must come first."""
    def refuse(*args, **kw):
        raise AssertionError("a model was loaded before the error")
    monkeypatch.setattr(checkpoints, "load_model", refuse)
    monkeypatch.setattr(moekd, "load_model", refuse)


# ----------------------------------------------------------------------------
# --overwrite: the guard judges a folder by its content (O4, O5, O6)

def test_overwrite_refuses_another_tools_folder_with_a_run_json(tmp_path, runs):
    """O4: another tool's run.json, log.txt and checkpoints/model-epoch9.pt are not a moekd run."""
    theirs = tmp_path / "theirs"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "run.json").write_text(json.dumps({"epochs": 10, "lr": 0.1}))
    (theirs / "log.txt").write_text("epoch 9\n")
    (theirs / "checkpoints" / "model-epoch9.pt").write_text("weights")
    with fails(r"holds files moekd did not write \(checkpoints/model-epoch9.pt\)"):
        moekd.main(quick(theirs, "--overwrite"))
    (theirs / "checkpoints" / "model-epoch9.pt").unlink()  # moekd's names only, but not moekd's run.json
    with fails(r"its run.json is not one moekd wrote"):
        moekd.main(quick(theirs, "--overwrite"))
    assert (theirs / "log.txt").read_text() == "epoch 9\n"


def test_overwrite_keeps_a_users_tmp_file(tmp_path, runs):
    """O5: a .tmp-/.old- name moekd never creates is the user's, not a leftover."""
    run = copy(runs / "St", tmp_path / "St")
    (run / ".tmp-mynotes.txt").write_text("mine")
    (run / "checkpoints" / ".old-notes").write_text("mine too")
    with fails(r"holds files moekd did not write \(\.tmp-mynotes\.txt, "
               r"checkpoints/\.old-notes\)"):
        moekd.main(quick(run, "--overwrite"))
    assert (run / ".tmp-mynotes.txt").read_text() == "mine"
    (run / ".tmp-mynotes.txt").unlink()
    (run / "checkpoints" / ".old-notes").unlink()
    (run / ".tmp-final-ab12cd_9").mkdir()  # what a killed write_atomically leaves: replaced
    (run / "checkpoints" / "latest.tmp").write_text("step-2\n")
    moekd.main(quick(run, "--overwrite", "--max-steps", "1"))
    assert not (run / ".tmp-final-ab12cd_9").exists()


def test_out_may_not_hold_what_the_run_reads(tmp_path, runs, sets):
    """O6: --out that is, contains or lies inside a path the run reads is refused, for runs and eval.py."""
    teacher_run = copy(runs / "T", tmp_path / "T")
    with fails(rf"^--out {teacher_run}: contains --teacher {teacher_run}/final, "
               rf"which this run reads; pick another --out$"):
        moekd.main(quick(teacher_run, "--method", "gkd", "--teacher", str(teacher_run / "final"),
                         "--overwrite"))
    assert (teacher_run / "final" / "model.safetensors").is_file()
    with fails(r"lies inside --model"):
        moekd.main(quick(teacher_run / "final" / "sub", "--model", str(teacher_run / "final")))
    with fails(r"^--out .*: is --model"):
        moe_eval.main(eval_args(teacher_run / "final", teacher_run / "final", sets, "--overwrite"))
    with fails(r"contains --sets mini"):
        moe_eval.main(eval_args(runs / "T" / "final", tmp_path, sets, "--overwrite"))
    assert (teacher_run / "final" / "model.safetensors").is_file() and sets.is_file()


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
        checkpoints.load_model(str(model))
    checkpoints.load_model(str(STUDENT))
    assert f"--model {STUDENT}: no weights, initialising from moekd_init_seed=1" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# One run per folder (C1)

def hold_lock(folder: Path, text: str) -> subprocess.Popen:
    """Another process holding `folder`'s lock (flock, as a running moekd process does)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, sys.argv[2].encode()); "
            "print('locked', flush=True); time.sleep(120)")
    return subprocess.Popen([sys.executable, "-c", code, str(folder / ".lock"), text], stdout=subprocess.PIPE,
                            text=True)


def test_one_run_per_folder(tmp_path, runs, sets):
    """C1: while another process holds --out's lock, a run, a resume and an evaluation there are refused;
    once it dies the kernel drops the lock and the folder is usable again."""
    run = copy(runs / "St", tmp_path / "St")
    holder = hold_lock(run, "pid 42 on elsewhere")
    try:
        assert holder.stdout.readline() == "locked\n"
        pattern = rf"^--out {run}: another moekd process is using it \(pid 42 on elsewhere\)"
        for args in (quick(run, "--overwrite"), ["--out", str(run), "--resume"]):
            with fails(pattern):
                moekd.main(args)
        ev = tmp_path / "ev"
        ev.mkdir()
        holder2 = hold_lock(ev, "")
        try:
            assert holder2.stdout.readline() == "locked\n"
            with fails(r"another moekd process is using it"):
                moe_eval.main(eval_args(runs / "St" / "final", ev, sets))
        finally:
            holder2.kill()
            holder2.wait()
    finally:
        holder.kill()
        holder.wait()
    assert moekd.main(["--out", str(run), "--resume"])["finished"]
    assert "pid" in (run / ".lock").read_text()


# ----------------------------------------------------------------------------
# SIGINT and SIGTERM (I3, I4), real signals on a subprocess

def signal_args(out, *extra):
    return ["--tiny", "--out", str(out), "--synthetic-train", "16", "--synthetic-dev", "8",
            "--batch-size", "4", "--epochs", "2", "--no-dev-eval", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    moekd.main(signal_args(out))
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_checkpoints_and_resumes_bit_identical(tmp_path, uninterrupted, sig):
    """I3, I4: the signal lets the step end, a checkpoint is written, one line says where to go on, exit
    code 128 + signal; --resume then ends bit-identical to an uninterrupted run."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "moekd.py"), *signal_args(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    log = out / "log.txt"
    while proc.poll() is None and not (log.exists() and "step 2/8" in log.read_text()):
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    step = int(re.search(r"stopped at step (\d+)", stderr).group(1))
    assert stderr.strip().splitlines()[-1] == f"stopped at step {step} ({sig.name}); continue with --resume"
    assert 2 <= step < 8 and (out / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    assert not (out / "final").exists()
    resumed = moekd.main(["--out", str(out), "--resume"])
    assert resumed["finished"]
    a, b = (load_file(d / "final" / "model.safetensors") for d in (uninterrupted, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(log.read_text()) == without_timing((uninterrupted / "log.txt").read_text())


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch):
    """The first signal is deferred to the step boundary, a second (after the repeat window) stops at
    once; before training starts a signal stops at once (nothing to save)."""
    import cli
    monkeypatch.setattr(cli, "REPEAT_S", 0.0)
    stop, before = cli.StopSignals(tmp_path), signal.getsignal(signal.SIGINT)
    with stop:
        with pytest.raises(errors.RunInterrupted, match=r"^stopped \(SIGINT\) before training started"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        stop.deferred, stop.step = True, 4
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.agreed() == signal.SIGTERM
        at_once = r"^stopped at once \(SIGTERM, a second signal\) in step 5; no checkpoint was saved"
        with pytest.raises(errors.RunInterrupted, match=at_once) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert e.value.code == 143
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.distributed
def test_ranks_agree_to_stop_on_a_signal_to_one_rank(tmp_path):
    """Under torchrun a SIGTERM to rank 0 alone stops both ranks at the same step boundary (the
    all-reduced flag): none waits at the checkpoint barrier; --resume then finishes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "moekd.py"), *signal_args(out, "--batch-size", "2", "--dist-timeout", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.txt"
    while proc.poll() is None and not (log.exists() and "step 2/8" in log.read_text()):
        time.sleep(0.01)
    rank0 = int(re.match(r"pid (\d+)", (out / ".lock").read_text()).group(1))
    os.kill(rank0, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert "stopped at step" in stderr and "Timeout" not in stderr, stderr[-3000:]
    step = int(re.search(r"stopped at step (\d+) \(SIGTERM\)", stderr).group(1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    assert proc.returncode != 0 and not (out / "final").exists()
    assert moekd.main(["--out", str(out), "--resume", "--grad-accum", "2"])["finished"]  # on one process


# ----------------------------------------------------------------------------
# Full and read-only disks (D3, D4, D5, D6, D8, D9): OSErrors injected in-process

def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name


def test_full_disk_at_run_json(tmp_path, monkeypatch):
    """D3: one line naming run.json and saying how to start over; nothing is left that blocks the rerun."""
    real = pathlib.Path.write_text
    def write_text(self, *args, **kw):
        if self.name == ".tmp-run.json":
            real(self, "")  # the temporary file is created, then the disk is full
            raise enospc()
        return real(self, *args, **kw)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    out = tmp_path / "run"
    with fails(rf"^no space left on device writing {out}/run.json; the run stopped, "
               rf"no checkpoint was saved yet: start over with the same command "
               rf"and --overwrite$"):
        moekd.main(quick(out))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    assert moekd.main(quick(out, "--overwrite"))["finished"]


def test_full_disk_at_a_log_line(tmp_path, monkeypatch):
    """D4: a log line that does not fit is cut back (log.txt keeps every whole line), one line names
    log.txt and the last good checkpoint, and --resume goes on."""
    real, lines = pathlib.Path.open, []
    class Full:
        def __init__(self, f):
            self.f = f
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, text):
            lines.append(text)
            if len(lines) == 2:  # the second line: half of it reaches the disk
                self.f.write(text[:len(text) // 2])
                self.f.flush()
                raise enospc()
            return self.f.write(text)
    def open_(self, mode="r", *args, **kw):
        f = real(self, mode, *args, **kw)
        return Full(f) if self.name == "log.txt" and "a" in mode else f
    monkeypatch.setattr(pathlib.Path, "open", open_)
    out = tmp_path / "run"
    with fails(rf"^no space left on device writing {out}/log.txt; the run stopped, "
               rf"its last good checkpoint is {out}/checkpoints/step-1 "):
        moekd.main(quick(out, "--save-every", "1", "--max-steps", "3"))
    assert (out / "log.txt").read_text() == lines[0]
    monkeypatch.setattr(pathlib.Path, "open", real)
    assert moekd.main(["--out", str(out), "--resume"])["finished"]
    assert [line.split(" |")[0] for line in (out / "log.txt").read_text().splitlines()] == \
        ["step 1/3", "step 2/3", "step 3/3"]


@pytest.fixture
def read_only(monkeypatch):
    """Marks folders as a read-only mount would show them to the kernel's access() and statvfs()."""
    roots: list[Path] = []
    real_access, real_statvfs = os.access, os.statvfs
    def inside(path) -> bool:
        return any(Path(os.path.abspath(path)).is_relative_to(r) for r in roots)
    def access(path, mode, *args, **kw):
        return False if inside(path) and mode & os.W_OK else real_access(path, mode, *args, **kw)
    def statvfs(path):
        st = real_statvfs(path)
        if not inside(path):
            return st
        return os.statvfs_result((*st[:8], st.f_flag | os.ST_RDONLY, st.f_namemax))
    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "statvfs", statvfs)
    return lambda path: roots.append(Path(os.path.abspath(path)))


def test_read_only_out_fails_before_any_model_loads(tmp_path, read_only, no_model_load, sets, monkeypatch):
    """D5, D6, D9: a read-only --out, or a read-only working directory under the default --out, is one
    line before any model loads, in moekd.py and eval.py."""
    out = tmp_path / "ro"
    out.mkdir()
    read_only(out)
    with fails(rf"^--out {out} is on a read-only file system; pick another --out$"):
        moekd.main(quick(out))
    with fails(rf"^--out {out} is on a read-only file system"):
        moe_eval.main(eval_args(STUDENT, out, sets))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    read_only(cwd)
    monkeypatch.chdir(cwd)
    with fails(r"^--out runs/sft-student: its folder \. is on a read-only file "
               r"system; pick another --out$"):
        moekd.main(["--tiny", "--max-steps", "2", "--no-dev-eval"])
    assert list(out.iterdir()) == [] and list(cwd.iterdir()) == []


def test_eval_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch, sets):
    """D8: one line naming the pair file; no 0-byte temporary file; the rerun goes on."""
    real = pathlib.Path.write_text
    def write_text(self, *args, **kw):
        if self.parent.name == "pairs":
            real(self, "")
            raise enospc()
        return real(self, *args, **kw)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    out = tmp_path / "ev"
    with fails(rf"^no space left on device writing {out}/pairs/mini-seed10.json; "
               rf"the evaluation stopped"):
        moe_eval.main(eval_args(STUDENT, out, sets))
    assert list((out / "pairs").iterdir()) == []
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    assert moe_eval.main(eval_args(STUDENT, out, sets))["sets"]["mini"]["mean"] >= 0


def test_writes_name_the_file_on_a_read_only_disk(tmp_path, monkeypatch):
    """EROFS at a write (a disk remounted read-only mid-run) names the file, not `None`."""
    def write_text(self, *args, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises(errors.RunStopped, match=rf"^read-only file system writing {tmp_path}/m.json$"):
        checkpoints.write_json(tmp_path / "m.json", {"a": 1})


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
        checkpoints.load_model(str(model))


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
# Confinement: shard names and the `latest` pointer (S8, S9, S11, S12)

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
        checkpoints.load_model(str(model))


@pytest.mark.parametrize("pointer", ["absolute", "other-run"])
def test_latest_pointer_stays_in_its_run(tmp_path, runs, pointer):
    """S11, S12: `latest` edited to an absolute folder or another run's checkpoint is refused, not
    resumed from."""
    run, other = copy(runs / "St", tmp_path / "St"), copy(runs / "St", tmp_path / "other")
    target = str(checkpoints.latest_checkpoint(other)) if pointer == "absolute" else \
        f"../../other/checkpoints/{checkpoints.latest_checkpoint(other).name}"
    (run / "checkpoints" / "latest").write_text(target + "\n")
    with fails(rf"^{run}/checkpoints/latest: names '{re.escape(target)}', not a "
               rf"checkpoint of this run"):
        moekd.main(["--out", str(run), "--resume"])


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
