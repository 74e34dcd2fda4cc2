"""Random effects two factors share on a voxel's observed rows, and the factor a voxel can be
fitted without.

Two factors group a voxel's observed rows alike when every observed group of one is a group
of the other (every family down to one subject there).  An effect of one and an effect of the
other whose covariates are equal on those rows then give the same column of Z twice, and only
the sum of their variances is identified:

    Z_a D_a Z_a' + Z_b D_b Z_b' = Z_a (D_a + E D_b E') Z_a'                            (1)

where ``E`` puts each effect of ``b`` on the effect of ``a`` it equals.  When every effect of
``b`` equals one of ``a``, ``D_a + E D_b E'`` is a covariance ``a`` can take alone, so the
model without ``b`` reaches the same likelihood, fixed effects and tests (1), and it gets
there in the iterations of a regular fit: with both factors the split of the shared
variance is a flat valley that Fisher Scoring and the polish creep along (a cohort audit:
250-300 iterations at one voxel, 5x lme4's time, where the family variance went to 0).

Pure numerics on the design and the (v, n) observed mask.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .model import STATUS_SINGULAR
from .products import RandomDesign, random_design
from .structures.blocked import factor_levels, factor_values


def levels_observed(rd: RandomDesign, observed: np.ndarray) -> list[np.ndarray]:
    """Per factor, the number of its levels with at least one observed row, per voxel (v,);
    ``observed`` is (v, n).  Complete voxels share one count."""
    complete = observed.all(axis=1)
    if complete.sum() > 1:
        rest = np.flatnonzero(~complete)
        first = levels_observed(rd, observed[np.flatnonzero(complete)[:1]])
        part = levels_observed(rd, observed[rest]) if rest.size else [None] * len(first)
        out = []
        for one, some in zip(first, part):
            counts = np.full(observed.shape[0], one[0])
            if some is not None:
                counts[rest] = some
            out.append(counts)
        return out
    obs = observed.T.astype(np.float64)
    out = []
    for f, level in zip(rd.structure.factors, factor_levels(rd)):
        incidence = sp.csr_matrix((np.ones(rd.n), (level, np.arange(rd.n))),
                                  shape=(f.n_levels, rd.n))
        out.append((np.asarray(incidence @ obs) > 0).sum(axis=0))
    return out


def shared_effects(rd: RandomDesign, observed: np.ndarray,
                   counts: list[np.ndarray] | None = None) -> list[tuple[int, int, np.ndarray]]:
    """For each pair of factors ``a < b``: ``(a, b, same)``, ``same`` (v, q_a, q_b) true where
    effect ``i`` of ``a`` and effect ``j`` of ``b`` are one column of Z on the voxel's observed
    rows: the two factors group those rows alike (the voxel has as many observed groups of
    the pair as observed levels of either factor) and the two covariates are equal on them.
    Pairs without any shared effect are left out.  ``counts``: the voxels'
    :func:`levels_observed`, when already counted."""
    factors = rd.structure.factors
    v = observed.shape[0]
    if len(factors) < 2 or v == 0:
        return []
    level, values = factor_levels(rd), factor_values(rd)
    pairs = [(a, b) for a in range(len(factors)) for b in range(a + 1, len(factors))]
    # the groups of a pair of factors as a factor of its own
    pair_codes = [np.unique(level[a] * factors[b].n_levels + level[b], return_inverse=True)[1]
                  for a, b in pairs]
    counts = levels_observed(rd, observed) if counts is None else counts
    pair_counts = levels_observed(random_design(pair_codes, [np.ones((rd.n, 1))] * len(pairs)),
                                  observed)
    out = []
    for (a, b), both in zip(pairs, pair_counts):
        alike = (counts[a] == both) & (counts[b] == both) & (both > 0)
        if not alike.any():
            continue
        same = np.zeros((v, factors[a].n_effects, factors[b].n_effects), dtype=bool)
        for i in range(factors[a].n_effects):
            for j in range(factors[b].n_effects):
                differ = values[a][:, i] != values[b][:, j]
                same[:, i, j] = alike & ~observed[:, differ].any(axis=1)
        if same.any():
            out.append((a, b, same))
    return out


def redundant_factor(rd: RandomDesign, shared: list[tuple[int, int, np.ndarray]],
                     v: int) -> np.ndarray:
    """(v,) the factor each voxel can be fitted without, -1 for none: one every effect of
    which is an effect of another factor on the voxel's observed rows (1).  Of several, the
    one with the fewest effects, then the later in the structure (the same one at every
    voxel of a design)."""
    factors = rd.structure.factors
    drop = np.full(v, -1, dtype=np.int64)
    if not shared:
        return drop
    covered = np.zeros((len(factors), v), dtype=bool)
    for a, b, same in shared:
        covered[b] |= same.any(axis=1).all(axis=1)    # every effect of b is one of a's
        covered[a] |= same.any(axis=2).all(axis=1)
    for k in sorted(range(len(factors)), key=lambda k: (factors[k].n_effects, -k)):
        drop[(drop < 0) & covered[k]] = k
    return drop


def without_factor(rd: RandomDesign, k: int) -> RandomDesign:
    """The random design without factor ``k`` (the others' levels, covariates and names)."""
    keep = [i for i in range(len(rd.structure.factors)) if i != k]
    factors = rd.structure.factors
    level, values = factor_levels(rd), factor_values(rd)
    return random_design([level[i] for i in keep], [values[i] for i in keep],
                         names=[factors[i].name for i in keep],
                         effect_names=[factors[i].effect_names for i in keep])


def blank_shared(rd: RandomDesign, shared: list[tuple[int, int, np.ndarray]],
                 out: dict[str, np.ndarray], voxels: np.ndarray, factor: int | None = None
                 ) -> None:
    """NaN in ``random/<factor>/cov`` at the fitted ones of ``voxels`` (v,) bool for the
    variances only the sum of which is identified: on the diagonal of both factors for each
    shared effect, and between two shared effects of a factor (their covariance splits as
    arbitrarily, (1)).  ``factor``: only the pairs with that factor (the one a voxel was
    fitted without; the others' of its shares)."""
    factors = rd.structure.factors
    where = voxels & (out["status"] <= STATUS_SINGULAR)
    for a, b, same in shared:
        if factor is not None and factor not in (a, b):
            continue
        for k, mine in ((a, same.any(axis=2)), (b, same.any(axis=1))):   # (v, q_k)
            mine = mine & where[:, None]
            rows = np.flatnonzero(mine.any(axis=1))
            if not rows.size:
                continue
            cov = out[f"random/{factors[k].name}/cov"]
            block = cov[rows]
            block[mine[rows][:, :, None] & mine[rows][:, None, :]] = np.nan
            cov[rows] = block
