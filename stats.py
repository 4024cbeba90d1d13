"""stats.py: the small statistics of repro.py's multi-seed tables, standard library only.

Student-t quantiles (computed, not tabled), mean and 95% t-interval over training seeds, paired differences
(same training seed, same eval seeds, same examples) and the plain-words verdict on them.
"""
from __future__ import annotations

import math

LEVEL = 0.95
METHOD = ("95% Student-t interval over training seeds: each training seed contributes one number (a row's "
          "Avg, or the paired difference of two rows' Avgs from the same training seed, both evaluated on "
          "the same eval seeds and examples), Avg = mean over the sets of the mean over eval seeds; "
          "interval = mean ± t(0.975, n-1) · s / sqrt(n), s the sample standard deviation of the n "
          "per-seed numbers")
BOOTSTRAP_METHOD = ("a hierarchical percentile bootstrap of the same paired difference (2000 draws: "
                    "training seeds with replacement, then each set's examples with replacement, paired; "
                    "per-example scores averaged over eval seeds)")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df >= 1 degrees of freedom (bisection on t_cdf, to 1e-10)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


def mean_ci(values: list[float], level: float = LEVEL) -> dict:
    """Mean, sample std and the two-sided t-interval of the mean.
    With one value the std and interval are None."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "half": None, "lo": None, "hi": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half}


def paired_difference(a: dict, b: dict, level: float = LEVEL) -> dict:
    """a - b paired by key (training seed): mean_ci of the per-key differences over the keys both have."""
    keys = [k for k in a if k in b]
    if not keys:
        raise ValueError("paired_difference: no training seed in common")
    return {**mean_ci([a[k] - b[k] for k in keys], level), "seeds": keys}


def verdict(ci: dict) -> str:
    """Plain words for a difference's interval: better / worse / within noise, or no interval at all."""
    if ci["n"] < 2:
        return "one training seed: no interval"
    if ci["lo"] > 0:
        return "better"
    if ci["hi"] < 0:
        return "worse"
    return "within noise at this scale"


def fmt(ci: dict, digits: int = 2) -> str:
    """'mean ± half' (or the mean alone when there is no interval)."""
    return f"{ci['mean']:.{digits}f}" + ("" if ci["half"] is None else f" ± {ci['half']:.{digits}f}")


def hierarchical_bootstrap(a: dict, b: dict, *, n_boot: int = 2000, level: float = LEVEL,
                           seed: int = 0) -> dict:
    """Percentile interval of the paired Avg difference a - b, resampling training seeds, then examples.

    a and b map a training seed to {set: [score of example i]} (each score the mean over eval seeds), the
    same examples in the same order for both. One draw: n training seeds drawn with replacement; for each,
    every set's examples drawn with replacement (the same draw for a and b: paired); the draw's difference
    is the mean over the drawn seeds of (mean over sets of the mean over the drawn examples)."""
    import torch  # only here: the rest of this module is standard library

    seeds = [s for s in a if s in b]
    if not seeds:
        raise ValueError("hierarchical_bootstrap: no training seed in common")
    sets = list(a[seeds[0]])
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(seeds), (n_boot, len(seeds)), generator=gen)           # [B, S] seed draws
    per_seed = torch.zeros(n_boot, len(seeds), dtype=torch.float64)
    for name in sets:
        diff = torch.tensor([[x - y for x, y in zip(a[s][name], b[s][name], strict=True)] for s in seeds],
                            dtype=torch.float64)                                       # [S, n]
        n = diff.shape[1]
        rows = diff[pick]                                                               # [B, S, n]
        idx = torch.randint(n, (n_boot, len(seeds), n), generator=gen)
        per_seed += rows.gather(2, idx).mean(2) / len(sets)
    draws = per_seed.mean(1)
    observed = sum(sum(x - y for x, y in zip(a[s][k], b[s][k])) / len(a[s][k]) for s in seeds for k in sets)
    q = torch.quantile(draws, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"mean": observed / (len(seeds) * len(sets)), "lo": q[0], "hi": q[1], "n_boot": n_boot}
