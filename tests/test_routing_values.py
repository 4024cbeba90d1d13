"""Routing values written out by hand (float64, from the routers' own parameters; no project helper in the
references): which experts each mode picks, their weights per mechanism x renormalisation at k != native and
in KA's two branches, the group-limit preference order, SAR's balance term, and KA's lambda against the exact
probability of its draws."""
import itertools
import math

import pytest
import torch
from torch.testing import assert_close

import checkpoints
import moekd
import test_families as tf

from conftest import TINY, naive_cv2, tiny_model

E = tf.E


def model_of(family: str, **overrides):
    """The family's tiny random model (test_families' build), or a variant of its config built the same
    way."""
    if not overrides:
        return tf.tiny_moe(family)
    return tiny_model(family, random_routers=True, **tf.fields(family, **overrides))


def first_router(model):
    return moekd.moe_routers(model)[0]


def hidden(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def logits_by_hand(router, h: torch.Tensor) -> torch.Tensor:
    """h W^T (+ b) in float64."""
    z = h.double() @ router.weight.detach().double().T
    return z + router.bias.detach().double() if getattr(router, "bias", None) is not None else z


def preference_by_hand(family: str, router, z: torch.Tensor) -> list[list[int]]:
    """Each token's experts from most to least preferred, by the family's rule: the logits' order, or under a
    group limit (2 groups of 4, 1 chosen) the chosen group's experts by score, then the other group's."""
    if family not in ("deepseek_v3", "glm4_moe", "deepseek_v2"):
        return [sorted(range(E), key=lambda e: -float(row[e])) for row in z]
    if family == "deepseek_v2":
        score = z.softmax(-1)
        group_score = lambda g: max(float(score_row[e]) for e in g)                  # noqa: E731
    else:
        score = z.sigmoid() + router.e_score_correction_bias.detach().double()
        group_score = lambda g: sum(sorted((float(score_row[e]) for e in g), reverse=True)[:2])  # noqa: E731
    orders = []
    for score_row in score:
        groups = [list(range(0, 4)), list(range(4, 8))]
        chosen = max(groups, key=group_score)
        other = [e for e in range(E) if e not in chosen]
        by_score = lambda es: sorted(es, key=lambda e: -float(score_row[e]))  # noqa: E731
        orders.append(by_score(chosen) + by_score(other))
    return orders


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "deepseek_v2"])
def test_group_limits_keep_the_familys_preference_order_for_every_k(family):
    """2 groups, 1 chosen, a random selection bias: for every k the chosen set is the first k of the family's
    preference order (the chosen group's experts first); at N-1 the one left out is the lowest-scoring expert
    outside the chosen group; KA's top branch (prob 0) at N-1 is the same set."""
    model = model_of(family)
    router = first_router(model)
    assert (router.num_group, router.topk_group) == (2, 1)
    if family == "deepseek_v2":
        assert router.topk_method == "group_limited_greedy"
    h = hidden(64, seed=3)
    order = preference_by_hand(family, router, logits_by_hand(router, h))
    with torch.no_grad():
        for k in range(1, E):
            with moekd.moe_routing(model, "topk", k=k):
                index = router(h)[2]
            assert [sorted(r) for r in index.tolist()] == [sorted(o[:k]) for o in order], k
        with moekd.moe_routing(model, "sample", k=E - 1, prob=0.0,
                               generator=torch.Generator().manual_seed(0)):
            index = router(h)[2]
    left_out = [(set(range(E)) - set(r)).pop() for r in index.tolist()]
    assert left_out == [o[-1] for o in order]


MECHANISMS = {  # case -> (family, config overrides)
    "softmax, norm": ("mixtral", {}), "softmax, no norm": ("qwen2_moe", {}), "logits": ("granitemoe", {}),
    "sigmoid, norm": ("deepseek_v3", {}), "sigmoid, no norm": ("deepseek_v3", {"norm_topk_prob": False}),
    "llama4": ("llama4_text", {}),
}


def weights_by_hand(case: str, z: list[float], chosen: list[int], native: list[int],
                    mass: str) -> dict[int, float]:
    """Each chosen expert's weight by the family's rule written out; mass "native": a router that does not
    renormalise scales them so they sum as its native selection's would."""
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    s = [1 / (1 + math.exp(-v)) for v in z]
    if case == "softmax, norm":
        return {e: p[e] / sum(p[c] for c in chosen) for e in chosen}
    if case == "softmax, no norm":
        factor = sum(p[c] for c in native) / sum(p[c] for c in chosen) if mass == "native" else 1.0
        return {e: p[e] * factor for e in chosen}
    if case == "logits":
        return {e: math.exp(z[e]) / sum(math.exp(z[c]) for c in chosen) for e in chosen}
    if case == "sigmoid, norm":
        return {e: 2.5 * s[e] / sum(s[c] for c in chosen) for e in chosen}
    if case == "sigmoid, no norm":
        factor = sum(s[c] for c in native) / sum(s[c] for c in chosen) if mass == "native" else 1.0
        return {e: 2.5 * s[e] * factor for e in chosen}
    return {e: s[e] for e in chosen}                                                      # Llama 4


def top_p_by_hand(case: str, z: list[float], top_p: float) -> list[int]:
    """The official gate's top-p: experts by falling probability (softmax; sigmoid routers: s / Sum s), the
    first and then each while the mass before it is <= top_p."""
    law = [math.exp(v) for v in z] if case in ("softmax, norm", "softmax, no norm", "logits") else \
        [1 / (1 + math.exp(-v)) for v in z]
    law = [v / sum(law) for v in law]
    ranked, kept, before = sorted(range(E), key=lambda e: -law[e]), [], 0.0
    for e in ranked:
        if kept and before > top_p:
            break
        kept.append(e)
        before += law[e]
    return kept


def dense_weights(router, out, family: str) -> torch.Tensor:
    """[N, E] weights from a router's output (0 = not chosen); Llama 4's output is dense already."""
    if family == "llama4_text":
        return out[0].float()
    return torch.zeros(out[2].shape[0], E).scatter(1, out[2], out[1].float())


RUNS = [("topk", 1, None, None), ("topk", E - 1, None, None), ("sample", E - 1, 0.0, None),
        ("sample", E - 1, 1.0, None), ("all", None, None, None), ("topp", None, None, 0.5)]


@pytest.mark.parametrize("case", list(MECHANISMS))
def test_weights_in_every_mode_and_routed_mass_by_hand(case):
    """topk at k = 1 and N-1 (native 3, Llama 4's 2), KA's top-(N-1) branch (prob 0) and drawn branch (prob
    1), all and top-p: each expert's weight (0 if not chosen) as the family's rule gives it, written out in
    float64, in mass "literal" and "native" (non-renormalising routers scaled to their native selection's
    mass; every other mechanism bit-identical in both)."""
    family, overrides = MECHANISMS[case]
    model = model_of(family, **overrides)
    router = first_router(model)
    h = hidden(40, seed=5)
    z = logits_by_hand(router, h)
    order = preference_by_hand(family, router, z)
    for mode, k, prob, top_p in RUNS:
        got = {}
        for mass in ("literal", "native"):
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad(), moekd.moe_routing(model, mode, k=k, prob=prob, generator=generator,
                                                    top_p=top_p, mass=mass):
                got[mass] = dense_weights(router, router(h), family)
            for t in range(len(h)):
                drawn = torch.nonzero(got[mass][t]).flatten().tolist()
                chosen = {"all": list(range(E)),
                          "topp": top_p_by_hand(case, z[t].tolist(), top_p or 0.0)}.get(
                    mode, drawn if prob == 1.0 else order[t][:k])
                assert sorted(drawn) == sorted(chosen), (case, mode, k, prob, mass, t)
                want = weights_by_hand(case, z[t].tolist(), chosen, order[t][:router.top_k], mass)
                expected = torch.tensor([want.get(e, 0.0) for e in range(E)], dtype=torch.float32)
                assert_close(got[mass][t], expected, rtol=1e-5, atol=1e-6,
                             msg=f"{case} {mode} k={k} {mass} t={t}")
        if "no norm" not in case:
            assert torch.equal(got["native"], got["literal"]), (case, mode)
        else:  # the per-token sum is the native selection's, whatever was chosen
            native_sum = [sum(weights_by_hand(case, z[t].tolist(), order[t][:3], [], "literal").values())
                          for t in range(len(h))]
            assert_close(got["native"].sum(-1), torch.tensor(native_sum, dtype=torch.float32))


def test_llama_moe_routing_is_the_same_in_both_mass_modes():
    """moekd's Llama-MoE gate renormalises (softmax over the chosen): mass "native" changes nothing, bit for
    bit."""
    model = checkpoints.load_model(str(TINY)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 400, 7, 31, 8]])
    for mode, k, prob, top_p in RUNS:
        logits = {}
        for mass in ("literal", "native"):
            with torch.no_grad(), moekd.moe_routing(model, mode, k=k, prob=prob, top_p=top_p, mass=mass,
                                                    generator=torch.Generator().manual_seed(1)):
                logits[mass] = model(ids).logits
        assert torch.equal(logits["native"], logits["literal"]), mode


def test_the_native_mass_factor_carries_the_router_gradient():
    """SAR's router update under all experts on a non-renormalising router (Qwen2-MoE): the weights' gradient
    w.r.t. the router weight equals autograd on the hand-written p * Sum_top3 p / Sum p, factor included."""
    model = model_of("qwen2_moe")
    router = first_router(model)
    router.weight.requires_grad_(True)
    h = hidden(24, seed=9)
    c = torch.randn(24, E, generator=torch.Generator().manual_seed(4))
    with moekd.moe_routing(model, "all"):
        out = router(h)
    (dense_weights(router, out, "qwen2_moe") * c).sum().backward()
    W = router.weight.detach().double().requires_grad_(True)
    p = (h.double() @ W.T).softmax(-1)
    native = p.gather(1, p.topk(router.top_k, dim=-1).indices).sum(-1, keepdim=True)
    ((p * native / p.sum(-1, keepdim=True)) * c.double()).sum().backward()
    assert_close(router.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-6)
    assert float((native / p.sum(-1, keepdim=True)).min().detach()) < 0.9  # the factor is not ~1: it matters


def sar_balance(model):
    """SAR's balance term (beta 0.01) of one forward under all experts, and each router's (module, input)."""
    inputs = []
    hooks = [r.register_forward_hook(lambda m, a, out: inputs.append((m, a[0])))
             for r in moekd.moe_routers(model)]
    with torch.no_grad(), moekd.moe_routing(model, "all"), moekd.record_routing(model) as routed:
        model(tf.ids())
        loss = moekd.router_balance_loss(routed, 0.01)
    for hook in hooks:
        hook.remove()
    return loss, inputs


def test_sar_balance_term_of_mixtral_is_the_switch_loss_by_hand():
    """Mixtral's own aux loss under SAR (all experts): beta * E * Sum_e f_e P_e over every layer's tokens, f_e
    the fraction of tokens whose native top-k holds e, P_e the mean softmax probability, from the routers'
    inputs."""
    loss, inputs = sar_balance(model_of("mixtral"))
    # [layers * tokens, E]
    z = torch.cat([logits_by_hand(m, x.reshape(-1, 32)) for m, x in inputs])
    top = z.topk(inputs[0][0].top_k, dim=-1).indices
    f = torch.tensor([sum(e in row for row in top.tolist()) for e in range(E)], dtype=torch.float64) / len(z)
    P = z.softmax(-1).mean(0)
    assert len(inputs) == 2 and abs(float(loss) - 0.01 * E * float((f * P).sum())) < 1e-6


def test_sar_balance_term_of_a_family_without_its_own_is_cv_squared_by_hand():
    """DeepSeek-V3 (no aux loss in its modeling file) under SAR: beta * Sum_layers cv2(importance) +
    cv2(load), cv2 = unbiased variance / mean^2, importance the per-expert sum of the routing weights (2.5
    sigmoid, norm)."""
    loss, inputs = sar_balance(model_of("deepseek_v3"))
    expected = 0.0
    for m, x in inputs:
        s = logits_by_hand(m, x.reshape(-1, 32)).sigmoid()
        w = 2.5 * s / s.sum(-1, keepdim=True)
        expected += naive_cv2(w.sum(0).tolist()) + naive_cv2([float(len(w))] * E)
    assert len(inputs) == 2 and abs(float(loss) - 0.01 * expected) < 1e-6 * max(1.0, expected)


def prob_of_set(p: list[float], chosen: set[int]) -> float:
    """P(k draws without replacement, in proportion to p, give exactly `chosen`): a sum over its draw
    orders."""
    total = 0.0
    for order in itertools.permutations(sorted(chosen)):
        prob, left = 1.0, 1.0
        for e in order:
            prob *= p[e] / left
            left -= p[e]
        total += prob
    return total


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_kas_lambda_against_the_exact_probability_of_its_draws(family):
    """Four fixed tokens, each repeated 30000 times, KA at k = N-1 and lambda 0.5: the frequency with which a
    token's set differs from its top-(N-1) set equals 0.5 * (1 - P(the draw gives the top set)) within 5
    standard errors, P by enumerating the 7! draw orders of the law (softmax; DeepSeek-V3: sigmoid normalised,
    without the bias)."""
    model = model_of(family)
    router = first_router(model)
    base, n, lam = hidden(4, seed=11), 30000, 0.5
    h = base.repeat_interleave(n, dim=0)
    with torch.no_grad(), moekd.moe_routing(model, "sample", k=E - 1, prob=lam,
                                            generator=torch.Generator().manual_seed(2)):
        index = router(h)[2]
    z = logits_by_hand(router, base)
    law = z.softmax(-1) if family == "mixtral" else z.sigmoid() / z.sigmoid().sum(-1, keepdim=True)
    order = preference_by_hand(family, router, z)
    for t in range(4):
        top = set(order[t][:E - 1])
        rows = index[t * n:(t + 1) * n].sort(-1).values
        freq = float((rows != torch.tensor(sorted(top))).any(-1).double().mean())
        expected = lam * (1 - prob_of_set(law[t].tolist(), top))
        assert abs(freq - expected) < 5 * math.sqrt(expected * (1 - expected) / n) + 1e-9, (t, freq, expected)


def test_native_mass_by_hand_and_a_token_of_mass_zero():
    """native_mass on hand values: [0.2, 0.1] to the native 0.3 + 0.3 + 0.15 is x2.5; a token whose weights
    (or native mass) underflowed to 0 keeps weights 0, with finite gradients (no 0/0)."""
    weights = torch.tensor([[0.2, 0.1], [0.0, 0.0], [0.4, 0.1]], requires_grad=True)
    native = torch.tensor([[0.3, 0.3, 0.15], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    scaled = moekd.native_mass(weights, native)
    assert_close(scaled.detach(), torch.tensor([[0.5, 0.25], [0.0, 0.0], [0.0, 0.0]]))
    scaled.sum().backward()
    assert bool(torch.isfinite(weights.grad).all())
    model = model_of("deepseek_v3", norm_topk_prob=False)
    router = first_router(model)
    h = hidden(4, seed=1)
    h[0] = -1e3 * torch.linalg.pinv(router.weight.detach()) @ torch.ones(E)  # logits -1000: sigmoid 0 for all
    assert float(logits_by_hand(router, h[:1]).max()) < -500
    with torch.no_grad(), moekd.moe_routing(model, "all"):
        weights = router(h)[1]
    assert bool(torch.isfinite(weights).all()) and float(weights[0].abs().sum()) == 0.0
