/* Compiled per-level evaluation of the one-factor model (q1 = 1, 2 or 3 effects per level): the
 * numbers of mpiblmm/lmm/structures/levels.py (products_block and _sums_block), fused into
 * one pass over the levels with the voxels of a tile innermost, where numpy makes ~200
 * passes over (voxel, level) arrays per evaluation.
 *
 * Called through ctypes by level_kernel.py with the product forms in their own layout
 * (C order, voxel first): Z'Z (v | 1, l, q, q), Z'X (v | 1, l q, p), Z'Y (v, l q), Lambda
 * (v, q, q) (any square root of D, not only the Cholesky factor).  A subset of a chunk's
 * voxels is read in place through its rows (Args.rows: a gather instead of a copy).  A shared Z'Z or Z'X
 * (complete-data voxels) has stride 0: every voxel of the tile reads the same value, through
 * the same arithmetic as its own would, so a voxel gets the same bits either way.
 *
 * Per level j (notation of levels.py: B_j = Z_j'Z_j, S_j = I + Lambda' B_j Lambda,
 * M_j = Lambda S_j^-1 Lambda'):
 *   pass "products": log|V| = sum_j log|S_j| (as mantissa and exponent), and the
 *     corrections X'Z_j M_j Z_j'X, X'Z_j M_j Z_j'Y, Y'Z_j M_j Z_j'Y summed over j, so that
 *     X'V^-1X = X'X - sum_j X'Z_j M_j Z_j'X, etc. (ALGORITHM.md, "Product forms");
 *   pass "gls" (per tile, after "products"; tile_gls): X'V^-1X, its Cholesky factor, the
 *     GLS beta, e'V^-1e, s2, A = (X'V^-1X)^-1 for REML and lme4's logLik, so that an
 *     evaluation is one call (without it, the caller gives beta, 1/s2 and A);
 *   pass "sums" (at that fit, a second sweep over the tile's levels): T_j = I - B_j M_j, R_jj = B_j - B_j M_j B_j, r_j = Z_j'(Y - X beta),
 *     Q_j = r_j r_j'/s2 (+ Z_j'X A X'Z_j), and the sums over j of T_j Q_j T_j', of R_jj and
 *     of the products of R_jj's upper entries (the D-score G = 1/2 sum_j (T_j Q_j T_j' -
 *     R_jj) and the information 1/2 sum_j R_jj (x) R_jj are assembled from them in Python).
 * Each voxel's arithmetic uses its own inputs only, in a fixed order, so its bits do not
 * depend on the batch or the tile (built with -ffp-contract=off: no FMA contraction; the
 * AVX2 and default clones differ only in vector width).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>

#include "../kernel_common.h"

#define TILE 32
#define QMAX 3
#define NQMAX 6          /* upper entries of a QMAX x QMAX matrix */

/* The call's arguments (level_kernel.py: _Args, the same fields in the same order). */
typedef struct {
    i64 v, l, q, p;
    /* the product forms as (voxel, entry) arrays with element strides sv, se: entry e of
     * voxel t at x[t sv + e se]; sv = 0 when shared, 1 when the voxels are innermost */
    const double *zz;    /* entries (l, q, q) */
    i64 zz_sv, zz_se;
    const double *zx;    /* entries (l q, p) */
    i64 zx_sv, zx_se;
    const double *zy;    /* entries (l q) */
    i64 zy_sv, zy_se;
    const double *lam;   /* (v, q, q) */
    /* pass "products": outputs */
    double *cxx;         /* (v, p, p) */
    double *cxy;         /* (v, p) */
    double *cyy;         /* (v,) */
    double *logdet;      /* (v,) */
    /* pass "sums": inputs (outputs of pass "gls" when it runs: beta and s2inv) */
    double *beta;        /* (v, p) */
    double *s2inv;       /* (v,) */
    const double *A;     /* (v, p, p), or NULL (ML); not read after pass "gls" */
    /* pass "sums": outputs */
    double *R;           /* (v, q, q): sum_j R_jj */
    double *g;           /* (v, q, q): sum_j T_j Q_j T_j' */
    double *RR;          /* (v, nq, nq): sum_j R_jj[u] R_jj[w] over upper entries u, w */
    int products, sums;
    /* pass "satt" (inputs as for "sums"; R as well): the level sums of the Satterthwaite
     * setup, level_satterthwaite.py: W_j = T_j Z_j'X, u_j = T_j r_j */
    double *WW;          /* (v, q p, q p): sum_j W_j (x) W_j, entries (a, s) */
    double *WU;          /* (v, q, p, q): sum_j W_j[a, s] u_j[b] */
    double *UU;          /* (v, q, q): sum_j u_j u_j' */
    double *Tt;          /* (v, q, q, q, q): [b, c, a, d] = sum_j R_jj[b, c] X_j[a, d],
                            X_j = 2 u_j u_j' / s2 - R_jj (+ 2 W_j A W_j' for REML) */
    int satt;
    /* the chunk rows of the call's voxels: voxel t reads row rows[t] of every per-voxel
     * product form (zz, zx, zy, xx, xy, yy, nobs), or row t when NULL; Lambda, the fit's
     * inputs and every output are the call's own (row t) */
    const i64 *rows;
    /* pass "gls" (between "products" and "sums"/"satt"): the GLS fit and the profiled
     * (RE)ML log-likelihood (likelihood.py: gls, profiled_s2, loglik) by the Cholesky
     * factor of X'V^-1X; inputs X'X (v | 1, p, p), X'Y (v, p), Y'Y (v,), n (v,) */
    const double *xx;
    i64 xx_sv, xx_se;
    const double *xy;
    i64 xy_sv, xy_se;
    const double *yy;
    i64 yy_sv, yy_se;
    const i64 *nobs;
    i64 n_sv;
    int gls, reml;
    double log2pi;       /* log(2 pi) as Python's float */
    /* pass "gls": outputs (and beta, s2inv above); NaN beta, s2 and llh where X'V^-1X is
     * not positive definite */
    double *xvx;         /* (v, p, p) X'V^-1X */
    double *xvy;         /* (v, p) */
    double *yvy;         /* (v,) */
    double *ete;         /* (v,) e'V^-1e at beta, clipped at 0 */
    double *s2;          /* (v,) */
    double *llh;         /* (v,) lme4's logLik */
} Args;

/* The upper entries (a <= b) of a Q x Q matrix, in the order of levels.pair_plan. */
static inline i64 upper(const i64 Q, i64 a, i64 b) {
    return a <= b ? a * Q - a * (a - 1) / 2 + (b - a) : b * Q - b * (b - 1) / 2 + (a - b);
}

/* dst[t] = src[t sv] for the T voxels of a tile, or src[rw[t] sv] when its rows rw are
 * given: shared, gathered, contiguous or strided */
static inline __attribute__((always_inline)) void load_row(
    double *dst, const double *src, const i64 sv, const i64 *rw, const i64 T)
{
    i64 t;
    if (sv == 0) {
        const double x = src[0];
        for (t = 0; t < T; ++t)
            dst[t] = x;
    } else if (rw != NULL) {
        for (t = 0; t < T; ++t)
            dst[t] = src[rw[t] * sv];
    } else if (sv == 1) {
        for (t = 0; t < T; ++t)
            dst[t] = src[t];
    } else {
        for (t = 0; t < T; ++t)
            dst[t] = src[t * sv];
    }
}

/* out = A X for the tile's small matrices: A (Q x Q), X and out (Q x n), each stored as
 * rows of voxels (entry (row, col) at ((row * cols + col) * stride + t)); the sum over the
 * inner index runs left to right. */
static inline __attribute__((always_inline)) void tile_mm(
    const i64 Q, const i64 n, const i64 T, double *restrict out, const i64 so,
    const double *restrict A, const i64 sa, const double *restrict X, const i64 sx)
{
    i64 a, s, c, t;
    for (a = 0; a < Q; ++a)
        for (s = 0; s < n; ++s)
            for (t = 0; t < T; ++t) {
                double x = A[(a * Q) * sa + t] * X[s * sx + t];
                for (c = 1; c < Q; ++c)
                    x += A[(a * Q + c) * sa + t] * X[(c * n + s) * sx + t];
                out[(a * n + s) * so + t] = x;
            }
}

/* The upper entries (a <= b) of A B' (Q x Q), stored into (add = 0) or added to (add = 1)
 * out[upper(a, b)]. */
static inline __attribute__((always_inline)) void tile_mm_nt_upper(
    const i64 Q, const i64 T, double (*restrict out)[TILE], double (*restrict A)[TILE],
    double (*restrict B)[TILE], const int add)
{
    i64 a, b, d, t;
    for (a = 0; a < Q; ++a)
        for (b = a; b < Q; ++b)
            for (t = 0; t < T; ++t) {
                double x = A[a * Q][t] * B[b * Q][t];
                for (d = 1; d < Q; ++d)
                    x += A[a * Q + d][t] * B[b * Q + d][t];
                if (add)
                    out[upper(Q, a, b)][t] += x;
                else
                    out[upper(Q, a, b)][t] = x;
            }
}

/* Pass "gls" for a tile (likelihood.py: gls, profiled_s2, loglik): on input cxx (upper
 * entries), cxy and cyy hold the corrections of pass "products", on output X'V^-1X = X'X -
 * cxx, X'V^-1Y and Y'V^-1Y.  X'V^-1X = C C' (Cholesky, C lower), beta = C'^-1 C^-1 X'V^-1Y,
 * e'V^-1e = Y'V^-1Y - beta'X'V^-1Y (clipped at 0), s2 = e'V^-1e / dof (n - p for REML, n
 * for ML), A = (X'V^-1X)^-1 = C'^-1 C^-1 for REML, log|X'V^-1X| = 2 sum_s log C_ss, and
 * lme4's logLik (likelihood.py's module docstring) with log|V| = ldv.  Where X'V^-1X is not
 * positive definite (a pivot not > 0), beta, s2 and llh are NaN: the voxel failed. */
static inline __attribute__((always_inline)) void tile_gls(
    const i64 T, const Args *ar, const i64 j0, const i64 *rw, double *cxx, double *cxy,
    double *cyy, const double *ldv, double *bet, double *s2i, double *Am, double *C,
    double *Ci, double *z, double *tmp)
{
    const i64 p = ar->p, r0 = rw != NULL ? 0 : j0;
    const double *xx = ar->xx + r0 * ar->xx_sv, *xy = ar->xy + r0 * ar->xy_sv;
    const double *yy = ar->yy + r0 * ar->yy_sv;
    const int reml = ar->reml;
    i64 s, u, k, t;
    double ok[TILE], ld[TILE], e[TILE], dof[TILE], nn[TILE];

    for (s = 0; s < p; ++s)
        for (u = s; u < p; ++u) {
            double *g = cxx + (s * p + u) * T;
            load_row(tmp, xx + (s * p + u) * ar->xx_se, ar->xx_sv, rw, T);
            for (t = 0; t < T; ++t)
                g[t] = tmp[t] - g[t];
        }
    for (s = 0; s < p; ++s) {
        load_row(tmp, xy + s * ar->xy_se, ar->xy_sv, rw, T);
        for (t = 0; t < T; ++t)
            cxy[s * T + t] = tmp[t] - cxy[s * T + t];
    }
    load_row(tmp, yy, ar->yy_sv, rw, T);
    for (t = 0; t < T; ++t) {
        cyy[t] = tmp[t] - cyy[t];
        ok[t] = 1.0;
        ld[t] = 0.0;
        nn[t] = (double)ar->nobs[(rw != NULL ? rw[t] : j0 + t) * ar->n_sv];
        dof[t] = reml ? nn[t] - (double)p : nn[t];
    }
    /* C[s][u] (u <= s) = (G[u][s] - sum_{k < u} C[s][k] C[u][k]) / C[u][u]; C[s][s] the root */
    for (s = 0; s < p; ++s)
        for (u = 0; u <= s; ++u) {
            double *c = C + (s * p + u) * T;
            const double *g = cxx + (u * p + s) * T;
            for (t = 0; t < T; ++t)
                c[t] = g[t];
            for (k = 0; k < u; ++k)
                for (t = 0; t < T; ++t)
                    c[t] -= C[(s * p + k) * T + t] * C[(u * p + k) * T + t];
            if (u < s) {
                for (t = 0; t < T; ++t)
                    c[t] = c[t] / C[(u * p + u) * T + t];
            } else {
                for (t = 0; t < T; ++t) {
                    ok[t] = c[t] > 0.0 ? ok[t] : 0.0;
                    c[t] = sqrt(c[t] > 0.0 ? c[t] : 1.0);
                    ld[t] += log(c[t]);
                }
            }
        }
    /* C z = X'V^-1Y, then C' beta = z */
    for (s = 0; s < p; ++s) {
        for (t = 0; t < T; ++t)
            z[s * T + t] = cxy[s * T + t];
        for (k = 0; k < s; ++k)
            for (t = 0; t < T; ++t)
                z[s * T + t] -= C[(s * p + k) * T + t] * z[k * T + t];
        for (t = 0; t < T; ++t)
            z[s * T + t] = z[s * T + t] / C[(s * p + s) * T + t];
    }
    for (s = p - 1; s >= 0; --s) {
        for (t = 0; t < T; ++t)
            bet[s * T + t] = z[s * T + t];
        for (k = s + 1; k < p; ++k)
            for (t = 0; t < T; ++t)
                bet[s * T + t] -= C[(k * p + s) * T + t] * bet[k * T + t];
        for (t = 0; t < T; ++t)
            bet[s * T + t] = bet[s * T + t] / C[(s * p + s) * T + t];
    }
    for (t = 0; t < T; ++t)
        e[t] = bet[t] * cxy[t];
    for (s = 1; s < p; ++s)
        for (t = 0; t < T; ++t)
            e[t] += bet[s * T + t] * cxy[s * T + t];
    for (t = 0; t < T; ++t) {
        double x = cyy[t] - e[t];
        x = x < 0.0 ? 0.0 : x;
        const double s2 = x / dof[t];
        double l = (reml ? dof[t] : nn[t]) * (ar->log2pi + log(s2)) + ldv[t];
        if (reml)
            l += 2.0 * ld[t];
        l = -0.5 * (l + x / s2);
        e[t] = x;
        s2i[t] = ok[t] != 0.0 ? 1.0 / s2 : NAN;
        ar->ete[j0 + t] = x;
        ar->s2[j0 + t] = ok[t] != 0.0 ? s2 : NAN;
        ar->llh[j0 + t] = ok[t] != 0.0 ? l : NAN;
    }
    if (reml) {
        /* Ci = C^-1 (lower): Ci[s][s] = 1 / C[s][s], Ci[s][u] = -(sum_{u <= k < s} C[s][k]
         * Ci[k][u]) / C[s][s]; A[s][u] = sum_{k >= max(s, u)} Ci[k][s] Ci[k][u] */
        for (s = 0; s < p; ++s) {
            for (t = 0; t < T; ++t)
                Ci[(s * p + s) * T + t] = 1.0 / C[(s * p + s) * T + t];
            for (u = 0; u < s; ++u) {
                double *c = Ci + (s * p + u) * T;
                for (t = 0; t < T; ++t)
                    c[t] = C[(s * p + u) * T + t] * Ci[(u * p + u) * T + t];
                for (k = u + 1; k < s; ++k)
                    for (t = 0; t < T; ++t)
                        c[t] += C[(s * p + k) * T + t] * Ci[(k * p + u) * T + t];
                for (t = 0; t < T; ++t)
                    c[t] = -(c[t] / C[(s * p + s) * T + t]);
            }
        }
        for (s = 0; s < p; ++s)
            for (u = s; u < p; ++u) {
                double *a = Am + (s * p + u) * T;
                for (t = 0; t < T; ++t)
                    a[t] = Ci[(u * p + s) * T + t] * Ci[(u * p + u) * T + t];
                for (k = u + 1; k < p; ++k)
                    for (t = 0; t < T; ++t)
                        a[t] += Ci[(k * p + s) * T + t] * Ci[(k * p + u) * T + t];
                if (u > s)
                    for (t = 0; t < T; ++t)
                        Am[(u * p + s) * T + t] = a[t];
            }
    }
    for (t = 0; t < T; ++t)
        if (ok[t] == 0.0)
            for (s = 0; s < p; ++s)
                bet[s * T + t] = NAN;
    /* outputs, voxel first */
    for (t = 0; t < T; ++t) {
        const i64 vx = j0 + t;
        ar->yvy[vx] = cyy[t];
        for (s = 0; s < p; ++s) {
            ar->beta[vx * p + s] = bet[s * T + t];
            ar->xvy[vx * p + s] = cxy[s * T + t];
            for (u = 0; u < p; ++u)
                ar->xvx[(vx * p + s) * p + u] = cxx[((s <= u) ? s * p + u : u * p + s) * T + t];
        }
    }
}

/* One tile of T voxels from voxel j0 (Q effects); w is scratch for the p-sized arrays. */
static inline __attribute__((always_inline)) void level_tile(
    const i64 Q, const i64 T, const Args *ar, const i64 j0, double *w)
{
    const i64 p = ar->p, l = ar->l, NQ = Q * (Q + 1) / 2;
    const i64 *rw = ar->rows != NULL ? ar->rows + j0 : NULL, r0 = rw != NULL ? 0 : j0;
    const double *zz = ar->zz + r0 * ar->zz_sv, *zx = ar->zx + r0 * ar->zx_sv;
    const double *zy = ar->zy + r0 * ar->zy_sv;
    i64 a, b, c, d, s, u, t, j, phase;
    double L[QMAX * QMAX][TILE], B[QMAX * QMAX][TILE], Y[QMAX][TILE];
    double BL[QMAX * QMAX][TILE], Si[QMAX * QMAX][TILE], LS[QMAX * QMAX][TILE];
    double M[QMAX * QMAX][TILE], MY[QMAX][TILE], det[TILE], mant[TILE], cyy[TILE];
    double BM[QMAX * QMAX][TILE], Tm[QMAX * QMAX][TILE], Ru[NQMAX][TILE], res[QMAX][TILE];
    double Qm[QMAX * QMAX][TILE], TQ[QMAX * QMAX][TILE], s2i[TILE];
    double gacc[NQMAX][TILE], Racc[NQMAX][TILE], RRacc[NQMAX * NQMAX][TILE];
    i64 expo[TILE], bad[TILE];
    double ldv[TILE], gtmp[TILE];
    /* p-sized scratch, each (entries, TILE) */
    double *X = w;                       /* Z_j'X  (Q p) */
    double *MX = X + QMAX * p * TILE;    /* M_j Z_j'X (Q p) */
    double *AX = MX + QMAX * p * TILE;   /* Z_j'X A (Q p) */
    double *cxx = AX + QMAX * p * TILE;  /* (p p) */
    double *cxy = cxx + p * p * TILE;    /* (p) */
    double *bet = cxy + p * TILE;        /* (p) */
    double *Am = bet + p * TILE;         /* (p p) */
    double *W = Am + p * p * TILE;       /* T_j Z_j'X (Q p) */
    double *WUacc = W + QMAX * p * TILE; /* (Q p Q) */
    double *WWacc = WUacc + QMAX * p * QMAX * TILE;   /* upper entries of (Q p) x (Q p) */
    double *Ch = WWacc + QMAX * p * (QMAX * p + 1) / 2 * TILE;  /* pass "gls": C (p p) */
    double *Chi = Ch + p * p * TILE;                    /* C^-1 (p p) */
    double *zs = Chi + p * p * TILE;                    /* (p) */
    const i64 QP = Q * p;
    double Pm[QMAX * QMAX][TILE], TP[QMAX * QMAX][TILE], WAW[NQMAX][TILE];
    double Mu[NQMAX][TILE], BMB[QMAX * QMAX][TILE];
    double uj[QMAX][TILE], Xm[NQMAX][TILE], UUacc[NQMAX][TILE], Ttacc[NQMAX * NQMAX][TILE];
    const int reml = ar->gls ? ar->reml : ar->A != NULL, level2 = ar->sums || ar->satt;

    for (a = 0; a < Q * Q; ++a)
        for (t = 0; t < T; ++t)
            L[a][t] = ar->lam[(j0 + t) * Q * Q + a];
    for (t = 0; t < T; ++t) {
        mant[t] = 1.0;
        expo[t] = 0;
        bad[t] = 0;
        cyy[t] = 0.0;
    }
    if (ar->products)
        for (s = 0; s < p * p * T; ++s)
            cxx[s] = 0.0;
    if (ar->products)
        for (s = 0; s < p * T; ++s)
            cxy[s] = 0.0;
    if (level2) {
        if (!ar->gls) {                  /* the fit given (else pass "gls" forms it) */
            for (s = 0; s < p; ++s)
                for (t = 0; t < T; ++t)
                    bet[s * T + t] = ar->beta[(j0 + t) * p + s];
            for (t = 0; t < T; ++t)
                s2i[t] = ar->s2inv[j0 + t];
            if (reml)
                for (s = 0; s < p * p; ++s)
                    for (t = 0; t < T; ++t)
                        Am[s * T + t] = ar->A[(j0 + t) * p * p + s];
        }
        for (u = 0; u < NQ; ++u)
            for (t = 0; t < T; ++t)
                gacc[u][t] = Racc[u][t] = 0.0;
        for (u = 0; u < NQ * NQ; ++u)
            for (t = 0; t < T; ++t)
                RRacc[u][t] = Ttacc[u][t] = 0.0;
        for (u = 0; u < NQ; ++u)
            for (t = 0; t < T; ++t)
                UUacc[u][t] = 0.0;
        if (ar->satt) {
            for (s = 0; s < QP * Q * T; ++s)
                WUacc[s] = 0.0;
            for (s = 0; s < QP * (QP + 1) / 2 * T; ++s)
                WWacc[s] = 0.0;
        }
    }

    /* phase 0: pass "products" (then "gls"); phase 1: passes "sums" and "satt" at the fit */
    for (phase = 0; phase < 2; ++phase) {
        const int do_p = phase == 0 && ar->products, do_2 = phase == 1 && level2;
        if (!do_p && !do_2)
            continue;
        for (j = 0; j < l; ++j) {
            /* this level's product forms */
            for (a = 0; a < Q * Q; ++a)
                load_row(B[a], zz + (j * Q * Q + a) * ar->zz_se, ar->zz_sv, rw, T);
            for (s = 0; s < Q * p; ++s)
                load_row(X + s * T, zx + (j * Q * p + s) * ar->zx_se, ar->zx_sv, rw, T);
            for (a = 0; a < Q; ++a)
                load_row(Y[a], zy + (j * Q + a) * ar->zy_se, ar->zy_sv, rw, T);

            /* S_j = I + Lambda' B_j Lambda (upper entries, mirrored), its inverse and |S_j| */
            tile_mm(Q, Q, T, BL[0], TILE, B[0], TILE, L[0], TILE);
            if (Q == 1) {
                for (t = 0; t < T; ++t) {
                    det[t] = L[0][t] * BL[0][t] + 1.0;
                    Si[0][t] = 1.0 / det[t];
                }
            } else if (Q == 2) {
                for (t = 0; t < T; ++t) {
                    const double s00 = (L[0][t] * BL[0][t] + L[2][t] * BL[2][t]) + 1.0;
                    const double s01 = L[0][t] * BL[1][t] + L[2][t] * BL[3][t];
                    const double s11 = (L[1][t] * BL[1][t] + L[3][t] * BL[3][t]) + 1.0;
                    det[t] = s00 * s11 - s01 * s01;
                    const double r = 1.0 / det[t];
                    Si[0][t] = s11 * r;
                    Si[3][t] = s00 * r;
                    Si[1][t] = Si[2][t] = -(s01 * r);
                }
            } else {
                /* Q = 3: S_j = C C' (Cholesky), S_j^-1 = C^-T C^-1, |S_j| = (c00 c11 c22)^2; a
                 * non-positive pivot gives NaN, hence a NaN log|V| (failed) */
                double Sx[6][TILE];
                for (c = 0; c < 3; ++c)
                    for (d = c; d < 3; ++d)
                        for (t = 0; t < T; ++t) {
                            double x = L[c][t] * BL[d][t];
                            for (a = 1; a < 3; ++a)
                                x += L[a * 3 + c][t] * BL[a * 3 + d][t];
                            Sx[upper(3, c, d)][t] = c == d ? x + 1.0 : x;
                        }
                for (t = 0; t < T; ++t) {
                    const double c00 = sqrt(Sx[0][t]);
                    const double c10 = Sx[1][t] / c00, c20 = Sx[2][t] / c00;
                    const double c11 = sqrt(Sx[3][t] - c10 * c10);
                    const double c21 = (Sx[4][t] - c20 * c10) / c11;
                    const double c22 = sqrt((Sx[5][t] - c20 * c20) - c21 * c21);
                    const double m00 = 1.0 / c00, m11 = 1.0 / c11, m22 = 1.0 / c22;
                    const double m10 = -((c10 * m00) * m11), m21 = -((c21 * m11) * m22);
                    const double m20 = -((c20 * m00 + c21 * m10) * m22);
                    const double pd = (c00 * c11) * c22;
                    det[t] = pd * pd;
                    /* S^-1 = M'M, M = C^-1 lower: [c][d] = sum_{k >= max(c, d)} M[k][c] M[k][d] */
                    Si[0][t] = (m00 * m00 + m10 * m10) + m20 * m20;
                    Si[1][t] = Si[3][t] = m10 * m11 + m20 * m21;
                    Si[2][t] = Si[6][t] = m20 * m22;
                    Si[4][t] = m11 * m11 + m21 * m21;
                    Si[5][t] = Si[7][t] = m21 * m22;
                    Si[8][t] = m22 * m22;
                }
            }
            if (do_p) {
                for (t = 0; t < T; ++t) {
                    i64 e;
                    mant[t] *= split(det[t], &e, bad + t);
                    expo[t] += e;
                }
                if ((j & 255) == 255)            /* < 512 mantissas in [1, 2) between these */
                    for (t = 0; t < T; ++t) {
                        i64 e;
                        mant[t] = split(mant[t], &e, bad + t);
                        expo[t] += e;
                    }
            }
            /* M_j = Lambda S_j^-1 Lambda' (symmetric to the bit: upper entries, mirrored) */
            tile_mm(Q, Q, T, LS[0], TILE, L[0], TILE, Si[0], TILE);
            tile_mm_nt_upper(Q, T, Mu, LS, L, 0);
            for (a = 0; a < Q; ++a)
                for (b = a; b < Q; ++b)
                    for (t = 0; t < T; ++t)
                        M[a * Q + b][t] = M[b * Q + a][t] = Mu[upper(Q, a, b)][t];

            if (do_p) {
                /* MY = M_j Z_j'Y, MX = M_j Z_j'X; the corrections summed over the levels */
                tile_mm(Q, 1, T, MY[0], TILE, M[0], TILE, Y[0], TILE);
                for (t = 0; t < T; ++t) {
                    double x = Y[0][t] * MY[0][t];
                    for (a = 1; a < Q; ++a)
                        x += Y[a][t] * MY[a][t];
                    cyy[t] += x;
                }
                tile_mm(Q, p, T, MX, T, M[0], TILE, X, T);
                for (s = 0; s < p; ++s) {
                    for (t = 0; t < T; ++t) {
                        double x = X[s * T + t] * MY[0][t];
                        for (a = 1; a < Q; ++a)
                            x += X[(a * p + s) * T + t] * MY[a][t];
                        cxy[s * T + t] += x;
                    }
                    for (u = s; u < p; ++u)
                        for (t = 0; t < T; ++t) {
                            double x = X[s * T + t] * MX[u * T + t];
                            for (a = 1; a < Q; ++a)
                                x += X[(a * p + s) * T + t] * MX[(a * p + u) * T + t];
                            cxx[(s * p + u) * T + t] += x;
                        }
                }
            }

            if (do_2) {
                /* T_j = I - B_j M_j, R_jj = B_j - B_j M_j B_j (upper entries) */
                tile_mm(Q, Q, T, BM[0], TILE, B[0], TILE, M[0], TILE);
                tile_mm(Q, Q, T, BMB[0], TILE, BM[0], TILE, B[0], TILE);
                for (a = 0; a < Q; ++a)
                    for (b = 0; b < Q; ++b)
                        for (t = 0; t < T; ++t) {
                            Tm[a * Q + b][t] = (a == b ? 1.0 : 0.0) - BM[a * Q + b][t];
                            if (a <= b)
                                Ru[upper(Q, a, b)][t] = B[a * Q + b][t] - BMB[a * Q + b][t];
                        }
                /* r_j = Z_j'Y - Z_j'X beta; Q_j = r_j r_j' / s2 (+ Z_j'X A X'Z_j) */
                /* (sums over the p fixed effects run left to right, the tile innermost) */
                for (a = 0; a < Q; ++a) {
                    double *x = res[a];
                    for (t = 0; t < T; ++t)
                        x[t] = X[(a * p) * T + t] * bet[t];
                    for (s = 1; s < p; ++s)
                        for (t = 0; t < T; ++t)
                            x[t] += X[(a * p + s) * T + t] * bet[s * T + t];
                    for (t = 0; t < T; ++t)
                        x[t] = Y[a][t] - x[t];
                }
                if (reml)
                    for (d = 0; d < Q; ++d)
                        for (s = 0; s < p; ++s) {
                            double *x = AX + (d * p + s) * T;
                            for (t = 0; t < T; ++t)
                                x[t] = X[(d * p) * T + t] * Am[(s * p) * T + t];
                            for (u = 1; u < p; ++u)
                                for (t = 0; t < T; ++t)
                                    x[t] += X[(d * p + u) * T + t] * Am[(s * p + u) * T + t];
                        }
                /* P_j = Z_j'X A X'Z_j (REML) */
                if (reml)
                    for (c = 0; c < Q; ++c)
                        for (d = c; d < Q; ++d) {
                            double *x = Pm[c * Q + d];
                            for (t = 0; t < T; ++t)
                                x[t] = X[(c * p) * T + t] * AX[(d * p) * T + t];
                            for (s = 1; s < p; ++s)
                                for (t = 0; t < T; ++t)
                                    x[t] += X[(c * p + s) * T + t] * AX[(d * p + s) * T + t];
                            if (d != c)
                                for (t = 0; t < T; ++t)
                                    Pm[d * Q + c][t] = x[t];
                        }
                for (u = 0; u < NQ; ++u)
                    for (t = 0; t < T; ++t)
                        Racc[u][t] += Ru[u][t];
            }

            if (do_2 && ar->sums) {
                /* Q_j = r_j r_j' / s2 (+ P_j); sum_j T_j Q_j T_j' (upper entries) */
                for (c = 0; c < Q; ++c)
                    for (d = c; d < Q; ++d)
                        for (t = 0; t < T; ++t) {
                            double x = (res[c][t] * s2i[t]) * res[d][t];
                            if (reml)
                                x += Pm[c * Q + d][t];
                            Qm[c * Q + d][t] = Qm[d * Q + c][t] = x;
                        }
                tile_mm(Q, Q, T, TQ[0], TILE, Tm[0], TILE, Qm[0], TILE);
                tile_mm_nt_upper(Q, T, gacc, TQ, Tm, 1);
                for (u = 0; u < NQ; ++u)
                    for (c = u; c < NQ; ++c)
                        for (t = 0; t < T; ++t)
                            RRacc[u * NQ + c][t] += Ru[u][t] * Ru[c][t];
            }

            if (do_2 && ar->satt) {
                /* u_j = T_j r_j, W_j = T_j Z_j'X, W_j A W_j' = T_j P_j T_j' */
                tile_mm(Q, 1, T, uj[0], TILE, Tm[0], TILE, res[0], TILE);
                tile_mm(Q, p, T, W, T, Tm[0], TILE, X, T);
                if (reml) {
                    tile_mm(Q, Q, T, TP[0], TILE, Tm[0], TILE, Pm[0], TILE);
                    tile_mm_nt_upper(Q, T, WAW, TP, Tm, 0);
                }
                /* X_j = 2 u_j u_j' / s2 - R_jj (+ 2 W_j A W_j'), upper entries */
                for (a = 0; a < Q; ++a)
                    for (d = a; d < Q; ++d)
                        for (t = 0; t < T; ++t) {
                            double x = ((2.0 * s2i[t]) * uj[a][t]) * uj[d][t]
                                - Ru[upper(Q, a, d)][t];
                            if (reml)
                                x += 2.0 * WAW[upper(Q, a, d)][t];
                            Xm[upper(Q, a, d)][t] = x;
                        }
                /* the sums */
                for (u = 0; u < NQ; ++u)
                    for (c = 0; c < NQ; ++c)
                        for (t = 0; t < T; ++t)
                            Ttacc[u * NQ + c][t] += Ru[u][t] * Xm[c][t];
                for (a = 0; a < Q; ++a)
                    for (b = a; b < Q; ++b)
                        for (t = 0; t < T; ++t)
                            UUacc[upper(Q, a, b)][t] += uj[a][t] * uj[b][t];
                for (s = 0; s < QP; ++s)
                    for (b = 0; b < Q; ++b)
                        for (t = 0; t < T; ++t)
                            WUacc[(s * Q + b) * T + t] += W[s * T + t] * uj[b][t];
                {
                    double *acc = WWacc;
                    for (s = 0; s < QP; ++s)
                        for (u = s; u < QP; ++u, acc += T)
                            for (t = 0; t < T; ++t)
                                acc[t] += W[s * T + t] * W[u * T + t];
                }
            }
        }
        if (do_p) {
            for (t = 0; t < T; ++t)
                ldv[t] = bad[t] ? NAN : log(mant[t]) + (double)expo[t] * 0.69314718055994530942;
            if (ar->gls)
                tile_gls(T, ar, j0, rw, cxx, cxy, cyy, ldv, bet, s2i, Am, Ch, Chi, zs, gtmp);
        }
    }

    /* outputs, voxel first */
    if (ar->products)
        for (t = 0; t < T; ++t)
            ar->logdet[j0 + t] = ldv[t];
    if (ar->products && !ar->gls)
        for (t = 0; t < T; ++t) {
            const i64 vx = j0 + t;
            ar->cyy[vx] = cyy[t];
            for (s = 0; s < p; ++s) {
                ar->cxy[vx * p + s] = cxy[s * T + t];
                for (u = 0; u < p; ++u)
                    ar->cxx[(vx * p + s) * p + u] = cxx[((s <= u) ? s * p + u : u * p + s) * T + t];
            }
        }
    if (level2)
        for (t = 0; t < T; ++t)
            for (a = 0; a < Q; ++a)
                for (b = 0; b < Q; ++b)
                    ar->R[((j0 + t) * Q + a) * Q + b] = Racc[upper(Q, a, b)][t];
    if (ar->sums)
        for (t = 0; t < T; ++t) {
            const i64 vx = j0 + t;
            for (a = 0; a < Q; ++a)
                for (b = 0; b < Q; ++b)
                    ar->g[(vx * Q + a) * Q + b] = gacc[upper(Q, a, b)][t];
            for (u = 0; u < NQ; ++u)
                for (c = 0; c < NQ; ++c)
                    ar->RR[(vx * NQ + u) * NQ + c] = RRacc[u <= c ? u * NQ + c : c * NQ + u][t];
        }
    if (ar->satt)
        for (t = 0; t < T; ++t) {
            const i64 vx = j0 + t;
            for (a = 0; a < Q; ++a)
                for (b = 0; b < Q; ++b) {
                    ar->UU[(vx * Q + a) * Q + b] = UUacc[upper(Q, a, b)][t];
                    for (c = 0; c < Q; ++c)
                        for (d = 0; d < Q; ++d)      /* [b, c, a, d] in the a, b, c, d loops */
                            ar->Tt[(((vx * Q + a) * Q + b) * Q + c) * Q + d] =
                                Ttacc[upper(Q, a, b) * NQ + upper(Q, c, d)][t];
                }
            for (s = 0; s < QP; ++s)
                for (b = 0; b < Q; ++b)
                    ar->WU[(vx * QP + s) * Q + b] = WUacc[(s * Q + b) * T + t];
            for (s = 0; s < QP; ++s)
                for (u = 0; u < QP; ++u) {
                    const i64 lo = s < u ? s : u, hi = s < u ? u : s;
                    /* upper entry (lo, hi) of a QP x QP matrix, rows in turn */
                    ar->WW[(vx * QP + s) * QP + u] =
                        WWacc[(lo * QP - lo * (lo - 1) / 2 + (hi - lo)) * T + t];
                }
        }
}

static inline __attribute__((always_inline)) void all_tiles(const i64 Q, const Args *ar,
                                                            double *w)
{
    i64 j0 = 0;
    const i64 v = ar->v;
    /* whole tiles, then the rest in tiles of 16, 8, 4, 2 and 1: fixed sizes vectorise or
     * unroll fully (a halving often evaluates a handful of voxels) */
    for (; j0 + TILE <= v; j0 += TILE)
        level_tile(Q, TILE, ar, j0, w);
    if (j0 + 16 <= v) {
        level_tile(Q, 16, ar, j0, w);
        j0 += 16;
    }
    if (j0 + 8 <= v) {
        level_tile(Q, 8, ar, j0, w);
        j0 += 8;
    }
    if (j0 + 4 <= v) {
        level_tile(Q, 4, ar, j0, w);
        j0 += 4;
    }
    if (j0 + 2 <= v) {
        level_tile(Q, 2, ar, j0, w);
        j0 += 2;
    }
    if (j0 < v)
        level_tile(Q, 1, ar, j0, w);
}

/* All voxels of a batch, tile by tile.  Returns 0, -1 when q is not 1, 2 or 3, -2 when the
 * scratch could not be allocated. */
CLONES int mpiblmm_level_eval(const Args *ar)
{
    const i64 p = ar->p;
    const i64 qp = QMAX * p;
    double *w = malloc(sizeof(double) * (size_t)((3 * qp + 2 * p * p + 2 * p + qp + qp * QMAX
                                                   + qp * (qp + 1) / 2 + 2 * p * p + p)
                                                  * TILE));
    if (w == NULL)
        return -2;
    if (ar->q == 1)
        all_tiles(1, ar, w);
    else if (ar->q == 2)
        all_tiles(2, ar, w);
    else if (ar->q == 3)
        all_tiles(3, ar, w);
    else {
        free(w);
        return -1;
    }
    free(w);
    return 0;
}

int mpiblmm_level_kernel_tile(void) { return TILE; }

/* The version of the call above: level_kernel.py refuses a library whose version is not its
 * own (a build older than the Python code).  Raise it whenever Args or its meaning changes. */
int mpiblmm_level_kernel_abi(void) { return 4; }

static struct PyModuleDef level_kernel_module = {
    PyModuleDef_HEAD_INIT, "_level_kernel",
    "Compiled per-level evaluation of mpiblmm's one-factor model (loaded with ctypes).", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__level_kernel(void) { return PyModule_Create(&level_kernel_module); }
