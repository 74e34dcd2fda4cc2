"""R's rule for coding a categorical variable in a term: by contrasts or by indicators.

formulaic codes each term so that the whole matrix stays full rank, by the subspaces the
previous terms span (patsy's algorithm).  R's ``model.matrix`` follows a different, simpler
rule (``TermCode`` in R's ``src/library/stats/src/model.c``), and where they differ the two
matrices span different spaces: ``y ~ age:time + grp:time`` is three columns in R
(``time:grpy``) and was four here (``time:grpx``, ``time:grpy``), a different model.
:class:`RCodingMaterializer` is formulaic's pandas materializer with R's rule:

- the terms in R's order (by degree, then as written; the variables of a term in their
  order of first appearance, :func:`mpiblmm.formula._r_ordered`);
- a categorical variable ``f`` of term ``T`` is coded by contrasts (treatment coding,
  ``reduced``) when ``T`` without ``f`` is empty, or is contained in (a subset of the
  variables of) some preceding term; otherwise by indicators (all levels);
- without an intercept, the first categorical variable of the first term that has one is
  coded by indicators (R's ``model.matrix``: "adjust the code for the first factor found so
  that it will be coded by dummy variables rather than contrasts").

R's rule may give a rank-deficient matrix (``a:b`` of two text columns with an intercept),
which lme4 then trims column by column; the caller falls back to formulaic's full-rank
coding there where it spans the same columns (else R's coding is kept and trimmed as lme4
trims it: a redundant column elsewhere made formulaic code other terms differently,
docs/SPEC.md).
"""

from __future__ import annotations

from formulaic.materializers import PandasMaterializer
from formulaic.materializers.types import ScopedFactor, ScopedTerm
from formulaic.parser.types import Factor
from interface_meta import override


class RCodingMaterializer(PandasMaterializer):
    """formulaic's pandas materializer, each term coded by R's rule (module doc)."""

    REGISTER_NAME = "mpiblmm_r_coding"
    REGISTER_INPUTS = ()            # chosen by name only, never for a data type

    @override
    def _get_scoped_terms(self, terms, ensure_full_rank: bool = True):
        terms = list(terms)
        evaled = [[self.factor_cache[f.expr] for f in term.factors
                   if self.factor_cache[f.expr].values.__wrapped__ is not None]
                  for term in terms]
        kinds = [[e.metadata.kind for e in factors] for factors in evaled]
        variables = [frozenset(e.expr for e, k in zip(factors, ks)
                               if k is not Factor.Kind.CONSTANT)
                     for factors, ks in zip(evaled, kinds)]
        intercept = any(not v and factors for v, factors in zip(variables, evaled))
        first_indicator = None if intercept else _first_categorical(evaled)
        for t, (term, factors) in enumerate(zip(terms, evaled)):
            if not factors:
                yield term, []
                continue
            scoped, scale = [], 1
            for e in factors:
                if e.metadata.kind is Factor.Kind.CONSTANT:
                    scale = scale * e.values
                elif not e.metadata.spans_intercept:
                    scoped.append(ScopedFactor(e, reduced=False))
                else:
                    rest = variables[t] - {e.expr}
                    contrasts = (not rest or any(rest <= variables[s] for s in range(t))) \
                        and (t, e.expr) != first_indicator
                    scoped.append(ScopedFactor(e, reduced=contrasts))
            yield term, [ScopedTerm(factors=scoped, scale=scale)]


def _first_categorical(evaled) -> tuple[int, str] | None:
    """(term index, variable) of the first categorical variable of the first term that has
    one (in the term's variable order)."""
    for t, factors in enumerate(evaled):
        for e in factors:
            if e.metadata.kind is not Factor.Kind.CONSTANT and e.metadata.spans_intercept:
                return t, e.expr
    return None


__all__ = ["RCodingMaterializer"]
