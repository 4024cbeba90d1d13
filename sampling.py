"""Sampling for moekd: the student's on-policy responses and the dev/eval generations, exact ancestral
sampling from softmax(logits) at temperature 1, isolated from a checkpoint's own generation_config, with
one random stream per row so a row's sample does not depend on its batch, device or rank.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
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


M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, in place, of int64 values in [0, 2^32).
    Products stay below 2^63: no overflow."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(M32)
    return x.bitwise_xor_(x >> 16)


def row_keys(seeds: list[int], device) -> torch.Tensor:
    """One 32-bit key per row from its (up to 64-bit) seed: [B] int64."""
    s = torch.tensor(seeds, dtype=torch.long, device=device)
    return mix32(mix32(s & M32) ^ ((s >> 32) & M32))


def gumbel_noise(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] fp32, a pure function of (row key, step, token id).
    Counter-based, so a row's draws depend on its seed and position only, never on its batch, device or
    rank, and a whole batch costs a dozen tensor ops (no per-row generator). argmax(logits + noise) is a
    draw from softmax(logits)."""
    k = mix32(keys ^ mix32(keys * 0 + step))             # [B]; step: an int or a 0-d tensor (compiled decode)
    h = torch.arange(vocab, device=keys.device, dtype=torch.long).mul_(0x9E3779B1)
    h = mix32(h.unsqueeze(0).add(k[:, None]).bitwise_and_(M32))                           # [B, V]
    return uniform_from_hash(h).log_().neg_().log_().neg_()


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms strictly inside (0, 1) from 32-bit hash values (int64): the top 23 bits, centred.
    23, not 24: (2^24 - 1) + 0.5 rounds to 2^24 in fp32, so u would be 1 and the noise +inf (a token drawn
    whatever its probability). Here u is in [2^-24, 1 - 2^-24], the noise in [-2.8, 16.6], all exact in
    fp32."""
    return (h >> 9).float().add_(0.5).mul_(2.0 ** -23)


class RowSeededSampler:
    """A logits processor that makes transformers' `generate` the reference sampler.
    It turns greedy decoding into the same per-row seeded ancestral sampling as sample_rows (the t-th call
    adds gumbel_noise(keys, t))."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.keys, self.step = row_keys(seeds, device), 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noise = gumbel_noise(self.keys, self.step, scores.shape[-1])
        self.step += 1
        return scores.float() + noise


def next_token(logits: torch.Tensor, keys: torch.Tensor, step) -> torch.Tensor:
    """argmax(logits + gumbel_noise): an exact row-seeded draw from softmax(logits [B, V]), temperature 1."""
    return (logits.float() + gumbel_noise(keys, step, logits.shape[-1])).argmax(-1)


def decode_step(model: nn.Module, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache,
                keys: torch.Tensor, step) -> torch.Tensor:
    """One token for every row: the model on the static cache, then next_token [B].
    Shapes are fixed for a batch (token, position [B, t], mask [B, cache length]), so it compiles once."""
    logits = model(input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]                                        # [B, V]
    return next_token(logits, keys, step)


_compiled: dict[str, object] = {}


def compiled_decode_step(device: torch.device):
    """decode_step under torch.compile, made once per device type.
    Fixed shapes (dynamic=False), and on CUDA "reduce-overhead" (CUDA graphs: one launch per token). A new
    batch shape or model recompiles once."""
    if device.type not in _compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled[device.type] = torch.compile(decode_step, dynamic=False, mode=mode)
    return _compiled[device.type]


def cache_length(width: int) -> int:
    """Static cache length for prompt + new tokens: the next power of two (>= 64).
    So batches of other prompt widths reuse one compiled step instead of compiling their own."""
    return max(64, 1 << (width - 1).bit_length())


_caches: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
EOS_CHECK_EVERY = 8  # decode steps between the host's checks that every row has ended


def static_cache(model: nn.Module, batch: int, length: int):
    """The model's StaticCache for (batch, length), made once and reset() on every later call.
    The compiled decode step then sees the same cache tensors (the same addresses) each call, so its CUDA
    graph is recorded once per shape for a whole run instead of re-recorded every training step, which
    counts against torch's re-record limit and silently drops the graph after ~128 steps. One cache per
    shape stays allocated."""
    from transformers import StaticCache
    param = next(model.parameters())
    key = (batch, length, param.device, param.dtype)
    caches = _caches.setdefault(model, {})
    if key not in caches:
        caches[key] = StaticCache(config=model.config, max_cache_len=length)
    else:
        caches[key].reset()  # zeros keys/values and the layers' write counters in place
    return caches[key]


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a response, the response's own end token first.
    Those data.set_template found for --template chat (the template's end-of-turn token, EOS,
    generation_config's eos ids), else the EOS."""
    return list(getattr(tokenizer, "moekd_stop_ids", None) or [tokenizer.eos_token_id])


def as_stops(eos_id: int | list[int]) -> list[int]:
    return [eos_id] if isinstance(eos_id, int) else list(eos_id)


def first_stop(tokens: list[int], stops: list[int]) -> int | None:
    """The index of the first token that ends a response, None if none does."""
    return next((i for i, t in enumerate(tokens) if t in stops), None)


def batch_ended(ended: torch.Tensor) -> bool:
    """Whether every row has ended: one host synchronisation, so sample_rows asks every few steps only."""
    return bool(ended.all())


@torch.no_grad()
def sample_rows(model: nn.Module, prompts: list[list[int]], *, pad_id: int, eos_id: int | list[int],
                max_new_tokens: int, seeds: list[int], compile: bool = False) -> list[list[int]]:
    """moekd's own decoder for on-policy sampling: the whole batch advances one token per step.
    The left-padded batch runs on a preallocated static KV cache; the next token is
    argmax(logits + gumbel_noise) (exact sampling from softmax(logits) at temperature 1, per-row seeded), no
    Python work per row, and it stops once every row has ended, checked every EOS_CHECK_EVERY steps (never
    without a possible EOS) so the host does not wait for each token; the extra steps are cut off. `compile`:
    the decode step runs compiled (compiled_decode_step) on the model's reused static cache (static_cache).
    A family that transformers marks as not compilable (its own cache class: MiniMax) keeps its own cache and
    runs eager. Ended rows get pad tokens, as in `generate`. Same tokens as `generate` with RowSeededSampler,
    and as a loop without cache. `eos_id`: the id, or the ids (a chat model's end of turn, its EOS, ...),
    that end a row."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_id).items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    (B, width), ended = ids.shape, torch.zeros(len(prompts), dtype=torch.bool, device=device)
    keys, position = row_keys(seeds, device), (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    static = getattr(model, "_can_compile_fullgraph", False)  # else a family with its own cache (MiniMax)
    cache, step_fn = None, decode_step
    if static:
        length = cache_length(width + max_new_tokens)
        # later slots: causally masked until written
        mask = torch.cat([mask, mask.new_ones(B, length - width)], dim=1)
        cache = static_cache(model, B, length)
    outputs = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
                    logits_to_keep=1)  # the prompt, eager (its own shape)
    vocab = outputs.logits.shape[-1]
    token, cache, position, out = (next_token(outputs.logits[:, -1], keys, 0), outputs.cache,
                                   position[:, -1:], [])
    if compile and static:
        step_fn = compiled_decode_step(device)
        if device.type == "cuda":  # CUDA graphs replay on fixed addresses: the cache is written in place
            for layer in cache.layers:
                for t in (layer.keys, layer.values, layer.cumulative_length):
                    torch._dynamo.mark_static_address(t)
    stops = as_stops(eos_id)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    can_end = any(0 <= e < vocab for e in stops)
    for step in range(max_new_tokens):
        if step:
            position = position + 1
            if not static:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            if compile and static and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            # .clone(): a graph's output is reused by the next
            token = step_fn(model, token[:, None], position, mask, cache, keys,
                            torch.tensor(step, device=device)).clone()
        token = token.masked_fill(ended, pad_id)
        out.append(token)
        ended |= torch.isin(token, stop_tensor)
        if can_end and (step + 1) % EOS_CHECK_EVERY == 0 and batch_ended(ended):
            break
    rows = torch.stack(out, dim=1).tolist()
    ends = [first_stop(row, stops) for row in rows]
    if can_end and None not in ends:  # cut the steps run after the last row ended
        rows = [row[:max(ends) + 1] for row in rows]
    return rows


@torch.no_grad()
def sample_tokens(model: nn.Module, prompts: list[list[int]], *, pad_id: int, eos_id: int | list[int],
                  max_new_tokens: int,
                  batch_size: int, seeds: list[int] | None = None, desc: str = "generate",
                  sampler: str = "moekd", compile: bool = False, **options) -> list[list[int]]:
    """Sampled continuations of token-id prompts, left-padded in batches, by pure ancestral sampling.
    top_k 0, top_p 1, temperature 1 (the paper's sampling), from the global torch RNG or, with `seeds` (one
    per prompt), from per-row streams: by sample_rows (sampler "moekd", its decode step compiled with
    `compile`), or `generate` with RowSeededSampler (sampler "generate", the reference; also used for a
    sharded model). The model's own generation_config (a checkpoint's temperature 0.6,
    repetition_penalty 1.1, ...) is not consulted: `options` (eval's no_repeat_ngram_size) are the only
    other settings; `eos_id` may list several ids (each ends a row). An FSDP-sharded model needs every rank
    in each forward, so its ranks keep stepping until all are done (synced_gpus)."""
    from tqdm import tqdm
    from transformers import GenerationConfig, LogitsProcessorList
    sampling = (dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0) if seeds is None
                else dict(do_sample=False))
    config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=eos_id, **options)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out, ours = [], seeds is not None and sampler == "moekd"
    if ours and options:
        raise ValueError(f"moekd's sampler takes no generate() options ({', '.join(options)}); "
                         "use sampler='generate'")
    if ours and compile and not _told["compile"]:
        _told["compile"] = True
        print("sampler: moekd's decode step runs compiled "
              f"(torch.compile{', CUDA graphs' if device.type == 'cuda' else ''}); "
              "each new batch shape compiles first")
    # every rank must join each forward until all are done: generate(synced_gpus)
    if ours and is_sharded(model):
        ours = False
        if not _told["sharded"]:
            _told["sharded"] = True
            print("sampler: the student is FSDP-sharded, so on-policy samples come from "
                  "generate(synced_gpus) with the same noise (the same tokens)")
    twin, amp = model, torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    if ours and amp and amp != next(model.parameters()).dtype:  # bf16 autocast over fp32 master weights
        twin = sampling_copy(model, amp)
    plain = contextlib.nullcontext() if twin is model else torch.autocast(device.type, enabled=False)
    with neutral_generation_defaults(model), plain:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=desc, leave=False, disable=None if len(batches) > 1 else True):
            if ours:
                out.extend(sample_rows(twin, prompts[start:start + batch_size], pad_id=pad_id, eos_id=eos_id,
                                       max_new_tokens=max_new_tokens, seeds=seeds[start:start + batch_size],
                                       compile=compile))
                continue
            batch = {k: v.to(device)
                     for k, v in collate_prompts(prompts[start:start + batch_size], pad_id).items()}
            extra = {} if seeds is None else {"logits_processor": LogitsProcessorList(
                [RowSeededSampler(seeds[start:start + batch_size], device)])}
            if is_sharded(model):
                extra["synced_gpus"] = True
            sequences = model.generate(**batch, generation_config=config, **extra)
            out.extend(sequences[:, batch["input_ids"].shape[1]:].tolist())
    model.train(was_training)
    return out


_told = {"sharded": False, "compile": False}
_copies: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def sampling_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model with its weights in `dtype` (bf16), for sampling under autocast.
    Each token then reads the bf16 weights once instead of casting the fp32 master weights in every op
    (memory-bound decoding moves half the bytes; the official code's DeepSpeed bf16 model also samples in
    bf16). Made once per model (no fp32 transient: the copy's parameters are made directly in `dtype`),
    refreshed on every call."""
    params = list(model.parameters())
    twin = _copies.get(model)
    if twin is None or next(twin.parameters()).dtype != dtype:
        memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in params}
        twin = _copies[model] = copy.deepcopy(model, memo).eval()
    else:
        torch._foreach_copy_(list(twin.parameters()), params)
    return twin



@contextlib.contextmanager
def neutral_generation_defaults(model: nn.Module) -> Iterator[None]:
    """Inside the block the model's generation defaults are the library's neutral ones.
    transformers fills every decoding setting a call leaves unset from the model's own generation_config,
    so a checkpoint's repetition_penalty, no_repeat_ngram_size, min_length, bad_words_ids, forced or
    suppressed tokens would silently change the samples; inside, sampling is softmax(logits) plus exactly
    what the caller set."""
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
    """Decoded sampled responses, each cut at its first stop id, seeded on their own.
    Stop ids (stop_ids) include a chat model's end of turn. The global RNG is restored afterwards, so
    evaluating in the middle of training does not change the training run."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        stops = stop_ids(tokenizer)
        rows = sample_tokens(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=stops,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc, **options)
    rows = [row if (end := first_stop(row, stops)) is None else row[:end] for row in rows]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
