"""Sampling for moekd: the student's on-policy responses and the dev/eval generations, exact ancestral
sampling from softmax(logits) at temperature 1, isolated from a checkpoint's own generation_config, with
one random stream per row so a row's sample does not depend on its batch, device or rank.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from parallel import is_sharded


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: input_ids [B, T], attention_mask [B, T]."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


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
