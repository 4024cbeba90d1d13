"""Tests of the method in moekd.py: the losses (both KL directions, exactness, gradients, masking), the method
steps (on-policy data, KD, KA, SAR, accumulation), and that the routing and losses copy out of the file.
Routing control: tests/test_routing.py; the losses from hidden states: tests/test_hidden_losses.py; every
other area (model port, data, runs, evaluation, ...): tests/. CPU, offline, tiny models. Run: pytest -q"""
import contextlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoints
import data
import errors
import hidden_losses
import moekd
from tiny_moe import synthetic

from conftest import ROOT, TINY, STUDENT, TINY_CFG, assert_close, hf_moe, ids_batch, tiny_model

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


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
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in teacher.parameters())


# ----------------------------------------------------------------------------
# Distillation losses: direction, exactness, gradients, masking

def naive_kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per row, one row at a time, in float64."""
    out = []
    for a, b in zip(p_logits.reshape(-1, p_logits.shape[-1]).double(),
                    q_logits.reshape(-1, q_logits.shape[-1]).double()):
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
    # F.kl_div(input, target) = KL(target || input):
    # reverse KL is kl_div(input=log p_teacher, target=q_student)
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
    """Both KLs' gradients, on both sides, are the textbook formula's, also where both sides give a token
    probability 0 (logit -inf): the reference writes those logits as -1e4, whose float64 probability is
    exactly 0, so its autograd is NaN-free; moekd's must give the same gradients (0 at the -inf logits)."""
    a = torch.randn(2, 4, 7, dtype=torch.float64)
    b = torch.randn(2, 4, 7, dtype=torch.float64)
    for x in (a, b):
        x[0, 1, 3] = x[1, 2, 0] = float("-inf")
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    def textbook(x, y):  # KL(softmax(x) || softmax(y)) per position
        lx, ly = x.log_softmax(-1), y.log_softmax(-1)
        return (lx.exp() * (lx - ly)).sum(-1)
    for kl, flip in ((moekd.reverse_kl, False), (moekd.forward_kl, True)):
        s, t = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        kl(s, t, mask).backward()
        rs, rt = (x.clone().nan_to_num(neginf=-1e4).requires_grad_(True) for x in (a, b))
        per = textbook(rt, rs) if flip else textbook(rs, rt)
        ((per * mask).sum() / mask.sum()).backward()
        assert not torch.isnan(s.grad).any() and not torch.isnan(t.grad).any()
        assert_close(s.grad, rs.grad)
        assert_close(t.grad, rt.grad)


def test_kl_chunking_does_not_change_values():
    """The hidden-state loss training uses: one row per chunk or all rows in one give the same KL and CE."""
    n, H, V = 15, 6, 11
    hs, ht = torch.randn(n, H), torch.randn(1, n, H)
    head_s, head_t = hidden_losses.Head(torch.randn(V, H)), hidden_losses.Head(torch.randn(V, H))
    labels = torch.randint(0, V, (n,))
    small, big = (hidden_losses.head_losses(hs, head_s, labels, ht, head_t, ce_weight=1.0, kl_weight=1.0,
                                            chunk_mb=mb)[1] for mb in (1e-9, 4096))
    assert_close(small, big)


def test_ka_mean_of_m_kls_is_one_fused_kl():
    """KA's M passes in one chunked loss from hidden states = the mean of the M plain reverse KLs."""
    n, H, V, M = 10, 6, 13, 3
    hs = torch.randn(n, H, requires_grad=True)
    ht = torch.randn(M, n, H)
    head_s, head_t = hidden_losses.Head(torch.randn(V, H)), hidden_losses.Head(torch.randn(V, H))
    fused, _ = hidden_losses.head_losses(hs, head_s, ht=ht, head_t=head_t, kl_weight=1 / n, chunk_mb=1e-9)
    (g_fused,) = torch.autograd.grad(fused, hs)
    mask = torch.ones(1, n, dtype=torch.bool)
    q = (hs @ head_s.weight.T)[None]
    looped = sum(moekd.reverse_kl(q, (ht[m] @ head_t.weight.T)[None], mask) for m in range(M)) / M
    (g_looped,) = torch.autograd.grad(looped, hs)
    assert_close(fused, looped)
    assert_close(g_fused, g_looped)


# ----------------------------------------------------------------------------
# On-policy data, method steps, SAR

class StubStudent(torch.nn.Module):
    """Returns canned continuations from generate(), so masking is tested without a real model."""

    def __init__(self, continuations, eos):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuations, self.eos, self.seen = continuations, eos, None

    def generate(self, input_ids, attention_mask, generation_config):
        self.seen = (input_ids.clone(), attention_mask.clone(), generation_config)
        width = max(len(c) for c in self.continuations)
        rows = [input_ids[i].tolist() + c + [self.eos] * (width - len(c))
                for i, c in enumerate(self.continuations)]
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
    assert (gen.do_sample, gen.top_k, gen.top_p, gen.temperature, gen.max_new_tokens) == \
        (True, 0, 1.0, 1.0, 4)
    batch = moekd.collate(items, eos)
    assert moekd.loss_mask(batch["labels"]).tolist() == [[False, True, True, True, False],
                                                         [True, True, True, True, False]]


def test_response_through_eos():
    assert moekd.response_through_eos([4, 2, 2, 7], 2) == [4, 2]
    assert moekd.response_through_eos([2, 5], 2) == [2]
    assert moekd.response_through_eos([4, 5, 6], 2) == [4, 5, 2]


def training_setup(method, *, teacher=TINY, student=STUDENT, **overrides):
    cfg = moekd.Config(method=method, model=str(student), teacher=str(teacher), max_prompt_len=96,
                       max_len=128, **overrides)
    tok = checkpoints.load_tokenizer(str(student))
    model = checkpoints.load_model(str(student))
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
    teacher = FixedLogits(torch.tensor([[0.7, 0.2, 0.1], [1.0, 1.0, 1.0],
                                        [1.0, 1.0, 1.0]]).log().unsqueeze(0))
    student = FixedLogits(torch.tensor([[0.2, 0.5, 0.3], [1.0, 1.0, 1.0],
                                        [1.0, 1.0, 1.0]]).log().unsqueeze(0))
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long),
             "attention_mask": torch.ones(1, 3, dtype=torch.long),
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
    logs = moekd.sar_router_update(model, teacher, micro, norms, cfg,
                                   moekd.method_state(cfg, teacher, torch.float32))
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
        t = teacher(input_ids=rep["input_ids"],
                    attention_mask=rep["attention_mask"]).logits.view(3, 4, *batch["labels"].shape[1:], -1)
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
    monkeypatch.setattr(moekd, "moe_routing", lambda model, mode, **kw: seen.append((mode, kw))
                        or contextlib.nullcontext())
    moekd.teacher_routing(None, moekd.Config(method="kd", teacher_top_p=0.6), None)
    moekd.teacher_routing(None, moekd.Config(method="kd", teacher_top_p=0.6, routed_mass="literal"), None)
    assert seen == [("topp", {"top_p": 0.6, "mass": "native"}), ("topp", {"top_p": 0.6, "mass": "literal"})]
    with pytest.raises(errors.MoekdError, match="--teacher-top-p"):
        moekd.Config(method="kd", teacher_top_p=0.6, teacher_k=2)


def test_select_defaults_follow_the_official_scripts():
    assert [moekd.Config(method=m).select for m in moekd.METHODS] == \
        ["best", "best", "last", "last", "last", "last", "best"]
    assert moekd.Config(method="sft", dev_eval=False).select == "last"
    with pytest.raises(errors.MoekdError, match="--select best needs the dev evaluation"):
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
        cfg, model, teacher, tok, rows = training_setup(method, batch_size=batch_size, grad_accum=accum,
                                                        ka_lambda=0.0)
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
    on, off = moekd.Config(method="gkd", batch_size=4), moekd.Config(method="gkd", batch_size=4,
                                                                     restart_epochs=False)
    assert on.restart_epochs and not moekd.Config(method="sft").restart_epochs
    assert moekd.step_rows(items, on, 3, 3) == moekd.step_rows(items, on, 0, 3)
    assert moekd.step_rows(items, off, 3, 3) != moekd.step_rows(items, off, 0, 3)


def test_a_new_method_is_one_row_and_one_step(monkeypatch, teacher, student, tokenizer):
    """An on-policy JSD method (GKD's generalised JSD, beta 0.5): a Method row, a STEPS entry and a step of a
    few lines on hidden_losses.chunked_loss; its loss equals the JSD written out on the full logits (float64)
    and its gradient reaches the student."""
    def jsd_step(model, teacher, batch, cfg, *, norm, n_micro, state):
        with moekd.teacher_routing(teacher, cfg, state.generator):
            t = moekd.teacher_hidden(teacher, batch, amp_dtype=state.amp_dtype)
        h, _ = moekd.forward_with_balance(model, batch)
        mask = moekd.loss_mask(batch["labels"]).view(-1)
        loss = hidden_losses.chunked_loss(hidden_losses.jsd_rows, h.flatten(0, 1)[mask],
                                          moekd.output_head(model),
                                          t.view(1, -1, t.shape[-1])[:, mask],
                                          moekd.output_head(teacher)) / norm
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
    assert abs(float(loss.detach()) - float(by_hand)) < 1e-5 * float(by_hand) + 1e-7
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_router_file_with_other_keys_is_rejected(tmp_path, teacher):
    from safetensors.torch import save_file
    save_file({"model.layers.0.mlp.gate.extra": torch.zeros(2)}, tmp_path / "r.safetensors")
    with pytest.raises(errors.MoekdError, match="router keys do not match the teacher"):
        moekd.load_routers(teacher, tmp_path / "r.safetensors")


# ----------------------------------------------------------------------------
# Layout: the method copies out of moekd.py

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


COPY_OUT_CHECK = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from copied import moe_routing, reverse_kl, forward_kl

def textbook(a, b):  # KL(softmax(a) || softmax(b)) per position, float64
    la, lb = a.double().log_softmax(-1), b.double().log_softmax(-1)
    return (la.exp() * (la - lb)).sum(-1)

for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").eval()  # CPU sizes
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(ids).logits
        with moe_routing(model, "topk"):
            assert torch.equal(model(ids).logits, native), folder      # top-k through the copy: bit-identical
        with moe_routing(model, "sample", prob=0.0, generator=torch.Generator().manual_seed(0)):
            assert torch.equal(model(ids).logits, native), folder      # KA at lambda 0 = native
        with moe_routing(model, "all"):
            dense = model(ids).logits
    assert not torch.equal(dense, native), folder
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[:, 0] = False
    n = mask.sum()
    for got, want in ((reverse_kl(native, dense, mask), textbook(native, dense)),
                      (forward_kl(native, dense, mask), textbook(dense, native))):
        torch.testing.assert_close(got.double(), (want * mask).sum() / n, atol=1e-6, rtol=1e-4)
project = {"moekd", "checkpoints", "cli", "data", "errors", "hidden_losses", "llama_moe", "parallel",
           "sampling"}
print(json.dumps({"ok": len(sys.argv) - 1, "project_modules": sorted(project & set(sys.modules))}))
"""


def test_routing_and_losses_copy_out_of_moekd(tmp_path):
    """moe_routing, reverse_kl and forward_kl with everything they need, written to a file of their own, run
    in a bare interpreter (python -E -s from that folder: no PYTHONPATH, the project not on the path) on three
    families with different mechanisms: Mixtral (softmax, renormalised), Qwen3-MoE (softmax, native mass),
    Dots1 (DeepSeek-V3's sigmoid router with groups and bias). docs/methods.md gives the closure's line
    count."""
    code = closure_source({"moe_routing", "reverse_kl", "forward_kl"})
    project = "checkpoints|cli|parallel|llama_moe|sampling|errors|data|hidden_losses"
    assert "LlamaMoE" not in code and not re.search(rf"^(from|import) ({project})\b", code, re.M)
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "copied.py").write_text(code)
    (folder / "check.py").write_text(COPY_OUT_CHECK)
    models = [hf_moe(tmp_path, "mixtral"), hf_moe(tmp_path, "qwen3_moe"), tmp_path / "dots1"]
    tiny_model("dots1", random_routers=True, vocab_size=2039, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=24,
               moe_intermediate_size=16, num_experts_per_tok=2, n_routed_experts=6, n_shared_experts=1,
               n_group=2, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
               norm_topk_prob=True).save_pretrained(models[2])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-E", "-s", str(folder / "check.py"), *map(str, models)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"ok": 3, "project_modules": []}
