/* What mpiblmm's compiled kernels share (blocked/_kernel.c, structures/_level_kernel.c):
 * the integer type, the mantissa/exponent split behind their log-determinants, and the
 * CPU clones.  Included by relative path; built by pip with each kernel. */
#ifndef MPIBLMM_KERNEL_COMMON_H
#define MPIBLMM_KERNEL_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;

#define MANT_MASK 0x000fffffffffffffULL
#define ONE_EXP 0x3ff0000000000000ULL

/* d = m 2^e with m in [1, 2): branch free, so the loops over a tile vectorise; *bad is set
 * where d is not positive and normal (then the log-determinant is NaN: the voxel is reported
 * as failed, as log of a non-positive pivot or determinant would be).  A sum of logs is then
 * the log of a product of mantissas plus the sum of exponents times log 2. */
static inline double split(double d, i64 *e, i64 *bad) {
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    const i64 ex = (i64)((bits >> 52) & 0x7ff);
    *bad |= (i64)(ex == 0) | (i64)(ex == 0x7ff) | (i64)(bits >> 63);
    *e = ex - 1023;
    bits = (bits & MANT_MASK) | ONE_EXP;
    memcpy(&d, &bits, sizeof d);
    return d;
}

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
/* One build serves any x86-64 CPU; the AVX2 clone is chosen at load time where the CPU has
 * it.  Elementwise +, -, *, /, sqrt are correctly rounded in both: the same bits. */
#define CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef CLONES
#define CLONES
#endif

#endif
