"""Llama-MoE (llama_moe.py) and the checkpoint format: gate math and balance loss against naive formulas, the
whole model against a token-by-token reference, checkpoint keys, save/load round trips, config checks."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import checkpoints
import errors
import llama_moe
import moekd

from conftest import TINY, STUDENT, TINY_CFG, assert_close, write_model_dir, naive_cv2

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


# ----------------------------------------------------------------------------
# Naive references, written from the spec without looking at moekd's code paths

def naive_gate(x, w1, w2, k, *, linear=False):
    """Per token: logits = W2 tanh(W1 x) (or W1 x), top-k by sorting, softmax over the selected."""
    rows_idx, rows_w = [], []
    for t in range(x.shape[0]):
        logits = (w1 @ x[t]) if linear else (w2 @ torch.tanh(w1 @ x[t]))
        order = sorted(range(len(logits)), key=lambda e: -float(logits[e].detach()))[:k]
        sel = torch.tensor([float(logits[e].detach()) for e in order], dtype=torch.float64)
        rows_idx.append(order)
        rows_w.append((sel.exp() / sel.exp().sum()).float())
    return torch.tensor(rows_idx), torch.stack(rows_w)


def naive_llama_moe_logits(sd: dict, c: dict, ids: list[int]) -> torch.Tensor:
    """Whole Llama-MoE forward for one unpadded sequence, token by token where it matters."""
    H, nh, L, E, k = (c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"], c["num_experts"],
                      c["num_selects"])
    hd, T = H // nh, len(ids)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(q):  # [nh, T, hd], rotate-half layout
        return q * cos + torch.cat([-q[..., hd // 2:], q[..., :hd // 2]], -1) * sin

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, kk, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        q, kk, v = (a.view(T, nh, hd).transpose(0, 1) for a in (q, kk, v))
        q, kk = rope(q), rope(kk)
        scores = q @ kk.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, H)
        x = x + att @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        idx, w = naive_gate(h, sd[p + "mlp.gate.gate_network.0.weight"],
                            sd[p + "mlp.gate.gate_network.2.weight"], k)
        scale = llama_moe.layer_value(c["score_scale_factor"], i)
        y = torch.zeros_like(h)
        for t in range(T):
            for slot in range(k):
                e = int(idx[t, slot])
                ex = p + "mlp.calculator.experts."
                out = (F.silu(sd[ex + f"weight_gate.{e}"] @ h[t]) * (sd[ex + f"weight_up.{e}"] @ h[t]))
                y[t] += w[t, slot] * scale * (sd[ex + f"weight_down.{e}"] @ out)
        x = x + y
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


# ----------------------------------------------------------------------------
# Gate math, balance loss, whole-model numerics

def test_topk_selection_and_weights_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    index, _ = moekd.select_experts(logits, moekd.Routing(), 2)
    assert index.tolist() == [[2, 1]]
    e = math.e
    assert_close(llama_moe.routing_weights(logits, index), torch.tensor([[e / (1 + e), 1 / (1 + e)]]))


def test_cv_squared_hand_computed():
    # mean 2, unbiased variance 1 -> 1/4 (a biased variance would give 1/6)
    assert_close(llama_moe.cv_squared(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(0.25))
    assert llama_moe.cv_squared(torch.tensor([5.0])) == 0


def test_balance_loss_hand_computed():
    # constant logits, 4 tokens, E=4, k=2: top-2 picks experts 0,1 (ties -> lowest index), weights 1/2
    # importance = [2, 2, 0, 0], load = [4, 4, 0, 0]; cv2 = var/mean^2 = (4/3)/1 and (16/3)/4
    gate = llama_moe.LlamaMoEGate(3, 4, 2, gate_network="linear", add_noise=False, noise_epsilon=0.01,
                              use_balance=True, balance_loss_weight=0.01).eval()
    torch.nn.init.zeros_(gate.gate_network.weight)
    index, weights = gate(torch.randn(4, 3))
    assert_close(weights, torch.full((4, 2), 0.5))
    assert_close(gate.balance_loss, torch.tensor(0.01 * (4 / 3 + 4 / 3)))


@given(st.integers(1, 7), st.integers(1, 9), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_topk_selection_properties(k, n, seed):
    logits = torch.randn(n, 7, generator=torch.Generator().manual_seed(seed)) * 5
    index, _ = moekd.select_experts(logits, moekd.Routing("topk", k=k), 3)
    weights = llama_moe.routing_weights(logits, index)
    assert all(len(set(row)) == k for row in index.tolist())
    assert_close(weights.sum(-1), torch.ones(n))
    # softmax over all E renormalised over the top-k = softmax over the selected logits (doc §numerics 5)
    full = logits.softmax(-1).gather(1, index)
    assert_close(weights, full / full.sum(-1, keepdim=True))
    assert torch.equal(logits.gather(1, index), logits.topk(k).values)


@given(st.floats(0.1, 100.0), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_cv_squared_is_scale_invariant(c, seed):
    x = torch.rand(7, generator=torch.Generator().manual_seed(seed)) + 0.1
    assert_close(llama_moe.cv_squared(c * x), llama_moe.cv_squared(x), rtol=1e-3, atol=1e-6)


def test_gate_eval_matches_naive(teacher):
    gate = teacher.model.layers[1].mlp.gate
    x = torch.randn(11, TINY_CFG["hidden_size"])
    index, weights = gate(x)
    ref_idx, ref_w = naive_gate(x, gate.gate_network[0].weight, gate.gate_network[2].weight, 2)
    assert torch.equal(index, ref_idx)
    assert_close(weights, ref_w)
    full = torch.zeros(11, 7).scatter(1, ref_idx, ref_w)
    load = [float((full[:, e] > 0).sum()) for e in range(7)]
    expected = 0.01 * (naive_cv2(full.sum(0)) + naive_cv2(load))
    assert_close(gate.balance_loss, torch.tensor(expected, dtype=torch.float32))


def test_gate_train_noise_and_smooth_load_match_naive(teacher):
    """Train mode: noisy logits, and the official smooth load with its is_in quirk, per element."""
    gate = teacher.model.layers[2].mlp.gate.train()
    x, k, eps = torch.randn(9, TINY_CFG["hidden_size"]), 2, 0.01
    torch.manual_seed(123)
    index, weights = gate(x)
    clean = gate.gate_network(x).detach()
    std = F.softplus(gate.weight_noise(x)).detach() + eps
    torch.manual_seed(123)
    noise = torch.randn_like(clean) * std
    noisy = clean + noise
    assert torch.equal(index, noisy.topk(k).indices)
    assert_close(weights, noisy.topk(k).values.softmax(-1))
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    load = []
    for e in range(7):
        total = 0.0
        for t in range(9):
            ranked = sorted(noisy[t].tolist(), reverse=True)
            thr_in, thr_out = ranked[k], ranked[k - 1]
            # official quirk: the *noise term* is compared with the (k+1)-th noisy logit
            thr = thr_in if noise[t, e] > thr_in else thr_out
            total += phi((clean[t, e] - thr) / std[t, e])
        load.append(total)
    full = torch.zeros(9, 7).scatter(1, index, weights.detach())
    expected = 0.01 * (naive_cv2(full.sum(0)) + naive_cv2(load))
    assert_close(gate.balance_loss.detach(), torch.tensor(expected, dtype=torch.float32))
    gate.balance_loss.backward()  # the smooth load carries gradient into weight_noise
    assert gate.weight_noise.weight.grad.abs().sum() > 0


def test_model_logits_match_naive_reference(teacher):
    ids = [1, 17, 250, 3, 999, 42, 7]
    sd = {k: v.detach() for k, v in teacher.state_dict().items()}
    ref = naive_llama_moe_logits(sd, TINY_CFG, ids)
    with torch.no_grad():
        got = teacher(input_ids=torch.tensor([ids])).logits[0]
    assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_all_experts_fast_path_equals_the_expert_loop(teacher):
    calc = teacher.model.layers[2].mlp.calculator  # uneven expert sizes 29, 11, 31, ...
    x = torch.randn(10, TINY_CFG["hidden_size"])
    index = torch.stack([torch.randperm(7) for _ in range(10)])  # any order of all experts
    weights = torch.rand(10, 7).softmax(-1)
    expected = torch.zeros_like(x)
    for t in range(10):
        for slot in range(7):
            expected[t] += weights[t, slot] * calc.score_scale_factor * \
                calc.experts.expert(int(index[t, slot]), x[t:t + 1])[0]
    assert_close(calc(x, index, weights), expected)


def test_balance_loss_sums_over_layers(teacher):
    teacher(input_ids=torch.tensor([[1, 5, 9, 13]]))
    per_layer = [layer.mlp.gate.balance_loss for layer in teacher.model.layers]
    assert_close(llama_moe.balance_loss(teacher), sum(per_layer))


def test_seeded_llama_moe_weights_on_cpu_are_the_cpu_generators_draws():
    """build_llama_moe(init_seed) draws on the device it builds on; on the CPU the weights stay what tiny_moe
    and the published runs were trained from: one CPU generator, normal(0, initializer_range) per matrix in
    parameter order, norms 1 (written out here independently)."""
    model = llama_moe.build_llama_moe(llama_moe.check_llama_moe_config(TINY_CFG, where="test"), init_seed=7)
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        expected = torch.ones(p.shape) if p.ndim == 1 else torch.randn(p.shape, generator=g) * 0.02
        assert torch.equal(p, expected), name
    assert TINY_CFG.get("initializer_range", 0.02) == 0.02


# ----------------------------------------------------------------------------
# Checkpoint format: keys, round trips, errors

def expected_keys(c: dict) -> dict[str, tuple]:
    H, V, E, L = c["hidden_size"], c["vocab_size"], c["num_experts"], c["num_hidden_layers"]
    keys = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        keys.update({p + f"self_attn.{n}_proj.weight": (H, H) for n in "qkvo"})
        keys.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
        if c.get("gate_network", "mlp") == "mlp":
            keys.update({p + "mlp.gate.gate_network.0.weight": (E, H),
                         p + "mlp.gate.gate_network.2.weight": (E, E)})
        else:
            keys[p + "mlp.gate.gate_network.weight"] = (E, H)
        if c.get("gate_add_noise", True):
            keys[p + "mlp.gate.weight_noise.weight"] = (E, H)
        sizes = c["size_experts"][i] if c.get("size_experts") else [c["intermediate_size"] // E] * E
        for j, s in enumerate(sizes):
            ex = p + "mlp.calculator.experts."
            keys.update({ex + f"weight_gate.{j}": (s, H), ex + f"weight_up.{j}": (s, H),
                         ex + f"weight_down.{j}": (H, s)})
    return keys


def test_state_dict_keys_match_llama_moe_checkpoints(teacher):
    got = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    assert got == expected_keys(TINY_CFG)


def test_linear_gate_without_noise_keys(tmp_path):
    c = {**TINY_CFG, "gate_network": "linear", "gate_add_noise": False, "size_experts": None,
         "intermediate_size": 7 * 13, "score_scale_factor": 4.0}
    model = checkpoints.load_model(str(write_model_dir(tmp_path / "m", c)))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_keys(c)
    x = torch.randn(5, c["hidden_size"])
    gate = model.model.layers[0].mlp.gate.train()  # no weight_noise: train mode adds no noise
    index, weights = gate(x)
    ref_idx, ref_w = naive_gate(x, gate.gate_network.weight, None, 2, linear=True)
    assert torch.equal(index, ref_idx)
    assert_close(weights, ref_w)


def logits_of(model, ids=((1, 8, 33, 700, 2038, 5),)):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


@pytest.mark.parametrize("source", [TINY, STUDENT])
def test_save_load_round_trip_identical_logits(tmp_path, tokenizer, source):
    model = checkpoints.load_model(str(source))
    checkpoints.save_model(model, tokenizer, tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").exists()
    assert not list((tmp_path / "saved").glob("*.bin"))
    again = checkpoints.load_model(str(tmp_path / "saved"))
    assert torch.equal(logits_of(model), logits_of(again))
    saved_cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "moekd_init_seed" not in saved_cfg or source == STUDENT
    if source == TINY:
        assert saved_cfg["model_type"] == "llama_moe"
        assert saved_cfg["size_experts"] == TINY_CFG["size_experts"]


def test_sharded_safetensors_round_trip(tmp_path, teacher, tokenizer):
    checkpoints.save_model(teacher, tokenizer, tmp_path / "s", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / "s" / s).exists() for s in shards)
    assert torch.equal(logits_of(teacher), logits_of(checkpoints.load_model(str(tmp_path / "s"))))


def test_sharded_bin_checkpoint_with_inv_freq_loads(tmp_path, teacher):
    """The hub Llama-MoE checkpoints are sharded .bin files that carry rotary inv_freq buffers."""
    d = write_model_dir(tmp_path / "bin", {k: v for k, v in TINY_CFG.items() if k != "moekd_init_seed"})
    sd = teacher.state_dict()
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = {k: sd[k].clone() for k in part}
        shard[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        torch.save(shard, d / f"pytorch_model-0000{i}-of-00002.bin")
        weight_map.update({k: f"pytorch_model-0000{i}-of-00002.bin" for k in shard})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(logits_of(teacher), logits_of(checkpoints.load_model(str(d))))


def test_checkpoint_errors_name_the_key(tmp_path, teacher, tokenizer):
    from safetensors.torch import save_file
    checkpoints.save_model(teacher, tokenizer, tmp_path / "ok")
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    cases = {
        "missing": ({k: v for k, v in sd.items() if "weight_noise" not in k}, "missing .* key"),
        "unexpected": ({**sd, "model.layers.0.mlp.extra": torch.zeros(1)},
                       "unexpected checkpoint key model.layers.0.mlp.extra"),
        "shape": ({**sd, "lm_head.weight": torch.zeros(3, 3)}, r"lm_head.weight has shape \(3, 3\)"),
    }
    for name, (state, pattern) in cases.items():
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        save_file(state, tmp_path / name / "model.safetensors")
        with pytest.raises(errors.MoekdError, match=pattern):
            checkpoints.load_model(str(tmp_path / name))


def test_config_validation(tmp_path):
    bad = {k: v for k, v in TINY_CFG.items() if k != "num_experts"}
    with pytest.raises(errors.MoekdError, match="missing required field.*num_experts"):
        checkpoints.load_model(str(write_model_dir(tmp_path / "a", bad)))
    bad = {**TINY_CFG, "size_experts": [[23] * 7] * 3, "intermediate_size": 160}
    with pytest.raises(errors.MoekdError, match="size_experts"):
        checkpoints.load_model(str(write_model_dir(tmp_path / "b", bad)))
    bad = {**TINY_CFG, "score_scale_factor": [1.0, 2.0]}
    with pytest.raises(errors.MoekdError, match="score_scale_factor has 2 entries"):
        checkpoints.load_model(str(write_model_dir(tmp_path / "c", bad)))
    no_seed = {k: v for k, v in TINY_CFG.items() if k != "moekd_init_seed"}
    with pytest.raises(errors.MoekdError, match="no weights"):
        checkpoints.load_model(str(write_model_dir(tmp_path / "d", no_seed)))


def test_tiny_init_is_deterministic(teacher):
    assert torch.equal(logits_of(teacher), logits_of(checkpoints.load_model(str(TINY))))


def test_hf_moe_teacher_loads_and_sft_adds_router_aux_loss(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, MixtralConfig
    c = MixtralConfig(vocab_size=2039, hidden_size=36, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, num_local_experts=5,
                      num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(c).save_pretrained(tmp_path / "mixtral")
    model = checkpoints.load_model(str(tmp_path / "mixtral"))
    assert moekd.is_moe(model) and len(moekd.moe_routers(model)) == 2
    item = moekd.tokenize_example(tokenizer, "Q: hi\n", "yes", max_prompt_len=50, max_len=60)
    batch = moekd.collate([item, item], tokenizer.pad_token_id)
    parts = moekd.sft_step(model, None, batch, moekd.Config(), norm=1.0, n_micro=2)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_router_logits=True)
    assert_close(parts["lb"], c.router_aux_loss_coef * out.aux_loss / 2)


class Planted:  # not a tensor: the weights-only unpickler refuses it
    pass


def test_pickled_weights_are_refused_with_safetensors_advice(tmp_path):
    d = write_model_dir(tmp_path / "m", TINY_CFG | {"moekd_init_seed": None})
    torch.save({"model.embed_tokens.weight": Planted()}, d / "pytorch_model.bin")
    with pytest.raises(errors.MoekdError,
                       match=r"pytorch_model.bin: refused, it pickles objects other than tensors; "
                             r"convert it to safetensors$") as e:
        checkpoints.load_model(str(d))
    assert "weights_only" not in str(e.value)
