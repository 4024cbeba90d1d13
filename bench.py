"""bench.py: what each method costs, per training step and per part, on random tokens of a fixed shape.

    python bench.py             # both sizes, every method, the derived figures; about 10 minutes on 2 cores
    python bench.py --sizes tiny --steps 2 --json bench.json
    python bench.py --dist      # per-rank memory of torchrun layouts (2 CPU ranks, gloo); about 2 minutes
    python bench.py --plan      # the README's per-GPU memory plan for three real teacher/student pairs

For each method (sft, kd, gkd, all, ka with M = 1, 2, 4, sar) and size (tiny; realistic-vocab: V = 32000,
H = 256) it times moekd.train_step on one global batch (median over --steps after --warmup) and, separately,
its parts: student generation, teacher forward(s), student forward + backward, SAR's router update, the
optimizer. Each (size, method) runs in its own process so its peak memory (peak RSS on CPU, peak CUDA
allocation on GPU) is its own. Derived figures, with the targets the project holds itself to:
  overhead  = step / sum of parts                                         <= 1.10
  KA cost   = (step(M) - step(1)) / (teacher(M) - teacher(1)), generation left out of both steps  <= 1.10;
              teacher = its forward to hidden states + its head and log-softmax over the loss rows (the latter
              runs inside the student's chunked loss, so it is timed on its own as a reference)
  KL memory = peak of reverse-KL loss + backward / that of cross-entropy  <= 1.25  (V 32000, B 4, T 512)
  scaling   = step time vs experts N (4, 8, 16) and vs M
  loss path = peak memory and time of each method's losses from hidden states / from full logits (before),
              V 151936, H 256, 2 x 512 tokens, KA M = 2: memory <= 0.2, time <= 1.2 (sft <= 1.35); the KL
              memory above is now measured from hidden states (`--no-large-vocab` skips the comparison)
--dist runs moekd.py itself (SAR, all experts, router optimizer: the most state of any method) on both sizes
as 1 process, 2 DDP ranks with a replicated teacher, 2 ranks with a sharded teacher, and 2 ranks with teacher
and student sharded, and prints the per-rank memory moekd reports: student weights + gradients, teacher
weights, optimizer state (each rank's shards) and the peak RSS.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import hidden_losses
import llama_moe
import moekd
import parallel

HERE = Path(__file__).resolve().parent
METHODS = {"sft": ("sft", 1), "kd": ("kd", 1), "gkd": ("gkd", 1), "all": ("all", 1),
           "ka-m1": ("ka", 1), "ka-m2": ("ka", 2), "ka-m4": ("ka", 4), "sar": ("sar", 1)}
SIZES = {
    "tiny": dict(teacher=dict(vocab_size=2039, hidden_size=48, intermediate_size=161, num_hidden_layers=3,
                              num_attention_heads=3, num_experts=7, num_selects=2),
                 student=dict(vocab_size=2039, hidden_size=36, intermediate_size=75, num_hidden_layers=2,
                              num_attention_heads=3)),
    "realistic-vocab": dict(teacher=dict(vocab_size=32000, hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=4,
                                         num_attention_heads=4, num_experts=8, num_selects=2),
                            student=dict(vocab_size=32000, hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=2, num_attention_heads=4)),
}
BATCH, PROMPT, RESPONSE = 4, 64, 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile-sampler", default="on", choices=("on", "off"),
                   help="moekd's decode step compiled (steady state; the compile time is reported "
                        "on its own)")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    p.add_argument("--no-scaling", action="store_true", help="skip the N and M scaling table")
    p.add_argument("--no-kl-memory", action="store_true", help="skip the KL vs CE memory probe")
    p.add_argument("--dist", action="store_true",
                   help="per-rank memory of torchrun layouts instead of timings")
    p.add_argument("--plan", action="store_true",
                   help="print the per-GPU memory plan of real pairs (arithmetic)")
    p.add_argument("--gpu-check", action="store_true",
                   help="the GPU check: CUDA tests, every method's tiny bf16 step, gkd/ka/sar at the paper's "
                        "shapes (bandwidth floor, memory plan), the sampler vs generate(); JSON (--json) "
                        "and Markdown")
    # tiny: CPU smoke
    p.add_argument("--gpu-check-scale", default="paper", choices=tuple(CHECKS), help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", type=float, default=4.3e12,
                   help="GPU memory bandwidth, bytes/s (H200: ~4.3e12 measured)")
    p.add_argument("--no-large-vocab", action="store_true",
                   help="skip the large-vocabulary loss-path comparison")
    p.add_argument("--kl-chunk", type=float, default=moekd.Config.kl_chunk,
                   help="moekd's --kl-chunk (MB per chunk temporary)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)          # worker: size,method[,experts]
    p.add_argument("--loss-memory", default=None, help=argparse.SUPPRESS)  # worker: method,path[,shape]
    p.add_argument("--loss-time", default=None, help=argparse.SUPPRESS)    # worker: method
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Worker: one (size, method) in this process

def build(size: str, experts: int | None, device) -> tuple:
    from transformers import LlamaConfig, LlamaForCausalLM
    spec = SIZES[size]
    t = {**llama_moe.LLAMA_MOE_DEFAULTS, **spec["teacher"], "max_position_embeddings": 512}
    if experts is not None:
        t.update(num_experts=experts, intermediate_size=t["intermediate_size"] // t["num_experts"] * experts)
    teacher = llama_moe.build_llama_moe(llama_moe.check_llama_moe_config(t, where="bench"), device=device,
                                        init_seed=0).eval()
    torch.manual_seed(1)
    student = LlamaForCausalLM(LlamaConfig(**spec["student"], bos_token_id=1, eos_token_id=2)).to(device)
    return teacher, student


class Tokens:
    """Just what moekd's generation and collation read from a tokenizer."""
    pad_token_id = eos_token_id = 2


@contextlib.contextmanager
def fixed_length_responses():
    """Inside the block the samplers produce exactly the requested number of tokens.
    So every step has the same shape: moekd's sampler gets an EOS id no token has, generate() a
    min_new_tokens."""
    original = moekd.sample_tokens
    def sample(*args, **kwargs):
        if kwargs.get("sampler") == "generate":
            return original(*args, **{**kwargs, "min_new_tokens": kwargs["max_new_tokens"]})
        return original(*args, **{**kwargs, "eos_id": -1})
    moekd.sample_tokens = sample
    try:
        yield
    finally:
        moekd.sample_tokens = original


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run_one(size: str, name_: str, experts: int | None, steps: int, warmup: int, device,
            compile_sampler: str = "on") -> dict:
    method, M = METHODS[name_]
    torch.manual_seed(0)
    teacher, student = build(size, experts, device)
    vocab = SIZES[size]["teacher"]["vocab_size"]
    cfg = moekd.Config(method=method, ka_m=M, batch_size=BATCH, max_prompt_len=PROMPT,
                       max_len=PROMPT + RESPONSE,
                       gen_batch_size=BATCH, lr=1e-5, router_lr=1e-6, compile_sampler=compile_sampler)
    tok = Tokens()
    rows = random_rows(BATCH, PROMPT, RESPONSE, vocab)
    teacher.requires_grad_(False)
    if cfg.spec.routers:  # as moekd loads a SAR teacher
        moekd.train_routers(teacher)
    optimizer = torch.optim.AdamW(moekd.param_groups(student, cfg.weight_decay), lr=cfg.lr)
    state = moekd.method_state(cfg, teacher, torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with fixed_length_responses():
        first_gen = 0.0  # the first call compiles the decode step
        if cfg.spec.on_policy:
            first_gen = timed(lambda: moekd.generate_on_policy(student, rows, tok, cfg,
                                                               list(range(len(rows)))), sync)
        parts = step_parts(cfg, student, teacher, tok, rows, optimizer, state)
        if "gen" in parts:  # the reference sampler, side by side
            reference = dataclasses.replace(cfg, sampler="generate")
            parts["gen_generate"] = lambda: moekd.generate_on_policy(student, rows, tok, reference,
                                                                     list(range(len(rows))))
        times: dict[str, list[float]] = {name: [] for name in ["step", *parts]}
        for i in range(warmup + steps):  # interleaved, so slow drifts of the machine hit step and parts alike
            t = {"step": timed(lambda: moekd.train_step(cfg, student, teacher, tok, rows, optimizer, cfg.lr,
                                                        state), sync)}
            for name, fn in parts.items():
                t[name] = timed(fn, sync)
            if i >= warmup:
                for name, value in t.items():
                    times[name].append(value)
    med = {name: statistics.median(v) for name, v in times.items()}
    step, gen_generate, teacher_head = (med.pop("step"), med.pop("gen_generate", 0.0),
                                        med.pop("teacher_head", 0.0))
    for name in ("gen", "teacher", "router"):
        med.setdefault(name, 0.0)
    tokens = BATCH * (PROMPT + RESPONSE)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"size": size, "method": name_, "experts": experts or SIZES[size]["teacher"]["num_experts"],
            "step_ms": 1000 * step, **{f"{k}_ms": 1000 * v for k, v in med.items()},
            "gen_generate_ms": 1000 * gen_generate, "teacher_head_ms": 1000 * teacher_head,
            "gen_first_ms": 1000 * first_gen,
            "gen_tokens_per_s": BATCH * RESPONSE / med["gen"] if med["gen"] else 0.0,
            "generate_tokens_per_s": BATCH * RESPONSE / gen_generate if gen_generate else 0.0,
            "overhead": step / max(sum(med.values()), 1e-12), "tokens_per_s": tokens / step,
            "peak_mb": peak / 2**20}


def step_parts(cfg, student, teacher, tok, rows, optimizer, state) -> dict:
    """The parts of a step as separate callables, by name.
    Generation, teacher forward(s), student forward + loss + backward, SAR's router update, clip + AdamW
    (run on real gradients)."""
    spec = cfg.spec  # the method's row: what the step does (no method names tested here)
    on_policy = spec.on_policy
    seeds = list(range(len(rows)))  # per-row streams, as train_step samples
    items = moekd.generate_on_policy(student, rows, tok, cfg, seeds) if on_policy else rows
    batch = moekd.collate(items, tok.pad_token_id)
    norm = float(moekd.loss_mask(batch["labels"]).sum())
    M = cfg.ka_m if cfg.spec.passes else 1

    def teacher_part():  # the teacher's forward(s) under the method's routing
        with moekd.teacher_routing(teacher, cfg, state.generator):
            return moekd.teacher_hidden(teacher, batch, repeat=M)
    t_hidden = teacher_part() if spec.teacher else None

    def student_part():  # the method's own step function, its teacher forward replaced by the states above
        student.zero_grad(set_to_none=True)
        student.train()
        with cached_teacher_hidden(t_hidden):
            parts = moekd.method_step(cfg.method)(student, teacher, batch, cfg, norm=norm, n_micro=1,
                                                  state=state)
        parts["loss"].backward()

    def optimizer_part():  # the gradients of the last student_part are still there
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()

    parts = {}
    if on_policy:
        parts["gen"] = lambda: moekd.generate_on_policy(student, rows, tok, cfg, seeds)
    if spec.teacher:
        parts["teacher"] = teacher_part
    parts["student"] = student_part
    if spec.routers:
        parts["router"] = lambda: moekd.sar_router_update(student, teacher, [batch], [norm], cfg, state)
    parts["optimizer"] = optimizer_part
    # a reference, not a part: this work is inside student_part's chunked loss
    if spec.passes:
        parts["teacher_head"] = teacher_head_reference(cfg, teacher, batch, t_hidden, M)
    return parts


def teacher_head_reference(cfg, teacher, batch, t_hidden, M: int):
    """The teacher side of the loss on its own (a callable): the M passes' head logits and log-softmax.
    Over the loss rows, in the chunks and pass by pass as the hidden-state loss runs them (KA's teacher
    needs no gradient)."""
    mask = moekd.loss_mask(batch["labels"]).view(-1)
    head = moekd.output_head(teacher)
    t = t_hidden.view(M, mask.numel(), -1)[:, mask]
    vocab = head.weight.shape[0]
    chunk = hidden_losses.chunk_rows(cfg.kl_chunk, vocab)  # frozen passes go one at a time, as in the loss

    @torch.no_grad()
    def run():
        for i in range(0, t.shape[1], chunk):
            for h in t[:, i:i + chunk]:
                hidden_losses.head_logits(h, head, vocab)[0].log_softmax(-1)
    return run


@contextlib.contextmanager
def cached_teacher_hidden(hidden):
    """Inside the block moekd.teacher_hidden returns `hidden`: a method step then costs its student part."""
    original = moekd.teacher_hidden
    moekd.teacher_hidden = lambda *args, **kwargs: hidden
    try:
        yield
    finally:
        moekd.teacher_hidden = original


# ----------------------------------------------------------------------------
# Large vocabulary: each method's loss path (output heads, loss, backward) from the models' final hidden
# states, as moekd trains (hidden) vs the full-vocabulary logits it used before (logits: today's steps' loss
# code on lm_head outputs). fp32 on CPU; the student's hidden states and head get gradients, SAR's router loss
# sends its gradient into the teacher's hidden states (on to its routers).

LOSS_SHAPES = {"large": dict(V=151936, H=256, B=2, T=512, prompt=128, M=2),  # the large-vocab comparison
               "kl": dict(V=32000, H=256, B=4, T=512, prompt=0, M=1)}        # the KL memory probe
LOSS_METHODS = ("sft", "kd", "gkd", "ka", "ka-gold", "sar-router")


class Head(torch.nn.Module):
    """Just what moekd.output_head reads from a model: an output head and a config."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        # the tensor itself
        self.head, self.config = argparse.Namespace(weight=weight, bias=None), argparse.Namespace()

    def get_output_embeddings(self):
        return self.head


def loss_inputs(method: str, shape: str) -> dict:
    V, H, B, T, M, prompt = (LOSS_SHAPES[shape][k] for k in ("V", "H", "B", "T", "M", "prompt"))
    g = torch.Generator().manual_seed(0)
    M = M if method in ("ka", "ka-gold") else 1
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :prompt] = -100
    router = method == "sar-router"
    x = {"hs": torch.randn(B, T, H, generator=g).requires_grad_(not router),
         "ws": torch.randn(V, H, generator=g).mul_(0.1).requires_grad_(not router),
         "ht": torch.randn(M * B, T, H, generator=g).requires_grad_(router),
         "wt": torch.randn(V, H, generator=g).mul_(0.1), "labels": labels, "M": M}  # no temporaries: the
    # baseline high-water mark is the inputs, not a transient copy of one
    return x


def logits_loss_path(method: str, x: dict) -> None:
    """Each method's loss on full logits = lm_head(hidden states): the plain moekd.reverse_kl, forward_kl."""
    hs, ws, ht, wt, labels, M = x["hs"], x["ws"], x["ht"], x["wt"], x["labels"], x["M"]
    mask = moekd.loss_mask(labels)
    norm = float(mask.sum())
    logits, B = torch.nn.functional.linear(hs, ws), labels.shape[0]
    with torch.set_grad_enabled(method == "sar-router"):
        t = torch.nn.functional.linear(ht, wt)  # the teacher's lm_head in its (no-grad) forward
    def ce():
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        per = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100,
                                                reduction="none")
        return torch.where(mask, per, 0.0).sum() / norm
    views = t.view(M, *logits.shape)  # the M teacher passes
    if method == "sft":
        loss = ce()
    elif method in ("kd", "ka-gold"):
        loss = 0.5 * ce() + 0.5 * sum(moekd.forward_kl(logits, t_m, mask) for t_m in views) / M
    elif method in ("gkd", "ka"):  # KA: the mean of the M passes' reverse KLs
        loss = sum(moekd.reverse_kl(logits, t_m, mask) for t_m in views) / M
    else:  # SAR's router loss KL(p_teacher || q_student), the student without gradient
        loss = moekd.forward_kl(logits.detach(), t, mask)
    loss.backward()


def hidden_loss_path(method: str, x: dict, chunk_mb: float) -> None:
    """The same loss through moekd.step_losses, as training runs it."""
    student, teacher = Head(x["ws"]), Head(x["wt"])
    cfg, state = moekd.Config(kl_chunk=chunk_mb), moekd.MethodState()
    batch = {"labels": x["labels"]}
    norm = float(moekd.loss_mask(x["labels"]).sum())
    weights = {"sft": dict(ce_weight=1 / norm),
               "kd": dict(ce_weight=0.5 / norm, kl_weight=0.5 / norm, reverse=False),
               "gkd": dict(kl_weight=1 / norm), "ka": dict(kl_weight=1 / norm),
               "ka-gold": dict(ce_weight=0.5 / norm, kl_weight=0.5 / norm, reverse=False),
               "sar-router": dict(kl_weight=1 / norm, reverse=False)}[method]
    t = None if method == "sft" else x["ht"]
    loss, _ = moekd.step_losses(student, None if t is None else teacher, x["hs"], t, batch, cfg, state,
                                **weights)
    loss.backward()


GENERIC_LOSSES = {"gkd": hidden_losses.reverse_kl_rows, "ka": hidden_losses.reverse_kl_rows,
                  "sar-router": hidden_losses.forward_kl_rows}  # the methods whose whole loss is one KL


def generic_loss_path(method: str, x: dict, chunk_mb: float) -> None:
    """The same KL through hidden_losses.chunked_loss, the path a new loss takes.
    The loss is a function of log-probabilities; each chunk's gradients come from torch.autograd.grad."""
    mask = moekd.loss_mask(x["labels"]).view(-1)
    hs, ht = x["hs"].flatten(0, 1)[mask], x["ht"].view(x["M"], mask.numel(), -1)[:, mask]
    loss = hidden_losses.chunked_loss(GENERIC_LOSSES[method], hs, hidden_losses.Head(x["ws"]), ht,
                                      hidden_losses.Head(x["wt"]), chunk_mb=chunk_mb) / float(mask.sum())
    loss.backward()


LOSS_PATHS = {"logits": lambda method, x, chunk_mb: logits_loss_path(method, x),
              "hidden": hidden_loss_path, "generic": generic_loss_path}


def loss_paths(method: str) -> tuple[str, ...]:
    return ("logits", "hidden", "generic") if method in GENERIC_LOSSES else ("logits", "hidden")


def loss_memory(method: str, path: str, chunk_mb: float, shape: str = "large") -> dict:
    """Peak extra memory (RSS high-water mark) of one loss path + backward over the inputs."""
    x = loss_inputs(method, shape)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    LOSS_PATHS[path](method, x, chunk_mb)
    return {"extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20}


def loss_times(method: str, repeats: int, chunk_mb: float, shape: str = "large") -> dict:
    """Median seconds of the loss paths, interleaved (one warm-up each)."""
    x = loss_inputs(method, shape)
    times = {path: [] for path in loss_paths(method)}
    for i in range(repeats + 1):
        for path in times:
            fn = functools.partial(LOSS_PATHS[path], method, x, chunk_mb)
            for t in (x["hs"], x["ws"], x["ht"]):
                t.grad = None
            seconds = timed(fn, lambda: None)
            if i:
                times[path].append(seconds)
    return {path: statistics.median(v) for path, v in times.items()}


def large_vocab_loss(repeats: int, chunk_mb: float) -> dict:
    rows = []
    for method in LOSS_METHODS:
        mem = {p: worker(["--loss-memory", f"{method},{p}", "--kl-chunk", str(chunk_mb)],
                         EXACT_MALLOC)["extra_mb"] for p in loss_paths(method)}
        sec = worker(["--loss-time", method, "--steps", str(repeats), "--kl-chunk", str(chunk_mb)])
        rows.append({"method": method, **{f"{p}_mb": mem[p] for p in mem},
                     **{f"{p}_ms": 1000 * sec[p] for p in sec}, "memory_ratio": mem["hidden"] / mem["logits"],
                     "time_ratio": sec["hidden"] / sec["logits"]})
    return {"shape": LOSS_SHAPES["large"], "chunk_mb": chunk_mb, "rows": rows,
            "memory_ratio": max(r["memory_ratio"] for r in rows),
            "time_ratio": max(r["time_ratio"] for r in rows)}


# ----------------------------------------------------------------------------
# GPU check (--gpu-check): the CUDA tests, every method's tiny bf16 step, the paper's shapes, the sampler

# Llama-MoE-3.5B (4/16) and Sheared-LLaMA-1.3B, from their public configs; random weights
PAPER_SHAPES = dict(
    teacher=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_experts=16, num_selects=4),
    student=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                 num_attention_heads=16))
PAPER_PAIR = "Llama-MoE-3.5B (4/16) -> Sheared-LLaMA-1.3B"
CHECKS = {"paper": dict(shapes=PAPER_SHAPES, micro=4, accum=4, prompt=256, response=256, steps=3),
          # CPU smoke test
          "tiny": dict(shapes=SIZES["tiny"], micro=2, accum=2, prompt=16, response=16, steps=2)}


@contextlib.contextmanager
def part_timers(sync, optimizer) -> dict:
    """Seconds spent in the parts of moekd.train_step, timed where it calls them.
    Generation, the teacher's forwards, SAR's router update, the optimizer step; the student's forward +
    backward is the rest."""
    spent = {"gen": 0.0, "teacher": 0.0, "router": 0.0, "optimizer": 0.0}

    def wrap(name, fn):
        def timed_call(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - t0
        return timed_call
    patched = {"generate_on_policy": "gen", "teacher_hidden": "teacher", "sar_router_update": "router"}
    originals = {attr: getattr(moekd, attr) for attr in patched}
    for attr, name in patched.items():
        setattr(moekd, attr, wrap(name, originals[attr]))
    optimizer.step = wrap("optimizer", optimizer.step)
    try:
        yield spent
    finally:
        for attr, fn in originals.items():
            setattr(moekd, attr, fn)
        del optimizer.step


def random_rows(n: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (prompt + response,), generator=g).tolist()
        rows.append({"prompt_ids": ids[:prompt], "input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def build_pair(shapes: dict, device, teacher_dtype) -> tuple:
    from transformers import LlamaConfig, LlamaForCausalLM
    t = {**llama_moe.LLAMA_MOE_DEFAULTS, **shapes["teacher"], "max_position_embeddings": 1024}
    teacher = llama_moe.build_llama_moe(llama_moe.check_llama_moe_config(t, where="gpu-check"), device=device,
                                        dtype=teacher_dtype, init_seed=0).eval().requires_grad_(False)
    torch.manual_seed(1)
    with torch.device(device):
        student = LlamaForCausalLM(LlamaConfig(**shapes["student"], bos_token_id=1, eos_token_id=2,
                                               max_position_embeddings=1024))
    return teacher, student


def tiny_method_steps(device, amp) -> dict:
    """One step of each method on the tiny shapes in bf16 autocast: loss parts, trainable teacher parameters.
    The loss parts must all be finite; the teacher is frozen as build_pair and moekd freeze it (SAR trains
    its routers only)."""
    out = {}
    for method in moekd.METHODS:
        teacher, student = build("tiny", None, device)
        teacher.to(amp).requires_grad_(False)
        if moekd.METHODS[method].routers:
            moekd.train_routers(teacher)
        cfg = moekd.Config(method=method, batch_size=2, grad_accum=2, max_prompt_len=16, max_len=32,
                           gen_batch_size=4)
        rows = random_rows(4, 16, 16, SIZES["tiny"]["student"]["vocab_size"])
        optimizer = torch.optim.AdamW(moekd.param_groups(student, cfg.weight_decay), lr=cfg.lr)
        logs = moekd.train_step(cfg, student, teacher, Tokens(), rows, optimizer, cfg.lr,
                                moekd.method_state(cfg, teacher, amp))
        out[method] = {k: float(v) for k, v in logs.items()}
        out[method]["teacher_trainable"] = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    return out


def paper_method(method: str, check: dict, teacher, student, device, amp, sync) -> dict:
    """Time `steps` optimizer steps of one method at the check's shapes.
    Returns the step time and its parts, generation tokens/s and peak memory."""
    batch = check["micro"] * check["accum"]
    cfg = moekd.Config(method=method, batch_size=check["micro"], grad_accum=check["accum"], ka_m=2,
                       max_prompt_len=check["prompt"], max_len=check["prompt"] + check["response"],
                       gen_batch_size=batch, compile_sampler="on" if device.type == "cuda" else "off",
                       lr=1e-5, router_lr=1e-6)
    if moekd.METHODS[method].routers:  # as moekd loads a SAR teacher
        moekd.train_routers(teacher)
    state = moekd.method_state(cfg, teacher, amp)
    optimizer = torch.optim.AdamW(moekd.param_groups(student, cfg.weight_decay), lr=cfg.lr)
    rows = random_rows(batch, check["prompt"], check["response"], check["shapes"]["student"]["vocab_size"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    steps = []
    with fixed_length_responses():
        for i in range(check["steps"]):
            with part_timers(sync, optimizer) as spent:
                seconds = timed(lambda: moekd.train_step(cfg, student, teacher, Tokens(), rows, optimizer,
                                                         cfg.lr, state, step=i), sync)
            steps.append({"step_s": seconds, **{f"{k}_s": v for k, v in spent.items()},
                          "student_s": seconds - sum(spent.values())})
    peak = torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else 0.0
    steady = steps[1:] or steps  # the first step compiles the decode step
    med = {k: statistics.median(s[k] for s in steady) for k in steady[0]}
    return {"method": method, "steps": steps, "steady": med, "first_step_s": steps[0]["step_s"],
            "gen_tokens_per_s": batch * check["response"] / med["gen_s"] if med["gen_s"] else 0.0,
            "peak_gb": peak}


def bandwidth_floor_tokens_per_s(check: dict, bandwidth: float) -> float:
    """Tokens/s of decoding at memory bandwidth.
    Each step reads the bf16 student weights and, on average, half the final KV cache (bf16); `batch`
    tokens per step."""
    s = check["shapes"]["student"]
    batch = check["micro"] * check["accum"]
    params = s["vocab_size"] * s["hidden_size"] * 2 + s["num_hidden_layers"] * (
        4 * s["hidden_size"] ** 2 + 3 * s["hidden_size"] * s["intermediate_size"])
    kv = 2 * s["num_hidden_layers"] * batch * (check["prompt"] + check["response"] / 2) * s["hidden_size"] * 2
    return batch / ((2 * params + kv) / bandwidth)


CUDA_TESTS_TIMEOUT_S = 240


def run_tests(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run a test command, its whole output (stdout and stderr) written to `log` as it runs.
    So a timeout or a crash keeps what it printed. Returns the exit code (None when killed at the timeout),
    the last line, and the FAILED/ERROR lines of pytest's -rfE summary."""
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = log.read_text(errors="replace").strip().splitlines()
    last = lines[-1] if lines else "(no output)"
    return {"returncode": code, "timed_out": code is None, "log": str(log),
            "summary": last if code is not None else f"killed after {timeout:g} s; last line: {last}",
            "failures": [line for line in lines if line.startswith(("FAILED ", "ERROR "))]}


def environment(device) -> dict:
    """What ran the check: versions, the GPU, `nvidia-smi`, and the SDPA backends torch may pick.
    Versions of torch, CUDA, cuDNN, transformers and Triton. A kernel missing here changes speed, or NaN
    behaviour, silently."""
    import platform
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "transformers": transformers.__version__, "transformers_path": transformers.__file__,
           "sdpa": {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
                    for name in ("flash", "mem_efficient", "math", "cudnn")}}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=props.total_memory / GB)
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout + smi.stderr
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"not run: {e!r}"
    return env


def compile_counters() -> dict:
    """torch.compile's counters so far.
    Frames compiled, graphs, recompiles (guard failures), CUDA graphs skipped (the fallback to plain
    launches) and recorded (moekd's decode step: once per shape per run)."""
    from torch._dynamo.utils import counters, guard_failures
    return {"frames_compiled": counters["frames"]["ok"], "unique_graphs": counters["stats"]["unique_graphs"],
            "recompiles": sum(len(v) for v in guard_failures.values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "cudagraph_recordings": _cudagraph_recordings[0]}


_cudagraph_recordings = [0]


@contextlib.contextmanager
def counting_cudagraph_recordings(device):
    """Inside the block, count the CUDA graphs that torch.compile's cudagraph trees record.
    Each adds one to compile_counters()'s cudagraph_recordings (torch keeps no counter of its own for it)."""
    if device.type != "cuda":
        yield
        return
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    original = CUDAGraphTreeManager.record_function

    def record_function(self, *args, **kwargs):
        _cudagraph_recordings[0] += 1
        return original(self, *args, **kwargs)
    CUDAGraphTreeManager.record_function = record_function
    try:
        yield
    finally:
        CUDAGraphTreeManager.record_function = original


def run_stage(report: dict, name: str, fn, device, save) -> bool:
    """Run one stage of the GPU check; True if it succeeded.
    `fn()` puts its figures into `report`, or its full traceback is kept if it raises; its seconds, peak
    memory and compile counters are kept either way. Then the report is saved, so a later stage that fails
    or is killed cannot take this one's figures with it."""
    entry = report["stages"][name] = {"ok": False}
    if device.type == "cuda":
        try:  # an earlier stage's kernel error is sticky: fn() then fails too, with its own traceback
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        except Exception as e:
            entry["device_error_before"] = repr(e)
    before, t0 = compile_counters(), time.perf_counter()
    try:
        fn()
        entry["ok"] = True
    except Exception:  # an OOM, a compile or kernel error: recorded, and the next stage still runs
        entry["error"] = traceback.format_exc()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            entry["peak_gb"] = torch.cuda.max_memory_allocated() / GB
            entry["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
        except Exception as e:
            entry["device_error_after"] = repr(e)
    else:  # the process's high-water mark so far (RSS), not this stage's own
        entry["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    entry["seconds"] = time.perf_counter() - t0
    entry["compile"] = {k: v - before[k] for k, v in compile_counters().items()}
    gc.collect()  # the failed stage's tensors, before the next stage allocates
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # a sticky device error is already in this stage's entry
            torch.cuda.empty_cache()
    save(report)
    return entry["ok"]


def save_report(report: dict, json_path: Path | None) -> None:
    """The report as JSON and Markdown beside it, each replaced whole (a kill mid-write leaves the last)."""
    if json_path is None:
        return
    try:  # the JSON has every figure: a bug in the Markdown must not stop the check
        md = gpu_check_markdown(report)
    except Exception:
        md = f"the Markdown report failed; the figures are in {json_path.name}:\n\n{traceback.format_exc()}"
    for path, text in ((json_path, json.dumps(report, indent=2, default=str) + "\n"),
                       (json_path.with_suffix(".md"), md)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def gpu_check(scale: str, device, bandwidth: float, json_path: Path | None = None) -> dict:
    """The GPU check in three parts, each stage on its own (run_stage), the JSON and Markdown saved after it.
    (1) the environment, the cuda-marked tests (CUDA only) and every method's tiny bf16 step, (2) gkd, ka
    and sar at the check's shapes (the paper's: 4/16 Llama-MoE-3.5B teacher, Sheared-LLaMA-1.3B student,
    global batch 16 = 4 x 4, 256 + 256 tokens, bf16) against the bandwidth floor and the memory plan, (3)
    the sampler against generate(). A failed stage is recorded with its traceback and the others still run."""
    t0 = time.perf_counter()
    check, amp = CHECKS[scale], torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scale": scale,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__,
              "bandwidth_bytes_per_s": bandwidth, "stages": {}, "methods": []}
    json_path = None if json_path is None else Path(json_path)

    def save(r):
        r["wall_s"] = time.perf_counter() - t0
        save_report(r, json_path)

    def env():
        report["environment"] = environment(device)
        report["transformers"] = report["environment"]["transformers"]

    def cuda_tests():
        log = (json_path.with_suffix(".cuda-tests.txt") if json_path is not None
               else Path(tempfile.mkdtemp()) / "cuda-tests.txt")
        report["cuda_tests"] = run_tests([sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "cuda", "-p",
                                          "no:cacheprovider"], log, CUDA_TESTS_TIMEOUT_S)

    def tiny():
        report["tiny_bf16_steps"] = tiny_method_steps(device, amp)
        report["tiny_bf16_finite"] = all(math.isfinite(v) for logs in report["tiny_bf16_steps"].values()
                                         for v in logs.values())

    pair: list = []

    def build():
        pair.extend(build_pair(check["shapes"], device, amp))

    floor = bandwidth_floor_tokens_per_s(check, bandwidth)
    plan_pair = {**PAIRS[PAPER_PAIR], "batch": check["micro"]}
    batch = check["micro"] * check["accum"]

    def method(name):
        def run():
            r = paper_method(name, check, *pair, device, amp, sync)
            r["bandwidth_floor_tokens_per_s"] = floor
            r["fraction_of_floor"] = r["gen_tokens_per_s"] / floor
            r["plan_gb"] = plan(plan_pair, shard_teacher=False, shard_student=False, grad_checkpointing=False,
                                sar=name == "sar", ka_m=2 if name == "ka" else 1, gen_batch=batch)["total"]
            r["peak_over_plan"] = r["peak_gb"] / r["plan_gb"]
            report["methods"].append(r)
        return run

    def sampler():
        report["sampler"] = sampler_comparison(check, pair[1], device, amp, sync)

    with counting_cudagraph_recordings(device):
        run_stage(report, "environment", env, device, save)
        if device.type == "cuda":
            run_stage(report, "cuda_tests", cuda_tests, device, save)
        else:
            report["stages"]["cuda_tests"] = {"ok": False, "skipped": "no CUDA device"}
        run_stage(report, "tiny_bf16_steps", tiny, device, save)
        if run_stage(report, "paper_pair", build, device, save):
            for name in ("gkd", "ka", "sar"):
                run_stage(report, f"method_{name}", method(name), device, save)
            run_stage(report, "sampler", sampler, device, save)
        else:
            for name in ("method_gkd", "method_ka", "method_sar", "sampler"):
                report["stages"][name] = {"ok": False, "skipped": "the paper-shape pair was not built"}
        del pair[:]
        save(report)
    return report


def sampler_comparison(check: dict, student, device, amp, sync) -> dict:
    """moekd's sampler against generate() on the student and the same random prompts: tokens/s, speedup.
    One warm-up call each, then one timed."""
    cfg = moekd.Config(method="gkd", max_prompt_len=check["prompt"],
                       max_len=check["prompt"] + check["response"],
                       gen_batch_size=check["micro"] * check["accum"],
                       compile_sampler="on" if device.type == "cuda" else "off")
    rows = random_rows(check["micro"] * check["accum"], check["prompt"], check["response"],
                       check["shapes"]["student"]["vocab_size"], seed=1)
    seconds = {}
    with fixed_length_responses():
        for name, c in (("moekd", cfg), ("generate", dataclasses.replace(cfg, sampler="generate"))):
            with moekd.autocast(device, amp):
                run = lambda: moekd.generate_on_policy(student, rows, Tokens(), c,
                                                       list(range(len(rows))))  # noqa: E731
                run()
                seconds[name] = timed(run, sync)
    out = {f"{k}_tokens_per_s": len(rows) * check["response"] / v for k, v in seconds.items()}
    out["speedup"] = seconds["generate"] / seconds["moekd"]
    return out


def gpu_check_markdown(r: dict) -> str:
    """The report as Markdown; written after every stage, so it reads whatever stages have run so far."""
    env = r.get("environment", {})
    lines = [f"GPU check {r['date']}: {r['device']}, torch {r['torch']} (CUDA {env.get('cuda')}), "
             f"transformers {env.get('transformers')}, Triton {env.get('triton')}, scale {r['scale']}, "
             f"wall {r.get('wall_s', 0):.0f} s",
             "", "| stage | result | s | peak GB | frames compiled | recompiles | CUDA graphs recorded | "
             "CUDA-graph skips |", "|" + "---|" * 8]
    for name, st in r["stages"].items():
        result = "ok" if st["ok"] else f"skipped: {st['skipped']}" if "skipped" in st else "**FAILED**"
        c = st.get("compile", {})
        peak = st.get("peak_gb", st.get("peak_rss_gb"))
        lines.append(f"| {name} | {result} | {st.get('seconds', 0):.1f} | "
                     f"{'' if peak is None else f'{peak:.1f}'} | {c.get('frames_compiled', '')} | "
                     f"{c.get('recompiles', '')} | {c.get('cudagraph_recordings', '')} | "
                     f"{c.get('cudagraph_skips', '')} |")
    if "sdpa" in env:
        lines += ["", "- SDPA backends enabled: " + ", ".join(k for k, v in env["sdpa"].items() if v)]
    for name, st in r["stages"].items():
        if "error" in st:
            lines.append(f"- {name} failed: `{st['error'].strip().splitlines()[-1]}` (traceback in the JSON)")
    if "cuda_tests" in r:
        t = r["cuda_tests"]
        lines.append(f"- `pytest -m cuda`: {t['summary']} (exit {t['returncode']}; output: {t['log']})")
        lines += [f"  - {line}" for line in t["failures"]]
    if "tiny_bf16_steps" in r:
        losses = ", ".join(f"{m} {logs['loss']:.3f}" for m, logs in r["tiny_bf16_steps"].items())
        finite = "finite" if r["tiny_bf16_finite"] else "NOT FINITE"
        lines.append(f"- every method's tiny step in bf16: {finite} ({losses})")
    if r["methods"]:
        lines += ["", "| method | step s | generation s | teacher s | student s | router s | optimizer s | "
                  "first step s | gen tokens/s | of bandwidth floor | peak GB | plan GB | peak / plan |",
                  "|" + "---|" * 13]
    for m in r["methods"]:
        s = m["steady"]
        lines.append(f"| {m['method']} | {s['step_s']:.2f} | {s['gen_s']:.2f} | {s['teacher_s']:.2f} | "
                     f"{s['student_s']:.2f} | {s['router_s']:.2f} | {s['optimizer_s']:.2f} | "
                     f"{m['first_step_s']:.1f} | {m['gen_tokens_per_s']:.0f} | "
                     f"{100 * m['fraction_of_floor']:.0f}% | {m['peak_gb']:.1f} | "
                     f"{m['plan_gb']:.1f} | {m['peak_over_plan']:.2f} |")
    if "sampler" in r:
        sp = r["sampler"]
        lines += ["", f"- sampler: moekd {sp['moekd_tokens_per_s']:.0f} tokens/s vs generate() "
                  f"{sp['generate_tokens_per_s']:.0f} tokens/s: {sp['speedup']:.2f}x"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Driver: one subprocess per configuration, then the table and derived figures

# glibc hands large freed blocks back to the OS and page-faults them in again on the next step, which
# made CPU step times swing by 2x between repetitions; keeping freed memory for reuse (what PyTorch's
# caching allocator does on GPU) makes the CPU figures stable. Applied to the workers only.
CPU_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36),
              "MALLOC_TOP_PAD_": str(2**30)}


# The loss-memory workers measure the other way: every block over 64 KB is its own mapping, returned at free,
# so the peak RSS is the peak of live tensors (no freed block counts; slower, and they are not timed).
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def worker(args_list: list[str], malloc: dict = CPU_MALLOC) -> dict:
    # no on-disk inductor caches: the reported compile time is a cold compile, as in a fresh environment
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", **malloc}
    proc = subprocess.run([sys.executable, str(HERE / "bench.py"), *args_list], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {args_list} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    cols = ["size", "method", "step_ms", "gen_ms", "teacher_ms", "student_ms", "router_ms", "optimizer_ms",
            "overhead", "tokens_per_s", "peak_mb", "gen_tokens_per_s", "generate_tokens_per_s",
            "gen_first_ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + " |")
    return "\n".join(lines)


LAYOUTS = [("1 process", 1, []), ("2 ranks: DDP student, replicated teacher", 2, []),
           ("2 ranks: DDP student, sharded teacher", 2, ["--shard-teacher"]),
           ("2 ranks: sharded student and teacher", 2, ["--shard-teacher", "--shard-student"])]


def model_dirs(size: str, root: Path) -> tuple[Path, Path]:
    """The bench sizes as model directories moekd.py loads.
    Weights from moekd_init_seed; the tiny tokenizer, whose ids all fit the larger vocabulary."""
    spec, tok = SIZES[size], HERE / "tiny_moe"
    per_layer = ("score_scale_factor", "size_experts")  # tiny_moe's per-layer lists fit only its 3 layers
    teacher = {**{k: v for k, v in json.loads((tok / "config.json").read_text()).items()
                  if k not in per_layer},
               **spec["teacher"], "max_position_embeddings": 512,
               "num_key_value_heads": spec["teacher"]["num_attention_heads"]}
    student = {**json.loads((tok / "student" / "config.json").read_text()), **spec["student"],
               "num_key_value_heads": spec["student"]["num_attention_heads"]}
    dirs = root / f"{size}-teacher", root / f"{size}-student"
    for d, config in zip(dirs, (teacher, student)):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (d / name).write_bytes((tok / name).read_bytes())
    return dirs


def dist_memory(sizes: list[str], root: Path) -> list[dict]:
    rows = []
    for size in sizes:
        teacher, student = model_dirs(size, root)
        for name, nproc, flags in LAYOUTS:
            out = root / f"run-{size}-{len(rows)}"
            launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                          "--standalone", f"--nproc_per_node={nproc}"]
            run = [*launch, str(HERE / "moekd.py"), "--method", "sar", "--model", str(student), "--teacher",
                   str(teacher), "--data", "synthetic", "--synthetic-train", "16", "--batch-size", "4",
                   "--global-batch-size", "8",
                   "--max-steps", "2", "--max-prompt-len", str(PROMPT), "--max-len", str(PROMPT + RESPONSE),
                   "--no-dev-eval", "--device", "cpu", "--out", str(out), *flags]
            proc = subprocess.run(run, capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(run)} failed:\n{proc.stderr[-3000:]}")
            memory = json.loads((out / "metrics.json").read_text())["memory"]
            rows.append({"size": size, "layout": name, **memory[0]})
    return rows


# ----------------------------------------------------------------------------
# Memory plan on paper: per-GPU GB of real teacher/student pairs (public configs), checked against the
# per-rank state moekd reports (--dist): 16 bytes per student parameter, 2 per bf16 teacher parameter.
# Activations per token and layer, bf16 autocast over fp32 weights, SDPA (no T x T scores): a dense SwiGLU
# layer keeps ~28 H + 8 I bytes (fp32 residual and norm inputs, bf16 q/k/v/attention/MLP tensors); an MoE
# layer adds 2 H + 8 I_e per active expert and token (the routed copy of x and the expert's SwiGLU).
# Activation checkpointing keeps one fp32 hidden state per layer plus one layer's activations.

PAIRS = {  # parameters and shapes from the public configs; E experts, K active, I_e expert FFN size
    "Llama-MoE-3.5B (4/16) -> Sheared-LLaMA-1.3B": dict(
        teacher=dict(params=6.74e9, H=4096, L=32, I_e=688, K=4, E=16, concat_experts=True),
        student=dict(params=1.35e9, H=2048, L=24, I=5504, KV=2048),
        V=32000, gpus=1, batch=4),
    "Mixtral-8x7B -> Mistral-7B": dict(
        teacher=dict(params=46.7e9, H=4096, L=32, I_e=14336, K=2, E=8),
        student=dict(params=7.24e9, H=4096, L=32, I=14336, KV=1024),
        V=32000, gpus=8, batch=1),
    "Qwen3-30B-A3B -> Qwen3-1.7B": dict(
        teacher=dict(params=30.5e9, H=2048, L=48, I_e=768, K=8, E=128),
        student=dict(params=1.72e9, H=2048, L=28, I=6144, KV=1024),
        V=151936, gpus=4, batch=4),
}
SEQ, GB = 512, 1e9


def plan(pair: dict, *, shard_teacher: bool, shard_student: bool, grad_checkpointing: bool, sar: bool,
         logits: bool = False, ka_m: int = 1, chunk_mb: float = 32, gen_batch: int = 16) -> dict[str, float]:
    t, s, V, W, tokens = pair["teacher"], pair["student"], pair["V"], pair["gpus"], pair["batch"] * SEQ
    dense = lambda m: 28 * m["H"] + 8 * m["I"]  # noqa: E731  bytes per token per layer
    moe_all = 28 * t["H"] + t["E"] * (2 * t["H"] + 8 * t["I_e"])  # SAR: every expert on every token
    ckpt = lambda m, per_layer: tokens * (4 * m["H"] * m["L"] + per_layer) / GB  # noqa: E731
    row = {"teacher weights": 2 * t["params"] / (W if shard_teacher else 1) / GB,
           "student weights + grads": 8 * s["params"] / (W if shard_student else 1) / GB,
           "AdamW state": 8 * s["params"] / (W if shard_student else 1) / GB,
           "student activations": ckpt(s, dense(s)) if grad_checkpointing else
                                  tokens * dense(s) * s["L"] / GB,
           "teacher activations (SAR)": 0.0 if not sar else (ckpt(t, moe_all) if grad_checkpointing
                                                              else tokens * moe_all * t["L"] / GB),
           # from hidden states: the fp32 head-gradient buffer [V, H] (one more student-head gradient), about
           # 3 chunk temporaries (5 for KA, whose frozen passes go one at a time beside an accumulator), the M
           # teacher passes' bf16 hidden states. Before (logits=True): bf16 student logits + their grad + M
           # bf16 teacher logits (+ SAR's grad) and 4 fp32 [256, V] temporaries of the chunked KL
           "losses": ((4 * V * s["H"] + (3 if ka_m == 1 else 5) * chunk_mb * 2**20
                       + ka_m * tokens * t["H"] * 2)
                      if not logits else tokens * V * 2 * (2 + ka_m + sar) + 4 * 4 * 256 * V) / GB,
           # on-policy sampling under bf16 autocast runs a bf16 copy of the student (sampling.sampling_copy;
           # a sharded student samples through generate(), without a copy)
           "bf16 sampling copy": 0.0 if shard_student else 2 * s["params"] / GB,
           # ... and its bf16 static KV cache, kept between steps (sampling.static_cache): K and V of width
           # KV (heads x head size) per layer for gen_batch rows of SEQ tokens
           "sampling KV cache": 0.0 if shard_student else 2 * 2 * s["L"] * gen_batch * SEQ * s["KV"] / GB,
           # SAR's router backward through a Llama-MoE teacher runs all experts as three matmuls over each
           # layer's concatenated expert weights (llama_moe's all_experts), and F.linear saves that bf16 copy
           # of E I_e H for the backward: 3 per layer but the first (whose input needs no gradient: only its
           # down projection's), one layer's when the teacher's layers are checkpointed; transformers' MoE
           # families keep stacked expert weights (grouped_mm: no copy)
           "SAR saved expert weights": 0.0 if not (sar and t.get("concat_experts")) else (
               2 * t["E"] * t["I_e"] * t["H"] * (3 if grad_checkpointing else 3 * t["L"] - 2) / GB)}
    gathered = (2 * t["params"] / t["L"] * 2 if shard_teacher else 0) + \
        (4 * s["params"] / s["L"] * 2 if shard_student else 0)
    row["FSDP gathered layers"] = gathered / GB  # the layer in use and the prefetched next one
    row["total"] = sum(row.values())
    return row


def print_plan() -> None:
    layouts = {  # the options each pair needs, SAR being the most demanding method
        "Llama-MoE-3.5B (4/16) -> Sheared-LLaMA-1.3B": [dict(shard_teacher=False, shard_student=False,
                                                             grad_checkpointing=False)],
        "Mixtral-8x7B -> Mistral-7B": [dict(shard_teacher=False, shard_student=False,
                                            grad_checkpointing=False),
                                       dict(shard_teacher=True, shard_student=True,
                                            grad_checkpointing=False)],
        "Qwen3-30B-A3B -> Qwen3-1.7B": [dict(shard_teacher=False, shard_student=False,
                                             grad_checkpointing=False),
                                        dict(shard_teacher=True, shard_student=False,
                                             grad_checkpointing=False),
                                        dict(shard_teacher=True, shard_student=False,
                                             grad_checkpointing=True)],
    }
    for name, options in layouts.items():
        pair = PAIRS[name]
        print(f"\n{name}: {pair['gpus']} x 80 GB, per-device batch {pair['batch']} x {SEQ} tokens, V "
              f"{pair['V']}, GB per GPU")
        for opt in options:
            flags = " ".join(f"--{k.replace('_', '-')}" for k, v in opt.items() if v) or "(no option)"
            gkd, sar = plan(pair, **opt, sar=False), plan(pair, **opt, sar=True)
            before = [plan(pair, **opt, sar=s, logits=True) for s in (False, True)]
            print(f"  {flags}: " + ", ".join(f"{k} {v:.2f}" for k, v in sar.items() if k != "total")
                  + f" | total GKD {gkd['total']:.1f}, SAR {sar['total']:.1f}; with full-vocabulary logits "
                    f"(before): losses {before[1]['losses']:.2f}, GKD {before[0]['total']:.1f}, SAR "
                    f"{before[1]['total']:.1f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plan:
        print_plan()
        return {}
    if args.dist:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            rows = dist_memory(args.sizes.split(","), Path(tmp))
        print(f"SAR, global batch 8 x ({PROMPT} prompt + {RESPONSE} response) tokens; MB on rank 0 (CPU, "
              f"peak RSS includes Python, torch and transformers)")
        print("| size | layout | student weights + grads | teacher weights | optimizer state | peak RSS "
              "|\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']} | {r['layout']} | {r['student_mb']:.1f} | {r['teacher_mb']:.1f} | "
                  f"{r['optimizer_mb']:.1f} | {r['peak_mb']:.0f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"dist_memory": rows}, indent=2) + "\n")
        return {"dist_memory": rows}
    device = parallel.resolve_device(args.device)
    if args.gpu_check:
        report = gpu_check(args.gpu_check_scale, device, args.bandwidth, args.json)  # saved after every stage
        print(gpu_check_markdown(report))
        return report
    if args.one:
        size, name, *experts = args.one.split(",")
        print(json.dumps(run_one(size, name, int(experts[0]) if experts else None, args.steps, args.warmup,
                                 device, args.compile_sampler)))
        return {}
    if args.loss_memory:
        print(json.dumps(loss_memory(*args.loss_memory.split(",")[:2], args.kl_chunk,
                                     *args.loss_memory.split(",")[2:])))
        return {}
    if args.loss_time:
        print(json.dumps(loss_times(args.loss_time, args.steps, args.kl_chunk)))
        return {}
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
              "--compile-sampler", args.compile_sampler]
    sizes = [s for s in args.sizes.split(",") if s]  # --sizes '': only the loss-path figures
    rows = [worker(["--one", f"{size},{name}", *common]) for size in sizes
            for name in args.methods.split(",")]
    result: dict = {"shape": {"batch": BATCH, "prompt": PROMPT, "response": RESPONSE}, "device": str(device),
                    "rows": rows}
    print(f"median step and part times (ms) over {args.steps} steps, batch {BATCH} x ({PROMPT} prompt + "
          f"{RESPONSE} response) tokens, {device}, torch threads {torch.get_num_threads()}")
    print(table(rows))
    derived = {}
    for size in sizes:
        by = {r["method"]: r for r in rows if r["size"] == size}
        derived[size] = {"max_overhead": max(r["overhead"] for r in by.values())}
        on_policy = [r for r in by.values() if r["gen_ms"] > 0]
        if on_policy:  # new sampler tokens/s over generate()'s, the same work
            derived[size]["generation_speedup"] = statistics.median(r["gen_generate_ms"] / r["gen_ms"]
                                                                    for r in on_policy)
            derived[size]["compile_s"] = max(r["gen_first_ms"] - r["gen_ms"] for r in on_policy) / 1000
        if "gkd" in by:  # the step with generate() in its place (the rest of the step does not depend on it)
            g = by["gkd"]
            derived[size]["gkd_step_speedup"] = \
                (g["step_ms"] - g["gen_ms"] + g["gen_generate_ms"]) / g["step_ms"]
        if {"ka-m1", "ka-m2", "ka-m4"} <= set(by):
            # generation does not depend on M; leaving it out keeps its run-to-run noise out of the ratio
            work = {m: by[f"ka-m{m}"]["step_ms"] - by[f"ka-m{m}"]["gen_ms"] for m in (1, 2, 4)}
            teacher = {m: by[f"ka-m{m}"]["teacher_ms"] + by[f"ka-m{m}"]["teacher_head_ms"] for m in (1, 2, 4)}
            derived[size]["ka_cost"] = {m: (work[m] - work[1]) / max(teacher[m] - teacher[1], 1e-9)
                                        for m in (2, 4)}
    print("\nderived (targets: overhead <= 1.10, KA cost <= 1.10, KL memory <= 1.25, generation speed-up >= "
          "3, gkd step at realistic-vocab >= 1.5)")
    for size, d in derived.items():
        ka = "" if "ka_cost" not in d else " | KA cost " + ", ".join(f"M={m}: {v:.2f}"
                                                                     for m, v in d["ka_cost"].items())
        gen = "" if "generation_speedup" not in d else (
            f" | generation speed-up {d['generation_speedup']:.2f}x (compiling {d['compile_s']:.1f} s once)")
        gen += "" if "gkd_step_speedup" not in d else f" | gkd step vs generate {d['gkd_step_speedup']:.2f}x"
        print(f"{size}: max overhead {d['max_overhead']:.2f}{ka}{gen}")
    result["derived"] = derived
    if not args.no_kl_memory:
        chunk = ["--kl-chunk", str(args.kl_chunk)]
        kl, ce, ce_logits = (worker(["--loss-memory", f"{m},{p},kl", *chunk], EXACT_MALLOC) for m, p in
                             (("gkd", "hidden"), ("sft", "hidden"), ("sft", "logits")))
        result["kl_memory"] = {"kl_extra_mb": kl["extra_mb"], "ce_extra_mb": ce["extra_mb"],
                               "ratio": kl["extra_mb"] / ce["extra_mb"],
                               "ce_from_logits_mb": ce_logits["extra_mb"]}
        print(f"KL memory: reverse KL + backward from hidden states [4 x 512, 256] through [32000, 256] "
              f"heads {kl['extra_mb']:.0f} MB vs cross-entropy + backward from the same hidden states "
              f"{ce['extra_mb']:.0f} MB: ratio {result['kl_memory']['ratio']:.2f} (cross-entropy on the full "
              f"logits: {ce_logits['extra_mb']:.0f} MB)")
    if not args.no_large_vocab:
        lv = result["large_vocab_loss"] = large_vocab_loss(args.steps, args.kl_chunk)
        s = lv["shape"]
        print(f"\nloss path from hidden states vs full logits: V {s['V']}, H {s['H']}, {s['B']} x {s['T']} "
              f"tokens ({s['prompt']} prompt), KA M = {s['M']}, fp32, chunk temporaries "
              f"{lv['chunk_mb']:g} MB; peak extra MB (RSS) and median ms over {args.steps}")
        print("| method | logits MB | hidden MB | memory ratio | logits ms | hidden ms | time ratio "
              "| generic MB | generic ms |\n|---|---|---|---|---|---|---|---|---|")
        for r in lv["rows"]:
            generic = f"{r['generic_mb']:.0f} | {r['generic_ms']:.0f}" if "generic_ms" in r else "- | -"
            print(f"| {r['method']} | {r['logits_mb']:.0f} | {r['hidden_mb']:.0f} | {r['memory_ratio']:.3f} "
                  f"| {r['logits_ms']:.0f} | {r['hidden_ms']:.0f} | {r['time_ratio']:.2f} | {generic} |")
        print("generic: hidden_losses.chunked_loss, a loss written as a function of log-probabilities "
              "(what a new loss costs before its gradients are derived by hand)")
        print(f"worst: memory ratio {lv['memory_ratio']:.3f} (target <= 0.2), time ratio "
              f"{lv['time_ratio']:.2f} (targets <= 1.2 distillation, <= 1.35 sft)")
    if not args.no_scaling and sizes:
        scaling = []
        size = sizes[0]
        for n in (4, 8, 16):
            for name in ("all", "ka-m2", "sar"):
                scaling.append(worker(["--one", f"{size},{name},{n}", *common]))
        result["scaling"] = scaling
        print(f"\nscaling ({size}): step ms (teacher ms) by experts N")
        print("| method | N=4 | N=8 | N=16 |\n|---|---|---|---|")
        for name in ("all", "ka-m2", "sar"):
            cells = [f"{r['step_ms']:.1f} ({r['teacher_ms'] + r['router_ms']:.1f})"
                     for r in scaling if r["method"] == name]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for s in sizes:
            print(f"scaling ({s}): step ms (teacher ms) by KA passes M: " + ", ".join(
                f"M={r['method'][-1]}: {r['step_ms']:.1f} ({r['teacher_ms']:.1f})"
                for r in rows if r["size"] == s and r["method"].startswith("ka")))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
