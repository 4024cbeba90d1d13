"""moekd: knowledge distillation from Mixture-of-Experts teachers.

"Every Expert Matters" (Kim, Chu, Yang; arXiv 2502.12947; code github.com/gmkim-ai/MoEKD): a dense student
learns from an MoE teacher by on-policy reverse KL (GKD) and hears the experts its router did not pick:
  KA  (Sec. 4.1): M teacher passes, each token and layer routed w.p. lambda to N-1 experts sampled without
      replacement from the router softmax; the M reverse KLs are averaged.
  SAR (Sec. 4.2): all experts on; each step the teacher's routers first learn KL(teacher || student) +
      beta * balance loss, then the student learns from the updated teacher.

Read top to bottom: the method table, config, data, generation, routing control, losses, method steps, the
training loop and main; loading and checking the models after main. cli.py holds the command line; the
engine is beside: llama_moe.py, checkpoints.py, parallel.py, sampling.py, hidden_losses.py, data.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import (ROUTERS_FILE, append_line, check_resume_config, check_vocab, default_out,
                         latest_checkpoint, load_model, load_state_dict_strict, load_tokenizer,
                         prepare_out_dir, read_safetensors, save_checkpoint, save_run_model, start_out_dir,
                         truncate_log, write_atomically, write_json)
from cli import RunGuard, StopSignals, check_config, config_values, done_line, duration, plot_training
from data import (DOLLY_HUB, TEMPLATES, check_same_template, data_files, load_splits, prompt_and_response,
                  set_template)
from errors import MoekdError, RunStopped, run_cli
from hidden_losses import Head, head_logits, head_losses
from llama_moe import cv_squared
from parallel import (SINGLE, Dist, all_reduce_sum, average_gradients, barrier, device_mesh,
                      enable_checkpointing, full, full_state_dict, gradient_sync, init_distributed,
                      is_sharded, load_optimizer_state, memory_per_rank, one_rank_at_a_time, optimizer_state,
                      resolve_device, resolve_dtype, shard_loaded, split_global_batch, unwrap, wrap_student)
from sampling import sample_responses, sample_tokens, stop_ids


# Shapes: B batch, T time, H hidden, V vocab, E experts, K selected experts, N tokens (B*T flattened),
# M teacher passes. p is the teacher's distribution, q the student's.

@dataclass(frozen=True)
class Method:
    """Everything that tells the methods apart; no other code tests a method's name."""
    step: str                # the student's step, a key of STEPS: "sft" (CE), "kd" ((1-r) CE + r KL(p || q),
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


# ----------------------------------------------------------------------------
# Config: one field per command-line flag (ka_m is --ka-m); knob(default, help). More: docs/reference.md.

def knob(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # -- the method and the paper's knobs
    method: str = knob("sft", "training method (the table in README.md)", tuple(METHODS))
    model: str = knob("princeton-nlp/Sheared-LLaMA-1.3B", "the student (sft: the model): hub name or folder")
    teacher: str = knob("llama-moe/LLaMA-MoE-v1-3_5B-4_16", "the MoE teacher: hub name or folder")
    kd_ratio: float = knob(0.5, "weight r of the KL in kd's (1-r) CE + r KL")
    teacher_k: int | None = knob(None, "the teacher's top-k (default its own; the paper's Fig. 2 sweeps it)")
    teacher_top_p: float | None = knob(None, "route by the official gate's top-p: experts up to mass P")
    routed_mass: str = knob("native", "non-renormalising routers off top-k: native top-k's mass, or as is",
                            ("native", "literal"))
    ka_m: int = knob(2, "KA's M: teacher passes per sample, each with fresh expert draws")
    ka_lambda: float = knob(0.05, "KA's lambda: per token and layer, probability of the sampled expert set")
    ka_k: int | None = knob(None, "experts per token of KA's draws (default N-1, the official scripts')")
    ka_updates: str = knob("mean", "one update on the M losses' mean, or M (Alg. 1)", ("mean", "each"))
    router_lr: float = knob(1e-6, "LR of SAR's router AdamW (official loop scripts; the paper says 1e-5)")
    sar_kl: str = knob("teacher-student", "SAR routers' KL(p || q) (Eq. 9), or KL(q || p)",
                       ("teacher-student", "student-teacher"))
    sar_beta: float = knob(0.01, "SAR's balance-loss weight (a Llama-MoE teacher: its config's)")
    teacher_routers: str | None = knob(None, "load router weights: a teacher_routers.safetensors or its run")
    # -- data
    data: str = knob(DOLLY_HUB, "training data: synthetic, a jsonl/parquet/arrow/csv file, folder, hub name")
    dev_data: str | None = knob(None, "dev data (default: Dolly's MiniLLM split, dev.jsonl, --dev-size rows)")
    dev_size: int = knob(1000, "rows of --data held out as dev when no dev data is given")
    template: str = knob("alpaca", "prompts: the paper's Alpaca template, or the student's chat", TEMPLATES)
    prompt_column: str | None = knob(None, "read --data by column: the prompt (text or chat turns)")
    response_column: str | None = knob(None, "read --data by column: the response (text, references, turns)")
    data_split: str | None = knob(None, "the split of a --data that has splits (default train)")
    dev_split: str | None = knob(None, "dev = this split of --dev-data, else of --data (not --dev-size rows)")
    max_prompt_len: int = knob(256, "prompts longer than this (tokens) are dropped")
    max_len: int = knob(512, "prompt + response truncated to this many tokens")
    synthetic_train: int = knob(3000, "rows of the synthetic training set")
    synthetic_dev: int = knob(200, "rows of the synthetic dev set")
    synthetic_families: str = knob("add,count,fact,lookup,reverse,sequence,sort,spell",
                                   "the synthetic task families (tiny_moe/synthetic.py's)")
    synthetic_facts: int = knob(240, "people in the synthetic fact table (the closed-book families)")
    # -- optimisation
    seed: int = knob(10, "seed of init, data order, gate noise and sampling")
    epochs: int = knob(10, "passes over the training data")
    max_steps: int | None = knob(None, "cap on optimizer steps (sets the schedule's length)")
    batch_size: int = knob(16, "micro-batch per device (global batch = batch_size x devices x grad_accum)")
    grad_accum: int | None = knob(None, "micro-batches per device and step (default 1)")
    global_batch_size: int | None = knob(None, "rows per step over all devices (sets --grad-accum)")
    lr: float | None = knob(None, "peak learning rate (default: the method's, 1e-5; sar 1e-6)")
    lr_schedule: str | None = knob(None, "default cosine on gold data, else constant", ("constant", "cosine"))
    lr_min: float = knob(1e-7, "the cosine schedule's final LR")
    warmup_steps: int = knob(0, "linear warm-up steps")
    weight_decay: float = knob(1e-2, "AdamW decay on matrices (the paper's teacher SFT: 0.1)")
    grad_clip: float = knob(1.0, "clip the global gradient norm (0: off)")
    loss_norm: str = knob("global", "token mean of the global batch, or of micro means", ("global", "micro"))
    restart_epochs: bool | None = knob(None, "each epoch: a fresh optimizer, epoch 1's order (on-policy: on)")
    # -- the run: its folder, checkpoints, dev evaluation
    out: str | None = knob(None, "run folder (default runs/<method>-<model>)")
    overwrite: bool = knob(False, "empty an existing --out (a moekd run folder only) and start over")
    resume: bool = knob(False, "continue the run in --out from its last checkpoint, with its run.json")
    tiny: bool = knob(False, "CPU preset: tiny_moe models, synthetic data, short sequences, large LR")
    stop_after: int | None = knob(None, "checkpoint and exit after this many steps of this invocation")
    log_every: int = knob(10, "steps between log lines")
    save_every: int = knob(0, "also checkpoint every N steps (0: at epoch ends only)")
    dev_eval: bool = knob(True, "dev loss and ROUGE-L after every epoch")
    select: str | None = knob(None, "the model handed on: best dev ROUGE-L or last (default: the method's)",
                              ("best", "last"))
    dev_num: int | None = knob(None, "dev rows scored by ROUGE-L (default all)")
    eval_batch_size: int = knob(32, "batch size of dev generation")
    # -- hardware
    device: str = knob("auto", "cuda, cpu, ... (auto: cuda if available)")
    dtype: str = knob("auto", "autocast dtype, fp32 weights (auto: bf16 on cuda)", ("auto", "bf16", "fp32"))
    teacher_device: str | None = knob(None, "the teacher's device (default --device)")
    shard_teacher: bool = knob(False, "torchrun: shard the teacher over the ranks (FSDP2)")
    shard_student: bool = knob(False, "torchrun: shard the student and its optimizer (FSDP2, not DDP)")
    dist_timeout: int = knob(60, "torchrun: minutes a rank waits in a collective")
    grad_checkpointing: bool = knob(False, "recompute each layer in the backward (a third more compute)")
    gen_batch_size: int = knob(16, "rows sampled together on-policy")
    sampler: str = knob("moekd", "on-policy sampler: moekd's, or generate (same noise)",
                        ("moekd", "generate"))
    compile_sampler: str = knob("auto", "torch.compile the decode step (auto: CUDA)", ("auto", "on", "off"))
    kl_chunk: int = knob(32, "MB of each fp32 [tokens, V] temporary of the chunked losses")

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
        if self.grad_accum is None and self.global_batch_size is None:
            self.grad_accum = 1  # with --global-batch-size, split_global_batch() sets it
        self.out = self.out or default_out(self.method, self.model)
        check_config(self)


# ----------------------------------------------------------------------------
# Data: token ids, labels and batches (reading the files: data.py)

def tokenize_example(tokenizer, prompt: str, response: str, *, max_prompt_len: int,
                     max_len: int) -> dict | None:
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
    response_ids = joint[len(prompt_ids):] + [stop_ids(tokenizer)[0]]  # EOS, or a chat template's end of turn
    input_ids = (prompt_ids + response_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_len]
    return {"input_ids": input_ids, "labels": labels, "prompt_ids": prompt_ids,
            "prefix_ok": joint[:len(prompt_ids)] == prompt_ids}


def tokenize_examples(tokenizer, examples: list[dict], cfg: Config, *, name: str) -> list[dict]:
    out, dropped, empty, merged, unsplit = [], 0, 0, 0, 0
    for ex in examples:
        if not ex["responses"][0].strip():  # nothing to learn or to score against
            empty += 1
            continue
        text = prompt_and_response(tokenizer, ex)  # a conversation through the chat template
        if text is None:
            unsplit += 1
            continue
        item = tokenize_example(tokenizer, *text, max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len)
        if item is None:
            dropped += 1
            continue
        merged += not item.pop("prefix_ok")
        out.append({**item, "responses": ex["responses"]})
    print(f"data {name}: {len(out)} examples kept, {dropped} dropped with prompts over "
          f"{cfg.max_prompt_len} tokens, {empty} dropped with empty responses, {merged} whose prompt tokens "
          f"merge into the response (kept, split at the prompt's length as the official processing)"
          + (f", {unsplit} dropped whose chat template renders their prompt other than as the start of the "
             f"conversation" if unsplit else ""))
    if not out:
        raise MoekdError(f"data {name}: no examples left ({dropped} prompts longer than --max-prompt-len "
                         f"{cfg.max_prompt_len}, {empty} empty responses, {unsplit} not split by the chat "
                         f"template)")
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


def response_through_eos(tokens: list[int], eos_id: int | list[int]) -> list[int]:
    """A sampled response cut after its first stop id, which it keeps (the student learns to stop).
    One that never stopped ends in the first stop id instead of its last token, as the official code forces
    the last generated column to pad = eos. Stop ids: EOS, and a chat model's end of turn (stop_ids)."""
    stops = [eos_id] if isinstance(eos_id, int) else eos_id
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    return tokens[:-1] + [stops[0]] if end is None else tokens[:end + 1]


def generate_on_policy(model: nn.Module, items: list[dict], tokenizer, cfg: Config,
                       seeds: list[int] | None = None) -> list[dict]:
    """On-policy training items: each gold prompt followed by the student's sampled response.
    Responses are at most max_len - max_prompt_len tokens, one random stream per row from `seeds`; the
    prompt is masked out of the labels."""
    eos = stop_ids(tokenizer)
    responses = sample_tokens(model, [it["prompt_ids"] for it in items], pad_id=tokenizer.pad_token_id,
                              eos_id=eos, max_new_tokens=cfg.max_len - cfg.max_prompt_len,
                              batch_size=cfg.gen_batch_size, seeds=seeds, desc="on-policy",
                              sampler=cfg.sampler,
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

# The router protocol: every MoE layer has a router module with `num_experts` and `top_k`. A router with a
# `routing` attribute (moekd's Llama-MoE gate) routes by it itself: None = native, else a Routing, called on
# (logits [N, E], native k, the gate's own top-k) -> (index [N, K], kept slots [N, K] or None). A
# transformers-5 router gets its forward replaced inside moe_routing: its logits, its family's mechanism
# (scores -> selection -> weights over the chosen set), its output (docs/families.md lists the families).

@dataclass(frozen=True)
class Family:
    """How one transformers router family routes, read from its modeling file."""
    name: str
    mechanism: str               # "softmax": top-k of the softmax; "logits": top-k of the logits, softmax
                                 # over the chosen; "sigmoid": top-k of sigmoid scores (+ a selection
                                 # bias); "sigmoid_logits": top-k of the logits, a sigmoid each (Llama 4)
    norm: bool | None = None     # renormalise the chosen weights (None: the router's norm_topk_prob)
    norm_eps: float = 0.0        # added to the norm's sum
    norm_clamp: bool = False     # the norm's sum clamped below at the router's norm_min instead
    unsorted: bool = False       # the family's top-k is sorted=False, which orders the experts' sum
    group_by_max: bool = False   # a group scores by its best expert (DeepSeek-V2; else by its best two)
    bias_arg: bool = False       # the selection bias is the forward's argument, not e_score_correction_bias
    weights_dtype: str = "own"   # the output weights' dtype: own (as computed), "logits" or "input" (hidden)
    dense_output: bool = False   # returns dense [N, E] scores and the logits (Llama 4), not the chosen
    # The family's numerics, which bf16 autocast exposes:
    logits_in: str = "weight"    # the linear's inputs: "weight" (the input cast to the weight's dtype),
                                 # "fp32" (fp32 copies, which autocast still runs in bf16),
                                 # "fp32_no_autocast", "upcast" (the logits cast to fp32 after the linear)
    raw_sigmoid: bool = False    # the sigmoid of the logits in their own dtype, not of their fp32 copy
    promote: bool = False        # the norm divides out of place: under autocast its fp32 sum promotes


def deepseek_v3(name: str) -> Family:
    """DeepSeek-V3's router, which 11 families share."""
    return Family(name, "sigmoid", unsorted=True, logits_in="fp32", raw_sigmoid=True, norm_eps=1e-20)


HF_ROUTERS = {  # router class -> its family
    "MixtralTopKRouter": Family("Mixtral", "softmax", norm=True),
    "MiniMaxTopKRouter": Family("MiniMax", "softmax", norm=True),
    "Qwen2MoeTopKRouter": Family("Qwen2-MoE", "softmax", weights_dtype="logits"),
    "Qwen3MoeTopKRouter": Family("Qwen3-MoE", "softmax", weights_dtype="logits"),
    "OlmoeTopKRouter": Family("OLMoE", "softmax", weights_dtype="logits"),
    "FlexOlmoTopKRouter": Family("FlexOlmo", "softmax", weights_dtype="logits"),
    "Qwen3NextTopKRouter": Family("Qwen3-Next", "softmax", weights_dtype="logits"),
    "Qwen3_5MoeTopKRouter": Family("Qwen3.5-MoE", "softmax", norm=True, weights_dtype="logits"),
    "JambaTopKRouter": Family("Jamba", "softmax", weights_dtype="input"),
    "HunYuanMoEV1Gate": Family("HunYuan-V1-MoE", "softmax", norm=True, weights_dtype="logits"),
    "Ernie4_5_MoeTopKRouter": Family("ERNIE-4.5-MoE", "softmax", norm=True, weights_dtype="input",
                                     norm_clamp=True, logits_in="fp32_no_autocast"),
    "DeepseekV2TopkRouter": Family("DeepSeek-V2", "softmax", unsorted=True, group_by_max=True,
                                   logits_in="fp32"),
    "GptOssTopKRouter": Family("GPT-OSS", "logits", weights_dtype="logits"),
    **{router: Family(name, "logits", weights_dtype="input", logits_in="upcast") for router, name in (
        ("GraniteMoeTopKRouter", "GraniteMoE"), ("GraniteMoeSharedTopKRouter", "GraniteMoE-Shared"),
        ("GraniteMoeHybridTopKRouter", "GraniteMoE-Hybrid"))},
    **{router: deepseek_v3(name) for router, name in (
        ("DeepseekV3TopkRouter", "DeepSeek-V3"), ("DeepseekV32TopkRouter", "DeepSeek-V3.2"),
        ("Dots1TopkRouter", "Dots1"), ("KimiLinearTopkRouter", "Kimi-Linear"),
        ("MiMoV2FlashTopkRouter", "MiMo-V2-Flash"), ("NemotronHTopkRouter", "Nemotron-H"),
        ("Glm4MoeTopkRouter", "GLM-4-MoE"), ("Glm4MoeLiteTopkRouter", "GLM-4-MoE-Lite"),
        ("GlmMoeDsaTopkRouter", "GLM-MoE-DSA"), ("ExaoneMoeTopkRouter", "EXAONE-MoE"),
        ("SolarOpenTopkRouter", "Solar-Open"))},
    "MiniMaxM2TopKRouter": Family("MiniMax-M2", "sigmoid", norm=True, unsorted=True, bias_arg=True),
    "Lfm2MoeTopKRouter": Family("LFM2-MoE", "sigmoid", norm_eps=1e-6, bias_arg=True, raw_sigmoid=True,
                                promote=True),
    "AfmoeTokenChoiceRouter": Family("AFMoE", "sigmoid", norm=True, bias_arg=True, logits_in="upcast",
                                     norm_eps=1e-20),
    "Llama4Router": Family("Llama 4", "sigmoid_logits", dense_output=True),
}


class Scores(NamedTuple):
    """A mechanism's scores of every expert: what KA samples from, what the top-k selects by, what weighs."""
    law: torch.Tensor     # [N, E] fp32 probabilities: KA's sampling law (and top-p's)
    choice: torch.Tensor  # [N, E] the selection score (with a selection bias where the family has one)
    weight: torch.Tensor  # [N, E] the chosen experts' weights before the family's norm (softmax over the
                          # chosen for "logits"; a sigmoid each for "sigmoid_logits")


def router_scores(router: nn.Module, family: Family, logits: torch.Tensor, bias: torch.Tensor | None
                  ) -> Scores:
    """The family's scores from its router logits [N, E]."""
    if family.mechanism == "softmax":  # ERNIE 4.5 selects by the probabilities plus its bias (moe_statics)
        probs = torch.softmax(logits, -1, dtype=torch.float)
        return Scores(probs, router.moe_statics(probs) if hasattr(router, "moe_statics") else probs, probs)
    if family.mechanism == "logits":
        return Scores(torch.softmax(logits, -1, dtype=torch.float), logits, logits)
    s = (logits if family.raw_sigmoid else logits.float()).sigmoid()
    law = s.float() / s.float().sum(-1, keepdim=True)  # KA samples s / sum(s), without the bias
    if family.mechanism == "sigmoid_logits":
        return Scores(law, logits, logits)
    return Scores(law, s if bias is None else s + bias, s)


def chosen_weights(family: Family, scores: Scores, index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The chosen experts' weights [N, K] (0 in slots not kept), before the family's norm and scale."""
    chosen = scores.weight.gather(1, index)
    if family.mechanism == "logits":
        return torch.softmax(chosen.masked_fill(~keep, float("-inf")), -1, dtype=chosen.dtype)
    if family.mechanism == "sigmoid_logits":
        return chosen.float().sigmoid().to(chosen.dtype) * keep
    return chosen * keep


@dataclass(frozen=True)
class Routing:
    """How MoE layers pick experts: top-k, KA's sampled sets, the official gate's top-p, or all.
    topk: the k best (k None: native). sample (KA): w.p. `prob` per token (None: always) k experts drawn
    without replacement from the router's probabilities, else the top-k. topp: the most probable experts
    until their mass exceeds `top_p`. all: every expert. mass "native": a router that does not renormalise
    its chosen weights keeps the mass of its native selection, as the paper's gate (native_mass);
    "literal": the family's rule as is."""
    mode: str = "topk"
    k: int | None = None
    prob: float | None = None
    generator: torch.Generator | None = None
    top_p: float | None = None
    mass: str = "native"

    def __call__(self, logits: torch.Tensor, native_k: int, top) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(index [N, K], kept slots or None) for router logits [N, E]; `top(scores, k)`: the gate's top-k."""
        return select_experts(logits, self, native_k, top=top)

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


def top_k(scores: torch.Tensor, k: int, sort: bool = True) -> torch.Tensor:
    """The k best experts per row [N, k]."""
    return scores.topk(k, dim=-1, sorted=sort).indices


def sample_experts(probs: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """k distinct experts per row drawn without replacement in proportion to probs [N, E] -> [N, K]."""
    return torch.multinomial(probs.float(), k, replacement=False, generator=generator)


def top_p_experts(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official gate's top-p: experts by falling probability [N, K] and which are kept [N, K].
    The first expert is kept, then each while the mass before it is <= p; K is the batch's largest set, and
    the other slots get weight 0."""
    values, index = probs.float().sort(dim=-1, descending=True)
    mass_before = values.cumsum(-1)
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[:, 1:] = mass_before[:, :-1] <= p
    k = int(keep.sum(-1).max())
    return index[:, :k], keep[:, :k]


def select_experts(choice: torch.Tensor, routing: Routing, native_k: int, probs: torch.Tensor | None = None,
                   top=top_k) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chosen experts (index [N, K], kept slots or None) under `routing`.
    From selection scores [N, E] and the router's probabilities (KA's law and top-p's; default
    softmax(choice)); `top(scores, k)` is the family's top-k. "sample" draws the set S and one uniform u
    per token, and takes S where u < prob."""
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
            raise ValueError(f"MoE family {family!r} ({type(router).__name__}) is not supported for routing "
                             f"control (supported: Llama-MoE and the {len(HF_ROUTERS)} transformers families "
                             f"of docs/families.md)")
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
    """The k best experts [N, k] under the router's group limit, as the family selects them.
    Groups score by their best two experts (DeepSeek-V3) or best one (by_max, DeepSeek-V2); the topk_group
    best groups' experts compete. For k beyond those experts (KA's N-1, --teacher-k) they come first, then
    the rest by score, so the sets stay nested as k grows."""
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


def router_logits(router: nn.Module, family: Family, hidden_states: torch.Tensor) -> torch.Tensor:
    """The router's logits [N, E] with the family's numerics (Family.logits_in)."""
    linear = next((m for m in (getattr(router, n, None) for n in ("gate", "wg")) if isinstance(m, nn.Linear)),
                  router)
    h, w, how = hidden_states.reshape(-1, linear.weight.shape[1]), linear.weight, family.logits_in
    h, w = (h.float(), w.float()) if how in ("fp32", "fp32_no_autocast") else (h.to(w.dtype), w)
    no_autocast = how == "fp32_no_autocast"
    with torch.autocast(h.device.type, enabled=False) if no_autocast else contextlib.nullcontext():
        logits = F.linear(h, w, getattr(linear, "bias", None))
    return logits.float() if how == "upcast" else logits


def hf_routed_forward(router: nn.Module, routing: Routing, hidden_states: torch.Tensor, *args, **kwargs):
    """A transformers router's forward under `routing`: its logits, its family's mechanism, its output."""
    family = HF_ROUTERS[type(router).__name__]
    logits = router_logits(router, family, hidden_states)
    bias = ([*args, *kwargs.values()] or [None])[0] if family.bias_arg else \
        getattr(router, "e_score_correction_bias", None)
    scores = router_scores(router, family, logits, bias if getattr(router, "use_expert_bias", True) else None)
    sort = not family.unsorted
    top = functools.partial(top_k, sort=sort)
    grouped = getattr(router, "topk_method", "group_limited_greedy") == "group_limited_greedy"
    if getattr(router, "num_group", None) and grouped:  # the top-k's group limit (not KA's draws, not all)
        top = functools.partial(group_limited, router, by_max=family.group_by_max, sort=sort)
    index, keep = select_experts(scores.choice, routing, router.top_k, scores.law, top)
    keep = torch.ones_like(index, dtype=torch.bool) if keep is None else keep
    weights = chosen_weights(family, scores, index, keep)
    if family.dense_output:  # [N, E] scores, 0 off the chosen set
        return torch.zeros_like(logits).scatter(1, index, weights), logits
    if family.norm if family.norm is not None else getattr(router, "norm_topk_prob", False):
        total = weights.sum(dim=-1, keepdim=True)
        total = total.clamp(min=router.norm_min) if family.norm_clamp else total + family.norm_eps
        weights = (weights / total).to(None if family.promote else weights.dtype)  # None: as computed
    elif routing.mass == "native" and family.mechanism != "logits" and not routing.native(router.top_k):
        all_kept = torch.ones_like(index[:, :1], dtype=torch.bool)
        native = chosen_weights(family, scores, top(scores.choice, router.top_k), all_kept)
        weights = native_mass(weights.float(), native.float()).to(weights.dtype)  # fp32, before scale, casts
    scale = next((getattr(router, a) for a in ("routed_scaling_factor", "route_scale") if hasattr(router, a)),
                 1.0)
    weights = weights * scale
    dtype = {"logits": logits.dtype, "input": hidden_states.dtype}.get(family.weights_dtype)  # None: own
    return logits, weights.to(dtype), index


def native_mass(weights: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
    """Chosen weights [N, K] scaled per token to the native selection's total [N, k].
    So a router that does not renormalise is as loud under ALL, KA, top-p or another k as the paper's gate;
    the factor keeps its gradient, and a token of mass 0 stays 0."""
    total = weights.sum(-1, keepdim=True)
    return weights * torch.where(total > 0, native.sum(-1, keepdim=True) / total.where(total > 0, 1.0), 0.0)


_BACKEND_NOTED = weakref.WeakKeyDictionary()  # model -> the backend switches already reported


def experts_backend(model: nn.Module, mode: str) -> dict | None:
    """Switch the experts' backend where `mode` needs it; returns the backends to restore (None: unchanged).
    batched_mm materialises (T·K, 2I, H) weights, too much for all experts (-> grouped_mm); grouped_mm fails
    on CPU for rows not a multiple of 16 bytes (-> eager). Said once per model and switch."""
    if not hasattr(model, "get_experts_implementation"):
        return None
    old = model.get_experts_implementation()
    new = "grouped_mm" if mode == "all" and old[""] == "batched_mm" else old[""]
    experts = [m for m in model.modules() if hasattr(m, "_is_expert_parallel")]  # transformers' experts
    if new == "grouped_mm" and any(p.device.type == "cpu" and p.shape[-1] * p.element_size() % 16
                                   for m in experts for p in m.parameters()):
        new = "eager"
    if new == old[""] or not experts:
        return None
    noted = _BACKEND_NOTED.setdefault(model, set())
    if (old[""], new) not in noted:
        noted.add((old[""], new))
        print(f"moe_routing {mode}: experts backend {old['']} -> {new}")
    model.set_experts_implementation(new)
    return old


@contextlib.contextmanager
def moe_routing(model: nn.Module, mode: str = "topk", *, k: int | None = None, prob: float | None = None,
                generator: torch.Generator | None = None, top_p: float | None = None,
                mass: str = "native") -> Iterator[list[nn.Module]]:
    """Route every MoE layer of `model` by `mode` (see Routing) inside the block; restored on exit."""
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
        if backends is not None:
            model.set_experts_implementation(backends)


def is_moe(model: nn.Module) -> bool:
    """Has MoE layers (routers beside experts, or protocol routers); unlike moe_routers, never raises."""
    return any((hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router"))) or
               (hasattr(m, "routing") and hasattr(m, "num_experts")) for m in model.modules())


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[list[tuple[nn.Module, Any]]]:
    """(router, its raw output) for every router call inside the block, in call order."""
    records: list[tuple[nn.Module, Any]] = []
    def keep(module, args, out):
        records.append((module, out))
    handles = [r.register_forward_hook(keep) for r in moe_routers(model)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The noise-free router logits [N, E] of every MoE layer, in call order, of the forwards in the block."""
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
    """What SAR trains: every router's parameters but a selection bias.
    Llama-MoE: gate.gate_network and gate.weight_noise. Not e_score_correction_bias, which its families
    balance by counting, not by gradients."""
    return [p for r in moe_routers(model) for name, p in r.named_parameters()
            if "e_score_correction_bias" not in name]


def router_balance_loss(records: list[tuple[nn.Module, Any]], beta: float) -> torch.Tensor:
    """SAR's balance term from the routers' outputs of one forward (record_routing).
    A Llama-MoE gate's own loss (weighted by its config); else beta times the family's own auxiliary loss
    (load_balancing_loss_func) or, without one, beta * Sum_layers cv2(importance) + cv2(load)."""
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
        router = layers[0][0]
        terms.append(beta * aux(tuple(logits for _, logits in layers), router.num_experts, router.top_k))
    return torch.stack(terms).sum()


# ----------------------------------------------------------------------------
# Losses on logits: the formulas as the paper writes them. Training computes the same numbers from hidden
# states, in chunks that never hold [tokens, V] logits (hidden_losses.py; tests check the two agree).

def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position t is a loss position when its next token labels[t+1] is a response token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
               ) -> torch.Tensor:
    """KL(q_student || p_teacher) = Sum_v q (log q - log p), mean over masked tokens: GKD/ALL/KA/SAR's loss.
    Logits [B, T, V], mask [B, T]; fp32; a token q gives probability 0 adds nothing (0 log 0 = 0)."""
    log_q, log_p = student_logits[mask].float().log_softmax(-1), teacher_logits[mask].float().log_softmax(-1)
    q = log_q.exp()
    return (q * (log_q - log_p).masked_fill(q == 0, 0.0)).sum() / mask.sum().clamp_min(1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
               ) -> torch.Tensor:
    """KL(p_teacher || q_student) = Sum_v p (log p - log q), mean over the masked tokens: KD's soft term."""
    log_q, log_p = student_logits[mask].float().log_softmax(-1), teacher_logits[mask].float().log_softmax(-1)
    p = log_p.exp()
    return (p * (log_p - log_q).masked_fill(p == 0, 0.0)).sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------
# Method steps: (model, teacher, batch, cfg) -> named losses; "loss" is what gets backpropagated.
# Every loss is a *sum over tokens* divided by `norm`, the token count of the normalisation
# group (the global batch by default), so micro-batching does not change the update.

def balance_loss(model: nn.Module, outputs) -> torch.Tensor | None:
    """An MoE's own load-balancing loss of the last forward (None for a dense model).
    A Llama-MoE model's: its gates' losses, weighted by its config, summed over layers; a transformers
    MoE's: router_aux_loss_coef * aux_loss."""
    own = [m.balance_loss for m in model.modules()
           if hasattr(m, "routing") and getattr(m, "balance_loss", None) is not None]
    if own:
        return torch.stack(own).sum()
    aux = getattr(outputs, "aux_loss", None)
    return None if aux is None else model.config.router_aux_loss_coef * aux


@contextlib.contextmanager
def final_hidden(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block a forward computes no logits; the yielded list gets the final hidden states.
    The head gets an empty slice (logits [B, 0, V]); the hidden states [B, T, H] also go into the output
    before FSDP2's hooks, since the backward must enter the model there."""
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
    """A causal LM's output head on `device`, with its family's logit scaling or soft cap.
    FSDP2-sharded weights are gathered. The scale and cap are Cohere's, Granite's and Gemma's; check_head
    verifies the head gives the model's own logits."""
    inner = unwrap(model)
    linear, c = inner.get_output_embeddings(), inner.config
    bias = None if linear.bias is None else full(linear.bias).to(device)
    scale = (getattr(c, "logit_scale", None) or 1.0) / (getattr(c, "logits_scaling", None) or 1.0)
    return Head(full(linear.weight).to(device), bias, scale, getattr(c, "final_logit_softcapping", None))


@torch.no_grad()
def check_head(model: nn.Module, what: str) -> None:
    """Check that output_head on the final hidden states gives the model's own logits.
    The losses apply the head themselves; random hidden states with logits large enough for a scaling or
    soft cap to show make a family that does something else an error."""
    kept = []
    def probe(module, args):
        h = torch.randn_like(args[0])
        kept.append(h * (20 / F.linear(h, module.weight).float().std()).to(h.dtype))
        return (kept[0],)
    handle = model.get_output_embeddings().register_forward_pre_hook(probe)
    try:
        ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits.float()
    finally:
        handle.remove()
        if hasattr(model, "reshard"):  # FSDP2 keeps a root gathered after its forward; AdamW wants shards
            model.reshard()
    ours = head_logits(kept[0], output_head(model), logits.shape[-1])[0]
    if not torch.allclose(ours, logits, rtol=0.02, atol=0.1):
        raise MoekdError(f"{what}: {type(model).__name__} turns its last hidden state into logits in a way "
                         f"moekd does not know (it applies logit_scale, logits_scaling, "
                         f"final_logit_softcapping), so its losses cannot be computed from hidden states")


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
    """head_losses at the batch's loss positions, on the student's device.
    h: the student's hidden states [B, T, H]; t: the teacher's [M*B, T, H] or None. The vocabulary is
    state.vocab (the tokenizer's size; default the smaller head)."""
    mask = loss_mask(batch["labels"]).view(-1)
    head_s, head_t = output_head(model), None if teacher is None else output_head(teacher, h.device)
    if t is not None:
        t = t.to(h.device).view(-1, mask.numel(), t.shape[-1])[:, mask]
    vocab = state.vocab or min(x.weight.shape[0] for x in (head_s, head_t) if x is not None)
    labels = batch["labels"].roll(-1, 1).reshape(-1)[mask]  # position t predicts token t + 1
    return head_losses(h.flatten(0, 1)[mask], head_s, labels, t, head_t, vocab=vocab, chunk_mb=cfg.kl_chunk,
                       **weights)


def add_balance(parts: dict, balance: torch.Tensor | None, n_micro: int) -> dict:
    """Add the model's balance loss, once per micro-batch and averaged over the step's micro-batches."""
    if balance is not None:
        parts["lb"] = balance / n_micro
        parts["loss"] = parts["loss"] + parts["lb"]
    return parts


@dataclass
class MethodState:
    """What a method step needs beyond the batch.
    The compute dtype, KA's expert-draw generator (seeded per micro-batch), SAR's router optimizer, whether
    the teacher is FSDP2-sharded, and the distillation vocabulary."""
    amp_dtype: torch.dtype = torch.float32
    generator: torch.Generator | None = None
    router_optimizer: torch.optim.Optimizer | None = None
    sharded_teacher: bool = False
    vocab: int | None = None  # the tokenizer's size: the KL's vocabulary when heads have padding rows

    def optimizers(self, student_optimizer) -> list:
        return [student_optimizer] + ([self.router_optimizer] if self.router_optimizer else [])


def method_state(cfg: Config, teacher, amp_dtype: torch.dtype, vocab: int | None = None) -> MethodState:
    """The method's state: SAR's router AdamW, KA's generator, the distillation vocabulary.
    The router AdamW has a constant LR and the student's weight decay and clip; `vocab` is the tokenizer's
    size."""
    m = cfg.spec
    state = MethodState(amp_dtype, sharded_teacher=cfg.shard_teacher, vocab=vocab if m.teacher else None)
    if m.routers:
        state.router_optimizer = torch.optim.AdamW(param_groups(teacher, cfg.weight_decay), lr=cfg.router_lr)
    if m.teacher == "sample":
        state.generator = torch.Generator(device=next(teacher.parameters()).device)
    return state


def teacher_routing(teacher: nn.Module, cfg: Config, generator: torch.Generator | None):
    """The teacher's routing for the method, as a context manager.
    KA's draws, all experts (ALL, SAR), or the native top-k (changed by --teacher-k or --teacher-top-p)."""
    routing = cfg.spec.teacher
    if routing == "sample":
        k = cfg.ka_k or num_experts(teacher) - 1
        return moe_routing(teacher, "sample", k=k, prob=cfg.ka_lambda, generator=generator,
                           mass=cfg.routed_mass)
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
    """The teacher's final hidden states [repeat*B, T, H] on its device, without logits.
    Repeating the rows runs KA's M passes as one batched forward, each row with its own expert draws."""
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
    """KD on gold data: (1 - r) CE + r KL(p_teacher || q_student), r = --kd-ratio.
    ka-gold: the KL term is the mean over KA's M sampled teachers (the official temp_nr scripts). The
    official code writes the soft term as -Sum p log q, which differs from the KL by the constant H(p)."""
    M = cfg.ka_m if cfg.spec.passes else 1
    with teacher_routing(teacher, cfg, state.generator):
        t = teacher_hidden(teacher, batch, repeat=M, amp_dtype=state.amp_dtype)
    h, balance = forward_with_balance(model, batch)
    loss, sums = step_losses(model, teacher, h, t, batch, cfg, state, ce_weight=(1 - cfg.kd_ratio) / norm,
                             kl_weight=cfg.kd_ratio / norm, reverse=False)
    return add_balance({"loss": loss, "ce": sums[0] / norm, "fkl": sums[1] / norm}, balance, n_micro)


def reverse_kl_step(model, teacher, batch, cfg, *, norm, n_micro, state=MethodState()
                    ) -> dict[str, torch.Tensor]:
    """GKD, ALL, KA and SAR's student update: KL(q_student || p_teacher) on the student's own samples. KA:
    the mean of the M passes' KLs (the official code), one KL against their mean log-probabilities."""
    M = cfg.ka_m if cfg.spec.passes and cfg.ka_updates == "mean" else 1
    with teacher_routing(teacher, cfg, state.generator):
        t = teacher_hidden(teacher, batch, repeat=M, amp_dtype=state.amp_dtype)  # [M*B, T, H]
    h, balance = forward_with_balance(model, batch)
    loss, _ = step_losses(model, teacher, h, t, batch, cfg, state, kl_weight=1 / norm)
    return add_balance({"loss": loss, "rkl": loss}, balance, n_micro)


def sar_router_update(model, teacher, micro: list[dict], norms: list[float], cfg: Config,
                      state: MethodState, *, step: int = 0, dist: Dist = SINGLE) -> dict[str, float]:
    """SAR step (a): the teacher's routers alone learn, before the student's step.
    Loss KL(p_teacher || q_student) + beta * balance (Eq. 9; --sar-kl student-teacher: KL(q || p)), the
    teacher in train mode with all experts. Router gradients are averaged over ranks so every rank's
    routers stay equal."""
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
            with autocast(t_device, state.amp_dtype), record_routing(teacher) as routed, \
                    final_hidden(teacher) as p:
                teacher(input_ids=mb["input_ids"].to(t_device),
                        attention_mask=mb["attention_mask"].to(t_device))
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
# Training loop: AdamW, LR schedule, accumulation, dev selection, atomic resumable checkpoints.
# Every draw of a step is seeded from its position in the global batch (each row's on-policy sample from
# (seed, step, row); gate noise and KA draws from (seed, step, micro-batch)), so a run does not depend on
# how the batch is split over devices and accumulation, and resuming needs no RNG state.

def stream_seed(seed: int, step: int, index: int, stream: str) -> int:
    """The seed of one random stream, a hash of (run seed, step, index, stream name).
    The index is the row's or micro-batch's in the global batch, so streams never collide and do not depend
    on the device count."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
    """The global batch of one optimizer step: a pure function of (seed, step).
    With --restart-epochs every epoch repeats the first epoch's order, as the official loop scripts (same
    seed, set_epoch(0))."""
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_order(len(items), seed=cfg.seed, epoch=0 if cfg.restart_epochs else epoch)
    size = cfg.batch_size * world * cfg.grad_accum
    return [items[j] for j in order[i * size:(i + 1) * size]]


def loss_norms(micro: list[dict], mode: str, dist: Dist = SINGLE) -> list[float]:
    """The divisor of each micro-batch's token-sum loss.
    global: all loss tokens of the step on every rank (as TRL fixed it for accumulation, trl PR #6006);
    micro: own tokens x micro-batches (a mean of means)."""
    counts = [max(int(loss_mask(mb["labels"]).sum()), 1) for mb in micro]
    if mode == "global":
        return [all_reduce_sum([float(sum(counts))], dist)[0]] * len(micro)
    return [float(c * len(micro) * dist.world) for c in counts]


def train_step(cfg: Config, model, teacher, tokenizer, rows: list[dict], optimizer, lr: float,
               state: MethodState, *, step: int = 0, dist: Dist = SINGLE) -> dict[str, float]:
    """One optimizer step on a global batch; returns the loss parts summed over ranks, and the tokens.
    On-policy samples, SAR's router update, the student's micro-batches, clip and AdamW."""
    device, amp_dtype, student, method = next(model.parameters()).device, state.amp_dtype, unwrap(model), \
        cfg.spec
    first, per_rank = dist.rank * cfg.grad_accum, cfg.batch_size * cfg.grad_accum
    mine = rows[dist.rank * per_rank:(dist.rank + 1) * per_rank]
    if method.on_policy:  # row i of the global batch samples from its own stream (seed, step, i)
        seeds = [stream_seed(cfg.seed, step, dist.rank * per_rank + i, "sample") for i in range(len(mine))]
        with autocast(device, amp_dtype):
            mine = generate_on_policy(student, mine, tokenizer, cfg, seeds)
    B = cfg.batch_size
    micro = [collate(mine[m * B:(m + 1) * B], tokenizer.pad_token_id) for m in range(cfg.grad_accum)]
    norms, n_micro = loss_norms(micro, cfg.loss_norm, dist), len(micro) * dist.world
    logs = {}
    if method.routers:
        logs = sar_router_update(model, teacher, micro, norms, cfg, state, step=step, dist=dist)
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
                parts = method_step(cfg.method)(model, teacher, mb, cfg, norm=norm, n_micro=n_micro,
                                                state=state)
                (parts["loss"] * dist.world).backward()  # DDP/FSDP average over ranks: x world is the sum
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v.item() / updates
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if not is_finite(grad_norm):  # the same on every rank (gradients are synced): name a bad loss first
            check_finite("loss", all_reduce_sum([logs.get("loss", 0.0)], dist)[0], step)
        check_finite("gradient norm", grad_norm, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    logs["tokens"] = float(sum(int(mb["attention_mask"].sum()) for mb in micro))
    logs = dict(zip(sorted(logs), all_reduce_sum([logs[k] for k in sorted(logs)], dist)))
    check_finite("loss", logs["loss"], step)
    return logs


def is_finite(value) -> bool:
    return math.isfinite(float(full(value)))


def check_finite(what: str, value, step: int) -> None:
    """A one-line stop for a non-finite loss or gradient norm (+inf loss: the teacher's -inf where q > 0)."""
    value = float(full(value))
    if not math.isfinite(value):
        cause = ("a token the teacher gives probability 0 (log-probability -inf) has mass under the student, "
                 "or the run diverged: try a lower --lr") if value == math.inf and what == "loss" else \
            "try a lower --lr"
        raise RunStopped(f"step {step + 1}: the {what} is {value}, nothing of this step is kept ({cause})")


@dataclass
class Progress:
    """The loop's running record; a checkpoint's trainer_state.pt holds it beside the optimizers."""
    step: int = 0
    best_rougeL: float = -math.inf
    history: list = field(default_factory=list)
    window: dict = field(default_factory=dict)  # loss sums since the last log line
    window_steps: int = 0
    busy: float = 0.0                           # seconds of training work since the last log line (not saved)
    started: float = field(default_factory=time.perf_counter)  # this invocation's start (not saved)
    steps_run: int = 0                          # steps of this invocation (not saved)

    def log_line(self, done: int, total: int, epoch: int, lr: float) -> str:
        """The log line of the steps since the last one (their mean losses); also appended to the history."""
        n, tokens = self.window_steps, self.window.pop("tokens")
        keys = sorted(self.window, key=lambda k: k != "loss")
        parts = " | ".join(f"{k} {self.window[k] / n:.4f}" for k in keys)
        eta = (time.perf_counter() - self.started) / max(self.steps_run, 1) * (total - done)
        line = (f"step {done}/{total} | epoch {epoch} | {parts} | lr {lr:.2e} | {tokens / self.busy:.0f} "
                f"tok/s | {1000 * self.busy / n:.0f} ms | eta {duration(eta)}")
        self.history.append({"step": done, **{k: v / n for k, v in self.window.items()}})
        self.window, self.window_steps, self.busy = {}, 0, 0.0
        return line


@dataclass
class Run:
    """What the loop carries: the models, their optimizers, the record, and where rank 0 writes."""
    cfg: Config
    out: Path
    dist: Dist
    student: nn.Module       # unwrapped (the loop steps the DDP/FSDP-wrapped model)
    teacher: nn.Module | None
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    ms: MethodState
    progress: Progress

    def report(self, line: str) -> None:
        """Rank 0: stdout (flushed, so a log piped to a file keeps up) and log.txt."""
        if self.dist.main:
            print(line, flush=True)
            append_line(self.out / "log.txt", line)

    def snapshot(self) -> tuple[dict | None, dict | None]:
        """Student weights (gathered when sharded) and the trained routers; every rank calls it."""
        return (full_state_dict(self.student) if is_sharded(self.student) else None,
                router_state_dict(self.teacher) if self.cfg.spec.routers else None)

    def save(self, directory: Path) -> None:
        weights, routers = self.snapshot()
        if self.dist.main:
            write_atomically(directory, lambda d: save_run_model(d, self.student, self.tokenizer, routers,
                                                                 state_dict=weights))

    def checkpoint(self, done: int) -> None:
        """checkpoint-<done>/: weights, optimizers and the record (resumable); every rank calls it."""
        run = self.progress
        state = {"optimizer": optimizer_state(self.student, self.optimizer), "best_rougeL": run.best_rougeL,
                 "history": run.history, "window": run.window, "window_steps": run.window_steps}
        if self.ms.router_optimizer:
            state["router_optimizer"] = optimizer_state(self.teacher, self.ms.router_optimizer)
        weights, routers = self.snapshot()
        if self.dist.main:
            save_checkpoint(self.out, done, self.student, self.tokenizer, weights, routers, state)
        barrier(self.dist)  # nobody runs ahead (or exits) while rank 0 evaluates and writes

    def evaluate(self, done: int, dev_items: list[dict], device, amp_dtype) -> None:
        """Dev loss and ROUGE-L (rank 0, or every rank of a sharded student); keeps the best model."""
        cfg, dist, run = self.cfg, self.dist, self.progress
        if dist.main or is_sharded(self.student):  # a sharded student's forward needs every rank
            metrics = evaluate_dev(self.student, self.tokenizer, dev_items, cfg, device=device,
                                   amp_dtype=amp_dtype)
        if dist.main:
            self.report(f"dev step {done} | dev_loss {metrics['dev_loss']:.4f} | "
                        f"dev_rougeL {metrics['dev_rougeL']:.2f}")
            run.history.append({"step": done, **metrics})
        improved = all_reduce_sum([float(dist.main and metrics["dev_rougeL"] > run.best_rougeL)], dist)[0] > 0
        if improved and cfg.select == "best":
            self.save(self.out / "best_rougeL")
        if improved and dist.main:
            run.best_rougeL = metrics["dev_rougeL"]


def train(cfg: Config, model: nn.Module, teacher: nn.Module | None, tokenizer, train_items: list[dict],
          dev_items: list[dict], *, out: Path, device: torch.device, amp_dtype: torch.dtype,
          state: dict | None = None, dist: Dist = SINGLE, stop: StopSignals | None = None) -> dict:
    """The optimizer steps of a run, each in four phases: step, log, evaluate (and keep the best), checkpoint.
    Under torchrun `model` is DDP-wrapped; rank 0 alone logs, evaluates and saves (the others wait at a
    barrier). `stop`: SIGINT/SIGTERM end the run at a step boundary, after a checkpoint."""
    steps_per_epoch, total = schedule_length(cfg, len(train_items), dist.world)
    r = start_run(cfg, unwrap(model), teacher, tokenizer, amp_dtype, state, out=out, dist=dist)
    run, ms = r.progress, r.ms
    if dist.main:
        global_batch = cfg.batch_size * dist.world * cfg.grad_accum
        print(f"train: {len(train_items)} examples, global batch {global_batch}"
              f" ({cfg.batch_size} x {dist.world} device(s) x {cfg.grad_accum} accumulation), "
              f"{steps_per_epoch} steps/epoch, {total} steps, lr {cfg.lr:g} {cfg.lr_schedule}")
    start, signalled = run.step, 0
    stop = stop or StopSignals(out, dist)
    stop.step, stop.deferred = start, True
    for step in range(start, total):
        done, epoch, t0 = step + 1, step // steps_per_epoch + 1, time.perf_counter()
        # -- step: one global batch (on-policy sampling, SAR's router update, the student's update)
        if cfg.restart_epochs and step % steps_per_epoch == 0 and step > 0:
            for opt in ms.optimizers(r.optimizer):
                opt.state.clear()  # each official loop epoch is a fresh job with a fresh optimizer
        lr = lr_at(step, lr=cfg.lr, schedule=cfg.lr_schedule, total=total, warmup=cfg.warmup_steps,
                   lr_min=cfg.lr_min)
        rows = step_rows(train_items, cfg, step, steps_per_epoch, dist.world)
        logs = train_step(cfg, model, teacher, tokenizer, rows, r.optimizer, lr, ms, step=step, dist=dist)
        for k, v in logs.items():
            run.window[k] = run.window.get(k, 0.0) + v
        run.step, run.window_steps, run.steps_run = done, run.window_steps + 1, run.steps_run + 1
        run.busy += time.perf_counter() - t0
        # -- log
        if done % cfg.log_every == 0 or done == total:
            r.report(run.log_line(done, total, epoch, lr))
        # -- evaluate at epoch ends: dev loss and ROUGE-L; keep the best model (--select best)
        epoch_end = done % steps_per_epoch == 0 or done == total
        if epoch_end and cfg.dev_eval:
            r.evaluate(done, dev_items, device, amp_dtype)
        # -- checkpoint: at epoch ends, every --save-every steps, at the end and when stopping
        signalled = stop.agreed()  # every rank, every step: they stop together
        stopping = cfg.stop_after is not None and done - start >= cfg.stop_after or bool(signalled)
        if epoch_end or stopping or done == total or bool(cfg.save_every and done % cfg.save_every == 0):
            r.checkpoint(done)
        stop.step = done
        if stopping and done < total:
            if not signalled and dist.main:  # on stdout only: log.txt reads as an uninterrupted run's
                print(f"stopped after {cfg.stop_after} steps at step {done}/{total}; continue with --resume")
            break
    result = finish(r, total, device=device)
    if signalled and run.step < total:
        raise stop.stopped(signalled, run.step, total)
    return result


def schedule_length(cfg: Config, n_items: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): whole global batches only; --max-steps caps the total."""
    steps_per_epoch = n_items // (cfg.batch_size * world * cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    return steps_per_epoch, total if cfg.max_steps is None else min(cfg.max_steps, total)


def start_run(cfg: Config, student: nn.Module, teacher, tokenizer, amp_dtype: torch.dtype,
              state: dict | None, *, out: Path, dist: Dist) -> Run:
    """The loop's optimizers and record: new, or restored from a checkpoint's trainer state (--resume)."""
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                                  eps=1e-8)
    ms, progress = method_state(cfg, teacher, amp_dtype, vocab=len(tokenizer)), Progress()
    if state is not None:
        load_optimizer_state(student, optimizer, state["optimizer"])
        if ms.router_optimizer:
            load_optimizer_state(teacher, ms.router_optimizer, state["router_optimizer"])
        progress = Progress(state["step"], state["best_rougeL"], state["history"], state["window"],
                            state["window_steps"])
        if dist.main:
            truncate_log(out / "log.txt", progress.step)
    return Run(cfg, out, dist, student, teacher, tokenizer, optimizer, ms, progress)


def finish(r: Run, total: int, *, device: torch.device) -> dict:
    """The end of an invocation: final/ when the run is complete, the memory report, metrics.json.
    Also training.png, the loss and dev ROUGE-L curves."""
    cfg, out, run, dist = r.cfg, r.out, r.progress, r.dist
    finished = run.step >= total
    if finished:
        r.save(out / "final")
    memory = memory_per_rank(r.student, r.teacher, r.ms.optimizers(r.optimizer), device, dist)
    if dist.main:
        print("memory per rank (MB): " + "; ".join(
            f"rank {i}: student {m['student_mb']:.1f} (weights + grads), teacher {m['teacher_mb']:.1f}, "
            f"optimizer {m['optimizer_mb']:.1f}, peak {m['peak_mb']:.0f}" for i, m in enumerate(memory)))
    dev = [h for h in run.history if "dev_rougeL" in h]
    selected = out / ("best_rougeL" if cfg.select == "best" else "final")
    result = {"out": str(out), "step": run.step, "total_steps": total, "finished": finished,
              "model": str(selected) if finished else None, "best_rougeL": run.best_rougeL if dev else None,
              "history": run.history, "memory": memory, **(dev[-1] if dev else {})}
    if dist.main:
        write_json(out / "metrics.json", result)
        plot_training(run.history, out / "training.png", title=f"{cfg.method}: {out.name}")
    return result


# ----------------------------------------------------------------------------
# Main

def main(argv: list[str] | None = None) -> dict:
    """Run one training job (one process of a torchrun launch); returns its metrics."""
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
    # -- the run folder: a new one, or the run to resume (its own config wins)
    global_batch = split_global_batch(cfg, dist.world)
    teacher_reads = {"--teacher": cfg.teacher, "--teacher-routers": cfg.teacher_routers} \
        if cfg.spec.teacher else {}
    reads = {"--model": cfg.model, **teacher_reads, "--data": data_files(cfg.data),
             "--dev-data": data_files(cfg.dev_data, ("dev.jsonl", "valid.jsonl"))}
    fields = {f.name for f in dataclasses.fields(Config)}
    out, state = prepare_out_dir(cfg, reads=reads, lock=guard.lock, fields=fields)
    barrier(dist)  # every rank has looked at --out before rank 0 writes to it
    if state is not None:
        check_resume_config(cfg, json.loads((out / "run.json").read_text()), dist.world)
    if not cfg.spec.teacher and cfg.shard_teacher:
        raise MoekdError(f"--shard-teacher: --method {cfg.method} has no teacher")
    # -- data and models
    amp_dtype = resolve_dtype(cfg.dtype, device)
    train_examples, dev_examples = load_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    set_template(tokenizer, cfg.template)  # chat: the ids that end a response
    ckpt = latest_checkpoint(out) if state is not None else None
    mesh = device_mesh(cfg.shard_teacher or cfg.shard_student, device, dist)
    model = load_student(cfg, str(ckpt or cfg.model), tokenizer, device=device, mesh=mesh, dist=dist)
    routers = [p for p in (cfg.teacher_routers, ckpt if cfg.spec.routers else None) if p]
    teacher = setup_teacher(cfg, model, tokenizer, amp_dtype, device=device, routers=routers, dist=dist,
                            mesh=mesh)
    if cfg.grad_checkpointing:
        enable_checkpointing(model, "--model")
        if cfg.spec.routers:  # the only method that backpropagates through the teacher
            enable_checkpointing(teacher, "--teacher")
    train_items = tokenize_examples(tokenizer, train_examples, cfg, name="train")
    dev_items = tokenize_examples(tokenizer, dev_examples, cfg, name="dev")
    if len(train_items) < global_batch:
        raise MoekdError(f"--data {cfg.data}: {len(train_items)} training examples, fewer than one global "
                         f"batch ({cfg.batch_size} x {dist.world} device(s) x {cfg.grad_accum})")
    # -- train: run.json first (what --resume reads), then the loop
    if state is None and dist.main:
        start_out_dir(out, cfg.overwrite, guard.lock)
        write_json(out / "run.json", {**dataclasses.asdict(cfg), "world_size": dist.world})
    barrier(dist)
    if dist.main:
        print(describe_run(cfg, model, teacher, device, amp_dtype, out, dist.world))
    result = train(cfg, wrap_student(model, dist, device, moe=is_moe(model)), teacher, tokenizer, train_items,
                   dev_items, out=out, device=device, amp_dtype=amp_dtype, state=state, dist=dist,
                   stop=guard.signals)
    if result["finished"] and dist.main:
        print(done_line(cfg, result))
    return result


# ----------------------------------------------------------------------------
# The paperwork of a run: loading and checking the models, its first line (the command line: cli.py)

def parse_config(argv: list[str] | None = None) -> Config:
    """Config from the command line: explicit flags > --tiny preset > defaults (--resume: its run.json)."""
    return Config(**config_values(Config, METHODS, argv, about=__doc__.split("\n\n")[0]))


def load_student(cfg: Config, source: str, tokenizer, *, device: torch.device, mesh, dist: Dist) -> nn.Module:
    """The student in fp32 master weights, checked (--shard-student: read one rank at a time, sharded)."""
    if cfg.shard_student:
        def build():
            return shard_loaded(load_model(source, dtype=torch.float32), mesh, device)
        model = one_rank_at_a_time(dist, build)
    else:
        model = load_model(source, device=device, dtype=torch.float32)
    check_vocab(model, tokenizer)
    check_head(model, "--model")
    return model


def setup_teacher(cfg: Config, student: nn.Module, tokenizer, amp_dtype: torch.dtype, *,
                  device: torch.device | None = None, routers: list[str | Path] = (), dist: Dist = SINGLE,
                  mesh=None) -> nn.Module | None:
    """Load and check the teacher (None for a method without one).
    Frozen in the compute dtype, SAR's routers trainable in fp32 (so LR 1e-6 updates survive); `routers`
    files load in order. --shard-teacher: read one rank at a time, sharded."""
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
    """Check that the teacher fits the student and the flags.
    One tokenizer, heads moekd can compute logits of, an MoE teacher it can steer where the method needs
    one, and expert counts that fit --teacher-k and --ka-k."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise MoekdError(f"--teacher tokenizer {teacher_tok.name_or_path} ({len(teacher_tok)} tokens) "
                         f"differs from --model tokenizer {student_tok.name_or_path} ({len(student_tok)}); "
                         f"distillation needs one")
    if cfg.template == "chat":
        check_same_template(teacher_tok, student_tok, teacher=cfg.teacher, model=cfg.model)
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


def router_state_dict(teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's router parameters, full tensors on the CPU.
    On an FSDP2-sharded teacher this gathers the shards: every rank must call it."""
    ids = {id(p) for p in router_parameters(teacher)}
    return {name: full(p.detach()).contiguous().cpu() for name, p in teacher.named_parameters()
            if id(p) in ids}


def load_routers(teacher: nn.Module, path: str | Path) -> None:
    """Load SAR-trained routers: a teacher_routers.safetensors, or a folder holding one.
    The file must hold exactly the teacher's router parameters."""
    path = Path(path)
    path = path / ROUTERS_FILE if path.is_dir() else path
    if not path.is_file():
        raise MoekdError(f"--teacher-routers {path}: no such file")
    tensors, expected = read_safetensors(path), set(router_state_dict(teacher))
    if set(tensors) != expected:
        differ = sorted(set(tensors) ^ expected)
        raise MoekdError(f"{path}: router keys do not match the teacher ({len(differ)} differ, e.g. "
                         f"{differ[0]})")
    load_state_dict_strict(teacher, iter(tensors.items()), where=str(path), partial=True)


def describe_run(cfg: Config, model, teacher, device, amp_dtype, out: Path, world: int) -> str:
    """The run's first line: the models, their sizes, the device and dtype."""
    def size(m):
        return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params{', MoE' if is_moe(m) else ''}"
    line = f"{cfg.method}: model {cfg.model} ({size(model)}{', sharded' if cfg.shard_student else ''})"
    if teacher is not None:
        line += f", teacher {cfg.teacher} ({size(teacher)}{', sharded' if cfg.shard_teacher else ''})"
    ranks = f" x {world} ranks" if world > 1 else ""
    return f"{line} on {device}{ranks}, {str(amp_dtype).removeprefix('torch.')}, out {out}"


if __name__ == "__main__":
    sys.exit(run_cli(main))
