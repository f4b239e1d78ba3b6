/* What every curvlens kernel file shares: the dtype-widening loads.
 * dtype codes: 0 = float32, 1 = bfloat16. */
#ifndef CURVLENS_KERNELS_COMMON_H
#define CURVLENS_KERNELS_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;

static inline float ld(const void *p, int dt, i64 i) {
    if (dt == 1) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)p)[i];
}

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Blocks of entries widened to fp32, the dtype test outside the loop (so it
 * vectorises): bf16 is the top half of an fp32 pattern. */
static inline void load_block(const void *p, int dt, i64 s0, i64 len, float *out) {
    if (dt == 1) {
        const uint16_t *q = (const uint16_t *)p + s0;
        for (i64 j = 0; j < len; j++) {
            uint32_t u = (uint32_t)q[j] << 16;
            memcpy(out + j, &u, 4);
        }
    } else {
        memcpy(out, (const float *)p + s0, (size_t)len * 4);
    }
}

/* Sums in float64 are taken over 8 interleaved lanes (entry i into lane i % 8,
 * lanes added at the end): a fixed order, whatever the machine, that the
 * compiler can vectorise (it may not reorder a single running sum). */
#define LANES 8

#endif
