"""Routing control on every supported transformers MoE family: one tiny random model per family, built from its
config class (no downloads). Default suite: native equality, KA at prob 0, all experts vs a naive recomputation,
SAR's gradients, restore on errors. `-m slow`: every method with each family as teacher and as student.
docs/families.md's family table is written from FAMILIES and checked here, so it cannot drift."""
import functools
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import moekd

ROOT = Path(__file__).resolve().parent
TINY = ROOT / "tiny_moe"
E, K = 8, 3  # experts, native top-k (3 > 2: a sorted=False top-k orders experts differently)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
DSV3 = dict(n_routed_experts=E, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0,
            routed_scaling_factor=2.5, norm_topk_prob=True)
# model_type -> config overrides of the tiny common ones; the router class decides the mechanism (moekd.HF_ROUTERS)
FAMILIES = {
    "mixtral": dict(num_local_experts=E),
    "minimax": dict(num_local_experts=E, layer_types=["full_attention"] * 2),
    "qwen2_moe": dict(num_experts=E, shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=E, norm_topk_prob=True),
    "olmoe": dict(num_experts=E),
    "flex_olmo": dict(num_experts=E),
    "qwen3_next": dict(num_experts=E, shared_expert_intermediate_size=24, layer_types=["linear_attention", "full_attention"],
                       linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4),
    "qwen3_5_moe_text": dict(num_experts=E, shared_expert_intermediate_size=24,
                             layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4),
    "jamba": dict(num_experts=E, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
                  mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False),
    "hunyuan_v1_moe": dict(num_experts=E, moe_topk=K, use_mixed_mlp_moe=False),
    "ernie4_5_moe": dict(moe_num_experts=E, moe_k=K, moe_layer_start_index=0, moe_num_shared_experts=0),
    "deepseek_v2": dict(n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=0, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", routed_scaling_factor=2.5, **MLA),
    "gpt_oss": dict(num_local_experts=E, layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    "granitemoe": dict(num_local_experts=E),
    "granitemoeshared": dict(num_local_experts=E, shared_intermediate_size=24),
    "granitemoehybrid": dict(num_local_experts=E, shared_intermediate_size=24, layer_types=["mamba", "attention"],
                             mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4),
    "deepseek_v3": dict(DSV3, **MLA),
    "deepseek_v32": dict(DSV3, index_n_heads=2, index_head_dim=8, index_topk=4, **MLA),
    "dots1": dict(DSV3),
    "kimi_linear": dict(DSV3, num_local_experts=E, **MLA),
    "mimo_v2_flash": dict(DSV3, v_head_dim=8, mlp_layer_types=["sparse", "sparse"]),
    "nemotron_h": dict(DSV3, layers_block_type=["moe", "attention"], moe_shared_expert_intermediate_size=24,
                       mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8),
    "glm4_moe": dict(DSV3),
    "glm4_moe_lite": dict(DSV3, **MLA),
    "glm_moe_dsa": dict(DSV3, index_n_heads=2, index_head_dim=8, index_topk=4, **MLA),
    "exaone_moe": dict(DSV3, num_experts=E, num_shared_experts=1),
    "solar_open": dict(DSV3),
    "minimax_m2": dict(num_local_experts=E),
    "lfm2_moe": dict(num_experts=E, num_dense_layers=0, layer_types=["conv", "full_attention"], routed_scaling_factor=2.5),
    "afmoe": dict(num_experts=E, num_dense_layers=0, num_shared_experts=1, route_scale=2.5),
    "llama4_text": dict(num_local_experts=E, num_experts_per_tok=2, intermediate_size_mlp=24),
}


def tiny_config(family: str):
    from transformers import CONFIG_MAPPING
    common = dict(vocab_size=2039, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=24, moe_intermediate_size=16, num_experts_per_tok=K, pad_token_id=2,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return CONFIG_MAPPING[family](**{**common, **FAMILIES[family]})


@functools.lru_cache(maxsize=None)
def _tiny_state(family: str):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    with torch.no_grad():  # random selection biases, so that biased and unbiased selection differ
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.copy_(torch.randn(buf.shape) * 0.1)
    return model


def tiny_moe(family: str):
    """A fresh copy of the family's tiny random model (cached build)."""
    import copy
    return copy.deepcopy(_tiny_state(family))


def ids():
    return torch.tensor([[1, 5, 9, 13, 400, 7, 31, 8], [1, 44, 2000, 3, 3, 81, 17, 600]])
