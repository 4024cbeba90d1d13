"""moekd's sampler (sampling.py): its tokens against transformers' generate and a naive loop without cache on
several student families, per-row seeds independent of the batch, static caches and compiled decode steps,
ragged prompts, bf16; and its noise against references that share no code with it: the hash-to-uniform map at
its extremes (written out in float64), a near-certain token over 2^27 draws, the empirical law of millions of
draws against softmax (5 standard errors) and a two-sample test against torch.multinomial."""
import math

import pytest
import torch

import checkpoints
import data
import moekd
import sampling

from conftest import (TINY, STUDENT, tiny_model, STUDENT_LMS, saved_with_generation_config, sharpened,
                      ragged_prompt_rows)

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


# ----------------------------------------------------------------------------
# The noise: the hash-to-uniform map and the law of the draws

TOP = 2 ** 32


def test_uniform_from_hash_is_strictly_inside_the_unit_interval_at_every_extreme():
    """The 2^16 smallest and largest 32-bit hashes (and a spread between): u in (0, 1), equal to the float64
    formula (top 23 bits + 0.5) / 2^23, and the Gumbel noise -log(-log u) finite."""
    h = torch.cat([torch.arange(2 ** 16), torch.arange(TOP - 2 ** 16, TOP),
                   torch.randint(0, TOP, (2 ** 16,))])
    u = sampling.uniform_from_hash(h.clone())
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    exact = (torch.div(h, 2 ** 9, rounding_mode="floor").double() + 0.5) / 2 ** 23
    assert torch.equal(u.double(), exact)
    noise = -torch.log(-torch.log(u))
    assert bool(torch.isfinite(noise).all())
    assert float(noise.max()) < 17 and float(noise.min()) > -3


@pytest.mark.slow
def test_a_near_certain_token_is_drawn_in_every_one_of_2_to_the_27_draws():
    """logits [0, -60, ..., -60] over V 65536, 2048 rows (2^27 (row, token) noise values): the other tokens
    have probability < 1e-21 together, so the first is drawn every time (the 24-bit map drew one of them in 6
    rows)."""
    V, rows = 65536, 2048
    logits = torch.full((V,), -60.0)
    logits[0] = 0.0
    others = 0
    for start in range(0, rows, 256):
        keys = sampling.row_keys(list(range(start, start + 256)), "cpu")
        others += int((sampling.next_token(logits.expand(256, V), keys, 0) != 0).sum())
    assert others == 0


def draw_counts(logits: torch.Tensor, n: int, *, step: int = 0, first_seed: int = 0) -> torch.Tensor:
    """How often next_token draws each token over n rows seeded first_seed.. (one draw each)."""
    counts = torch.zeros(len(logits), dtype=torch.float64)
    for start in range(first_seed, first_seed + n, 2 ** 19):
        rows = min(2 ** 19, first_seed + n - start)
        keys = sampling.row_keys(list(range(start, start + rows)), "cpu")
        tokens = sampling.next_token(logits.expand(rows, len(logits)), keys, step)
        counts += torch.bincount(tokens, minlength=len(logits)).double()
    return counts


def test_four_million_draws_follow_the_softmax_within_five_standard_errors():
    """Probabilities from 0.35 down to ~1e-5: every token's frequency within 5 standard errors of softmax (in
    float64), so a map that over- or under-draws rare tokens by a few percent of their mass shows."""
    logits = torch.tensor([3.0, 2.5, 1.0, 0.0, -1.0, -3.0, -5.0, -8.0])
    n = 4 * 2 ** 20
    freq = draw_counts(logits, n, step=3) / n
    p = torch.softmax(logits.double(), -1)
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() < 5 * se).all()), ((freq - p) / se)


def test_the_sampler_and_torch_multinomial_draw_the_same_law():
    """Two-sample chi-square (homogeneity) of 400k draws each, 9 degrees of freedom, p = 1e-4 threshold."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, 2.0, 0.2, -4.0])
    n = 400_000
    ours = draw_counts(logits, n, step=11, first_seed=10 ** 9)
    theirs = torch.bincount(torch.multinomial(torch.softmax(logits, -1), n, replacement=True,
                                              generator=torch.Generator().manual_seed(0)),
                                              minlength=10).double()
    pooled = (ours + theirs) / (2 * n)
    chi2 = (((ours - n * pooled) ** 2 + (theirs - n * pooled) ** 2) / (n * pooled)).sum()
    assert float(chi2) < 33.7, float(chi2)  # chi-square 9 dof: P(> 33.7) = 1e-4
    assert math.isfinite(float(chi2))


# ----------------------------------------------------------------------------
# The sampler against generate and a naive loop

@pytest.mark.parametrize("field", ["repetition_penalty", "no_repeat_ngram_size", "min_new_tokens",
                                   "bad_words_ids", "suppress_tokens", "forced_eos_token_id", "temperature"])
def test_sampling_ignores_the_checkpoints_generation_config(tmp_path, tokenizer, field):
    """A checkpoint's own decoding settings must not reach moekd's sampling: the samples are those of the
    same weights without them, on the seeded (on-policy) and the global-RNG (dev/eval) paths. Each setting
    is chosen so that it would change these samples (e.g. it bans a token the plain model draws)."""
    plain = checkpoints.load_model(str(STUDENT))
    prompts = [tokenizer.encode(data.format_prompt("Add the two numbers.", "3 and 4"),
                                add_special_tokens=False),
               tokenizer.encode("Q: hi\n", add_special_tokens=False)]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=16, batch_size=2)
    first = sampling.sample_tokens(plain, prompts, seeds=[11, 12], **kw)[0]
    kw["eos_id"] = first[0]  # row 0 stops at once, unless a minimum length forbids it
    settings = {"repetition_penalty": {"repetition_penalty": 5.0},
                "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
                "min_new_tokens": {"min_new_tokens": 10},
                "bad_words_ids": {"bad_words_ids": [[t] for t in first[:3]]},
                "suppress_tokens": {"suppress_tokens": first[:3]},
                "forced_eos_token_id": {"forced_eos_token_id": 2},
                "temperature": {"temperature": 0.3, "do_sample": True}}[field]
    ckpt = checkpoints.load_model(str(saved_with_generation_config(tmp_path, tokenizer, **settings)))
    for model in (plain, ckpt):
        model.seeded = sampling.sample_tokens(model, prompts, seeds=[11, 12], **kw)
        torch.manual_seed(3)
        model.global_rng = sampling.sample_tokens(model, prompts, **kw)
    assert ckpt.seeded == plain.seeded and ckpt.global_rng == plain.global_rng
    assert ckpt.generation_config.to_dict() == \
        checkpoints.load_model(str(tmp_path / "ckpt")).generation_config.to_dict()


def test_row_seeded_samples_do_not_depend_on_the_batch(student, tokenizer):
    """A row's on-policy sample is a function of its seed: alone, or batched (left-padded) with a longer
    prompt, it is the same; another seed gives another sample."""
    prompts, seeds = [[5, 6, 7, 8, 9, 10], [11, 12]], [123, 456]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=12)
    together = sampling.sample_tokens(student, prompts, batch_size=2, seeds=seeds, **kw)
    alone = [sampling.sample_tokens(student, [p], batch_size=1, seeds=[s], **kw)[0]
             for p, s in zip(prompts, seeds)]
    cut = lambda row: moekd.response_through_eos(row, tokenizer.eos_token_id)  # noqa: E731 (pads after EOS)
    assert [cut(r) for r in together] == [cut(r) for r in alone]
    assert sampling.sample_tokens(student, prompts[1:], batch_size=1, seeds=[789], **kw) != alone[1:]


def naive_seeded_sample(model, prompt: list[int], seed: int, *, eos_id: int,
                        max_new_tokens: int) -> list[int]:
    """The reference for sample_rows: one row, no padding, no cache (a full forward per token), the same
    noise."""
    keys, ids, out = sampling.row_keys([seed], "cpu"), list(prompt), []
    with torch.no_grad():
        for step in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[:, -1].float()
            token = int((logits + sampling.gumbel_noise(keys, step, logits.shape[-1])).argmax(-1))
            out.append(token)
            ids.append(token)
            if token == eos_id:
                break
    return out


@pytest.mark.parametrize("path", [STUDENT, TINY], ids=["dense", "llama-moe"])
def test_moekd_sampler_equals_generate_and_a_naive_loop(tokenizer, path):
    """sample_rows (KV cache, whole batch per step) emits exactly the tokens of transformers' generate with
    the same noise and of a naive loop without cache, fp32, with ragged prompts and rows ending early."""
    model = checkpoints.load_model(str(path))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43], [7]]
    seeds = [3, 1 << 40, 77, 2024]
    first = naive_seeded_sample(model, prompts[0], seeds[0], eos_id=-1, max_new_tokens=3)
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=first[1], max_new_tokens=10, batch_size=4, seeds=seeds)
    ours = sampling.sample_tokens(model, prompts, sampler="moekd", **kw)  # row 0 ends at its second token
    theirs = sampling.sample_tokens(model, prompts, sampler="generate", **kw)
    naive = [naive_seeded_sample(model, p, s, eos_id=first[1], max_new_tokens=10)
             for p, s in zip(prompts, seeds)]
    cut = lambda row: moekd.response_through_eos(row, first[1]) if first[1] in row else row  # noqa: E731
    assert ours == theirs and [cut(r) for r in ours] == naive
    # one row ended early, one ran to the limit
    assert len(naive[0]) == 2 and any(len(r) == 10 for r in naive)
    # generate()-only options are not dropped silently
    with pytest.raises(ValueError, match="takes no generate"):
        sampling.sample_tokens(model, prompts, sampler="moekd", no_repeat_ngram_size=2, **kw)


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Mistral", "Mixtral", "MiniMax"])
def test_moekd_sampler_on_student_families(family):
    """The static-cache sampler on other student architectures (qkv bias, q/k norms, a sliding window the
    samples outgrow, a transformers MoE; MiniMax's linear attention keeps its own cache): the tokens of the
    naive loop without cache, ragged prompts."""
    model = tiny_model(**STUDENT_LMS[family])
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40]], [3, 4, 5]
    ours = sampling.sample_tokens(model, prompts, pad_id=0, eos_id=-1, max_new_tokens=9, batch_size=3,
                                  seeds=seeds)
    assert ours == [naive_seeded_sample(model, p, s, eos_id=-1, max_new_tokens=9)
                    for p, s in zip(prompts, seeds)]


def test_sampler_keeps_one_static_cache_per_shape_over_200_calls(monkeypatch):
    """200 compiled sample_rows calls in two batch shapes make two static caches and two compiles (the cache
    is reset, not rebuilt, so a CUDA graph would be recorded once per shape), and a reused cache gives the
    tokens of the naive loop: the last call here, and a second call on Mistral, whose sliding-window layers
    count their writes (reset() zeroes that count)."""
    from torch._dynamo.testing import CompileCounter
    from transformers.cache_utils import StaticCache
    made, init = [], StaticCache.__init__
    monkeypatch.setattr(StaticCache, "__init__", lambda self, *args, **kwargs: made.append(
        kwargs.get("max_cache_len")) or init(self, *args, **kwargs))
    counter = CompileCounter()  # dynamo's graph count, no inductor (compiling with it takes ~30 s on CPU)
    monkeypatch.setitem(sampling._compiled, "cpu", torch.compile(sampling.decode_step, dynamic=False,
                                                                  backend=counter))
    torch._dynamo.reset()
    model = tiny_model(**STUDENT_LMS["Llama"])
    prompts = [[5, 6, 7, 8, 9], [12, 13], [40, 41, 42]]
    for i in range(200):
        batch = prompts[:2 + i % 2]
        rows = sampling.sample_rows(model, batch, pad_id=0, eos_id=-1, max_new_tokens=2,
                                    seeds=[i, i + 1, i + 2][:len(batch)], compile=True)
        if i == 2:
            after_both_shapes = counter.frame_count
    assert made == [64, 64] and counter.frame_count == after_both_shapes == 2
    assert rows == [naive_seeded_sample(model, p, s, eos_id=-1, max_new_tokens=2)
                    for p, s in zip(prompts, [199, 200, 201])]
    mistral = tiny_model(**STUDENT_LMS["Mistral"])  # sliding window 8, shorter than prompt + 9 new tokens
    for seeds in ([3, 4], [5, 6]):
        ours = sampling.sample_rows(mistral, prompts[:2], pad_id=0, eos_id=-1, max_new_tokens=9, seeds=seeds)
        assert ours == [naive_seeded_sample(mistral, p, s, eos_id=-1, max_new_tokens=9)
                        for p, s in zip(prompts, seeds)]
    assert made[2:] == [64]


def test_sampler_checks_for_the_end_every_few_steps(monkeypatch):
    """The host asks whether every row has ended once per EOS_CHECK_EVERY steps, never without an EOS id
    a token can take, and the steps run past the last row's EOS are cut: the tokens of the naive loop."""
    model = tiny_model(**STUDENT_LMS["Llama"])
    checks = []
    monkeypatch.setattr(sampling, "batch_ended", lambda ended: checks.append(1) or bool(ended.all()))
    prompt, seed = [5, 6, 7, 8], 11
    free = naive_seeded_sample(model, prompt, seed, eos_id=-1, max_new_tokens=20)
    assert sampling.sample_rows(model, [prompt, prompt], pad_id=0, eos_id=-1, max_new_tokens=20,
                                seeds=[seed, seed]) == [free, free] and checks == []
    eos = free[2]
    expected = naive_seeded_sample(model, prompt, seed, eos_id=eos, max_new_tokens=20)
    assert len(expected) == free.index(eos) + 1 < sampling.EOS_CHECK_EVERY
    got = sampling.sample_rows(model, [prompt, prompt], pad_id=0, eos_id=eos, max_new_tokens=20,
                               seeds=[seed, seed])
    assert got == [expected, expected] and len(checks) == 1  # stopped at the first check, 8 steps in
    checks.clear()
    sampling.sample_rows(model, [prompt], pad_id=0, eos_id=299, max_new_tokens=20, seeds=[12345])
    assert 1 <= len(checks) <= 20 // sampling.EOS_CHECK_EVERY


def test_ragged_prompts_sample_finite_logits_and_each_row_as_alone():
    """Left padding (prompts of 7, 2 and 4 tokens): every logit the sampler reads is finite (a pad query that
    attends to nothing must not turn a row into NaN), and each row's tokens are those it gets alone."""
    model = sharpened(tiny_model(**STUDENT_LMS["Llama"]))
    together, alone, logits = ragged_prompt_rows(model, compile=False)
    assert together == alone and len(logits) == 12 and all(bool(t.isfinite().all()) for t in logits)


def test_bf16_autocast_samples_from_a_bf16_copy_kept_in_step(tokenizer):
    """Under bf16 autocast over fp32 weights, moekd's sampler runs a bf16 copy of the student: the tokens of
    the naive loop on the model cast to bf16, and a change to the weights reaches the copy on the next
    call."""
    import copy
    model = checkpoints.load_model(str(STUDENT))
    prompts, seeds = [[5, 6, 7, 8, 9], [12, 13]], [3, 4]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=-1, max_new_tokens=8, batch_size=2, seeds=seeds)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = sampling.sample_tokens(model, prompts, **kw)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        assert ours == [naive_seeded_sample(bf16, p, s, eos_id=-1, max_new_tokens=8)
                        for p, s in zip(prompts, seeds)]
        assert next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            model.lm_head.weight.mul_(-3.0)  # the second round samples from the changed weights


@pytest.mark.slow  # compiling on CPU: ~20-40 s each
@pytest.mark.parametrize("path", [STUDENT, TINY], ids=["dense", "llama-moe"])
def test_compiled_decode_step_emits_the_same_tokens(tokenizer, path):
    """The torch.compile'd decode step (fixed shapes: one graph per batch shape) gives the eager tokens, and
    the static cache length is bucketed so prompts of other widths reuse it."""
    student = checkpoints.load_model(str(path))
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]], [3, 1 << 40, 77]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=-1, max_new_tokens=12, seeds=seeds)
    assert sampling.sample_rows(student, prompts, compile=True,
                                **kw) == sampling.sample_rows(student, prompts, **kw)
    assert [sampling.cache_length(w) for w in (1, 64, 65, 128, 200, 512)] == [64, 64, 128, 128, 256, 512]


def test_counter_noise_depends_on_seed_and_position_only():
    keys = sampling.row_keys([5, 6, 7], "cpu")
    noise = sampling.gumbel_noise(keys, 4, 50)
    # batch-independent
    assert torch.equal(noise[1:2], sampling.gumbel_noise(sampling.row_keys([6], "cpu"), 4, 50))
    # a new draw per step
    assert not torch.equal(noise, sampling.gumbel_noise(keys, 5, 50))
    many = sampling.gumbel_noise(sampling.row_keys(list(range(400)), "cpu"), 0, 1000)          # Gumbel(0, 1)
    assert abs(many.mean() - 0.5772) < 0.01 and abs(many.std() - math.pi / math.sqrt(6)) < 0.01


def test_row_seeded_sampler_draws_from_the_softmax():
    """Gumbel-max: the argmax of logits + noise is distributed as softmax(logits)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).expand(4000, 5)
    sampler = sampling.RowSeededSampler(list(range(4000)), torch.device("cpu"))
    counts = torch.bincount(sampler(None, logits).argmax(-1), minlength=5).float()
    expected = torch.softmax(logits[0], -1) * 4000
    assert ((counts - expected) ** 2 / expected).sum() < 18.5  # chi-square, 4 dof, p = 0.001
