"""Routing control (moekd.moe_routing): k distinct experts, sampling without replacement, the off-top-k
fraction against lambda, restore on exit and on errors, top-p, all experts, on Llama-MoE and four
transformers families (every family: test_families.py; values by hand: test_routing_values.py)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoints
import data
import llama_moe
import moekd
from tiny_moe import synthetic

from conftest import assert_close, hf_moe, ids_batch

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


@given(st.integers(1, 7), st.floats(0.0, 1.0), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_sampled_routing_picks_k_distinct_experts(k, prob, seed):
    logits = torch.randn(13, 7, generator=torch.Generator().manual_seed(seed)) * 3
    routing = moekd.Routing("sample", k=k, prob=prob, generator=torch.Generator().manual_seed(seed))
    index, _ = moekd.select_experts(logits, routing, 2)
    assert index.shape == (13, k) and all(len(set(row)) == k for row in index.tolist())
    assert_close(llama_moe.routing_weights(logits, index).sum(-1), torch.ones(13))


def test_sampling_without_replacement_frequencies():
    """With lambda = 1 the chosen sets follow sampling without replacement from softmax(logits):
    P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = logits.softmax(-1).tolist()
    n = 40_000
    routing = moekd.Routing("sample", k=2, prob=1.0, generator=torch.Generator().manual_seed(7))
    index = moekd.select_experts(logits.expand(n, 4), routing, 2)[0].sort(-1).values
    for i in range(4):
        for j in range(i + 1, 4):
            expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
            observed = ((index[:, 0] == i) & (index[:, 1] == j)).float().mean().item()
            assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (i, j)


def test_fraction_routed_off_topk_is_lambda():
    """Off-top-k fraction = lambda * P(a drawn set differs from the top set), the latter measured at
    lambda = 1."""
    logits = torch.randn(40_000, 8, generator=torch.Generator().manual_seed(0)) * 2
    top = moekd.select_experts(logits, moekd.Routing("topk", k=7), 2)[0].sort(-1).values

    def off(lam, seed):
        routing = moekd.Routing("sample", k=7, prob=lam, generator=torch.Generator().manual_seed(seed))
        return (moekd.select_experts(logits, routing,
                                     2)[0].sort(-1).values != top).any(-1).float().mean().item()

    differs = off(1.0, 1)
    assert 0.3 < differs < 0.95
    for lam in (0.05, 0.3):
        expected = lam * differs
        assert abs(off(lam, 2) - expected) < 4 * math.sqrt(expected * (1 - expected) / 40_000) + 1e-3, lam


def test_routing_context_restores_exactly(teacher):
    with torch.no_grad():
        before = teacher(ids_batch()).logits
        with moekd.moe_routing(teacher, "all"):
            inside = teacher(ids_batch()).logits
        with pytest.raises(RuntimeError, match="boom"):
            with moekd.moe_routing(teacher, "sample", prob=1.0):
                raise RuntimeError("boom")
        after = teacher(ids_batch()).logits
    assert not torch.equal(before, inside) and torch.equal(before, after)
    assert all(layer.mlp.gate.routing is None for layer in teacher.model.layers)


def test_lambda_zero_is_bit_identical_to_topk(teacher):
    with torch.no_grad():
        native = teacher(ids_batch()).logits
        with moekd.moe_routing(teacher, "sample", prob=0.0, generator=torch.Generator().manual_seed(0)):
            sampled_native_k = teacher(ids_batch()).logits
        with moekd.moe_routing(teacher, "sample", k=6, prob=0.0, generator=torch.Generator().manual_seed(0)):
            sampled6 = teacher(ids_batch()).logits
        with moekd.moe_routing(teacher, "topk", k=6):
            top6 = teacher(ids_batch()).logits
        with moekd.moe_routing(teacher, "sample", k=6, prob=1.0, generator=torch.Generator().manual_seed(0)):
            drawn6 = teacher(ids_batch()).logits
    assert torch.equal(native, sampled_native_k) and torch.equal(sampled6, top6)
    assert not torch.equal(drawn6, top6)


def naive_top_p(row: torch.Tensor, p: float) -> tuple[list[int], torch.Tensor]:
    """The official gate's top-p, one token: experts by falling logit, kept while the mass before <= p."""
    order = sorted(range(len(row)), key=lambda e: -row[e].item())
    probs, kept, mass = row.softmax(-1), [], 0.0
    for e in order:
        if kept and mass > p:
            break
        kept.append(e)
        mass += probs[e].item()
    return kept, torch.softmax(row[kept], -1)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 0.99))
def test_top_p_routing_matches_the_official_rule(seed, p):
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(seed)) * 2
    index, keep = moekd.select_experts(logits, moekd.Routing("topp", top_p=p), 2)
    weights = llama_moe.routing_weights(logits, index, keep)
    for n in range(9):
        kept, w = naive_top_p(logits[n], p)
        m = len(kept)
        assert index[n, :m].tolist() == kept and keep[n, :m].all() and not keep[n, m:].any()
        assert_close(weights[n, :m], w) and (weights[n, m:] == 0).all()


def test_top_p_routing_in_models(tmp_path, teacher):
    """p = 0 keeps one expert per token (= top-1); a larger p changes the output; routing is restored."""
    model = checkpoints.load_model(str(hf_moe(tmp_path, "qwen2_moe")))
    for m in (teacher, model):
        with torch.no_grad():
            native = m(ids_batch()).logits
            with moekd.moe_routing(m, "topk", k=1):
                top1 = m(ids_batch()).logits
            with moekd.moe_routing(m, "topp", top_p=0.0):
                assert torch.equal(m(ids_batch()).logits, top1)
            with moekd.moe_routing(m, "topp", top_p=0.6):
                assert not torch.equal(m(ids_batch()).logits, top1)
            assert torch.equal(m(ids_batch()).logits, native)
    with pytest.raises(ValueError, match="topp needs top_p"):
        moekd.Routing("topp")


def test_all_experts_weights_and_gradients_reach_routers_only(teacher):
    captured = []
    hook = teacher.model.layers[0].mlp.calculator.register_forward_hook(lambda m, args,
                                                                        out: captured.append(args))
    with torch.no_grad(), moekd.moe_routing(teacher, "all"):
        teacher(ids_batch())
    hook.remove()
    x, index, weights = captured[0]
    assert index.shape == (12, 7) and torch.equal(index[0], torch.arange(7))
    assert_close(weights, teacher.model.layers[0].mlp.gate.gate_network(x).softmax(-1))  # softmax over all E
    assert_close(weights.sum(-1), torch.ones(12))
    # SAR's setting: everything frozen but the routers, train mode (gate noise on)
    teacher.requires_grad_(False)
    routers = moekd.router_parameters(teacher)
    names = {n for n, p in teacher.named_parameters() if any(p is r for r in routers)}
    assert names == {f"model.layers.{i}.mlp.gate.{w}" for i in range(3)
                     for w in ("gate_network.0.weight", "gate_network.2.weight", "weight_noise.weight")}
    for p in routers:
        p.requires_grad_(True)
    teacher.train()
    with moekd.moe_routing(teacher, "all"):
        teacher(ids_batch()).logits.logsumexp(-1).sum().backward()
    # weight_noise via the noise std
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    assert all(p.grad is None for p in teacher.parameters() if not any(p is r for r in routers))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_hf_routing_modes(tmp_path, family):
    model = checkpoints.load_model(str(hf_moe(tmp_path, family)))
    with torch.no_grad():
        native = model(ids_batch()).logits
        with moekd.moe_routing(model, "topk"):
            assert torch.equal(model(ids_batch()).logits, native)
        with moekd.moe_routing(model, "sample", prob=0.0, generator=torch.Generator().manual_seed(0)):
            assert torch.equal(model(ids_batch()).logits, native)  # lambda = 0 is the native top-k path
        # native mass: test_routing_values.py
        with moekd.moe_routing(model, "all", mass="literal") as routers:
            dense = model(ids_batch()).logits
            captured = []
            hook = routers[0].register_forward_hook(lambda m, a, out: captured.append(out))
            model(ids_batch())
            hook.remove()
        assert torch.equal(model(ids_batch()).logits, native)
    logits, weights, index = captured[0]
    assert index.shape == (12, 5) and torch.equal(index[0], torch.arange(5))
    assert_close(weights.float(), logits.float().softmax(-1))  # all experts: softmax over all E
    assert not torch.equal(dense, native)
    assert len(moekd.router_parameters(model)) == 2 and moekd.native_top_k(model) == 2 and \
        moekd.num_experts(model) == 5


def test_batched_ka_passes_equal_looped_passes_at_lambda_zero(teacher, student, tokenizer):
    cfg = moekd.Config(method="ka", ka_m=3, ka_lambda=0.0)
    items = [moekd.tokenize_example(tokenizer, r["prompt"], r["responses"][0], max_prompt_len=96, max_len=128)
             for r in (data.to_example(x, where="t") for x in synthetic.synthetic_rows(4, seed=2))]
    batch = moekd.collate(items, tokenizer.pad_token_id)
    with moekd.teacher_routing(teacher, cfg, torch.Generator().manual_seed(0)):
        batched = moekd.teacher_hidden(teacher, batch, repeat=3)
        looped = torch.cat([moekd.teacher_hidden(teacher, batch) for _ in range(3)])
        looped_logits = teacher.lm_head(looped)
    assert_close(batched, looped, atol=1e-6, rtol=1e-5)
    parts = moekd.reverse_kl_step(student, teacher, batch, cfg, norm=10.0, n_micro=1)
    mask = moekd.loss_mask(batch["labels"])
    q = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    expected = sum(moekd.reverse_kl(q, looped_logits[m * 4:(m + 1) * 4], mask) * mask.sum()
                   for m in range(3)) / 30.0  # token sums over norm 10, the mean of the M passes
    assert_close(parts["rkl"], expected, atol=1e-6, rtol=1e-5)
