/* curvlens's CPU kernels: one sweep over a tensor's entries feeds every statistic.
 *
 * Each function reads its inputs once, entry by entry, in their stored dtypes
 * (fp32, or bf16 widened exactly), and accumulates in registers: what a chain of
 * torch operations does in one pass per operation, each through memory. They are
 * compiled at first use (curvlens/math/native/__init__.py) with
 * -ffp-contract=off, so every fp32 product and sum is the IEEE operation torch
 * performs (no fused multiply-add), and scores and merged values come out
 * bit-identical to the torch code; sums are accumulated in float64.
 *
 * dtype codes: 0 = float32, 1 = bfloat16.
 */
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

/* log10 of a positive, finite double (every fp32 value is a normal double):
 * exponent from the bits, log of the mantissa in [sqrt(1/2), sqrt(2)) from the
 * atanh series to s**21 (|s| <= 0.172: truncation below 1e-17), so within about
 * one double ulp of the true value; branch-free, so the loops vectorise. */
static inline double log10_pos(double x) {
    uint64_t u;
    memcpy(&u, &x, 8);
    /* the exponent as a double without an int64 -> double conversion (AVX2 has
     * none): 2**52 + e read back from the bits */
    uint64_t eb = (u >> 52) | 0x4330000000000000ULL;
    double ebias;
    memcpy(&ebias, &eb, 8);
    uint64_t mb = (u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
    double m;
    memcpy(&m, &mb, 8);
    double big = m > 1.4142135623730951 ? 1.0 : 0.0;
    m = big > 0 ? m * 0.5 : m;
    double ed = ebias - 4503599627370496.0 - 1023.0 + big;
    double s = (m - 1.0) / (m + 1.0);
    double s2 = s * s;
    double p = 1.0 / 21.0;
    p = p * s2 + 1.0 / 19.0;
    p = p * s2 + 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    double ln_m = 2.0 * s * p;
    return ed * 0.30102999566398119521 + ln_m * 0.43429448190325182765;
}

/* ---------------------------------------------------------------- moments */
/* Sums in float64 are taken over 8 interleaved lanes (entry i into lane i % 8,
 * lanes added at the end): a fixed order, whatever the machine, that the
 * compiler can vectorise (it may not reorder a single running sum). */
#define LANES 8

/* One sweep over a moment tensor v (fp32, finite, >= 0):
 *   hist[(bits & 0x7fffffff) >> 16] += 1 for every positive entry (65536 bins:
 *     bf16-width bins of the value; zeros are not binned);
 *   out[0] zeros (+-0), out[1] positives, out[2] sum of log10(v) over positives,
 *   out[3] sum of v, out[4] max v;
 *   with ulut: counts of log10 v in user bins. ulut[fine bin] = user bin k >= 0
 *   when every value of that fine bin falls in bin k, -1 when none is counted,
 *   -2 when the fine bin straddles an edge: then the user bin is the largest k
 *   with lo[k] <= bits (lo ascending, nb of them), counted if lo[0] <= bits <= hi. */
void cl_moment_sweep(const float *v, i64 n, i64 *hist, const int32_t *ulut, const uint32_t *lo, int32_t nb,
                     uint32_t hi, i64 *ucounts, double *out) {
    i64 zeros = 0;
    double slog[LANES] = {0}, sv[LANES] = {0};
    float vmax[LANES] = {0};
    enum { B = 1024 };
    double lg[B];
    for (i64 s0 = 0; s0 < n; s0 += B) {
        i64 len = s0 + B < n ? B : n - s0;
        const float *x = v + s0;
        for (i64 j = 0; j < len; j++) {
            double d = x[j] > 0.0f ? (double)x[j] : 1.0;
            lg[j] = log10_pos(d);  /* 0 for zeros */
        }
        i64 j = 0;
        for (; j + LANES <= len; j += LANES)
            for (int k = 0; k < LANES; k++) {
                slog[k] += lg[j + k];
                sv[k] += (double)x[j + k];
                vmax[k] = x[j + k] > vmax[k] ? x[j + k] : vmax[k];
            }
        for (; j < len; j++) {
            slog[j % LANES] += lg[j];
            sv[j % LANES] += (double)x[j];
            vmax[j % LANES] = x[j] > vmax[j % LANES] ? x[j] : vmax[j % LANES];
        }
        for (j = 0; j < len; j++) {
            if (!(x[j] > 0.0f)) {
                zeros++;
                continue;
            }
            uint32_t b = bits_of(x[j]);
            uint32_t f = b >> 16;
            hist[f]++;
            if (ulut) {
                int32_t k = ulut[f];
                if (k >= 0) {
                    ucounts[k]++;
                } else if (k == -2 && b <= hi && b >= lo[0]) {
                    int32_t a = 0, z = nb - 1;  /* largest k with lo[k] <= b */
                    while (a < z) {
                        int32_t mid = (a + z + 1) >> 1;
                        if (lo[mid] <= b) a = mid; else z = mid - 1;
                    }
                    ucounts[a]++;
                }
            }
        }
    }
    double a = 0, c = 0;
    float m = 0;
    for (int k = 0; k < LANES; k++) {
        a += slog[k];
        c += sv[k];
        m = vmax[k] > m ? vmax[k] : m;
    }
    out[0] = (double)zeros;
    out[1] = (double)(n - zeros);
    out[2] = a;
    out[3] = c;
    out[4] = (double)m;
}

/* Positive entries of v whose fine bin is marked, with their flat indices, in
 * index order; at most cap are stored, the count is returned. */
i64 cl_collect_bins(const float *v, i64 n, const uint8_t *mark, float *ov, i64 *oi, i64 cap) {
    i64 c = 0;
    for (i64 i = 0; i < n; i++) {
        float x = v[i];
        if (x > 0.0f && mark[bits_of(x) >> 16]) {
            if (c < cap) {
                ov[c] = x;
                oi[c] = i;
            }
            c++;
        }
    }
    return c;
}

/* ---------------------------------------------------------------- overlap */
/* Pair statistics of ne (<= 16) experts' moments (fp32), all pairs in one sweep.
 * logs: log10 of (v + eps) rounded to fp32 first (as torch adds eps in fp32).
 * Top sets: entry i of expert e is in its top set f (< 4) when v > thr[e*nf+f],
 * or v == thr and i >= cut[e*nf+f] (ties kept from the highest index down).
 * Per pair p (a = pa[p], b = pb[p]) out[p*K + ...], K = 9 + nf, added to:
 *   0 entries where either is positive (the support),
 *   1 sum (va/ma)*(vb/mb) over all entries, 2 sum (va/ma)^2, 3 sum (vb/mb)^2,
 *   4..8 sums over the support of la, lb, la*la, lb*lb, la*lb,
 *   9.. top-set intersections per f. ma, mb: the experts' max (vmax). */
#define OV_B 512
void cl_overlap_sweep(const float *const *vs, int32_t ne, i64 n, float eps, const double *vmax,
                      const int32_t *pa, const int32_t *pb, int32_t np, int32_t nf, const float *thr,
                      const i64 *cut, double *out) {
    const int32_t K = 9 + nf;
    static __thread double lg[16][OV_B], sc[16][OV_B], ps[16][OV_B];
    static __thread uint8_t top[16][4][OV_B];
    double inv[16];
    for (int32_t e = 0; e < ne; e++) inv[e] = vmax[e] > 0 ? 1.0 / vmax[e] : 0.0;
    for (i64 s0 = 0; s0 < n; s0 += OV_B) {
        i64 len = s0 + OV_B < n ? OV_B : n - s0;
        for (int32_t e = 0; e < ne; e++) {
            const float *v = vs[e] + s0;
            double ie = inv[e];
            for (i64 j = 0; j < len; j++) {
                float y = v[j] + eps;
                lg[e][j] = log10_pos((double)y);
                sc[e][j] = (double)v[j] * ie;
                ps[e][j] = v[j] > 0.0f ? 1.0 : 0.0;
            }
            for (int32_t f = 0; f < nf; f++) {
                float t = thr[e * nf + f];
                i64 c = cut[e * nf + f] - s0;
                for (i64 j = 0; j < len; j++)
                    top[e][f][j] = (uint8_t)((v[j] > t) | ((v[j] == t) & (j >= c)));
            }
        }
        for (int32_t p = 0; p < np; p++) {
            int32_t a = pa[p], b = pb[p];
            double acc[9][LANES] = {{0}};
            i64 j = 0;
            for (; j < len; j += LANES) {
                int m = len - j < LANES ? (int)(len - j) : LANES;
                for (int k = 0; k < m; k++) {
                    double x = sc[a][j + k], y = sc[b][j + k];
                    double in = ps[a][j + k] + ps[b][j + k] > 0 ? 1.0 : 0.0;
                    double u = lg[a][j + k] * in, w = lg[b][j + k] * in;
                    acc[0][k] += in;
                    acc[1][k] += x * y;
                    acc[2][k] += x * x;
                    acc[3][k] += y * y;
                    acc[4][k] += u;
                    acc[5][k] += w;
                    acc[6][k] += u * u;
                    acc[7][k] += w * w;
                    acc[8][k] += u * w;
                }
            }
            double *o = out + (i64)p * K;
            for (int q = 0; q < 9; q++) {
                double t = 0;
                for (int k = 0; k < LANES; k++) t += acc[q][k];
                o[q] += t;
            }
            for (int32_t f = 0; f < nf; f++) {
                i64 both = 0;
                for (i64 jj = 0; jj < len; jj++) both += top[a][f][jj] & top[b][f][jj];
                o[9 + f] += (double)both;
            }
        }
    }
}

/* ----------------------------------------------------------- task vectors */
/* Edit norms and interference of task vectors tau_i = w_i - base, one sweep.
 * ws[i] (dtype wdt[i]) for i < nw (<= 16); moments vs[j] (fp32). out[0] = sum
 * base^2; out[1 + i] = sum (w_i - base)^2, the difference in float64, for i < ne.
 * Per pair p, o = out + 1 + ne + p*10, with tau in fp32 (w - base rounded to
 * fp32, as torch subtracts fp32 tensors) and then in float64: 0 dot, 1 |a|^2,
 * 2 |b|^2, 3 entries with a*b != 0, 4 with a*b < 0, 5 sum |a*b|, 6 the same over
 * conflicts, 7 sum |a*b| sqrt(va) sqrt(vb), 8 the same over conflicts (7 and 8
 * only when the pair has moments, qa[p] >= 0 and qb[p] >= 0). Sums in 8 lanes. */
void cl_tv_sweep(const void *base, int32_t bdt, const void *const *ws, const int32_t *wdt, int32_t nw, int32_t ne,
                 const float *const *vs, i64 n, const int32_t *pa, const int32_t *pb, const int32_t *qa,
                 const int32_t *qb, int32_t np, double *out) {
    enum { B = 512 };
    static __thread float tau[16][B];
    static __thread double bd[B];
    double tsq[16][LANES] = {{0}}, bsq[LANES] = {0};
    double pacc[64][9][LANES];
    if (np > 64) np = 64;
    memset(pacc, 0, sizeof(pacc));
    for (i64 s0 = 0; s0 < n; s0 += B) {
        i64 len = s0 + B < n ? B : n - s0;
        for (i64 j = 0; j < len; j++) bd[j] = (double)ld(base, bdt, s0 + j);
        for (i64 j = 0; j < len; j += LANES) {
            int m = len - j < LANES ? (int)(len - j) : LANES;
            for (int k = 0; k < m; k++) bsq[k] += bd[j + k] * bd[j + k];
        }
        for (int32_t i = 0; i < nw; i++) {
            for (i64 j = 0; j < len; j++) {
                float w = ld(ws[i], wdt[i], s0 + j);
                tau[i][j] = w - (float)bd[j];
            }
            if (i < ne)
                for (i64 j = 0; j < len; j += LANES) {
                    int m = len - j < LANES ? (int)(len - j) : LANES;
                    for (int k = 0; k < m; k++) {
                        double d = (double)ld(ws[i], wdt[i], s0 + j + k) - bd[j + k];
                        tsq[i][k] += d * d;
                    }
                }
        }
        for (int32_t p = 0; p < np; p++) {
            const float *ta = tau[pa[p]], *tb = tau[pb[p]];
            double (*acc)[LANES] = pacc[p];
            int curv = qa[p] >= 0 && qb[p] >= 0;
            const float *va = curv ? vs[qa[p]] + s0 : 0, *vb = curv ? vs[qb[p]] + s0 : 0;
            for (i64 j = 0; j < len; j += LANES) {
                int m = len - j < LANES ? (int)(len - j) : LANES;
                for (int k = 0; k < m; k++) {
                    double a = (double)ta[j + k], b = (double)tb[j + k];
                    double pr = a * b;
                    double c = pr < 0 ? 1.0 : 0.0;
                    double mg = fabs(pr);
                    acc[0][k] += pr;
                    acc[1][k] += a * a;
                    acc[2][k] += b * b;
                    acc[3][k] += pr != 0 ? 1.0 : 0.0;
                    acc[4][k] += c;
                    acc[5][k] += mg;
                    acc[6][k] += mg * c;
                }
                if (curv)
                    for (int k = 0; k < m; k++) {
                        double a = (double)ta[j + k], b = (double)tb[j + k];
                        double mg = fabs(a * b);
                        double w = mg * sqrt((double)va[j + k]) * sqrt((double)vb[j + k]);
                        acc[7][k] += w;
                        acc[8][k] += a * b < 0 ? w : 0.0;
                    }
            }
        }
    }
    double t = 0;
    for (int k = 0; k < LANES; k++) t += bsq[k];
    out[0] = t;
    for (int32_t i = 0; i < ne; i++) {
        t = 0;
        for (int k = 0; k < LANES; k++) t += tsq[i][k];
        out[1 + i] = t;
    }
    for (int32_t p = 0; p < np; p++) {
        double *o = out + 1 + ne + (i64)p * 10;
        for (int q = 0; q < 9; q++) {
            t = 0;
            for (int k = 0; k < LANES; k++) t += pacc[p][q][k];
            o[q] = t;
        }
        o[9] = 0;
    }
}

/* 0.5-free predicted loss: sum v * (m - x)^2, the difference in float64. */
double cl_wsq_diff(const float *v, const void *m, int32_t mdt, const void *x, int32_t xdt, i64 n) {
    double acc = 0;
    for (i64 i = 0; i < n; i++) {
        double d = (double)ld(m, mdt, i) - (double)ld(x, xdt, i);
        acc += (double)v[i] * (d * d);
    }
    return acc;
}

/* ----------------------------------------------------------------- scores */
/* The mask score of entry i, exactly as torch computes it in fp32:
 * fisher v * (tau * tau), magnitude |tau|, tau = fp32(w) - fp32(base). */
static inline float score_at(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 i) {
    float t = ld(w, wdt, i) - ld(b, bdt, i);
    if (v) {
        float t2 = t * t;
        return v[i] * t2;
    }
    return fabsf(t);
}

/* Histogram of the scores' bit patterns (sign cleared) >> shift into hist;
 * returns how many scores were not finite (NaN/Inf: the caller raises). */
i64 cl_score_hist(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 n, int32_t shift,
                  i64 *hist) {
    i64 bad = 0;
    for (i64 i = 0; i < n; i++) {
        uint32_t u = bits_of(score_at(b, bdt, w, wdt, v, i)) & 0x7fffffffu;
        if (u >= 0x7f800000u) {
            bad++;
            continue;
        }
        hist[u >> shift]++;
    }
    return bad;
}

/* Counts of the scores whose bit patterns lie in [lo, lo + width), by offset. */
void cl_score_bincount(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 n,
                       uint32_t lo, uint32_t width, i64 *counts) {
    for (i64 i = 0; i < n; i++) {
        uint32_t u = bits_of(score_at(b, bdt, w, wdt, v, i)) & 0x7fffffffu;
        uint32_t off = u - lo;
        if (u >= lo && off < width) counts[off]++;
    }
}

/* Count above hi, and exact counts of every bit pattern in [lo, hi] (a window of
 * hi - lo + 1 counters): one sweep of the scout-bracketed selection. */
i64 cl_score_window(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 n, uint32_t lo,
                    uint32_t hi, i64 *counts) {
    i64 above = 0;
    for (i64 i = 0; i < n; i++) {
        uint32_t u = bits_of(score_at(b, bdt, w, wdt, v, i)) & 0x7fffffffu;
        above += u > hi;
        if (u >= lo && u <= hi) counts[u - lo]++;
    }
    return above;
}

/* Scores at given flat indices (the scout's sample). */
void cl_scores_at(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, const i64 *idx, i64 k,
                  float *out) {
    for (i64 j = 0; j < k; j++) out[j] = score_at(b, bdt, w, wdt, v, idx[j]);
}

/* ------------------------------------------------------------------ masks */
/* Masks of one expert's scores at nd thresholds: entry kept when its score is
 * above thr[d], or equal to it and among the first quota[d] such entries in flat
 * order (quota[d] < 0: every tied entry). The matrix view is rows x cols (rows = 1
 * for vectors). Per d: out[d*4 + 0] kept, 1 sum of the fisher saliency kept (when
 * v), 2 the tied entries seen, 3 unused; rowk[d*rows + r] / colk[d*cols + c]
 * count kept entries per row / column (when not NULL); mask[d*n + i] the 0/1 mask
 * (when not NULL). sal_total[0]: the saliency over all entries. */
void cl_mask_sweep(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, int32_t magnitude,
                   i64 rows, i64 cols, int32_t nd, const float *thr, const i64 *quota, double *out, int32_t *rowk,
                   int32_t *colk, uint8_t *mask, double *sal_total) {
    i64 n = rows * cols;
    i64 seen[8] = {0}, kept[8] = {0};
    double salk[8] = {0};
    double tot = 0;
    for (i64 r = 0; r < rows; r++) {
        i64 rk[8] = {0};
        for (i64 c = 0; c < cols; c++) {
            i64 i = r * cols + c;
            float t = ld(w, wdt, i) - ld(b, bdt, i);
            float fs = 0.0f;
            if (v) {
                float t2 = t * t;
                fs = v[i] * t2;
                tot += (double)fs;
            }
            float s = magnitude ? fabsf(t) : fs;
            for (int32_t d = 0; d < nd; d++) {
                int k = s > thr[d];
                if (s == thr[d]) {
                    k = quota[d] < 0 || seen[d] < quota[d];
                    seen[d]++;
                }
                if (k) {
                    kept[d]++;
                    rk[d]++;
                    salk[d] += (double)fs;
                    if (colk) colk[(i64)d * cols + c]++;
                }
                if (mask) mask[(i64)d * n + i] = (uint8_t)k;
            }
        }
        if (rowk)
            for (int32_t d = 0; d < nd; d++) rowk[(i64)d * rows + r] = (int32_t)rk[d];
    }
    for (int32_t d = 0; d < nd; d++) {
        out[d * 4 + 0] = (double)kept[d];
        out[d * 4 + 1] = salk[d];
        out[d * 4 + 2] = (double)seen[d];
        out[d * 4 + 3] = 0;
    }
    sal_total[0] = tot;
}

/* Entries set in both 0/1 byte masks. */
i64 cl_and_count(const uint8_t *a, const uint8_t *b, i64 n) {
    i64 c = 0;
    for (i64 i = 0; i < n; i++) c += a[i] & b[i];
    return c;
}
