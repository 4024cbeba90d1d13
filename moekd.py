"""moekd: knowledge distillation from Mixture-of-Experts teachers.

Reference implementation of "Every Expert Matters: Towards Effective Knowledge Distillation for
Mixture-of-Experts Language Models" (Kim, Chu, Yang; arXiv 2502.12947). A dense student learns from an
MoE teacher by on-policy reverse KL (GKD, Agarwal et al. 2024); the paper's two MoE-specific methods let
it hear the experts the router did not pick:
  KA  (knowledge augmentation, Sec. 4.1): M teacher passes, each token and layer routed w.p. lambda to
      N-1 experts sampled without replacement from the router softmax; the M reverse KLs are averaged.
  SAR (student-aware router, Sec. 4.2): all experts on; every step the teacher's routers first learn
      KL(teacher || student) + beta * balance loss, then the student learns from the updated teacher.

    python moekd.py --tiny --model tiny_moe --out runs/tiny-teacher    # SFT the tiny MoE on CPU
    python moekd.py --method sar --model SFT_STUDENT --teacher SFT_MOE --device cuda
    pytest -q                                                           # tests, CPU, offline

Sections flow downward: config -> data -> Llama-MoE model -> loading/saving -> routing control ->
losses -> generation -> distributed (torchrun) -> method steps -> training loop -> main. Shape legend: B batch, T time,
H hidden, V vocab, E experts, K selected experts, N flattened tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
METHODS = ("sft", "kd", "gkd", "all", "ka", "sar", "ka-gold")
ON_POLICY = ("gkd", "all", "ka", "sar")     # the student samples its own responses
MOE_TEACHER = ("all", "ka", "sar", "ka-gold")  # the method changes the teacher's routing
DOLLY_HUB = "databricks/databricks-dolly-15k"


class MoekdError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


class RunStopped(MoekdError):
    """Training cannot go on (non-finite numbers, full disk); main() names the last good checkpoint."""


# ----------------------------------------------------------------------------
# Config

@dataclass
class Config:
    method: str = field(default="sft", metadata={"help": "training method", "choices": METHODS})
    model: str = field(default="princeton-nlp/Sheared-LLaMA-1.3B", metadata={
        "help": "model to train (the student; for sft the model itself): hub name or local dir"})
    teacher: str = field(default="llama-moe/LLaMA-MoE-v1-3_5B-4_16", metadata={
        "help": "MoE teacher for kd/gkd/all/ka/sar: hub name or local dir"})
    data: str = field(default=DOLLY_HUB, metadata={
        "help": "training data: 'synthetic', the Dolly hub name, a jsonl file (raw Dolly or "
                "MiniLLM prompt/output), or a folder with train.jsonl (+ dev.jsonl)"})
    dev_data: str | None = field(default=None, metadata={
        "help": "dev data (same formats); default: the MiniLLM split of raw Dolly, the folder's "
                "dev.jsonl, or the first --dev-size rows of --data"})
    dev_size: int = field(default=1000, metadata={"help": "rows held out as dev when --dev-data is not given"})
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<method>-<model>)"})
    overwrite: bool = field(default=False, metadata={
        "help": "empty an existing --out and start over (only a moekd run folder: run.json, nothing foreign)"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --out from its last checkpoint with its saved config (run.json)"})
    tiny: bool = field(default=False, metadata={
        "help": "CPU preset: tiny_moe models, synthetic data, short sequences, large LR"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, ... (auto: cuda if available)"})
    dtype: str = field(default="auto", metadata={
        "help": "compute dtype under autocast, master weights stay fp32 (auto: bf16 on cuda, fp32 on cpu)",
        "choices": ("auto", "bf16", "fp32")})
    seed: int = field(default=10, metadata={"help": "seed for init, data order, gate noise, sampling"})
    epochs: int = field(default=10, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "cap on optimizer steps (sets the schedule length)"})
    stop_after: int | None = field(default=None, metadata={
        "help": "checkpoint and exit after this many optimizer steps in this invocation (time-limited jobs)"})
    batch_size: int = field(default=16, metadata={
        "help": "micro-batch per device; global batch = batch_size * devices * grad_accum"})
    grad_accum: int | None = field(default=None, metadata={
        "help": "micro-batches per device per optimizer step (default 1, or what --global-batch-size needs)"})
    global_batch_size: int | None = field(default=None, metadata={
        "help": "rows per optimizer step over all devices; sets --grad-accum from --batch-size and the device count"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default 1e-5; sar 1e-6)"})
    lr_schedule: str | None = field(default=None, metadata={
        "help": "default cosine for sft/kd/ka-gold, constant for gkd/all/ka/sar", "choices": ("constant", "cosine")})
    lr_min: float = field(default=1e-7, metadata={"help": "final LR of the cosine schedule"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=1e-2, metadata={
        "help": "AdamW weight decay on matrices (not on norms/biases); the paper's MoE teacher SFT used 0.1"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    loss_norm: str = field(default="global", metadata={
        "help": "global: token mean over the whole global batch (invariant to micro-batching); "
                "micro: mean of per-micro-batch token means (the official DeepSpeed split)",
        "choices": ("global", "micro")})
    kd_ratio: float = field(default=0.5, metadata={"help": "kd: weight r of the KL term in (1-r) CE + r KL"})
    teacher_k: int | None = field(default=None, metadata={
        "help": "kd/gkd: the teacher's top-k (default its native k; the paper's Fig. 2 sweeps it)"})
    teacher_top_p: float | None = field(default=None, metadata={
        "help": "kd/gkd: route the teacher by the official gate's top-p instead of top-k: per token the most "
                "probable experts until their softmax mass exceeds P (the official --moe-top-p)"})
    ka_m: int = field(default=2, metadata={"help": "ka, ka-gold: M, teacher passes per sample, each with fresh expert draws"})
    ka_lambda: float = field(default=0.05, metadata={
        "help": "ka, ka-gold: lambda, per token and layer probability of the sampled expert set"})
    ka_k: int | None = field(default=None, metadata={
        "help": "ka, ka-gold: experts per token (default N-1, as the official scripts)"})
    ka_updates: str = field(default="mean", metadata={
        "help": "ka: mean = one update on the mean of the M losses (official code); each = M updates per "
                "sampled batch, one per teacher pass (the paper's Algorithm 1)", "choices": ("mean", "each")})
    router_lr: float = field(default=1e-6, metadata={
        "help": "sar: LR of the teacher routers' own AdamW (official loop scripts; the paper says 1e-5)"})
    sar_kl: str = field(default="teacher-student", metadata={
        "help": "sar: the routers' KL. teacher-student = KL(p_teacher || q_student) = Sum p (log p - log q), the "
                "paper's Eq. 9 and the official --teacher-kld-type reverse; student-teacher = KL(q_student || "
                "p_teacher), the official forward", "choices": ("teacher-student", "student-teacher")})
    sar_beta: float = field(default=0.01, metadata={
        "help": "sar: balance-loss weight for transformers teachers (Llama-MoE uses its config's gate_balance_loss_weight)"})
    teacher_routers: str | None = field(default=None, metadata={
        "help": "load teacher router weights from this teacher_routers.safetensors (or a run dir holding one)"})
    teacher_device: str | None = field(default=None, metadata={"help": "device of the teacher (default --device)"})
    shard_teacher: bool = field(default=False, metadata={
        "help": "torchrun: shard the teacher over all ranks with FSDP2 instead of a full copy per rank"})
    shard_student: bool = field(default=False, metadata={
        "help": "torchrun: shard the student (weights, gradients, AdamW state) with FSDP2 instead of DDP"})
    dist_timeout: int = field(default=60, metadata={
        "help": "torchrun: minutes a rank waits in a collective (rank 0 evaluates and saves while the others wait)"})
    restart_epochs: bool | None = field(default=None, metadata={
        "help": "reset the optimizer state and reuse the first epoch's data order every epoch, as the official "
                "*_loop.sh scripts' 1-epoch jobs (default on for gkd/all/ka/sar)"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer in the backward (the student, and the teacher in SAR's router "
                "update): activations of one layer instead of all, for about a third more compute"})
    gen_batch_size: int = field(default=16, metadata={"help": "rows per on-policy generate() call"})
    kl_chunk: int = field(default=256, metadata={"help": "tokens per chunk of the exact full-vocabulary KL"})
    max_prompt_len: int = field(default=256, metadata={"help": "prompts longer than this (tokens) are dropped"})
    max_len: int = field(default=512, metadata={"help": "prompt + response truncated to this many tokens"})
    log_every: int = field(default=10, metadata={"help": "optimizer steps between log lines"})
    save_every: int = field(default=0, metadata={"help": "also checkpoint every N steps (0: only at epoch ends)"})
    dev_eval: bool = field(default=True, metadata={"help": "dev loss and ROUGE-L after every epoch"})
    select: str | None = field(default=None, metadata={
        "help": "the model a run hands on: best = best dev ROUGE-L over the epochs (best_rougeL/; the official sft, "
                "kd and ka-gold runs), last = the model at the end (final/; the official gkd/all/ka/sar loop "
                "scripts evaluate their last 1-epoch job). Default: the official choice for the method",
        "choices": ("best", "last")})
    dev_num: int | None = field(default=None, metadata={"help": "dev examples used for ROUGE-L (default all)"})
    eval_batch_size: int = field(default=32, metadata={"help": "batch size of dev generation"})
    synthetic_train: int = field(default=3000, metadata={"help": "rows of the synthetic training set"})
    synthetic_dev: int = field(default=200, metadata={"help": "rows of the synthetic dev set"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise MoekdError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.lr is None:
            self.lr = 1e-6 if self.method == "sar" else 1e-5
        if self.lr_schedule is None:
            self.lr_schedule = "cosine" if self.method in ("sft", "kd", "ka-gold") else "constant"
        if self.restart_epochs is None:
            self.restart_epochs = self.method in ON_POLICY
        if self.select is None:
            self.select = "best" if self.method in ("sft", "kd", "ka-gold") and self.dev_eval else "last"
        if self.select == "best" and not self.dev_eval:
            raise MoekdError("--select best needs the dev evaluation (drop --no-dev-eval)")
        if not 0.0 <= self.ka_lambda <= 1.0 or not 0.0 <= self.kd_ratio <= 1.0:
            raise MoekdError("--ka-lambda and --kd-ratio must be in [0, 1]")
        if self.teacher_top_p is not None and (self.teacher_k is not None or not 0.0 <= self.teacher_top_p <= 1.0):
            raise MoekdError("--teacher-top-p must be in [0, 1] and cannot be combined with --teacher-k")
        for names, low, strict in (  # (flags, bound, bound excluded); None values are "not given"
                (("lr",), 0.0, True), (("lr_min", "weight_decay", "grad_clip", "router_lr", "sar_beta"), 0.0, False),
                (("batch_size", "epochs", "dist_timeout", "max_prompt_len", "max_len", "log_every", "ka_m",
                  "gen_batch_size", "kl_chunk", "grad_accum", "global_batch_size", "max_steps", "stop_after",
                  "dev_size", "dev_num", "eval_batch_size", "synthetic_train", "synthetic_dev"), 1, False),
                (("warmup_steps", "save_every"), 0, False)):
            for name in names:
                value = getattr(self, name)
                if value is not None and not (math.isfinite(value) and (value > low if strict else value >= low)):
                    raise MoekdError(f"--{name.replace('_', '-')} must be {'>' if strict else '>='} {low:g} "
                                     f"and finite, got {value}")
        if self.max_prompt_len >= self.max_len:
            raise MoekdError(f"--max-prompt-len ({self.max_prompt_len}) must be < --max-len ({self.max_len})")
        if self.grad_accum is None and self.global_batch_size is None:
            self.grad_accum = 1  # with --global-batch-size, split_global_batch() sets it from the device count
        if self.resume and self.overwrite:
            raise MoekdError("--resume and --overwrite contradict each other")
        if self.out is None:
            self.out = default_out(self.method, self.model)


# `--tiny`: everything a laptop CPU needs for an end-to-end run in a minute or two.
TINY_PRESET = dict(model=str(HERE / "tiny_moe" / "student"), teacher=str(HERE / "tiny_moe"),
                   data="synthetic", lr=3e-3, epochs=8, batch_size=16, max_prompt_len=96,
                   max_len=128, log_every=20, dev_num=64, warmup_steps=10)


# Flags that apply to some methods only: one row per flag, Config field -> the methods that use it. Given
# explicitly with any other method, a flag is an error. Flags without a row apply to every method.
DISTILL = tuple(m for m in METHODS if m != "sft")
METHOD_FLAGS: dict[str, tuple[str, ...]] = {
    "teacher": DISTILL,
    "teacher_routers": DISTILL,
    "teacher_device": DISTILL,
    "shard_teacher": DISTILL,
    "kl_chunk": DISTILL,
    "gen_batch_size": ON_POLICY,
    "kd_ratio": ("kd", "ka-gold"),
    "teacher_k": ("kd", "gkd"),
    "teacher_top_p": ("kd", "gkd"),
    "ka_m": ("ka", "ka-gold"),
    "ka_lambda": ("ka", "ka-gold"),
    "ka_k": ("ka", "ka-gold"),
    "ka_updates": ("ka",),
    "router_lr": ("sar",),
    "sar_beta": ("sar",),
    "sar_kl": ("sar",),
}


def check_method_flags(method: str, given: dict) -> None:
    wrong = [f"--{k.replace('_', '-')} ({'/'.join(METHOD_FLAGS[k])} only)"
             for k in given if method not in METHOD_FLAGS.get(k, (method,))]
    if wrong:
        raise MoekdError(f"--method {method} does not use {', '.join(wrong)}")


def parse_config(argv: list[str] | None = None) -> Config:
    """CLI generated from Config's fields; explicit flags > --tiny preset > paper defaults. With --resume,
    the run's saved config (run.json) replaces preset and defaults; explicit flags must agree with it
    (except RESUME_MAY_CHANGE)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        shown = "" if f.default is None else f" (default: {f.default})"
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
        values = {**saved_config(values, given), **given}
    check_method_flags(values.get("method", "sft"), given)
    return Config(**values)


def default_out(method: str, model: str) -> str:
    return str(Path("runs") / f"{method}-{Path(model.rstrip('/')).name}")


def saved_config(values: dict, given: dict) -> dict:
    """The config of the run a --resume continues (its run.json); every explicit flag that differs from it,
    other than RESUME_MAY_CHANGE, is listed in one error."""
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    out = Path(values.get("out") or default_out(values.get("method", "sft"), values.get("model", fields["model"])))
    if not (out / "run.json").is_file():
        raise MoekdError(f"--out {out}: no run.json, not a moekd run to resume")
    try:
        saved = json.loads((out / "run.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoekdError(f"{out / 'run.json'}: unreadable ({e})") from None
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1  # one process shards nothing
    once = {"stop_after", "resume", "overwrite"} | ({"shard_teacher", "shard_student"} if single else set())
    saved = {k: v for k, v in saved.items() if k in fields and k not in once}  # `once`: this invocation's own
    if saved.get("global_batch_size") is not None and "grad_accum" not in given:
        saved["grad_accum"] = None  # split_global_batch() derives it for this launch's device count
    differ = [f"--{k.replace('_', '-')} {v!r} (run: {saved.get(k, fields[k])!r})" for k, v in given.items()
              if k not in RESUME_MAY_CHANGE and v != saved.get(k, fields[k])]
    if differ:
        raise MoekdError(f"--resume: {'; '.join(differ)} differ from the run being resumed; --resume continues "
                         f"with the run's config (run.json), pass only flags that may change")
    return {**saved, "out": str(out)}


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MoekdError(f"{flag} {name}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoekdError(f"{flag} {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------
# Data: Dolly, MiniLLM jsonl, and a synthetic instruction set

def format_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca-style template of MiniLLM / MoEKD (spec §6), byte-exact."""
    if context:
        return ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MoekdError(f"{path}: no such file")
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MoekdError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoekdError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise MoekdError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(to_example(row, where=f"{path}:{lineno}"))
    if not rows:
        raise MoekdError(f"{path}: empty file, no examples")
    return rows


def to_example(row: dict, *, where: str) -> dict:
    """One row -> {prompt, responses}: raw Dolly (instruction/context/response) or MiniLLM (prompt/output)."""
    if "prompt" in row and "output" in row:
        outputs = row["output"] if isinstance(row["output"], list) else [row["output"]]
        if not isinstance(row["prompt"], str) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise MoekdError(f"{where}: 'prompt' must be a string and 'output' a string or list of strings")
        return {"prompt": row["prompt"], "responses": outputs}
    if "instruction" in row and "response" in row:
        for key in ("instruction", "response", "context", "input"):
            if key in row and not isinstance(row[key], str):
                raise MoekdError(f"{where}: field {key!r} must be a string, got {json.dumps(row[key])[:40]}")
        context = row.get("context") or row.get("input") or ""
        return {"prompt": format_prompt(row["instruction"], context), "responses": [row["response"]]}
    raise MoekdError(f"{where}: need fields instruction/response (Dolly) or prompt/output (MiniLLM), "
                     f"got {sorted(row)}")


def load_dolly_hub(name: str = DOLLY_HUB) -> list[dict]:
    try:
        import datasets
        table = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, ...
        raise MoekdError(f"--data {name}: could not load from the hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass a local jsonl") from None
    return [to_example(dict(r), where=f"{name}[{i}]") for i, r in enumerate(table)]


def load_splits(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train, dev) examples as {prompt, responses}.

    Raw Dolly-15k (hub or a raw-schema file) without --dev-data follows MiniLLM's split:
    rows 0-499 are the test set (shared/data/dolly/valid.jsonl), the next 1000 are dev,
    the rest train. Otherwise dev is --dev-data, a folder's dev.jsonl, or the first
    --dev-size rows (the official processing's first-1000-lines-are-valid rule)."""
    if cfg.data == "synthetic":
        train = [to_example(r, where="synthetic") for r in synthetic_rows(cfg.synthetic_train, seed=cfg.seed)]
        dev = [to_example(r, where="synthetic") for r in synthetic_rows(cfg.synthetic_dev, seed=cfg.seed + 1)]
        return train, (load_examples(cfg.dev_data) if cfg.dev_data else dev)
    raw_dolly = cfg.data == DOLLY_HUB
    if raw_dolly:
        rows = load_dolly_hub(cfg.data)
    else:
        path = Path(cfg.data)
        if path.is_dir():
            rows = read_jsonl(path / "train.jsonl") if (path / "train.jsonl").exists() else None
            if rows is None:
                raise MoekdError(f"--data {path}: folder has no train.jsonl")
            if cfg.dev_data is None and (path / "dev.jsonl").exists():
                return rows, read_jsonl(path / "dev.jsonl")
        elif not path.exists():
            raise MoekdError(f"--data {path}: no such file or folder (or use 'synthetic' / {DOLLY_HUB})")
        else:
            rows = read_jsonl(path)
            raw_dolly = _is_raw_dolly_file(path)
    if cfg.dev_data is not None:
        return rows, load_examples(cfg.dev_data)
    skip, n_dev = (500, 1000) if raw_dolly else (0, cfg.dev_size)
    if len(rows) <= skip + n_dev:
        raise MoekdError(f"--data {cfg.data}: {len(rows)} rows leave no training rows after holding out "
                         f"{skip} test + {n_dev} dev rows; pass --dev-data or a smaller --dev-size")
    return rows[skip + n_dev:], rows[skip:skip + n_dev]


def _is_raw_dolly_file(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = json.loads(next(line for line in f if line.strip()))
    return {"instruction", "context", "response", "category"} <= set(first)


def load_examples(source: str) -> list[dict]:
    path = Path(source)
    if path.is_dir():
        for name in ("dev.jsonl", "valid.jsonl"):
            if (path / name).exists():
                return read_jsonl(path / name)
        raise MoekdError(f"--dev-data {path}: folder has no dev.jsonl or valid.jsonl")
    if not path.exists():
        raise MoekdError(f"--dev-data {path}: no such file or folder")
    return read_jsonl(path)


# Synthetic instruction families with short verifiable answers, so the tiny default runs anywhere.
# Facts ("which city does X live in") come from a fixed table of 240 made-up people shared by every
# split: closed-book knowledge, which a bigger model memorises better; the other families are skills
# over small spaces (arithmetic on 1..20, copying, counting, spelling, reading a colour from a context).
_WORDS = ("apple river stone cloud tiger piano garden rocket silver candle forest mirror violet "
          "window planet dragon ocean castle lemon falcon bridge copper meadow pepper").split()
_COLORS = "red blue green yellow black white orange purple".split()
_OBJECTS = "cup hat ball book lamp coat box key".split()
_SYLLABLES = "ka lo mi ra tu ve zo pe ni sa do ru".split()


def _fact_table() -> list[tuple[str, str]]:
    rng = random.Random(1234)  # fixed: the same facts in every split and seed
    def name() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
    cities = [name() for _ in range(12)]
    return [(name(), rng.choice(cities)) for _ in range(240)]


def synthetic_rows(n: int, *, seed: int) -> list[dict]:
    """n Dolly-schema rows (instruction, context, response, category), deterministic in seed."""
    rng, facts = random.Random(seed), _fact_table()
    def nums(k: int, hi: int = 20) -> list[int]:
        return [rng.randint(1, hi) for _ in range(k)]
    def words(k: int) -> list[str]:
        return [rng.choice(_WORDS) for _ in range(k)]
    def add():
        a, b = nums(2)
        return "Add the two numbers.", f"{a} and {b}", str(a + b)
    def reverse():
        w = words(rng.randint(3, 5))
        return "Reverse the order of the words.", " ".join(w), " ".join(reversed(w))
    def sort():
        x = nums(rng.randint(3, 5))
        return "Sort the numbers from smallest to largest.", ", ".join(map(str, x)), ", ".join(map(str, sorted(x)))
    def count():
        w = words(rng.randint(2, 9))
        return "How many words are in the text?", " ".join(w), str(len(w))
    def spell():
        w = rng.choice(_WORDS)
        return "Spell the word with dashes between the letters.", w, "-".join(w)
    def sequence():
        a, d = rng.randint(1, 10), rng.randint(2, 5)
        return ("Continue the sequence with the next two numbers.", ", ".join(str(a + d * i) for i in range(3)),
                f"{a + 3 * d}, {a + 4 * d}")
    def lookup():
        people = rng.sample([p for p, _ in facts], 3)
        items = [(p, rng.choice(_COLORS), rng.choice(_OBJECTS)) for p in people]
        p, c, o = rng.choice(items)
        return f"What color is {p}'s {o}?", " ".join(f"{a} has a {b} {c_}." for a, b, c_ in items), c
    def fact():
        p, city = rng.choice(facts)
        return f"Which city does {p} live in?", "", city
    families = {f.__name__: f for f in (add, reverse, sort, count, spell, sequence, lookup, fact)}
    rows = []
    for _ in range(n):
        category = rng.choice(sorted(families))
        instruction, context, response = families[category]()
        rows.append(dict(instruction=instruction, context=context, response=response, category=category))
    return rows


def tokenize_example(tokenizer, prompt: str, response: str, *, max_prompt_len: int, max_len: int) -> dict | None:
    """Token ids + labels for teacher forcing; None when the prompt is over max_prompt_len (dropped).

    As the official processing (tools/process_data_dolly.py): prompt and response are tokenized
    *together* and the response ids are the joint ids after the prompt's length, so a SentencePiece
    tokenizer does not give the response a word-initial "▁" it never has after "### Response:\n". No BOS,
    EOS appended, truncation to max_len, prompt labels -100. Labels come from lengths, never from
    `token == pad`, so the final EOS stays a label even though pad == eos (TRL PR #6357).
    `prefix_ok` is False when the prompt's own ids are not a prefix of the joint ids (a merge across
    the boundary); the official slice is kept all the same and such rows are counted in the data log."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if len(prompt_ids) > max_prompt_len:
        return None
    joint = tokenizer.encode(prompt + response, add_special_tokens=False)
    response_ids = joint[len(prompt_ids):] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_len]
    return {"input_ids": input_ids, "labels": labels, "prompt_ids": prompt_ids,
            "prefix_ok": joint[:len(prompt_ids)] == prompt_ids}


def tokenize_examples(tokenizer, examples: list[dict], cfg: Config, *, name: str) -> list[dict]:
    out, dropped, empty, merged = [], 0, 0, 0
    for ex in examples:
        if not ex["responses"][0].strip():  # nothing to learn or to score against
            empty += 1
            continue
        item = tokenize_example(tokenizer, ex["prompt"], ex["responses"][0],
                                max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len)
        if item is None:
            dropped += 1
            continue
        merged += not item.pop("prefix_ok")
        out.append({**item, "responses": ex["responses"]})
    print(f"data {name}: {len(out)} examples kept, {dropped} dropped with prompts over "
          f"{cfg.max_prompt_len} tokens, {empty} dropped with empty responses, {merged} whose prompt tokens "
          f"merge into the response (kept, split at the prompt's length as the official processing)")
    if not out:
        raise MoekdError(f"data {name}: no examples left ({dropped} prompts longer than --max-prompt-len "
                         f"{cfg.max_prompt_len}, {empty} empty responses)")
    return out


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids [B, T] (pad), labels [B, T] (-100), attention_mask [B, T]."""
    width = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: input_ids [B, T], attention_mask [B, T]."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A fixed permutation per (seed, epoch): the data position is just the step number."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ----------------------------------------------------------------------------
# Llama-MoE (pjlab-sys4nlp/llama-moe) on a transformers-5 Llama backbone.
# Pure tensor pieces first (copy-able), then the modules holding the checkpoint's parameters.

def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var/mean^2 with torch's *unbiased* variance (official gate)."""
    if x.numel() <= 1:
        return x.new_zeros((), dtype=torch.float32)
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def routing_weights(logits: torch.Tensor, index: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Llama-MoE weights: softmax over the *selected* (kept) logits only, in fp32, cast back: [N, K]."""
    chosen = logits.gather(1, index).float()
    if keep is not None:
        chosen = chosen.masked_fill(~keep, -math.inf)
    return torch.softmax(chosen, dim=-1).to(logits.dtype)


def smooth_load(clean: torch.Tensor, noise: torch.Tensor, noise_std: torch.Tensor,
                top_values: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al.'s differentiable load, Sum_t P(expert e stays in the top-k) -> [E].

    As the official Llama-MoE gate: `is_in` compares the *noise term* (not the noisy logit)
    with the (k+1)-th largest noisy logit; that quirk is kept on purpose."""
    normal = torch.distributions.Normal(0.0, 1.0)
    threshold_in = top_values[:, k:k + 1]       # [N, 1], (k+1)-th largest noisy logit
    threshold_out = top_values[:, k - 1:k]      # [N, 1], k-th largest
    prob_in = normal.cdf((clean - threshold_in) / noise_std)
    prob_out = normal.cdf((clean - threshold_out) / noise_std)
    return torch.where(noise > threshold_in, prob_in, prob_out).sum(0)


def llama_moe_balance_loss(importance: torch.Tensor, load: torch.Tensor, weight: float) -> torch.Tensor:
    """w * (cv^2(importance) + cv^2(load)), one layer's balance loss."""
    return weight * (cv_squared(importance) + cv_squared(load))


class LlamaMoEGate(nn.Module):
    """TopKBalancedNoisyGate: keys gate.gate_network.{0,2}.weight (mlp) or gate.gate_network.weight
    (linear), gate.weight_noise.weight. forward(x [N, H]) -> (index [N, K], weights [N, K])
    and stores this call's balance loss in `self.balance_loss`."""

    def __init__(self, hidden_size: int, num_experts: int, num_selects: int, *, gate_network: str,
                 add_noise: bool, noise_epsilon: float, use_balance: bool, balance_loss_weight: float):
        super().__init__()
        E = num_experts
        if gate_network == "mlp":  # Linear -> Tanh -> Linear, no biases (index 1 is the Tanh)
            self.gate_network = nn.Sequential(nn.Linear(hidden_size, E, bias=False), nn.Tanh(),
                                              nn.Linear(E, E, bias=False))
        else:
            self.gate_network = nn.Linear(hidden_size, E, bias=False)
        self.weight_noise = nn.Linear(hidden_size, E, bias=False) if add_noise else None
        self.num_experts, self.top_k = E, num_selects
        self.add_noise, self.noise_epsilon = add_noise, noise_epsilon
        self.use_balance, self.balance_loss_weight = use_balance, balance_loss_weight
        self.balance_loss: torch.Tensor | None = None
        self.routing = None  # moekd's router protocol: None = native top-k, else (logits, k) -> (index, keep)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = self.gate_network(x)                                    # [N, E]
        noise = noise_std = None
        if self.training and self.add_noise:  # noise only in train mode (official)
            noise_std = F.softplus(self.weight_noise(x)) + self.noise_epsilon
            noise = torch.randn_like(clean) * noise_std
        logits = clean if noise is None else clean + noise
        if self.routing is None:  # the official top-k: the first k of topk(k + 1)
            index, keep = logits.topk(min(self.top_k + 1, self.num_experts), dim=-1).indices[:, :self.top_k], None
        else:
            index, keep = self.routing(logits, self.top_k)               # [N, K]
        weights = routing_weights(logits, index, keep)                   # [N, K]
        k = index.shape[1]
        if self.use_balance:
            full = torch.zeros_like(logits).scatter(1, index, weights)  # [N, E]
            importance = full.sum(0)
            top_k_mode = self.routing is None or self.routing.mode == "topk"
            if noise is not None and k < self.num_experts and top_k_mode:
                top_values = logits.topk(k + 1, dim=-1).values
                load = smooth_load(clean, noise, noise_std, top_values, k)
            else:
                load = (full > 0).sum(0)  # hard count, no gradient
            self.balance_loss = llama_moe_balance_loss(importance, load, self.balance_loss_weight)
        else:
            self.balance_loss = None
        return index, weights


class LlamaMoEExperts(nn.Module):
    """SwiGLU experts of per-expert sizes s_j: keys weight_gate.j [s_j, H], weight_up.j [s_j, H],
    weight_down.j [H, s_j] (nn.ParameterLists, as the checkpoints)."""

    def __init__(self, hidden_size: int, sizes: list[int]):
        super().__init__()
        H = hidden_size
        self.weight_gate = nn.ParameterList([nn.Parameter(torch.empty(s, H)) for s in sizes])
        self.weight_up = nn.ParameterList([nn.Parameter(torch.empty(s, H)) for s in sizes])
        self.weight_down = nn.ParameterList([nn.Parameter(torch.empty(H, s)) for s in sizes])

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.weight_gate[j])) * F.linear(x, self.weight_up[j]),
                        self.weight_down[j])


class LlamaMoECalculator(nn.Module):
    """UniversalCalculator: y = Sum_{j in selected} weight_j * score_scale_factor * expert_j(x)."""

    def __init__(self, hidden_size: int, sizes: list[int], score_scale_factor: float):
        super().__init__()
        self.experts = LlamaMoEExperts(hidden_size, sizes)
        self.score_scale_factor = score_scale_factor

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        E = len(self.experts.weight_gate)
        if index.shape[1] == E:
            return self.all_experts(x, index, weights)
        y = torch.zeros_like(x)                                         # [N, H]
        for j in range(E):
            token, slot = (index == j).nonzero(as_tuple=True)          # tokens routed to expert j
            if token.numel() == 0:
                continue
            scale = (weights[token, slot] * self.score_scale_factor).unsqueeze(1)
            y.index_add_(0, token, (self.experts.expert(j, x[token]) * scale).to(y.dtype))
        return y


    def all_experts(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token (ALL, SAR, k = N): the experts are slices of one SwiGLU FFN, so
        three matmuls over the concatenated weights replace the per-expert loop; each expert's hidden
        units are scaled by its routing weight before the down projection."""
        ex = self.experts
        sizes = torch.tensor([w.shape[0] for w in ex.weight_gate], device=x.device)
        full = torch.zeros(x.shape[0], len(sizes), dtype=weights.dtype, device=x.device).scatter(1, index, weights)
        scale = (full * self.score_scale_factor).repeat_interleave(sizes, dim=1)          # [N, I]
        hidden = F.silu(F.linear(x, torch.cat(list(ex.weight_gate)))) * F.linear(x, torch.cat(list(ex.weight_up)))
        return F.linear((hidden * scale).to(x.dtype), torch.cat(list(ex.weight_down), dim=1))


class LlamaMoELayer(nn.Module):
    """LinearGLUMoELayer, the MLP of every Llama-MoE decoder layer (key prefix `mlp.`)."""

    def __init__(self, moe_config: dict, layer_idx: int):
        super().__init__()
        c = moe_config
        self.gate = LlamaMoEGate(c["hidden_size"], c["num_experts"], c["num_selects"],
                                 gate_network=c["gate_network"], add_noise=c["gate_add_noise"],
                                 noise_epsilon=c["gate_noise_epsilon"], use_balance=c["gate_use_balance"],
                                 balance_loss_weight=c["gate_balance_loss_weight"])
        self.calculator = LlamaMoECalculator(c["hidden_size"], expert_sizes(c, layer_idx),
                                             layer_value(c["score_scale_factor"], layer_idx))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(B * T, H)  # the gate sees pad tokens too (official)
        index, weights = self.gate(x)
        return self.calculator(x, index, weights).view(B, T, H)


LLAMA_MOE_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_experts", "num_selects")
LLAMA_MOE_DEFAULTS = dict(  # LlamaMoEConfig's defaults for the optional fields
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    rope_scaling=None, attention_bias=False, size_experts=None, gate_type="TopKBalancedNoisyGate",
    gate_network="mlp", gate_use_softmax=True, gate_use_balance=True, gate_balance_loss_weight=1e-2,
    gate_add_noise=True, gate_noise_epsilon=1e-2, calculator_type="UniversalCalculator",
    multiply_gate_scores=True, score_scale_factor=1.0)


def layer_value(value, layer_idx: int):
    """A config value that is either one scalar or a per-layer list."""
    return value[layer_idx] if isinstance(value, list) else value


def expert_sizes(c: dict, layer_idx: int) -> list[int]:
    """Per-expert hidden sizes of one layer: size_experts[layer] or an even split of intermediate_size."""
    if c["size_experts"] is None:
        return [c["intermediate_size"] // c["num_experts"]] * c["num_experts"]
    return list(c["size_experts"][layer_idx])


def check_llama_moe_config(raw: dict, *, where: str) -> dict:
    """Complete a llama_moe config.json with LlamaMoEConfig's defaults; reject what we can't run."""
    missing = [k for k in LLAMA_MOE_REQUIRED if k not in raw]
    if missing:
        raise MoekdError(f"{where}: Llama-MoE config is missing required field(s) {', '.join(missing)}")
    c = {**LLAMA_MOE_DEFAULTS, **raw}
    unsupported = {"gate_type": "TopKBalancedNoisyGate", "calculator_type": "UniversalCalculator",
                   "gate_use_softmax": True, "multiply_gate_scores": True, "hidden_act": "silu",
                   "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False}
    for key, supported in unsupported.items():
        if c[key] != supported:
            raise MoekdError(f"{where}: {key}={c[key]!r} is not supported (only {supported!r})")
    if c["gate_network"] not in ("mlp", "linear"):
        raise MoekdError(f"{where}: gate_network must be 'mlp' or 'linear', got {c['gate_network']!r}")
    L, E = c["num_hidden_layers"], c["num_experts"]
    if not 1 <= c["num_selects"] <= E:
        raise MoekdError(f"{where}: num_selects={c['num_selects']} must be in [1, num_experts={E}]")
    if isinstance(c["score_scale_factor"], list) and len(c["score_scale_factor"]) != L:
        raise MoekdError(f"{where}: score_scale_factor has {len(c['score_scale_factor'])} entries, "
                         f"need one per layer ({L})")
    if c["size_experts"] is None:
        if c["intermediate_size"] % E:
            raise MoekdError(f"{where}: intermediate_size {c['intermediate_size']} is not divisible by "
                             f"num_experts {E}; give size_experts")
    elif len(c["size_experts"]) != L or any(
            len(s) != E or sum(s) != c["intermediate_size"] for s in c["size_experts"]):
        raise MoekdError(f"{where}: size_experts must be {L} lists of {E} sizes summing to "
                         f"intermediate_size {c['intermediate_size']}")
    return c


def llama_config_from_moe(c: dict):
    """The transformers LlamaConfig of the dense backbone. RoPE base 10000 is hard-coded in
    Llama-MoE (its configs carry no rope_theta)."""
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], hidden_act="silu",
        max_position_embeddings=c["max_position_embeddings"], initializer_range=c["initializer_range"],
        rms_norm_eps=c["rms_norm_eps"], pad_token_id=c["pad_token_id"], bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build_llama_moe(moe_config: dict, *, device: torch.device | str = "cpu", dtype=torch.float32,
                    init_seed: int | None = None) -> nn.Module:
    """A transformers LlamaForCausalLM whose layers[i].mlp is a LlamaMoELayer.

    Built on the meta device (no time or memory spent on the dense MLPs it replaces), then
    materialised on `device`; with `init_seed` the weights are drawn like Llama's init
    (normal(0, initializer_range), norms 1), else left empty for a checkpoint to fill."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = llama_config_from_moe(moe_config)
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
            for i, layer in enumerate(model.model.layers):
                layer.mlp = LlamaMoELayer(moe_config, i)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    with torch.device(device):  # non-persistent RoPE buffers were lost on meta
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.moe_config = moe_config
    if init_seed is not None:
        g = torch.Generator(device="cpu").manual_seed(init_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * moe_config["initializer_range"])
    return model


def moe_balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over layers of the balance losses stored by the last forward (LlamaMoEModel's sum)."""
    losses = [m.balance_loss for m in model.modules()
              if isinstance(m, LlamaMoEGate) and m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else None


# ----------------------------------------------------------------------------
# Loading and saving models (safetensors out; .bin read only with torch's weights-only unpickler)

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


def local_model_dir(name_or_path: str, *, what: str = "--model") -> Path:
    """A local directory with config.json: the path itself, or a hub snapshot (config + weights)."""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise MoekdError(f"{what} {name_or_path}: directory has no config.json")
        return refuse_remote_code(path, what)
    try:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(name_or_path, allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "*.model", "*.txt"], ignore_patterns=["*.pth"]))
    except Exception as e:
        raise MoekdError(f"{what} {name_or_path}: not a local directory and not loadable from the hub "
                         f"({type(e).__name__})") from None
    return refuse_remote_code(path, what)


def refuse_remote_code(directory: Path, what: str) -> Path:
    """A model whose config.json or tokenizer_config.json has an `auto_map` needs its own Python code:
    an error before transformers sees it (which would ask whether to run it), so that code is never imported."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            raw = json.loads((directory / name).read_text()) if (directory / name).is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoekdError(f"{directory / name}: malformed JSON ({e})") from None
        if isinstance(raw, dict) and "auto_map" in raw:
            raise MoekdError(f"{what} {directory}: {name} has an auto_map, the model needs remote code, "
                             f"which moekd never runs")
    return directory


def load_tensors_only(path: Path, hint: str = "", **kw) -> dict:
    """torch.load with the weights-only unpickler: a pickle holding anything else is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError:
        raise MoekdError(f"{path}: refused, it pickles objects other than tensors{hint}") from None


def read_state_dict_files(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a checkpoint, one shard in memory at a time."""
    from safetensors.torch import load_file
    for name in WEIGHT_FILES:
        if (directory / name).exists():
            break
    else:
        raise MoekdError(f"{directory}: no weights ({' / '.join(WEIGHT_FILES)})")
    if name.endswith(".index.json"):
        shards = sorted(set(json.loads((directory / name).read_text())["weight_map"].values()))
    else:
        shards = [name]
    for shard in shards:
        if shard.endswith(".safetensors"):
            tensors = load_file(directory / shard)
        else:  # never unpickle arbitrary objects
            tensors = load_tensors_only(directory / shard, "; convert it to safetensors", mmap=True)
        yield from tensors.items()
        del tensors


def load_state_dict_strict(model: nn.Module, pairs: Iterator[tuple[str, torch.Tensor]], *, where: str,
                           partial: bool = False) -> None:
    """Copy every checkpoint tensor into the model; missing (unless `partial`), unexpected or mis-shaped
    keys are errors. Stray `rotary_emb.inv_freq` buffers of older checkpoints are ignored (recomputed)."""
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for key, tensor in pairs:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            if key not in params:
                raise MoekdError(f"{where}: unexpected checkpoint key {key}")
            if params[key].shape != tensor.shape:
                raise MoekdError(f"{where}: {key} has shape {tuple(tensor.shape)} in the checkpoint, "
                                 f"model expects {tuple(params[key].shape)}")
            params[key].copy_(tensor)
            seen.add(key)
    missing = sorted(set(params) - seen)
    if missing and not partial:
        raise MoekdError(f"{where}: checkpoint is missing {len(missing)} key(s), e.g. {missing[0]}")


def has_weights(directory: Path) -> bool:
    return any((directory / name).exists() for name in WEIGHT_FILES)


def load_model(name_or_path: str, *, device: torch.device | str = "cpu", dtype=torch.float32,
               what: str = "--model") -> nn.Module:
    """A causal LM in eval mode: Llama-MoE natively (no remote code), anything else via
    AutoModelForCausalLM. A local config with `moekd_init_seed` and no weights (tiny_moe/) is
    initialised from that seed."""
    directory = local_model_dir(name_or_path, what=what)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise MoekdError(f"{directory / 'config.json'}: malformed JSON ({e.msg})") from None
    init_seed = raw.get("moekd_init_seed") if not has_weights(directory) else None
    if not has_weights(directory) and init_seed is None:
        raise MoekdError(f"{what} {name_or_path}: no weights ({' / '.join(WEIGHT_FILES)})")
    if init_seed is not None:
        print(f"{what} {name_or_path}: no weights, initialising from moekd_init_seed={init_seed}")
    if raw.get("model_type") == "llama_moe":
        cfg = check_llama_moe_config(raw, where=str(directory / "config.json"))
        model = build_llama_moe(cfg, device=device, dtype=dtype, init_seed=init_seed)
        if init_seed is None:
            load_state_dict_strict(model, read_state_dict_files(directory), where=str(directory))
        return model.eval()
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        if init_seed is not None:
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(directory, trust_remote_code=False), dtype=dtype, trust_remote_code=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise MoekdError(f"{what} {name_or_path}: transformers cannot load it "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if torch.device(device).type == "cpu" and type(model)._can_set_experts_implementation():
        model.set_experts_implementation("eager")  # torch's CPU grouped_mm needs 16-byte-aligned sizes
    return model.to(device).eval()


def load_tokenizer(name_or_path: str, *, what: str = "--model"):
    """The model's tokenizer, pad = eos when it has none (as MoEKD for LLaMA)."""
    from transformers import AutoTokenizer
    directory = local_model_dir(name_or_path, what=what)
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json and warns that llama_moe is unknown
    try:
        with warnings.catch_warnings():  # ... and that Llama-MoE's `rope_scaling: null` is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise MoekdError(f"{what} {name_or_path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.eos_token_id is None:
        raise MoekdError(f"{what} {name_or_path}: tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocab(model: nn.Module, tokenizer, flag: str = "--model") -> None:
    """Every token id must index the model's embeddings (a bigger tokenizer fails deep inside torch)."""
    size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > size:
        raise MoekdError(f"{flag}: the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                         f"of {size}")


def save_model(model: nn.Module, tokenizer, directory: Path, *, max_shard_bytes: int = 5 * 2**30,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained-style output in `directory` (safetensors); load_model reads it back.
    `state_dict`: the weights to write instead of the model's own (a sharded model's gathered copy)."""
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if not hasattr(model, "moe_config"):
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar per checkpoint of a tiny model is noise
        try:
            model.save_pretrained(directory, state_dict=state_dict)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        return
    from safetensors.torch import save_file
    c = {k: v for k, v in model.moe_config.items() if k != "moekd_init_seed"}
    c.update(model_type="llama_moe", architectures=["LlamaMoEForCausalLM"],
             torch_dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def enable_checkpointing(model: nn.Module, what: str) -> None:
    """Activation checkpointing of every decoder layer: transformers' own, non-reentrant (so it composes
    with DDP and FSDP2), and the recomputation replays the RNG state, so gate noise is the same."""
    try:
        model.activation_checkpointing_enable()
    except (ValueError, AttributeError):
        raise MoekdError(f"--grad-checkpointing: {what} ({type(model).__name__}) does not support it") from None


# ----------------------------------------------------------------------------
# Routing control: one mechanism for every supported MoE teacher (KA sampling, ALL, SAR, k-sweeps)

# The router protocol: every MoE layer has a router module with `num_experts` and `top_k`. A router that
# has a `routing` attribute (moekd's Llama-MoE gate) routes by it itself: None = native, else a callable
# (logits [N, E], native k) -> (index [N, K], kept slots [N, K] or None), and applies its own weight rule.
# A transformers-5 router, forward(h) -> (router_logits [N, E], weights [N, K], index [N, K]), gets its
# forward replaced for the block's duration; its weights stay softmax(logits) in fp32 at the chosen experts.
# name -> (family, renormalise?, cast back?)
HF_ROUTERS = {
    "MixtralTopKRouter": ("Mixtral", True, False),
    "Qwen2MoeTopKRouter": ("Qwen2-MoE", None, True),   # None: the router's own norm_topk_prob
    "Qwen3MoeTopKRouter": ("Qwen3-MoE", None, True),
    "OlmoeTopKRouter": ("OLMoE", None, True),
}


@dataclass(frozen=True)
class Routing:
    """How every MoE layer picks experts (see `moe_routing`); calling it on router logits [N, E] and the
    router's native k gives (expert index [N, K], kept slots [N, K] or None).

    mode  "topk": the k largest router logits (k=None: the model's native k);
          "sample": KA, per token the top-k set is replaced, with probability `prob`, by k experts drawn
                    without replacement from softmax(router logits) (prob=None: always the drawn set);
          "topp": the official gate's top-p routing: per token the smallest set of most probable experts
                  whose softmax mass exceeds `top_p` (at least one);
          "all": every expert, weights = softmax over all E logits."""
    mode: str = "topk"
    k: int | None = None
    prob: float | None = None
    generator: torch.Generator | None = None
    top_p: float | None = None

    def __call__(self, logits: torch.Tensor, native_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return select_experts(logits, self, native_k)

    def __post_init__(self):
        if self.mode not in ("topk", "sample", "topp", "all"):
            raise MoekdError(f"routing mode must be topk, sample, topp or all, got {self.mode!r}")
        if self.prob is not None and not 0.0 <= self.prob <= 1.0:
            raise MoekdError(f"routing: sampling probability must be in [0, 1], got {self.prob}")
        if (self.mode == "topp") != (self.top_p is not None) or not 0.0 <= (self.top_p or 0.0) <= 1.0:
            raise MoekdError(f"routing: mode topp needs top_p in [0, 1] (and only it), got {self.top_p}")



def sample_experts(logits: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """k distinct experts per row drawn without replacement from softmax(logits): [N, E] -> [N, K]."""
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), k, replacement=False, generator=generator)


def top_p_experts(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts by falling logit [N, K] and which of them are kept [N, K]: as the official gate, the first
    expert always and each next one while the softmax mass before it is <= p. K is the largest kept
    set of the batch; rows with fewer keep their other experts at weight 0 (no effect on the output)."""
    values, index = logits.sort(dim=-1, descending=True)
    mass_before = torch.softmax(values.float(), dim=-1).cumsum(-1)
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[:, 1:] = mass_before[:, :-1] <= p
    k = int(keep.sum(-1).max())
    return index[:, :k], keep[:, :k]


def select_experts(logits: torch.Tensor, routing: Routing, native_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expert indices [N, K] under a routing policy, and which slots count (None: all; only "topp" has
    slots at weight 0). As the official gate: the top set is the first k of topk(k+1); in "sample" mode
    S and T are both drawn and one uniform per token picks S if u < prob."""
    N, E = logits.shape
    if routing.mode == "all":
        return torch.arange(E, device=logits.device).expand(N, E), None
    if routing.mode == "topp":
        return top_p_experts(logits, routing.top_p)
    k = routing.k or native_k
    top = logits.topk(min(k + 1, E), dim=-1).indices[:, :k]
    if routing.mode == "topk":
        return top, None
    sampled = sample_experts(logits, k, generator=routing.generator)
    if routing.prob is None:
        return sampled, None
    u = torch.rand((N, 1), generator=routing.generator, device=logits.device)
    return torch.where(u < routing.prob, sampled, top), None


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The router of every MoE layer (a `gate` or `router` beside `experts`, or one that follows the
    `routing` protocol); an MoE family whose router we cannot steer is an error, never left native."""
    routers = []
    for block in model.modules():
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        if not isinstance(router, nn.Module) or not (hasattr(block, "experts") or hasattr(router, "routing")):
            continue
        if not hasattr(router, "routing") and type(router).__name__ not in HF_ROUTERS:
            family = getattr(getattr(model, "config", None), "model_type", "?")
            raise MoekdError(f"MoE family {family!r} ({type(router).__name__}) is not supported for routing "
                             f"control; supported: Llama-MoE, " + ", ".join(f for f, _, _ in HF_ROUTERS.values()))
        routers.append(router)
    if not routers:
        raise MoekdError(f"{type(model).__name__} has no MoE layers")
    return routers


def num_experts(model: nn.Module) -> int:
    return moe_routers(model)[0].num_experts


def native_top_k(model: nn.Module) -> int:
    """Experts per token of the model's own routing."""
    return moe_routers(model)[0].top_k


def hf_routed_forward(router: nn.Module, routing: Routing, hidden_states: torch.Tensor):
    """A transformers router's forward under `routing`: same logits, same weight rule as the family
    (softmax probabilities at the chosen experts, renormalised where the family renormalises)."""
    _, renorm, cast = HF_ROUTERS[type(router).__name__]
    renorm = router.norm_topk_prob if renorm is None else renorm
    h = hidden_states.reshape(-1, router.hidden_dim)
    logits = F.linear(h, router.weight)                                 # [N, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    index, keep = routing(logits, router.top_k)                         # [N, K]
    weights = probs.gather(1, index)
    if keep is not None:
        weights = weights * keep
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype) if cast else weights, index


@contextlib.contextmanager
def moe_routing(model: nn.Module, mode: str = "topk", *, k: int | None = None, prob: float | None = None,
                generator: torch.Generator | None = None, top_p: float | None = None) -> Iterator[list[nn.Module]]:
    """Change how every MoE layer of `model` routes inside the block; the original behaviour is restored
    on exit, also on exceptions. Yields the routers. See `Routing` for the modes."""
    routing = Routing(mode, k, prob, generator, top_p)
    routers = moe_routers(model)
    for r in routers:
        if k is not None and not 1 <= k <= r.num_experts:
            raise MoekdError(f"routing: k={k} is outside [1, {r.num_experts}] experts")
    saved = []
    try:
        for r in routers:
            if hasattr(r, "routing"):
                saved.append((r, "routing", r.routing))
                r.routing = routing
            else:
                saved.append((r, "forward", r.__dict__.get("forward")))
                r.forward = functools.partial(hf_routed_forward, r, routing)
        yield routers
    finally:
        for r, attr, value in reversed(saved):
            if value is None and attr == "forward":
                del r.forward
            else:
                setattr(r, attr, value)


def is_moe(model: nn.Module) -> bool:
    """Has MoE layers (routers beside experts, or protocol routers); unlike moe_routers, never raises."""
    return any((hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router"))) or
               (hasattr(m, "routing") and hasattr(m, "num_experts")) for m in model.modules())


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[list[tuple[nn.Module, Any]]]:
    """(router, its raw output) for every router call inside the block, in call order; hooks removed on exit."""
    records: list[tuple[nn.Module, Any]] = []
    handles = [r.register_forward_hook(lambda m, args, out: records.append((m, out))) for r in moe_routers(model)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the noise-free router logits [N, E] of every MoE layer, in layer order, for each forward
    run inside the block (Llama-MoE: the gate network's output, before any noise; transformers: the
    router's first output). Hooks are removed on exit."""
    records: list[torch.Tensor] = []
    def keep(module, args, out):
        records.append((out[0] if isinstance(out, tuple) else out).detach())
    handles = [getattr(r, "gate_network", r).register_forward_hook(keep) for r in moe_routers(model)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What SAR trains: Llama-MoE gate.gate_network + gate.weight_noise; transformers routers' weight."""
    return [p for r in moe_routers(model) for p in r.parameters()]


def router_balance_loss(records: list[tuple[nn.Module, Any]], beta: float) -> torch.Tensor:
    """SAR's balance term from the routers' outputs of one forward (record_routing): a Llama-MoE gate's own
    loss (its config weight, pads included as the official gate), summed over layers; for transformers
    routers beta * Sum_layers cv2(importance) + cv2(load) of the routing weights."""
    terms = []
    for router, out in records:
        if getattr(router, "balance_loss", None) is not None:
            terms.append(router.balance_loss)
            continue
        _, weights, index = out
        full = torch.zeros(index.shape[0], router.num_experts, dtype=weights.dtype, device=weights.device)
        full = full.scatter(1, index, weights)
        terms.append(beta * (cv_squared(full.sum(0)) + cv_squared((full > 0).sum(0))))
    return torch.stack(terms).sum()


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Permissions as plain open()/mkdir() give them (mkdtemp makes 0700 folders, safetensors 0600 files)."""
    mask = umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomically(directory: Path, write) -> None:
    """write(tmp_dir), then swap it into place: a crash never leaves a half-written `directory`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        write(tmp)
        apply_umask(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException as e:
        full = isinstance(e, Exception) and (isinstance(e, OSError) and e.errno == errno.ENOSPC or disk_full(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        if full:  # torch.save says "unexpected pos ..." on a full disk, safetensors its own error
            raise RunStopped(f"no space left on device writing {directory}") from None
        raise


def disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2**20


def write_json(path: Path, obj) -> None:
    """Strict JSON (NaN/inf refused), written to a temporary file and renamed into place."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise MoekdError(f"{path}: refusing to write a non-finite number (NaN/inf) into JSON") from None
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Losses (pure: logits in, scalar out; fp32 inside)

def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x where mask; `where`, not a product, so inf/nan at masked positions cannot leak."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position t is a loss position when its next token labels[t+1] is a response token.
    Kept [B, T] (last column False) so logits never need a non-contiguous [:, :-1] copy."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE per position: logits [B, T, V], labels [B, T] (-100 = ignore) -> [B, T].
    Position t predicts labels[t+1]; non-loss positions (and the last) give 0."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE summed over the loss positions (response tokens): the numerator of SFT's loss."""
    return masked_sum(token_cross_entropy(logits, labels), loss_mask(labels))


class _RowKL(torch.autograd.Function):
    """Mean over m of KL(softmax(a) || softmax(b_m)) for the rows `rows` of a [N, V], b [M, N, V] -> [N]
    fp32 (0 elsewhere). Because Sum_v p_a (log p_a - mean_m log p_bm) is exactly that mean, KA's M
    teacher passes cost one KL, not M.

    Exact over the vocabulary, fp32 inside, in chunks of rows: no full-vocabulary fp32 tensor of the
    whole batch is ever alive, and backward recomputes from the saved logits instead of keeping
    softmaxes. Gradients: dKL/da = p_a (log p_a - log p_b - KL), dKL/db = p_b - p_a (M = 1)."""

    @staticmethod
    def forward(ctx, a, b, rows, chunk, b_is_log_probs=False):
        out = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
        for idx in rows.split(chunk):
            out[idx] = _kl_rows(a[idx], b[:, idx], b_is_log_probs)
        ctx.save_for_backward(a, b, rows)
        ctx.chunk, ctx.b_is_log_probs = chunk, b_is_log_probs
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, rows = ctx.saved_tensors
        if ctx.needs_input_grad[1] and (b.shape[0] != 1 or ctx.b_is_log_probs):
            raise NotImplementedError("gradient for the averaged side of the KL")
        grad_a = torch.zeros_like(a) if ctx.needs_input_grad[0] else None
        grad_b = torch.zeros_like(b) if ctx.needs_input_grad[1] else None
        for idx in rows.split(ctx.chunk):
            kl, pa, diff = _kl_rows(a[idx], b[:, idx], ctx.b_is_log_probs, keep=True)
            g = grad[idx].unsqueeze(1)
            if grad_b is not None:
                grad_b[0, idx] = (g * (b[0, idx].float().softmax(-1) - pa)).to(b.dtype)
            if grad_a is not None:  # rows where p_a = 0 contribute nothing (diff was zeroed there)
                grad_a[idx] = diff.sub_(kl.unsqueeze(1)).mul_(pa).mul_(g).to(a.dtype)
        return grad_a, grad_b, None, None, None


def _kl_rows(a: torch.Tensor, b: torch.Tensor, b_is_log_probs: bool = False, *, keep: bool = False):
    """Rows of a [n, V] against b [M, n, V]: Sum_v p_a (log p_a - mean_m log p_bm), in fp32 with few
    full-width temporaries; keep=True also returns p_a and the log-ratio (zeroed where p_a = 0)."""
    diff = a.float().log_softmax(-1)
    pa = diff.exp()
    log_pb = b.float() if b_is_log_probs else b.float().log_softmax(-1)
    diff.sub_(log_pb[0] if b.shape[0] == 1 else log_pb.mean(0)).masked_fill_(pa == 0, 0.0)
    kl = (pa * diff).sum(-1)
    return (kl, pa, diff) if keep else kl


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor, *,
                 chunk: int = 256, q_is_log_probs: bool = False) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per position: logits [B, T, V], mask [B, T] -> [B, T] fp32, 0 where
    not mask. q may be [M, B, T, V]: then the mean over m of KL(p || q_m) (KA's M teacher passes);
    with q_is_log_probs, q already holds (mean) log-probabilities. Differentiable in p, and in q when it
    is one set of logits; -inf logits are fine (0 log 0 = 0)."""
    V = p_logits.shape[-1]
    if q_logits.shape[-1] != V:
        raise MoekdError(f"KL over different vocabularies: {V} vs {q_logits.shape[-1]} logits")
    q = q_logits.reshape(-1 if q_logits.dim() > p_logits.dim() else 1, mask.numel(), V)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return _RowKL.apply(p_logits.reshape(-1, V), q, rows, chunk, q_is_log_probs).view(mask.shape)


@torch.no_grad()
def mean_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the M passes of the log-softmax, [M, B, T, V] -> [B, T, V] fp32: computed once, so
    Sum_v q (log q - mean_m log p_m), the mean of KA's M reverse KLs, costs one KL whatever M is."""
    out = logits[0].float().log_softmax(-1)
    for m in range(1, logits.shape[0]):
        out += logits[m].float().log_softmax(-1)
    return out.div_(logits.shape[0])


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(q_student || p_teacher) = Sum_v q (log q - log p), mean over masked tokens (0 if none).
    The on-policy objective of GKD, ALL, KA and SAR (spec §3)."""
    return kl_per_token(student_logits, teacher_logits, mask).sum() / mask.sum().clamp_min(1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || q_student) = Sum_v p (log p - log q), mean over masked tokens (0 if none).
    (torch's F.kl_div(input, target) computes KL(target || input): the argument order is swapped.)"""
    return kl_per_token(teacher_logits, student_logits, mask).sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------
# Generation and dev evaluation

def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F1 x 100, max over references (rouge-score, stemmed: the paper's metric)."""
    from rouge_score import rouge_scorer
    scorer = _rouge_scorer_cache.get("s") or _rouge_scorer_cache.setdefault(
        "s", rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


_rouge_scorer_cache: dict = {}


def is_sharded(model: nn.Module) -> bool:
    """Is this an FSDP2 (fully_shard) model, whose forward is a collective over all ranks?"""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


class RowSeededSampler:
    """A transformers logits processor that turns greedy decoding into exact ancestral sampling with
    one random stream per row: argmax(logits + Gumbel noise) is a draw from softmax(logits) (the
    Gumbel-max trick), and row i's noise comes from its own generator seeded with seeds[i]. A row's
    response then depends on its seed, not on which batch, device or rank generated it."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]  # finished rows draw too, so each stream advances once per position
        u = torch.stack([torch.rand(V, generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
        return scores.float() + gumbel


@torch.no_grad()
def sample_tokens(model: nn.Module, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
                  batch_size: int, seeds: list[int] | None = None, desc: str = "generate", **options) -> list[list[int]]:
    """Sampled continuations of token-id prompts, left-padded in batches: top_k 0, top_p 1,
    temperature 1 (the paper's sampling), pure ancestral sampling, from the global torch RNG or, with
    `seeds` (one per prompt), from per-row streams (RowSeededSampler). The model's own
    generation_config (a checkpoint's temperature 0.6, repetition_penalty 1.1, ...) is not consulted:
    `options` (eval's no_repeat_ngram_size) are the only other settings. An FSDP-sharded model
    needs every rank in each forward, so its ranks keep stepping until all are done (synced_gpus)."""
    from tqdm import tqdm
    from transformers import GenerationConfig, LogitsProcessorList
    sampling = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0) if seeds is None else dict(do_sample=False)
    config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                              **options)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with neutral_generation_defaults(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=None):
            batch = {k: v.to(device) for k, v in collate_prompts(prompts[start:start + batch_size], pad_id).items()}
            extra = {} if seeds is None else {"logits_processor": LogitsProcessorList(
                [RowSeededSampler(seeds[start:start + batch_size], device)])}
            if is_sharded(model):
                extra["synced_gpus"] = True
            sequences = model.generate(**batch, generation_config=config, **extra)
            out.extend(sequences[:, batch["input_ids"].shape[1]:].tolist())
    model.train(was_training)
    return out


@contextlib.contextmanager
def neutral_generation_defaults(model: nn.Module) -> Iterator[None]:
    """transformers fills every decoding setting a call leaves unset from the model's own generation_config,
    so a checkpoint's repetition_penalty, no_repeat_ngram_size, min_length, bad_words_ids, forced or
    suppressed tokens would silently change the samples. Inside the block the model's defaults are the
    library's neutral ones: sampling is softmax(logits) plus exactly what the caller set."""
    from transformers import GenerationConfig
    saved = getattr(model, "generation_config", None)
    if saved is not None:
        model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        if saved is not None:
            model.generation_config = saved


def sample_responses(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                     batch_size: int, seed: int, desc: str = "generate", **options) -> list[str]:
    """Decoded sampled responses, seeded on their own: the global RNG is restored afterwards, so
    evaluating in the middle of training does not change the training run."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        rows = sample_tokens(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc, **options)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def response_through_eos(tokens: list[int], eos_id: int) -> list[int]:
    """A sampled response cut after its first EOS, which is kept (the student must learn to stop);
    one that never stopped gets its last token replaced by EOS, as the official code forces the last
    generated column to pad (= eos)."""
    if eos_id in tokens:
        return tokens[:tokens.index(eos_id) + 1]
    return tokens[:-1] + [eos_id]


def generate_on_policy(model: nn.Module, items: list[dict], tokenizer, cfg: Config,
                       seeds: list[int] | None = None) -> list[dict]:
    """On-policy training items (spec §3): the student samples a response to each prompt (left-padded,
    at most max_len - max_prompt_len new tokens; `seeds`: one random stream per row); the sequence is
    the gold prompt (no BOS) + response, truncated to max_len, with the prompt masked out of the labels."""
    eos = tokenizer.eos_token_id
    responses = sample_tokens(model, [it["prompt_ids"] for it in items], pad_id=tokenizer.pad_token_id,
                              eos_id=eos, max_new_tokens=cfg.max_len - cfg.max_prompt_len,
                              batch_size=cfg.gen_batch_size, seeds=seeds, desc="on-policy")
    out = []
    for it, row in zip(items, responses):
        prompt, response = it["prompt_ids"], response_through_eos(row, eos)
        out.append({"input_ids": (prompt + response)[:cfg.max_len],
                    "labels": ([-100] * len(prompt) + response)[:cfg.max_len]})
    return out


@torch.no_grad()
def evaluate_dev(model: nn.Module, tokenizer, dev: list[dict], cfg: Config, *, device, amp_dtype) -> dict:
    """Dev CE (token mean over gold responses) and dev ROUGE-L of sampled responses."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dev), cfg.eval_batch_size):
        batch = {k: v.to(device) for k, v in collate(dev[start:start + cfg.eval_batch_size],
                                                       tokenizer.pad_token_id).items()}
        with autocast(device, amp_dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += cross_entropy_sum(logits, batch["labels"]).item()
        count += int(loss_mask(batch["labels"]).sum())
    subset = dev[:cfg.dev_num] if cfg.dev_num else dev
    with autocast(device, amp_dtype):
        responses = sample_responses(model, tokenizer, [it["prompt_ids"] for it in subset],
                                     max_new_tokens=cfg.max_len - cfg.max_prompt_len,
                                     batch_size=cfg.eval_batch_size, seed=cfg.seed, desc="dev")
    scores = [rouge_l(r, it["responses"]) for r, it in zip(responses, subset)]
    return {"dev_loss": total / max(count, 1), "dev_rougeL": sum(scores) / len(scores)}


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast with fp32 master weights; a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ----------------------------------------------------------------------------
# Distributed training (torchrun): a DDP or FSDP2-sharded student, a replicated or FSDP2-sharded teacher.
# Every rank knows the whole global batch (rows are a pure function of seed and step) and works on its
# own contiguous share of it. All randomness is seeded from the position in the global batch: each
# row's on-policy sample from (seed, step, row), gate noise and KA draws from (seed, step, micro-batch).
# So a run does not depend on how its global batch is split over devices and accumulation, and
# resuming needs no RNG state.

@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def stream_seed(seed: int, step: int, index: int, stream: str) -> int:
    """Seed of one random stream: a hash of (run seed, step, index of the row or micro-batch in the
    global batch, stream name), so streams never collide and do not depend on the device count."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_global_batch(cfg: Config, world: int) -> int:
    """Set cfg.grad_accum from --global-batch-size (if given); returns the global batch, which must be
    batch_size x devices x grad_accum."""
    per_step = cfg.batch_size * world
    if cfg.global_batch_size is not None:
        accum, rest = divmod(cfg.global_batch_size, per_step)
        if rest or accum == 0:
            raise MoekdError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --batch-size "
                             f"{cfg.batch_size} x {world} device(s) = {per_step}")
        if cfg.grad_accum is not None and cfg.grad_accum != accum:
            raise MoekdError(f"--grad-accum {cfg.grad_accum} contradicts --global-batch-size {cfg.global_batch_size} "
                             f"(= {cfg.batch_size} x {world} device(s) x {accum})")
        cfg.grad_accum = accum
    return per_step * cfg.grad_accum


def init_distributed(cfg: Config) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (nccl on GPUs, gloo on CPU) and pick this rank's device;
    without torchrun, a single process on --device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        for flag in ("shard_teacher", "shard_student"):
            if getattr(cfg, flag):
                raise MoekdError(f"--{flag.replace('_', '-')} needs several processes: launch with torchrun "
                                 f"--nproc_per_node N")
        return SINGLE, resolve_device(cfg.device)
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    device = resolve_device(cfg.device)
    if device.index is not None:
        raise MoekdError(f"--device {cfg.device}: under torchrun every rank picks its own device (LOCAL_RANK); "
                         f"pass --device {device.type}")
    name = cfg.teacher_device
    pinned = name is not None and resolve_device(name, "--teacher-device").index is not None
    if pinned or (name is not None and cfg.shard_teacher and name != cfg.device):
        raise MoekdError(f"--teacher-device {name}: under torchrun the teacher lives on each rank's --device"
                         f"{' (sharded over them)' if cfg.shard_teacher else ' or on cpu'}")
    if device.type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() < local_world:
            raise MoekdError(f"torchrun started {local_world} processes on this node, which has "
                             f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    import datetime
    import torch.distributed as td
    td.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=dist.rank, world_size=world,
                          timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    return dist, device


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def comm_device() -> torch.device:
    """Where collectives' tensors must live: the rank's GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum a few numbers over ranks (fp64, so token counts and loss sums stay exact)."""
    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def average_gradients(params: list[nn.Parameter], dist: Dist) -> None:
    """What DDP does to the student, for the replicated teacher's routers: every rank ends with the
    mean of the ranks' gradients (one flat all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if dist.world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(comm_device())  # a --teacher-device cpu under nccl moves
    torch.distributed.all_reduce(flat)
    flat /= dist.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (generation, saving and attribute checks use it)."""
    return getattr(model, "module", model)


def wrap_student(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """DDP over the student (a --shard-student one was sharded as it was loaded). An MoE student may
    leave experts without tokens in a micro-batch, so DDP must look for unused parameters; the ranks
    load identical weights, so buffers need no syncing during training."""
    if dist.world == 1 or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=is_moe(model), forward_sync_buffers=False)


def shard_model(model: nn.Module, mesh, separate: list[nn.Module] = (), *, frozen: bool = False) -> nn.Module:
    """FSDP2 over a causal LM: each decoder layer is one sharded unit (gathered for its forward, freed
    after), embeddings and head the root's; parameters move to the mesh's device. `separate` modules get
    units of their own: FSDP2 gathers one dtype per unit, and SAR keeps fp32 routers in a bf16 teacher.
    FSDP2 keeps the root gathered between forward and backward; a `frozen` model (the teacher) has no
    backward to wait for, so its root is freed after each forward too."""
    from torch.distributed.fsdp import fully_shard
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise MoekdError(f"sharding: {type(model).__name__} has no model.layers to shard")
    for module in [*separate, *layers]:
        fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if frozen else {}))


def one_rank_at_a_time(dist: Dist, build):
    """build() on each rank in turn, a barrier between turns: a model sharded right after it is read
    into host memory then has one full host copy alive at a time, not one per rank."""
    built = None
    for r in range(dist.world):
        if r == dist.rank:
            built = build()
        barrier(dist)
    return built


def shard_loaded(model: nn.Module, mesh, device: torch.device, **options) -> nn.Module:
    """shard_model for a model load_model read onto the CPU: first restore the GPU experts kernel
    (load_model picks the eager one for the CPU)."""
    if device.type != "cpu" and type(model)._can_set_experts_implementation():
        model.set_experts_implementation("grouped_mm")
    return shard_model(model, mesh, **options)


def gradient_sync(model: nn.Module, enabled: bool):
    """Gradient all-reduce on (the last micro-batch of a step) or off (the ones before): DDP's no_sync(),
    FSDP2's set_requires_gradient_sync(); nothing to do in a single process."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    elif not enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a (possibly sharded) model as full CPU tensors on rank 0, empty elsewhere; a
    collective when sharded, so every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """An optimizer's state keyed by parameter name with full tensors, so a checkpoint resumes on any
    number of ranks, sharded or not (a collective for a sharded model: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local_mb(tensors) -> float:
    """MB this rank holds for these tensors (its shard of a sharded one)."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None)
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def memory_per_rank(student: nn.Module, teacher: nn.Module | None, optimizers: list, device: torch.device,
                    dist: Dist) -> list[dict[str, float]]:
    """Per rank: MB of student weights + gradients, teacher weights, optimizer state (each rank's
    shards), and the process's peak (CUDA allocation; on CPU the peak RSS, Python and libraries included).
    Gradients are counted at their full size: they are freed after each step (zero_grad)."""
    import resource
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    params = [p for p in student.parameters() if p.requires_grad]
    mine = [2 * local_mb(params) + local_mb(p for p in student.parameters() if not p.requires_grad),
            local_mb(teacher.parameters()) if teacher is not None else 0.0,
            local_mb(v for opt in optimizers for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
            peak]
    table = [0.0] * (4 * dist.world)
    table[4 * dist.rank:4 * dist.rank + 4] = mine
    table = all_reduce_sum(table, dist)
    names = ("student_mb", "teacher_mb", "optimizer_mb", "peak_mb")
    return [dict(zip(names, table[4 * r:4 * r + 4])) for r in range(dist.world)]


# ----------------------------------------------------------------------------
# Method steps: (model, teacher, batch, cfg) -> named losses; "loss" is what gets backpropagated.
# Every loss is a *sum over tokens* divided by `norm`, the token count of the normalisation
# group (the global batch by default), so micro-batching does not change the update.

def aux_loss(model: nn.Module, outputs) -> torch.Tensor | None:
    """The MoE's own load-balancing term: Llama-MoE balance loss (weight from its config, summed
    over layers), or a transformers MoE's router_aux_loss_coef * aux_loss."""
    if hasattr(model, "moe_config"):
        return moe_balance_loss(model)
    aux = getattr(outputs, "aux_loss", None)
    return None if aux is None else model.config.router_aux_loss_coef * aux


def forward_with_aux(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, T, V] and the model's own balance loss (None for dense models)."""
    inner = unwrap(model)  # the forward goes through a DDP wrapper, the attribute checks do not
    kwargs = {"output_router_logits": True} if is_moe(inner) and not hasattr(inner, "moe_config") else {}
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    return outputs.logits, aux_loss(inner, outputs)


def with_aux(parts: dict, aux: torch.Tensor | None, n_micro: int) -> dict:
    """Add a balance loss, once per micro-batch and averaged over the step's micro-batches."""
    if aux is not None:
        parts["lb"] = aux / n_micro
        parts["loss"] = parts["loss"] + parts["lb"]
    return parts


def teacher_routing(teacher: nn.Module, cfg: Config, generator: torch.Generator | None):
    """The teacher's routing for a method: KA (on-policy or gold) samples N-1 of N experts with probability
    lambda (else its top-(N-1)), ALL and SAR use every expert, KD/GKD the native top-k (or --teacher-k,
    --teacher-top-p)."""
    if cfg.method in ("ka", "ka-gold"):
        k = cfg.ka_k or num_experts(teacher) - 1
        return moe_routing(teacher, "sample", k=k, prob=cfg.ka_lambda, generator=generator)
    if cfg.method in ("all", "sar"):
        return moe_routing(teacher, "all")
    if cfg.teacher_k is not None:
        return moe_routing(teacher, "topk", k=cfg.teacher_k)
    if cfg.teacher_top_p is not None:
        return moe_routing(teacher, "topp", top_p=cfg.teacher_top_p)
    return contextlib.nullcontext()


@torch.no_grad()
def teacher_logits(teacher: nn.Module, batch: dict, *, repeat: int = 1,
                   amp_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Teacher logits on the teacher's device, [repeat*B, T, V], under autocast on that device.
    Repeating the rows runs KA's M passes as one batched forward; every row gets its own expert draws
    in every layer."""
    device = next(teacher.parameters()).device
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with autocast(device, amp_dtype):
        return teacher(input_ids=ids.repeat(repeat, 1), attention_mask=attn.repeat(repeat, 1)).logits


def sft_step(model, teacher, batch, cfg, *, norm, n_micro, extras=None) -> dict[str, torch.Tensor]:
    """SFT: CE on gold response tokens (+ the model's balance loss, gate noise on in train mode)."""
    logits, aux = forward_with_aux(model, batch)
    ce = cross_entropy_sum(logits, batch["labels"]) / norm
    return with_aux({"loss": ce, "ce": ce}, aux, n_micro)


def kd_step(model, teacher, batch, cfg, *, norm, n_micro, extras=None) -> dict[str, torch.Tensor]:
    """KD (Sanh 2019) on gold data: (1 - r) CE + r KL(p_teacher || q_student), r = --kd-ratio (0.5).
    ka-gold (the official temp_nr scripts): the KL term is the mean of KL(p_m || q_student) over KA's M
    sampled teachers. The official code writes the soft term as -Sum p log q; it differs from KL by
    H(p), a constant."""
    M = cfg.ka_m if cfg.method == "ka-gold" else 1
    extras = extras or {}
    with teacher_routing(teacher, cfg, extras.get("generator")):
        t = teacher_logits(teacher, batch, repeat=M, amp_dtype=extras.get("amp_dtype", torch.float32))
    logits, aux = forward_with_aux(model, batch)
    mask = loss_mask(batch["labels"])
    ce = cross_entropy_sum(logits, batch["labels"]) / norm
    fkl = sum(kl_per_token(t_m.to(logits.device), logits, mask, chunk=cfg.kl_chunk).sum()
              for t_m in t.view(M, *logits.shape)) / (M * norm)
    return with_aux({"loss": (1 - cfg.kd_ratio) * ce + cfg.kd_ratio * fkl, "ce": ce, "fkl": fkl}, aux, n_micro)


def reverse_kl_step(model, teacher, batch, cfg, *, norm, n_micro, extras=None) -> dict[str, torch.Tensor]:
    """GKD, ALL, KA and SAR's student update: KL(q_student || p_teacher) on the student's own samples,
    the teacher under the method's routing. KA: mean of the M sampled teachers' losses (spec §2),
    computed as one KL against the mean of their log-probabilities (the same number)."""
    M = cfg.ka_m if cfg.method == "ka" and cfg.ka_updates == "mean" else 1
    extras = extras or {}
    with teacher_routing(teacher, cfg, extras.get("generator")):
        t = teacher_logits(teacher, batch, repeat=M, amp_dtype=extras.get("amp_dtype", torch.float32))  # [M*B, T, V]
    logits, aux = forward_with_aux(model, batch)
    mask = loss_mask(batch["labels"])
    if M == 1:
        rkl = kl_per_token(logits, t.to(logits.device), mask, chunk=cfg.kl_chunk).sum() / norm
    else:  # one KL against the mean log-probabilities of the M passes: the mean of the M KLs
        log_p = mean_log_probs(t.view(M, *logits.shape)).to(logits.device)
        rkl = kl_per_token(logits, log_p, mask, chunk=cfg.kl_chunk, q_is_log_probs=True).sum() / norm
    return with_aux({"loss": rkl, "rkl": rkl}, aux, n_micro)


def sar_router_update(model, teacher, micro: list[dict], norms: list[float], cfg: Config,
                      extras: dict, *, step: int = 0, dist: Dist = SINGLE) -> dict[str, float]:
    """SAR step (a), before the student's: only the teacher's routers learn, teacher in train mode
    (gate noise on), all experts; loss KL(p_teacher || q_student) + beta * balance (the paper's Eq. 9;
    --sar-kl student-teacher: KL(q_student || p_teacher)).
    Router gradients are averaged over ranks (FSDP2 does it for a sharded teacher), so with the
    x world loss scale every rank applies the same update and the routers stay identical."""
    student = unwrap(model)
    device, t_device = next(student.parameters()).device, next(teacher.parameters()).device
    student.eval()
    teacher.train()
    logs = {"router_kl": 0.0, "router_lb": 0.0}
    first, n_micro = dist.rank * len(micro), len(micro) * dist.world
    for m, (mb, norm) in enumerate(zip(micro, norms)):
        mb = {k: v.to(device) for k, v in mb.items()}
        with torch.no_grad(), autocast(device, extras["amp_dtype"]):
            q = student(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        torch.manual_seed(stream_seed(cfg.seed, step, first + m, "router"))  # the gates' noise
        with moe_routing(teacher, "all"):  # also around the backward: --grad-checkpointing re-runs the forward
            with autocast(t_device, extras["amp_dtype"]), record_routing(teacher) as routed:
                p = teacher(input_ids=mb["input_ids"].to(t_device), attention_mask=mb["attention_mask"].to(t_device)).logits
                lb = router_balance_loss(routed, cfg.sar_beta) / n_micro
            p, mask = p.to(device), loss_mask(mb["labels"])
            pair = (p, q) if cfg.sar_kl == "teacher-student" else (q, p)  # KL(first || second)
            kl = kl_per_token(*pair, mask, chunk=cfg.kl_chunk).sum() / norm
            ((kl + lb) * dist.world).backward()
        logs["router_kl"] += kl.item()
        logs["router_lb"] += lb.item()
    params = router_parameters(teacher)
    if not extras.get("sharded_teacher"):
        average_gradients(params, dist)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    extras["router_optimizer"].step()
    extras["router_optimizer"].zero_grad(set_to_none=True)
    teacher.eval()
    return logs


METHOD_STEPS = {"sft": sft_step, "kd": kd_step, "gkd": reverse_kl_step, "all": reverse_kl_step,
                "ka": reverse_kl_step, "sar": reverse_kl_step, "ka-gold": kd_step}


# ----------------------------------------------------------------------------
# Training loop: AdamW, LR schedule, accumulation, dev selection, atomic resumable checkpoints

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms and biases (the 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def lr_at(step: int, *, lr: float, schedule: str, total: int, warmup: int = 0, lr_min: float = 0.0) -> float:
    """Linear warm-up, then constant or cosine to lr_min at `total` (torch's CosineAnnealingLR)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_rows(items: list[dict], cfg: Config, step: int, steps_per_epoch: int, world: int = 1) -> list[dict]:
    """The global batch of one optimizer step: a pure function of (seed, step). With --restart-epochs
    every epoch repeats the first epoch's order, as the official loop scripts (same seed, set_epoch(0))."""
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_order(len(items), seed=cfg.seed, epoch=0 if cfg.restart_epochs else epoch)
    size = cfg.batch_size * world * cfg.grad_accum
    return [items[j] for j in order[i * size:(i + 1) * size]]


def loss_norms(micro: list[dict], mode: str, dist: Dist = SINGLE) -> list[float]:
    """Divisor of each micro-batch's token-sum loss. global: all loss tokens of the step on every rank
    (TRL's fix for accumulation, pitfalls #4); micro: own tokens x #micro-batches (mean of micro means)."""
    counts = [max(int(loss_mask(mb["labels"]).sum()), 1) for mb in micro]
    if mode == "global":
        return [all_reduce_sum([float(sum(counts))], dist)[0]] * len(micro)
    return [float(c * len(micro) * dist.world) for c in counts]


def train_step(cfg: Config, model, teacher, tokenizer, rows: list[dict], optimizer, lr: float,
               extras: dict, *, step: int = 0, dist: Dist = SINGLE) -> dict[str, float]:
    """One optimizer step on a global batch: this rank's micro-batches, their on-policy samples
    (gkd/all/ka/sar), SAR's router update, then the student's backward passes, grad clip and AdamW.
    Returns the loss parts summed over all ranks' micro-batches, and the token count."""
    device, amp_dtype, student = next(model.parameters()).device, extras["amp_dtype"], unwrap(model)
    first, per_rank = dist.rank * cfg.grad_accum, cfg.batch_size * cfg.grad_accum
    mine = rows[dist.rank * per_rank:(dist.rank + 1) * per_rank]
    if cfg.method in ON_POLICY:  # row i of the global batch samples from its own stream (seed, step, i)
        seeds = [stream_seed(cfg.seed, step, dist.rank * per_rank + i, "sample") for i in range(len(mine))]
        with autocast(device, amp_dtype):
            mine = generate_on_policy(student, mine, tokenizer, cfg, seeds)
    B = cfg.batch_size
    micro = [collate(mine[m * B:(m + 1) * B], tokenizer.pad_token_id) for m in range(cfg.grad_accum)]
    norms, n_micro = loss_norms(micro, cfg.loss_norm, dist), len(micro) * dist.world
    logs = sar_router_update(model, teacher, micro, norms, cfg, extras, step=step, dist=dist) \
        if cfg.method == "sar" else {}
    updates = cfg.ka_m if cfg.method == "ka" and cfg.ka_updates == "each" else 1
    for group in optimizer.param_groups:
        group["lr"] = lr
    for u in range(updates):
        model.train()
        for m, (mb, norm) in enumerate(zip(micro, norms)):
            mb = {k: v.to(device) for k, v in mb.items()}
            torch.manual_seed(stream_seed(cfg.seed, step, first + m, f"train{u}"))  # gate noise, dropout
            if "generator" in extras:
                extras["generator"].manual_seed(stream_seed(cfg.seed, step, first + m, f"ka{u}"))
            last = m == len(micro) - 1  # ranks reduce gradients in the last backward only
            with autocast(device, amp_dtype), gradient_sync(model, last):
                parts = METHOD_STEPS[cfg.method](model, teacher, mb, cfg, norm=norm, n_micro=n_micro, extras=extras)
                (parts["loss"] * dist.world).backward()  # DDP/FSDP average over ranks: x world makes it the sum
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v.item() / updates
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        check_finite("gradient norm", grad_norm, step)  # the same on every rank: gradients are synced
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    logs["tokens"] = float(sum(int(mb["attention_mask"].sum()) for mb in micro))
    logs = dict(zip(sorted(logs), all_reduce_sum([logs[k] for k in sorted(logs)], dist)))
    check_finite("loss", logs["loss"], step)
    return logs


def check_finite(what: str, value, step: int) -> None:
    value = float(value.full_tensor() if hasattr(value, "full_tensor") else value)  # DTensor under FSDP2
    if not math.isfinite(value):
        raise RunStopped(f"step {step + 1}: the {what} is {value}, nothing of this step is kept "
                         f"(try a lower --lr)")


ROUTERS_FILE = "teacher_routers.safetensors"


def router_state_dict(teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's router parameters, full tensors on the CPU. On an FSDP2-sharded teacher this
    gathers the shards: every rank must call it."""
    ids = {id(p) for p in router_parameters(teacher)}
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731 (DTensor shards)
    return {name: full(p.detach()).contiguous().cpu() for name, p in teacher.named_parameters() if id(p) in ids}


def load_routers(teacher: nn.Module, path: str | Path) -> None:
    """Load SAR-trained routers (a teacher_routers.safetensors, or a directory holding one); the file must
    hold exactly the teacher's router parameters."""
    from safetensors.torch import load_file
    path = Path(path)
    path = path / ROUTERS_FILE if path.is_dir() else path
    if not path.is_file():
        raise MoekdError(f"--teacher-routers {path}: no such file")
    tensors, expected = load_file(path), set(router_state_dict(teacher))
    if set(tensors) != expected:
        differ = sorted(set(tensors) ^ expected)
        raise MoekdError(f"{path}: router keys do not match the teacher ({len(differ)} differ, e.g. {differ[0]})")
    load_state_dict_strict(teacher, iter(tensors.items()), where=str(path), partial=True)


def save_run_model(directory: Path, model, tokenizer, routers: dict[str, torch.Tensor] | None, *,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A student directory load_model reads (`state_dict`: a sharded student's gathered weights);
    SAR runs add the trained teacher routers beside it."""
    save_model(model, tokenizer, directory, state_dict=state_dict)
    if routers is not None:
        from safetensors.torch import save_file
        save_file(routers, directory / ROUTERS_FILE)


def save_checkpoint(out: Path, step: int, model, tokenizer, weights, routers, state: dict) -> None:
    """checkpoints/step-N (model, routers, trainer state), then the `latest` pointer, both atomic.
    No RNG state: every random draw of a step is seeded from (seed, step, micro-batch)."""
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step}"
    def write(tmp: Path) -> None:
        save_run_model(tmp, model, tokenizer, routers, state_dict=weights)
        torch.save({"step": step, **state}, tmp / "trainer_state.pt")
    write_atomically(ckpt_root / name, write)
    pointer = ckpt_root / "latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, ckpt_root / "latest")
    for old in ckpt_root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old)


def truncate_log(path: Path, step: int) -> None:
    """A resume from step N goes on logging after N: drop what a killed run logged after its checkpoint
    (step and dev lines of later steps, a half-written last line)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.endswith("\n") and not (
        (m := re.match(r"(?:dev )?step (\d+)", line)) and int(m.group(1)) > step)]
    if keep != lines:
        path.write_text("".join(keep))


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None


def method_extras(cfg: Config, teacher, amp_dtype: torch.dtype, *, sharded_teacher: bool = False) -> dict:
    """Per-method training state beside the student's optimizer: SAR's router AdamW (constant LR, same
    weight decay and clip as the student's), KA's expert-sampling generator (seeded per micro-batch)."""
    extras: dict[str, Any] = {"amp_dtype": amp_dtype, "sharded_teacher": sharded_teacher}
    if cfg.method == "sar":
        extras["router_optimizer"] = torch.optim.AdamW(param_groups(teacher, cfg.weight_decay), lr=cfg.router_lr)
    if cfg.method in ("ka", "ka-gold"):
        extras["generator"] = torch.Generator(device=next(teacher.parameters()).device)
    return extras


def train(cfg: Config, model: nn.Module, teacher: nn.Module | None, tokenizer, train_items: list[dict],
          dev_items: list[dict], *, out: Path, device: torch.device, amp_dtype: torch.dtype,
          state: dict | None = None, dist: Dist = SINGLE) -> dict:
    """The optimizer steps of a run. Under torchrun `model` is DDP-wrapped; rank 0 alone logs,
    evaluates and saves (the others wait at a barrier) and the returned metrics are rank 0's."""
    global_batch = cfg.batch_size * dist.world * cfg.grad_accum
    steps_per_epoch = len(train_items) // global_batch
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    student = unwrap(model)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    extras = method_extras(cfg, teacher, amp_dtype, sharded_teacher=cfg.shard_teacher)
    start, best, history, window, window_steps = 0, -math.inf, [], {}, 0
    if state is not None:  # `window` holds the loss sums since the last log line
        load_optimizer_state(student, optimizer, state["optimizer"])
        start, best, history = state["step"], state["best_rougeL"], state["history"]
        window, window_steps = state["window"], state["window_steps"]
        if "router_optimizer" in extras:
            load_optimizer_state(teacher, extras["router_optimizer"], state["router_optimizer"])
    say = print if dist.main else (lambda *a, **k: None)
    say(f"train: {len(train_items)} examples, global batch {global_batch} ({cfg.batch_size} x {dist.world} device(s) "
        f"x {cfg.grad_accum} accumulation), {steps_per_epoch} steps/epoch, {total} steps, lr {cfg.lr:g} {cfg.lr_schedule}")
    if dist.main and state is not None:
        truncate_log(out / "log.txt", start)
    log = (out / "log.txt").open("a") if dist.main else None
    def snapshot() -> tuple[dict | None, dict | None]:  # student and router weights; every rank calls it
        return (full_state_dict(student) if is_sharded(student) else None,
                router_state_dict(teacher) if cfg.method == "sar" else None)
    def save(directory: Path, weights, routers) -> None:
        write_atomically(directory, lambda d: save_run_model(d, student, tokenizer, routers, state_dict=weights))

    busy = 0.0  # seconds of training work since the last log line
    step = start
    for step in range(start, total):
        t0 = time.perf_counter()
        if cfg.restart_epochs and step % steps_per_epoch == 0 and step > 0:
            for opt in [optimizer] + ([extras["router_optimizer"]] if "router_optimizer" in extras else []):
                opt.state.clear()  # each official loop epoch is a fresh job with a fresh optimizer
        lr = lr_at(step, lr=cfg.lr, schedule=cfg.lr_schedule, total=total, warmup=cfg.warmup_steps, lr_min=cfg.lr_min)
        logs = train_step(cfg, model, teacher, tokenizer, step_rows(train_items, cfg, step, steps_per_epoch, dist.world),
                          optimizer, lr, extras, step=step, dist=dist)
        for k, v in logs.items():
            window[k] = window.get(k, 0.0) + v
        done, window_steps, busy = step + 1, window_steps + 1, busy + time.perf_counter() - t0
        if done % cfg.log_every == 0 or done == total:
            n, tokens = window_steps, window.pop("tokens")
            parts_txt = " | ".join(f"{k} {window[k] / n:.4f}" for k in sorted(window, key=lambda k: k != "loss"))
            line = (f"step {done}/{total} | epoch {step // steps_per_epoch + 1} | {parts_txt} | lr {lr:.2e} | "
                    f"{tokens / busy:.0f} tok/s | {1000 * busy / n:.0f} ms")
            say(line)
            if log:
                log.write(line + "\n")
                log.flush()
            history.append({"step": done, **{k: v / n for k, v in window.items()}})
            window, window_steps, busy = {}, 0, 0.0
        epoch_end = done % steps_per_epoch == 0 or done == total
        if epoch_end and cfg.dev_eval:
            if dist.main or is_sharded(student):  # a sharded student's forward needs every rank
                metrics = evaluate_dev(student, tokenizer, dev_items, cfg, device=device, amp_dtype=amp_dtype)
            if dist.main:
                line = f"dev step {done} | dev_loss {metrics['dev_loss']:.4f} | dev_rougeL {metrics['dev_rougeL']:.2f}"
                say(line)
                log.write(line + "\n")
                history.append({"step": done, **metrics})
            improved = all_reduce_sum([float(dist.main and metrics["dev_rougeL"] > best)], dist)[0] > 0
            if improved and cfg.select == "best":  # keep the best dev ROUGE-L model
                weights, routers = snapshot()
                if dist.main:
                    save(out / "best_rougeL", weights, routers)
            if improved and dist.main:
                best = metrics["dev_rougeL"]
        stopping = cfg.stop_after is not None and done - start >= cfg.stop_after
        saving = epoch_end or stopping or done == total or bool(cfg.save_every and done % cfg.save_every == 0)
        if saving:
            state = {"optimizer": optimizer_state(student, optimizer), "best_rougeL": best, "history": history,
                     "window": window, "window_steps": window_steps}
            if "router_optimizer" in extras:
                state["router_optimizer"] = optimizer_state(teacher, extras["router_optimizer"])
            weights, routers = snapshot()
            if dist.main:
                save_checkpoint(out, done, student, tokenizer, weights, routers, state)
            barrier(dist)  # nobody runs ahead (or exits) while rank 0 evaluates (epoch ends) and writes
        if stopping and done < total:
            say(f"stopped after {cfg.stop_after} steps at step {done}/{total}; continue with --resume")
            break
    if log:
        log.close()
    finished = step + 1 >= total
    if finished:
        weights, routers = snapshot()
        if dist.main:
            save(out / "final", weights, routers)
    optimizers = [optimizer] + ([extras["router_optimizer"]] if "router_optimizer" in extras else [])
    memory = memory_per_rank(student, teacher, optimizers, device, dist)
    say("memory per rank (MB): " + "; ".join(
        f"rank {r}: student {m['student_mb']:.1f} (weights + grads), teacher {m['teacher_mb']:.1f}, "
        f"optimizer {m['optimizer_mb']:.1f}, peak {m['peak_mb']:.0f}" for r, m in enumerate(memory)))
    dev = [h for h in history if "dev_rougeL" in h]
    selected = out / ("best_rougeL" if cfg.select == "best" else "final")
    result = {"out": str(out), "step": step + 1 if total else 0, "total_steps": total, "finished": finished,
              "model": str(selected) if finished else None, "best_rougeL": best if dev else None, "history": history, "memory": memory, **(dev[-1] if dev else {})}
    if dist.main:
        write_json(out / "metrics.json", result)
    return result


# ----------------------------------------------------------------------------
# Main

RUN_FILES = {"run.json", "log.txt", "metrics.json", "checkpoints", "best_rougeL", "final"}  # all a run writes


def check_own_folder(out: Path, marker: str, names: set[str]) -> None:
    """--overwrite removes only a folder moekd wrote: its marker file present and no other names than
    `names` (and write_atomically's .tmp-/.old- leftovers of a killed run)."""
    entries = sorted(p.name for p in out.iterdir())
    foreign = [n for n in entries if n not in names and not n.startswith((".tmp-", ".old-"))]
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise MoekdError(f"--out {out}: holds files moekd did not write ({', '.join(foreign[:10])}{more}); "
                         f"--overwrite refuses to delete it")
    if marker not in entries:
        raise MoekdError(f"--out {out}: has no {marker}, not a moekd output folder; --overwrite refuses to delete it")


def clear_folder(out: Path) -> None:
    """Delete what is in `out` (checked by check_own_folder), keeping the folder itself (`--out .`)."""
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare_out_dir(cfg: Config) -> tuple[Path, dict | None]:
    """Check --out before any work: never touch an existing run unless --resume/--overwrite, and
    --overwrite only a moekd run."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MoekdError(f"--out {out}: exists and is not a directory")
    busy = out.exists() and any(out.iterdir())
    if cfg.resume:
        ckpt = latest_checkpoint(out) if busy else None
        if ckpt is None:
            raise MoekdError(f"--out {out}: no checkpoint to resume from")
        return out, load_tensors_only(ckpt / "trainer_state.pt")
    if busy and not cfg.overwrite:
        raise MoekdError(f"--out {out}: exists and is not empty; pass --resume or --overwrite")
    if busy:
        check_own_folder(out, "run.json", RUN_FILES)
    return out, None


def setup_teacher(cfg: Config, student: nn.Module, tokenizer, amp_dtype: torch.dtype, *,
                  device: torch.device | None = None, routers: list[str | Path] = (), dist: Dist = SINGLE,
                  mesh=None) -> nn.Module | None:
    """Load and check the teacher: frozen, in the compute dtype (bf16 on GPU); SAR unfreezes the routers
    and keeps them in fp32 so small updates (LR 1e-6) are not lost to bf16 rounding. `routers` (files or
    run dirs) are loaded in order. --shard-teacher: the ranks read the teacher into CPU memory one after
    another and FSDP2 keeps 1/world of it on each rank's device."""
    if cfg.method == "sft":
        return None
    device = device or resolve_device(cfg.device)
    if cfg.shard_teacher:
        def build():
            teacher = _prepared_teacher(cfg, student, tokenizer, amp_dtype, torch.device("cpu"), routers)
            separate = moe_routers(teacher) if cfg.method == "sar" else []
            return shard_loaded(teacher, mesh, device, separate=separate, frozen=True)
        return one_rank_at_a_time(dist, build)
    t_device = resolve_device(cfg.teacher_device, "--teacher-device") if cfg.teacher_device else device
    return _prepared_teacher(cfg, student, tokenizer, amp_dtype, t_device, routers)


def _prepared_teacher(cfg, student, tokenizer, amp_dtype, device, routers) -> nn.Module:
    teacher = load_model(cfg.teacher, device=device, dtype=amp_dtype, what="--teacher")
    check_teacher(teacher, student, load_tokenizer(cfg.teacher, what="--teacher"), tokenizer, cfg)
    teacher.requires_grad_(False)
    if cfg.method == "sar":
        for p in router_parameters(teacher):
            p.data = p.data.float()
            p.requires_grad_(True)
    for path in routers:
        load_routers(teacher, path)
    return teacher


def check_teacher(teacher: nn.Module, student: nn.Module, teacher_tok, student_tok, cfg: Config) -> None:
    """The logits must index the same vocabulary (pitfalls #6); KA/SAR/ALL need an MoE teacher whose
    routing we control; expert counts must fit the flags."""
    vt, vs = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if vt != vs or teacher_tok.get_vocab() != student_tok.get_vocab():
        raise MoekdError(f"--teacher and --model have different vocabularies ({vt} vs {vs} logits"
                         f"{'' if vt != vs else ', different tokenizers'}); distillation needs one vocabulary")
    needs_moe = cfg.method in MOE_TEACHER or cfg.teacher_k is not None or cfg.teacher_top_p is not None
    if needs_moe and not is_moe(teacher):
        flag = f"--method {cfg.method}" if cfg.method in MOE_TEACHER else \
            "--teacher-k" if cfg.teacher_k is not None else "--teacher-top-p"
        raise MoekdError(f"{flag} needs an MoE teacher; --teacher is a dense {type(teacher).__name__}")
    if needs_moe:
        E = num_experts(teacher)  # also rejects MoE families whose routing we cannot steer
        for flag, k in (("--teacher-k", cfg.teacher_k), ("--ka-k", cfg.ka_k)):
            if k is not None and not 1 <= k <= E:
                raise MoekdError(f"{flag} {k} is outside [1, {E}] (the teacher has {E} experts)")


# Flags a --resume may change. The device count and its split (batch size, accumulation) may change
# too, as long as the global batch stays the same.
RESUME_MAY_CHANGE = {"resume", "stop_after", "device", "teacher_device", "dtype", "log_every", "out", "tiny",
                     "dist_timeout", "batch_size", "grad_accum", "global_batch_size", "shard_teacher",
                     "shard_student"}


def check_resume_config(cfg: Config, saved: dict, world: int) -> None:
    """The other flags were checked by saved_config(); the device split may change, the global batch not."""
    was = saved["batch_size"] * saved.get("world_size", 1) * saved["grad_accum"]
    now = cfg.batch_size * world * cfg.grad_accum
    if now != was:
        raise MoekdError(f"global batch {now} ({cfg.batch_size} x {world} device(s) x {cfg.grad_accum}) differs from "
                         f"the run being resumed ({was}); change --batch-size/--grad-accum to keep it")


def main(argv: list[str] | None = None) -> dict:
    """Run one training job (one process of a torchrun launch); returns its metrics.
    Raises MoekdError on bad input."""
    cfg = parse_config(argv)
    dist, device = init_distributed(cfg)
    try:
        return _main(cfg, dist, device)
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


def _main(cfg: Config, dist: Dist, device: torch.device) -> dict:
    global_batch = split_global_batch(cfg, dist.world)
    out, state = prepare_out_dir(cfg)
    barrier(dist)  # every rank has looked at --out before rank 0 writes to it
    if state is not None:  # the run's own config wins; only invocation flags may change
        check_resume_config(cfg, json.loads((out / "run.json").read_text()), dist.world)
    if cfg.method == "sft" and cfg.shard_teacher:
        raise MoekdError("--shard-teacher: --method sft has no teacher")
    amp_dtype = resolve_dtype(cfg.dtype, device)
    train_examples, dev_examples = load_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    ckpt = latest_checkpoint(out) if state is not None else None
    mesh = None
    if cfg.shard_teacher or cfg.shard_student:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (dist.world,))
    source = str(ckpt or cfg.model)
    if cfg.shard_student:  # fp32 master weights throughout
        model = one_rank_at_a_time(dist, lambda: shard_loaded(load_model(source, dtype=torch.float32), mesh, device))
    else:
        model = load_model(source, device=device, dtype=torch.float32)
    check_vocab(model, tokenizer)
    routers = [p for p in (cfg.teacher_routers, ckpt if cfg.method == "sar" else None) if p]
    teacher = setup_teacher(cfg, model, tokenizer, amp_dtype, device=device, routers=routers, dist=dist, mesh=mesh)
    if cfg.grad_checkpointing:
        enable_checkpointing(model, "--model")
        if cfg.method == "sar":  # the only method that backpropagates through the teacher
            enable_checkpointing(teacher, "--teacher")
    train_items = tokenize_examples(tokenizer, train_examples, cfg, name="train")
    dev_items = tokenize_examples(tokenizer, dev_examples, cfg, name="dev")
    if len(train_items) < global_batch:
        raise MoekdError(f"--data {cfg.data}: {len(train_items)} training examples, fewer than one global "
                         f"batch ({cfg.batch_size} x {dist.world} device(s) x {cfg.grad_accum})")
    if state is None and dist.main:
        if cfg.overwrite and out.exists():
            clear_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", {**dataclasses.asdict(cfg), "world_size": dist.world})
    barrier(dist)
    describe = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params{', MoE' if is_moe(m) else ''}"  # noqa: E731
    if dist.main:
        print(f"{cfg.method}: model {cfg.model} ({describe(model)}{', sharded' if cfg.shard_student else ''})"
              + (f", teacher {cfg.teacher} ({describe(teacher)}{', sharded' if cfg.shard_teacher else ''})"
                 if teacher is not None else "")
              + f" on {device}{f' x {dist.world} ranks' if dist.world > 1 else ''}, "
              f"{str(amp_dtype).removeprefix('torch.')}, out {out}")
    try:
        result = train(cfg, wrap_student(model, dist, device), teacher, tokenizer, train_items, dev_items, out=out,
                       device=device, amp_dtype=amp_dtype, state=state, dist=dist)
    except (RunStopped, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ENOSPC:
            raise
        ckpt = latest_checkpoint(out)
        raise MoekdError(f"{e if isinstance(e, RunStopped) else f'no space left on device writing {e.filename}'}; "
                         f"the run stopped, " + (f"its last good checkpoint is {ckpt} (continue with --resume)"
                                                  if ckpt else "no checkpoint was saved yet")) from None
    if result["finished"] and dist.main:
        dev = (f"dev_loss {result['dev_loss']:.4f} | dev_rougeL {result['dev_rougeL']:.2f} | best dev_rougeL "
               f"{result['best_rougeL']:.2f} | " if result.get("best_rougeL") is not None else "")
        print(f"done: {dev}model ({cfg.select}) -> {result['model']}")
    return result


def run_cli(entry) -> int:
    """Run a main(); bad input (MoekdError) becomes one line on stderr and exit code 2."""
    try:
        entry()
    except MoekdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
