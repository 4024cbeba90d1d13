"""moekd.py's command line and runs: training runs end to end, every method on every teacher family, bad input
(one line, nothing written), run folders (the overwrite guard, umask, full disk, NaN), resume."""
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import cli
import data
import errors
import eval as moe_eval
import moekd

from conftest import (ROOT, TINY, STUDENT, SP, TINY_CFG, write_model_dir, hf_moe, run_args, eval_args,
                      without_timing)

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


# ----------------------------------------------------------------------------
# main(): training runs, bad input, run folders

def tiny_args(out, *extra):
    return ["--tiny", "--model", str(TINY), "--out", str(out), "--synthetic-train", "48",
            "--synthetic-dev", "8", "--batch-size", "8", "--epochs", "2", "--dev-num", "4",
            "--log-every", "2", *extra]


def test_main_sft_tiny_moe_runs_and_selects_best(tmp_path):
    result = moekd.main(tiny_args(tmp_path / "run"))
    assert result["finished"] and result["step"] == result["total_steps"] == 12
    dev = [h for h in result["history"] if "dev_rougeL" in h]
    assert [h["step"] for h in dev] == [6, 12]
    assert result["best_rougeL"] == max(h["dev_rougeL"] for h in dev)
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert losses[-1] < losses[0]
    for sub in ("best_rougeL", "final", "checkpoints/step-12"):
        assert moekd.is_moe(checkpoints.load_model(str(tmp_path / "run" / sub)))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 12
    assert "step 2/12 | epoch 1 | loss" in (tmp_path / "run" / "log.txt").read_text()


def test_truncate_log_keeps_lines_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("step 2/9 | a\nstep 4/9 | b\ndev step 4 | c\nstep 6/9 | d\ndev step 6 | e\nstep 8")
    checkpoints.truncate_log(log, 4)
    assert log.read_text() == "step 2/9 | a\nstep 4/9 | b\ndev step 4 | c\n"


def test_existing_out_is_never_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(errors.MoekdError, match="exists and is not empty; pass --resume or --overwrite"):
        moekd.main(tiny_args(out))
    with pytest.raises(errors.MoekdError, match="no checkpoint to resume from|no run.json, not a moekd run"):
        moekd.main(tiny_args(out, "--resume"))
    (out / "sub").mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(errors.MoekdError,
                       match=r"^--out .*run: holds files moekd did not write \(keep.txt, sub\)"):
        moekd.main(tiny_args(out, "--overwrite"))
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 3
    monkeypatch.chdir(out)  # --out . is the working directory, foreign files and all
    with pytest.raises(errors.MoekdError, match=r"^--out \.: holds files moekd did not write"):
        moekd.main(tiny_args(".", "--overwrite"))
    theirs = tmp_path / "theirs"  # moekd's names, but no run marker
    (theirs / "checkpoints").mkdir(parents=True)
    with pytest.raises(errors.MoekdError, match="has no run.json, not a moekd output folder"):
        moekd.main(tiny_args(theirs, "--overwrite"))
    mine = tmp_path / "mine"  # what a killed moekd run leaves is replaced
    (mine / ".tmp-final-x1y2z3_4").mkdir(parents=True)
    (mine / "run.json").write_text(json.dumps({**dataclasses.asdict(moekd.Config()), "world_size": 1}))
    (mine / "log.txt").write_text("step 1")
    moekd.main(tiny_args(mine, "--overwrite", "--max-steps", "1", "--no-dev-eval"))
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "checkpoints", "final", "log.txt",
                                                      "metrics.json", "run.json", "training.png"]
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "eval.json").write_text("{}")
    (ev / "notes.md").write_text("mine")
    with pytest.raises(errors.MoekdError, match=r"holds files moekd did not write \(notes.md\)"):
        moe_eval.main(eval_args(tmp_path, "--overwrite", name="ev"))
    assert (ev / "notes.md").exists()


@pytest.mark.parametrize("extra,pattern", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: not a local directory"),
    (["--model", "some-org/not-a-model"], "not loadable from the hub"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data: no such file or folder"),
    (["--data", data.DOLLY_HUB], "--data databricks/databricks-dolly-15k: could not load from the hub"),
    (["--data", "/tmp"], "--data /tmp: folder has no train.jsonl"),
    (["--dev-data", "/nonexistent/dev.jsonl"], "--dev-data /nonexistent/dev.jsonl: no such file"),
    (["--method", "ka", "--teacher", str(STUDENT)], "--method ka needs an MoE teacher"),
    (["--max-prompt-len", "300", "--max-len", "200"], "--max-prompt-len"),
    (["--batch-size", "0"], "--batch-size must be >= 1 and finite, got 0"),
    (["--lr", "-1"], "--lr must be > 0 and finite, got -1.0"),
    (["--lr", "nan"], "--lr must be > 0 and finite, got nan"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--weight-decay", "inf"], "--weight-decay must be >= 0 and finite, got inf"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--ka-m", "3"], r"^--method sft does not use --ka-m \(ka/ka-gold only\)$"),
    (["--teacher-k", "2", "--gen-batch-size", "4"],
     r"does not use --teacher-k \(kd/gkd only\), --gen-batch-size"),
    (["--method", "gkd", "--router-lr", "1e-3"], r"^--method gkd does not use --router-lr \(sar only\)$"),
])
def test_bad_input_fails_before_any_work(tmp_path, extra, pattern):
    out = tmp_path / "run"
    with pytest.raises(errors.MoekdError, match=pattern):
        moekd.main(tiny_args(out, *extra))
    assert not out.exists()


@pytest.mark.parametrize("content,pattern", [
    (b'{"instruction": "a", "response": "b"}\n{"instruction": "\xff", "response": "b"}\n',
     r"data.jsonl:2: not UTF-8"),
    (b'{"instruction": null, "response": "b"}\n',
     r"data.jsonl:1: field 'instruction' must be a string, got null"),
    (b'{"instruction": "a", "context": 3, "response": "b"}\n',
     r"data.jsonl:1: field 'context' must be a string"),
])
def test_bad_data_names_file_line_and_field(tmp_path, content, pattern):
    (tmp_path / "data.jsonl").write_bytes(content)
    with pytest.raises(errors.MoekdError, match=pattern):
        moekd.main(tiny_args(tmp_path / "run", "--data", str(tmp_path / "data.jsonl")))
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    d = write_model_dir(tmp_path / "m", {**TINY_CFG, "vocab_size": 100})
    pattern = r"^--model: the tokenizer has \d+ tokens, more than the model's vocabulary of 100$"
    with pytest.raises(errors.MoekdError, match=pattern):
        moekd.main(tiny_args(tmp_path / "run", "--model", str(d)))
    with pytest.raises(errors.MoekdError, match=pattern):
        moe_eval.main(eval_args(tmp_path, "--model", str(d), "--sets", "vicuna"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "ev").exists()


def test_model_needing_remote_code_is_refused_without_running_it(tmp_path):
    """auto_map in config.json: one-line error even with `y` on stdin, the planted module never imported."""
    d = write_model_dir(tmp_path / "evil", {**json.loads((STUDENT / "config.json").read_text()),
                                            "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                         "AutoModelForCausalLM": "evil.EvilModel"}})
    marker = tmp_path / "imported"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.run([sys.executable, str(ROOT / "moekd.py"), "--tiny", "--model", str(d), "--out",
                           str(tmp_path / "run")], input="y\ny\n", capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: --model {d}: config.json has an auto_map, the model "
                                                f"needs remote code, which moekd never runs"]
    with pytest.raises(errors.MoekdError, match="needs remote code"):
        moe_eval.main(eval_args(tmp_path, "--model", str(d), "--sets", "vicuna"))
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(errors.MoekdError, match=r"^step (\d+): the (loss|gradient norm) is nan") as e:
        moekd.main(run_args(out, "sft", "--lr", "1e6", "--synthetic-train", "40", "--max-steps", "10",
                            "--save-every", "1"))
    step = int(re.match(r"step (\d+)", str(e.value)).group(1))
    assert str(e.value).endswith(f"its last good checkpoint is {out / 'checkpoints' / f'step-{step - 1}'} "
                                 f"(continue with --resume)")
    assert 1 < step < 10 and not (out / "final").exists() and not (out / "metrics.json").exists()
    weights = load_file(out / "checkpoints" / f"step-{step - 1}" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    with pytest.raises(errors.MoekdError, match="non-finite"):
        checkpoints.write_json(tmp_path / "m.json", {"loss": math.nan})
    assert not (tmp_path / "m.json").exists()


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import errno
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []
    def save_file(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    with pytest.raises(errors.MoekdError,
                       match=r"^no space left on device writing .*checkpoints/step-2; the run stopped, "
                             r"its last good checkpoint is .*checkpoints/step-1 \(continue"):
        moekd.main(tiny_args(out, "--max-steps", "3", "--save-every", "1", "--no-dev-eval"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-1"]
    assert moekd.is_moe(checkpoints.load_model(str(out / "checkpoints" / "step-1")))


def test_outputs_keep_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        moekd.main(run_args(tmp_path / "run", "sft", "--max-steps", "1"))
    finally:
        os.umask(old)
    paths = [tmp_path / "run", *(tmp_path / "run").rglob("*")]
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_dir()} == {"0o775"}
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()} == {"0o664"}


def test_vocabulary_mismatch(tmp_path):
    """Heads that differ by padding rows past one tokenizer distill (as Qwen2.5's 152064 vs 151936 rows);
    another tokenizer is a one-line error naming both."""
    d = write_model_dir(tmp_path / "t", {**TINY_CFG, "vocab_size": 2041})
    assert moekd.main(tiny_args(tmp_path / "run", "--method", "kd", "--teacher", str(d), "--model",
                                str(STUDENT), "--max-steps", "1", "--no-dev-eval"))["finished"]
    d = write_model_dir(tmp_path / "sp", {**TINY_CFG, "vocab_size": 2041}, tokenizer_dir=SP)
    with pytest.raises(errors.MoekdError,
                       match=r"--teacher tokenizer .*sp \(\d+ tokens\) differs from --model tokenizer "
                             r".*student"):
        moekd.main(tiny_args(tmp_path / "run2", "--method", "kd", "--teacher", str(d), "--model",
                             str(STUDENT)))


def test_missing_llama_moe_field_via_main(tmp_path):
    d = write_model_dir(tmp_path / "m", {k: v for k, v in TINY_CFG.items() if k != "num_selects"})
    with pytest.raises(errors.MoekdError,
                       match=r"config.json: Llama-MoE config is missing required field\(s\) num_selects"):
        moekd.main(tiny_args(tmp_path / "run", "--model", str(d)))


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "moekd.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --out {out}: exists and is not empty; pass --resume "
                                                f"or --overwrite"]


def test_help_lists_every_flag_with_defaults():
    proc = subprocess.run([sys.executable, str(ROOT / "moekd.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for f in dataclasses.fields(moekd.Config):
        assert "--" + f.name.replace("_", "-") in proc.stdout
    assert "sft,kd,gkd,all,ka,sar" in proc.stdout.replace(" ", "").replace("{", ",").replace("}", ",")


@pytest.mark.parametrize("extra,pattern", [
    (["--method", "kd", "--teacher", str(STUDENT), "--teacher-k", "2"], "--teacher-k needs an MoE teacher"),
    (["--method", "ka", "--ka-k", "9"], r"--ka-k 9 is outside \[1, 7\]"),
    (["--method", "gkd", "--teacher-k", "0"], r"--teacher-k 0 is outside"),
    (["--method", "ka", "--ka-lambda", "1.5"], "--ka-lambda and --kd-ratio must be in"),
])
def test_bad_distillation_flags(tmp_path, extra, pattern):
    with pytest.raises(errors.MoekdError, match=pattern):
        moekd.main(run_args(tmp_path / "run", "gkd", *extra))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------
# Every method end to end

@pytest.mark.parametrize("restart,steps", [("--restart-epochs", 2), ("--no-restart-epochs", 4)])
def test_restart_epochs_reset_the_optimizer(tmp_path, restart, steps):
    """Two epochs of two steps: with restarts AdamW's state starts over at the second epoch."""
    moekd.main(run_args(tmp_path / "run", "gkd", "--max-steps", "4", "--epochs", "2",
                        "--synthetic-train", "8", restart))
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {steps}


@pytest.mark.parametrize("family", ["llama_moe", "mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("method", ["kd", "gkd", "all", "ka", "sar"])
def test_every_method_runs_on_every_teacher_family(tmp_path, method, family):
    teacher = TINY if family == "llama_moe" else hf_moe(tmp_path, family)
    result = moekd.main(run_args(tmp_path / "run", method, "--teacher", str(teacher)))
    assert result["finished"] and result["step"] == 2
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    init = checkpoints.load_model(str(STUDENT)).state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init)
    if method == "sar":
        routers = load_file(tmp_path / "run" / "final" / checkpoints.ROUTERS_FILE)
        original = checkpoints.load_model(str(teacher)).state_dict()
        assert routers.keys() <= original.keys() and any(not torch.equal(routers[k], original[k])
                                                         for k in routers)


@pytest.mark.parametrize("method", moekd.METHODS)
def test_every_method_steps_in_bf16_on_cpu(tmp_path, method):
    """GPU runs are bf16 (autocast, fp32 master weights, fp32 SAR routers): dtype bugs must show up here. The
    first step's losses are those of the same step in fp32 within rel 2e-2."""
    result = moekd.main(run_args(tmp_path / "run", method, "--dtype", "bf16", "--max-steps", "1"))
    fp32 = moekd.main(run_args(tmp_path / "fp32", method, "--dtype", "fp32", "--max-steps",
                               "1"))["history"][0]
    assert result["finished"] and all(math.isfinite(v) for h in result["history"] for v in h.values())
    losses = [k for k in fp32 if k in ("loss", "rkl", "fkl", "ce", "router_kl")]
    assert "loss" in losses and all(abs(result["history"][0][k] - fp32[k]) <= 2e-2 * abs(fp32[k])
                                    for k in losses), \
        {k: (result["history"][0][k], fp32[k]) for k in losses}
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    init = checkpoints.load_model(str(STUDENT)).state_dict()
    assert all(trained[k].dtype == torch.float32
               for k in trained) and any(not torch.equal(trained[k], init[k]) for k in init)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dtype"] == "bf16"


def test_ka_at_lambda_0_is_gkd_with_the_top_n_minus_1_experts(tmp_path):
    """KA's draws never taken (lambda 0): every pass routes the top-(N-1), so the first step's loss is gkd's
    with --teacher-k N-1 (N = 7 experts in the tiny teacher); at the default lambda it is not."""
    def first(method, *extra):
        out = tmp_path / "-".join([method, *extra]).replace("--", "")
        return moekd.main(run_args(out, method, "--max-steps", "1", *extra))["history"][0]["loss"]

    gkd = first("gkd", "--teacher-k", "6")
    assert abs(first("ka", "--ka-lambda", "0") - gkd) <= 1e-6 * gkd
    assert first("ka", "--ka-lambda", "1") != gkd and gkd != first("gkd")


def test_llama_like_tokenizer_end_to_end(tmp_path):
    """SFT of the student, then kd and gkd from it, all with the SentencePiece-style tokenizer's models."""
    common = ["--synthetic-train", "16", "--batch-size", "4", "--max-steps", "2", "--log-every", "1"]
    sft = moekd.main(["--tiny", "--model", str(SP / "student"), "--out", str(tmp_path / "sft"),
                      "--synthetic-dev", "4", "--dev-num", "2", *common])
    assert sft["model"] == str(tmp_path / "sft" / "best_rougeL")
    for method in ("kd", "gkd"):
        result = moekd.main(["--tiny", "--method", method, "--model", sft["model"], "--teacher", str(SP),
                             "--out", str(tmp_path / method), "--no-dev-eval", *common])
        assert result["finished"] and result["model"] == str(tmp_path / method / "final")
        assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result["history"])
        assert checkpoints.load_tokenizer(result["model"]).get_vocab() == \
            checkpoints.load_tokenizer(str(SP)).get_vocab()


@pytest.mark.parametrize("student_family", ["llama_moe", "mixtral"])
@pytest.mark.parametrize("method", ["gkd", "sar"])
def test_moe_student_adds_its_own_balance_loss(tmp_path, method, student_family):
    student = TINY if student_family == "llama_moe" else hf_moe(tmp_path, student_family)
    result = moekd.main(run_args(tmp_path / "run", method, "--model", str(student)))
    assert all("lb" in h and h["lb"] > 0 for h in result["history"])


# ----------------------------------------------------------------------------
# Resume

def test_kill_9_and_resume_is_bit_identical(tmp_path):
    """A run killed (SIGKILL) after a checkpoint and resumed with `--resume` alone (the config comes from
    run.json) ends bit-identical to an uninterrupted run, with the same log.txt."""
    whole = moekd.main(tiny_args(tmp_path / "a"))
    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(ROOT / "moekd.py"), *tiny_args(b, "--save-every", "1")],
                            # this process's thread count:
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # the same float sums
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    latest = b / "checkpoints" / "latest"
    while proc.poll() is None and not (latest.exists() and int(latest.read_text().split("-")[1]) >= 3):
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -9, "the run ended before it could be killed"
    # what a kill can leave after the checkpoint: a later step, half a line
    with (b / "log.txt").open("a") as f:
        f.write("dev step 11 | dev_loss 1.0 | dev_rougeL 1.00\nstep 1")
    resumed = moekd.main(["--out", str(b), "--resume"])
    assert resumed["finished"]
    a, c = load_file(tmp_path / "a" / "final" / "model.safetensors"), \
        load_file(b / "final" / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert whole["history"] == resumed["history"]  # the same log lines and dev scores
    assert without_timing((b / "log.txt").read_text()) == \
        without_timing((tmp_path / "a" / "log.txt").read_text())
    with pytest.raises(errors.MoekdError,
                       match=r"--resume: --epochs 3 \(run: 2\); --lr 0.01 \(run: 0.003\) differ "
                             r"from the run being resumed"):
        moekd.main(tiny_args(b, "--resume", "--lr", "1e-2", "--epochs", "3"))
    assert not list(b.glob("**/.tmp-*"))


def test_routed_mass_is_recorded_and_an_older_run_resumes_literal(tmp_path, capsys):
    """run.json records --routed-mass (default native); a run.json written before the flag existed resumes
    with the rule it was trained with (literal), saying so in one line; asking it for native is a clear
    error."""
    out = tmp_path / "run"
    moekd.main(run_args(out, "all", "--save-every", "1", "--stop-after", "1"))
    saved = json.loads((out / "run.json").read_text())
    assert saved["routed_mass"] == "native" and moekd.parse_config(["--resume", "--out",
                                                                    str(out)]).routed_mass == "native"
    del saved["routed_mass"]
    (out / "run.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert moekd.parse_config(["--resume", "--out", str(out)]).routed_mass == "literal"
    line = [x for x in capsys.readouterr().out.splitlines() if "routed-mass" in x]
    assert line == ["resume: run.json predates --routed-mass, so the run goes on with the rule it was "
                    "trained with (--routed-mass literal)"]
    with pytest.raises(errors.MoekdError, match=r"--routed-mass 'native' \(run: 'literal'\)"):
        moekd.parse_config(["--resume", "--out", str(out), "--routed-mass", "native"])
    with pytest.raises(SystemExit):
        moekd.parse_config(["--routed-mass", "loud"])


@pytest.mark.parametrize("method", ["sft", "ka", "sar"])
def test_resume_is_bit_identical_for_stateful_methods(tmp_path, method):
    args = ["--method", method, "--epochs", "1", "--synthetic-train", "32", "--batch-size", "4"]
    whole = moekd.main(tiny_args(tmp_path / "a", *args))
    moekd.main(tiny_args(tmp_path / "b", *args, "--stop-after", "3"))
    resumed = moekd.main(tiny_args(tmp_path / "b", *args, "--resume"))
    assert whole["history"] == resumed["history"]
    for name in ["model.safetensors"] + ([checkpoints.ROUTERS_FILE] if method == "sar" else []):
        a, b = load_file(tmp_path / "a" / "final" / name), load_file(tmp_path / "b" / "final" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_routers_reload(tmp_path):
    moekd.main(run_args(tmp_path / "run", "sar", "--router-lr", "1e-2"))
    saved = load_file(tmp_path / "run" / "final" / checkpoints.ROUTERS_FILE)
    teacher = checkpoints.load_model(str(TINY))
    moekd.load_routers(teacher, tmp_path / "run" / "final")
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in saved.items())
    result = moekd.main(run_args(tmp_path / "again", "gkd", "--teacher-routers",
                                 str(tmp_path / "run" / "final")))
    assert result["finished"]
    with pytest.raises(errors.MoekdError, match="--teacher-routers .*: no such file"):
        moekd.main(run_args(tmp_path / "x", "gkd", "--teacher-routers",
                            str(tmp_path / "nothing.safetensors")))


def test_run_folder_of_the_previous_layout_resumes(tmp_path, monkeypatch):
    """fixtures/run-ace5af2 was written by moekd at commit ace5af2 (before the module split): an SFT run of
    the LLaMA-like tiny student stopped after 3 of 8 steps (its run.json's two machine paths, the unused
    teacher and the out folder, made relative). It resumes with no flags and ends as the uninterrupted run of
    that commit did: the same history to float rounding. The losses are computed from hidden states in chunks
    since, which moves the last float bits, so the final weights are no longer bit-identical to that commit's
    (the fixture's final_weights_sha256): they are checked to be finite and trained past the checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(ROOT / "fixtures" / "run-ace5af2", run)
    expected = json.loads((ROOT / "fixtures" / "run-ace5af2.expected.json").read_text())
    monkeypatch.chdir(ROOT)  # the run's config names its model relative to the repository
    result = moekd.main(["--out", str(run), "--resume"])
    assert result["finished"] and len(result["history"]) == len(expected["history"])
    for got, want in zip(result["history"], expected["history"]):
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want)
    weights, resumed_from = load_file(run / "final" / "model.safetensors"), load_file(
        ROOT / "fixtures" / "run-ace5af2" / "checkpoints" / "step-3" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values()) and any(
        not torch.equal(weights[k], resumed_from[k]) for k in weights)


# ----------------------------------------------------------------------------
# What a run shows: the log line's ETA, flushed lines, training.png, the help text, which flags a method takes

def test_log_lines_end_with_an_eta_and_training_png_is_written(tmp_path, capsys):
    result = moekd.main(tiny_args(tmp_path / "run"))
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()
    lines = [line for line in log if line.startswith("step")]
    assert len(lines) == 6 and all(re.search(r" \| eta (\d+s|\d+m\d\ds|\d+h\d\dm)$", line) for line in lines)
    assert lines[-1].endswith("| eta 0s") and lines[-1].startswith("step 12/12")
    png = (tmp_path / "run" / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000  # a real picture, not an empty canvas
    assert result["finished"] and "dev step 12 | dev_loss" in capsys.readouterr().out


def test_method_flag_table_names_config_fields_and_methods():
    fields, flags = {f.name for f in dataclasses.fields(moekd.Config)}, cli.method_flags(moekd.METHODS)
    assert set(flags) <= fields
    assert all(methods and set(methods) <= set(moekd.METHODS) for methods in flags.values())


def test_duration_reads_like_a_clock():
    assert [cli.duration(s) for s in (0, 12.4, 59.6, 60, 185, 3599, 3600, 3720, 90000)] == \
        ["0s", "12s", "1m00s", "1m00s", "3m05s", "59m59s", "1h00m", "1h02m", "25h00m"]


def test_every_reported_line_is_flushed(tmp_path, monkeypatch):
    """A run's log and dev lines reach a pipe or file as they happen: each is flushed right after it is
    written (block-buffered stdout kept them back until exit)."""
    events = []

    class Recorder:
        def write(self, text):
            events.append(("write", text))
        def flush(self):
            events.append(("flush", ""))
        def isatty(self):
            return False
    monkeypatch.setattr(sys, "stdout", Recorder())
    moekd.main(tiny_args(tmp_path / "run"))
    reported = [i for i, (kind, text) in enumerate(events) if kind == "write" and
                text.startswith(("step ", "dev step "))]
    assert len(reported) == 8  # 6 log lines, 2 dev evaluations
    for i in reported:  # print(line, flush=True): the line, its newline, then a flush
        assert events[i + 1] == ("write", "\n") and events[i + 2][0] == "flush", events[i:i + 3]


def test_help_text_has_an_example_first_and_each_default_once():
    text = subprocess.run([sys.executable, str(ROOT / "moekd.py"), "--help"], capture_output=True,
                          text=True).stdout
    assert text.index("examples:") < text.index("options:")
    assert "python moekd.py --method sar" in text[:text.index("options:")]
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and not re.search(r"\(default: [^)]*\)\s*\(default:", flat)
    options = re.findall(r"^  (--[a-z-]+)[^\n]*\n?((?:\s{20,}[^\n]*\n)*)", text.split("options:")[1], re.M)
    assert len(options) >= len(dataclasses.fields(moekd.Config))


def test_method_flags_follow_from_the_method_rows():
    """METHOD_FLAGS is derived from the Method table; it must say what the methods use (written out here)."""
    distill = ("kd", "gkd", "all", "ka", "sar", "ka-gold")
    on_policy = ("gkd", "all", "ka", "sar")
    assert cli.method_flags(moekd.METHODS) == {
        "teacher": distill, "teacher_routers": distill, "teacher_device": distill, "shard_teacher": distill,
        "routed_mass": distill, "gen_batch_size": on_policy, "sampler": on_policy,
        "compile_sampler": on_policy, "kd_ratio": ("kd", "ka-gold"), "teacher_k": ("kd", "gkd"),
        "teacher_top_p": ("kd", "gkd"), "ka_m": ("ka", "ka-gold"), "ka_lambda": ("ka", "ka-gold"),
        "ka_k": ("ka", "ka-gold"), "ka_updates": ("ka",), "router_lr": ("sar",), "sar_beta": ("sar",),
        "sar_kl": ("sar",)}
