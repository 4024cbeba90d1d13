"""On a GPU (`pytest -m cuda`; bench.py --gpu-check runs them): skipped without CUDA."""
import math

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import llama_moe
import moekd
import sampling

from conftest import (TINY, STUDENT, TINY_CFG, assert_close, tiny_model, hf_moe, STUDENT_LMS, ids_batch,
                      run_args, sharpened, ragged_prompt_rows)

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", moekd.METHODS)
def test_cuda_every_method_steps_in_bf16(tmp_path, method):
    """Every method, two steps on the tiny pair on CUDA in bf16 (autocast, fp32 master weights, the compiled
    sampler with CUDA graphs for on-policy methods): finite losses, the student changed, fp32 weights kept."""
    extra = ["--compile-sampler", "on"] if moekd.METHODS[method].on_policy else []
    result = moekd.main(run_args(tmp_path / "run", method, "--device", "cuda", "--dtype", "bf16", *extra))
    assert result["finished"] and all(math.isfinite(v) for h in result["history"] for v in h.values())
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    init = checkpoints.load_model(str(STUDENT)).state_dict()
    assert all(trained[k].dtype == torch.float32
               for k in trained) and any(not torch.equal(trained[k], init[k]) for k in init)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", ["llama_moe", "mixtral", "qwen3_moe"])
def test_cuda_routing_conformance(tmp_path, family):
    """On CUDA: top-k routing is the native forward bit for bit, KA at lambda 0 too, all experts differ, the
    KA draws follow the CUDA generator's seed, and the model is restored after each block."""
    model = checkpoints.load_model(str(TINY if family == "llama_moe" else hf_moe(tmp_path, family)),
                                   device="cuda")
    ids = ids_batch().cuda()
    with torch.no_grad():
        native = model(ids).logits
        with moekd.moe_routing(model, "topk"):
            assert torch.equal(model(ids).logits, native)
        with moekd.moe_routing(model, "sample", prob=0.0, generator=torch.Generator("cuda").manual_seed(0)):
            assert torch.equal(model(ids).logits, native)
        draws = []
        for _ in range(2):
            with moekd.moe_routing(model, "sample", prob=1.0,
                                   generator=torch.Generator("cuda").manual_seed(5)):
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
    model = tiny_model(**STUDENT_LMS["Llama"]).cuda()
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
    model = tiny_model(**STUDENT_LMS["Llama"])
    model = (sharpened(model) if dtype == torch.float32 else model).to("cuda", dtype)
    together, alone, logits = ragged_prompt_rows(model, compile=False)
    assert together == alone and len(logits) == 12 and all(bool(t.isfinite().all()) for t in logits)
    together, alone, _ = ragged_prompt_rows(model, compile=True)
    assert together == alone


@pytest.mark.cuda
@needs_cuda
def test_cuda_compiled_sampler_with_cuda_graphs_equals_eager(tokenizer):
    """The compiled decode step with CUDA graphs emits the eager sampler's tokens (fp32), and the
    counter-based noise is the CPU noise."""
    model = checkpoints.load_model(str(STUDENT), device="cuda")
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]], [3, 1 << 40, 77]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=-1, max_new_tokens=20, seeds=seeds)
    assert sampling.sample_rows(model, prompts, compile=True, **kw) == \
        sampling.sample_rows(model, prompts, **kw)
    keys = sampling.row_keys(seeds, "cuda")
    assert_close(sampling.gumbel_noise(keys, 7, 2039).cpu(), sampling.gumbel_noise(keys.cpu(), 7, 2039))
