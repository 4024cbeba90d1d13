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

This file is the method, read top to bottom: config (the method table first) -> data -> generation ->
routing control -> losses -> method steps -> training loop -> main. Routing, losses and method steps are
one block whose functions copy out on their own (moe_routing, reverse_kl and forward_kl need nothing but
torch). The engine lives beside it: llama_moe.py (the Llama-MoE model port), checkpoints.py (model files,
run folders, checkpoints), parallel.py (torchrun: DDP/FSDP2, no-ops in one process), sampling.py
(generation), hidden_losses.py (the training losses from hidden states, chunked), tiny_moe/synthetic.py (the
synthetic data). Shape legend: B batch, T time, H hidden, V vocab, E experts, K selected experts, N flattened
tokens, M teacher passes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import (ROUTERS_FILE, append_line, check_resume_config, check_vocab, default_out,
                         latest_checkpoint, load_model, load_state_dict_strict, load_tokenizer, prepare_out_dir,
                         read_safetensors, save_checkpoint, save_run_model, saved_config, start_out_dir,
                         truncate_log, write_atomically, write_json)
from data import DOLLY_HUB, data_files, load_splits
from errors import MoekdError, RunStopped, run_cli
from hidden_losses import Head, head_logits, head_losses
from llama_moe import cv_squared
from parallel import (SINGLE, Dist, all_reduce_sum, average_gradients, barrier, enable_checkpointing,
                      full_state_dict, gradient_sync, init_distributed, is_sharded, load_optimizer_state,
                      memory_per_rank, one_rank_at_a_time, optimizer_state, resolve_device, shard_loaded,
                      split_global_batch, unwrap, wrap_student)
from runguard import RunGuard, StopSignals
from sampling import sample_responses, sample_tokens

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Method:
    """Everything that tells the methods apart; no other code tests a method's name."""
    step: str                # the student's loss, a key of STEPS: "sft" (CE), "kd" ((1-r) CE + r KL(p || q),
                             # M passes' mean), "reverse_kl" (KL(q || p) on samples)
    on_policy: bool          # the student samples the responses it learns on (else the gold data)
    teacher: str | None      # the teacher's routing: None (no teacher), "native" (its top-k, or --teacher-k /
                             # --teacher-top-p), "sample" (KA's draws), "all" (every expert)
    passes: bool = False     # M teacher passes per batch, each with its own expert draws (--ka-m)
    routers: bool = False    # SAR: the teacher's routers learn, every step, before the student
    lr: float = 1e-5         # default LR (official scripts)
    select: str = "last"     # default --select (official: best dev ROUGE-L for the single-run jobs)

    @property
    def schedule(self) -> str:  # the official single runs decay (cosine), the 1-epoch loop jobs do not
        return "constant" if self.on_policy else "cosine"


METHODS = {
    "sft": Method("sft", on_policy=False, teacher=None, select="best"),                    # CE on gold data
    "kd": Method("kd", on_policy=False, teacher="native", select="best"),                  # on gold data
    "gkd": Method("reverse_kl", on_policy=True, teacher="native"),                         # on samples
    "all": Method("reverse_kl", on_policy=True, teacher="all"),                            # every expert on
    "ka": Method("reverse_kl", on_policy=True, teacher="sample", passes=True),             # mean over M draws
    "sar": Method("reverse_kl", on_policy=True, teacher="all", routers=True, lr=1e-6),     # routers first
    "ka-gold": Method("kd", on_policy=False, teacher="sample", passes=True, select="best"),  # KD, M draws
}
ON_POLICY = tuple(m for m, p in METHODS.items() if p.on_policy)
DISTILL = tuple(m for m, p in METHODS.items() if p.teacher)


# ----------------------------------------------------------------------------
# Config

@dataclass
class Config:
    method: str = field(default="sft", metadata={"help": "training method", "choices": tuple(METHODS)})
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
    dev_size: int = field(default=1000, metadata={
        "help": "rows held out as dev when --dev-data is not given (raw Dolly: after its 500 test rows)"})
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
        "help": "default cosine for gold-data methods, constant for on-policy ones", "choices": ("constant", "cosine")})
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
    routed_mass: str = field(default="native", metadata={
        "help": "teachers whose router does not renormalise its chosen weights (Qwen2-MoE, OLMoE, "
                "DeepSeek-V2, ...), under all/ka/sar, --teacher-k, --teacher-top-p: native = scale the weights to "
                "the mass of the "
                "native top-k (the paper's gate keeps it); literal = the family's rule as is",
        "choices": ("native", "literal")})
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
    gen_batch_size: int = field(default=16, metadata={"help": "rows sampled together on-policy"})
    sampler: str = field(default="moekd", metadata={
        "help": "on-policy sampler: moekd = sampling.sample_rows on the KV cache; generate = transformers' "
                "generate with the same per-row noise (the reference: the same tokens)", "choices": ("moekd", "generate")})
    compile_sampler: str = field(default="auto", metadata={
        "help": "torch.compile moekd's decode step (fixed shapes; CUDA graphs on GPU): auto = on with CUDA, off on "
                "CPU, where compiling needs a C++ compiler and ~10-30 s per batch shape", "choices": ("auto", "on", "off")})
    kl_chunk: int = field(default=32, metadata={
        "help": "MB of each fp32 [tokens, V] temporary of the chunked losses (tokens per chunk = this / 4 V bytes)"})
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

    @property
    def spec(self) -> Method:
        """The method's row of METHODS: what tells it apart (read here, not by its name)."""
        return METHODS[self.method]

    def __post_init__(self):
        if self.method not in METHODS:
            raise MoekdError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        m = self.spec
        self.lr = m.lr if self.lr is None else self.lr
        self.lr_schedule = self.lr_schedule or m.schedule
        self.restart_epochs = m.on_policy if self.restart_epochs is None else self.restart_epochs
        self.select = self.select or (m.select if self.dev_eval else "last")
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
METHOD_FLAGS: dict[str, tuple[str, ...]] = {
    "teacher": DISTILL,
    "teacher_routers": DISTILL,
    "teacher_device": DISTILL,
    "shard_teacher": DISTILL,
    "gen_batch_size": ON_POLICY,
    "sampler": ON_POLICY,
    "compile_sampler": ON_POLICY,
    "kd_ratio": ("kd", "ka-gold"),
    "teacher_k": ("kd", "gkd"),
    "teacher_top_p": ("kd", "gkd"),
    "routed_mass": DISTILL,
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
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        values = {**saved_config(values, given, {**defaults, "routed_mass": "literal"}), **given}
        if "routed_mass" not in values:  # neither in run.json nor given
            values["routed_mass"] = "literal"
            print("resume: run.json predates --routed-mass, so the run goes on with the rule it was trained "
                  "with (--routed-mass literal)")
    check_method_flags(values.get("method", "sft"), given)
    return Config(**values)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------
# Data: token ids, labels and batches (reading the files: data.py)


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


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A fixed permutation per (seed, epoch): the data position is just the step number."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ----------------------------------------------------------------------------
# Generation and dev evaluation

def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F1 x 100, max over references (rouge-score, stemmed: the paper's metric)."""
    from rouge_score import rouge_scorer
    scorer = _rouge_scorer_cache.get("s") or _rouge_scorer_cache.setdefault(
        "s", rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


_rouge_scorer_cache: dict = {}


def response_through_eos(tokens: list[int], eos_id: int) -> list[int]:
    """A sampled response cut after its first EOS, which is kept (the student must learn to stop);
    one that never stopped gets its last token replaced by EOS, as the official code forces the last
    generated column to pad (= eos)."""
    if eos_id in tokens:
        return tokens[:tokens.index(eos_id) + 1]
    return tokens[:-1] + [eos_id]


def generate_on_policy(model: nn.Module, items: list[dict], tokenizer, cfg: Config,
                       seeds: list[int] | None = None) -> list[dict]:
    """On-policy training items (the official finetune_gkd.py): the student samples a response to each prompt (left-padded,
    at most max_len - max_prompt_len new tokens; `seeds`: one random stream per row); the sequence is
    the gold prompt (no BOS) + response, truncated to max_len, with the prompt masked out of the labels."""
    eos = tokenizer.eos_token_id
    responses = sample_tokens(model, [it["prompt_ids"] for it in items], pad_id=tokenizer.pad_token_id,
                              eos_id=eos, max_new_tokens=cfg.max_len - cfg.max_prompt_len,
                              batch_size=cfg.gen_batch_size, seeds=seeds, desc="on-policy", sampler=cfg.sampler,
                              compile=cfg.compile_sampler == "on" or (cfg.compile_sampler == "auto" and
                                                                      next(model.parameters()).is_cuda))
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
        with autocast(device, amp_dtype), final_hidden(model) as h:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            _, (ce, _) = step_losses(model, None, h[0], None, batch, cfg, MethodState())
        total += ce.item()
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
# Routing control: one mechanism for every supported MoE teacher (KA sampling, ALL, SAR, k-sweeps)

# The router protocol: every MoE layer has a router module with `num_experts` and `top_k`. A router that
# has a `routing` attribute (moekd's Llama-MoE gate) routes by it itself: None = native, else a callable
# (logits [N, E], native k) -> (index [N, K], kept slots [N, K] or None), and applies its own weight rule.
# A transformers-5 router gets its forward replaced for the block: the same logits, then its family's
# mechanism (scores -> selection -> weights over the chosen set), then its output (docs/families.md).
# Router class -> (family, mechanism, options). Options: norm (renormalise the chosen weights; default the
# router's norm_topk_prob), cast (weights in the logits' dtype; "input": in the hidden states'), unsorted (the
# family's top-k is sorted=False, which orders the experts' sum), eps (added to the norm's sum), clamp (the
# norm's sum clamped below at the router's norm_min instead), gmax (a group scores by its best expert,
# DeepSeek-V2), bias_arg (the selection bias is the forward's argument). The family's numerics, which bf16
# autocast exposes: logits ("fp32in": the linear on fp32 copies of input and weight, which autocast still
# runs in bf16; "fp32": the same with autocast off; "upcast": the logits cast to fp32 after the linear;
# default: the input in the weight's dtype), raw (the sigmoid of the logits in their own dtype, not of their
# fp32 copy), promote (the norm divides out of place: under CUDA autocast its fp32 sum promotes the weights;
# default in place, the weights keep their dtype).
N = dict(norm=True)
C = dict(cast=True)
D = dict(unsorted=True, logits="fp32in", raw=True, eps=1e-20)  # DeepSeek-V3's router (11 families)
HF_ROUTERS = {
    "MixtralTopKRouter": ("Mixtral", "softmax", N), "MiniMaxTopKRouter": ("MiniMax", "softmax", N),
    "Qwen2MoeTopKRouter": ("Qwen2-MoE", "softmax", C), "Qwen3MoeTopKRouter": ("Qwen3-MoE", "softmax", C),
    "OlmoeTopKRouter": ("OLMoE", "softmax", C), "FlexOlmoTopKRouter": ("FlexOlmo", "softmax", C),
    "Qwen3NextTopKRouter": ("Qwen3-Next", "softmax", C), "Qwen3_5MoeTopKRouter": ("Qwen3.5-MoE", "softmax", N | C),
    "JambaTopKRouter": ("Jamba", "softmax", dict(cast="input")),
    "HunYuanMoEV1Gate": ("HunYuan-V1-MoE", "softmax", N | C),
    "Ernie4_5_MoeTopKRouter": ("ERNIE-4.5-MoE", "softmax", N | dict(cast="input", clamp=True, logits="fp32")),
    "DeepseekV2TopkRouter": ("DeepSeek-V2", "softmax", dict(unsorted=True, gmax=True, logits="fp32in")),
    "GptOssTopKRouter": ("GPT-OSS", "logits", C),
    "GraniteMoeTopKRouter": ("GraniteMoE", "logits", dict(cast="input", logits="upcast")),
    "GraniteMoeSharedTopKRouter": ("GraniteMoE-Shared", "logits", dict(cast="input", logits="upcast")),
    "GraniteMoeHybridTopKRouter": ("GraniteMoE-Hybrid", "logits", dict(cast="input", logits="upcast")),
    "DeepseekV3TopkRouter": ("DeepSeek-V3", "sigmoid", D), "DeepseekV32TopkRouter": ("DeepSeek-V3.2", "sigmoid", D),
    "Dots1TopkRouter": ("Dots1", "sigmoid", D), "KimiLinearTopkRouter": ("Kimi-Linear", "sigmoid", D),
    "MiMoV2FlashTopkRouter": ("MiMo-V2-Flash", "sigmoid", D), "NemotronHTopkRouter": ("Nemotron-H", "sigmoid", D),
    "Glm4MoeTopkRouter": ("GLM-4-MoE", "sigmoid", D), "Glm4MoeLiteTopkRouter": ("GLM-4-MoE-Lite", "sigmoid", D),
    "GlmMoeDsaTopkRouter": ("GLM-MoE-DSA", "sigmoid", D), "ExaoneMoeTopkRouter": ("EXAONE-MoE", "sigmoid", D),
    "SolarOpenTopkRouter": ("Solar-Open", "sigmoid", D),
    "MiniMaxM2TopKRouter": ("MiniMax-M2", "sigmoid", dict(norm=True, unsorted=True, bias_arg=True)),
    "Lfm2MoeTopKRouter": ("LFM2-MoE", "sigmoid", dict(eps=1e-6, bias_arg=True, raw=True, promote=True)),
    "AfmoeTokenChoiceRouter": ("AFMoE", "sigmoid", N | dict(bias_arg=True, logits="upcast", eps=1e-20)),
    "Llama4Router": ("Llama 4", "llama4", {}),
}


def softmax_mechanism(router, logits, bias):
    """Softmax over the experts, top-k of the probabilities (ERNIE 4.5: of the probabilities plus its bias)."""
    probs = torch.softmax(logits, -1, dtype=torch.float)
    choice = router.moe_statics(probs) if hasattr(router, "moe_statics") else probs
    return probs, choice, lambda index, keep: probs.gather(1, index) * keep


def logits_mechanism(router, logits, bias):
    """Top-k of the logits, softmax over the chosen (in the logits' dtype)."""
    return torch.softmax(logits, -1, dtype=torch.float), logits, lambda index, keep: torch.softmax(
        logits.gather(1, index).masked_fill(~keep, float("-inf")), -1, dtype=logits.dtype)


def sigmoid_mechanism(router, logits, bias):
    """Sigmoid scores (raw: in the logits' dtype); the selection adds the bias; KA samples s / Σs, no bias."""
    s = (logits if HF_ROUTERS[type(router).__name__][2].get("raw") else logits.float()).sigmoid()
    law = s.float() / s.float().sum(-1, keepdim=True)  # KA's law in fp32, whatever the scores' dtype
    return law, s if bias is None else s + bias, lambda index, keep: s.gather(1, index) * keep


# (router, logits [N, E], selection bias) -> (sampling law [N, E], selection score [N, E], weights(index, kept))
MECHANISMS = {"softmax": softmax_mechanism, "logits": logits_mechanism, "sigmoid": sigmoid_mechanism,
              "llama4": lambda r, logits, bias: (sigmoid_mechanism(r, logits, None)[0], logits, None)}


@dataclass(frozen=True)
class Routing:
    """How MoE layers pick experts; called on router logits [N, E] and the native k: (index [N, K], kept or None).
    topk: the k best (k None: native); sample (KA): w.p. `prob` per token (None: always) k experts drawn
    without replacement from the router's probabilities, else the top-k; topp: the official gate's top-p, the
    most probable experts until their mass exceeds `top_p`; all: every expert. mass: "native" (a router that
    does not renormalise its chosen weights scales them to the mass its native selection would give, as the
    paper's gate keeps it by its softmax over the chosen; native_mass) or "literal" (the family's rule)."""
    mode: str = "topk"
    k: int | None = None
    prob: float | None = None
    generator: torch.Generator | None = None
    top_p: float | None = None
    mass: str = "native"

    def __call__(self, logits: torch.Tensor, native_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return select_experts(logits, self, native_k)

    def __post_init__(self):
        if self.mode not in ("topk", "sample", "topp", "all"):
            raise ValueError(f"routing mode must be topk, sample, topp or all, got {self.mode!r}")
        if self.prob is not None and not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"routing: sampling probability must be in [0, 1], got {self.prob}")
        if (self.mode == "topp") != (self.top_p is not None) or not 0.0 <= (self.top_p or 0.0) <= 1.0:
            raise ValueError(f"routing: mode topp needs top_p in [0, 1] (and only it), got {self.top_p}")
        if self.mass not in ("native", "literal"):
            raise ValueError(f"routing: mass must be native or literal, got {self.mass!r}")

    def native(self, native_k: int) -> bool:
        """Routes the family's own selection (top-k at its native k)."""
        return self.mode == "topk" and self.k in (None, native_k)


def sample_experts(probs: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """k distinct experts per row drawn without replacement in proportion to probs [N, E] -> [N, K]."""
    return torch.multinomial(probs.float(), k, replacement=False, generator=generator)


def top_p_experts(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts by falling probability [N, K] and which are kept [N, K] (the official gate: the first, then each
    while the mass before it is <= p); K is the batch's largest set, the other slots get weight 0."""
    values, index = probs.float().sort(dim=-1, descending=True)
    mass_before = values.cumsum(-1)
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[:, 1:] = mass_before[:, :-1] <= p
    k = int(keep.sum(-1).max())
    return index[:, :k], keep[:, :k]


def select_experts(choice: torch.Tensor, routing: Routing, native_k: int, probs: torch.Tensor | None = None,
                   top=lambda c, k: c.topk(min(k + 1, c.shape[-1]), dim=-1).indices[:, :k]):
    """(index [N, K], kept slots or None) from selection scores [N, E] (top-k) and the router's probabilities
    (sample, topp; default softmax(choice)); `top`: the family's top-k (default the official Llama-MoE gate's,
    the first k of topk(k + 1)). "sample" draws the sampled set S and one uniform per token, takes S if u < prob."""
    N, E = choice.shape
    probs = torch.softmax(choice.float(), dim=-1) if probs is None else probs
    if routing.mode == "all":
        return torch.arange(E, device=choice.device).expand(N, E), None
    if routing.mode == "topp":
        return top_p_experts(probs, routing.top_p)
    k = routing.k or native_k
    best = top(choice, k)
    if routing.mode == "topk":
        return best, None
    sampled = sample_experts(probs, k, generator=routing.generator)
    if routing.prob is None:
        return sampled, None
    u = torch.rand((N, 1), generator=routing.generator, device=choice.device)
    return torch.where(u < routing.prob, sampled, best), None


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """Every MoE layer's router (beside `experts`, or with a `routing`); an unsteerable family is an error."""
    routers = []
    for block in model.modules():
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        if not isinstance(router, nn.Module) or not (hasattr(block, "experts") or hasattr(router, "routing")):
            continue
        if not hasattr(router, "routing") and type(router).__name__ not in HF_ROUTERS:
            family = getattr(getattr(model, "config", None), "model_type", "?")
            raise ValueError(f"MoE family {family!r} ({type(router).__name__}) is not supported for routing control "
                             f"(supported: Llama-MoE and the {len(HF_ROUTERS)} transformers families of docs/families.md)")
        routers.append(router)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE layers")
    return routers


def num_experts(model: nn.Module) -> int:
    return moe_routers(model)[0].num_experts


def native_top_k(model: nn.Module) -> int:
    """Experts per token of the model's own routing."""
    return moe_routers(model)[0].top_k


def group_limited(router: nn.Module, choice: torch.Tensor, k: int, *, by_max: bool,
                  sort: bool) -> torch.Tensor:
    """The k best experts [N, k] under the router's group limit: a group scores by its best two (DeepSeek-V3) or
    its best expert (by_max, DeepSeek-V2), the topk_group best groups are chosen and the top-k is taken over their
    experts, as the family does. For k above the chosen groups' experts (KA's top-(N-1), --teacher-k, k-sweeps):
    all of those first, then the other experts by the same score, so the sets stay nested as k grows and the
    expert left out at N-1 is the lowest-scoring one outside the chosen groups."""
    groups = choice.view(choice.shape[0], router.num_group, -1)
    score = groups.max(-1).values if by_max else groups.topk(2, dim=-1).values.sum(-1)
    best = score.topk(router.topk_group, dim=-1, sorted=False).indices                   # as the family's own
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter(1, best, True)
    inside = chosen.unsqueeze(-1).expand_as(groups).reshape_as(choice)                        # [N, E]
    first = choice.masked_fill(~inside, float("-inf")).topk(min(k, router.topk_group * groups.shape[-1]),
                                                            dim=-1, sorted=sort).indices
    if k <= first.shape[-1]:
        return first
    rest = choice.masked_fill(inside, float("-inf")).topk(k - first.shape[-1], dim=-1).indices
    return torch.cat([first, rest], dim=-1)


def hf_routed_forward(router: nn.Module, routing: Routing, hidden_states: torch.Tensor, *args, **kwargs):
    """A transformers router's forward under `routing`: its logits, its family's mechanism, its output."""
    family, mechanism, opt = HF_ROUTERS[type(router).__name__]
    linear = next((m for m in (getattr(router, n, None) for n in ("gate", "wg")) if isinstance(m, nn.Linear)), router)
    h, w, how = hidden_states.reshape(-1, linear.weight.shape[1]), linear.weight, opt.get("logits")
    h, w = (h.float(), w.float()) if how in ("fp32in", "fp32") else (h.to(w.dtype), w)
    with torch.autocast(h.device.type, enabled=False) if how == "fp32" else contextlib.nullcontext():
        logits = F.linear(h, w, getattr(linear, "bias", None)).to(torch.float if how == "upcast" else None)
    bias = ([*args, *kwargs.values()] or [None])[0] if opt.get("bias_arg") else getattr(router, "e_score_correction_bias", None)
    probs, choice, weigh = MECHANISMS[mechanism](router, logits, bias if getattr(router, "use_expert_bias", True) else None)
    sort = not opt.get("unsorted")
    top = lambda c, k: c.topk(k, dim=-1, sorted=sort).indices                                    # noqa: E731
    if getattr(router, "num_group", None) and \
            getattr(router, "topk_method", "group_limited_greedy") == "group_limited_greedy":  # not KA's draws, all
        top = functools.partial(group_limited, router, by_max=opt.get("gmax", False), sort=sort)
    index, keep = select_experts(choice, routing, router.top_k, probs, top)
    keep = torch.ones_like(index, dtype=torch.bool) if keep is None else keep
    if mechanism == "llama4":  # dense [N, E] scores, the sigmoid of the chosen logits, 0 elsewhere
        chosen = logits.gather(1, index).masked_fill(~keep, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, index, chosen).float().sigmoid().to(logits.dtype), logits
    weights = weigh(index, keep)
    if opt.get("norm", getattr(router, "norm_topk_prob", False)):
        total = weights.sum(dim=-1, keepdim=True)
        total = total.clamp(min=router.norm_min) if opt.get("clamp") else total + opt.get("eps", 0.0)
        weights = (weights / total).to(None if opt.get("promote") else weights.dtype)  # None: as computed
    elif routing.mass == "native" and mechanism != "logits" and not routing.native(router.top_k):
        native = weigh(top(choice, router.top_k), torch.ones_like(index[:, :1], dtype=torch.bool))
        weights = native_mass(weights.float(), native.float()).to(weights.dtype)  # fp32, before scale and casts
    scale = next((getattr(router, a) for a in ("routed_scaling_factor", "route_scale") if hasattr(router, a)), 1.0)
    weights = weights * scale
    return logits, weights.to({True: logits.dtype, "input": hidden_states.dtype}.get(opt.get("cast"))), index


def native_mass(weights: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
    """Chosen weights [N, K] scaled per token to the sum of the native selection's weights [N, k]: a router that
    does not renormalise keeps its routed output's loudness under ALL, KA, top-p or another k, as the paper's
    gate does (the factor keeps its gradient, like a renormalising softmax); a token of mass 0 stays 0."""
    total = weights.sum(-1, keepdim=True)
    return weights * torch.where(total > 0, native.sum(-1, keepdim=True) / total.where(total > 0, 1.0), 0.0)


def experts_backend(model: nn.Module, mode: str) -> list[tuple[Any, str]]:
    """Switch the experts' backend where `mode` needs it: batched_mm materialises (T·K, 2I, H) weights, too much
    for all experts (-> grouped_mm); grouped_mm fails on CPU for rows not a multiple of 16 bytes (-> eager).
    Returns (config, old backend) to restore."""
    saved = []
    for m in model.modules():
        config, old = getattr(m, "config", None), getattr(getattr(m, "config", None), "_experts_implementation", None)
        if not hasattr(m, "_is_expert_parallel") or old is None or any(c is config for c, _ in saved):
            continue
        new = "grouped_mm" if mode == "all" and old == "batched_mm" else old
        if new == "grouped_mm" and any(p.device.type == "cpu" and p.shape[-1] * p.element_size() % 16 for p in m.parameters()):
            new = "eager"
        if new != old:
            print(f"moe_routing {mode}: experts backend {old} -> {new}")
            saved.append((config, old))
            config._experts_implementation = new
    return saved


@contextlib.contextmanager
def moe_routing(model: nn.Module, mode: str = "topk", *, k: int | None = None, prob: float | None = None,
                generator: torch.Generator | None = None, top_p: float | None = None,
                mass: str = "native") -> Iterator[list[nn.Module]]:
    """Route every MoE layer of `model` by `mode` (see Routing) inside the block; restored on exit, even on errors."""
    routing = Routing(mode, k, prob, generator, top_p, mass)
    routers = moe_routers(model)
    for r in routers:
        if k is not None and not 1 <= k <= r.num_experts:
            raise ValueError(f"routing: k={k} is outside [1, {r.num_experts}] experts")
    saved, backends = [], experts_backend(model, mode)
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
        for config, old in backends:
            config._experts_implementation = old


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
    """What SAR trains: Llama-MoE gate.gate_network + gate.weight_noise; transformers routers' parameters, not
    a selection bias (e_score_correction_bias, balanced by counting, not by gradients)."""
    return [p for r in moe_routers(model) for n, p in r.named_parameters() if "e_score_correction_bias" not in n]


def router_balance_loss(records: list[tuple[nn.Module, Any]], beta: float) -> torch.Tensor:
    """SAR's balance term from the routers' outputs of one forward (record_routing): a Llama-MoE gate's own
    loss (its config weight, pads included as the official gate), summed over layers; for a transformers family
    with its own auxiliary loss (its modeling file's load_balancing_loss_func) beta * that loss over all its
    layers' logits, else beta * Sum_layers cv2(importance) + cv2(load) of the routing weights."""
    terms, own = [], {}
    for router, out in records:
        aux = getattr(sys.modules[type(router).__module__], "load_balancing_loss_func", None)
        if getattr(router, "balance_loss", None) is not None:
            terms.append(router.balance_loss)
            continue
        if aux is not None:
            own.setdefault(aux, []).append((router, out[0]))
            continue
        if len(out) == 2:  # Llama 4: dense scores [N, E]
            full = out[0]
        else:
            _, weights, index = out
            full = torch.zeros(index.shape[0], router.num_experts, dtype=weights.dtype, device=weights.device)
            full = full.scatter(1, index, weights)
        terms.append(beta * (cv_squared(full.sum(0)) + cv_squared((full > 0).sum(0))))
    for aux, layers in own.items():
        terms.append(beta * aux(tuple(logits for _, logits in layers), layers[0][0].num_experts, layers[0][0].top_k))
    return torch.stack(terms).sum()


# ----------------------------------------------------------------------------
# Losses (pure: logits in, scalar out; fp32 inside). From hidden states and output heads: hidden_losses.py

def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position t is a loss position when its next token labels[t+1] is a response token.
    Kept [B, T] (last column False) so logits never need a non-contiguous [:, :-1] copy."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


class _RowKL(torch.autograd.Function):
    """Mean over m of KL(softmax(a) || softmax(b_m)) at rows `rows` of a [N, V], b [M, N, V] -> [N] fp32 (0
    elsewhere): Sum_v p_a (log p_a - mean_m log p_bm) is that mean, so KA's M passes cost one KL. In fp32
    chunks of rows; backward recomputes: dKL/da = p_a (log p_a - log p_b - KL), dKL/db = p_b - p_a (M = 1)."""

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
    """Sum_v p_a (log p_a - mean_m log p_bm) of a [n, V], b [M, n, V] in fp32; keep: also p_a, the log-ratio."""
    diff = a.float().log_softmax(-1)
    pa = diff.exp()
    log_pb = b.float() if b_is_log_probs else b.float().log_softmax(-1)
    diff.sub_(log_pb[0] if b.shape[0] == 1 else log_pb.mean(0)).masked_fill_(pa == 0, 0.0)
    kl = (pa * diff).sum(-1)
    return (kl, pa, diff) if keep else kl


def kl_per_token(target_logits: torch.Tensor, input_logits: torch.Tensor, mask: torch.Tensor, *,
                 chunk: int = 256, input_is_log_probs: bool = False) -> torch.Tensor:
    """KL(softmax(target) || softmax(input)) per position, exact over the vocabulary, `chunk` positions at a
    time (kl_reference is the formula): [B, T, V], mask [B, T] -> [B, T] fp32, 0 off the mask. input [M, B, T, V]
    (or log-probabilities): the mean over m of KL(target || input_m). Differentiable in both (M = 1)."""
    V = target_logits.shape[-1]
    if input_logits.shape[-1] != V:
        raise ValueError(f"KL over different vocabularies: {V} vs {input_logits.shape[-1]} logits")
    inputs = input_logits.reshape(-1 if input_logits.dim() > target_logits.dim() else 1, mask.numel(), V)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return _RowKL.apply(target_logits.reshape(-1, V), inputs, rows, chunk, input_is_log_probs).view(mask.shape)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(q_student || p_teacher) = Sum_v q (log q - log p), mean over masked tokens: GKD/ALL/KA/SAR's loss."""
    return kl_per_token(student_logits, teacher_logits, mask).sum() / mask.sum().clamp_min(1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || q_student) = Sum_v p (log p - log q), mean over masked tokens (0 if none)."""
    return kl_per_token(teacher_logits, student_logits, mask).sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------
# Method steps: (model, teacher, batch, cfg) -> named losses; "loss" is what gets backpropagated.
# Every loss is a *sum over tokens* divided by `norm`, the token count of the normalisation
# group (the global batch by default), so micro-batching does not change the update.

def balance_loss(model: nn.Module, outputs) -> torch.Tensor | None:
    """An MoE's own load-balancing loss of the last forward: its routers' (a Llama-MoE gate's, weighted by
    its config, summed over layers), or a transformers MoE's router_aux_loss_coef * aux_loss."""
    own = [m.balance_loss for m in model.modules() if hasattr(m, "routing") and getattr(m, "balance_loss", None) is not None]
    if own:
        return torch.stack(own).sum()
    aux = getattr(outputs, "aux_loss", None)
    return None if aux is None else model.config.router_aux_loss_coef * aux


@contextlib.contextmanager
def final_hidden(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block a forward computes no logits: the output head gets an empty slice of the final hidden
    states (logits [B, 0, V]) and the yielded list the hidden states [B, T, H] themselves, which also go into the
    output's hidden_states, before FSDP2's hooks: the backward enters the model there (FSDP2 gathers the root)."""
    kept, inner = [], unwrap(model)
    def keep(module, args):
        kept.append(args[0])
        return (args[0][..., :0, :],)
    def expose(module, args, output):
        if isinstance(output, dict):
            output["hidden_states"] = (kept[-1],)
    handles = [inner.get_output_embeddings().register_forward_pre_hook(keep),
               inner.register_forward_hook(expose, prepend=True)]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def output_head(model: nn.Module, device: torch.device | None = None) -> Head:
    """A causal LM's output head on `device` (FSDP2-sharded: gathered, once per call) with the logit scaling / soft
    cap of the families that have one (Cohere, Granite, Gemma); check_head verifies it gives the model's logits."""
    inner = unwrap(model)
    linear, c = inner.get_output_embeddings(), inner.config
    full = lambda t: None if t is None else (t.full_tensor() if hasattr(t, "full_tensor") else t).to(device)  # noqa: E731
    scale = (getattr(c, "logit_scale", None) or 1.0) / (getattr(c, "logits_scaling", None) or 1.0)
    return Head(full(linear.weight), full(linear.bias), scale, getattr(c, "final_logit_softcapping", None))


@torch.no_grad()
def check_head(model: nn.Module, what: str) -> None:
    """The losses apply output_head to the final hidden states themselves: check, on random hidden states
    whose logits are large enough for a scaling or soft cap to show, that this is what the model computes."""
    kept = []
    def probe(module, args):
        h = torch.randn_like(args[0])
        kept.append(h * (20 / F.linear(h, module.weight).float().std()).to(h.dtype))
        return (kept[0],)
    handle = model.get_output_embeddings().register_forward_pre_hook(probe)
    try:
        logits = model(input_ids=torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)).logits.float()
    finally:
        handle.remove()
        if hasattr(model, "reshard"):  # FSDP2 keeps a root gathered after its forward: the optimizer wants shards
            model.reshard()
    if not torch.allclose(head_logits(kept[0], output_head(model), logits.shape[-1])[0], logits, rtol=0.02, atol=0.1):
        raise MoekdError(f"{what}: {type(model).__name__} turns its last hidden state into logits in a way moekd does "
                         f"not know (it applies logit_scale, logits_scaling, final_logit_softcapping), so its losses "
                         f"cannot be computed from hidden states")


def forward_with_balance(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final hidden states [B, T, H] (no logits) and the model's own balance loss (None for dense models).
    The forward goes through a DDP wrapper (gradient sync), the head and attribute checks do not."""
    inner = unwrap(model)
    kwargs = {"output_router_logits": True} if is_moe(inner) and not hasattr(inner, "moe_config") else {}
    with final_hidden(inner) as kept:
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    return kept[0], balance_loss(inner, outputs)


def step_losses(model, teacher, h: torch.Tensor, t: torch.Tensor | None, batch: dict, cfg: Config,
                state: MethodState, **weights) -> tuple[torch.Tensor, torch.Tensor]:
    """head_losses at the batch's loss positions, on the student's device: hidden states h [B, T, H], the teacher's
    t [M*B, T, H] or None, over state.vocab (the tokenizer's: no padding rows; default the smaller head)."""
    mask = loss_mask(batch["labels"]).view(-1)
    head_s, head_t = output_head(model), None if teacher is None else output_head(teacher, h.device)
    if t is not None:
        t = t.to(h.device).view(-1, mask.numel(), t.shape[-1])[:, mask]
    vocab = state.vocab or min(x.weight.shape[0] for x in (head_s, head_t) if x is not None)
    labels = batch["labels"].roll(-1, 1).reshape(-1)[mask]  # position t predicts token t + 1
    return head_losses(h.flatten(0, 1)[mask], head_s, labels, t, head_t, vocab=vocab, chunk_mb=cfg.kl_chunk, **weights)


def add_balance(parts: dict, balance: torch.Tensor | None, n_micro: int) -> dict:
    """Add the model's balance loss, once per micro-batch and averaged over the step's micro-batches."""
    if balance is not None:
        parts["lb"] = balance / n_micro
        parts["loss"] = parts["loss"] + parts["lb"]
    return parts


@dataclass
class MethodState:
    """What a method step needs beyond the batch: the compute dtype, KA's expert-draw generator (seeded per
    micro-batch), SAR's router optimizer, and whether the teacher is FSDP2-sharded."""
    amp_dtype: torch.dtype = torch.float32
    generator: torch.Generator | None = None
    router_optimizer: torch.optim.Optimizer | None = None
    sharded_teacher: bool = False
    vocab: int | None = None  # the tokenizer's size: the KL's vocabulary when heads have padding rows

    def optimizers(self, student_optimizer) -> list:
        return [student_optimizer] + ([self.router_optimizer] if self.router_optimizer else [])


def method_state(cfg: Config, teacher, amp_dtype: torch.dtype, vocab: int | None = None) -> MethodState:
    """SAR's router AdamW (constant LR, the student's weight decay and clip); KA's generator; the distillation
    vocabulary (`vocab`, the tokenizer's size)."""
    m = cfg.spec
    state = MethodState(amp_dtype, sharded_teacher=cfg.shard_teacher, vocab=vocab if m.teacher else None)
    if m.routers:
        state.router_optimizer = torch.optim.AdamW(param_groups(teacher, cfg.weight_decay), lr=cfg.router_lr)
    if m.teacher == "sample":
        state.generator = torch.Generator(device=next(teacher.parameters()).device)
    return state


def teacher_routing(teacher: nn.Module, cfg: Config, generator: torch.Generator | None):
    """The teacher's routing for a method: KA (on-policy or gold) samples N-1 of N experts with probability
    lambda (else its top-(N-1)), ALL and SAR use every expert, KD/GKD the native top-k (or --teacher-k,
    --teacher-top-p)."""
    routing = cfg.spec.teacher
    if routing == "sample":
        k = cfg.ka_k or num_experts(teacher) - 1
        return moe_routing(teacher, "sample", k=k, prob=cfg.ka_lambda, generator=generator, mass=cfg.routed_mass)
    if routing == "all":
        return moe_routing(teacher, "all", mass=cfg.routed_mass)
    if cfg.teacher_k is not None:
        return moe_routing(teacher, "topk", k=cfg.teacher_k, mass=cfg.routed_mass)
    if cfg.teacher_top_p is not None:
        return moe_routing(teacher, "topp", top_p=cfg.teacher_top_p, mass=cfg.routed_mass)
    return contextlib.nullcontext()


@torch.no_grad()
def teacher_hidden(teacher: nn.Module, batch: dict, *, repeat: int = 1,
                   amp_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The teacher's final hidden states on its device, [repeat*B, T, H], under autocast on that device (no
    logits). Repeating the rows runs KA's M passes as one batched forward; every row gets its own expert
    draws in every layer."""
    device = next(teacher.parameters()).device
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with autocast(device, amp_dtype), final_hidden(teacher) as kept:
        teacher(input_ids=ids.repeat(repeat, 1), attention_mask=attn.repeat(repeat, 1))
    return kept[0]


def sft_step(model, teacher, batch, cfg, *, norm, n_micro, state=MethodState()) -> dict[str, torch.Tensor]:
    """SFT: CE on gold response tokens (+ the model's balance loss, gate noise on in train mode)."""
    h, balance = forward_with_balance(model, batch)
    loss, sums = step_losses(model, None, h, None, batch, cfg, state, ce_weight=1 / norm)
    return add_balance({"loss": loss, "ce": sums[0] / norm}, balance, n_micro)


def kd_step(model, teacher, batch, cfg, *, norm, n_micro, state=MethodState()) -> dict[str, torch.Tensor]:
    """KD (Sanh 2019) on gold data: (1 - r) CE + r KL(p_teacher || q_student), r = --kd-ratio (0.5).
    ka-gold (the official temp_nr scripts): the KL term is the mean of KL(p_m || q_student) over KA's M
    sampled teachers, in one pass over the M teachers' hidden states. The official code writes the soft term
    as -Sum p log q; it differs from KL by H(p), a constant."""
    M = cfg.ka_m if cfg.spec.passes else 1
    with teacher_routing(teacher, cfg, state.generator):
        t = teacher_hidden(teacher, batch, repeat=M, amp_dtype=state.amp_dtype)
    h, balance = forward_with_balance(model, batch)
    loss, sums = step_losses(model, teacher, h, t, batch, cfg, state, ce_weight=(1 - cfg.kd_ratio) / norm,
                             kl_weight=cfg.kd_ratio / norm, reverse=False)
    return add_balance({"loss": loss, "ce": sums[0] / norm, "fkl": sums[1] / norm}, balance, n_micro)


def reverse_kl_step(model, teacher, batch, cfg, *, norm, n_micro, state=MethodState()) -> dict[str, torch.Tensor]:
    """GKD, ALL, KA and SAR's student update: KL(q_student || p_teacher) on the student's own samples,
    the teacher under the method's routing. KA: mean of the M sampled teachers' losses (the official
    code), computed as one KL against the mean of their log-probabilities (the same number)."""
    M = cfg.ka_m if cfg.spec.passes and cfg.ka_updates == "mean" else 1
    with teacher_routing(teacher, cfg, state.generator):
        t = teacher_hidden(teacher, batch, repeat=M, amp_dtype=state.amp_dtype)  # [M*B, T, H]
    h, balance = forward_with_balance(model, batch)
    loss, _ = step_losses(model, teacher, h, t, batch, cfg, state, kl_weight=1 / norm)
    return add_balance({"loss": loss, "rkl": loss}, balance, n_micro)


def sar_router_update(model, teacher, micro: list[dict], norms: list[float], cfg: Config,
                      state: MethodState, *, step: int = 0, dist: Dist = SINGLE) -> dict[str, float]:
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
        with torch.no_grad(), autocast(device, state.amp_dtype), final_hidden(student) as q:
            student(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
        torch.manual_seed(stream_seed(cfg.seed, step, first + m, "router"))  # the gates' noise
        # also around the backward: --grad-checkpointing re-runs the forward
        with moe_routing(teacher, "all", mass=cfg.routed_mass):
            with autocast(t_device, state.amp_dtype), record_routing(teacher) as routed, final_hidden(teacher) as p:
                teacher(input_ids=mb["input_ids"].to(t_device), attention_mask=mb["attention_mask"].to(t_device))
                lb = router_balance_loss(routed, cfg.sar_beta) / n_micro
            with autocast(device, state.amp_dtype):  # into the routers through the teacher's hidden states
                kl, _ = step_losses(student, teacher, q[0], p[0], mb, cfg, state, kl_weight=1 / norm,
                                    reverse=cfg.sar_kl == "student-teacher")  # teacher-student: KL(p || q)
            ((kl + lb) * dist.world).backward()
        logs["router_kl"] += kl.item()
        logs["router_lb"] += lb.item()
    params = router_parameters(teacher)
    if not state.sharded_teacher:
        average_gradients(params, dist)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    state.router_optimizer.step()
    state.router_optimizer.zero_grad(set_to_none=True)
    teacher.eval()
    return logs


STEPS = {"sft": sft_step, "kd": kd_step, "reverse_kl": reverse_kl_step}  # Method.step -> the student's step


def method_step(method: str):
    """The student's step of a method, named by its row (a new method: a row, and a STEPS entry if new)."""
    return STEPS[METHODS[method].step]


# ----------------------------------------------------------------------------
# Random streams: every draw of a step is seeded from its position in the global batch (each row's
# on-policy sample from (seed, step, row); gate noise and KA draws from (seed, step, micro-batch)), so a
# run does not depend on how the batch is split over devices and accumulation, and resuming needs no RNG state.

def stream_seed(seed: int, step: int, index: int, stream: str) -> int:
    """Seed of one random stream: a hash of (run seed, step, index of the row or micro-batch in the
    global batch, stream name), so streams never collide and do not depend on the device count."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
    (as TRL fixed it for accumulation, trl PR #6006); micro: own tokens x #micro-batches (mean of micro means)."""
    counts = [max(int(loss_mask(mb["labels"]).sum()), 1) for mb in micro]
    if mode == "global":
        return [all_reduce_sum([float(sum(counts))], dist)[0]] * len(micro)
    return [float(c * len(micro) * dist.world) for c in counts]


def train_step(cfg: Config, model, teacher, tokenizer, rows: list[dict], optimizer, lr: float,
               state: MethodState, *, step: int = 0, dist: Dist = SINGLE) -> dict[str, float]:
    """One optimizer step on a global batch: this rank's micro-batches, their on-policy samples
    (gkd/all/ka/sar), SAR's router update, then the student's backward passes, grad clip and AdamW.
    Returns the loss parts summed over all ranks' micro-batches, and the token count."""
    device, amp_dtype, student, method = next(model.parameters()).device, state.amp_dtype, unwrap(model), cfg.spec
    first, per_rank = dist.rank * cfg.grad_accum, cfg.batch_size * cfg.grad_accum
    mine = rows[dist.rank * per_rank:(dist.rank + 1) * per_rank]
    if method.on_policy:  # row i of the global batch samples from its own stream (seed, step, i)
        seeds = [stream_seed(cfg.seed, step, dist.rank * per_rank + i, "sample") for i in range(len(mine))]
        with autocast(device, amp_dtype):
            mine = generate_on_policy(student, mine, tokenizer, cfg, seeds)
    B = cfg.batch_size
    micro = [collate(mine[m * B:(m + 1) * B], tokenizer.pad_token_id) for m in range(cfg.grad_accum)]
    norms, n_micro = loss_norms(micro, cfg.loss_norm, dist), len(micro) * dist.world
    logs = sar_router_update(model, teacher, micro, norms, cfg, state, step=step, dist=dist) if method.routers else {}
    updates = cfg.ka_m if method.passes and method.on_policy and cfg.ka_updates == "each" else 1
    for group in optimizer.param_groups:
        group["lr"] = lr
    for u in range(updates):
        model.train()
        for m, (mb, norm) in enumerate(zip(micro, norms)):
            mb = {k: v.to(device) for k, v in mb.items()}
            torch.manual_seed(stream_seed(cfg.seed, step, first + m, f"train{u}"))  # gate noise, dropout
            if state.generator is not None:
                state.generator.manual_seed(stream_seed(cfg.seed, step, first + m, f"ka{u}"))
            last = m == len(micro) - 1  # ranks reduce gradients in the last backward only
            with autocast(device, amp_dtype), gradient_sync(model, last):
                parts = method_step(cfg.method)(model, teacher, mb, cfg, norm=norm, n_micro=n_micro, state=state)
                (parts["loss"] * dist.world).backward()  # DDP/FSDP average over ranks: x world makes it the sum
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v.item() / updates
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not is_finite(grad_norm):  # the same on every rank (gradients are synced): name a non-finite loss first
            check_finite("loss", all_reduce_sum([logs.get("loss", 0.0)], dist)[0], step)
        check_finite("gradient norm", grad_norm, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    logs["tokens"] = float(sum(int(mb["attention_mask"].sum()) for mb in micro))
    logs = dict(zip(sorted(logs), all_reduce_sum([logs[k] for k in sorted(logs)], dist)))
    check_finite("loss", logs["loss"], step)
    return logs


def is_finite(value) -> bool:
    return math.isfinite(float(value.full_tensor() if hasattr(value, "full_tensor") else value))  # DTensor: FSDP2


def check_finite(what: str, value, step: int) -> None:
    """A one-line stop for a non-finite loss or gradient norm; +inf loss: the teacher's -inf where q has mass."""
    value = float(value.full_tensor() if hasattr(value, "full_tensor") else value)
    if not math.isfinite(value):
        cause = ("a token the teacher gives probability 0 (log-probability -inf) has mass under the student, "
                 "or the run diverged: try a lower --lr") if value == math.inf and what == "loss" else "try a lower --lr"
        raise RunStopped(f"step {step + 1}: the {what} is {value}, nothing of this step is kept ({cause})")


def router_state_dict(teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's router parameters, full tensors on the CPU. On an FSDP2-sharded teacher this
    gathers the shards: every rank must call it."""
    ids = {id(p) for p in router_parameters(teacher)}
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731 (DTensor shards)
    return {name: full(p.detach()).contiguous().cpu() for name, p in teacher.named_parameters() if id(p) in ids}


def load_routers(teacher: nn.Module, path: str | Path) -> None:
    """Load SAR-trained routers (a teacher_routers.safetensors, or a directory holding one); the file must
    hold exactly the teacher's router parameters."""
    path = Path(path)
    path = path / ROUTERS_FILE if path.is_dir() else path
    if not path.is_file():
        raise MoekdError(f"--teacher-routers {path}: no such file")
    tensors, expected = read_safetensors(path), set(router_state_dict(teacher))
    if set(tensors) != expected:
        differ = sorted(set(tensors) ^ expected)
        raise MoekdError(f"{path}: router keys do not match the teacher ({len(differ)} differ, e.g. {differ[0]})")
    load_state_dict_strict(teacher, iter(tensors.items()), where=str(path), partial=True)


@dataclass
class Progress:
    """The loop's running record; a checkpoint's trainer_state.pt holds it beside the optimizers."""
    step: int = 0
    best_rougeL: float = -math.inf
    history: list = field(default_factory=list)
    window: dict = field(default_factory=dict)  # loss sums since the last log line
    window_steps: int = 0
    busy: float = 0.0                           # seconds of training work since the last log line (not saved)

    def log_line(self, done: int, total: int, epoch: int, lr: float) -> str:
        """The log line of the steps since the last one (their mean losses); also appended to the history."""
        n, tokens = self.window_steps, self.window.pop("tokens")
        parts = " | ".join(f"{k} {self.window[k] / n:.4f}" for k in sorted(self.window, key=lambda k: k != "loss"))
        line = (f"step {done}/{total} | epoch {epoch} | {parts} | lr {lr:.2e} | {tokens / self.busy:.0f} tok/s | "
                f"{1000 * self.busy / n:.0f} ms")
        self.history.append({"step": done, **{k: v / n for k, v in self.window.items()}})
        self.window, self.window_steps, self.busy = {}, 0, 0.0
        return line


def train(cfg: Config, model: nn.Module, teacher: nn.Module | None, tokenizer, train_items: list[dict],
          dev_items: list[dict], *, out: Path, device: torch.device, amp_dtype: torch.dtype,
          state: dict | None = None, dist: Dist = SINGLE, stop: StopSignals | None = None) -> dict:
    """The optimizer steps of a run, each in four phases: step, log, evaluate (and keep the best), checkpoint.
    Under torchrun `model` is DDP-wrapped; rank 0 alone logs, evaluates and saves (the others wait at a
    barrier) and the returned metrics are rank 0's. `stop`: SIGINT/SIGTERM end the run at a step boundary,
    after a checkpoint."""
    global_batch = cfg.batch_size * dist.world * cfg.grad_accum
    steps_per_epoch = len(train_items) // global_batch
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    student, routers_learn = unwrap(model), cfg.spec.routers
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    ms, run = method_state(cfg, teacher, amp_dtype, vocab=len(tokenizer)), Progress()
    if state is not None:
        load_optimizer_state(student, optimizer, state["optimizer"])
        if ms.router_optimizer:
            load_optimizer_state(teacher, ms.router_optimizer, state["router_optimizer"])
        run = Progress(state["step"], state["best_rougeL"], state["history"], state["window"], state["window_steps"])
        if dist.main:
            truncate_log(out / "log.txt", run.step)
    def report(line: str) -> None:  # rank 0: stdout and log.txt
        if dist.main:
            print(line)
            append_line(out / "log.txt", line)
    def snapshot() -> tuple[dict | None, dict | None]:  # student and router weights; every rank calls it
        return (full_state_dict(student) if is_sharded(student) else None,
                router_state_dict(teacher) if routers_learn else None)
    def save(directory: Path) -> None:
        weights, routers = snapshot()
        if dist.main:
            write_atomically(directory, lambda d: save_run_model(d, student, tokenizer, routers, state_dict=weights))

    if dist.main:
        print(f"train: {len(train_items)} examples, global batch {global_batch} ({cfg.batch_size} x {dist.world} "
              f"device(s) x {cfg.grad_accum} accumulation), {steps_per_epoch} steps/epoch, {total} steps, "
              f"lr {cfg.lr:g} {cfg.lr_schedule}")
    start, step, signalled = run.step, run.step, 0
    stop = stop or StopSignals(out, dist)
    stop.step, stop.deferred = start, True
    for step in range(start, total):
        done, epoch = step + 1, step // steps_per_epoch + 1
        # -- step: one global batch (on-policy sampling, SAR's router update, the student's update)
        t0 = time.perf_counter()
        if cfg.restart_epochs and step % steps_per_epoch == 0 and step > 0:
            for opt in ms.optimizers(optimizer):
                opt.state.clear()  # each official loop epoch is a fresh job with a fresh optimizer
        lr = lr_at(step, lr=cfg.lr, schedule=cfg.lr_schedule, total=total, warmup=cfg.warmup_steps, lr_min=cfg.lr_min)
        logs = train_step(cfg, model, teacher, tokenizer, step_rows(train_items, cfg, step, steps_per_epoch, dist.world),
                          optimizer, lr, ms, step=step, dist=dist)
        for k, v in logs.items():
            run.window[k] = run.window.get(k, 0.0) + v
        run.step, run.window_steps, run.busy = done, run.window_steps + 1, run.busy + time.perf_counter() - t0
        # -- log
        if done % cfg.log_every == 0 or done == total:
            report(run.log_line(done, total, epoch, lr))
        # -- evaluate at epoch ends: dev loss and ROUGE-L; keep the best model (--select best)
        epoch_end = done % steps_per_epoch == 0 or done == total
        if epoch_end and cfg.dev_eval:
            if dist.main or is_sharded(student):  # a sharded student's forward needs every rank
                metrics = evaluate_dev(student, tokenizer, dev_items, cfg, device=device, amp_dtype=amp_dtype)
            if dist.main:
                report(f"dev step {done} | dev_loss {metrics['dev_loss']:.4f} | dev_rougeL {metrics['dev_rougeL']:.2f}")
                run.history.append({"step": done, **metrics})
            improved = all_reduce_sum([float(dist.main and metrics["dev_rougeL"] > run.best_rougeL)], dist)[0] > 0
            if improved and cfg.select == "best":
                save(out / "best_rougeL")
            if improved and dist.main:
                run.best_rougeL = metrics["dev_rougeL"]
        # -- checkpoint: at epoch ends, every --save-every steps, at the end and when stopping
        signalled = stop.agreed()  # every rank, every step: they stop together
        stopping = cfg.stop_after is not None and done - start >= cfg.stop_after or bool(signalled)
        if epoch_end or stopping or done == total or bool(cfg.save_every and done % cfg.save_every == 0):
            ckpt = {"optimizer": optimizer_state(student, optimizer), "best_rougeL": run.best_rougeL,
                    "history": run.history, "window": run.window, "window_steps": run.window_steps}
            if ms.router_optimizer:
                ckpt["router_optimizer"] = optimizer_state(teacher, ms.router_optimizer)
            weights, routers = snapshot()
            if dist.main:
                save_checkpoint(out, done, student, tokenizer, weights, routers, ckpt)
            barrier(dist)  # nobody runs ahead (or exits) while rank 0 evaluates (epoch ends) and writes
        stop.step = done
        if stopping and done < total:
            if signalled:
                break
            if dist.main:  # on stdout only: log.txt reads the same as an uninterrupted run's
                print(f"stopped after {cfg.stop_after} steps at step {done}/{total}; continue with --resume")
            break
    result = finish(cfg, out, run, total, student, teacher, ms.optimizers(optimizer), save, device=device,
                    dist=dist)
    if signalled and run.step < total:
        raise stop.stopped(signalled, run.step, total)
    return result


def finish(cfg: Config, out: Path, run: Progress, total: int, student, teacher, optimizers, save, *,
           device: torch.device, dist: Dist) -> dict:
    """The end of an invocation: final/ when the run is complete, the memory report, metrics.json."""
    finished = run.step >= total
    if finished:
        save(out / "final")
    memory = memory_per_rank(student, teacher, optimizers, device, dist)
    if dist.main:
        print("memory per rank (MB): " + "; ".join(
            f"rank {r}: student {m['student_mb']:.1f} (weights + grads), teacher {m['teacher_mb']:.1f}, "
            f"optimizer {m['optimizer_mb']:.1f}, peak {m['peak_mb']:.0f}" for r, m in enumerate(memory)))
    dev = [h for h in run.history if "dev_rougeL" in h]
    selected = out / ("best_rougeL" if cfg.select == "best" else "final")
    result = {"out": str(out), "step": run.step, "total_steps": total, "finished": finished,
              "model": str(selected) if finished else None, "best_rougeL": run.best_rougeL if dev else None,
              "history": run.history, "memory": memory, **(dev[-1] if dev else {})}
    if dist.main:
        write_json(out / "metrics.json", result)
    return result


# ----------------------------------------------------------------------------
# Main


def setup_teacher(cfg: Config, student: nn.Module, tokenizer, amp_dtype: torch.dtype, *,
                  device: torch.device | None = None, routers: list[str | Path] = (), dist: Dist = SINGLE,
                  mesh=None) -> nn.Module | None:
    """Load and check the teacher: frozen, in the compute dtype (bf16 on GPU); SAR unfreezes the routers
    and keeps them in fp32 so small updates (LR 1e-6) are not lost to bf16 rounding. `routers` (files or
    run dirs) are loaded in order. --shard-teacher: the ranks read the teacher into CPU memory one after
    another and FSDP2 keeps 1/world of it on each rank's device."""
    if not cfg.spec.teacher:
        return None
    device = device or resolve_device(cfg.device)
    if cfg.shard_teacher:
        def build():
            teacher = _prepared_teacher(cfg, student, tokenizer, amp_dtype, torch.device("cpu"), routers)
            separate = moe_routers(teacher) if cfg.spec.routers else []
            return shard_loaded(teacher, mesh, device, separate=separate, frozen=True)
        return one_rank_at_a_time(dist, build)
    t_device = resolve_device(cfg.teacher_device, "--teacher-device") if cfg.teacher_device else device
    return _prepared_teacher(cfg, student, tokenizer, amp_dtype, t_device, routers)


def _prepared_teacher(cfg, student, tokenizer, amp_dtype, device, routers) -> nn.Module:
    teacher = load_model(cfg.teacher, device=device, dtype=amp_dtype, what="--teacher")
    check_teacher(teacher, student, load_tokenizer(cfg.teacher, what="--teacher"), tokenizer, cfg)
    teacher.requires_grad_(False)
    if cfg.spec.routers:
        train_routers(teacher)
    for path in routers:
        load_routers(teacher, path)
    return teacher


def train_routers(teacher: nn.Module) -> None:
    """SAR's teacher: its routers in fp32 and trainable, every other weight frozen in its own dtype."""
    for p in router_parameters(teacher):
        p.data = p.data.float()
        p.requires_grad_(True)


def check_teacher(teacher: nn.Module, student: nn.Module, teacher_tok, student_tok, cfg: Config) -> None:
    """One tokenizer (the heads may differ by padding rows past it: the KL covers len(tokenizer) tokens), heads
    moekd can compute logits of; KA/SAR/ALL need an MoE teacher whose routing we control; expert counts must fit
    the flags."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise MoekdError(f"--teacher tokenizer {teacher_tok.name_or_path} ({len(teacher_tok)} tokens) differs from "
                         f"--model tokenizer {student_tok.name_or_path} ({len(student_tok)}); distillation needs one")
    check_vocab(teacher, teacher_tok, "--teacher")
    check_head(teacher, "--teacher")
    steered = cfg.spec.teacher in ("sample", "all")
    needs_moe = steered or cfg.teacher_k is not None or cfg.teacher_top_p is not None
    if needs_moe and not is_moe(teacher):
        flag = f"--method {cfg.method}" if steered else \
            "--teacher-k" if cfg.teacher_k is not None else "--teacher-top-p"
        raise MoekdError(f"{flag} needs an MoE teacher; --teacher is a dense {type(teacher).__name__}")
    if needs_moe:
        try:
            E = num_experts(teacher)  # also rejects MoE families whose routing we cannot steer
        except ValueError as e:
            raise MoekdError(f"--teacher {cfg.teacher}: {e}") from None
        for flag, k in (("--teacher-k", cfg.teacher_k), ("--ka-k", cfg.ka_k)):
            if k is not None and not 1 <= k <= E:
                raise MoekdError(f"{flag} {k} is outside [1, {E}] (the teacher has {E} experts)")


def main(argv: list[str] | None = None) -> dict:
    """Run one training job (one process of a torchrun launch); returns its metrics.
    Raises MoekdError on bad input."""
    cfg = parse_config(argv)
    dist, device = init_distributed(cfg)
    try:
        with RunGuard(Path(cfg.out), dist) as guard:  # the lock, SIGINT/SIGTERM, one-line stops
            result = _main(cfg, dist, device, guard)
        barrier(dist)  # the ranks tear their process group down together (gloo aborted a rank left alone)
        return result
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


def _main(cfg: Config, dist: Dist, device: torch.device, guard: RunGuard) -> dict:
    global_batch = split_global_batch(cfg, dist.world)
    teacher_reads = {"--teacher": cfg.teacher, "--teacher-routers": cfg.teacher_routers} \
        if cfg.spec.teacher else {}
    reads = {"--model": cfg.model, **teacher_reads, "--data": data_files(cfg.data),
             "--dev-data": data_files(cfg.dev_data, ("dev.jsonl", "valid.jsonl"))}
    out, state = prepare_out_dir(cfg, reads=reads,
                                 lock=guard.lock, fields={f.name for f in dataclasses.fields(Config)})
    barrier(dist)  # every rank has looked at --out before rank 0 writes to it
    if state is not None:  # the run's own config wins; only invocation flags may change
        check_resume_config(cfg, json.loads((out / "run.json").read_text()), dist.world)
    if not cfg.spec.teacher and cfg.shard_teacher:
        raise MoekdError(f"--shard-teacher: --method {cfg.method} has no teacher")
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
    check_head(model, "--model")
    routers = [p for p in (cfg.teacher_routers, ckpt if cfg.spec.routers else None) if p]
    teacher = setup_teacher(cfg, model, tokenizer, amp_dtype, device=device, routers=routers, dist=dist, mesh=mesh)
    if cfg.grad_checkpointing:
        enable_checkpointing(model, "--model")
        if cfg.spec.routers:  # the only method that backpropagates through the teacher
            enable_checkpointing(teacher, "--teacher")
    train_items = tokenize_examples(tokenizer, train_examples, cfg, name="train")
    dev_items = tokenize_examples(tokenizer, dev_examples, cfg, name="dev")
    if len(train_items) < global_batch:
        raise MoekdError(f"--data {cfg.data}: {len(train_items)} training examples, fewer than one global "
                         f"batch ({cfg.batch_size} x {dist.world} device(s) x {cfg.grad_accum})")
    if state is None and dist.main:
        start_out_dir(out, cfg.overwrite, guard.lock)
        write_json(out / "run.json", {**dataclasses.asdict(cfg), "world_size": dist.world})
    barrier(dist)
    describe = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params{', MoE' if is_moe(m) else ''}"  # noqa: E731
    if dist.main:
        print(f"{cfg.method}: model {cfg.model} ({describe(model)}{', sharded' if cfg.shard_student else ''})"
              + (f", teacher {cfg.teacher} ({describe(teacher)}{', sharded' if cfg.shard_teacher else ''})"
                 if teacher is not None else "")
              + f" on {device}{f' x {dist.world} ranks' if dist.world > 1 else ''}, "
              f"{str(amp_dtype).removeprefix('torch.')}, out {out}")
    result = train(cfg, wrap_student(model, dist, device, moe=is_moe(model)), teacher, tokenizer, train_items,
                   dev_items, out=out, device=device, amp_dtype=amp_dtype, state=state, dist=dist,
                   stop=guard.signals)
    if result["finished"] and dist.main:
        dev = (f"dev_loss {result['dev_loss']:.4f} | dev_rougeL {result['dev_rougeL']:.2f} | best dev_rougeL "
               f"{result['best_rougeL']:.2f} | " if result.get("best_rougeL") is not None else "")
        print(f"done: {dev}model ({cfg.select}) -> {result['model']}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
