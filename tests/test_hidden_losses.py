"""Losses from hidden states (hidden_losses.py, moekd's step losses): equal to the logits formulas, values and
gradients; SAR's router gradients through them; families with scaled, soft-capped and tied heads."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import errors
import hidden_losses
import moekd
from tiny_moe import synthetic

from conftest import assert_close, tiny_model

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


def head_logits_naive(h, head, vocab):
    """The naive head: scale, soft cap, the first `vocab` rows."""
    z = F.linear(h, head.weight, head.bias)[..., :vocab] * head.scale
    return z if head.cap is None else head.cap * torch.tanh(z / head.cap)


hidden_cases = st.tuples(st.integers(1, 2), st.integers(2, 5), st.integers(2, 6), st.integers(3, 9),
                         st.integers(1, 4),
                         st.booleans(), st.sampled_from([None, 2.5, "-inf"]), st.integers(0, 10_000))


@given(hidden_cases)
@settings(max_examples=30, deadline=None)
def test_losses_from_hidden_states_equal_the_logits_formulas(case):
    """head_losses (chunked, gradients in the forward) = reverse_kl / forward_kl / CE on the full logits, to
    1e-5 in fp32: values and gradients for student hidden states, head weight and bias, teacher hidden states
    (what carries SAR's gradient to the routers) and head; masked rows (NaN there), M = 1..4 passes, heads
    with padding rows past the vocabulary, soft-capped and scaled logits, -inf logits (a -inf bias on one
    token of both heads)."""
    B, T, H, V, M, reverse, cap, seed = case
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    leaf = lambda *shape: (torch.randn(*shape, generator=g) * 2).requires_grad_()  # noqa: E731
    hs, ht, ws, wt, bs, bt = (leaf(B, T, H), leaf(M, B, T, H + 1), leaf(V + 2, H), leaf(V + 1, H + 1),
                              leaf(V + 2), leaf(V + 1))
    if cap == "-inf":
        with torch.no_grad():
            bs[V - 1] = bt[V - 1] = float("-inf")
    head_s = hidden_losses.Head(ws, bs, 0.7, None if cap == "-inf" else cap)
    head_t = hidden_losses.Head(wt, bt, 1.3, None if cap == "-inf" else cap)
    labels = torch.randint(0, V - 1, (B, T), generator=g)
    n = mask.sum()
    rows = lambda x: torch.where(mask.unsqueeze(-1), x, float("nan"))[..., mask, :]  # noqa: E731
    loss, sums = hidden_losses.head_losses(rows(hs), head_s, labels[mask], rows(ht), head_t, ce_weight=0.3,
                                           kl_weight=0.6,
                                           # 3-row chunks
                                           reverse=reverse, vocab=V, chunk_mb=3 * 4 * V * M / 2**20)
    params = (hs, ws, bs, ht, wt, bt)
    grads = torch.autograd.grad(loss * 1.7, params)
    s, t = head_logits_naive(hs, head_s, V), head_logits_naive(ht, head_t, V)
    kl = moekd.reverse_kl if reverse else moekd.forward_kl
    ref_kl = sum(kl(s, t[m], mask) for m in range(M)) / M * n
    ref_ce = F.cross_entropy(s[mask], labels[mask], reduction="sum")
    assert_close(sums, torch.stack([ref_ce, ref_kl]).detach())
    ref = torch.autograd.grad((0.3 * ref_ce + 0.6 * ref_kl) * 1.7, params)
    for name, a, b in zip(("hs", "ws", "bs", "ht", "wt", "bt"), grads, ref):
        assert_close(a, b, msg=lambda m: f"{name}: {m}")
    assert not grads[1][V:].any() and not grads[4][V:].any()  # padding rows get nothing
    # KA's frozen teacher: its M passes one at a time (rows chunked without the / M), the same sums and
    # student gradients
    frozen = hidden_losses.Head(wt.detach(), bt.detach(), 1.3, head_t.cap)
    loss, sums = hidden_losses.head_losses(rows(hs), head_s, labels[mask], rows(ht).detach(), frozen,
                                           ce_weight=0.3,
                                           kl_weight=0.6, reverse=reverse, vocab=V,
                                           chunk_mb=3 * 4 * V / 2**20)
    assert_close(sums, torch.stack([ref_ce, ref_kl]).detach())
    for name, a, b in zip(("hs", "ws", "bs"), torch.autograd.grad(loss * 1.7, params[:3]), ref):
        assert_close(a, b, msg=lambda m: f"frozen teacher, {name}: {m}")


@pytest.mark.parametrize("M,teacher_grad", [(1, True), (3, False)])
def test_the_generic_chunked_loss_matches_the_hand_derived_kl(M, teacher_grad):
    """chunked_loss(reverse_kl_rows) (gradients by torch.autograd.grad per chunk) = head_losses' hand-derived
    reverse KL (_kl_chunk / _kl_passes) to 1e-6 in value and in every gradient, with scaled and soft-capped
    heads, biases, 2-row chunks; M = 3 frozen passes: KA's mean log-probability."""
    g = torch.Generator().manual_seed(3)
    n, H, V = 7, 6, 13
    leaf = lambda *shape: (torch.randn(*shape, generator=g) * 2).requires_grad_()  # noqa: E731
    hs, ws, bs, ht, wt, bt = leaf(n, H), leaf(V, H), leaf(V), leaf(M, n, H + 1), leaf(V, H + 1), leaf(V)
    if not teacher_grad:
        ht, wt, bt = ht.detach(), wt.detach(), bt.detach()
    head_s, head_t = hidden_losses.Head(ws, bs, 0.7, 3.0), hidden_losses.Head(wt, bt, 1.3, 3.0)
    params = [hs, ws, bs] + ([ht, wt, bt] if teacher_grad else [])
    hand, _ = hidden_losses.head_losses(hs, head_s, None, ht, head_t, kl_weight=1.0,
                                        chunk_mb=2 * 4 * V * M / 2**20)
    generic = hidden_losses.chunked_loss(hidden_losses.reverse_kl_rows, hs, head_s, ht, head_t,
                                         chunk_mb=2 * 4 * V * (2 * M + 2) / 2**20)
    assert abs(float(hand.detach()) - float(generic.detach())) <= 1e-6 * float(hand.detach())
    for a, b in zip(torch.autograd.grad(hand * 1.3, params), torch.autograd.grad(generic * 1.3, params)):
        assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_jsd_rows_is_the_generalised_jensen_shannon_divergence_by_hand():
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, in float64 term by term; 0 at q =
    p, symmetric at beta 0.5, a -inf logit on one side gives a finite value and finite gradients."""
    q = torch.tensor([[0.0, 1.0, -2.0, float("-inf")]], dtype=torch.float64).log_softmax(-1).requires_grad_()
    p = torch.tensor([[[1.0, -1.0, 0.5, 2.0]]], dtype=torch.float64).log_softmax(-1)
    for beta in (0.5, 0.1):
        qq, pp = q[0].exp().tolist(), p[0, 0].exp().tolist()
        m = [beta * a + (1 - beta) * b for a, b in zip(pp, qq)]
        by_hand = sum(beta * a * math.log(a / c) for a, c in zip(pp, m) if a > 0) + \
            sum((1 - beta) * b * math.log(b / c) for b, c in zip(qq, m) if b > 0)
        assert abs(float(hidden_losses.jsd_rows(q, p, beta)[0].detach()) - by_hand) < 1e-12
    with torch.no_grad():
        assert abs(float(hidden_losses.jsd_rows(p[0], p)[0])) < 1e-15
        assert abs(float(hidden_losses.jsd_rows(q, p)[0])
                   - float(hidden_losses.jsd_rows(p[0], q.unsqueeze(0))[0])) < 1e-12
    hidden_losses.jsd_rows(q, p).sum().backward()
    assert bool(torch.isfinite(q.grad).all())


@pytest.mark.parametrize("direction", ["teacher-student", "student-teacher"])
def test_sar_router_gradients_through_hidden_states(direction, teacher, student, tokenizer):
    """SAR's router loss from hidden states reaches the routers with the gradient of the logits formula."""
    cfg = moekd.Config(method="sar", sar_kl=direction)
    items = [moekd.tokenize_example(tokenizer, r["prompt"], r["responses"][0], max_prompt_len=96, max_len=128)
             for r in (data.to_example(x, where="t") for x in synthetic.synthetic_rows(3, seed=2))]
    batch = moekd.collate(items, tokenizer.pad_token_id)
    routers = moekd.router_parameters(teacher)
    for p in routers:
        p.requires_grad_(True)
    ids = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        q = student(**ids).logits
    with moekd.moe_routing(teacher, "all"):
        with moekd.final_hidden(teacher) as h, moekd.final_hidden(student) as hq:
            teacher(**ids)
            student(**ids)
        loss, _ = moekd.step_losses(student, teacher, hq[0].detach(), h[0], batch, cfg, moekd.MethodState(),
                                    kl_weight=1.0, reverse=direction == "student-teacher")
        ours = torch.autograd.grad(loss, routers, allow_unused=True, materialize_grads=True)
        p = teacher(**ids).logits
    mask = moekd.loss_mask(batch["labels"])
    ref = moekd.forward_kl(q, p, mask) if direction == "teacher-student" else moekd.reverse_kl(q, p, mask)
    expected = torch.autograd.grad(ref * mask.sum(), routers, allow_unused=True, materialize_grads=True)
    assert_close(loss, ref * mask.sum())
    assert any(a.abs().sum() > 0 for a in ours)
    for a, b in zip(ours, expected):
        assert_close(a, b)


_HEAD_COMMON = dict(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                    num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LOGIT_HEADS = {  # family -> tiny_model's arguments
    "gemma2": dict(model_type="gemma2", final_logit_softcapping=3.0, **_HEAD_COMMON),  # tied, soft-capped
    "cohere": dict(model_type="cohere", logit_scale=0.5, **_HEAD_COMMON),               # tied, scaled
    "granite": dict(model_type="granite", logits_scaling=4.0, **_HEAD_COMMON),          # scaled (divided)
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True, **_HEAD_COMMON),
}


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "llama-tied"])
def test_families_with_logit_scaling_softcapping_and_tied_embeddings(family):
    """sft's CE from hidden states equals CE on the family's own logits (scaled, soft-capped), gradients
    included (a tied embedding gets both its input and its head gradient); check_head accepts the family."""
    model = tiny_model(train=True, **LOGIT_HEADS[family])
    moekd.check_head(model, "--model")
    batch = {"input_ids": torch.randint(3, 97, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :2] = -100
    parts = moekd.sft_step(model, None, batch, moekd.Config(), norm=3.0, n_micro=1)
    ours = torch.autograd.grad(parts["loss"], list(model.parameters()))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = moekd.loss_mask(batch["labels"])
    ref = F.cross_entropy(logits[mask], batch["labels"].roll(-1, 1)[mask], reduction="sum") / 3.0
    assert_close(parts["loss"], ref)
    for a, b in zip(ours, torch.autograd.grad(ref, list(model.parameters()))):
        assert_close(a, b)


def test_unknown_logit_transform_is_an_error_naming_the_family():
    model = tiny_model(train=True, **LOGIT_HEADS["llama-tied"])
    head = model.get_output_embeddings()
    head.forward = lambda x: F.linear(x, head.weight) * 2  # a family that doubles its logits
    with pytest.raises(errors.MoekdError,
                       match="--teacher: LlamaForCausalLM turns its last hidden state into logits"):
        moekd.check_head(model, "--teacher")
