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
#include "common.h"

#ifdef __AVX2__
int32_t cl_compact_lut[256][8];

__attribute__((constructor)) static void compact_init(void) {
    for (int m = 0; m < 256; m++) {
        int c = 0;
        for (int k = 0; k < 8; k++)
            if (m >> k & 1) cl_compact_lut[m][c++] = k;
        for (; c < 8; c++) cl_compact_lut[m][c] = 0;
    }
}
#endif

/* log10 of a positive, finite fp32 value, as a double: the exponent part exact
 * in float64, log10 of the mantissa m in [sqrt(1/2), sqrt(2)) from the fp32
 * atanh series 2 s (1 + s^2/3 + ... + s^8/9), s = (m - 1)/(m + 1), |s| <= 0.172
 * (truncation below 3e-10 of a value below 0.151): within 2e-8 of the true
 * log10 in absolute terms. Branch-free, 8 lanes wide in AVX2. Subnormals are
 * scaled by 2**24 first. */
static inline double log10_pos(float x) {
    float sub = x < 1.17549435e-38f ? 16777216.0f : 1.0f;
    x = x * sub;
    uint32_t u;
    memcpy(&u, &x, 4);
    float e = (float)(int32_t)((u >> 23) & 0xff) - (sub > 1.0f ? 151.0f : 127.0f);
    uint32_t mb = (u & 0x7fffffu) | 0x3f800000u;
    float m;
    memcpy(&m, &mb, 4);
    float big = m > 1.41421356f ? 1.0f : 0.0f;
    m = big > 0.0f ? m * 0.5f : m;
    e = e + big;
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float q = 1.0f / 9.0f;
    q = q * s2 + 1.0f / 7.0f;
    q = q * s2 + 1.0f / 5.0f;
    q = q * s2 + 1.0f / 3.0f;
    q = q * s2 + 1.0f;
    float lm = 2.0f * s * q * 0.4342944819f;
    return (double)e * 0.30102999566398119521 + (double)lm;
}

/* ---------------------------------------------------------------- moments */

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
        for (i64 j = 0; j < len; j++) lg[j] = log10_pos(x[j] > 0.0f ? x[j] : 1.0f);  /* 0 for zeros */
        i64 j = 0;
        for (; j + LANES <= len; j += LANES)
            for (int k = 0; k < LANES; k++) {
                slog[k] += lg[j + k];
                sv[k] += (double)x[j + k];
            }
        for (i64 jj = 0; jj + LANES <= len; jj += LANES)
            for (int k = 0; k < LANES; k++) vmax[k] = x[jj + k] > vmax[k] ? x[jj + k] : vmax[k];
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
/* The sweep over entries [lo, hi) only (lo a multiple of OV_B), adding to out as
 * the whole sweep does or, with parts, writing each block's sums there instead
 * (np*K doubles per block, blocks in order) for cl_add_in_order to add after the
 * blocks before them: the same additions in the same order as one sweep, so a
 * second thread can take the second half of the blocks and leave every bit as
 * one thread makes it. */
void cl_overlap_sweep_range(const float *const *vs, int32_t ne, i64 lo, i64 hi, float eps, const double *vmax,
                            const int32_t *pa, const int32_t *pb, int32_t np, int32_t nf, const float *thr,
                            const i64 *cut, double *out, double *parts) {
    const int32_t K = 9 + nf;
    static __thread double lg[16][OV_B], sc[16][OV_B], ps[16][OV_B];
    static __thread uint8_t top[16][4][OV_B];
    double inv[16];
    for (int32_t e = 0; e < ne; e++) inv[e] = vmax[e] > 0 ? 1.0 / vmax[e] : 0.0;
    for (i64 s0 = lo; s0 < hi; s0 += OV_B) {
        i64 len = s0 + OV_B < hi ? OV_B : hi - s0;
        for (int32_t e = 0; e < ne; e++) {
            const float *v = vs[e] + s0;
            double ie = inv[e];
            for (i64 j = 0; j < len; j++) {
                lg[e][j] = log10_pos(v[j] + eps);
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
#define OV_BODY(J, K_)                                                            \
    {                                                                             \
        double x = sc[a][J], y = sc[b][J];                                        \
        double in = ps[a][J] + ps[b][J] > 0 ? 1.0 : 0.0;                          \
        double u = lg[a][J] * in, w = lg[b][J] * in;                              \
        acc[0][K_] += in;                                                         \
        acc[1][K_] += x * y;                                                      \
        acc[2][K_] += x * x;                                                      \
        acc[3][K_] += y * y;                                                      \
        acc[4][K_] += u;                                                          \
        acc[5][K_] += w;                                                          \
        acc[6][K_] += u * u;                                                      \
        acc[7][K_] += w * w;                                                      \
        acc[8][K_] += u * w;                                                      \
    }
            i64 j = 0;
            for (; j + LANES <= len; j += LANES)
                for (int k = 0; k < LANES; k++) OV_BODY(j + k, k)
            for (; j < len; j++) OV_BODY(j, j % LANES)
#undef OV_BODY
            double *o = parts ? parts + (((s0 - lo) / OV_B) * np + p) * K : out + (i64)p * K;
            for (int q = 0; q < 9; q++) {
                double t = 0;
                for (int k = 0; k < LANES; k++) t += acc[q][k];
                if (parts) o[q] = t; else o[q] += t;
            }
            for (int32_t f = 0; f < nf; f++) {
                i64 both = 0;
                for (i64 jj = 0; jj < len; jj++) both += top[a][f][jj] & top[b][f][jj];
                if (parts) o[9 + f] = (double)both; else o[9 + f] += (double)both;
            }
        }
    }
}

void cl_overlap_sweep(const float *const *vs, int32_t ne, i64 n, float eps, const double *vmax,
                      const int32_t *pa, const int32_t *pb, int32_t np, int32_t nf, const float *thr,
                      const i64 *cut, double *out) {
    cl_overlap_sweep_range(vs, ne, 0, n, eps, vmax, pa, pb, np, nf, thr, cut, out, NULL);
}

/* out[j] += parts[r * width + j] for r = 0, 1, ... in order (cl_overlap_sweep_range's parts). */
void cl_add_in_order(double *out, const double *parts, i64 rows, i64 width) {
    for (i64 r = 0; r < rows; r++)
        for (i64 j = 0; j < width; j++) out[j] += parts[r * width + j];
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
    static __thread float bf[B], wf[16][B], tau[16][B];
    static __thread double sq[16][B];
    static const double zero[B] = {0};
    double tsq[16][LANES] = {{0}}, bsq[LANES] = {0};
    static __thread double pacc[64][9][LANES];
    if (np > 64) np = 64;
    memset(pacc, 0, sizeof(pacc));
    int32_t nv = 0;  /* moments used: 0..max index + 1 */
    for (int32_t p = 0; p < np; p++) {
        if (qa[p] + 1 > nv) nv = qa[p] + 1;
        if (qb[p] + 1 > nv) nv = qb[p] + 1;
    }
    for (i64 s0 = 0; s0 < n; s0 += B) {
        i64 len = s0 + B < n ? B : n - s0;
        load_block(base, bdt, s0, len, bf);
        {
            i64 j = 0;
            for (; j + LANES <= len; j += LANES)
                for (int k = 0; k < LANES; k++) bsq[k] += (double)bf[j + k] * (double)bf[j + k];
            for (; j < len; j++) bsq[j % LANES] += (double)bf[j] * (double)bf[j];
        }
        for (int32_t i = 0; i < nw; i++) {
            load_block(ws[i], wdt[i], s0, len, wf[i]);
            for (i64 j = 0; j < len; j++) tau[i][j] = wf[i][j] - bf[j];
            if (i < ne) {
                i64 j = 0;
                for (; j + LANES <= len; j += LANES)
                    for (int k = 0; k < LANES; k++) {
                        double d = (double)wf[i][j + k] - (double)bf[j + k];
                        tsq[i][k] += d * d;
                    }
                for (; j < len; j++) {
                    double d = (double)wf[i][j] - (double)bf[j];
                    tsq[i][j % LANES] += d * d;
                }
            }
        }
        for (int32_t q = 0; q < nv; q++)
            for (i64 j = 0; j < len; j++) sq[q][j] = sqrt((double)vs[q][s0 + j]);
        for (int32_t p = 0; p < np; p++) {
            const float *ta = tau[pa[p]], *tb = tau[pb[p]];
            double (*acc)[LANES] = pacc[p];
            int curv = qa[p] >= 0 && qb[p] >= 0;
            const double *ra = curv ? sq[qa[p]] : zero, *rb = curv ? sq[qb[p]] : zero;
        #define TV_BODY(J, K_)                                                           \
    {                                                                            \
        double a = (double)ta[J], b = (double)tb[J];                             \
        double pr = a * b;                                                       \
        double c = pr < 0 ? 1.0 : 0.0;                                          \
        double mg = fabs(pr);                                                    \
        double w = mg * ra[J] * rb[J];                                           \
        acc[0][K_] += pr;                                                        \
        acc[1][K_] += a * a;                                                     \
        acc[2][K_] += b * b;                                                     \
        acc[3][K_] += pr != 0 ? 1.0 : 0.0;                                       \
        acc[4][K_] += c;                                                         \
        acc[5][K_] += mg;                                                        \
        acc[6][K_] += mg * c;                                                    \
        acc[7][K_] += w;                                                         \
        acc[8][K_] += w * c;                                                     \
    }
            i64 j = 0;
            for (; j + LANES <= len; j += LANES)
                for (int k = 0; k < LANES; k++) TV_BODY(j + k, k)
            for (; j < len; j++) TV_BODY(j, j % LANES)
#undef TV_BODY
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

/* 0.5-free predicted loss: sum v * (m - x)^2, the difference in float64;
 * v NULL: the plain sum of squares (an edit's squared norm). */
double cl_wsq_diff(const float *v, const void *m, int32_t mdt, const void *x, int32_t xdt, i64 n) {
    double acc = 0;
    if (!v) {
        for (i64 i = 0; i < n; i++) {
            double d = (double)ld(m, mdt, i) - (double)ld(x, xdt, i);
            acc += d * d;
        }
        return acc;
    }
    for (i64 i = 0; i < n; i++) {
        double d = (double)ld(m, mdt, i) - (double)ld(x, xdt, i);
        acc += (double)v[i] * (d * d);
    }
    return acc;
}

/* ----------------------------------------------------------------- scores */
/* The mask scores of entries [s0, s0 + len), exactly as torch computes them in
 * fp32: fisher v * (tau * tau), magnitude |tau|, tau = fp32(w) - fp32(base);
 * as bit patterns with the sign cleared (-0.0 counts as 0.0). */
static inline void score_bits(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 s0,
                              i64 len, float *bf, float *wf, uint32_t *out) {
    load_block(b, bdt, s0, len, bf);
    load_block(w, wdt, s0, len, wf);
    if (v) {
        for (i64 j = 0; j < len; j++) {
            float t = wf[j] - bf[j];
            float t2 = t * t;
            float sc = v[s0 + j] * t2;
            uint32_t u;
            memcpy(&u, &sc, 4);
            out[j] = u & 0x7fffffffu;
        }
    } else {
        for (i64 j = 0; j < len; j++) {
            float sc = fabsf(wf[j] - bf[j]);
            uint32_t u;
            memcpy(&u, &sc, 4);
            out[j] = u & 0x7fffffffu;
        }
    }
}

#define SC_B 2048

/* Histogram of the scores' bit patterns >> shift into hist; returns how many
 * scores were not finite (NaN/Inf: the caller raises). */
i64 cl_score_hist(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 n, int32_t shift,
                  i64 *hist) {
    static __thread float bf[SC_B], wf[SC_B];
    static __thread uint32_t u[SC_B];
    i64 bad = 0;
    for (i64 s0 = 0; s0 < n; s0 += SC_B) {
        i64 len = s0 + SC_B < n ? SC_B : n - s0;
        score_bits(b, bdt, w, wdt, v, s0, len, bf, wf, u);
        for (i64 j = 0; j < len; j++) {
            if (u[j] >= 0x7f800000u) {
                bad++;
                continue;
            }
            hist[u[j] >> shift]++;
        }
    }
    return bad;
}

/* Counts of the scores whose bit patterns lie in [lo, lo + width), by offset. */
void cl_score_bincount(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 n,
                       uint32_t lo, uint32_t width, i64 *counts) {
    static __thread float bf[SC_B], wf[SC_B];
    static __thread uint32_t u[SC_B];
    for (i64 s0 = 0; s0 < n; s0 += SC_B) {
        i64 len = s0 + SC_B < n ? SC_B : n - s0;
        score_bits(b, bdt, w, wdt, v, s0, len, bf, wf, u);
        for (i64 j = 0; j < len; j++) {
            uint32_t off = u[j] - lo;  /* wraps for u < lo */
            if (off < width) counts[off]++;
        }
    }
}

/* For nw windows [lo[k], hi[k]] at once: the scores above hi[k] (added to
 * above[k]) and exact counts of every bit pattern inside (counts[k][bits - lo[k]]):
 * one sweep of the sample-bracketed selection (curvlens/passes/scout.py). */
/* One block's share of nw windows: scores above hi[k] added to above[k], each
 * pattern inside [lo[k], hi[k]] counted (the patterns inside gathered by
 * compact, branch-free, before the random counter increments; its AVX2 path
 * took the scout's window sweep from 5.2 to 2.8 ns per entry and expert for
 * 3 + 3 windows, against the scalar gathering). */
static inline void windows_block(const uint32_t *u, i64 len, int32_t nw, const uint32_t *lo, const uint32_t *hi,
                                 i64 *const *counts, i64 *above, uint32_t *off) {
    for (int32_t k = 0; k < nw; k++) {
        uint32_t l = lo[k], h = hi[k];
        i64 *ck = counts[k];
        int32_t a = 0;  /* len <= SC_B: int32 lanes vectorise twice as wide as int64 ones */
        for (i64 j = 0; j < len; j++) a += u[j] > h;
        i64 c = compact(u, len, l, h - l, off);
        for (i64 j = 0; j < c; j++) ck[off[j] - l]++;
        above[k] += a;
    }
}

void cl_score_windows(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 n, int32_t nw,
                      const uint32_t *lo, const uint32_t *hi, i64 *const *counts, i64 *above) {
    float bf[SC_B], wf[SC_B];
    uint32_t u[SC_B], off[SC_B];
    for (i64 s0 = 0; s0 < n; s0 += SC_B) {
        i64 len = s0 + SC_B < n ? SC_B : n - s0;
        score_bits(b, bdt, w, wdt, v, s0, len, bf, wf, u);
        windows_block(u, len, nw, lo, hi, counts, above, off);
    }
}

/* cl_score_windows for both criteria of one expert from one load of its inputs:
 * the fisher windows (nf: lof, hif, cf, af) on v * tau**2 and the magnitude
 * windows (nm: lom, him, cm, am) on |tau|. */
void cl_score_windows_both(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, i64 n,
                           int32_t nf, const uint32_t *lof, const uint32_t *hif, i64 *const *cf, i64 *af,
                           int32_t nm, const uint32_t *lom, const uint32_t *him, i64 *const *cm, i64 *am) {
    float bf[SC_B], wf[SC_B];
    uint32_t uf[SC_B], um[SC_B], off[SC_B];
    for (i64 s0 = 0; s0 < n; s0 += SC_B) {
        i64 len = s0 + SC_B < n ? SC_B : n - s0;
        load_block(b, bdt, s0, len, bf);
        load_block(w, wdt, s0, len, wf);
        for (i64 j = 0; j < len; j++) {
            float t = wf[j] - bf[j];
            float t2 = t * t;
            float sc = v[s0 + j] * t2;
            float mg = fabsf(t);
            uint32_t x, y;
            memcpy(&x, &sc, 4);
            memcpy(&y, &mg, 4);
            uf[j] = x & 0x7fffffffu;
            um[j] = y & 0x7fffffffu;
        }
        windows_block(uf, len, nf, lof, hif, cf, af, off);
        windows_block(um, len, nm, lom, him, cm, am, off);
    }
}

/* Scores at given flat indices (the scout's sample). */
void cl_scores_at(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, const i64 *idx, i64 k,
                  float *out) {
    for (i64 j = 0; j < k; j++) {
        i64 i = idx[j];
        float t = ld(w, wdt, i) - ld(b, bdt, i);
        if (v) {
            float t2 = t * t;
            out[j] = v[i] * t2;
        } else {
            out[j] = fabsf(t);
        }
    }
}

/* ------------------------------------------------------------------ masks */
#ifdef __AVX2__
/* The 8 float64 lanes of a mask's two sums (lane k = entry j % 8), in registers:
 * fs * mk and tq * mk added widened, as the scalar loops add them. */
typedef struct {
    __m256d s_lo, s_hi, t_lo, t_hi;
} kept_lanes;

static inline kept_lanes lanes_load(const double *sk, const double *tk) {
    kept_lanes l = {_mm256_loadu_pd(sk), _mm256_loadu_pd(sk + 4), _mm256_loadu_pd(tk), _mm256_loadu_pd(tk + 4)};
    return l;
}

static inline void lanes_add(kept_lanes *l, const float *fs, const float *tq, __m256 mk) {
    __m256 f = _mm256_mul_ps(_mm256_loadu_ps(fs), mk);
    __m256 q = _mm256_mul_ps(_mm256_loadu_ps(tq), mk);
    l->s_lo = _mm256_add_pd(l->s_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
    l->s_hi = _mm256_add_pd(l->s_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
    l->t_lo = _mm256_add_pd(l->t_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(q)));
    l->t_hi = _mm256_add_pd(l->t_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1)));
}

static inline void lanes_store(const kept_lanes *l, double *sk, double *tk) {
    _mm256_storeu_pd(sk, l->s_lo);
    _mm256_storeu_pd(sk + 4, l->s_hi);
    _mm256_storeu_pd(tk, l->t_lo);
    _mm256_storeu_pd(tk + 4, l->t_hi);
}

static inline i64 lanes_total(__m256i v) {  /* the 8 int32 lanes added */
    int32_t x[8];
    _mm256_storeu_si256((__m256i *)x, v);
    i64 t = 0;
    for (int k = 0; k < 8; k++) t += x[k];
    return t;
}
#endif

/* One chunk of a mask's sums: returns the kept count; sk[k] / tk[k] (lane k =
 * entry j % 8) gain fs * m and tq * m widened to float64, the very additions
 * of the scalar loop below in the same order, and ck[j] (when not NULL) gains
 * m[j]. With AVX2, intrinsics: GCC left the scalar form's 8 lanes of float64
 * sums unvectorised, and generic vector types compiled to scalar shuffles
 * (measured: 1.5 ns per entry and density scalar, 3 ns with vector types).
 * fs and tq are >= 0, so fs * (float)m is fs or +0 exactly. */
static i64 kept_sums(const uint8_t *m, const float *fs, const float *tq, i64 len, double *sk, double *tk,
                     int32_t *ck) {
    i64 j = 0, cnt = 0;
#ifdef __AVX2__
    kept_lanes l = lanes_load(sk, tk);
    __m256i cntv = _mm256_setzero_si256();
    for (; j + LANES <= len; j += LANES) {
        __m256i mi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(m + j)));
        lanes_add(&l, fs + j, tq + j, _mm256_cvtepi32_ps(mi));
        cntv = _mm256_add_epi32(cntv, mi);
        if (ck)
            _mm256_storeu_si256((__m256i *)(ck + j),
                                _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(ck + j)), mi));
    }
    lanes_store(&l, sk, tk);
    cnt = lanes_total(cntv);
#endif
    for (; j < len; j++) {
        float mk = (float)m[j];
        cnt += m[j];
        sk[j % LANES] += (double)(fs[j] * mk);
        tk[j % LANES] += (double)(tq[j] * mk);
        if (ck) ck[j] += m[j];
    }
    return cnt;
}

#ifdef __AVX2__
/* byte_lut[b]: byte k is bit k of b (0 or 1), so an 8-lane compare's movemask
 * becomes 8 mask bytes with one load. Filled when the library loads. */
static uint64_t byte_lut[256];
__attribute__((constructor)) static void byte_lut_init(void) {
    for (int b = 0; b < 256; b++) {
        uint64_t v = 0;
        for (int k = 0; k < 8; k++) v |= (uint64_t)((b >> k) & 1) << (8 * k);
        byte_lut[b] = v;
    }
}
#endif

/* A chunk's mask at threshold th with its sums in one sweep: m[j] = sc[j] > th,
 * and kept_sums's additions for that m, in the same order (so the same bits).
 * *eq gets the scores equal to th: when there are any, the caller undoes the
 * sums and settles the ties (rare: a score exactly at the threshold). One loop
 * instead of a compare pass and a sums pass: the sweep's per-density cost went
 * from 1.5-1.9 to ~0.5 ns per entry (2816 x 1024, one thread). */
static i64 masked_sums(const float *sc, float th, const float *fs, const float *tq, i64 len, uint8_t *m,
                       double *sk, double *tk, int32_t *ck, i64 *eq) {
    i64 j = 0, cnt = 0, ne = 0;
#ifdef __AVX2__
    const __m256 thv = _mm256_set1_ps(th), one = _mm256_set1_ps(1.0f);
    kept_lanes l = lanes_load(sk, tk);
    __m256i cntv = _mm256_setzero_si256(), eqv = _mm256_setzero_si256();
    for (; j + LANES <= len; j += LANES) {
        __m256 x = _mm256_loadu_ps(sc + j);
        __m256 gt = _mm256_cmp_ps(x, thv, _CMP_GT_OQ);
        __m256i gi = _mm256_castps_si256(gt);  /* -1 where kept */
        eqv = _mm256_sub_epi32(eqv, _mm256_castps_si256(_mm256_cmp_ps(x, thv, _CMP_EQ_OQ)));
        cntv = _mm256_sub_epi32(cntv, gi);
        lanes_add(&l, fs + j, tq + j, _mm256_and_ps(gt, one));
        uint64_t bytes = byte_lut[_mm256_movemask_ps(gt)];
        memcpy(m + j, &bytes, 8);
        if (ck)
            _mm256_storeu_si256((__m256i *)(ck + j),
                                _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(ck + j)), gi));
    }
    lanes_store(&l, sk, tk);
    cnt = lanes_total(cntv);
    ne = lanes_total(eqv);
#endif
    for (; j < len; j++) {
        uint8_t k = (uint8_t)(sc[j] > th);
        float mk = (float)k;
        m[j] = k;
        ne += sc[j] == th;
        cnt += k;
        sk[j % LANES] += (double)(fs[j] * mk);
        tk[j % LANES] += (double)(tq[j] * mk);
        if (ck) ck[j] += k;
    }
    *eq = ne;
    return cnt;
}

/* Masks of one expert's scores at nd (<= 8) thresholds: entry kept when its
 * score is above thr[d], or equal to it and among the first quota[d] such
 * entries in flat order (quota[d] < 0: every tied entry). The matrix view is
 * rows x cols (rows = 1 for vectors). Per d: out[d*4 + 0] kept, 1 the fisher
 * saliency kept (float64, when v), 2 the tied entries seen, 3 the sum of tau^2
 * over the kept entries (||mask * tau||_F^2, float64); rowk[d*rows + r] /
 * colk[d*cols + c] count kept entries per row / column (when not NULL);
 * mask[d*n + i] the 0/1 mask (mask NULL: not kept, only counted). sal_total[0]:
 * the saliency over all entries.
 * Vectorised in chunks; ties (rare: a score equal to the threshold) are settled
 * after each chunk, in flat order. */
void cl_mask_sweep(const void *b, int32_t bdt, const void *w, int32_t wdt, const float *v, int32_t magnitude,
                   i64 rows, i64 cols, int32_t nd, const float *thr, const i64 *quota, double *out, int32_t *rowk,
                   int32_t *colk, uint8_t *mask, double *sal_total) {
    enum { C = 2048 };
    float bf[C], wf[C], fs[C], sc[C], tq[C];
    uint8_t mloc[C];
    i64 n = rows * cols;
    i64 seen[8] = {0}, kept[8] = {0};
    double salk[8][LANES], tauk[8][LANES], tot[LANES] = {0};
    memset(salk, 0, sizeof(salk));
    memset(tauk, 0, sizeof(tauk));
    for (i64 r = 0; r < rows; r++) {
        i64 rk[8] = {0};
        for (i64 c0 = 0; c0 < cols; c0 += C) {
            i64 len = c0 + C < cols ? C : cols - c0;
            i64 s0 = r * cols + c0;
            load_block(b, bdt, s0, len, bf);
            load_block(w, wdt, s0, len, wf);
            for (i64 j = 0; j < len; j++) {
                float t = wf[j] - bf[j];
                float t2 = t * t;
                tq[j] = t2;
                fs[j] = v ? v[s0 + j] * t2 : 0.0f;
                sc[j] = magnitude ? fabsf(t) : fs[j];
            }
            if (v) {
                i64 j = 0;
                for (; j + LANES <= len; j += LANES)
                    for (int k = 0; k < LANES; k++) tot[k] += (double)fs[j + k];
                for (; j < len; j++) tot[j % LANES] += (double)fs[j];
            }
            for (int32_t d = 0; d < nd; d++) {
                uint8_t *m = mask ? mask + (i64)d * n + s0 : mloc;  /* NULL: counts only */
                float th = thr[d];
                double sk[LANES], tk[LANES];
                memcpy(sk, salk[d], sizeof(sk));
                memcpy(tk, tauk[d], sizeof(tk));
                int32_t *ck = colk ? colk + (i64)d * cols + c0 : 0;
                i64 eq;
                i64 cnt = masked_sums(sc, th, fs, tq, len, m, sk, tk, ck, &eq);
                if (eq) {  /* ties: undo the chunk's sums, keep the first quota[d] in flat order, sum again */
                    if (ck)
                        for (i64 j = 0; j < len; j++) ck[j] -= m[j];
                    memcpy(sk, salk[d], sizeof(sk));
                    memcpy(tk, tauk[d], sizeof(tk));
                    if (quota[d] < 0 || seen[d] + eq <= quota[d]) {  /* all of this chunk's: branch-free */
                        for (i64 j = 0; j < len; j++) m[j] |= (uint8_t)(sc[j] == th);
                        seen[d] += eq;
                    } else if (seen[d] >= quota[d]) {  /* none left */
                        seen[d] += eq;
                    } else {  /* the one chunk where the quota runs out */
                        for (i64 j = 0; j < len; j++)
                            if (sc[j] == th) {
                                m[j] = (uint8_t)(seen[d] < quota[d]);
                                seen[d]++;
                            }
                    }
                    /* kept count, saliency and tau^2 kept (8 lanes: the additions of
                     * masked_sums, in the same order), column counts */
                    cnt = kept_sums(m, fs, tq, len, sk, tk, ck);
                }
                memcpy(salk[d], sk, sizeof(sk));
                memcpy(tauk[d], tk, sizeof(tk));
                kept[d] += cnt;
                rk[d] += cnt;
            }
        }
        if (rowk)
            for (int32_t d = 0; d < nd; d++) rowk[(i64)d * rows + r] = (int32_t)rk[d];
    }
    double t = 0;
    for (int k = 0; k < LANES; k++) t += tot[k];
    sal_total[0] = t;
    for (int32_t d = 0; d < nd; d++) {
        double sk = 0, tk = 0;
        for (int k = 0; k < LANES; k++) {
            sk += salk[d][k];
            tk += tauk[d][k];
        }
        out[d * 4 + 0] = (double)kept[d];
        out[d * 4 + 1] = sk;
        out[d * 4 + 2] = (double)seen[d];
        out[d * 4 + 3] = tk;
    }
}

/* Entries set in both 0/1 byte masks. */
i64 cl_and_count(const uint8_t *a, const uint8_t *b, i64 n) {
    i64 c = 0;
    for (i64 i = 0; i < n; i++) c += a[i] & b[i];
    return c;
}

/* The widening loads on their own: n entries of dtype dt to fp32, by blocks
 * (load_block) into out and one at a time (ld) into each (tests check every
 * fp16 and bf16 pattern against torch). */
void cl_widen(const void *p, int32_t dt, i64 n, float *out, float *each) {
    for (i64 s0 = 0; s0 < n; s0 += 4096) load_block(p, dt, s0, n - s0 < 4096 ? n - s0 : 4096, out + s0);
    for (i64 i = 0; i < n; i++) each[i] = ld(p, dt, i);
}

/* out = x - b in fp32, both widened exactly from their dtypes: the bits of
 * torch's x.float() - b.float() (one IEEE subtraction per entry), in one pass
 * instead of a conversion pass and a subtraction pass. */
void cl_sub_widened(const void *x, int32_t dx, const void *b, int32_t db, i64 n, float *out) {
    float bb[4096];
    for (i64 s0 = 0; s0 < n; s0 += 4096) {
        const i64 len = n - s0 < 4096 ? n - s0 : 4096;
        load_block(x, dx, s0, len, out + s0);
        load_block(b, db, s0, len, bb);
        for (i64 j = 0; j < len; j++) out[s0 + j] -= bb[j];
    }
}
