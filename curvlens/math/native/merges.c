/* curvlens's merge kernels: one sweep over a tensor's entries makes the merged
 * values of a method, where the torch code (curvlens/math/methods/) makes them
 * with a chain of operations, each one pass through memory.
 *
 * Every float operation is the one the torch code performs, in its order
 * (compiled with -ffp-contract=off: no fused multiply-add), so the merged values
 * are bit-identical to it; tests/math/test_native_merges.py checks that on
 * random tensors with ties, zeros and every supported option. The Python side
 * (curvlens/math/native/merges.py) calls a kernel only for the options it
 * implements and falls back to the torch code for every other.
 */
#include "common.h"

#define MB 512

/* 1 when a block holds a NaN or an infinity (an integer reduction: it vectorises). */
static inline uint32_t nonfinite(const float *x, i64 len) {
    uint32_t f = 0;
    for (i64 j = 0; j < len; j++) f |= (bits_of(x[j]) & 0x7f800000u) == 0x7f800000u;
    return f;
}

/* 1 when a block holds a value below zero (-0.0 is not). */
static inline uint32_t negative(const float *x, i64 len) {
    uint32_t f = 0;
    for (i64 j = 0; j < len; j++) f |= bits_of(x[j]) > 0x80000000u;
    return f;
}

/* Entries of a block some expert kept (the merge report's all_masked): none
 * counted without a mask, every entry when some expert is unmasked, else those
 * where the running maximum of the masks (anyk) is set. */
static inline i64 any_kept_in(const float *anyk, i64 len, int32_t any_mask, int32_t all_mask) {
    if (!any_mask) return 0;
    if (!all_mask) return len;
    i64 c = 0;
    for (i64 j = 0; j < len; j++) c += anyk[j] != 0.0f;
    return c;
}

/* Expert i's 0/1 mask of one block from its scores sc: kept when above thr, or
 * equal to it and (quota < 0: every tie; else while *quota > 0, in flat order;
 * each tie kept takes one from *quota). Returns the entries kept. */
static inline i64 block_mask(const float *sc, i64 len, float thr, i64 *quota, float *m) {
    i64 eq = 0, kept = 0;
    for (i64 j = 0; j < len; j++) {
        m[j] = sc[j] > thr ? 1.0f : 0.0f;
        eq += sc[j] == thr;
    }
    if (eq) {
        for (i64 j = 0; j < len; j++)
            if (sc[j] == thr) {
                if (*quota < 0) {
                    m[j] = 1.0f;
                } else if (*quota > 0) {
                    m[j] = 1.0f;
                    (*quota)--;
                }
            }
    }
    for (i64 j = 0; j < len; j++) kept += m[j] != 0.0f;
    return kept;
}

/* OTA with a base, combine 'precond' (curvlens/math/methods/ota.py):
 *   W_i = (v_i**p [* scale_i] + eps) * m_i, m_i = FFG mask of v_i * tau_i**2
 *   (pws[i] holds v_i**p as torch.pow made it: torch's sqrt is not IEEE's)
 *   (masked[i]: kept above thr[i], ties by quota[i]; else no mask),
 *   out = base + (sum_i W_i tau_i) / (sum_i W_i, 1 where 0);
 * with a mask in use, entries whose weight sum is not above cut (every expert
 * masked) take the base (fallback) or the experts' mean, exactly; without one
 * (eps 0), a zero weight sum takes the mean.
 * kept[i] and any_kept[0] count the masks (the merge report); bad[0] has bit 0
 * set when an input holds a NaN or infinity, bit 1 when a moment is negative:
 * the caller then runs the torch code, which refuses or propagates them. */
void cl_ota_merge(const void *b, int32_t bdt, const void *const *xs, const int32_t *xdt,
                  const void *const *vs, const int32_t *vdt, const float *const *pws, int32_t ne, i64 n,
                  const float *scale, float eps, const int32_t *masked, const float *thr, i64 *quota,
                  float cut, int32_t fallback, float *out, i64 *kept, i64 *any_kept, int32_t *bad) {
    float bf[MB], xf[MB], vf[MB], sc[MB], m[MB], w[MB], den[MB], num[MB], sx[MB], anyk[MB];
    int32_t any_mask = 0, all_mask = 1;
    for (int32_t i = 0; i < ne; i++) {
        any_mask |= masked[i];
        all_mask &= masked[i];
    }
    uint32_t fl = 0, neg = 0;
    i64 anyc = 0;
    for (i64 s0 = 0; s0 < n; s0 += MB) {
        i64 len = s0 + MB < n ? MB : n - s0;
        load_block(b, bdt, s0, len, bf);
        fl |= nonfinite(bf, len);
        for (i64 j = 0; j < len; j++) {
            den[j] = 0.0f;
            num[j] = 0.0f;
            sx[j] = 0.0f;
            anyk[j] = 0.0f;
        }
        for (int32_t i = 0; i < ne; i++) {
            load_block(xs[i], xdt[i], s0, len, xf);
            load_block(vs[i], vdt[i], s0, len, vf);
            const float *pw = pws[i];
            fl |= nonfinite(xf, len) | nonfinite(vf, len);
            neg |= negative(vf, len);
            for (i64 j = 0; j < len; j++) {
                sx[j] = sx[j] + xf[j];
                float t = xf[j] - bf[j];
                xf[j] = t;  /* tau from here on */
                float p = pw[s0 + j];
                if (scale[i] != 1.0f) p = p * scale[i];
                w[j] = p + eps;
                float t2 = t * t;
                sc[j] = vf[j] * t2;
            }
            if (masked[i]) {
                kept[i] += block_mask(sc, len, thr[i], quota + i, m);
                for (i64 j = 0; j < len; j++) {
                    w[j] = w[j] * m[j];
                    anyk[j] = m[j] > anyk[j] ? m[j] : anyk[j];
                }
            } else {
                kept[i] += len;
            }
            for (i64 j = 0; j < len; j++) {
                den[j] = den[j] + w[j];
                float wt = w[j] * xf[j];
                num[j] = num[j] + wt;
            }
        }
        float fne = (float)ne;
        for (i64 j = 0; j < len; j++) {
            float safe = den[j] == 0.0f ? 1.0f : den[j];
            float merged = bf[j] + num[j] / safe;
            if (any_mask) {
                float end = fallback ? bf[j] : sx[j] / fne;
                out[s0 + j] = den[j] > cut ? merged : end;
            } else {
                out[s0 + j] = den[j] == 0.0f ? sx[j] / fne : merged;
            }
        }
        anyc += any_kept_in(anyk, len, any_mask, all_mask);
    }
    any_kept[0] += anyc;
    bad[0] = (int32_t)(fl | (neg << 1));
}

/* TIES with a base (curvlens/math/methods/task_arithmetic.py, mergekit's
 * generalized task arithmetic with magnitude sparsification and sign consensus):
 * tau_i masked to |tau_i| above thr[i] (ties by quota[i]; sparse[i] 0: kept
 * whole), weighted by weights[i] (NULL: unit weights, no product), the elected
 * sign e = sign(sum_i), with + for a zero sum; the agreeing entries' sum times e,
 * divided (normalize) by the agreeing weights (1 where none agree), times
 * lambda (when not 1), added to the base. */
void cl_ties_merge(const void *b, int32_t bdt, const void *const *xs, const int32_t *xdt, int32_t ne, i64 n,
                   const int32_t *sparse, const float *thr, i64 *quota, const float *weights, int32_t normalize,
                   float lambda, float *out, i64 *kept, i64 *any_kept, int32_t *bad) {
    enum { NE = 16 };
    float bf[MB], sc[MB], m[MB], ssum[MB], anyk[MB], el[MB], mix[MB], dv[MB];
    float wd[NE][MB];
    int32_t any_sparse = 0, all_sparse = 1;
    for (int32_t i = 0; i < ne; i++) {
        any_sparse |= sparse[i];
        all_sparse &= sparse[i];
    }
    i64 anyc = 0;
    uint32_t fl = 0;
    for (i64 s0 = 0; s0 < n; s0 += MB) {
        i64 len = s0 + MB < n ? MB : n - s0;
        load_block(b, bdt, s0, len, bf);
        fl |= nonfinite(bf, len);
        for (i64 j = 0; j < len; j++) {
            ssum[j] = 0.0f;
            anyk[j] = 0.0f;
        }
        for (int32_t i = 0; i < ne; i++) {
            float *d = wd[i];
            load_block(xs[i], xdt[i], s0, len, d);
            fl |= nonfinite(d, len);
            for (i64 j = 0; j < len; j++) {
                d[j] = d[j] - bf[j];
                sc[j] = fabsf(d[j]);
            }
            if (sparse[i]) {
                kept[i] += block_mask(sc, len, thr[i], quota + i, m);
                for (i64 j = 0; j < len; j++) {
                    d[j] = d[j] * m[j];
                    anyk[j] = m[j] > anyk[j] ? m[j] : anyk[j];
                }
            } else {
                kept[i] += len;
            }
            if (weights)
                for (i64 j = 0; j < len; j++) d[j] = d[j] * weights[i];
            for (i64 j = 0; j < len; j++) ssum[j] = ssum[j] + d[j];
        }
        for (i64 j = 0; j < len; j++) {
            float s = ssum[j] > 0.0f ? 1.0f : (ssum[j] < 0.0f ? -1.0f : 0.0f);
            el[j] = s + (1.0f - fabsf(s));
            mix[j] = 0.0f;
            dv[j] = 0.0f;
        }
        for (int32_t i = 0; i < ne; i++) {
            const float *d = wd[i];
            float wi = weights ? weights[i] : 1.0f;
            for (i64 j = 0; j < len; j++) {
                float a = d[j] * el[j];
                float ag = a > 0.0f ? a : (a == 0.0f ? a : 0.0f);  /* torch.relu keeps -0.0 */
                mix[j] = mix[j] + ag;
                float sg = ag > 0.0f ? 1.0f : 0.0f;
                float ws = weights ? wi * sg : sg;
                dv[j] = dv[j] + ws;
            }
        }
        for (i64 j = 0; j < len; j++) {
            float mx = mix[j] * el[j];
            float div = dv[j];
            float sd = div > 0.0f ? 1.0f : (div < 0.0f ? -1.0f : 0.0f);
            div = div + (1.0f - fabsf(sd));
            if (normalize) mx = mx / div;
            if (lambda != 1.0f) mx = mx * lambda;
            out[s0 + j] = bf[j] + mx;
        }
        anyc += any_kept_in(anyk, len, any_sparse, all_sparse);
    }
    any_kept[0] += anyc;
    bad[0] = (int32_t)fl;
}

/* One sweep of |w - b| (fp32, sign cleared, as the magnitude scores): how many
 * bit patterns lie above hi (above[0]), and those inside [lo, hi], stored in buf
 * while fewer than cap. Returns how many were inside (more than cap: the caller
 * brackets again); bad[0] counts NaN and infinite differences. The top-k
 * threshold of TIES within a bracket found from a sample. */
i64 cl_mag_bracket(const void *b, int32_t bdt, const void *w, int32_t wdt, i64 n, uint32_t lo, uint32_t hi,
                   i64 *above, uint32_t *buf, i64 cap, i64 *bad) {
    float bf[MB], wf[MB];
    uint32_t u[MB];
    i64 a = 0, inside = 0, nb = 0;
    int lost = 0;
    uint32_t width = hi - lo;
    for (i64 s0 = 0; s0 < n; s0 += MB) {
        i64 len = s0 + MB < n ? MB : n - s0;
        load_block(b, bdt, s0, len, bf);
        load_block(w, wdt, s0, len, wf);
        i64 in_block = 0;
        for (i64 j = 0; j < len; j++) {
            float t = fabsf(wf[j] - bf[j]);
            uint32_t x = bits_of(t);
            u[j] = x;
            a += x > hi;
            nb += x >= 0x7f800000u;
            in_block += x - lo <= width;
        }
        if (in_block && inside + len <= cap) {
            inside += compact(u, len, lo, width, buf + inside);
        } else if (in_block) {
            inside += in_block;
            lost = 1;  /* full: only counted */
        }
    }
    if (lost && inside <= cap) inside = cap + 1;  /* the caller brackets again */
    above[0] = a;
    bad[0] = nb;
    return inside;
}
