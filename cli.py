"""The command line and the paperwork of a run, kept out of moekd.py so that file reads as the method.

Flags from moekd's Config (explicit > --tiny preset > defaults; --resume: the run's run.json), the flags only
some methods use, bounds; the run's lock and SIGINT/SIGTERM stops (one line naming where to go on); the run's
last line and training.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from checkpoints import RunLock, latest_checkpoint, replace_file, saved_config, stop_message
from errors import MoekdError, RunInterrupted, RunStopped
from parallel import SINGLE, Dist, all_reduce_sum

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------
# The command line: flags from Config's fields, the --tiny preset, the flags of some methods, bounds

# `--tiny`: everything a laptop CPU needs for an end-to-end run in a minute or two.
TINY_PRESET = dict(model=str(HERE / "tiny_moe" / "student"), teacher=str(HERE / "tiny_moe"),
                   data="synthetic", lr=3e-3, epochs=8, batch_size=16, max_prompt_len=96,
                   max_len=128, log_every=20, dev_num=64, warmup_steps=10)
APPLIES = {  # flags of some methods only: Config field -> the Method attribute (or test) that uses it
    **dict.fromkeys(("teacher", "teacher_routers", "teacher_device", "shard_teacher", "routed_mass"),
                    lambda m: m.teacher is not None),
    **dict.fromkeys(("gen_batch_size", "sampler", "compile_sampler"), lambda m: m.on_policy),
    **dict.fromkeys(("teacher_k", "teacher_top_p"), lambda m: m.teacher == "native"),
    **dict.fromkeys(("ka_m", "ka_lambda", "ka_k"), lambda m: m.passes),
    **dict.fromkeys(("router_lr", "sar_beta", "sar_kl"), lambda m: m.routers),
    "kd_ratio": lambda m: m.step == "kd", "ka_updates": lambda m: m.passes and m.on_policy,
}
EXAMPLES = """examples:
  python moekd.py --tiny --model tiny_moe --out runs/tiny-teacher     # SFT the tiny MoE teacher on CPU
  python moekd.py --method sar --model SFT_STUDENT --teacher SFT_MOE --device cuda
  torchrun --nproc-per-node 8 moekd.py --method ka --model ... --teacher ... --shard-teacher

Defaults are the official code's; --tiny sets a CPU preset (explicit flags win). More: docs/reference.md."""


def method_flags(methods: dict) -> dict[str, tuple[str, ...]]:
    """Config field -> the methods that use it (given with any other method, the flag is an error)."""
    return {flag: tuple(name for name, m in methods.items() if uses(m)) for flag, uses in APPLIES.items()}


def check_method_flags(method: str, given: dict, methods: dict) -> None:
    uses = method_flags(methods)
    wrong = [f"--{k.replace('_', '-')} ({'/'.join(uses[k])} only)"
             for k in given if method not in uses.get(k, (method,))]
    if wrong:
        raise MoekdError(f"--method {method} does not use {', '.join(wrong)}")


def config_values(config: type, methods: dict, argv: list[str] | None, *, about: str) -> dict[str, Any]:
    """The fields of a `config` (moekd's Config) from the command line.
    Explicit flags > --tiny preset > defaults. --resume: the run's run.json replaces preset and defaults,
    and explicit flags must agree with it."""
    parser = argparse.ArgumentParser(usage="python moekd.py [--method METHOD] [--model M] [--teacher T] ...",
                                     description=f"{about}\n\n{EXAMPLES}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config):
        shown = "" if f.default is None or "default" in f.metadata["help"] else f" (default: {f.default})"
        kw: dict[str, Any] = dict(help=f.metadata["help"] + shown, default=argparse.SUPPRESS)
        if str(f.type).startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            kw["choices"] = f.metadata.get("choices")
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    given = vars(parser.parse_args(argv))  # only the flags on the command line (SUPPRESS)
    values = dict(TINY_PRESET) if given.get("tiny") else {}
    values.update(given)
    if given.get("resume"):
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        values = {**saved_config(values, given, {**defaults, "routed_mass": "literal"}), **given}
        if "routed_mass" not in values:  # neither in run.json nor given
            values["routed_mass"] = "literal"
            print("resume: run.json predates --routed-mass, so the run goes on with the rule it was trained "
                  "with (--routed-mass literal)")
    check_method_flags(values.get("method", "sft"), given, methods)
    return values


BOUNDS = (  # (flags, bound, bound excluded); None values are "not given"
    (("lr",), 0.0, True),
    (("lr_min", "weight_decay", "grad_clip", "router_lr", "sar_beta"), 0.0, False),
    (("batch_size", "epochs", "dist_timeout", "max_prompt_len", "max_len", "log_every", "ka_m",
      "gen_batch_size", "kl_chunk", "grad_accum", "global_batch_size", "max_steps", "stop_after", "dev_size",
      "dev_num", "eval_batch_size", "synthetic_train", "synthetic_dev"), 1, False),
    (("synthetic_facts",), 3, False),
    (("warmup_steps", "save_every"), 0, False))


def check_config(cfg) -> None:
    """One-line errors for values no run can use, and for flags that contradict each other."""
    if cfg.select == "best" and not cfg.dev_eval:
        raise MoekdError("--select best needs the dev evaluation (drop --no-dev-eval)")
    if not 0.0 <= cfg.ka_lambda <= 1.0 or not 0.0 <= cfg.kd_ratio <= 1.0:
        raise MoekdError("--ka-lambda and --kd-ratio must be in [0, 1]")
    if cfg.teacher_top_p is not None and (cfg.teacher_k is not None or not 0.0 <= cfg.teacher_top_p <= 1.0):
        raise MoekdError("--teacher-top-p must be in [0, 1] and cannot be combined with --teacher-k")
    for names, low, strict in BOUNDS:
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not (math.isfinite(value) and (value > low if strict else value >= low)):
                raise MoekdError(f"--{name.replace('_', '-')} must be {'>' if strict else '>='} {low:g} "
                                 f"and finite, got {value}")
    if (cfg.prompt_column is None) != (cfg.response_column is None):
        raise MoekdError("--prompt-column and --response-column go together")
    if cfg.max_prompt_len >= cfg.max_len:
        raise MoekdError(f"--max-prompt-len ({cfg.max_prompt_len}) must be < --max-len ({cfg.max_len})")
    if cfg.resume and cfg.overwrite:
        raise MoekdError("--resume and --overwrite contradict each other")


# ----------------------------------------------------------------------------
# Run safety: one process per run folder (the lock), SIGINT and SIGTERM as a clean stop at a step boundary,
# and every way a run stops as one line naming where to go on

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 1.0  # a second signal within this is the same request (torchrun forwards a terminal's Ctrl-C)


class StopSignals:
    """SIGINT/SIGTERM while training: finish the step, checkpoint, exit 128 + signal.
    A Ctrl-C or a scheduler's SIGTERM should lose no work. Before training starts, and for a second signal,
    the stop is at once (nothing to save then; the user insisting)."""

    def __init__(self, out: Path, dist: Dist = SINGLE):
        self.out, self.dist = out, dist
        self.signum: int | None = None  # the first signal received
        self.at = 0.0
        self.deferred = False           # True inside the training loop: stop at the next step boundary
        self.step = 0                   # the last finished step (for the messages)
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.signum is None and self.deferred:
            self.signum, self.at = signum, now
            if self.dist.main:
                print(f"{name}: finishing step {self.step + 1}, then a checkpoint and stop (a second signal "
                      f"stops at once)", file=sys.stderr, flush=True)
            return
        if self.signum is not None and now - self.at < REPEAT_S:
            return
        raise RunInterrupted(self.at_once(signum), signum, quiet=not self.dist.main)

    def at_once(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if not self.deferred:
            return f"stopped ({name}) before training started; nothing was trained"
        try:
            ckpt = latest_checkpoint(self.out)
        except MoekdError:
            ckpt = None
        where = f"its last checkpoint is {ckpt}, continue with --resume" if ckpt else \
            "no checkpoint was saved"
        return f"stopped at once ({name}, a second signal) in step {self.step + 1}; {where}"

    def agreed(self) -> int:
        """The signal every rank stops for (0: none), at a step boundary.
        An all-reduced flag, so all ranks take the same branch and none waits forever at the checkpoint
        barrier."""
        if self.dist.world == 1:
            return self.signum or 0
        counts = all_reduce_sum([float(self.signum == s) for s in SIGNALS], self.dist)
        return next((int(s) for s, c in zip(SIGNALS, counts) if c > 0), 0)

    def stopped(self, signum: int, step: int, total: int) -> RunInterrupted:
        """What a run stopped by `signum` at `step` raises once its checkpoint is written."""
        name = signal.Signals(signum).name
        return RunInterrupted(f"stopped at step {step} ({name}); continue with --resume", signum,
                              quiet=not self.dist.main)


class RunGuard:
    """Around one invocation of moekd.main: the lock (rank 0), the signal handlers, one-line stops.
    A run that stops on a full disk, a read-only disk or non-finite numbers ends in one line naming where
    to go on."""

    def __init__(self, out: Path, dist: Dist = SINGLE):
        self.out = out
        self.lock = RunLock(active=dist.main)
        self.signals = StopSignals(out, dist)

    def __enter__(self) -> "RunGuard":
        self.signals.__enter__()
        return self

    def __exit__(self, kind, e, tb) -> bool:
        self.signals.__exit__()
        self.lock.release()
        if isinstance(e, RunStopped) or isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS):
            raise MoekdError(stop_message(e, self.out)) from None
        return False


# ----------------------------------------------------------------------------
# The run's lines: progress times, the last line, training.png

def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def done_line(cfg, result: dict) -> str:
    """The run's last line: dev scores and the model handed on.
    A distillation from moekd runs also sets teacher, student before and after side by side (the dev
    ROUGE-L their runs' metrics.json recorded for the folders given)."""
    dev = (f"dev_loss {result['dev_loss']:.4f} | dev_rougeL {result['dev_rougeL']:.2f} | best dev_rougeL "
           f"{result['best_rougeL']:.2f} | " if result.get("best_rougeL") is not None else "")
    line = f"done: {dev}model ({cfg.select}) -> {result['model']}"
    scores = {"teacher": run_score(cfg.teacher), "student before": run_score(cfg.model)} \
        if cfg.spec.teacher else {}
    after = result.get("best_rougeL" if cfg.select == "best" else "dev_rougeL")
    if not scores or after is None or None in scores.values():
        return line
    side = " | ".join(f"{name} {score:.2f}" for name, score in scores.items())
    gain = after - scores["student before"]
    return f"{line}\ndev ROUGE-L: {side} | student after {cfg.method} {after:.2f} ({gain:+.2f})"


def run_score(model_dir: str) -> float | None:
    """The dev ROUGE-L a moekd run recorded for a model folder it handed on (best_rougeL/ or final/)."""
    path = Path(model_dir)
    metrics = path.parent / "metrics.json"
    if path.name not in ("best_rougeL", "final") or not metrics.is_file():
        return None
    record = json.loads(metrics.read_text())
    return record.get("best_rougeL" if path.name == "best_rougeL" else "dev_rougeL")


def plot_training(history: list[dict], path: Path, *, title: str) -> None:
    """training.png: the logged losses by step, and the dev ROUGE-L beside them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in sorted({k for h in history for k in h} - {"step", "dev_rougeL"}):
        points = [(h["step"], h[key]) for h in history if key in h]
        left.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
    dev = [(h["step"], h["dev_rougeL"]) for h in history if "dev_rougeL" in h]
    if dev:
        right.plot(*zip(*dev), marker="o", color="tab:green")
    left.set(xlabel="step", ylabel="loss", title=title)
    right.set(xlabel="step", ylabel="dev ROUGE-L", title="dev ROUGE-L")
    if history:
        left.legend(fontsize="small")
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
