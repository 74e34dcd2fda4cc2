/* Compiled evaluation of the blocked estimator for one-effect random factors without a dense
 * tail (nested chains such as subject in family in site): the numbers of
 * mpiblmm/lmm/blocked/cholesky.py and gradient.py, fused into one pass per stage with the
 * voxels of a tile innermost, where numpy makes dozens of passes over (entries x voxels).
 *
 * Called through ctypes by kernel.py, which builds the plan (index arrays, int32) and owns
 * the layouts (C order):
 *   S values  (n_vals, T)      the prefix pattern of pattern.py with q = 1: the diagonal of
 *                              position a at diag_off[a] + level, the cross entries of column
 *                              factor b from cross_off[b], col_start[b + 1] - col_start[b] of
 *                              them (row node col_row[t], column level col_y[t]);
 *   rows      (n_nodes, r, T)  node = node_off[a] + level, r = p + 1 columns [X Y];
 * T the voxels of a tile.  Inputs and outputs hold the whole batch (v voxels), in the
 * kernel's order (kernel.kernel_forms): zz (n_zz, v | 1) in the order of the S values,
 * Z'X (n_nodes, p, v | 1), Z'Y (n_nodes, v), theta (K, v); outputs voxel first.
 * Each voxel's arithmetic uses its own column only, in a fixed order, so its bits do not
 * depend on the batch or the tile (no FMA contraction: built with -ffp-contract=off; the
 * AVX2 and default clones differ only in vector width).
 *
 * Per tile:
 *   1. S = I + Lambda' Z'Z Lambda in the pattern (Lambda_a = theta_a);
 *   2. right-looking Cholesky in place (the diagonal holds 1 / L_yy, the cross entries
 *      L_xy = S_xy / L_yy), the Schur updates S[target] -= L[i1] L[i2] of each column
 *      (pattern.updates); log|V| = log|S| = sum log(pivots), as mantissa and exponent;
 *   3. c = L^-1 Lambda' Z'[X Y] by forward substitution and G = c'c, so that
 *      [X Y]'V^-1[X Y] = [X Y]'[X Y] - G (ALGORITHM.md, "Product forms");
 * and with the gradient (gradient.py, equations (1)-(3)):
 *   4. U = L^-T c by back substitution (in place of c) and its Gram matrix per factor,
 *      sum_x U_x U_x';
 *   5. Sigma = S^-1 on the pattern of L by the Takahashi recurrences (W_xy = L_xy / L_yy:
 *      Sigma_xy = -sum_x' Sigma_xx' W_x'y, Sigma_yy = L_yy^-2 - sum_x W_xy Sigma_xy);
 *   6. F_a = sum over the stored Z'Z entries of Sigma_yx Lambda_x A_xy (equation (1)).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../kernel_common.h"

/* The index type of the plan: int32 halves the bytes of the index streams. */
typedef int32_t ix;

#define TILE 32

/* The parameters both functions take after the sizes: the plan (kernel.py: Plan), the
 * inputs, the tile's scratch and the outputs. */
#define EVAL_PARAMS \
    const i64 *levels, const i64 *node_off, const i64 *diag_off, const i64 *cross_off, \
    const i64 *col_start, const ix *col_row, const ix *col_y, \
    const i64 *upd_start, const ix *upd_tgt, const ix *upd_i1, const ix *upd_i2, \
    const unsigned char *upd_off, \
    i64 n_zz, i64 n_diag, const ix *asm_dst, const ix *asm_pa, const ix *asm_pb, \
    i64 n_fill, const ix *fill, \
    const double *zz, i64 zz_per_voxel, const double *theta, \
    const double *zx, const double *zy, i64 wx_per_voxel, \
    double *vals, double *c, i64 *expo, double *mant, double *acc, \
    double *logdet, double *G, \
    int gradient, double *sig, double *F, double *Gram

/* The evaluation of one tile of T voxels (see the top of the file); inlined with T fixed at
 * TILE, 16 and 8 (fully vectorised inner loops) and with T as given (the rest of a batch). */
static inline __attribute__((always_inline)) void eval_tile(
    const i64 T, i64 v, i64 j0, i64 K, i64 r, i64 n_vals, i64 n_nodes,
    EVAL_PARAMS)
{
    const i64 p = r - 1, rr = r * r;
    const i64 zv = zz_per_voxel ? v : 1, zs = zz_per_voxel ? 1 : 0;
    const i64 xv = wx_per_voxel ? v : 1, xs = wx_per_voxel ? 1 : 0;
    i64 a, b, y, t, u, s, s2, j, i, n;

    /* 1. S in the pattern: the stored Z'Z entries (diagonal ones first, plus I), zero at
     *    the fill */
    for (i = 0; i < n_zz; ++i) {
        double *dst = vals + (i64)asm_dst[i] * T;
        const double *z = zz + i * zv + j0 * zs;
        const double *ta = theta + asm_pa[i] * v + j0, *tb = theta + asm_pb[i] * v + j0;
        if (i < n_diag)
            for (j = 0; j < T; ++j)
                dst[j] = (ta[j] * z[j * zs]) * tb[j] + 1.0;
        else
            for (j = 0; j < T; ++j)
                dst[j] = (ta[j] * z[j * zs]) * tb[j];
    }
    for (i = 0; i < n_fill; ++i)
        memset(vals + (i64)fill[i] * T, 0, (size_t)T * sizeof(double));

    /* 2. factorisation in place (diagonal: 1 / L_yy; cross: L_xy), log|S| */
    i64 *bad = expo + T;
    for (j = 0; j < T; ++j) {
        mant[j] = 1.0;
        expo[j] = 0;
        bad[j] = 0;
    }
    for (b = 0; b < K; ++b) {
        double *d = vals + diag_off[b] * T;
        for (y = 0; y < levels[b]; ++y) {
            double *dy = d + y * T;
            for (j = 0; j < T; ++j) {
                i64 e;
                mant[j] *= split(dy[j], &e, bad + j);
                expo[j] += e;
            }
            for (j = 0; j < T; ++j)
                dy[j] = 1.0 / sqrt(dy[j]);
            if ((y & 255) == 255)          /* < 512 mantissas in [1, 2) between these */
                for (j = 0; j < T; ++j) {
                    i64 e;
                    mant[j] = split(mant[j], &e, bad + j);
                    expo[j] += e;
                }
        }
        double *x = vals + cross_off[b] * T;
        for (t = col_start[b]; t < col_start[b + 1]; ++t, x += T) {
            const double *li = d + (i64)col_y[t] * T;
            for (j = 0; j < T; ++j)
                x[j] = x[j] * li[j];
        }
        for (u = upd_start[b]; u < upd_start[b + 1]; ++u) {
            double *tg = vals + (i64)upd_tgt[u] * T;
            const double *l1 = vals + (i64)upd_i1[u] * T, *l2 = vals + (i64)upd_i2[u] * T;
            for (j = 0; j < T; ++j)
                tg[j] -= l1[j] * l2[j];
        }
    }
    for (j = 0; j < T; ++j)
        logdet[j0 + j] = bad[j] ? NAN : log(mant[j]) + (double)expo[j] * 0.69314718055994530942;

    /* 3. c = L^-1 Lambda' Z'[X Y] by columns, and G = c'c as each column's c is final */
    for (a = 0; a < K; ++a) {
        const double *ta = theta + a * v + j0;
        for (n = node_off[a]; n < node_off[a + 1]; ++n) {
            double *cn = c + n * r * T;
            for (s = 0; s < p; ++s) {
                const double *src = zx + (n * p + s) * xv + j0 * xs;
                for (j = 0; j < T; ++j)
                    cn[s * T + j] = ta[j] * src[j * xs];
            }
            const double *src = zy + n * v + j0;
            for (j = 0; j < T; ++j)
                cn[p * T + j] = ta[j] * src[j];
        }
    }
    double *g = acc;                              /* (r, r, T): contiguous over the tile */
    for (j = 0; j < T * rr; ++j)
        g[j] = 0.0;
    for (b = 0; b < K; ++b) {
        const double *d = vals + diag_off[b] * T;
        for (y = 0; y < levels[b]; ++y) {
            double *cn = c + (node_off[b] + y) * r * T;
            const double *li = d + y * T;
            for (s = 0; s < r; ++s)
                for (j = 0; j < T; ++j)
                    cn[s * T + j] = cn[s * T + j] * li[j];
            for (s = 0; s < r; ++s)
                for (s2 = s; s2 < r; ++s2)
                    for (j = 0; j < T; ++j)
                        g[(s * r + s2) * T + j] += cn[s * T + j] * cn[s2 * T + j];
        }
        const double *l = vals + cross_off[b] * T;
        for (t = col_start[b]; t < col_start[b + 1]; ++t, l += T) {
            double *cr = c + (i64)col_row[t] * r * T;
            const double *cc = c + (node_off[b] + col_y[t]) * r * T;
            for (s = 0; s < r; ++s)
                for (j = 0; j < T; ++j)
                    cr[s * T + j] -= l[j] * cc[s * T + j];
        }
    }
    for (j = 0; j < T; ++j)
        for (s = 0; s < r; ++s)
            for (s2 = 0; s2 < r; ++s2)
                G[(j0 + j) * rr + s * r + s2] = g[(s2 < s ? s2 * r + s : s * r + s2) * T + j];
    if (!gradient)
        return;

    /* 4. U = L^-T c in place of c, by columns, last first, and its Gram matrix per factor
     *    as each column's U is final */
    double *U = c;
    for (b = K - 1; b >= 0; --b) {
        const double *l = vals + cross_off[b] * T;
        for (t = col_start[b]; t < col_start[b + 1]; ++t, l += T) {
            const double *ur = U + (i64)col_row[t] * r * T;
            double *uc = U + (node_off[b] + col_y[t]) * r * T;
            for (s = 0; s < r; ++s)
                for (j = 0; j < T; ++j)
                    uc[s * T + j] -= l[j] * ur[s * T + j];
        }
        double *gb = acc;                            /* (r, r, T) */
        for (j = 0; j < T * rr; ++j)
            gb[j] = 0.0;
        const double *d = vals + diag_off[b] * T;
        for (y = 0; y < levels[b]; ++y) {
            double *un = U + (node_off[b] + y) * r * T;
            const double *li = d + y * T;
            for (s = 0; s < r; ++s)
                for (j = 0; j < T; ++j)
                    un[s * T + j] = un[s * T + j] * li[j];
            for (s = 0; s < r; ++s)
                for (s2 = s; s2 < r; ++s2)
                    for (j = 0; j < T; ++j)
                        gb[(s * r + s2) * T + j] += un[s * T + j] * un[s2 * T + j];
        }
        for (j = 0; j < T; ++j)                     /* voxel j at j0 + j: (v, K, r, r) */
            for (s = 0; s < r; ++s)
                for (s2 = 0; s2 < r; ++s2)
                    Gram[((j0 + j) * K + b) * rr + s * r + s2] =
                        gb[(s2 < s ? s2 * r + s : s * r + s2) * T + j];
    }

    /* 5. selected inversion, by columns, last first: the cross entries L_xy -> W_xy =
     *    L_xy L_yy^-1 and Sigma_xy = 0 before the column's sums */
    for (b = K - 1; b >= 0; --b) {
        {
            const double *d = vals + diag_off[b] * T;
            double *x = vals + cross_off[b] * T, *sx = sig + cross_off[b] * T;
            for (t = col_start[b]; t < col_start[b + 1]; ++t, x += T, sx += T) {
                const double *li = d + (i64)col_y[t] * T;
                for (j = 0; j < T; ++j) {
                    x[j] = x[j] * li[j];
                    sx[j] = 0.0;
                }
            }
        }
        for (u = upd_start[b]; u < upd_start[b + 1]; ++u) {
            const double *st = sig + (i64)upd_tgt[u] * T;
            double *s1 = sig + (i64)upd_i1[u] * T;
            const double *w2 = vals + (i64)upd_i2[u] * T;
            if (upd_off[u]) {
                double *s2p = sig + (i64)upd_i2[u] * T;
                const double *w1 = vals + (i64)upd_i1[u] * T;
                for (j = 0; j < T; ++j) {
                    s1[j] -= st[j] * w2[j];
                    s2p[j] -= st[j] * w1[j];
                }
            } else {
                for (j = 0; j < T; ++j)
                    s1[j] -= st[j] * w2[j];
            }
        }
        const double *li = vals + diag_off[b] * T;
        double *sd = sig + diag_off[b] * T;
        for (y = 0; y < levels[b] * T; ++y)
            sd[y] = li[y] * li[y];
        const double *w = vals + cross_off[b] * T, *sx = sig + cross_off[b] * T;
        for (t = col_start[b]; t < col_start[b + 1]; ++t, w += T, sx += T) {
            double *sy = sd + (i64)col_y[t] * T;
            for (j = 0; j < T; ++j)
                sy[j] -= w[j] * sx[j];
        }
    }

    /* 6. F_a (equation (1)): voxel first (v, K) */
    double *f = acc;                              /* (K, T) */
    for (j = 0; j < T * K; ++j)
        f[j] = 0.0;
    for (i = 0; i < n_zz; ++i) {
        const i64 pa = asm_pa[i], pb = asm_pb[i];
        const double *z = zz + i * zv + j0 * zs, *sg = sig + (i64)asm_dst[i] * T;
        const double *ta = theta + pa * v + j0, *tb = theta + pb * v + j0;
        for (j = 0; j < T; ++j)
            f[pb * T + j] += sg[j] * (ta[j] * z[j * zs]);
        if (pa != pb)
            for (j = 0; j < T; ++j)
                f[pa * T + j] += (sg[j] * tb[j]) * z[j * zs];
    }
    for (j = 0; j < T; ++j)
        for (a = 0; a < K; ++a)
            F[(j0 + j) * K + a] = f[a * T + j];
}

/* All voxels of a batch, tile by tile (scratch arrays sized for TILE voxels). */
CLONES int mpiblmm_scalar_eval(
    i64 v, i64 K, i64 r, i64 n_vals, i64 n_nodes,
    EVAL_PARAMS)
{
    i64 j0 = 0;
#define TILE_AT(T_) eval_tile(T_, v, j0, K, r, n_vals, n_nodes, levels, node_off, diag_off, \
        cross_off, col_start, col_row, col_y, upd_start, upd_tgt, upd_i1, upd_i2, upd_off, \
        n_zz, n_diag, asm_dst, asm_pa, asm_pb, n_fill, fill, zz, zz_per_voxel, theta, zx, zy, \
        wx_per_voxel, vals, c, expo, mant, acc, logdet, G, gradient, sig, F, Gram)
    /* whole tiles, then the rest in tiles of 16 and 8 (fixed sizes vectorise fully) */
    for (; j0 + TILE <= v; j0 += TILE)
        TILE_AT(TILE);
    if (j0 + 16 <= v) {
        TILE_AT(16);
        j0 += 16;
    }
    if (j0 + 8 <= v) {
        TILE_AT(8);
        j0 += 8;
    }
    if (j0 < v)
        TILE_AT(v - j0);
#undef TILE_AT
    return 0;
}

int mpiblmm_kernel_tile(void) { return TILE; }

/* The version of the call above: kernel.py refuses a library whose version is not its own
 * (a build older than the Python code, e.g. after `git pull` without scripts/setup.sh).
 * Raise it whenever the parameters or their meaning change. */
int mpiblmm_kernel_abi(void) { return 1; }

/* An importable module, so that the build installs the library where kernel.py finds it
 * (it loads this file with ctypes). */
static struct PyModuleDef kernel_module = {
    PyModuleDef_HEAD_INIT, "_kernel",
    "Compiled evaluation of mpiblmm's blocked estimator (loaded with ctypes).", -1, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&kernel_module); }
