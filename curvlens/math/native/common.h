/* What every curvlens kernel file shares: the dtype-widening loads.
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16. */
#ifndef CURVLENS_KERNELS_COMMON_H
#define CURVLENS_KERNELS_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;

/* An fp16 pattern widened to fp32, exactly: exponent and mantissa moved into
 * fp32's places and scaled by 2**112 (a power of two: exact, subnormals
 * included; nothing here flushes them), infinities and NaNs kept as such. No
 * branch, so loops over it vectorise. */
static inline float half_to_float(uint16_t h) {
    uint32_t mag = h & 0x7fffu, sign = (uint32_t)(h & 0x8000u) << 16, u = mag << 13;
    float f;
    memcpy(&f, &u, 4);
    f *= 0x1p112f;
    uint32_t w;
    memcpy(&w, &f, 4);
    w = mag >= 0x7c00u ? (u | 0x7f800000u) : w;
    w |= sign;
    memcpy(&f, &w, 4);
    return f;
}

static inline float ld(const void *p, int dt, i64 i) {
    if (dt == 1) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    if (dt == 2) return half_to_float(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Blocks of entries widened to fp32, the dtype test outside the loop (so it
 * vectorises): bf16 is the top half of an fp32 pattern; fp16 as above. */
static inline void load_block(const void *p, int dt, i64 s0, i64 len, float *out) {
    if (dt == 1) {
        const uint16_t *q = (const uint16_t *)p + s0;
        for (i64 j = 0; j < len; j++) {
            uint32_t u = (uint32_t)q[j] << 16;
            memcpy(out + j, &u, 4);
        }
    } else if (dt == 2) {
        const uint16_t *q = (const uint16_t *)p + s0;
        for (i64 j = 0; j < len; j++) out[j] = half_to_float(q[j]);
    } else {
        memcpy(out, (const float *)p + s0, (size_t)len * 4);
    }
}

/* Sums in float64 are taken over 8 interleaved lanes (entry i into lane i % 8,
 * lanes added at the end): a fixed order, whatever the machine, that the
 * compiler can vectorise (it may not reorder a single running sum). */
#define LANES 8

#ifdef __AVX2__
#include <immintrin.h>
/* cl_compact_lut[m]: the lane order that moves the set lanes of the 8-bit mask
 * m to the front, for _mm256_permutevar8x32_epi32 (kernels.c fills it when the
 * library loads, before any thread can call a kernel: filled lazily, two
 * threads' first calls would race on it) */
extern int32_t cl_compact_lut[256][8];
#endif

/* The values of u[0..len) whose offset from lo is at most width, stored in
 * order at out (which has room for len); returns how many. AVX2: eight at a
 * time through the lane-order table, no branch per value. The magnitude
 * bracket (merges.c) and the scout's windows (kernels.c) gather with it. */
static inline i64 compact(const uint32_t *u, i64 len, uint32_t lo, uint32_t width, uint32_t *out) {
    i64 c = 0, j = 0;
#ifdef __AVX2__
    const __m256i vlo = _mm256_set1_epi32((int32_t)lo);
    const __m256i flip = _mm256_set1_epi32((int32_t)0x80000000u);
    const __m256i vw = _mm256_xor_si256(_mm256_set1_epi32((int32_t)width), flip);
    for (; j + 8 <= len; j += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(u + j));
        __m256i off = _mm256_xor_si256(_mm256_sub_epi32(x, vlo), flip);
        __m256i out_of = _mm256_cmpgt_epi32(off, vw);  /* unsigned off > width */
        int m = ~_mm256_movemask_ps(_mm256_castsi256_ps(out_of)) & 0xff;
        __m256i idx = _mm256_loadu_si256((const __m256i *)cl_compact_lut[m]);
        _mm256_storeu_si256((__m256i *)(out + c), _mm256_permutevar8x32_epi32(x, idx));
        c += __builtin_popcount((unsigned)m);
    }
#endif
    for (; j < len; j++) {
        out[c] = u[j];
        c += u[j] - lo <= width;
    }
    return c;
}

#endif
