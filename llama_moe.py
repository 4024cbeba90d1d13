"""Llama-MoE (pjlab-sys4nlp/llama-moe), the paper's teachers, on a transformers-5 Llama backbone: no
remote code.

A model file in the manner of transformers' modeling_*.py: the TopKBalancedNoisyGate with the official
numerics (noise in train mode, softmax over the selected logits, smooth load, unbiased cv^2 balance loss),
SwiGLU experts of per-layer sizes scaled by score_scale_factor, config checks, the checkpoint keys, and the
sharded safetensors output of the released checkpoints' format. checkpoints.load_model builds it (and reads
the weight files into it) when a checkpoint's config.json says model_type "llama_moe". The gate follows
moekd's router protocol: `routing` None is its native top-k, else a callable (logits [N, E], k) ->
(index [N, K], kept slots [N, K] or None).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import MoekdError


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var/mean^2 with torch's *unbiased* variance (official gate)."""
    if x.numel() <= 1:
        return x.new_zeros((), dtype=torch.float32)
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def routing_weights(logits: torch.Tensor, index: torch.Tensor,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """Llama-MoE weights: softmax over the *selected* (kept) logits only, in fp32, cast back: [N, K]."""
    chosen = logits.gather(1, index).float()
    if keep is not None:
        chosen = chosen.masked_fill(~keep, -math.inf)
    return torch.softmax(chosen, dim=-1).to(logits.dtype)


def smooth_load(clean: torch.Tensor, noise: torch.Tensor, noise_std: torch.Tensor,
                top_values: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al.'s differentiable load, Sum_t P(expert e stays in the top-k) -> [E].

    As the official Llama-MoE gate: `is_in` compares the *noise term* (not the noisy logit)
    with the (k+1)-th largest noisy logit; that quirk is kept on purpose."""
    normal = torch.distributions.Normal(0.0, 1.0)
    threshold_in = top_values[:, k:k + 1]       # [N, 1], (k+1)-th largest noisy logit
    threshold_out = top_values[:, k - 1:k]      # [N, 1], k-th largest
    prob_in = normal.cdf((clean - threshold_in) / noise_std)
    prob_out = normal.cdf((clean - threshold_out) / noise_std)
    return torch.where(noise > threshold_in, prob_in, prob_out).sum(0)


def official_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The official gate's top-k [N, k]: the first k of topk(k + 1), its order among ties."""
    return scores.topk(min(k + 1, scores.shape[-1]), dim=-1).indices[:, :k]


def gate_balance_loss(importance: torch.Tensor, load: torch.Tensor, weight: float) -> torch.Tensor:
    """w * (cv^2(importance) + cv^2(load)), one layer's balance loss."""
    return weight * (cv_squared(importance) + cv_squared(load))


class LlamaMoEGate(nn.Module):
    """Llama-MoE's TopKBalancedNoisyGate: forward(x [N, H]) -> (index [N, K], weights [N, K]).
    It stores this call's balance loss in `self.balance_loss`. Keys: gate.gate_network.{0,2}.weight (mlp)
    or gate.gate_network.weight (linear), gate.weight_noise.weight."""

    def __init__(self, hidden_size: int, num_experts: int, num_selects: int, *, gate_network: str,
                 add_noise: bool, noise_epsilon: float, use_balance: bool, balance_loss_weight: float):
        super().__init__()
        E = num_experts
        if gate_network == "mlp":  # Linear -> Tanh -> Linear, no biases (index 1 is the Tanh)
            self.gate_network = nn.Sequential(nn.Linear(hidden_size, E, bias=False), nn.Tanh(),
                                              nn.Linear(E, E, bias=False))
        else:
            self.gate_network = nn.Linear(hidden_size, E, bias=False)
        self.weight_noise = nn.Linear(hidden_size, E, bias=False) if add_noise else None
        self.num_experts, self.top_k = E, num_selects
        self.add_noise, self.noise_epsilon = add_noise, noise_epsilon
        self.use_balance, self.balance_loss_weight = use_balance, balance_loss_weight
        self.balance_loss: torch.Tensor | None = None
        self.routing = None  # moekd's router protocol: None = native top-k, else (logits, k) -> (index, keep)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = self.gate_network(x)                                    # [N, E]
        noise = noise_std = None
        if self.training and self.add_noise:  # noise only in train mode (official)
            noise_std = F.softplus(self.weight_noise(x)) + self.noise_epsilon
            noise = torch.randn_like(clean) * noise_std
        logits = clean if noise is None else clean + noise
        if self.routing is None:
            index, keep = official_top_k(logits, self.top_k), None
        else:
            index, keep = self.routing(logits, self.top_k, official_top_k)  # [N, K]
        weights = routing_weights(logits, index, keep)                   # [N, K]
        k = index.shape[1]
        if self.use_balance:
            full = torch.zeros_like(logits).scatter(1, index, weights)  # [N, E]
            importance = full.sum(0)
            top_k_mode = self.routing is None or self.routing.mode == "topk"
            if noise is not None and k < self.num_experts and top_k_mode:
                top_values = logits.topk(k + 1, dim=-1).values
                load = smooth_load(clean, noise, noise_std, top_values, k)
            else:
                load = (full > 0).sum(0)  # hard count, no gradient
            self.balance_loss = gate_balance_loss(importance, load, self.balance_loss_weight)
        else:
            self.balance_loss = None
        return index, weights


class LlamaMoEExperts(nn.Module):
    """SwiGLU experts of per-expert sizes s_j.
    Keys weight_gate.j [s_j, H], weight_up.j [s_j, H], weight_down.j [H, s_j] (nn.ParameterLists, as the
    checkpoints)."""

    def __init__(self, hidden_size: int, sizes: list[int]):
        super().__init__()
        H = hidden_size
        self.weight_gate = nn.ParameterList([nn.Parameter(torch.empty(s, H)) for s in sizes])
        self.weight_up = nn.ParameterList([nn.Parameter(torch.empty(s, H)) for s in sizes])
        self.weight_down = nn.ParameterList([nn.Parameter(torch.empty(H, s)) for s in sizes])

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.weight_gate[j])) * F.linear(x, self.weight_up[j]),
                        self.weight_down[j])


class LlamaMoECalculator(nn.Module):
    """UniversalCalculator: y = Sum_{j in selected} weight_j * score_scale_factor * expert_j(x)."""

    def __init__(self, hidden_size: int, sizes: list[int], score_scale_factor: float):
        super().__init__()
        self.experts = LlamaMoEExperts(hidden_size, sizes)
        self.score_scale_factor = score_scale_factor

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        E = len(self.experts.weight_gate)
        if index.shape[1] == E:
            return self.all_experts(x, index, weights)
        y = torch.zeros_like(x)                                         # [N, H]
        for j in range(E):
            token, slot = (index == j).nonzero(as_tuple=True)          # tokens routed to expert j
            if token.numel() == 0:
                continue
            scale = (weights[token, slot] * self.score_scale_factor).unsqueeze(1)
            y.index_add_(0, token, (self.experts.expert(j, x[token]) * scale).to(y.dtype))
        return y


    def all_experts(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token (ALL, SAR, k = N) in three matmuls over the concatenated weights.
        The experts are slices of one SwiGLU FFN, so these replace the per-expert loop; each expert's
        hidden units are scaled by its routing weight before the down projection."""
        ex = self.experts
        sizes = torch.tensor([w.shape[0] for w in ex.weight_gate], device=x.device)
        full = torch.zeros(x.shape[0], len(sizes), dtype=weights.dtype, device=x.device).scatter(
            1, index, weights)
        scale = (full * self.score_scale_factor).repeat_interleave(sizes, dim=1)          # [N, I]
        hidden = F.silu(F.linear(x, torch.cat(list(ex.weight_gate)))) * \
            F.linear(x, torch.cat(list(ex.weight_up)))
        return F.linear((hidden * scale).to(x.dtype), torch.cat(list(ex.weight_down), dim=1))


class LlamaMoELayer(nn.Module):
    """LinearGLUMoELayer, the MLP of every Llama-MoE decoder layer (key prefix `mlp.`)."""

    def __init__(self, moe_config: dict, layer_idx: int):
        super().__init__()
        c = moe_config
        self.gate = LlamaMoEGate(c["hidden_size"], c["num_experts"], c["num_selects"],
                                 gate_network=c["gate_network"], add_noise=c["gate_add_noise"],
                                 noise_epsilon=c["gate_noise_epsilon"], use_balance=c["gate_use_balance"],
                                 balance_loss_weight=c["gate_balance_loss_weight"])
        self.calculator = LlamaMoECalculator(c["hidden_size"], expert_sizes(c, layer_idx),
                                             layer_value(c["score_scale_factor"], layer_idx))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(B * T, H)  # the gate sees pad tokens too (official)
        index, weights = self.gate(x)
        return self.calculator(x, index, weights).view(B, T, H)


LLAMA_MOE_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_experts", "num_selects")


LLAMA_MOE_DEFAULTS = dict(  # LlamaMoEConfig's defaults for the optional fields
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    rope_scaling=None, attention_bias=False, size_experts=None, gate_type="TopKBalancedNoisyGate",
    gate_network="mlp", gate_use_softmax=True, gate_use_balance=True, gate_balance_loss_weight=1e-2,
    gate_add_noise=True, gate_noise_epsilon=1e-2, calculator_type="UniversalCalculator",
    multiply_gate_scores=True, score_scale_factor=1.0)


def layer_value(value, layer_idx: int):
    """A config value that is either one scalar or a per-layer list."""
    return value[layer_idx] if isinstance(value, list) else value


def expert_sizes(c: dict, layer_idx: int) -> list[int]:
    """Per-expert hidden sizes of one layer: size_experts[layer] or an even split of intermediate_size."""
    if c["size_experts"] is None:
        return [c["intermediate_size"] // c["num_experts"]] * c["num_experts"]
    return list(c["size_experts"][layer_idx])


def check_llama_moe_config(raw: dict, *, where: str) -> dict:
    """Complete a llama_moe config.json with LlamaMoEConfig's defaults; reject what we can't run."""
    missing = [k for k in LLAMA_MOE_REQUIRED if k not in raw]
    if missing:
        raise MoekdError(f"{where}: Llama-MoE config is missing required field(s) {', '.join(missing)}")
    c = {**LLAMA_MOE_DEFAULTS, **raw}
    unsupported = {"gate_type": "TopKBalancedNoisyGate", "calculator_type": "UniversalCalculator",
                   "gate_use_softmax": True, "multiply_gate_scores": True, "hidden_act": "silu",
                   "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False}
    for key, supported in unsupported.items():
        if c[key] != supported:
            raise MoekdError(f"{where}: {key}={c[key]!r} is not supported (only {supported!r})")
    if c["gate_network"] not in ("mlp", "linear"):
        raise MoekdError(f"{where}: gate_network must be 'mlp' or 'linear', got {c['gate_network']!r}")
    L, E = c["num_hidden_layers"], c["num_experts"]
    if not 1 <= c["num_selects"] <= E:
        raise MoekdError(f"{where}: num_selects={c['num_selects']} must be in [1, num_experts={E}]")
    if isinstance(c["score_scale_factor"], list) and len(c["score_scale_factor"]) != L:
        raise MoekdError(f"{where}: score_scale_factor has {len(c['score_scale_factor'])} entries, "
                         f"need one per layer ({L})")
    if c["size_experts"] is None:
        if c["intermediate_size"] % E:
            raise MoekdError(f"{where}: intermediate_size {c['intermediate_size']} is not divisible by "
                             f"num_experts {E}; give size_experts")
    elif len(c["size_experts"]) != L or any(
            len(s) != E or sum(s) != c["intermediate_size"] for s in c["size_experts"]):
        raise MoekdError(f"{where}: size_experts must be {L} lists of {E} sizes summing to "
                         f"intermediate_size {c['intermediate_size']}")
    return c


def llama_config_from_moe(c: dict):
    """The transformers LlamaConfig of the dense backbone.
    RoPE base 10000 is hard-coded in Llama-MoE (its configs carry no rope_theta)."""
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], hidden_act="silu",
        max_position_embeddings=c["max_position_embeddings"], initializer_range=c["initializer_range"],
        rms_norm_eps=c["rms_norm_eps"], pad_token_id=c["pad_token_id"], bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build_llama_moe(moe_config: dict, *, device: torch.device | str = "cpu", dtype=torch.float32,
                    init_seed: int | None = None) -> nn.Module:
    """A transformers LlamaForCausalLM whose layers[i].mlp is a LlamaMoELayer.

    Built on the meta device (no time or memory spent on the dense MLPs it replaces), then
    materialised on `device`; with `init_seed` the weights are drawn like Llama's init
    (normal(0, initializer_range), norms 1), else left empty for a checkpoint to fill."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = llama_config_from_moe(moe_config)
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
            for i, layer in enumerate(model.model.layers):
                layer.mlp = LlamaMoELayer(moe_config, i)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    with torch.device(device):  # non-persistent RoPE buffers were lost on meta
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.moe_config = moe_config
    if init_seed is not None:
        # drawn where the weights live, by a generator of that device: the paper-shape teacher's 6.7e9 values
        # take ~40 s on one CPU thread plus a 13.5 GB copy, well under a second on a GPU (on the CPU the
        # draws are the same as ever; a CUDA generator gives other, equally seeded weights)
        device, std = torch.device(device), moe_config["initializer_range"]
        g = torch.Generator(device=device).manual_seed(init_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=device).mul_(std))
    return model


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over layers of the balance losses stored by the last forward (LlamaMoEModel's sum)."""
    losses = [m.balance_loss for m in model.modules()
              if isinstance(m, LlamaMoEGate) and m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else None


def save_llama_moe(model: nn.Module, directory: Path, *, state_dict: dict[str, torch.Tensor] | None,
                   max_shard_bytes: int) -> None:
    """The checkpoint format of the Llama-MoE releases: config.json and (sharded) safetensors."""
    from safetensors.torch import save_file
    c = {k: v for k, v in model.moe_config.items() if k != "moekd_init_seed"}
    c.update(model_type="llama_moe", architectures=["LlamaMoEForCausalLM"],
             torch_dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
