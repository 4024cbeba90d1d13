"""Routing values written out by hand (float64, from the routers' own parameters; no project helper in the
references): which experts each mode picks, their weights per mechanism x renormalisation at k != native and in
KA's two branches, the group-limit preference order, SAR's balance term, and KA's lambda against the exact
probability of its draws."""
import itertools
import math

import pytest
import torch
from torch.testing import assert_close

import moekd
import test_families as tf

E = tf.E


def model_of(family: str, **overrides):
    """The family's tiny random model (test_families' build), or a variant of its config built the same way."""
    if not overrides:
        return tf.tiny_moe(family)
    from transformers import AutoModelForCausalLM
    config = tf.tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gate." in name or ".router." in name:
                p.normal_(0.0, 0.3)
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.copy_(torch.randn(buf.shape) * 0.1)
    return model


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
        with moekd.moe_routing(model, "sample", k=E - 1, prob=0.0, generator=torch.Generator().manual_seed(0)):
            index = router(h)[2]
    left_out = [(set(range(E)) - set(r)).pop() for r in index.tolist()]
    assert left_out == [o[-1] for o in order]


MECHANISMS = {  # case -> (family, config overrides, expected weights of the chosen experts from the logits z)
    "softmax, norm": ("mixtral", {}, lambda z, idx: z.softmax(-1).gather(1, idx) / z.softmax(-1).gather(1, idx).sum(
        -1, keepdim=True)),
    "softmax, no norm": ("qwen2_moe", {}, lambda z, idx: z.softmax(-1).gather(1, idx)),
    "logits": ("granitemoe", {}, lambda z, idx: z.gather(1, idx).softmax(-1)),
    "sigmoid, norm": ("deepseek_v3", {}, lambda z, idx: 2.5 * z.sigmoid().gather(1, idx) / z.sigmoid().gather(
        1, idx).sum(-1, keepdim=True)),
    "sigmoid, no norm": ("deepseek_v3", {"norm_topk_prob": False}, lambda z, idx: 2.5 * z.sigmoid().gather(1, idx)),
    "llama4": ("llama4_text", {}, lambda z, idx: z.sigmoid().gather(1, idx)),
}


def chosen_and_weights(router, out, family: str):
    """(index [N, K], weights [N, K]) from a router's output; Llama 4 gives dense scores [N, E] (0 = not chosen)."""
    if family == "llama4_text":
        scores = out[0]
        index = torch.stack([torch.nonzero(r).flatten() for r in scores])
        return index, scores.gather(1, index)
    return out[2], out[1]


@pytest.mark.parametrize("case", list(MECHANISMS))
def test_weights_at_other_k_and_in_kas_branches_by_hand(case):
    """topk at k = 1 and N-1 (native is 3, Llama 4's 2), KA's top-(N-1) branch (prob 0) and drawn branch (prob 1):
    the chosen set (the top branches: by the family's preference order) and each chosen expert's weight as the
    family's own rule literally gives it, written out in float64."""
    family, overrides, rule = MECHANISMS[case]
    model = model_of(family, **overrides)
    router = first_router(model)
    h = hidden(40, seed=5)
    z = logits_by_hand(router, h)
    order = preference_by_hand(family, router, z)
    runs = [("topk", 1, None), ("topk", E - 1, None), ("sample", E - 1, 0.0), ("sample", E - 1, 1.0)]
    for mode, k, prob in runs:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad(), moekd.moe_routing(model, mode, k=k, prob=prob, generator=generator):
            index, weights = chosen_and_weights(router, router(h), family)
        assert index.shape == (40, k) and all(len(set(r)) == k for r in index.tolist())
        if prob != 1.0:
            assert [sorted(r) for r in index.tolist()] == [sorted(o[:k]) for o in order], (mode, k, prob)
        assert_close(weights.double(), rule(z, index), rtol=1e-5, atol=1e-6, msg=f"{case} {mode} k={k} p={prob}")


def test_sar_balance_term_of_mixtral_is_the_switch_loss_by_hand():
    """Mixtral's own aux loss under SAR (all experts): beta * E * Sum_e f_e P_e over every layer's tokens, f_e the
    fraction of tokens whose native top-k holds e, P_e the mean softmax probability, from the routers' inputs."""
    model = model_of("mixtral")
    inputs = []
    hooks = [r.register_forward_hook(lambda m, a, out: inputs.append((m, a[0]))) for r in moekd.moe_routers(model)]
    with torch.no_grad(), moekd.moe_routing(model, "all"), moekd.record_routing(model) as routed:
        model(tf.ids())
        loss = moekd.router_balance_loss(routed, 0.01)
    for hook in hooks:
        hook.remove()
    z = torch.cat([logits_by_hand(m, x.reshape(-1, 32)) for m, x in inputs])             # [layers * tokens, E]
    top = z.topk(first_router(model).top_k, dim=-1).indices
    f = torch.tensor([sum(e in row for row in top.tolist()) for e in range(E)], dtype=torch.float64) / len(z)
    P = z.softmax(-1).mean(0)
    assert len(inputs) == 2 and abs(float(loss) - 0.01 * E * float((f * P).sum())) < 1e-6


def test_sar_balance_term_of_a_family_without_its_own_is_cv_squared_by_hand():
    """DeepSeek-V3 (no aux loss in its modeling file) under SAR: beta * Sum_layers cv2(importance) + cv2(load),
    cv2 = unbiased variance / mean^2, importance the per-expert sum of the routing weights (2.5 sigmoid, norm)."""
    model = model_of("deepseek_v3")
    inputs = []
    hooks = [r.register_forward_hook(lambda m, a, out: inputs.append((m, a[0]))) for r in moekd.moe_routers(model)]
    with torch.no_grad(), moekd.moe_routing(model, "all"), moekd.record_routing(model) as routed:
        model(tf.ids())
        loss = moekd.router_balance_loss(routed, 0.01)
    for hook in hooks:
        hook.remove()

    def cv2(x):
        mean = sum(x) / len(x)
        return sum((v - mean) ** 2 for v in x) / (len(x) - 1) / (mean ** 2 + 1e-10)

    expected = 0.0
    for m, x in inputs:
        s = logits_by_hand(m, x.reshape(-1, 32)).sigmoid()
        w = 2.5 * s / s.sum(-1, keepdim=True)
        expected += cv2(w.sum(0).tolist()) + cv2([float(len(w))] * E)
    assert len(inputs) == 2 and abs(float(loss) - 0.01 * expected) < 1e-6 * max(1.0, expected)


def prob_of_set(p: list[float], chosen: set[int]) -> float:
    """P(k draws without replacement, in proportion to p, give exactly `chosen`): a sum over its draw orders."""
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
    """Four fixed tokens, each repeated 30000 times, KA at k = N-1 and lambda 0.5: the frequency with which a token's
    set differs from its top-(N-1) set equals 0.5 * (1 - P(the draw gives the top set)) within 5 standard errors,
    P by enumerating the 7! draw orders of the law (softmax; DeepSeek-V3: sigmoid normalised, without the bias)."""
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
