"""Pure statistics for the evaluation and the reports: the Wilson interval, rates, mean and
sample std over seeds, AUROC and its permutation test. No torch: `import report` stays cheap."""
from __future__ import annotations

import itertools
import math
import random

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals
EXACT_SPLITS = 200_000  # label splits enumerated exactly up to this many; beyond, MC_DRAWS random ones
MC_DRAWS = 20_000


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) over seeds."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def rate(k: int, n: int) -> float | None:
    """k / n; None over no trials (0/0 is not 0%, and must never pass a criterion)."""
    return k / n if n else None


def ci95(k: int, n: int) -> list[float] | None:
    """The Wilson 95% interval as a list; None over no trials."""
    return list(wilson_interval(k, n)) if n else None


def auroc(positives, negatives) -> float:
    """AUROC of "positive above negative": over all (positive, negative) pairs, the share where the
    positive's value is higher, ties counting 1/2 (the Mann-Whitney U of the positives / (n1 n0))."""
    if not positives or not negatives:
        raise ValueError("AUROC needs at least one positive and one negative")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def mean_auroc(positives: list[list[float]], negatives: list[list[float]]) -> float:
    """Each run a vector of its values at the same steps: the mean over the steps of the AUROC."""
    steps = range(len(positives[0]))
    return sum(auroc([p[i] for p in positives], [n[i] for n in negatives]) for i in steps) / len(steps)


def permutation_p(positives, negatives, seed: int = 0) -> tuple[float, str]:
    """One-sided permutation test of "insecure drifts more": p = the share of the ways to label
    len(positives) of all the runs positive whose mean AUROC is at least the observed one (the
    observed labelling counts). Exact up to EXACT_SPLITS labellings; beyond, (1 + hits) / (1 + MC_DRAWS)
    over random labellings. Under no difference every labelling is equally likely."""
    observed = mean_auroc(positives, negatives) - 1e-12  # ties in the statistic count as at least as high
    pooled, k = positives + negatives, len(positives)
    if math.comb(len(pooled), k) <= EXACT_SPLITS:
        splits = [set(c) for c in itertools.combinations(range(len(pooled)), k)]
        how = f"exact over all {len(splits)} labellings"
    else:
        rng = random.Random(seed)
        splits = [set(rng.sample(range(len(pooled)), k)) for _ in range(MC_DRAWS)]
        how = f"{MC_DRAWS} random labellings (seed {seed})"
    hits = sum(mean_auroc([pooled[i] for i in c], [pooled[i] for i in range(len(pooled)) if i not in c]) >= observed
               for c in splits)
    p = hits / len(splits) if how.startswith("exact") else (1 + hits) / (1 + len(splits))
    return p, how


def smallest_p(n_pos: int, n_neg: int) -> float:
    """The smallest p the exact test can give (one labelling of all): what N alone allows."""
    splits = math.comb(n_pos + n_neg, n_pos)
    return 1 / splits if splits <= EXACT_SPLITS else 1 / (1 + MC_DRAWS)
