"""hidden_losses: exact full-vocabulary cross-entropy and KL from final hidden states and output heads,
chunk by chunk, without [tokens, V] logits (moekd's training losses; reverse_kl / forward_kl in moekd.py
are the formulas on logits). Only torch: copy it out on its own.

    loss, (ce_sum, kl_sum) = head_losses(h_student[mask], Head(lm_head.weight), labels, h_teacher[:, mask],
                                         Head(teacher_lm_head.weight), kl_weight=1 / n_tokens)   # KL(q || p)

Each chunk computes its gradients in the forward (hidden states, head weights and biases of both sides; fp32
accumulation of the weight gradient) and drops its logits; the backward only scales them. A chunk's fp32
[rows, V] temporaries hold `chunk_mb` MB each (rows = chunk_mb / (4 V), and / M when M teacher passes need
gradients; frozen passes go one at a time), three to five of them alive at once.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Head(NamedTuple):
    """An output head: logits = cap * tanh(scale * (h W^T + b) / cap) (cap None: scale * (h W^T + b))."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    cap: float | None = None


def head_logits(h: torch.Tensor, head: Head, vocab: int) -> tuple[torch.Tensor, torch.Tensor | float]:
    """fp32 logits [..., vocab] of hidden states h [..., H], and d logits / d (h W^T + b).
    Over the head's first `vocab` rows, the matmul in the autocast dtype; the derivative is the scale, or a
    tensor where the soft cap bends the logits."""
    z = F.linear(h, head.weight[:vocab],
                 None if head.bias is None else head.bias[:vocab]).float().mul_(head.scale)
    if head.cap is None:
        return z, head.scale
    z = z.div_(head.cap).tanh_()
    slope = (1 - z * z).mul_(head.scale)
    return z * head.cap if torch.is_grad_enabled() else z.mul_(head.cap), slope  # tanh's backward keeps z


def _kl_chunk(log_q: torch.Tensor, lp: torch.Tensor, reverse: bool, teacher_grad: bool):
    """KL per row, dKL/dz_student and dKL/dz_teacher (or None) from log q [c, V] and log p [M, c, V].
    Student log q and the M passes' log p, both overwritten. reverse: KL(q || p), log p = mean_m log p_m:
    dz_s = q (log q - log p - KL), dz_m = (p_m - q) / M; else mean_m KL(p_m || q): dz_s = q - mean_m p_m,
    dz_m = p_m (log p_m - log q - KL_m) / M. 0 log 0 = 0 (NaN -> 0)."""
    M, finite = lp.shape[0], dict(nan=0.0, posinf=math.inf, neginf=-math.inf)
    if reverse:
        diff = (lp.mean(0) if M > 1 or teacher_grad else lp[0]).sub_(log_q).neg_()  # log q - log p
        q = log_q.exp_()
        qd = diff.mul_(q).nan_to_num_(**finite)
        kl = qd.sum(-1)
        return (kl, qd.addcmul_(q, kl.unsqueeze(1), value=-1),
                lp.exp_().sub_(q).div_(M) if teacher_grad else None)
    p = lp.exp()
    pd = lp.sub_(log_q).mul_(p).nan_to_num_(**finite)  # p_m (log p_m - log q)
    kl_m = pd.sum(-1)
    g_s = log_q.exp_().sub_(p[0] if M == 1 else p.mean(0))
    return kl_m.mean(0), g_s, pd.addcmul_(p, kl_m.unsqueeze(-1), value=-1).div_(M) if teacher_grad else None


def _kl_passes(log_q: torch.Tensor, ht: torch.Tensor, head: Head, vocab: int, reverse: bool):
    """_kl_chunk's KL per row and dKL/dz_student against M frozen teacher passes' hidden states ht [M, c, H].
    One pass at a time, so the temporaries stay [c, V] whatever M. reverse: log p = the passes' mean
    log-probability, accumulated; else mean_m KL(p_m || q), dz_s = q - mean_m p_m. log_q is overwritten."""
    M, finite = ht.shape[0], dict(nan=0.0, posinf=math.inf, neginf=-math.inf)
    acc, kl = None, 0.0
    for h in ht:
        lp = head_logits(h, head, vocab)[0].log_softmax(-1)
        if reverse:
            acc = lp if acc is None else acc.add_(lp)
            continue
        p = lp.exp()
        kl = lp.sub_(log_q).mul_(p).nan_to_num_(**finite).sum(-1).add_(kl)
        acc = p if acc is None else acc.add_(p)
    if reverse:
        kl, g_s, _ = _kl_chunk(log_q, acc.div_(M).unsqueeze(0), True, False)
        return kl, g_s
    return kl.div_(M), log_q.exp_().sub_(acc.div_(M))


def chunk_rows(chunk_mb: float, vocab: int, passes: int = 1) -> int:
    """Rows per chunk so that one fp32 [rows, V] temporary holds about chunk_mb MB.
    [passes, rows, V] for M teacher passes that need gradients and so go together."""
    return max(1, int(chunk_mb * 2**20) // (4 * vocab * passes))


class _HeadLosses(torch.autograd.Function):
    """head_losses, `chunk` rows at a time, each chunk's gradients computed in the forward.
    The gradients of hidden states, head weights and biases of both sides, so no [rows, V] tensor outlives
    its chunk; backward scales them (once)."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, heads, vocab, chunk_mb, reverse, ce_weight, kl_weight):
        inputs = (hs, ws, bs, ht, wt, bt)
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need else None
                 for x, need in zip(inputs, ctx.needs_input_grad)]
        sums = torch.zeros(2, dtype=torch.float32, device=hs.device)  # CE, KL
        teacher_grad = any(x is not None for x in grads[3:])
        chunk = chunk_rows(chunk_mb, vocab, ht.shape[0] if teacher_grad else 1)
        for r in (slice(i, i + chunk) for i in range(0, hs.shape[0], chunk)):
            log_q, slope = head_logits(hs[r], heads[0]._replace(weight=ws, bias=bs), vocab)
            log_q = log_q.log_softmax(-1)  # the logits are freed here
            g = None
            if labels is not None:  # -log q[label]; d/dz = q - onehot
                lab = labels[r].unsqueeze(1)
                sums[0] -= log_q.gather(1, lab).sum()
            if ce_weight:
                g = log_q.exp().scatter_add_(1, lab,
                                             torch.full(lab.shape, -1.0, device=lab.device)).mul_(ce_weight)
            if ht is not None:
                head_t = heads[1]._replace(weight=wt, bias=bt)
                if ht.shape[0] == 1 or teacher_grad:
                    lp, slope_t = head_logits(ht[:, r], head_t, vocab)
                    kl, g_kl, g_t = _kl_chunk(log_q, lp.log_softmax(-1), reverse, teacher_grad)
                else:  # KA's M frozen passes, one at a time
                    (kl, g_kl), g_t = _kl_passes(log_q, ht[:, r], head_t, vocab, reverse), None
                sums[1] += kl.sum()
                g = g_kl.mul_(kl_weight) if g is None else g.add_(g_kl, alpha=kl_weight)
                if g_t is not None:
                    _back_through_head(g_t.mul_(slope_t).mul_(kl_weight), ht[:, r], wt, grads[3:], r, vocab)
            if g is not None and any(x is not None for x in grads[:3]):
                _back_through_head(g.mul_(slope), hs[r], ws, grads[:3], r, vocab)
        ctx.grads, ctx.dtypes = grads, [None if x is None else x.dtype for x in inputs]
        total = sums[0] * ce_weight + sums[1] * kl_weight
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        # scaled in place: a second backward is an error, not a wrong gradient
        grads, ctx.grads = ctx.grads, None
        return (*(None if g is None else g.mul_(grad).to(dtype) for g, dtype in zip(grads, ctx.dtypes)),
                *[None] * 7)


def _back_through_head(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, grads: list, r: slice,
                       vocab: int) -> None:
    """Accumulate one chunk's d/dh = g W, d/dW += g^T h, d/db += Sum g; dW in fp32.
    Rows r; g [..., c, vocab]."""
    gh, gw, gb = grads
    if gh is not None:
        gh[..., r, :] = g.to(w.dtype) @ w[:vocab]
    if gw is not None:
        with torch.autocast(g.device.type, enabled=False):
            gw[:vocab].addmm_(g.reshape(-1, vocab).t(), h.reshape(-1, h.shape[-1]).float())
    if gb is not None:
        gb[:vocab] += g.reshape(-1, vocab).sum(0)


def head_losses(hs: torch.Tensor, head_s: Head, labels: torch.Tensor | None = None,
                ht: torch.Tensor | None = None, head_t: Head | None = None, *, ce_weight: float = 0.0,
                kl_weight: float = 0.0, reverse: bool = True, vocab: int | None = None,
                chunk_mb: float = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """ce_weight * Sum CE(q, labels) + kl_weight * Sum KL over the rows of hidden states, chunked, in fp32.
    Student hs [n, Hs] (and M teacher passes' ht [M, n, Ht]); exact over the first `vocab` rows of both
    heads (default: all the student's), without [n, V] logits: chunks of rows whose fp32 [rows, V]
    temporaries hold about chunk_mb MB each. reverse: KL(q_student || p_teacher) with
    log p = mean_m log p_m, which is the mean of the M KLs; else mean_m KL(p_m || q).
    Returns (the weighted sum, differentiable; [CE sum, KL sum], detached)."""
    vocab = vocab or head_s.weight.shape[0]
    t = (None, None, None) if ht is None else (ht, head_t.weight, head_t.bias)
    return _HeadLosses.apply(hs, head_s.weight, head_s.bias, *t, labels, (head_s, head_t), vocab, chunk_mb,
                             reverse, ce_weight, kl_weight)


class _ChunkedLoss(torch.autograd.Function):
    """chunked_loss, `chunk` rows at a time, each chunk's logits recomputed under autograd.
    The loss's gradients are taken there (torch.autograd.grad) and accumulated, and the chunk's [rows, V]
    tensors dropped."""

    @staticmethod
    def forward(ctx, loss_fn, hs, ws, bs, ht, wt, bt, heads, vocab, chunk_mb):
        inputs = (hs, ws, bs, ht, wt, bt)
        need = ctx.needs_input_grad[1:7]
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) if n else None
                 for x, n in zip(inputs, need)]
        total = torch.zeros((), dtype=torch.float32, device=hs.device)
        chunk = chunk_rows(chunk_mb, vocab, 2 * ht.shape[0] + 2)  # q, p and their gradients
        for r in (slice(i, i + chunk) for i in range(0, hs.shape[0], chunk)):
            with torch.enable_grad():
                leaves = [None if x is None else (x[r] if i == 0 else x[:, r] if i == 3 else x).detach()
                          .requires_grad_(bool(n)) for i, (x, n) in enumerate(zip(inputs, need))]
                log_q = head_logits(leaves[0], heads[0]._replace(weight=leaves[1], bias=leaves[2]), vocab)[0]
                log_p = head_logits(leaves[3], heads[1]._replace(weight=leaves[4], bias=leaves[5]), vocab)[0]
                loss = loss_fn(log_q.log_softmax(-1), log_p.log_softmax(-1)).sum()
                wanted = [x for x, n in zip(leaves, need) if n]
                found = iter(torch.autograd.grad(loss, wanted) if wanted else ())
            for i, n in enumerate(need):
                if n:
                    g = next(found).float()
                    if i == 0:
                        grads[0][r] = g
                    elif i == 3:
                        grads[3][:, r] = g
                    else:
                        grads[i] += g
            total += loss.detach()
        ctx.grads, ctx.dtypes = grads, [None if x is None else x.dtype for x in inputs]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        return (None, *(None if g is None else g.mul_(grad).to(d) for g, d in zip(grads, ctx.dtypes)),
                None, None, None)


def chunked_loss(loss_fn, hs: torch.Tensor, head_s: Head, ht: torch.Tensor, head_t: Head, *,
                 vocab: int | None = None, chunk_mb: float = 32) -> torch.Tensor:
    """Sum over rows of loss_fn(log_q [c, V], log_p [M, c, V]) -> [c], without [n, V] logits.
    From student hidden states hs [n, Hs] and M teacher passes' ht [M, n, Ht]: any new loss is one function
    of log-probabilities. Each chunk's gradients come from torch.autograd.grad on its recomputed logits
    (slower than head_losses' hand-derived KLs, which the paper's methods use; the same memory bound)."""
    vocab = vocab or head_s.weight.shape[0]
    return _ChunkedLoss.apply(loss_fn, hs, head_s.weight, head_s.bias, ht, head_t.weight, head_t.bias,
                              (head_s, head_t), vocab, chunk_mb)


def reverse_kl_rows(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per row with log p = mean_m log p_m (KA's mean over M passes); 0 log 0 = 0."""
    q = log_q.exp()
    return (q * (log_q - log_p.mean(0)).masked_fill(q == 0, 0.0)).sum(-1)


def forward_kl_rows(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """mean_m KL(p_m || q) per row (KD's soft term; ka-gold's M passes); 0 log 0 = 0."""
    p = log_p.exp()
    return (p * (log_p - log_q).masked_fill(p == 0, 0.0)).sum(-1).mean(0)


def jsd_rows(log_q: torch.Tensor, log_p: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per row, against the first teacher pass.
    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (GKD's, Agarwal et al. 2024)."""
    log_p = log_p[0]
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    def kl(log_a):
        return (log_a.exp() * (log_a - log_m).masked_fill(log_a == -math.inf, 0.0)).sum(-1)
    return beta * kl(log_p) + (1 - beta) * kl(log_q)
