"""Tests for moekd.py: CPU, offline, tiny models. Run: pytest -q"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import checkpoints
import data
import llama_moe
import hidden_losses
import moekd
import sampling
from tiny_moe import synthetic

ROOT = Path(__file__).resolve().parent
TINY = ROOT / "tiny_moe"
STUDENT = TINY / "student"
SP = TINY / "sp"  # the same tiny models for the LLaMA-like tokenizer's vocabulary
SHARED = ROOT.parent / "shared" / "data"
NEEDS_DATA = "needs ../shared/data: fetch it with python fetch_data.py"
TINY_CFG = json.loads((TINY / "config.json").read_text())


def assert_close(a, b, **kw):
    torch.testing.assert_close(a, b, **{"atol": 1e-5, "rtol": 1e-4, **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return moekd.load_tokenizer(str(TINY))


@pytest.fixture(scope="session")
def sp_tokenizer():
    """The LLaMA-like tokenizer (SentencePiece-style "▁" prefix, byte fallback, no pad token)."""
    return moekd.load_tokenizer(str(SP))


@pytest.fixture(params=["byte-level", "sentencepiece-like"])
def any_tokenizer(request, tokenizer, sp_tokenizer):
    return tokenizer if request.param == "byte-level" else sp_tokenizer


@pytest.fixture
def teacher():
    return moekd.load_model(str(TINY))


@pytest.fixture
def student():
    return moekd.load_model(str(STUDENT))


def write_model_dir(path: Path, config: dict, tokenizer_dir: Path = TINY) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


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


def naive_cv2(v):
    v = [float(a) for a in v]
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / (len(v) - 1)
    return var / (mean ** 2 + 1e-10)


def naive_llama_moe_logits(sd: dict, c: dict, ids: list[int]) -> torch.Tensor:
    """Whole Llama-MoE forward for one unpadded sequence, token by token where it matters."""
    H, nh, L, E, k = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"], c["num_experts"], c["num_selects"]
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
        idx, w = naive_gate(h, sd[p + "mlp.gate.gate_network.0.weight"], sd[p + "mlp.gate.gate_network.2.weight"], k)
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
# Llama-MoE: gate math, balance loss, whole-model numerics, checkpoint format

def test_topk_selection_and_weights_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    index, _ = moekd.select_experts(logits, moekd.Routing(), 2)
    assert index.tolist() == [[2, 1]]
    e = math.e
    assert_close(llama_moe.routing_weights(logits, index), torch.tensor([[e / (1 + e), 1 / (1 + e)]]))


def test_cv_squared_hand_computed():
    # mean 2, unbiased variance 1 -> 1/4 (a biased variance would give 1/6)
    assert_close(moekd.cv_squared(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(0.25))
    assert moekd.cv_squared(torch.tensor([5.0])) == 0


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
    assert_close(moekd.cv_squared(c * x), moekd.cv_squared(x), rtol=1e-3, atol=1e-6)


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
            expected[t] += weights[t, slot] * calc.score_scale_factor * calc.experts.expert(int(index[t, slot]), x[t:t + 1])[0]
    assert_close(calc(x, index, weights), expected)


def test_balance_loss_sums_over_layers(teacher):
    teacher(input_ids=torch.tensor([[1, 5, 9, 13]]))
    per_layer = [layer.mlp.gate.balance_loss for layer in teacher.model.layers]
    assert_close(llama_moe.balance_loss(teacher), sum(per_layer))


def expected_keys(c: dict) -> dict[str, tuple]:
    H, V, E, L = c["hidden_size"], c["vocab_size"], c["num_experts"], c["num_hidden_layers"]
    keys = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        keys.update({p + f"self_attn.{n}_proj.weight": (H, H) for n in "qkvo"})
        keys.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
        if c.get("gate_network", "mlp") == "mlp":
            keys.update({p + "mlp.gate.gate_network.0.weight": (E, H), p + "mlp.gate.gate_network.2.weight": (E, E)})
        else:
            keys[p + "mlp.gate.gate_network.weight"] = (E, H)
        if c.get("gate_add_noise", True):
            keys[p + "mlp.gate.weight_noise.weight"] = (E, H)
        sizes = c["size_experts"][i] if c.get("size_experts") else [c["intermediate_size"] // E] * E
        for j, s in enumerate(sizes):
            ex = p + "mlp.calculator.experts."
            keys.update({ex + f"weight_gate.{j}": (s, H), ex + f"weight_up.{j}": (s, H), ex + f"weight_down.{j}": (H, s)})
    return keys


def test_state_dict_keys_match_llama_moe_checkpoints(teacher):
    got = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    assert got == expected_keys(TINY_CFG)


def test_linear_gate_without_noise_keys(tmp_path):
    c = {**TINY_CFG, "gate_network": "linear", "gate_add_noise": False, "size_experts": None,
         "intermediate_size": 7 * 13, "score_scale_factor": 4.0}
    model = moekd.load_model(str(write_model_dir(tmp_path / "m", c)))
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
    model = moekd.load_model(str(source))
    checkpoints.save_model(model, tokenizer, tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").exists()
    assert not list((tmp_path / "saved").glob("*.bin"))
    again = moekd.load_model(str(tmp_path / "saved"))
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
    assert torch.equal(logits_of(teacher), logits_of(moekd.load_model(str(tmp_path / "s"))))


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
    assert torch.equal(logits_of(teacher), logits_of(moekd.load_model(str(d))))


def test_checkpoint_errors_name_the_key(tmp_path, teacher, tokenizer):
    from safetensors.torch import save_file
    checkpoints.save_model(teacher, tokenizer, tmp_path / "ok")
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    cases = {
        "missing": ({k: v for k, v in sd.items() if "weight_noise" not in k}, "missing .* key"),
        "unexpected": ({**sd, "model.layers.0.mlp.extra": torch.zeros(1)}, "unexpected checkpoint key model.layers.0.mlp.extra"),
        "shape": ({**sd, "lm_head.weight": torch.zeros(3, 3)}, r"lm_head.weight has shape \(3, 3\)"),
    }
    for name, (state, pattern) in cases.items():
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        save_file(state, tmp_path / name / "model.safetensors")
        with pytest.raises(moekd.MoekdError, match=pattern):
            moekd.load_model(str(tmp_path / name))


def test_config_validation(tmp_path):
    bad = {k: v for k, v in TINY_CFG.items() if k != "num_experts"}
    with pytest.raises(moekd.MoekdError, match="missing required field.*num_experts"):
        moekd.load_model(str(write_model_dir(tmp_path / "a", bad)))
    bad = {**TINY_CFG, "size_experts": [[23] * 7] * 3, "intermediate_size": 160}
    with pytest.raises(moekd.MoekdError, match="size_experts"):
        moekd.load_model(str(write_model_dir(tmp_path / "b", bad)))
    bad = {**TINY_CFG, "score_scale_factor": [1.0, 2.0]}
    with pytest.raises(moekd.MoekdError, match="score_scale_factor has 2 entries"):
        moekd.load_model(str(write_model_dir(tmp_path / "c", bad)))
    no_seed = {k: v for k, v in TINY_CFG.items() if k != "moekd_init_seed"}
    with pytest.raises(moekd.MoekdError, match="no weights"):
        moekd.load_model(str(write_model_dir(tmp_path / "d", no_seed)))


def test_tiny_init_is_deterministic(teacher):
    assert torch.equal(logits_of(teacher), logits_of(moekd.load_model(str(TINY))))


def test_hf_moe_teacher_loads_and_sft_adds_router_aux_loss(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, MixtralConfig
    c = MixtralConfig(vocab_size=2039, hidden_size=36, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(c).save_pretrained(tmp_path / "mixtral")
    model = moekd.load_model(str(tmp_path / "mixtral"))
    assert moekd.is_moe(model) and len(moekd.moe_routers(model)) == 2
    item = moekd.tokenize_example(tokenizer, "Q: hi\n", "yes", max_prompt_len=50, max_len=60)
    batch = moekd.collate([item, item], tokenizer.pad_token_id)
    parts = moekd.sft_step(model, None, batch, moekd.Config(), norm=1.0, n_micro=2)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    assert_close(parts["lb"], c.router_aux_loss_coef * out.aux_loss / 2)


# ----------------------------------------------------------------------------
# Data: template, masking, formats, synthetic set

def test_template_golden_strings():
    assert data.format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert data.format_prompt("Sum.", "1 and 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSum.\n\n"
        "### Input:\n1 and 2\n\n### Response:\n")


@pytest.mark.skipif(not SHARED.exists(), reason=NEEDS_DATA)
def test_template_reproduces_minillm_prompts():
    for name in ("dolly/valid.jsonl", "dolly/dev.jsonl"):
        for line in (SHARED / name).read_text().splitlines():
            row = json.loads(line)
            assert data.format_prompt(row["instruction"], row["input"]) == row["prompt"]


def official_response_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """The official processing's response ids: encode(prompt + response) after the prompt's length."""
    n = len(tokenizer.encode(prompt, add_special_tokens=False))
    return tokenizer.encode(prompt + response, add_special_tokens=False)[n:] + [tokenizer.eos_token_id]


def test_labels_mask_prompt_and_keep_eos_when_pad_is_eos(any_tokenizer):
    tokenizer = any_tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # MoEKD's LLaMA setting
    eos = tokenizer.eos_token_id
    a = moekd.tokenize_example(tokenizer, "### Q:\n", "red", max_prompt_len=50, max_len=60)
    b = moekd.tokenize_example(tokenizer, "### Question here:\n", "blue green black", max_prompt_len=50, max_len=60)
    n_prompt = len(tokenizer.encode("### Q:\n", add_special_tokens=False))
    assert a["input_ids"][0] != tokenizer.bos_token_id  # no BOS in training (official processing)
    assert a["labels"][:n_prompt] == [-100] * n_prompt
    assert a["labels"][n_prompt:] == official_response_ids(tokenizer, "### Q:\n", "red")
    batch = moekd.collate([a, b], tokenizer.pad_token_id)
    mask = moekd.loss_mask(batch["labels"])
    # the final EOS of the shorter row is a loss target even though pad tokens are EOS too
    last = len(a["input_ids"]) - 1
    assert batch["input_ids"][0, last] == eos and batch["labels"][0, last] == eos and mask[0, last - 1]
    assert batch["input_ids"][0, last + 1] == eos and not mask[0, last:].any()  # padding is not
    assert int(mask.sum()) == sum(l != -100 for l in a["labels"] + b["labels"])
    assert batch["attention_mask"][0].tolist() == [1] * (last + 1) + [0] * (batch["input_ids"].shape[1] - last - 1)


def test_long_prompts_dropped_and_sequences_truncated(any_tokenizer):
    tokenizer = any_tokenizer
    assert moekd.tokenize_example(tokenizer, "word " * 40, "x", max_prompt_len=10, max_len=20) is None
    item = moekd.tokenize_example(tokenizer, "Q", "word " * 40, max_prompt_len=10, max_len=20)
    assert len(item["input_ids"]) == len(item["labels"]) == 20
    cfg = moekd.Config(max_prompt_len=10, max_len=20)
    kept = moekd.tokenize_examples(tokenizer, [{"prompt": "word " * 40, "responses": ["x"]},
                                               {"prompt": "Q", "responses": ["x"]}], cfg, name="t")
    assert len(kept) == 1


def test_sentencepiece_tokenizer_behaves_like_llama(sp_tokenizer):
    tok = sp_tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 1543)
    assert tok.encode("hi")[0] == tok.bos_token_id  # <s> added, as LLaMA's tokenizer
    pieces = tok.convert_ids_to_tokens(tok.encode("Paris is\n日", add_special_tokens=False))
    assert pieces[0].startswith("▁") and "<0x0A>" in pieces  # prefix on the first word; newline as a byte
    assert pieces[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]  # byte fallback for a character outside the vocabulary
    assert tok.decode(tok.encode("Paris is\n日 ok", add_special_tokens=False)) == "Paris is\n日 ok"


@pytest.mark.parametrize("response", ["Paris is nice", "4, 5, 6", "été ✓"])
def test_response_tokens_are_the_joint_tokenization(sp_tokenizer, response):
    """The official processing tokenizes prompt + response together: after "### Response:\n" a response's
    first word has no "▁", unlike the response tokenized on its own (what moekd did before)."""
    tok, prompt = sp_tokenizer, data.format_prompt("Say something.")
    item = moekd.tokenize_example(tok, prompt, response, max_prompt_len=200, max_len=300)
    n = len(item["prompt_ids"])
    assert item["input_ids"][n:] == item["labels"][n:] == official_response_ids(tok, prompt, response)
    alone = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
    assert item["labels"][n:] != alone and not tok.convert_ids_to_tokens(item["labels"][n])[0] == "▁"
    assert item["prefix_ok"]


def test_prompts_whose_tokens_merge_into_the_response_are_counted(tokenizer, capsys):
    """A prompt ending inside a word: the joint ids do not start with the prompt's ids. The official slice
    is kept (prompt ids + joint ids after the prompt's length) and the row is counted, not dropped."""
    prompt, response = "Which city does Kalomi live in? Answer: Par", "is"
    joint = tokenizer.encode(prompt + response, add_special_tokens=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert joint[:len(prompt_ids)] != prompt_ids  # the premise: a BPE merge across the boundary
    cfg = moekd.Config(max_prompt_len=50, max_len=60)
    items = moekd.tokenize_examples(tokenizer, [{"prompt": prompt, "responses": [response]},
                                                {"prompt": "Q:\n", "responses": ["yes"]}], cfg, name="t")
    assert len(items) == 2 and "prefix_ok" not in items[0]
    assert items[0]["input_ids"] == prompt_ids + joint[len(prompt_ids):] + [tokenizer.eos_token_id]
    assert "2 examples kept, 0 dropped with prompts over 50 tokens, 0 dropped with empty responses, 1 whose prompt tokens merge" in capsys.readouterr().out


def test_jsonl_formats(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"instruction": "I", "context": "C", "response": "R", "category": "x"}) + "\n\n"
                   + json.dumps({"prompt": "P", "output": ["a", "b"]}) + "\n")
    rows = data.read_jsonl(raw)
    assert rows == [{"prompt": data.format_prompt("I", "C"), "responses": ["R"]},
                    {"prompt": "P", "responses": ["a", "b"]}]


@pytest.mark.parametrize("content,pattern", [
    ("", "empty file"),
    ('{"prompt": "p", "output": "o"}\n{"prompt": "p", "output": \n', r"bad\.jsonl:2: malformed JSON"),
    ('{"prompt": "p", "output": "o"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
    ('{"question": "q"}\n', r"bad\.jsonl:1: need fields"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, pattern):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(moekd.MoekdError, match=pattern):
        data.read_jsonl(tmp_path / "bad.jsonl")


def test_splits(tmp_path):
    rows = [{"instruction": f"i{n}", "context": "", "response": "r", "category": "c"} for n in range(1600)]
    (tmp_path / "dolly.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train, dev = moekd.load_splits(moekd.Config(data=str(tmp_path / "dolly.jsonl")))
    # raw Dolly: rows 0-499 are MiniLLM's test set, 500-1499 dev, the rest train
    assert dev[0]["prompt"] == data.format_prompt("i500") and len(dev) == 1000
    assert train[0]["prompt"] == data.format_prompt("i1500") and len(train) == 100
    mini = [{"prompt": f"p{n}", "output": "o"} for n in range(30)]
    (tmp_path / "mini.jsonl").write_text("\n".join(json.dumps(r) for r in mini))
    train, dev = moekd.load_splits(moekd.Config(data=str(tmp_path / "mini.jsonl"), dev_size=10))
    assert [d["prompt"] for d in dev] == [f"p{n}" for n in range(10)] and len(train) == 20
    with pytest.raises(moekd.MoekdError, match="leave no training rows"):
        moekd.load_splits(moekd.Config(data=str(tmp_path / "mini.jsonl")))


def test_synthetic_fact_families_are_a_consistent_table():
    """color/password ask fixed attributes of the fact table's people (the same answer every time); a longer
    table extends a shorter one; the default mix is what it was (the families and table are opt-in)."""
    assert synthetic.synthetic_rows(300, seed=3) == synthetic.synthetic_rows(300, seed=3, families=synthetic.DEFAULT_FAMILIES)
    assert synthetic._fact_table(500)[:240] == synthetic._fact_table()
    rows = synthetic.synthetic_rows(3000, seed=5, families=("color", "password", "fact"), n_facts=50)
    assert {r["category"] for r in rows} == {"color", "password", "fact"}
    names = [name for name, _ in synthetic._fact_table(50)]
    unique = {name for name in names if names.count(name) == 1}  # a made-up name can repeat (49 of 50 unique)
    answers: dict = {}
    for r in rows:
        answers.setdefault(r["instruction"], set()).add(r["response"])
    assert len(unique) == 48 and len(answers) <= 3 * 49
    assert all(len(a) == 1 for q, a in answers.items() if any(f" {n} " in q or f" {n}'s" in q for n in unique))
    assert {r["response"] for r in rows if r["category"] == "color"} <= set(synthetic._COLORS)
    with pytest.raises(ValueError, match="unknown: nope"):
        synthetic.synthetic_rows(3, seed=1, families=("add", "nope"))


def test_synthetic_set_is_deterministic_and_correct():
    a, b = synthetic.synthetic_rows(400, seed=3), synthetic.synthetic_rows(400, seed=3)
    assert a == b and a != synthetic.synthetic_rows(400, seed=4)
    assert len({r["category"] for r in a}) == 8
    for r in a:
        if r["category"] == "add":
            x, y = map(int, r["context"].split(" and "))
            assert r["response"] == str(x + y)
        elif r["category"] == "sort":
            assert r["response"] == ", ".join(map(str, sorted(map(int, r["context"].split(", ")))))
        elif r["category"] == "reverse":
            assert r["response"].split() == r["context"].split()[::-1]
        elif r["category"] == "count":
            assert r["response"] == str(len(r["context"].split()))


def test_tokenizer_script_reproduces_committed_tokenizer():
    sys.path.insert(0, str(TINY))
    import make_tokenizer
    dolly = SHARED / "dolly" / "dev.jsonl"
    if not dolly.exists():
        pytest.skip(NEEDS_DATA)
    tok = make_tokenizer.train(make_tokenizer.corpus(dolly))
    committed = json.loads((TINY / "tokenizer.json").read_text())
    assert json.loads(tok.backend_tokenizer.to_str()) == committed
    assert (STUDENT / "tokenizer.json").read_text() == (TINY / "tokenizer.json").read_text()


# ----------------------------------------------------------------------------
# Losses, schedule, accumulation

def test_lr_schedule():
    kw = dict(lr=1e-3, total=100, lr_min=1e-7)
    assert moekd.lr_at(0, schedule="constant", **kw) == moekd.lr_at(99, schedule="constant", **kw) == 1e-3
    assert moekd.lr_at(0, schedule="cosine", **kw) == 1e-3
    assert abs(moekd.lr_at(50, schedule="cosine", **kw) - (1e-3 + 1e-7) / 2) < 1e-12
    assert abs(moekd.lr_at(100, schedule="cosine", **kw) - 1e-7) < 1e-12
    assert moekd.lr_at(4, schedule="cosine", warmup=10, **kw) == pytest.approx(5e-4)


def grads_of(model, tokenizer, rows, *, micro, mode):
    model.zero_grad(set_to_none=True)
    items = [moekd.tokenize_example(tokenizer, r["prompt"], r["responses"][0], max_prompt_len=96, max_len=128)
             for r in rows]
    batches = [moekd.collate(items[i:i + micro], tokenizer.pad_token_id) for i in range(0, len(items), micro)]
    for mb, norm in zip(batches, moekd.loss_norms(batches, mode)):
        moekd.sft_step(model, None, mb, moekd.Config(), norm=norm, n_micro=len(batches))["loss"].backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_equivalence(student, tokenizer):
    rows = [data.to_example(r, where="t") for r in synthetic.synthetic_rows(8, seed=5)]
    full = grads_of(student, tokenizer, rows, micro=8, mode="global")
    split = grads_of(student, tokenizer, rows, micro=2, mode="global")
    for a, b in zip(full, split):
        assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the official mean-of-micro-means differs when micro-batches hold different token counts
    micro = grads_of(student, tokenizer, rows, micro=2, mode="micro")
    assert max((a - b).abs().max() for a, b in zip(full, micro)) > 1e-4


def test_sft_overfits_one_batch(teacher, tokenizer):
    rows = [data.to_example(r, where="t") for r in synthetic.synthetic_rows(4, seed=1)]
    items = [moekd.tokenize_example(tokenizer, r["prompt"], r["responses"][0], max_prompt_len=96, max_len=128)
             for r in rows]
    batch = moekd.collate(items, tokenizer.pad_token_id)
    norm = moekd.loss_norms([batch], "global")[0]
    opt = torch.optim.AdamW(moekd.param_groups(teacher, 0.0), lr=3e-3)
    teacher.train()  # gate noise on, balance loss added
    losses = []
    for _ in range(60):
        parts = moekd.sft_step(teacher, None, batch, moekd.Config(), norm=norm, n_micro=1)
        assert "lb" in parts and parts["lb"] > 0
        parts["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(parts["ce"].item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_param_groups_skip_decay_on_norms(teacher):
    decay, no_decay = moekd.param_groups(teacher, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 2 * TINY_CFG["num_hidden_layers"] + 1  # RMSNorm weights
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in teacher.parameters())


# ----------------------------------------------------------------------------
# main(): training runs, resume, bad input

def tiny_args(out, *extra):
    return ["--tiny", "--model", str(TINY), "--out", str(out), "--synthetic-train", "48",
            "--synthetic-dev", "8", "--batch-size", "8", "--epochs", "2", "--dev-num", "4",
            "--log-every", "2", *extra]


def test_main_sft_tiny_moe_runs_and_selects_best(tmp_path):
    result = moekd.main(tiny_args(tmp_path / "run"))
    assert result["finished"] and result["step"] == result["total_steps"] == 12
    dev = [h for h in result["history"] if "dev_rougeL" in h]
    assert [h["step"] for h in dev] == [6, 12]
    assert result["best_rougeL"] == max(h["dev_rougeL"] for h in dev)
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert losses[-1] < losses[0]
    for sub in ("best_rougeL", "final", "checkpoints/step-12"):
        assert moekd.is_moe(moekd.load_model(str(tmp_path / "run" / sub)))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 12
    assert "step 2/12 | epoch 1 | loss" in (tmp_path / "run" / "log.txt").read_text()


def without_timing(log: str) -> list[str]:
    return [re.sub(r" \| [\d.]+ tok/s \| \d+ ms$", "", line) for line in log.splitlines()]


def test_kill_9_and_resume_is_bit_identical(tmp_path):
    """A run killed (SIGKILL) after a checkpoint and resumed with `--resume` alone (the config comes from
    run.json) ends bit-identical to an uninterrupted run, with the same log.txt."""
    whole = moekd.main(tiny_args(tmp_path / "a"))
    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(ROOT / "moekd.py"), *tiny_args(b, "--save-every", "1")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # this process's thread count:
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})  # the same float sums
    latest = b / "checkpoints" / "latest"
    while proc.poll() is None and not (latest.exists() and int(latest.read_text().split("-")[1]) >= 3):
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -9, "the run ended before it could be killed"
    with (b / "log.txt").open("a") as f:  # what a kill can leave after the checkpoint: a later step, half a line
        f.write("dev step 11 | dev_loss 1.0 | dev_rougeL 1.00\nstep 1")
    resumed = moekd.main(["--out", str(b), "--resume"])
    assert resumed["finished"]
    a, c = load_file(tmp_path / "a" / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert whole["history"] == resumed["history"]  # the same log lines and dev scores
    assert without_timing((b / "log.txt").read_text()) == without_timing((tmp_path / "a" / "log.txt").read_text())
    with pytest.raises(moekd.MoekdError, match=r"--resume: --epochs 3 \(run: 2\); --lr 0.01 \(run: 0.003\) differ "
                                               r"from the run being resumed"):
        moekd.main(tiny_args(b, "--resume", "--lr", "1e-2", "--epochs", "3"))
    assert not list(b.glob("**/.tmp-*"))


def test_truncate_log_keeps_lines_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("step 2/9 | a\nstep 4/9 | b\ndev step 4 | c\nstep 6/9 | d\ndev step 6 | e\nstep 8")
    moekd.truncate_log(log, 4)
    assert log.read_text() == "step 2/9 | a\nstep 4/9 | b\ndev step 4 | c\n"


def test_existing_out_is_never_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(moekd.MoekdError, match="exists and is not empty; pass --resume or --overwrite"):
        moekd.main(tiny_args(out))
    with pytest.raises(moekd.MoekdError, match="no checkpoint to resume from|no run.json, not a moekd run"):
        moekd.main(tiny_args(out, "--resume"))
    (out / "sub").mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(moekd.MoekdError, match=r"^--out .*run: holds files moekd did not write \(keep.txt, sub\)"):
        moekd.main(tiny_args(out, "--overwrite"))
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 3
    monkeypatch.chdir(out)  # --out . is the working directory, foreign files and all
    with pytest.raises(moekd.MoekdError, match=r"^--out \.: holds files moekd did not write"):
        moekd.main(tiny_args(".", "--overwrite"))
    theirs = tmp_path / "theirs"  # moekd's names, but no run marker
    (theirs / "checkpoints").mkdir(parents=True)
    with pytest.raises(moekd.MoekdError, match="has no run.json, not a moekd output folder"):
        moekd.main(tiny_args(theirs, "--overwrite"))
    mine = tmp_path / "mine"  # what a killed moekd run leaves is replaced
    (mine / ".tmp-final-x1y2z3_4").mkdir(parents=True)
    (mine / "run.json").write_text(json.dumps({**moekd.dataclasses.asdict(moekd.Config()), "world_size": 1}))
    (mine / "log.txt").write_text("step 1")
    moekd.main(tiny_args(mine, "--overwrite", "--max-steps", "1", "--no-dev-eval"))
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "checkpoints", "final", "log.txt", "metrics.json",
                                                      "run.json"]
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "eval.json").write_text("{}")
    (ev / "notes.md").write_text("mine")
    with pytest.raises(moekd.MoekdError, match=r"holds files moekd did not write \(notes.md\)"):
        moe_eval.main(eval_args(tmp_path, "--overwrite", name="ev"))
    assert (ev / "notes.md").exists()


@pytest.mark.parametrize("extra,pattern", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: not a local directory"),
    (["--model", "some-org/not-a-model"], "not loadable from the hub"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data: no such file or folder"),
    (["--data", moekd.DOLLY_HUB], "--data databricks/databricks-dolly-15k: could not load from the hub"),
    (["--data", "/tmp"], "--data /tmp: folder has no train.jsonl"),
    (["--dev-data", "/nonexistent/dev.jsonl"], "--dev-data /nonexistent/dev.jsonl: no such file"),
    (["--method", "ka", "--teacher", str(STUDENT)], "--method ka needs an MoE teacher"),
    (["--max-prompt-len", "300", "--max-len", "200"], "--max-prompt-len"),
    (["--batch-size", "0"], "--batch-size must be >= 1 and finite, got 0"),
    (["--lr", "-1"], "--lr must be > 0 and finite, got -1.0"),
    (["--lr", "nan"], "--lr must be > 0 and finite, got nan"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--weight-decay", "inf"], "--weight-decay must be >= 0 and finite, got inf"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--ka-m", "3"], r"^--method sft does not use --ka-m \(ka/ka-gold only\)$"),
    (["--teacher-k", "2", "--gen-batch-size", "4"], r"does not use --teacher-k \(kd/gkd only\), --gen-batch-size"),
    (["--method", "gkd", "--router-lr", "1e-3"], r"^--method gkd does not use --router-lr \(sar only\)$"),
])
def test_bad_input_fails_before_any_work(tmp_path, extra, pattern):
    out = tmp_path / "run"
    with pytest.raises(moekd.MoekdError, match=pattern):
        moekd.main(tiny_args(out, *extra))
    assert not out.exists()


@pytest.mark.parametrize("content,pattern", [
    (b'{"instruction": "a", "response": "b"}\n{"instruction": "\xff", "response": "b"}\n', r"data.jsonl:2: not UTF-8"),
    (b'{"instruction": null, "response": "b"}\n', r"data.jsonl:1: field 'instruction' must be a string, got null"),
    (b'{"instruction": "a", "context": 3, "response": "b"}\n', r"data.jsonl:1: field 'context' must be a string"),
])
def test_bad_data_names_file_line_and_field(tmp_path, content, pattern):
    (tmp_path / "data.jsonl").write_bytes(content)
    with pytest.raises(moekd.MoekdError, match=pattern):
        moekd.main(tiny_args(tmp_path / "run", "--data", str(tmp_path / "data.jsonl")))
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    d = write_model_dir(tmp_path / "m", {**TINY_CFG, "vocab_size": 100})
    pattern = r"^--model: the tokenizer has \d+ tokens, more than the model's vocabulary of 100$"
    with pytest.raises(moekd.MoekdError, match=pattern):
        moekd.main(tiny_args(tmp_path / "run", "--model", str(d)))
    with pytest.raises(moekd.MoekdError, match=pattern):
        moe_eval.main(eval_args(tmp_path, "--model", str(d), "--sets", "vicuna"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "ev").exists()


def test_empty_responses_are_counted_and_dropped(tokenizer, capsys):
    rows = [{"prompt": "p", "responses": [r]} for r in ("a b", " \n", "", "c")]
    items = moekd.tokenize_examples(tokenizer, rows, moekd.Config(), name="t")
    assert [it["responses"] for it in items] == [["a b"], ["c"]]
    assert "data t: 2 examples kept, 0 dropped with prompts over 256 tokens, 2 dropped with empty responses" \
        in capsys.readouterr().out


def test_model_needing_remote_code_is_refused_without_running_it(tmp_path):
    """auto_map in config.json: one-line error even with `y` on stdin, the planted module never imported."""
    d = write_model_dir(tmp_path / "evil", {**json.loads((STUDENT / "config.json").read_text()),
                                            "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                         "AutoModelForCausalLM": "evil.EvilModel"}})
    marker = tmp_path / "imported"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.run([sys.executable, str(ROOT / "moekd.py"), "--tiny", "--model", str(d), "--out",
                           str(tmp_path / "run")], input="y\ny\n", capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: --model {d}: config.json has an auto_map, the model needs "
                                                f"remote code, which moekd never runs"]
    with pytest.raises(moekd.MoekdError, match="needs remote code"):
        moe_eval.main(eval_args(tmp_path, "--model", str(d), "--sets", "vicuna"))
    assert not marker.exists() and not (tmp_path / "run").exists()


class Planted:  # not a tensor: the weights-only unpickler refuses it
    pass


def test_pickled_weights_are_refused_with_safetensors_advice(tmp_path):
    d = write_model_dir(tmp_path / "m", TINY_CFG | {"moekd_init_seed": None})
    torch.save({"model.embed_tokens.weight": Planted()}, d / "pytorch_model.bin")
    with pytest.raises(moekd.MoekdError, match=r"pytorch_model.bin: refused, it pickles objects other than tensors; "
                                               r"convert it to safetensors$") as e:
        moekd.load_model(str(d))
    assert "weights_only" not in str(e.value)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(moekd.MoekdError, match=r"^step (\d+): the (loss|gradient norm) is nan") as e:
        moekd.main(run_args(out, "sft", "--lr", "1e6", "--synthetic-train", "40", "--max-steps", "10", "--save-every", "1"))
    step = int(re.match(r"step (\d+)", str(e.value)).group(1))
    assert str(e.value).endswith(f"its last good checkpoint is {out / 'checkpoints' / f'step-{step - 1}'} "
                                 f"(continue with --resume)")
    assert 1 < step < 10 and not (out / "final").exists() and not (out / "metrics.json").exists()
    weights = load_file(out / "checkpoints" / f"step-{step - 1}" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    with pytest.raises(moekd.MoekdError, match="non-finite"):
        moekd.write_json(tmp_path / "m.json", {"loss": math.nan})
    assert not (tmp_path / "m.json").exists()


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import errno
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []
    def save_file(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    with pytest.raises(moekd.MoekdError, match=r"^no space left on device writing .*checkpoints/step-2; the run stopped, "
                                               r"its last good checkpoint is .*checkpoints/step-1 \(continue"):
        moekd.main(tiny_args(out, "--max-steps", "3", "--save-every", "1", "--no-dev-eval"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-1"]
    assert moekd.is_moe(moekd.load_model(str(out / "checkpoints" / "step-1")))


def test_outputs_keep_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        moekd.main(run_args(tmp_path / "run", "sft", "--max-steps", "1"))
    finally:
        os.umask(old)
    paths = [tmp_path / "run", *(tmp_path / "run").rglob("*")]
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_dir()} == {"0o775"}
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()} == {"0o664"}


def test_vocabulary_mismatch(tmp_path):
    """Heads that differ by padding rows past one tokenizer distill (as Qwen2.5's 152064 vs 151936 rows);
    another tokenizer is a one-line error naming both."""
    d = write_model_dir(tmp_path / "t", {**TINY_CFG, "vocab_size": 2041})
    assert moekd.main(tiny_args(tmp_path / "run", "--method", "kd", "--teacher", str(d), "--model", str(STUDENT),
                                "--max-steps", "1", "--no-dev-eval"))["finished"]
    d = write_model_dir(tmp_path / "sp", {**TINY_CFG, "vocab_size": 2041}, tokenizer_dir=SP)
    with pytest.raises(moekd.MoekdError, match=r"--teacher tokenizer .*sp \(\d+ tokens\) differs from --model tokenizer .*student"):
        moekd.main(tiny_args(tmp_path / "run2", "--method", "kd", "--teacher", str(d), "--model", str(STUDENT)))


def test_missing_llama_moe_field_via_main(tmp_path):
    d = write_model_dir(tmp_path / "m", {k: v for k, v in TINY_CFG.items() if k != "num_selects"})
    with pytest.raises(moekd.MoekdError, match=r"config.json: Llama-MoE config is missing required field\(s\) num_selects"):
        moekd.main(tiny_args(tmp_path / "run", "--model", str(d)))


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "moekd.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --out {out}: exists and is not empty; pass --resume or --overwrite"]


def test_help_lists_every_flag_with_defaults():
    proc = subprocess.run([sys.executable, str(ROOT / "moekd.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for f in moekd.dataclasses.fields(moekd.Config):
        assert "--" + f.name.replace("_", "-") in proc.stdout
    assert "sft,kd,gkd,all,ka,sar" in proc.stdout.replace(" ", "").replace("{", ",").replace("}", ",")


# ----------------------------------------------------------------------------
# Distillation losses: direction, exactness, gradients, masking

def naive_kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per row, one row at a time, in float64."""
    out = []
    for a, b in zip(p_logits.reshape(-1, p_logits.shape[-1]).double(), q_logits.reshape(-1, q_logits.shape[-1]).double()):
        pa, pb = a.softmax(-1), b.softmax(-1)
        out.append(sum(float(pa[v] * (pa[v].log() - pb[v].log())) for v in range(len(pa)) if pa[v] > 0))
    return torch.tensor(out, dtype=torch.float32).view(p_logits.shape[:-1])


def dense_kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per position, the textbook formula on whole tensors in float64."""
    lp, lq = p_logits.detach().double().log_softmax(-1), q_logits.detach().double().log_softmax(-1)
    return torch.where(lp.exp() > 0, lp.exp() * (lp - lq), 0.0).sum(-1).float()


logit_pairs = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 9), st.integers(0, 10_000)).map(
    lambda s: (torch.randn(*s[:3], generator=torch.Generator().manual_seed(s[3])) * 4,
               torch.randn(*s[:3], generator=torch.Generator().manual_seed(s[3] + 1)) * 4,
               torch.rand(*s[:2], generator=torch.Generator().manual_seed(s[3] + 2)) > 0.3))


@given(logit_pairs)
@settings(max_examples=25, deadline=None)
def test_kl_properties(pair):
    s, t, mask = pair
    rkl = moekd.reverse_kl(s, t, mask)
    assert rkl >= 0
    assert moekd.reverse_kl(s, s, mask) == 0
    assert_close(rkl, moekd.forward_kl(t, s, mask))  # reverse_kl(s, t) == forward_kl(t, s)
    n = mask.sum().clamp_min(1)
    assert_close(rkl, (naive_kl(s, t) * mask).sum() / n)              # KL(q_student || p_teacher)
    assert_close(moekd.forward_kl(s, t, mask), (naive_kl(t, s) * mask).sum() / n)
    # F.kl_div(input, target) = KL(target || input): reverse KL is kl_div(input=log p_teacher, target=q_student)
    per_tok = F.kl_div(t.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert_close(rkl, (per_tok * mask).sum() / n)
    garbage = torch.where(mask.unsqueeze(-1), s, torch.full_like(s, float("nan")))
    assert_close(moekd.reverse_kl(garbage, t, mask), rkl)  # masked positions change nothing


def test_kl_edge_cases():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert moekd.reverse_kl(s, t, none) == 0 and not torch.isnan(moekd.forward_kl(s, t, none))
    # -inf student logits: 0 log 0 = 0, no NaN; hand-computed: q = [1/2, 1/2, 0], p uniform over 3
    s = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    t = torch.zeros(1, 1, 3)
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert_close(moekd.reverse_kl(s, t, mask), torch.tensor(math.log(3 / 2)))
    s.requires_grad_(True)
    moekd.reverse_kl(s, t, mask).backward()
    assert not torch.isnan(s.grad).any()


def test_kl_gradients_match_autograd_of_the_formula():
    a = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    weights = torch.randn(2, 4, dtype=torch.float64)
    (moekd.kl_per_token(a, b, mask, chunk=3) * weights).sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    pa = a.softmax(-1)
    ref = (pa * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1)
    (ref * mask * weights).sum().backward()
    assert_close(ga, a.grad)
    assert_close(gb, b.grad)


def test_kl_chunking_does_not_change_values():
    a, b, mask = torch.randn(3, 5, 11), torch.randn(3, 5, 11), torch.rand(3, 5) > 0.2
    assert_close(moekd.kl_per_token(a, b, mask, chunk=1), moekd.kl_per_token(a, b, mask, chunk=4096))


# ----------------------------------------------------------------------------
# Losses from hidden states: equal to the logits formulas above, values and gradients

def head_logits_naive(h, head, vocab):
    """The naive head: scale, soft cap, the first `vocab` rows."""
    z = F.linear(h, head.weight, head.bias)[..., :vocab] * head.scale
    return z if head.cap is None else head.cap * torch.tanh(z / head.cap)


hidden_cases = st.tuples(st.integers(1, 2), st.integers(2, 5), st.integers(2, 6), st.integers(3, 9), st.integers(1, 4),
                         st.booleans(), st.sampled_from([None, 2.5, "-inf"]), st.integers(0, 10_000))


@given(hidden_cases)
@settings(max_examples=30, deadline=None)
def test_losses_from_hidden_states_equal_the_logits_formulas(case):
    """head_losses (chunked, gradients in the forward) = reverse_kl / forward_kl / CE on the full logits, to 1e-5 in
    fp32: values and gradients for student hidden states, head weight and bias, teacher hidden states (what carries
    SAR's gradient to the routers) and head; masked rows (NaN there), M = 1..4 passes, heads with padding rows past
    the vocabulary, soft-capped and scaled logits, -inf logits (a -inf bias on one token of both heads)."""
    B, T, H, V, M, reverse, cap, seed = case
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    leaf = lambda *shape: (torch.randn(*shape, generator=g) * 2).requires_grad_()  # noqa: E731
    hs, ht, ws, wt, bs, bt = leaf(B, T, H), leaf(M, B, T, H + 1), leaf(V + 2, H), leaf(V + 1, H + 1), leaf(V + 2), leaf(V + 1)
    if cap == "-inf":
        with torch.no_grad():
            bs[V - 1] = bt[V - 1] = float("-inf")
    head_s = moekd.Head(ws, bs, 0.7, None if cap == "-inf" else cap)
    head_t = moekd.Head(wt, bt, 1.3, None if cap == "-inf" else cap)
    labels = torch.randint(0, V - 1, (B, T), generator=g)
    n = mask.sum()
    rows = lambda x: torch.where(mask.unsqueeze(-1), x, float("nan"))[..., mask, :]  # noqa: E731
    loss, sums = moekd.head_losses(rows(hs), head_s, labels[mask], rows(ht), head_t, ce_weight=0.3, kl_weight=0.6,
                                   reverse=reverse, vocab=V, chunk_mb=3 * 4 * V * M / 2**20)  # 3-row chunks
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
    # KA's frozen teacher: its M passes one at a time (rows chunked without the / M), the same sums and student
    # gradients
    frozen = moekd.Head(wt.detach(), bt.detach(), 1.3, head_t.cap)
    loss, sums = moekd.head_losses(rows(hs), head_s, labels[mask], rows(ht).detach(), frozen, ce_weight=0.3,
                                   kl_weight=0.6, reverse=reverse, vocab=V, chunk_mb=3 * 4 * V / 2**20)
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
    head_s, head_t = moekd.Head(ws, bs, 0.7, 3.0), moekd.Head(wt, bt, 1.3, 3.0)
    params = [hs, ws, bs] + ([ht, wt, bt] if teacher_grad else [])
    hand, _ = moekd.head_losses(hs, head_s, None, ht, head_t, kl_weight=1.0, chunk_mb=2 * 4 * V * M / 2**20)
    generic = hidden_losses.chunked_loss(hidden_losses.reverse_kl_rows, hs, head_s, ht, head_t,
                                         chunk_mb=2 * 4 * V * (2 * M + 2) / 2**20)
    assert abs(float(hand.detach()) - float(generic.detach())) <= 1e-6 * float(hand.detach())
    for a, b in zip(torch.autograd.grad(hand * 1.3, params), torch.autograd.grad(generic * 1.3, params)):
        assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_jsd_rows_is_the_generalised_jensen_shannon_divergence_by_hand():
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, in float64 term by term; 0 at q = p,
    symmetric at beta 0.5, a -inf logit on one side gives a finite value and finite gradients."""
    q = torch.tensor([[0.0, 1.0, -2.0, float("-inf")]], dtype=torch.float64).log_softmax(-1).requires_grad_()
    p = torch.tensor([[[1.0, -1.0, 0.5, 2.0]]], dtype=torch.float64).log_softmax(-1)
    for beta in (0.5, 0.1):
        qq, pp = q[0].exp().tolist(), p[0, 0].exp().tolist()
        m = [beta * a + (1 - beta) * b for a, b in zip(pp, qq)]
        by_hand = sum(beta * a * math.log(a / c) for a, c in zip(pp, m) if a > 0) + \
            sum((1 - beta) * b * math.log(b / c) for b, c in zip(qq, m) if b > 0)
        assert abs(float(hidden_losses.jsd_rows(q, p, beta)[0]) - by_hand) < 1e-12
    assert abs(float(hidden_losses.jsd_rows(p[0], p)[0])) < 1e-15
    assert abs(float(hidden_losses.jsd_rows(q, p)[0]) - float(hidden_losses.jsd_rows(p[0], q.unsqueeze(0))[0])) < 1e-12
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


def tiny_family(family: str, **extra):
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig
    common = dict(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    config = {"gemma2": lambda: Gemma2Config(final_logit_softcapping=3.0, **common),  # tied, soft-capped
              "cohere": lambda: CohereConfig(logit_scale=0.5, **common),               # tied, scaled
              "granite": lambda: GraniteConfig(logits_scaling=4.0, **common),          # scaled (divided)
              "llama-tied": lambda: LlamaConfig(tie_word_embeddings=True, **common)}[family]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "llama-tied"])
def test_families_with_logit_scaling_softcapping_and_tied_embeddings(family):
    """sft's CE from hidden states equals CE on the family's own logits (scaled, soft-capped), gradients included
    (a tied embedding gets both its input and its head gradient); check_head accepts the family."""
    model = tiny_family(family)
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
    model = tiny_family("llama-tied")
    head = model.get_output_embeddings()
    head.forward = lambda x: F.linear(x, head.weight) * 2  # a family that doubles its logits
    with pytest.raises(moekd.MoekdError, match="--teacher: LlamaForCausalLM turns its last hidden state into logits"):
        moekd.check_head(model, "--teacher")


# ----------------------------------------------------------------------------
# Routing control

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
    """Off-top-k fraction = lambda * P(a drawn set differs from the top set), the latter measured at lambda = 1."""
    logits = torch.randn(40_000, 8, generator=torch.Generator().manual_seed(0)) * 2
    top = moekd.select_experts(logits, moekd.Routing("topk", k=7), 2)[0].sort(-1).values

    def off(lam, seed):
        routing = moekd.Routing("sample", k=7, prob=lam, generator=torch.Generator().manual_seed(seed))
        return (moekd.select_experts(logits, routing, 2)[0].sort(-1).values != top).any(-1).float().mean().item()

    differs = off(1.0, 1)
    assert 0.3 < differs < 0.95
    for lam in (0.05, 0.3):
        expected = lam * differs
        assert abs(off(lam, 2) - expected) < 4 * math.sqrt(expected * (1 - expected) / 40_000) + 1e-3, lam


def ids_batch():
    return torch.tensor([[1, 5, 9, 13, 400, 7], [1, 44, 2000, 3, 3, 81]])


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
    model = moekd.load_model(str(hf_moe(tmp_path, "qwen2_moe")))
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
    hook = teacher.model.layers[0].mlp.calculator.register_forward_hook(lambda m, args, out: captured.append(args))
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
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)  # weight_noise via the noise std
    assert all(p.grad is None for p in teacher.parameters() if not any(p is r for r in routers))


def hf_moe(tmp_path, family: str, seed: int = 0) -> Path:
    """A tiny transformers-5 MoE checkpoint with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
    common = dict(vocab_size=2039, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=1, num_experts_per_tok=2, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    config = {
        "mixtral": lambda: MixtralConfig(num_local_experts=5, intermediate_size=37, **common),
        "qwen3_moe": lambda: Qwen3MoeConfig(num_experts=5, moe_intermediate_size=19, intermediate_size=37,
                                            norm_topk_prob=False, **common),
        "qwen2_moe": lambda: Qwen2MoeConfig(num_experts=5, moe_intermediate_size=19, intermediate_size=37,
                                            shared_expert_intermediate_size=23, **common),
        "olmoe": lambda: OlmoeConfig(num_experts=5, intermediate_size=19, **common),
    }[family]()
    torch.manual_seed(seed)
    path = tmp_path / family
    if not path.exists():
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINY / name, path / name)
    return path


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_hf_routing_modes(tmp_path, family):
    model = moekd.load_model(str(hf_moe(tmp_path, family)))
    with torch.no_grad():
        native = model(ids_batch()).logits
        with moekd.moe_routing(model, "topk"):
            assert torch.equal(model(ids_batch()).logits, native)
        with moekd.moe_routing(model, "sample", prob=0.0, generator=torch.Generator().manual_seed(0)):
            assert torch.equal(model(ids_batch()).logits, native)  # lambda = 0 is the native top-k path
        with moekd.moe_routing(model, "all", mass="literal") as routers:  # native mass: test_routing_values.py
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
    assert len(moekd.router_parameters(model)) == 2 and moekd.native_top_k(model) == 2 and moekd.num_experts(model) == 5


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
    expected = sum(moekd.kl_per_token(student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                      looped_logits[m * 4:(m + 1) * 4], mask).sum() for m in range(3)) / 30.0
    assert_close(parts["rkl"], expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------
# On-policy data, method steps, SAR, every method end to end

class StubStudent(torch.nn.Module):
    """Returns canned continuations from generate(), so masking is tested without a real model."""

    def __init__(self, continuations, eos):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuations, self.eos, self.seen = continuations, eos, None

    def generate(self, input_ids, attention_mask, generation_config):
        self.seen = (input_ids.clone(), attention_mask.clone(), generation_config)
        width = max(len(c) for c in self.continuations)
        rows = [input_ids[i].tolist() + c + [self.eos] * (width - len(c)) for i, c in enumerate(self.continuations)]
        return torch.tensor(rows)


def test_generate_on_policy_masks_prompt_and_keeps_first_eos(tokenizer):
    eos = tokenizer.eos_token_id
    stub = StubStudent([[5, 6, eos, 9], [7, 8, 9, 4]], eos)  # the second never stops
    cfg = moekd.Config(max_prompt_len=4, max_len=8, gen_batch_size=16)
    items = moekd.generate_on_policy(stub, [{"prompt_ids": [10, 11]}, {"prompt_ids": [12]}], tokenizer, cfg)
    assert items[0] == {"input_ids": [10, 11, 5, 6, eos], "labels": [-100, -100, 5, 6, eos]}
    assert items[1] == {"input_ids": [12, 7, 8, 9, eos], "labels": [-100, 7, 8, 9, eos]}  # last forced to EOS
    ids, attn, gen = stub.seen
    assert ids.tolist() == [[10, 11], [eos, 12]] and attn.tolist() == [[1, 1], [0, 1]]  # left-padded prompts
    assert (gen.do_sample, gen.top_k, gen.top_p, gen.temperature, gen.max_new_tokens) == (True, 0, 1.0, 1.0, 4)
    batch = moekd.collate(items, eos)
    assert moekd.loss_mask(batch["labels"]).tolist() == [[False, True, True, True, False], [True, True, True, True, False]]


def saved_with_generation_config(tmp_path, tokenizer, **settings) -> Path:
    """The tiny student saved as a real checkpoint whose generation_config.json carries `settings`."""
    model = moekd.load_model(str(STUDENT))
    for key, value in settings.items():
        setattr(model.generation_config, key, value)
    checkpoints.save_model(model, tokenizer, tmp_path / "ckpt")
    loaded = moekd.load_model(str(tmp_path / "ckpt"))
    assert all(getattr(loaded.generation_config, k) == v for k, v in settings.items())  # the premise
    return tmp_path / "ckpt"


@pytest.mark.parametrize("field", ["repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "bad_words_ids",
                                   "suppress_tokens", "forced_eos_token_id", "temperature"])
def test_sampling_ignores_the_checkpoints_generation_config(tmp_path, tokenizer, field):
    """A checkpoint's own decoding settings must not reach moekd's sampling: the samples are those of the
    same weights without them, on the seeded (on-policy) and the global-RNG (dev/eval) paths. Each setting
    is chosen so that it would change these samples (e.g. it bans a token the plain model draws)."""
    plain = moekd.load_model(str(STUDENT))
    prompts = [tokenizer.encode(data.format_prompt("Add the two numbers.", "3 and 4"), add_special_tokens=False),
               tokenizer.encode("Q: hi\n", add_special_tokens=False)]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=16, batch_size=2)
    first = moekd.sample_tokens(plain, prompts, seeds=[11, 12], **kw)[0]
    kw["eos_id"] = first[0]  # row 0 stops at once, unless a minimum length forbids it
    settings = {"repetition_penalty": {"repetition_penalty": 5.0}, "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
                "min_new_tokens": {"min_new_tokens": 10}, "bad_words_ids": {"bad_words_ids": [[t] for t in first[:3]]},
                "suppress_tokens": {"suppress_tokens": first[:3]}, "forced_eos_token_id": {"forced_eos_token_id": 2},
                "temperature": {"temperature": 0.3, "do_sample": True}}[field]
    ckpt = moekd.load_model(str(saved_with_generation_config(tmp_path, tokenizer, **settings)))
    for model in (plain, ckpt):
        model.seeded = moekd.sample_tokens(model, prompts, seeds=[11, 12], **kw)
        torch.manual_seed(3)
        model.global_rng = moekd.sample_tokens(model, prompts, **kw)
    assert ckpt.seeded == plain.seeded and ckpt.global_rng == plain.global_rng
    assert ckpt.generation_config.to_dict() == moekd.load_model(str(tmp_path / "ckpt")).generation_config.to_dict()


def test_eval_no_repeat_ngram_size_reaches_generate(tmp_path, tokenizer):
    """eval.py's own setting (the paper's no_repeat_ngram_size 6) still applies, and only it: a checkpoint's
    repetition penalty does not."""
    import eval as moe_eval
    model = moekd.load_model(str(saved_with_generation_config(tmp_path, tokenizer, repetition_penalty=5.0)))
    seen = []
    generate = model.generate
    model.generate = lambda *a, **kw: seen.append(kw["generation_config"]) or generate(*a, **kw)
    args = moe_eval.parse_args(["--model", "x", "--max-new-tokens", "8"])
    args.amp_dtype = torch.float32
    moe_eval.generate(model, tokenizer, [{"prompt": "Q: hi\n"}], 10, args, desc="t")
    assert seen[0].no_repeat_ngram_size == 6 and seen[0].repetition_penalty in (None, 1.0)
    # and the option has its effect: no token repeats with n = 1, repeats without it
    prompts = [tokenizer.encode("Q: hi\n", add_special_tokens=False)] * 4
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=-1, max_new_tokens=60, batch_size=4, seeds=[1, 2, 3, 4],
              sampler="generate")
    free, blocked = (moekd.sample_tokens(model, prompts, **kw, **opt) for opt in ({}, {"no_repeat_ngram_size": 1}))
    assert any(len(set(r)) < len(r) for r in free) and all(len(set(r)) == len(r) for r in blocked)


def test_response_through_eos():
    assert moekd.response_through_eos([4, 2, 2, 7], 2) == [4, 2]
    assert moekd.response_through_eos([2, 5], 2) == [2]
    assert moekd.response_through_eos([4, 5, 6], 2) == [4, 5, 2]


def training_setup(method, *, teacher=TINY, student=STUDENT, **overrides):
    cfg = moekd.Config(method=method, model=str(student), teacher=str(teacher), max_prompt_len=96, max_len=128,
                       **overrides)
    tok = moekd.load_tokenizer(str(student))
    model = moekd.load_model(str(student))
    t = moekd.setup_teacher(cfg, model, tok, torch.float32)
    examples = [data.to_example(r, where="t") for r in synthetic.synthetic_rows(16, seed=4)]
    return cfg, model, t, tok, moekd.tokenize_examples(tok, examples, cfg, name="t")


def one_step(cfg, model, teacher, tok, rows, lr=1e-3, seed=0, sgd=False):
    optimizer = (torch.optim.SGD(model.parameters(), lr=lr) if sgd
                 else torch.optim.AdamW(moekd.param_groups(model, cfg.weight_decay), lr=lr))
    extras = moekd.method_state(cfg, teacher, torch.float32)
    torch.manual_seed(seed)
    logs = moekd.train_step(cfg, model, teacher, tok, rows, optimizer, lr, extras)
    return logs, optimizer


class FixedLogits(torch.nn.Module):
    """A 'model' whose final hidden states are a fixed table [1, T, V] (a parameter, so gradients can be read)
    and whose output head is the identity: its logits are the table."""

    def __init__(self, table):
        super().__init__()
        from types import SimpleNamespace
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))
        self.head = torch.nn.Linear(self.table.shape[-1], self.table.shape[-1], bias=False)
        self.head.weight.data = torch.eye(self.table.shape[-1])
        self.head.requires_grad_(False)
        self.config = SimpleNamespace()

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask, **kw):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.head(self.table.expand(input_ids.shape[0], -1, -1)))


def test_kd_step_is_forward_kl_with_the_teacher_as_target():
    """Hand-computed: at the one loss position p_teacher = (.7, .2, .1), q_student = (.2, .5, .3).
    KL(p || q) = .7 ln 3.5 + .2 ln .4 + .1 ln(1/3) = 0.58381; the reverse KL(q || p) would be 0.53718.
    d KL(p || q) / d student logits = q - p."""
    teacher = FixedLogits(torch.tensor([[0.7, 0.2, 0.1], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]).log().unsqueeze(0))
    student = FixedLogits(torch.tensor([[0.2, 0.5, 0.3], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]).log().unsqueeze(0))
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 1, -100]])}  # position 0 predicts the one response token
    cfg = moekd.Config(method="kd", kd_ratio=1.0)  # the loss is the KL alone
    parts = moekd.kd_step(student, teacher, batch, cfg, norm=2.0, n_micro=1)
    assert abs(parts["fkl"].item() - 0.58381 / 2) < 1e-4 and parts["loss"].item() == parts["fkl"].item()
    parts["loss"].backward()
    assert_close(student.table.grad[0, 0], torch.tensor([0.2 - 0.7, 0.5 - 0.2, 0.3 - 0.1]) / 2)
    assert teacher.table.grad is None


def naive_router_kl(cfg, model, teacher, rows, *, swap: bool) -> float:
    """SAR's router loss recomputed from its definition: teacher in train mode (gate noise from the same
    stream), all experts, against the student in eval mode; KL(p_teacher || q_student) (swap: reversed)."""
    batch = moekd.collate(rows, 2)
    mask = moekd.loss_mask(batch["labels"])
    with torch.no_grad():
        q = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.manual_seed(moekd.stream_seed(cfg.seed, 0, 0, "router"))
        teacher.train()
        with moekd.moe_routing(teacher, "all"):
            p = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher.eval()
    kl = dense_kl(q, p) if swap else dense_kl(p, q)
    return (kl * mask).sum().item() / mask.sum().item()


@pytest.mark.parametrize("direction", ["teacher-student", "student-teacher"])
def test_sar_router_loss_direction(direction):
    cfg, model, teacher, tok, rows = training_setup("sar", batch_size=4, sar_kl=direction)
    rows = rows[:4]
    with torch.no_grad():  # a peaked student, so that the two directions differ clearly
        model.get_output_embeddings().weight.mul_(30)
    micro = [moekd.collate(rows, tok.pad_token_id)]
    norms = moekd.loss_norms(micro, "global")
    expected = naive_router_kl(cfg, model, teacher, rows, swap=direction == "student-teacher")
    other = naive_router_kl(cfg, model, teacher, rows, swap=direction == "teacher-student")
    logs = moekd.sar_router_update(model, teacher, micro, norms, cfg, moekd.method_state(cfg, teacher, torch.float32))
    assert abs(logs["router_kl"] - expected) < 1e-4 * expected and abs(expected - other) > 0.1 * expected


def test_ka_gold_is_the_mean_of_m_forward_kls():
    """ka-gold: KD's loss with the KL term averaged over M teacher passes, each with its own expert draws
    (lambda 1: always the sampled set), equal to M separate teacher forwards with the same draws."""
    cfg, model, teacher, tok, rows = training_setup("ka-gold", batch_size=4, ka_m=3, ka_lambda=1.0)
    batch = moekd.collate(rows[:4], tok.pad_token_id)
    extras = moekd.method_state(cfg, teacher, torch.float32)
    extras.generator.manual_seed(5)
    parts = moekd.kd_step(model, teacher, batch, cfg, norm=10.0, n_micro=1, state=extras)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad(), moekd.moe_routing(teacher, "sample", k=6, prob=1.0, generator=g):
        rep = {k: v.repeat(3, 1) for k, v in batch.items()}
        t = teacher(input_ids=rep["input_ids"], attention_mask=rep["attention_mask"]).logits.view(3, 4, *batch["labels"].shape[1:], -1)
    s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = moekd.loss_mask(batch["labels"])
    expected = sum((dense_kl(t[m], s) * mask).sum() for m in range(3)) / 3 / 10.0
    assert_close(parts["fkl"], expected)
    assert not torch.equal(t[0], t[1])  # the passes did draw different experts
    targets = batch["labels"].roll(-1, 1)
    ce = F.cross_entropy(s[mask], targets[mask], reduction="sum") / 10.0
    assert_close(parts["loss"], 0.5 * ce + 0.5 * expected)


def test_teacher_top_p_routes_the_kd_teacher(monkeypatch):
    seen = []
    monkeypatch.setattr(moekd, "moe_routing", lambda model, mode, **kw: seen.append((mode, kw)) or moekd.contextlib.nullcontext())
    moekd.teacher_routing(None, moekd.Config(method="kd", teacher_top_p=0.6), None)
    moekd.teacher_routing(None, moekd.Config(method="kd", teacher_top_p=0.6, routed_mass="literal"), None)
    assert seen == [("topp", {"top_p": 0.6, "mass": "native"}), ("topp", {"top_p": 0.6, "mass": "literal"})]
    with pytest.raises(moekd.MoekdError, match="--teacher-top-p"):
        moekd.Config(method="kd", teacher_top_p=0.6, teacher_k=2)


def test_select_defaults_follow_the_official_scripts():
    assert [moekd.Config(method=m).select for m in moekd.METHODS] == \
        ["best", "best", "last", "last", "last", "last", "best"]
    assert moekd.Config(method="sft", dev_eval=False).select == "last"
    with pytest.raises(moekd.MoekdError, match="--select best needs the dev evaluation"):
        moekd.Config(method="gkd", select="best", dev_eval=False)


@pytest.mark.parametrize("router_lr", [1e-2, 0.0])
def test_sar_step_changes_only_the_routers(router_lr):
    cfg, model, teacher, tok, rows = training_setup("sar", router_lr=router_lr, batch_size=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    logs, _ = one_step(cfg, model, teacher, tok, rows[:4])
    assert {"router_kl", "router_lb", "rkl"} <= set(logs) and not teacher.training
    after = teacher.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == (set(moekd.router_state_dict(teacher)) if router_lr else set())


def test_sar_student_learns_from_the_updated_teacher():
    students = []
    for router_lr in (0.0, 1e-1):
        cfg, model, teacher, tok, rows = training_setup("sar", router_lr=router_lr, batch_size=4)
        one_step(cfg, model, teacher, tok, rows[:4])
        students.append(model.state_dict())
    assert any(not torch.equal(students[0][k], students[1][k]) for k in students[0])


@pytest.mark.parametrize("method", ["kd", "gkd", "all", "ka"])
def test_accumulation_equivalence(method):
    """micro-batch 8 x 1 and 2 x 4 give the same update (loss normalised by the global token count)."""
    states = []
    for batch_size, accum in ((8, 1), (2, 4)):
        cfg, model, teacher, tok, rows = training_setup(method, batch_size=batch_size, grad_accum=accum, ka_lambda=0.0)
        one_step(cfg, model, teacher, tok, rows[:8], lr=1.0, sgd=True)  # the update is the (clipped) gradient
        states.append(model.state_dict())
    for k in states[0]:
        assert_close(states[0][k], states[1][k], atol=1e-6, rtol=1e-5)


def test_ka_updates_each_makes_m_updates():
    cfg, model, teacher, tok, rows = training_setup("ka", ka_m=3, ka_updates="each", batch_size=4)
    _, optimizer = one_step(cfg, model, teacher, tok, rows[:4])
    assert {int(s["step"]) for s in optimizer.state.values()} == {3}


def test_restart_epochs_repeat_the_first_order():
    items = list(range(12))
    on, off = moekd.Config(method="gkd", batch_size=4), moekd.Config(method="gkd", batch_size=4, restart_epochs=False)
    assert on.restart_epochs and not moekd.Config(method="sft").restart_epochs
    assert moekd.step_rows(items, on, 3, 3) == moekd.step_rows(items, on, 0, 3)
    assert moekd.step_rows(items, off, 3, 3) != moekd.step_rows(items, off, 0, 3)


@pytest.mark.parametrize("restart,steps", [("--restart-epochs", 2), ("--no-restart-epochs", 4)])
def test_restart_epochs_reset_the_optimizer(tmp_path, restart, steps):
    """Two epochs of two steps: with restarts AdamW's state starts over at the second epoch."""
    moekd.main(run_args(tmp_path / "run", "gkd", "--max-steps", "4", "--epochs", "2", "--synthetic-train", "8", restart))
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {steps}


def run_args(out, method, *extra):
    return ["--tiny", "--method", method, "--out", str(out), "--synthetic-train", "16", "--batch-size", "4",
            "--max-steps", "2", "--no-dev-eval", "--log-every", "1", *extra]


@pytest.mark.parametrize("family", ["llama_moe", "mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("method", ["kd", "gkd", "all", "ka", "sar"])
def test_every_method_runs_on_every_teacher_family(tmp_path, method, family):
    teacher = TINY if family == "llama_moe" else hf_moe(tmp_path, family)
    result = moekd.main(run_args(tmp_path / "run", method, "--teacher", str(teacher)))
    assert result["finished"] and result["step"] == 2
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    init = moekd.load_model(str(STUDENT)).state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init)
    if method == "sar":
        routers = load_file(tmp_path / "run" / "final" / moekd.ROUTERS_FILE)
        original = moekd.load_model(str(teacher)).state_dict()
        assert routers.keys() <= original.keys() and any(not torch.equal(routers[k], original[k]) for k in routers)


@pytest.mark.parametrize("method", moekd.METHODS)
def test_every_method_steps_in_bf16_on_cpu(tmp_path, method):
    """GPU runs are bf16 (autocast, fp32 master weights, fp32 SAR routers): dtype bugs must show up here. The
    first step's losses are those of the same step in fp32 within rel 2e-2."""
    result = moekd.main(run_args(tmp_path / "run", method, "--dtype", "bf16", "--max-steps", "1"))
    fp32 = moekd.main(run_args(tmp_path / "fp32", method, "--dtype", "fp32", "--max-steps", "1"))["history"][0]
    assert result["finished"] and all(math.isfinite(v) for h in result["history"] for v in h.values())
    losses = [k for k in fp32 if k in ("loss", "rkl", "fkl", "ce", "router_kl")]
    assert "loss" in losses and all(abs(result["history"][0][k] - fp32[k]) <= 2e-2 * abs(fp32[k]) for k in losses), \
        {k: (result["history"][0][k], fp32[k]) for k in losses}
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    init = moekd.load_model(str(STUDENT)).state_dict()
    assert all(trained[k].dtype == torch.float32 for k in trained) and any(not torch.equal(trained[k], init[k]) for k in init)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dtype"] == "bf16"


def test_routed_mass_is_recorded_and_an_older_run_resumes_literal(tmp_path, capsys):
    """run.json records --routed-mass (default native); a run.json written before the flag existed resumes with
    the rule it was trained with (literal), saying so in one line; asking it for native is a clear error."""
    out = tmp_path / "run"
    moekd.main(run_args(out, "all", "--save-every", "1", "--stop-after", "1"))
    saved = json.loads((out / "run.json").read_text())
    assert saved["routed_mass"] == "native" and moekd.parse_config(["--resume", "--out", str(out)]).routed_mass == "native"
    del saved["routed_mass"]
    (out / "run.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert moekd.parse_config(["--resume", "--out", str(out)]).routed_mass == "literal"
    line = [x for x in capsys.readouterr().out.splitlines() if "routed-mass" in x]
    assert line == ["resume: run.json predates --routed-mass, so the run goes on with the rule it was trained with "
                    "(--routed-mass literal)"]
    with pytest.raises(moekd.MoekdError, match=r"--routed-mass 'native' \(run: 'literal'\)"):
        moekd.parse_config(["--resume", "--out", str(out), "--routed-mass", "native"])
    with pytest.raises(SystemExit):
        moekd.parse_config(["--routed-mass", "loud"])


def test_ka_at_lambda_0_is_gkd_with_the_top_n_minus_1_experts(tmp_path):
    """KA's draws never taken (lambda 0): every pass routes the top-(N-1), so the first step's loss is gkd's with
    --teacher-k N-1 (N = 7 experts in the tiny teacher); at the default lambda it is not."""
    def first(method, *extra):
        out = tmp_path / "-".join([method, *extra]).replace("--", "")
        return moekd.main(run_args(out, method, "--max-steps", "1", *extra))["history"][0]["loss"]

    gkd = first("gkd", "--teacher-k", "6")
    assert abs(first("ka", "--ka-lambda", "0") - gkd) <= 1e-6 * gkd
    assert first("ka", "--ka-lambda", "1") != gkd and gkd != first("gkd")


def test_llama_like_tokenizer_end_to_end(tmp_path):
    """SFT of the student, then kd and gkd from it, all with the SentencePiece-style tokenizer's models."""
    common = ["--synthetic-train", "16", "--batch-size", "4", "--max-steps", "2", "--log-every", "1"]
    sft = moekd.main(["--tiny", "--model", str(SP / "student"), "--out", str(tmp_path / "sft"), "--synthetic-dev", "4",
                      "--dev-num", "2", *common])
    assert sft["model"] == str(tmp_path / "sft" / "best_rougeL")
    for method in ("kd", "gkd"):
        result = moekd.main(["--tiny", "--method", method, "--model", sft["model"], "--teacher", str(SP),
                             "--out", str(tmp_path / method), "--no-dev-eval", *common])
        assert result["finished"] and result["model"] == str(tmp_path / method / "final")
        assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result["history"])
        assert moekd.load_tokenizer(result["model"]).get_vocab() == moekd.load_tokenizer(str(SP)).get_vocab()


@pytest.mark.parametrize("student_family", ["llama_moe", "mixtral"])
@pytest.mark.parametrize("method", ["gkd", "sar"])
def test_moe_student_adds_its_own_balance_loss(tmp_path, method, student_family):
    student = TINY if student_family == "llama_moe" else hf_moe(tmp_path, student_family)
    result = moekd.main(run_args(tmp_path / "run", method, "--model", str(student)))
    assert all("lb" in h and h["lb"] > 0 for h in result["history"])


@pytest.mark.parametrize("method", ["sft", "ka", "sar"])
def test_resume_is_bit_identical_for_stateful_methods(tmp_path, method):
    args = ["--method", method, "--epochs", "1", "--synthetic-train", "32", "--batch-size", "4"]
    whole = moekd.main(tiny_args(tmp_path / "a", *args))
    moekd.main(tiny_args(tmp_path / "b", *args, "--stop-after", "3"))
    resumed = moekd.main(tiny_args(tmp_path / "b", *args, "--resume"))
    assert whole["history"] == resumed["history"]
    for name in ["model.safetensors"] + ([moekd.ROUTERS_FILE] if method == "sar" else []):
        a, b = load_file(tmp_path / "a" / "final" / name), load_file(tmp_path / "b" / "final" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_routers_reload(tmp_path):
    moekd.main(run_args(tmp_path / "run", "sar", "--router-lr", "1e-2"))
    saved = load_file(tmp_path / "run" / "final" / moekd.ROUTERS_FILE)
    teacher = moekd.load_model(str(TINY))
    moekd.load_routers(teacher, tmp_path / "run" / "final")
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in saved.items())
    result = moekd.main(run_args(tmp_path / "again", "gkd", "--teacher-routers", str(tmp_path / "run" / "final")))
    assert result["finished"]
    with pytest.raises(moekd.MoekdError, match="--teacher-routers .*: no such file"):
        moekd.main(run_args(tmp_path / "x", "gkd", "--teacher-routers", str(tmp_path / "nothing.safetensors")))


@pytest.mark.parametrize("extra,pattern", [
    (["--method", "kd", "--teacher", str(STUDENT), "--teacher-k", "2"], "--teacher-k needs an MoE teacher"),
    (["--method", "ka", "--ka-k", "9"], r"--ka-k 9 is outside \[1, 7\]"),
    (["--method", "gkd", "--teacher-k", "0"], r"--teacher-k 0 is outside"),
    (["--method", "ka", "--ka-lambda", "1.5"], "--ka-lambda and --kd-ratio must be in"),
])
def test_bad_distillation_flags(tmp_path, extra, pattern):
    with pytest.raises(moekd.MoekdError, match=pattern):
        moekd.main(run_args(tmp_path / "run", "gkd", *extra))
    assert not (tmp_path / "run").exists()


def test_method_flag_table_names_config_fields_and_methods():
    fields = {f.name for f in moekd.dataclasses.fields(moekd.Config)}
    assert set(moekd.METHOD_FLAGS) <= fields
    assert all(methods and set(methods) <= set(moekd.METHODS) for methods in moekd.METHOD_FLAGS.values())


# ----------------------------------------------------------------------------
# eval.py: ROUGE-L protocol and MoE analyses

import eval as moe_eval  # noqa: E402


@pytest.mark.parametrize("prediction,references,expected", [
    ("the cat sat on the mat", ["the cat sat on the mat"], 100.0),
    ("the cat sat", ["the cat sat on the mat"], 100 * 2 * 1.0 * 0.5 / 1.5),     # LCS 3: P = 1, R = 1/2
    ("on the mat the cat", ["the cat sat on the mat"], 100 * 2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6)),  # LCS 3
    ("Hello, World!", ["hello world"], 100.0),                                  # lower-cased, punctuation dropped
    ("running dogs", ["run dog"], 100.0),                                       # Porter stemming
    ("a b", ["x y", "a b c d"], 100 * 2 * 1.0 * 0.5 / 1.5),                       # max over references
    ("", ["anything at all"], 0.0),
])
def test_rouge_l_golden(prediction, references, expected):
    assert moekd.rouge_l(prediction, references) == pytest.approx(expected, abs=1e-9)


def test_rouge_l_non_ascii_does_not_crash():
    assert 0.0 <= moekd.rouge_l("café 東京 naïve", ["cafe naive Tokyo", "東京"]) <= 100.0


def test_eval_prompt_and_response_handling(tokenizer):
    ids = moe_eval.encode_prompts(tokenizer, ["word " * 100, "Hi"], 8)
    assert ids[0][0] == tokenizer.bos_token_id and len(ids[0]) == 8  # BOS added, first 8 tokens kept
    assert ids[1] == [tokenizer.bos_token_id] + tokenizer.encode("Hi", add_special_tokens=False)
    assert moe_eval.clean_response("  an answer <|endoftext|> junk") == "an answer"


def test_summary_and_table():
    s = moe_eval.summarize({"dolly": {10: 20.0, 20: 30.0}, "vicuna": {10: 10.0, 20: 10.0}, "uinst": None})
    assert s["sets"]["dolly"]["mean"] == 25.0 and s["sets"]["dolly"]["std"] == 5.0  # population std
    assert s["avg"] == 17.5 and s["missing"] == ["uinst"]
    table = moe_eval.markdown_table({"m": s}, ["dolly", "vicuna", "uinst"])
    assert table.splitlines()[0] == "| Model | Dolly | Vicuna | UnNI | Avg |"
    assert table.splitlines()[2] == "| m | 25.00 ± 5.00 | 10.00 ± 0.00 | missing | 17.50 |"


def test_activated_mass_and_router_kl_hand_computed():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    assert_close(moe_eval.activated_mass(probs), torch.tensor([0.55, 0.85, 1.0]))
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    kl, clamped = moe_eval.router_kl(p, q)
    assert_close(kl, torch.tensor([0.5 * math.log(2) + 0.5 * math.log(2 / 3)])) and clamped == 0


def eval_args(tmp_path, *extra, name="ev"):
    return ["--model", str(TINY), "--data-dir", str(SHARED), "--out", str(tmp_path / name), "--max-examples", "3",
            "--max-new-tokens", "12", "--seeds", "10", "--sets", ",".join(moe_eval.SETS), *extra]


@pytest.mark.skipif(not SHARED.exists(), reason=NEEDS_DATA)
def test_eval_writes_table_json_generations_and_lists_missing_sets(tmp_path):
    absent = tmp_path / "absent.jsonl"  # UnNI stays missing even where fetch_data.py got it
    result = moe_eval.main(eval_args(tmp_path, "--seeds", "10,20", "--sets", f"dolly,self-inst,vicuna,sinst,uinst={absent}"))
    out = tmp_path / "ev"
    assert (out / "table.md").read_text().splitlines()[0] == "| Model | Dolly | SelfInst | Vicuna | S-NI | UnNI | Avg |"
    data = json.loads((out / "results.json").read_text())
    assert set(data["sets"]) == {"dolly", "self-inst", "vicuna", "sinst"} and data["missing"] == ["uinst"]
    assert set(data["sets"]["dolly"]["scores"]) == {"10", "20"}
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 * 2 * 3 and {"prompt", "references", "response", "seed", "set"} <= set(gens[0])
    assert isinstance(gens[0]["references"], list)
    assert result["avg"] == pytest.approx(sum(s["mean"] for s in data["sets"].values()) / 4)


@pytest.mark.skipif(not SHARED.exists(), reason=NEEDS_DATA)
def test_eval_generation_is_deterministic_by_seed(tmp_path):
    def responses(name, seeds):
        moe_eval.main(eval_args(tmp_path, "--sets", "vicuna", "--seeds", seeds, name=name))
        return [json.loads(line)["response"] for line in (tmp_path / name / "generations.jsonl").read_text().splitlines()]
    assert responses("a", "10") == responses("b", "10")
    assert responses("a2", "10") != responses("c", "20")


@pytest.mark.skipif(not SHARED.exists(), reason=NEEDS_DATA)
def test_gate_mass_analysis(tmp_path):
    result = moe_eval.main(eval_args(tmp_path, "--analysis", "gate-mass", "--sets", "dolly", "--max-examples", "6"))
    assert result["native_k"] == TINY_CFG["num_selects"]
    mass = torch.tensor(result["mass"])
    assert mass.shape == (TINY_CFG["num_hidden_layers"], TINY_CFG["num_experts"])
    assert ((mass >= 0) & (mass <= 1 + 1e-6)).all() and (mass.diff(dim=1) >= -1e-7).all()
    assert_close(mass[:, -1], torch.ones(3))
    assert (tmp_path / "ev" / "gate_mass.csv").exists() and (tmp_path / "ev" / "gate_mass.png").stat().st_size > 0


@pytest.mark.skipif(not SHARED.exists(), reason=NEEDS_DATA)
def test_router_shift_is_zero_for_unchanged_routers_and_positive_after_change(tmp_path):
    from safetensors.torch import save_file
    teacher = moekd.load_model(str(TINY))
    save_file(moekd.router_state_dict(teacher), tmp_path / "same.safetensors")
    result = moe_eval.main(eval_args(tmp_path, "--analysis", "router-shift", "--routers", str(tmp_path / "same.safetensors"),
                                     "--sets", "dolly", "--max-examples", "4"))
    assert result["mean_kl"] == [0.0, 0.0, 0.0]
    state = moekd.router_state_dict(teacher)
    state["model.layers.2.mlp.gate.gate_network.2.weight"] += 0.5
    save_file(state, tmp_path / "moved.safetensors")
    result = moe_eval.main(eval_args(tmp_path, "--analysis", "router-shift", "--routers", str(tmp_path / "moved.safetensors"),
                                     "--sets", "dolly", "--max-examples", "4", name="moved"))
    assert result["mean_kl"][:2] == [0.0, 0.0] and result["mean_kl"][2] > 0  # only the changed layer moves
    assert (tmp_path / "moved" / "router_shift_hist.png").exists()


@pytest.mark.skipif(not SHARED.exists(), reason=NEEDS_DATA)
def test_k_sweep_and_routing_flags(tmp_path):
    result = moe_eval.main(eval_args(tmp_path, "--analysis", "k-sweep", "--sets", "vicuna", "--max-examples", "2",
                                     "--max-new-tokens", "4"))
    assert list(result["k"]) == [str(k) for k in range(2, 8)]
    assert (tmp_path / "ev" / "k_sweep.csv").read_text().splitlines()[0] == "k,vicuna,avg"
    result = moe_eval.main(eval_args(tmp_path, "--routing", "sample", "--num-selects", "6", "--sample-prob", "0.5",
                                     "--sets", "vicuna", "--routed-mass", "literal", name="sampled"))
    assert "vicuna" in result["sets"]
    assert json.loads((tmp_path / "sampled" / "eval.json").read_text())["protocol"]["routed_mass"] == "literal"
    result = moe_eval.main(eval_args(tmp_path, "--routing", "topp", "--top-p", "0.6", "--sets", "vicuna", name="topp"))
    protocol = json.loads((tmp_path / "topp" / "results.json").read_text())["protocol"]
    assert (protocol["routing"], protocol["top_p"], protocol["routed_mass"]) == ("topp", 0.6, "native")
    assert "vicuna" in result["sets"]


@pytest.mark.parametrize("extra,pattern", [
    (["--sets", "dolly,nope"], "--sets: unknown set 'nope'"),
    (["--analysis", "gate-mass", "--model", str(STUDENT)], "--analysis gate-mass needs an MoE model"),
    (["--routing", "all", "--model", str(STUDENT)], "--routing/--routers needs an MoE model"),
    (["--analysis", "router-shift"], "needs --routers"),
    (["--seeds", "ten"], "--seeds 'ten': expected comma-separated integers"),
    (["--routing", "topp"], "--top-p goes with --routing topp"),
])
def test_eval_bad_input(tmp_path, extra, pattern):
    with pytest.raises(moekd.MoekdError, match=pattern):
        moe_eval.main(eval_args(tmp_path, *extra))
    assert not (tmp_path / "ev").exists()


def test_eval_missing_data_is_an_error_unless_sets_are_named(tmp_path):
    with pytest.raises(moekd.MoekdError, match=r"^--data-dir .*nothing: no such folder; fetch the sets with python fetch_data.py --out .*nothing$"):
        moe_eval.main(["--model", str(TINY), "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "ev")])
    (tmp_path / "data" / "dolly").mkdir(parents=True)
    (tmp_path / "data" / "dolly" / "valid.jsonl").write_text('{"prompt": "p", "output": "o"}\n')
    with pytest.raises(moekd.MoekdError, match=r"missing self-inst \(self-inst/valid.jsonl\), vicuna .*; name the sets"):
        moe_eval.main(["--model", str(TINY), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "ev")])
    with pytest.raises(moekd.MoekdError, match="--sets: none of the requested sets exists"):
        moe_eval.main(eval_args(tmp_path, "--data-dir", str(tmp_path / "nothing"), "--sets", "dolly,vicuna"))
    assert not (tmp_path / "ev").exists()


@pytest.mark.skipif(not SHARED.exists(), reason=NEEDS_DATA)
def test_eval_saves_each_pair_and_a_rerun_skips_finished_ones(tmp_path, monkeypatch):
    args = lambda name, *e: eval_args(tmp_path, "--sets", "dolly,vicuna", "--seeds", "10,20", "--max-examples", "2",  # noqa: E731
                                      "--max-new-tokens", "4", *e, name=name)
    whole = moe_eval.main(args("whole"))
    real, calls = moe_eval.generate, []
    def generate(*a, **kw):
        calls.append(a[3])
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped during the third (set, seed)
        return real(*a, **kw)
    monkeypatch.setattr(moe_eval, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        moe_eval.main(args("cut"))
    assert sorted(p.name for p in (tmp_path / "cut" / "pairs").iterdir()) == ["dolly-seed10.json", "dolly-seed20.json"]
    calls.clear()
    resumed = moe_eval.main(args("cut"))
    assert len(calls) == 2 and resumed["sets"] == whole["sets"]
    for name in ("table.md", "results.json", "generations.jsonl"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text()
    with pytest.raises(moekd.MoekdError, match=r"holds an evaluation with other settings \(protocol differ"):
        moe_eval.main(args("cut", "--seeds", "10"))


def test_eval_malformed_set_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "output": ["o"]}\n{oops\n')
    with pytest.raises(moekd.MoekdError, match=r"bad\.jsonl:2: malformed JSON"):
        moe_eval.main(eval_args(tmp_path, "--sets", f"mine={tmp_path / 'bad.jsonl'}"))
    assert not (tmp_path / "ev").exists()


# ----------------------------------------------------------------------------
# repro.py and bench.py smoke tests (the full runs are commands, not tests)

def test_repro_pipeline_smoke_and_resume(tmp_path, capsys):
    """Two training seeds end to end: per-seed folders and files, the assembly, the data shared by the seeds
    (only the training randomness differs), and a finished pipeline redoes nothing."""
    import repro
    out = tmp_path / "r"
    args = ["--out", str(out), "--max-steps", "2", "--test-examples", "2", "--seeds", "10,20",
            "--methods", "gkd,ka", "--no-k-sweep", "--train-seeds", "2"]
    result = repro.main(args)
    assert result["train_seeds"] == [10, 20] and list(result["rows"]) == ["teacher (SFT)", "student (SFT)", "GKD", "KA"]
    assert [(c["row"], c["baseline"]) for c in result["comparisons"]] == [("student (SFT)", "GKD"), ("KA", "GKD")]
    for c in result["comparisons"]:
        assert c["bootstrap"]["lo"] <= c["mean"] + 1e-9 and c["mean"] - 1e-9 <= c["bootstrap"]["hi"]
    published = out / "published"  # not a full-protocol run: nothing goes to docs/repro
    for seed in (10, 20):
        summary = json.loads((published / f"seed-{seed}.json").read_text())
        assert summary == json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert summary["train_seed"] == seed and list(summary["rows"]) == list(result["rows"])
        assert set(summary["rows"]["KA"]["sets"]) == {"add", "count", "fact", "lookup", "reverse", "sequence", "sort", "spell"}
        assert set(summary["rows"]["KA"]["sets"]["add"]["scores"]) == {"10", "20"}
        for name, scores in summary["rows"]["KA"]["examples"].items():  # per example, the mean over eval seeds
            assert len(scores) == 2 and sum(scores) / 2 == pytest.approx(summary["rows"]["KA"]["sets"][name]["mean"], abs=0.01)
        for name in ("table.md", "experts.png", "experts.csv"):
            assert (out / f"seed-{seed}" / name).stat().st_size > 0
        share = torch.tensor(summary["expert_top1_share"])  # [layers, families, experts], rows sum to 1
        assert_close(share.sum(-1), torch.ones(share.shape[:2]))
        assert result["rows"]["GKD"]["per_seed_avg"][seed] == summary["rows"]["GKD"]["avg"]
    # the same data, other training randomness: the run configs differ only in the seed and their own paths
    runs = {seed: json.loads((out / f"seed-{seed}" / "runs" / "sft-teacher" / "run.json").read_text()) for seed in (10, 20)}
    differ = {k for k in runs[10] if runs[10][k] != runs[20][k]}
    assert differ == {"seed", "model", "out"} and runs[10]["data"] == str(out / "data" / "train")
    inits = [json.loads((out / f"seed-{s}" / "models" / "teacher-init" / "config.json").read_text()) for s in (10, 20)]
    assert [c.pop("moekd_init_seed") for c in inits] == [10, 20] and inits[0] == inits[1]
    weights = [load_file(out / f"seed-{s}" / "runs" / "sft-teacher" / "final" / "model.safetensors") for s in (10, 20)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    table = (published / "results.md").read_text()
    assert "2 training seeds (10, 20)" in table and "| KA | GKD |" in table and "Student-t" in table
    assert (published / "results.png").stat().st_size > 0
    assert json.loads((published / "results.json").read_text())["comparisons"] == json.loads(json.dumps(result["comparisons"]))
    capsys.readouterr()
    again = repro.main(args)  # a finished pipeline redoes nothing
    assert not re.search(r"\[repro\] seed \d+ \S+: (training|resuming)", capsys.readouterr().out)
    assert again["rows"] == result["rows"]
    assert repro.main([*args[:-2], "--train-seeds", "20,", "--assemble"])["train_seeds"] == [10, 20]  # files that exist
    with pytest.raises(moekd.MoekdError, match="--out .*other settings \\(eval_seeds differ\\)"):
        repro.main([*args[:7], "10", *args[8:]])


def test_repro_train_seeds_flag():
    import repro
    assert repro.parse_train_seeds("3") == [10, 20, 30] and repro.parse_train_seeds("5")[-1] == 50
    assert repro.parse_train_seeds("30,") == [30] and repro.parse_train_seeds("7,3") == [7, 3]
    for bad, message in (("30", "a count must be 1..20; for the single seed 30 write --train-seeds 30,"),
                         ("0", "a count must be"), ("a,b", "expected a count \\(3\\) or a comma-separated list"), ("10,10", "need distinct")):
        with pytest.raises(moekd.MoekdError, match=f"--train-seeds {bad}: {message}"):
            repro.parse_train_seeds(bad)
    with pytest.raises(moekd.MoekdError, match="--seed: replaced by --train-seeds"):
        repro.parse_args(["--seed", "10"])
    assert repro.parse_args([]).publish == repro.HERE / "docs" / "repro" / "synthetic"
    assert repro.parse_args(["--max-steps", "2", "--out", "x"]).publish == Path("x") / "published"


def test_t_quantiles_against_tables():
    import stats
    for df, value in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert stats.t_quantile(0.995, 5) == pytest.approx(4.032, abs=5e-4)
    assert stats.t_quantile(0.025, 2) == pytest.approx(-4.303, abs=5e-4)
    assert stats.t_quantile(0.75, 1) == pytest.approx(1.0)                        # Cauchy: tan(pi/4)
    assert stats.t_quantile(0.9, 2) == pytest.approx(0.8 / math.sqrt(0.18))         # df 2: (2p-1)/sqrt(2p(1-p))
    assert stats.t_cdf(0.0, 7) == 0.5 and stats.t_cdf(1.0, 1) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_mean_ci_paired_difference_and_verdicts_hand_computed():
    import stats
    ci = stats.mean_ci([1.0, 2.0, 3.0, 4.0])   # sd = sqrt(5/3); half = t(0.975, 3) * sd / 2
    assert ci["mean"] == 2.5 and ci["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert ci["half"] == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-5)
    assert (ci["lo"], ci["hi"]) == pytest.approx((2.5 - ci["half"], 2.5 + ci["half"]))
    gkd = {10: 49.0, 20: 50.0, 30: 51.0}
    within = stats.paired_difference({10: 50.0, 20: 52.0, 30: 51.0}, gkd)     # differences 1, 2, 0
    assert within["mean"] == pytest.approx(1.0) and within["half"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert stats.verdict(within) == "within noise at this scale"
    better = stats.paired_difference({10: 51.0, 20: 53.0, 30: 55.0, 40: 0.0}, gkd)  # 2, 3, 4; seed 40 unpaired
    assert better["seeds"] == [10, 20, 30] and better["lo"] == pytest.approx(3 - 4.302653 / math.sqrt(3), rel=1e-5)
    assert stats.verdict(better) == "better"
    worse = stats.paired_difference(gkd, {10: 51.0, 20: 53.0, 30: 55.0})
    assert worse["mean"] == pytest.approx(-3.0) and stats.verdict(worse) == "worse"
    one = stats.paired_difference({10: 50.0}, {10: 49.0})
    assert one["mean"] == 1.0 and one["half"] is None and stats.verdict(one) == "one training seed: no interval"
    assert stats.fmt(ci) == "2.50 ± 2.05" and stats.fmt(one) == "1.00"


def test_hierarchical_bootstrap_hand_computed():
    import stats
    a = {10: {"x": [50.0, 60.0, 70.0], "y": [10.0, 20.0]}, 20: {"x": [40.0, 41.0, 42.0], "y": [0.0, 5.0]}}
    shifted = {s: {k: [v - 1.5 for v in vs] for k, vs in sets.items()} for s, sets in a.items()}
    same = stats.hierarchical_bootstrap(a, shifted, n_boot=200)  # every paired difference is 1.5
    assert (same["mean"], same["lo"], same["hi"]) == pytest.approx((1.5, 1.5, 1.5))
    # seed 10's differences 1 (set x) and 3 (set y) -> Avg difference 2; seed 20's: 0 and 0 -> 0
    b = {10: {"x": [49.0, 59.0, 69.0], "y": [7.0, 17.0]}, 20: a[20]}
    boot = stats.hierarchical_bootstrap(a, b, n_boot=500, seed=1)
    assert boot["mean"] == pytest.approx(1.0) and boot["lo"] == pytest.approx(0.0) and boot["hi"] == pytest.approx(2.0)
    assert boot == stats.hierarchical_bootstrap(a, b, n_boot=500, seed=1)  # seeded: the same draws
    with pytest.raises(ValueError):
        stats.hierarchical_bootstrap(a, {30: a[10]})


def test_repro_assembly_hand_computed(tmp_path):
    """Two seed files made by hand: per-row mean ± interval, paired differences, the gap criterion, k sweep."""
    import repro
    def row(avg, fact):
        return {"avg": avg, "sets": {"fact": {"mean": fact, "std": 0.0, "scores": {"10": fact}}}}
    def seed_file(seed, teacher, student, kd, gkd, sweep=None):
        rows = {"teacher (SFT)": row(teacher, teacher), "student (SFT)": row(student, student), "KD": row(kd, kd),
                "GKD": row(gkd, gkd), "ALL": row(gkd + 1, gkd + 1), "KA": row(gkd + 2 + seed / 10, gkd + 2)}
        return {"preset": "synthetic", "train_seed": seed, "eval_seeds": "10", "sets": ["fact"], "protocol": {},
                "rows": rows, "teacher_student_gap": teacher - student, "expert_bits": [0.5, 1.0],
                "k_sweep": {k: row(v, v) for k, v in (sweep or {}).items()}}
    root, tmp_path = tmp_path, tmp_path / "synthetic"
    tmp_path.mkdir()
    for seed, values in ((10, (60, 40, 41, 43, {"2": 41.0, "8": 40.0})), (20, (62, 44, 45, 46))):
        (tmp_path / f"seed-{seed}.json").write_text(json.dumps(seed_file(seed, *values)))
    result = repro.assemble(repro.parse_args(["--assemble", "--publish", str(tmp_path)]))
    half = 12.706205 * math.sqrt(2) / math.sqrt(2)  # teacher: 60, 62 -> sd sqrt(2), n 2
    assert result["rows"]["teacher (SFT)"]["avg"]["mean"] == 61 and result["rows"]["teacher (SFT)"]["avg"]["half"] == pytest.approx(half, rel=1e-5)
    by = {(c["row"], c["baseline"]): c for c in result["comparisons"]}
    assert set(by) == {(row, base) for base in ("GKD", "KD") for row in ("student (SFT)", "KD", "GKD", "ALL", "KA")
                       if row != base} | {("KA", "ALL")}  # ALL is a baseline of KA and SAR only
    ka_all = by[("KA", "ALL")]  # differences 2, 3: mean 2.5, sd sqrt(0.5), half 12.706 * 0.5 = 6.35
    assert ka_all["mean"] == pytest.approx(2.5) and ka_all["lo"] == pytest.approx(2.5 - 12.706205 * 0.5, rel=1e-5)
    kd_gkd = by[("KD", "GKD")]  # differences -2, -1: mean -1.5, sd sqrt(0.5), half = 12.706 * 0.5
    assert kd_gkd["mean"] == pytest.approx(-1.5) and kd_gkd["half"] == pytest.approx(12.706205 * 0.5, rel=1e-5)
    assert kd_gkd["verdict"] == "within noise at this scale"
    gap = result["teacher_student_gap"]  # 20, 18: mean 19, sd sqrt(2): 19 >= 3 sqrt(2)
    assert gap["mean"] == 19 and gap["sd"] == pytest.approx(math.sqrt(2)) and gap["three_sd_met"] is True
    assert result["k_sweep"]["2"]["mean"] == 41.0 and result["k_sweep"]["2"]["train_seeds"] == [10]
    assert result["expert_bits"][1]["mean"] == 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| KD | GKD | -1.50 | [-7.85, +4.85] | within noise at this scale | - |" in md and "gap >= 3 std: met" in md
    summary = repro.summary_markdown(root).splitlines()  # the README's table: one column per assembled preset
    assert summary[0].endswith("| synthetic (2 seeds) |") and "| teacher (SFT) | 61.00 ± 12.71 |" in summary
    assert "| teacher - student (SFT) | +19.00 [+6.29, +31.71], 13.4 stds |" in summary  # 19 ± 12.706 sqrt(2)/sqrt(2)
    assert "| GKD - KD | +1.50 [-4.85, +7.85]: within noise at this scale |" in summary and "| SAR - GKD | - |" in summary
    assert "| KA - ALL | +2.50 [-3.85, +8.85]: within noise at this scale |" in summary
    with pytest.raises(moekd.MoekdError, match="--summary: no <preset>/results.json under"):
        repro.summary_markdown(root / "synthetic")
    (tmp_path / "seed-30.json").write_text(json.dumps({**seed_file(30, 1, 1, 1, 1), "eval_seeds": "10,20"}))
    with pytest.raises(moekd.MoekdError, match="seed-30.json differs from the other seed files in eval_seeds"):
        repro.main(["--assemble", "--publish", str(tmp_path)])
    with pytest.raises(moekd.MoekdError, match="--publish .*no seed-<s>.json"):
        repro.main(["--assemble", "--publish", str(tmp_path / "empty")])


def test_published_reproduction_is_what_its_seed_files_give():
    """docs/repro/<preset>/results.md re-assembles from the committed seed files, and the README and
    docs/repro.md carry the summary of exactly those results."""
    import repro
    root = repro.HERE / "docs" / "repro"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        result = repro.assemble_stats(repro.load_seed_files(folder))
        assert repro.assembled_markdown(result) == (folder / "results.md").read_text(), folder.name
    table = repro.summary_markdown(root)
    assert table in (repro.HERE / "README.md").read_text() and table in (root.parent / "repro.md").read_text()


def test_bench_smoke():
    import bench
    result = bench.main(["--sizes", "tiny", "--steps", "2", "--warmup", "0", "--methods", "gkd,ka-m2,sar",
                         "--no-scaling", "--no-kl-memory", "--no-large-vocab", "--compile-sampler", "off"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"gkd", "ka-m2", "sar"}
    assert rows["sar"]["router_ms"] > 0 and rows["gkd"]["router_ms"] == 0 and rows["gkd"]["gen_ms"] > 0
    assert all(r["step_ms"] > 0 and r["overhead"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert rows["gkd"]["gen_generate_ms"] > 0 and result["derived"]["tiny"]["generation_speedup"] > 0
    # KA's teacher heads run inside the student's chunked loss: timed on their own, outside the parts' sum
    assert rows["ka-m2"]["teacher_head_ms"] > 0 and rows["gkd"]["teacher_head_ms"] == 0


def test_gpu_check_at_tiny_scale_on_cpu(tmp_path, monkeypatch):
    """bench.py --gpu-check's code path on CPU at tiny shapes, the ka stage forced to fail.

    Its traceback is recorded and every other stage's figures are on disk (the JSON was already saved before
    the failing stage ran): every method's bf16 step finite, the tiny teacher frozen but SAR's routers, the
    parts of each step timed where train_step calls them (SAR alone has a router part), the bandwidth floor
    from the student's shapes (the paper's student: the parameter count of its public config), the
    environment, the Markdown."""
    import bench
    original, seen = bench.paper_method, {}

    def failing_ka(method, *args, **kwargs):
        if method == "ka":
            seen.update(json.loads((tmp_path / "check.json").read_text())["stages"])
            raise RuntimeError("forced ka failure")
        return original(method, *args, **kwargs)
    monkeypatch.setattr(bench, "paper_method", failing_ka)
    bench.gpu_check("tiny", torch.device("cpu"), 4.3e12, tmp_path / "check.json")
    report = json.loads((tmp_path / "check.json").read_text())
    assert seen["method_gkd"]["ok"] and "method_ka" not in seen  # saved after each stage, before the next
    stages = report["stages"]
    ka = stages.pop("method_ka")
    assert not ka["ok"] and "forced ka failure" in ka["error"] and "in failing_ka" in ka["error"]  # traceback
    assert stages.pop("cuda_tests") == {"ok": False, "skipped": "no CUDA device"}
    assert list(stages) == ["environment", "tiny_bf16_steps", "paper_pair", "method_gkd", "method_sar",
                            "sampler"]
    assert all(st["ok"] and st["seconds"] > 0 and st["peak_rss_gb"] > 0 for st in stages.values())
    assert all(set(st["compile"]) == {"frames_compiled", "unique_graphs", "recompiles", "cudagraph_skips",
                                      "cudagraph_recordings"} for st in stages.values())
    env = report["environment"]
    assert env["torch"] == torch.__version__
    assert set(env["sdpa"]) == {"flash", "mem_efficient", "math", "cudnn"}
    assert "nvidia_smi" in env and "triton" in env and report["transformers"] == env["transformers"]
    assert report["tiny_bf16_finite"] and set(report["tiny_bf16_steps"]) == set(moekd.METHODS)
    routers = sum(p.numel() for n, p in moekd.load_model(str(TINY)).named_parameters() if ".gate." in n)
    assert {m: logs["teacher_trainable"] for m, logs in report["tiny_bf16_steps"].items()} == {
        m: routers if m == "sar" else 0 for m in moekd.METHODS}
    by = {m["method"]: m for m in report["methods"]}
    assert set(by) == {"gkd", "sar"}
    for m in by.values():
        assert len(m["steps"]) == 2 and all(s["student_s"] > 0 and s["gen_s"] > 0 for s in m["steps"])
        assert m["gen_tokens_per_s"] == pytest.approx(4 * 16 / m["steady"]["gen_s"])
    assert by["sar"]["steady"]["router_s"] > 0 and by["gkd"]["steady"]["router_s"] == 0
    assert by["sar"]["plan_gb"] > by["gkd"]["plan_gb"] and report["sampler"]["speedup"] > 0
    check = bench.CHECKS["paper"]
    weights = 2 * 1.345e9 + 2 * 24 * 16 * 384 * 2048 * 2          # bf16 weights + half the final KV cache
    assert bench.bandwidth_floor_tokens_per_s(check, 4.3e12) == pytest.approx(16 / (weights / 4.3e12), rel=0.01)
    md = (tmp_path / "check.md").read_text()
    assert "| gkd |" in md and "| method_ka | **FAILED** |" in md and "forced ka failure" in md
    assert moekd.sample_tokens is sampling.sample_tokens and moekd.teacher_hidden.__module__ == "moekd"  # restored


def test_gpu_check_keeps_the_test_output_through_a_timeout_and_an_empty_one(tmp_path):
    """The CUDA tests' subprocess: killed at its timeout, the check goes on with what it printed saved; no
    output at all is a summary too; pytest's FAILED/ERROR lines are picked out of the -rfE summary."""
    import bench
    slow = [sys.executable, "-c", "import time; print('collected 9 items', flush=True); time.sleep(60)"]
    t0 = time.perf_counter()
    out = bench.run_tests(slow, tmp_path / "slow.txt", timeout=2)
    assert time.perf_counter() - t0 < 30 and out["timed_out"] and out["returncode"] is None
    assert out["summary"] == "killed after 2 s; last line: collected 9 items"
    assert (tmp_path / "slow.txt").read_text() == "collected 9 items\n"
    empty = bench.run_tests([sys.executable, "-c", "pass"], tmp_path / "empty.txt", timeout=60)
    assert empty == {"returncode": 0, "timed_out": False, "log": str(tmp_path / "empty.txt"),
                     "summary": "(no output)", "failures": []}
    lines = ["F.", "FAILED test_moekd.py::test_a - AssertionError", "ERROR test_moekd.py::test_b", "1 failed"]
    failed = bench.run_tests([sys.executable, "-c", f"import sys; print({chr(10).join(lines)!r}); "
                              "sys.stderr.write('warning\\n'); sys.exit(1)"], tmp_path / "f.txt", timeout=60)
    assert failed["returncode"] == 1 and failed["failures"] == lines[1:3]
    assert "warning" in (tmp_path / "f.txt").read_text()  # stderr kept too


def test_memory_plan_counts_sars_saved_concatenated_expert_weights():
    """SAR's router backward through a Llama-MoE teacher saves each layer's concatenated expert weights
    (counted here from autograd's saved tensors on the tiny teacher, [I, H] or [H, I]: 3 per layer, 1 in the
    first, whose input needs no gradient); the plan counts them: (3 x 32 - 2) x 16 experts x 688 x 4096 x 2
    bytes = 8.48 GB for the paper's teacher."""
    import bench
    teacher = moekd.load_model(str(TINY)).requires_grad_(False)
    moekd.train_routers(teacher)
    I, H, L = TINY_CFG["intermediate_size"], TINY_CFG["hidden_size"], TINY_CFG["num_hidden_layers"]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        with moekd.moe_routing(teacher, "all"):
            teacher(ids_batch()).logits.sum().backward()
    assert sum(shape in ((I, H), (H, I)) for shape in saved) == 3 * L - 2
    pair = bench.PAIRS[bench.PAPER_PAIR]
    opts = dict(shard_teacher=False, shard_student=False, grad_checkpointing=False)
    sar, gkd = bench.plan(pair, **opts, sar=True), bench.plan(pair, **opts, sar=False)
    assert sar["SAR saved expert weights"] == pytest.approx(94 * 16 * 688 * 4096 * 2 / 1e9)  # 8.48
    assert gkd["SAR saved expert weights"] == 0
    extra = sar["SAR saved expert weights"] + sar["teacher activations (SAR)"]
    assert sar["total"] - gkd["total"] == pytest.approx(extra)
    other = bench.PAIRS["Qwen3-30B-A3B -> Qwen3-1.7B"]  # stacked expert weights (grouped_mm): no copy
    assert bench.plan(other, **opts, sar=True)["SAR saved expert weights"] == 0


def test_bench_loss_paths_compute_the_same_gradients(monkeypatch):
    """bench.py's large-vocab comparison times two ways to the same numbers: the logits code the steps ran
    before and moekd.step_losses (on a small shape here)."""
    import bench
    monkeypatch.setitem(bench.LOSS_SHAPES, "small", dict(V=50, H=8, B=2, T=9, prompt=3, M=3))
    for method in bench.LOSS_METHODS:
        grads = []
        for path in ("logits", "hidden"):
            x = bench.loss_inputs(method, "small")
            bench.logits_loss_path(method, x) if path == "logits" else bench.hidden_loss_path(method, x, 1)
            grads.append([t.grad for t in (x["hs"], x["ws"], x["ht"])])
        for a, b in zip(*grads):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6, rtol=1e-4)), method


@pytest.mark.parametrize("method", ["kd", "ka-gold"])
def test_bench_student_part_is_the_methods_own_step(method):
    """bench.py times the step functions training uses (kd's --kd-ratio included), not a copy of them."""
    import bench
    teacher, student = bench.build("tiny", None, torch.device("cpu"))
    teacher.requires_grad_(False)
    cfg = moekd.Config(method=method, kd_ratio=0.3, batch_size=2, max_prompt_len=6, max_len=12, ka_lambda=0.0)
    rows = [{"prompt_ids": [5, 6, 7], "input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
            {"prompt_ids": [9, 4], "input_ids": [9, 4, 3, 3], "labels": [-100, -100, 3, 3]}]
    extras = moekd.method_state(cfg, teacher, torch.float32)
    parts = bench.step_parts(cfg, student, teacher, bench.Tokens(), rows, None, extras)
    torch.manual_seed(1)
    parts["student"]()
    timed = {n: p.grad.clone() for n, p in student.named_parameters()}
    batch = moekd.collate(rows, 2)
    student.zero_grad()
    norm = float(moekd.loss_mask(batch["labels"]).sum())
    torch.manual_seed(1)
    moekd.method_step(method)(student, teacher, batch, cfg, norm=norm, n_micro=1, state=extras)["loss"].backward()
    for n, p in student.named_parameters():
        assert_close(timed[n], p.grad)


def test_a_new_method_is_one_row_and_one_step(monkeypatch, teacher, student, tokenizer):
    """An on-policy JSD method (GKD's generalised JSD, beta 0.5): a Method row, a STEPS entry and a step of a few
    lines on hidden_losses.chunked_loss; its loss equals the JSD written out on the full logits (float64) and
    its gradient reaches the student."""
    def jsd_step(model, teacher, batch, cfg, *, norm, n_micro, state):
        with moekd.teacher_routing(teacher, cfg, state.generator):
            t = moekd.teacher_hidden(teacher, batch, amp_dtype=state.amp_dtype)
        h, _ = moekd.forward_with_balance(model, batch)
        mask = moekd.loss_mask(batch["labels"]).view(-1)
        loss = hidden_losses.chunked_loss(hidden_losses.jsd_rows, h.flatten(0, 1)[mask], moekd.output_head(model),
                                          t.view(1, -1, t.shape[-1])[:, mask], moekd.output_head(teacher)) / norm
        return {"loss": loss, "jsd": loss.detach()}

    monkeypatch.setitem(moekd.METHODS, "gkd-jsd", moekd.Method("jsd", on_policy=True, teacher="native"))
    monkeypatch.setitem(moekd.STEPS, "jsd", jsd_step)
    cfg = moekd.Config(method="gkd-jsd")
    items = [moekd.tokenize_example(tokenizer, r["prompt"], r["responses"][0], max_prompt_len=96, max_len=128)
             for r in (data.to_example(x, where="t") for x in synthetic.synthetic_rows(3, seed=4))]
    batch = moekd.collate(items, tokenizer.pad_token_id)
    mask = moekd.loss_mask(batch["labels"])
    teacher.requires_grad_(False)
    loss = moekd.method_step("gkd-jsd")(student, teacher, batch, cfg, norm=float(mask.sum()), n_micro=1,
                                        state=moekd.method_state(cfg, teacher, torch.float32))["loss"]
    loss.backward()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        q = student(**inputs).logits[mask].double().softmax(-1)
        p = teacher(**inputs).logits[mask].double().softmax(-1)
    m = 0.5 * (p + q)
    by_hand = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()
    assert abs(float(loss) - float(by_hand)) < 1e-5 * float(by_hand) + 1e-7
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_specialisation_bits_hand_computed():
    import repro
    separated = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])   # each family its own expert: 1 bit
    ignored = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])     # routing ignores the family: 0 bits
    half = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])        # P(e) = (3/4, 1/4)
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert repro.specialisation_bits(separated) == [1.0] and repro.specialisation_bits(ignored) == [0.0]
    assert repro.specialisation_bits(half)[0] == pytest.approx(expected)


def test_router_file_with_other_keys_is_rejected(tmp_path, teacher):
    from safetensors.torch import save_file
    save_file({"model.layers.0.mlp.gate.extra": torch.zeros(2)}, tmp_path / "r.safetensors")
    with pytest.raises(moekd.MoekdError, match="router keys do not match the teacher"):
        moekd.load_routers(teacher, tmp_path / "r.safetensors")


def test_ka_mean_of_m_kls_is_one_fused_kl():
    s = torch.randn(2, 5, 13, requires_grad=True)
    t = torch.randn(3, 2, 5, 13)
    mask = torch.rand(2, 5) > 0.3
    fused = moekd.kl_per_token(s, t, mask, chunk=3)
    (g_fused,) = torch.autograd.grad(fused.sum(), s)
    looped = sum(moekd.kl_per_token(s, t[m], mask) for m in range(3)) / 3
    (g_looped,) = torch.autograd.grad(looped.sum(), s)
    assert_close(fused, looped)
    assert_close(g_fused, g_looped)


# ----------------------------------------------------------------------------
# Distributed (torchrun): the split of a global batch over ranks does not change a run

def test_stream_seeds_are_distinct_and_reproducible():
    seeds = {moekd.stream_seed(10, step, i, s) for step in range(3) for i in range(8) for s in ("sample", "train0")}
    assert len(seeds) == 48 and all(0 <= x < 2**63 for x in seeds)
    assert moekd.stream_seed(10, 2, 5, "sample") == moekd.stream_seed(10, 2, 5, "sample")


def test_split_global_batch():
    cfg = moekd.Config(batch_size=4, global_batch_size=16)
    assert cfg.grad_accum is None and moekd.split_global_batch(cfg, 2) == 16 and cfg.grad_accum == 2
    assert moekd.split_global_batch(moekd.Config(batch_size=4, grad_accum=3), 2) == 24
    with pytest.raises(moekd.MoekdError, match="--global-batch-size 16 is not a multiple of --batch-size 4 x 3"):
        moekd.split_global_batch(moekd.Config(batch_size=4, global_batch_size=16), 3)
    with pytest.raises(moekd.MoekdError, match="--grad-accum 1 contradicts --global-batch-size 16"):
        moekd.split_global_batch(moekd.Config(batch_size=4, grad_accum=1, global_batch_size=16), 2)


def test_row_seeded_samples_do_not_depend_on_the_batch(student, tokenizer):
    """A row's on-policy sample is a function of its seed: alone, or batched (left-padded) with a longer
    prompt, it is the same; another seed gives another sample."""
    prompts, seeds = [[5, 6, 7, 8, 9, 10], [11, 12]], [123, 456]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=12)
    together = moekd.sample_tokens(student, prompts, batch_size=2, seeds=seeds, **kw)
    alone = [moekd.sample_tokens(student, [p], batch_size=1, seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    cut = lambda row: moekd.response_through_eos(row, tokenizer.eos_token_id)  # noqa: E731 (pads after EOS)
    assert [cut(r) for r in together] == [cut(r) for r in alone]
    assert moekd.sample_tokens(student, prompts[1:], batch_size=1, seeds=[789], **kw) != alone[1:]


def naive_seeded_sample(model, prompt: list[int], seed: int, *, eos_id: int, max_new_tokens: int) -> list[int]:
    """The reference for sample_rows: one row, no padding, no cache (a full forward per token), the same noise."""
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
    model = moekd.load_model(str(path))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43], [7]]
    seeds = [3, 1 << 40, 77, 2024]
    first = naive_seeded_sample(model, prompts[0], seeds[0], eos_id=-1, max_new_tokens=3)
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=first[1], max_new_tokens=10, batch_size=4, seeds=seeds)
    ours = moekd.sample_tokens(model, prompts, sampler="moekd", **kw)  # row 0 ends at its second token
    theirs = moekd.sample_tokens(model, prompts, sampler="generate", **kw)
    naive = [naive_seeded_sample(model, p, s, eos_id=first[1], max_new_tokens=10) for p, s in zip(prompts, seeds)]
    cut = lambda row: moekd.response_through_eos(row, first[1]) if first[1] in row else row  # noqa: E731
    assert ours == theirs and [cut(r) for r in ours] == naive
    assert len(naive[0]) == 2 and any(len(r) == 10 for r in naive)  # one row ended early, one ran to the limit
    with pytest.raises(ValueError, match="takes no generate"):  # generate()-only options are not dropped silently
        moekd.sample_tokens(model, prompts, sampler="moekd", no_repeat_ngram_size=2, **kw)


def tiny_causal_lm(family: str):
    """A tiny random transformers causal LM of a student family (Mistral with a sliding window shorter than the
    samples, so its static cache wraps around), fp32, built from its config class."""
    import transformers
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    extra = {"Qwen2": dict(use_sliding_window=False), "Qwen3": dict(head_dim=8),
             "Mistral": dict(sliding_window=8), "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
             "MiniMax": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"])}
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**common, **extra.get(family, {}))
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Mistral", "Mixtral", "MiniMax"])
def test_moekd_sampler_on_student_families(family):
    """The static-cache sampler on other student architectures (qkv bias, q/k norms, a sliding window the
    samples outgrow, a transformers MoE; MiniMax's linear attention keeps its own cache): the tokens of the
    naive loop without cache, ragged prompts."""
    model = tiny_causal_lm(family)
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40]], [3, 4, 5]
    ours = moekd.sample_tokens(model, prompts, pad_id=0, eos_id=-1, max_new_tokens=9, batch_size=3, seeds=seeds)
    assert ours == [naive_seeded_sample(model, p, s, eos_id=-1, max_new_tokens=9) for p, s in zip(prompts, seeds)]


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
    model = tiny_causal_lm("Llama")
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
    mistral = tiny_causal_lm("Mistral")  # sliding window 8, shorter than prompt + 9 new tokens
    for seeds in ([3, 4], [5, 6]):
        ours = sampling.sample_rows(mistral, prompts[:2], pad_id=0, eos_id=-1, max_new_tokens=9, seeds=seeds)
        assert ours == [naive_seeded_sample(mistral, p, s, eos_id=-1, max_new_tokens=9)
                        for p, s in zip(prompts, seeds)]
    assert made[2:] == [64]


def test_sampler_checks_for_the_end_every_few_steps(monkeypatch):
    """The host asks whether every row has ended once per EOS_CHECK_EVERY steps, never without an EOS id
    a token can take, and the steps run past the last row's EOS are cut: the tokens of the naive loop."""
    model = tiny_causal_lm("Llama")
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


def sharpened(model, scale: float = 30.0):
    """The model with its output head scaled: at the random init's ~0.1 logit spread the Gumbel noise decides
    nearly every token whatever the context, so a wrong attention mask would go unseen; at ~3 it does not."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def ragged_prompt_rows(model, compile: bool) -> tuple[list, list, list]:
    """Left-padded prompts of lengths 7, 2 and 4 sampled together and each alone, with every logits tensor
    the model returned while sampling them together."""
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]], [3, 1 << 40, 77]
    logits = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: logits.append(out.logits.detach()),
                                       with_kwargs=True) if not compile else None
    kw = dict(pad_id=0, eos_id=-1, max_new_tokens=12, compile=compile)
    together = sampling.sample_rows(model, prompts, seeds=seeds, **kw)
    if hook is not None:
        hook.remove()
    alone = [sampling.sample_rows(model, [p], seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    return together, alone, logits


def test_ragged_prompts_sample_finite_logits_and_each_row_as_alone():
    """Left padding (prompts of 7, 2 and 4 tokens): every logit the sampler reads is finite (a pad query that
    attends to nothing must not turn a row into NaN), and each row's tokens are those it gets alone."""
    model = sharpened(tiny_causal_lm("Llama"))
    together, alone, logits = ragged_prompt_rows(model, compile=False)
    assert together == alone and len(logits) == 12 and all(bool(t.isfinite().all()) for t in logits)


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


def test_bf16_autocast_samples_from_a_bf16_copy_kept_in_step(tokenizer):
    """Under bf16 autocast over fp32 weights, moekd's sampler runs a bf16 copy of the student: the tokens of
    the naive loop on the model cast to bf16, and a change to the weights reaches the copy on the next call."""
    import copy
    model = moekd.load_model(str(STUDENT))
    prompts, seeds = [[5, 6, 7, 8, 9], [12, 13]], [3, 4]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=-1, max_new_tokens=8, batch_size=2, seeds=seeds)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = moekd.sample_tokens(model, prompts, **kw)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        assert ours == [naive_seeded_sample(bf16, p, s, eos_id=-1, max_new_tokens=8) for p, s in zip(prompts, seeds)]
        assert next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            model.lm_head.weight.mul_(-3.0)  # the second round samples from the changed weights


@pytest.mark.slow  # compiling on CPU: ~20-40 s each
@pytest.mark.parametrize("path", [STUDENT, TINY], ids=["dense", "llama-moe"])
def test_compiled_decode_step_emits_the_same_tokens(tokenizer, path):
    """The torch.compile'd decode step (fixed shapes: one graph per batch shape) gives the eager tokens, and the
    static cache length is bucketed so prompts of other widths reuse it."""
    student = moekd.load_model(str(path))
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]], [3, 1 << 40, 77]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=-1, max_new_tokens=12, seeds=seeds)
    assert sampling.sample_rows(student, prompts, compile=True, **kw) == sampling.sample_rows(student, prompts, **kw)
    assert [sampling.cache_length(w) for w in (1, 64, 65, 128, 200, 512)] == [64, 64, 128, 128, 256, 512]


def test_counter_noise_depends_on_seed_and_position_only():
    keys = sampling.row_keys([5, 6, 7], "cpu")
    noise = sampling.gumbel_noise(keys, 4, 50)
    assert torch.equal(noise[1:2], sampling.gumbel_noise(sampling.row_keys([6], "cpu"), 4, 50))  # batch-independent
    assert not torch.equal(noise, sampling.gumbel_noise(keys, 5, 50))                          # a new draw per step
    many = sampling.gumbel_noise(sampling.row_keys(list(range(400)), "cpu"), 0, 1000)          # Gumbel(0, 1)
    assert abs(many.mean() - 0.5772) < 0.01 and abs(many.std() - math.pi / math.sqrt(6)) < 0.01


def test_row_seeded_sampler_draws_from_the_softmax():
    """Gumbel-max: the argmax of logits + noise is distributed as softmax(logits)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).expand(4000, 5)
    sampler = sampling.RowSeededSampler(list(range(4000)), torch.device("cpu"))
    counts = torch.bincount(sampler(None, logits).argmax(-1), minlength=5).float()
    expected = torch.softmax(logits[0], -1) * 4000
    assert ((counts - expected) ** 2 / expected).sum() < 18.5  # chi-square, 4 dof, p = 0.001


def test_launch_errors(tmp_path, monkeypatch):
    for flag in ("--shard-teacher", "--shard-student"):
        with pytest.raises(moekd.MoekdError, match=f"{flag} needs several processes"):
            moekd.main(run_args(tmp_path / "run", "gkd", flag))
    if not torch.cuda.is_available():  # a CUDA-only option on a CPU machine
        for flag in ("--device", "--teacher-device"):
            with pytest.raises(moekd.MoekdError, match=f"^{flag} cuda: CUDA is not available"):
                moekd.main(run_args(tmp_path / "run", "gkd", flag, "cuda"))
    with pytest.raises(moekd.MoekdError, match="^--teacher-device gpu7: not a device"):
        moekd.main(run_args(tmp_path / "run", "gkd", "--teacher-device", "gpu7"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(moekd.MoekdError, match="--device cpu:0: under torchrun every rank picks its own device"):
        moekd.main(run_args(tmp_path / "run", "gkd", "--device", "cpu:0"))
    with pytest.raises(moekd.MoekdError, match="--teacher-device cpu:0: under torchrun the teacher lives"):
        moekd.main(run_args(tmp_path / "run", "gkd", "--teacher-device", "cpu:0"))
    assert not (tmp_path / "run").exists()


def test_resume_keeps_the_global_batch(tmp_path):
    moekd.main(run_args(tmp_path / "run", "gkd", "--stop-after", "1"))
    with pytest.raises(moekd.MoekdError, match=r"global batch 8 \(4 x 1 device\(s\) x 2\) differs .* \(4\)"):
        moekd.main(run_args(tmp_path / "run", "gkd", "--resume", "--grad-accum", "2"))
    result = moekd.main(run_args(tmp_path / "run", "gkd", "--resume", "--batch-size", "2", "--grad-accum", "2"))
    assert result["finished"]


def torchrun(*args: str, nproc: int = 2) -> None:
    """Run moekd.py under torchrun on CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "moekd.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def assert_same_run(a: Path, b: Path, method: str) -> None:
    """Same trained weights (and SAR routers) and the same logged losses, to float tolerance."""
    for name in ["model.safetensors"] + ([moekd.ROUTERS_FILE] if method == "sar" else []):
        x, y = load_file(a / "final" / name), load_file(b / "final" / name)
        assert x.keys() == y.keys()
        for k in x:
            assert_close(x[k], y[k], msg=f"{name}: {k}")
    ha, hb = (json.loads((d / "metrics.json").read_text())["history"] for d in (a, b))
    assert [h.keys() for h in ha] == [h.keys() for h in hb]
    for x, y in zip(ha, hb):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("method,extra", [
    ("sft", ["--model", str(TINY)]),  # an MoE student: DDP with experts that may get no tokens, gate noise
    ("gkd", []), ("ka", ["--ka-lambda", "0"]), ("ka", ["--ka-lambda", "0.5"]),
    ("sar", ["--router-lr", "1e-2"]),
    ("gkd", ["--shard-teacher"]), ("sar", ["--router-lr", "1e-2", "--shard-teacher"]),
    ("sft", ["--model", str(TINY), "--shard-student", "--dev-eval", "--synthetic-dev", "8", "--dev-num", "4"]),
    ("gkd", ["--shard-student", "--shard-teacher"]),
    ("sar", ["--router-lr", "1e-2", "--shard-student", "--shard-teacher", "--grad-checkpointing"])],
    ids=["sft-moe", "gkd", "ka-0", "ka-0.5", "sar", "gkd-sharded-teacher", "sar-sharded-teacher",
         "sft-moe-sharded-with-dev-eval", "gkd-both-sharded", "sar-both-sharded-checkpointed"])
def test_two_ranks_match_one_process(tmp_path, method, extra):
    """torchrun 2 ranks x micro-batch 4 == 1 process x micro-batch 4 x 2 accumulation (global batch 8).
    Both generate 4 rows at a time: every row has its own sampling stream either way, but other batch
    shapes change the logits in the last float bits, which can flip a near-tie between two tokens."""
    extra = [*extra] + (["--gen-batch-size", "4"] if method != "sft" else [])
    torchrun(*run_args(tmp_path / "two", method, *extra))
    single = [e for e in extra if not e.startswith("--shard")]
    moekd.main(run_args(tmp_path / "one", method, "--grad-accum", "2", *single))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert_same_run(tmp_path / "two", tmp_path / "one", method)
    # each rank holds half of what it shards (the state the README's memory table counts), all of the rest
    two, one = (json.loads((tmp_path / d / "metrics.json").read_text())["memory"] for d in ("two", "one"))
    assert len(two) == 2 and len(one) == 1
    for key, flag in (("student_mb", "--shard-student"), ("teacher_mb", "--shard-teacher"),
                      ("optimizer_mb", "--shard-student")):
        share = two[0][key] / one[0][key] if one[0][key] else 1.0
        assert share == pytest.approx(0.5 if flag in extra else 1.0, abs=0.05), key


@pytest.mark.distributed
@pytest.mark.parametrize("shard", [[], ["--shard-teacher", "--shard-student"]], ids=["ddp", "fsdp"])
def test_resume_across_world_sizes(tmp_path, shard):
    """SAR (student and router optimizers) stopped after 2 of 4 steps on 2 ranks, resumed on 2 ranks
    and on 1 process, ends where an uninterrupted 1-process run ends."""
    args = lambda out, *e: run_args(out, "sar", "--router-lr", "1e-2", "--synthetic-train", "32",  # noqa: E731
                                    "--max-steps", "4", "--gen-batch-size", "4", *e)
    moekd.main(args(tmp_path / "whole", "--grad-accum", "2"))
    torchrun(*args(tmp_path / "two", "--stop-after", "2", *shard))
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    torchrun(*args(tmp_path / "two", "--resume", *shard))
    moekd.main(args(tmp_path / "one", "--resume", "--grad-accum", "2"))
    assert_same_run(tmp_path / "two", tmp_path / "whole", "sar")
    assert_same_run(tmp_path / "one", tmp_path / "whole", "sar")


@pytest.mark.parametrize("method,extra", [("sft", ["--model", str(TINY)]), ("sar", ["--router-lr", "1e-2"])])
def test_grad_checkpointing_changes_memory_not_results(tmp_path, method, extra):
    """Recomputed activations (gate noise replayed) give the same training run."""
    moekd.main(run_args(tmp_path / "plain", method, *extra))
    moekd.main(run_args(tmp_path / "ckpt", method, "--grad-checkpointing", *extra))
    assert_same_run(tmp_path / "plain", tmp_path / "ckpt", method)


# ----------------------------------------------------------------------------
# Layout: the method copies out of moekd.py; run folders of earlier versions resume

def closure_source(roots: set[str]) -> str:
    """The definitions of moekd.py that `roots` need, transitively, with the imports they use: what a user
    copies into their own file."""
    import ast
    src = (ROOT / "moekd.py").read_text()
    tree = ast.parse(src)
    defs, imports = {}, []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            defs[node.targets[0].id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
    def used(node):  # names read, less the function's own arguments
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - \
            {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
    need, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in defs and name not in need:
            need.add(name)
            todo.extend(used(defs[name]))
    names = set().union(*(used(defs[n]) for n in need))
    lines = ["from __future__ import annotations"]
    for node in imports:
        bound = {(a.asname or a.name).split(".")[0] for a in node.names}
        if bound & names and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            lines.append(ast.get_source_segment(src, node))
    blocks = ["".join(f"@{ast.get_source_segment(src, d)}\n" for d in getattr(defs[n], "decorator_list", []))
              + ast.get_source_segment(src, defs[n]) for n in sorted(need, key=lambda n: defs[n].lineno)]
    return "\n".join(lines) + "\n\n\n" + "\n\n\n".join(blocks) + "\n"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_routing_and_losses_copy_out_of_moekd(tmp_path, family):
    """moe_routing, reverse_kl and forward_kl with everything they need: no model class, no other module of this
    project, and they work on transformers MoEs in a namespace holding only them (docs/methods.md gives the
    closure's line count)."""
    code = closure_source({"moe_routing", "reverse_kl", "forward_kl"})
    assert "LlamaMoE" not in code and not re.search(r"^(from|import) (checkpoints|parallel|llama_moe|sampling)",
                                                      code, re.M)
    import types
    copied = types.ModuleType("copied")  # a user's own file, importing nothing of this project
    sys.modules["copied"] = copied
    try:
        exec(compile(code, "copied.py", "exec"), copied.__dict__)
    finally:
        del sys.modules["copied"]
    ns = copied.__dict__
    model = moekd.load_model(str(hf_moe(tmp_path, family)))
    ids = ids_batch()
    with torch.no_grad():
        native = model(ids).logits
        with ns["moe_routing"](model, "topk"):
            assert torch.equal(model(ids).logits, native)  # top-k through the copy: bit-identical
        with ns["moe_routing"](model, "sample", prob=0.0, generator=torch.Generator().manual_seed(0)):
            assert torch.equal(model(ids).logits, native)
        with ns["moe_routing"](model, "all"):
            dense = model(ids).logits
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[:, 0] = False
    assert_close(ns["reverse_kl"](native, dense, mask), (dense_kl(native, dense) * mask).sum() / mask.sum())
    assert_close(ns["forward_kl"](native, dense, mask), (dense_kl(dense, native) * mask).sum() / mask.sum())


def test_run_folder_of_the_previous_layout_resumes(tmp_path, monkeypatch):
    """fixtures/run-ace5af2 was written by moekd at commit ace5af2 (before the module split): an SFT run of
    the LLaMA-like tiny student stopped after 3 of 8 steps (its run.json's two machine paths, the unused
    teacher and the out folder, made relative). It resumes with no flags and ends as the uninterrupted run of
    that commit did: the same history to float rounding. The losses are computed from hidden states in chunks
    since, which moves the last float bits, so the final weights are no longer bit-identical to that commit's
    (the fixture's final_weights_sha256): they are checked to be finite and trained past the checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(ROOT / "fixtures" / "run-ace5af2", run)
    expected = json.loads((ROOT / "fixtures" / "run-ace5af2.expected.json").read_text())
    monkeypatch.chdir(ROOT)  # the run's config names its model relative to the repository
    result = moekd.main(["--out", str(run), "--resume"])
    assert result["finished"] and len(result["history"]) == len(expected["history"])
    for got, want in zip(result["history"], expected["history"]):
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want)
    weights, resumed_from = load_file(run / "final" / "model.safetensors"), load_file(
        ROOT / "fixtures" / "run-ace5af2" / "checkpoints" / "step-3" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values()) and any(
        not torch.equal(weights[k], resumed_from[k]) for k in weights)


# README, docs and data fetch

import fetch_data  # noqa: E402

README = ROOT / "README.md"
SNIPPET_MARKER = "<!-- snippet: use-in-your-code -->"


def readme_snippet() -> str:
    """The fenced python block right after the marker in README.md."""
    text = README.read_text()
    assert text.count(SNIPPET_MARKER) == 1, f"README.md needs exactly one {SNIPPET_MARKER}"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(SNIPPET_MARKER, 1)[1], re.S)
    assert match, f"README.md: no ```python block right after {SNIPPET_MARKER}"
    return match.group(1)


def test_readme_snippet_runs():
    code = readme_snippet()
    assert len(code.splitlines()) <= 25
    assert "from moekd import" in code and "moe_routing" in code and "reverse_kl" in code
    ns = {"__name__": "readme_snippet"}
    exec(compile(code, f"{README}:{SNIPPET_MARKER}", "exec"), ns)
    loss, student = ns["loss"], ns["student"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert "forward" not in ns["teacher"].model.layers[0].mlp.gate.__dict__  # native routing restored on exit


def test_readme_is_short_and_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for link in re.findall(r"\]\(((?!https?:|#)[^)#\s]+)", text):
        assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"
    docs = ROOT / "docs"
    for page in docs.glob("*.md"):
        for link in re.findall(r"\]\(((?!https?:|#)[^)#\s]+)", page.read_text()):
            assert (docs / link).exists(), f"docs/{page.name} links to {link}, which does not exist"
    assert "shared/docs" not in text and not any("shared/docs" in p.read_text() for p in docs.glob("*.md"))


def made_up_source(root: Path) -> list:
    """A local source with every file fetch_data.py knows, two MiniLLM rows each; returns the table for it."""
    import hashlib
    table = []
    for remote in fetch_data.FILES:
        rows = [{"prompt": f"{remote.name} prompt {i}\n\n### Response:\n", "output": f"answer {i}"} for i in range(2)]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        (root / remote.path).parent.mkdir(parents=True, exist_ok=True)
        (root / remote.path).write_bytes(data)
        table.append(fetch_data.Remote(remote.name, remote.path, len(data), 2, hashlib.sha256(data).hexdigest()))
    return table


def test_fetch_data_from_a_file_url_lands_where_eval_looks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_data, "FILES", made_up_source(tmp_path / "src"))
    out = tmp_path / "data"
    assert fetch_data.main(["--out", str(out), "--source", (tmp_path / "src").as_uri()]) == 0
    sets = moe_eval.resolve_sets(None, out)  # eval.py's default: all five sets must exist
    assert set(sets) == set(moe_eval.SETS) and all(path is not None for path in sets.values())
    assert [r["references"] for r in moe_eval.load_set(sets["sinst"], None)] == [["answer 0"], ["answer 1"]]
    assert (out / "dolly" / "dev.jsonl").is_file()  # repro.py's dolly-mini preset and the template test
    assert not list(out.rglob("*.part"))
    # existing files are kept unless --overwrite
    (out / "vicuna" / "valid.jsonl").write_text("mine\n")
    assert fetch_data.main(["--out", str(out), "--source", str(tmp_path / "src"), "--sets", "vicuna"]) == 0
    assert (out / "vicuna" / "valid.jsonl").read_text() == "mine\n" and "kept" in capsys.readouterr().out
    assert fetch_data.main(["--out", str(out), "--source", str(tmp_path / "src"), "--sets", "vicuna",
                            "--overwrite"]) == 0
    assert (out / "vicuna" / "valid.jsonl").read_bytes() == (tmp_path / "src" / "vicuna" / "valid.jsonl").read_bytes()


def test_fetch_data_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    made_up_source(tmp_path / "src")  # right format, but not the checksums of the real files
    out = tmp_path / "data"
    assert fetch_data.main(["--out", str(out), "--source", str(tmp_path / "src"), "--sets", "dolly"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: set dolly: file://\S+/dolly/valid.jsonl has \d+ bytes, expected 505929\n", err)
    assert not (out / "dolly" / "valid.jsonl").exists() and not list(out.rglob("*.part"))
    (tmp_path / "src" / "uinst" / "11_" / "valid.jsonl").write_text("<html>rate limited</html>\n")
    assert fetch_data.main(["--out", str(out), "--source", str(tmp_path / "src"), "--sets", "uinst"]) == 2
    assert "error: set uinst:" in capsys.readouterr().err and not (out / "uinst" / "11_" / "valid.jsonl").exists()
    assert fetch_data.main(["--sets", "dolly,nope", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --sets: unknown set(s) nope; known: dolly, dolly-dev")
    # offline / unreachable: the script as a user runs it, against a local port nobody listens on, exit code 2
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, str(ROOT / "fetch_data.py"), "--out", str(out), "--source",
                           f"http://127.0.0.1:{port}/data", "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert re.fullmatch(rf"error: set dolly: cannot reach http://127.0.0.1:{port}/data/dolly/valid.jsonl \(.*; offline\?\)\n",
                        proc.stderr)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_fetch_data_knows_the_recorded_sources():
    """The checks match the files eval.py reads (where ../shared/data has them, byte for byte)."""
    import hashlib
    assert {f.path for f in fetch_data.FILES} >= set(moe_eval.SETS.values())
    for remote in fetch_data.FILES:
        local = SHARED / remote.path
        if remote.sha256 and local.is_file():
            data = local.read_bytes()
            assert (len(data), len(data.splitlines()), hashlib.sha256(data).hexdigest()) == \
                (remote.size, remote.rows, remote.sha256), remote.name


# ----------------------------------------------------------------------------
# On a GPU (`pytest -m cuda`; bench.py --gpu-check runs them): skipped without CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", moekd.METHODS)
def test_cuda_every_method_steps_in_bf16(tmp_path, method):
    """Every method, two steps on the tiny pair on CUDA in bf16 (autocast, fp32 master weights, the compiled
    sampler with CUDA graphs for on-policy methods): finite losses, the student changed, fp32 weights kept."""
    extra = ["--compile-sampler", "on"] if method in moekd.ON_POLICY else []
    result = moekd.main(run_args(tmp_path / "run", method, "--device", "cuda", "--dtype", "bf16", *extra))
    assert result["finished"] and all(math.isfinite(v) for h in result["history"] for v in h.values())
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    init = moekd.load_model(str(STUDENT)).state_dict()
    assert all(trained[k].dtype == torch.float32 for k in trained) and any(not torch.equal(trained[k], init[k]) for k in init)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", ["llama_moe", "mixtral", "qwen3_moe"])
def test_cuda_routing_conformance(tmp_path, family):
    """On CUDA: top-k routing is the native forward bit for bit, KA at lambda 0 too, all experts differ, the
    KA draws follow the CUDA generator's seed, and the model is restored after each block."""
    model = moekd.load_model(str(TINY if family == "llama_moe" else hf_moe(tmp_path, family)), device="cuda")
    ids = ids_batch().cuda()
    with torch.no_grad():
        native = model(ids).logits
        with moekd.moe_routing(model, "topk"):
            assert torch.equal(model(ids).logits, native)
        with moekd.moe_routing(model, "sample", prob=0.0, generator=torch.Generator("cuda").manual_seed(0)):
            assert torch.equal(model(ids).logits, native)
        draws = []
        for _ in range(2):
            with moekd.moe_routing(model, "sample", prob=1.0, generator=torch.Generator("cuda").manual_seed(5)):
                draws.append(model(ids).logits)
        with moekd.moe_routing(model, "all"):
            dense = model(ids).logits
        assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], native)
        assert not torch.equal(dense, native) and torch.equal(model(ids).logits, native)


@pytest.mark.cuda
@needs_cuda
def test_cuda_seeded_llama_moe_weights_are_drawn_on_the_device():
    """With init_seed on CUDA the weights come from a CUDA generator: on the device, reproducible, the spread
    of normal(0, 0.02), and the same in bf16 as the fp32 draws rounded."""
    cfg = llama_moe.check_llama_moe_config(TINY_CFG, where="test")
    a, b = (llama_moe.build_llama_moe(cfg, device="cuda", init_seed=7) for _ in range(2))
    half = llama_moe.build_llama_moe(cfg, device="cuda", dtype=torch.bfloat16, init_seed=7)
    w = a.lm_head.weight
    assert w.is_cuda and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert abs(float(w.std()) - 0.02) < 1e-3 and abs(float(w.mean())) < 1e-3
    assert torch.equal(half.lm_head.weight, w.to(torch.bfloat16))


@pytest.mark.cuda
@needs_cuda
def test_cuda_sampler_records_its_cuda_graph_once_per_shape_over_200_calls():
    """200 compiled sample_rows calls on CUDA in two batch shapes: the CUDA graphs recorded after the first
    calls of both shapes are all there will be (a new cache per call re-recorded them every call, toward
    torch's re-record limit), no CUDA-graph skip, no new compile; the last call is the eager tokens."""
    import bench
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # the compiled tests before this one count toward dynamo's recompile limit
    model = tiny_causal_lm("Llama").cuda()
    prompts = [[5, 6, 7, 8, 9], [12, 13], [40, 41, 42]]
    skips = counters["inductor"]["cudagraph_skips"]
    with bench.counting_cudagraph_recordings(torch.device("cuda")):
        for i in range(200):
            batch, seeds = prompts[:2 + i % 2], [i, i + 1, i + 2][:2 + i % 2]
            rows = sampling.sample_rows(model, batch, pad_id=0, eos_id=-1, max_new_tokens=4, seeds=seeds,
                                        compile=True)
            if i == 3:
                warm = bench.compile_counters()
        final = bench.compile_counters()
    assert warm["cudagraph_recordings"] >= 2 and final == warm
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert rows == sampling.sample_rows(model, prompts, pad_id=0, eos_id=-1, max_new_tokens=4, seeds=seeds)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_ragged_prompts_sample_finite_logits_and_each_row_as_alone(dtype):
    """On CUDA kernels (SDPA's, in fp32 and bf16), left padding with prompts of 7, 2 and 4 tokens: every
    logit the eager sampler reads is finite, and each row's tokens, eager and compiled with CUDA graphs, are
    those it gets alone (the head sharpened in fp32; in bf16 its larger logits' rounding could flip a draw
    between batch sizes)."""
    torch._dynamo.reset()  # the compiled tests before this one count toward dynamo's recompile limit
    model = tiny_causal_lm("Llama")
    model = (sharpened(model) if dtype == torch.float32 else model).to("cuda", dtype)
    together, alone, logits = ragged_prompt_rows(model, compile=False)
    assert together == alone and len(logits) == 12 and all(bool(t.isfinite().all()) for t in logits)
    together, alone, _ = ragged_prompt_rows(model, compile=True)
    assert together == alone


@pytest.mark.cuda
@needs_cuda
def test_cuda_compiled_sampler_with_cuda_graphs_equals_eager(tokenizer):
    """The compiled decode step with CUDA graphs emits the eager sampler's tokens (fp32), and the counter-based
    noise is the CPU noise."""
    model = moekd.load_model(str(STUDENT), device="cuda")
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]], [3, 1 << 40, 77]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=-1, max_new_tokens=20, seeds=seeds)
    assert sampling.sample_rows(model, prompts, compile=True, **kw) == sampling.sample_rows(model, prompts, **kw)
    keys = sampling.row_keys(seeds, "cuda")
    assert_close(sampling.gumbel_noise(keys, 7, 2039).cpu(), sampling.gumbel_noise(keys.cpu(), 7, 2039))
