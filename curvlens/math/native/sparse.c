/* A mask's kept entries as rows of column indices, and the products the rank
 * sketches take with it: Y = A X and Z = A^T Q for A = mask (0/1, float64) or
 * A = mask * tau (float32).
 *
 * FFG masks keep 10-30% of a tensor. A dense GEMM with a 16- or 32-column
 * sketch multiplies every zero too; these products visit only the kept entries
 * (measured on a 2816 x 1024 mask, one thread: float32, 16 columns, 0.34 /
 * 0.82 ms per product at 10 / 30% kept against 1.4-1.5 ms for MKL's dense
 * GEMM; float64, 32 columns, 0.7 / 2.1 ms against 10-14 ms).
 *
 * Order of operations, the same in the AVX2 and plain builds (so both give the
 * same bits): row i's r-th kept entry is added into accumulator r % 4, and the
 * four are added as (a0 + a1) + (a2 + a3); products are rounded before the
 * sum (no FMA). A^T Q adds each row's contribution into Z's rows in row order.
 *
 * Column indices are uint16: callers use these only for 2-D views with at
 * most 65535 columns (the dense sketches take the rest).
 */
#include "common.h"

/* Row pointers (m + 1) and column indices of the nonzero bytes of an m x n
 * mask, at most cap of them; with tau (dtype dt) also its values there,
 * widened to fp32, into val (cap of them), and (fro2 not NULL) the float64
 * sum of their squares into *fro2. Returns the count, or -1 when the mask keeps more than
 * cap entries (nothing is written past index cap - 1). */
i64 cl_sp_index(const uint8_t *mask, i64 m, i64 n, i64 cap, i64 *row_ptr, uint16_t *col,
                const void *tau, int32_t dt, float *val, double *fro2) {
    i64 c = 0;
    double f[4] = {0.0, 0.0, 0.0, 0.0};  /* four partial sums: no chain of dependent adds */
    row_ptr[0] = 0;
    for (i64 i = 0; i < m; i++) {
        const uint8_t *r = mask + i * n;
        i64 start = c, j = 0;
        if (c + n > cap) {  /* near the cap: count first, write only what fits */
            i64 k = 0;
            for (i64 t = 0; t < n; t++) k += r[t] != 0;
            if (c + k > cap) return -1;
        }
#ifdef __AVX2__
        for (; j + 32 <= n; j += 32) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(r + j));
            uint32_t bits = ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(x, _mm256_setzero_si256()));
            while (bits) {
                col[c++] = (uint16_t)(j + __builtin_ctz(bits));
                bits &= bits - 1;
            }
        }
#endif
        for (; j < n; j++)
            if (r[j]) col[c++] = (uint16_t)j;
        if (tau)
            for (i64 p = start; p < c; p++) val[p] = ld(tau, dt, i * n + col[p]);
        if (tau && fro2)
            for (i64 p = start; p < c; p++) f[(p - start) & 3] += (double)val[p] * (double)val[p];
        row_ptr[i + 1] = c;
    }
    if (fro2) *fro2 = (f[0] + f[1]) + (f[2] + f[3]);
    return c;
}

/* The fp32 products' bodies take the Krylov sketch's 16 columns as a
 * constant where they are (index arithmetic by shifts). */
#define INLINE static inline __attribute__((always_inline))
#define K16(call) do { if (k == 16) call(16); else call(k); } while (0)

#ifdef __AVX2__
/* One kept entry into partial sum u (of four) of 16 columns: a[2u], a[2u + 1]. */
INLINE void add_f32(__m256 *a, int u, float v, const float *xr) {
    const __m256 b = _mm256_set1_ps(v);
    a[2 * u] = _mm256_add_ps(a[2 * u], _mm256_mul_ps(b, _mm256_loadu_ps(xr)));
    a[2 * u + 1] = _mm256_add_ps(a[2 * u + 1], _mm256_mul_ps(b, _mm256_loadu_ps(xr + 8)));
}

/* ... of 8 float64 columns, a 0/1 entry: X's row added. */
INLINE void add_f64(__m256d *a, int u, const double *xr) {
    a[2 * u] = _mm256_add_pd(a[2 * u], _mm256_loadu_pd(xr));
    a[2 * u + 1] = _mm256_add_pd(a[2 * u + 1], _mm256_loadu_pd(xr + 4));
}
#endif

INLINE void sp_mm_f32(const i64 *row_ptr, const uint16_t *col, const float *val, i64 m, const float *x,
                      const i64 k, float *y) {
    for (i64 i = 0; i < m; i++) {
        const i64 p0 = row_ptr[i], p1 = row_ptr[i + 1];
        for (i64 c0 = 0; c0 < k; c0 += 16) {
            const float *xc = x + c0;
#ifdef __AVX2__
            __m256 a[8];
            for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
            i64 p = p0;
            for (; p + 4 <= p1; p += 4)  /* unrolled: the four partial sums stay in registers */
                for (int u = 0; u < 4; u++) add_f32(a, u, val[p + u], xc + (i64)col[p + u] * k);
            for (int u = 0; p < p1; p++, u++) add_f32(a, u, val[p], xc + (i64)col[p] * k);
            _mm256_storeu_ps(y + i * k + c0, _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6])));
            _mm256_storeu_ps(y + i * k + c0 + 8,
                             _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7])));
#else
            float a[4][16] = {{0}};
            for (i64 p = p0; p < p1; p++) {
                const i64 j = col[p];
                const float v = val[p], *xr = xc + j * k;
                float *acc = a[(p - p0) & 3];
                for (int c = 0; c < 16; c++) acc[c] += v * xr[c];
            }
            for (int c = 0; c < 16; c++) y[i * k + c0 + c] = (a[0][c] + a[1][c]) + (a[2][c] + a[3][c]);
#endif
        }
    }
}

/* Y (m x k, row-major) = A X for A with the kept values val (fp32), X n x k,
 * k a multiple of 16. */
void cl_sp_mm_f32(const i64 *row_ptr, const uint16_t *col, const float *val, i64 m, const float *x, i64 k,
                  float *y) {
#define MM(kk) sp_mm_f32(row_ptr, col, val, m, x, kk, y)
    K16(MM);
#undef MM
}

INLINE void sp_tmm_f32(const i64 *row_ptr, const uint16_t *col, const float *val, i64 m, i64 n, const float *q,
                       const i64 k, float *z) {
    memset(z, 0, (size_t)(n * k) * sizeof(float));
    for (i64 i = 0; i < m; i++) {
        for (i64 c0 = 0; c0 < k; c0 += 16) {
            const float *qr = q + i * k + c0;
#ifdef __AVX2__
            const __m256 q0 = _mm256_loadu_ps(qr), q1 = _mm256_loadu_ps(qr + 8);
            for (i64 p = row_ptr[i]; p < row_ptr[i + 1]; p++) {
                const __m256 v = _mm256_set1_ps(val[p]);
                float *zr = z + (i64)col[p] * k + c0;
                _mm256_storeu_ps(zr, _mm256_add_ps(_mm256_loadu_ps(zr), _mm256_mul_ps(v, q0)));
                _mm256_storeu_ps(zr + 8, _mm256_add_ps(_mm256_loadu_ps(zr + 8), _mm256_mul_ps(v, q1)));
            }
#else
            for (i64 p = row_ptr[i]; p < row_ptr[i + 1]; p++) {
                const float v = val[p];
                float *zr = z + (i64)col[p] * k + c0;
                for (int c = 0; c < 16; c++) zr[c] += v * qr[c];
            }
#endif
        }
    }
}

/* Z (n x k) = A^T Q, Q m x k, k a multiple of 16; fp32. */
void cl_sp_tmm_f32(const i64 *row_ptr, const uint16_t *col, const float *val, i64 m, i64 n, const float *q, i64 k,
                   float *z) {
#define TMM(kk) sp_tmm_f32(row_ptr, col, val, m, n, q, kk, z)
    K16(TMM);
#undef TMM
}

/* Y (m x k) = mask X, X n x k float64, k a multiple of 8: each row's sum of
 * the rows of X at its kept columns. */
void cl_sp_mm_pat(const i64 *row_ptr, const uint16_t *col, i64 m, const double *x, i64 k, double *y) {
    for (i64 i = 0; i < m; i++) {
        const i64 p0 = row_ptr[i], p1 = row_ptr[i + 1];
        for (i64 c0 = 0; c0 < k; c0 += 8) {
            const double *xc = x + c0;
#ifdef __AVX2__
            __m256d a[8];
            for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_pd();
            i64 p = p0;
            for (; p + 4 <= p1; p += 4)
                for (int u = 0; u < 4; u++) add_f64(a, u, xc + (i64)col[p + u] * k);
            for (int u = 0; p < p1; p++, u++) add_f64(a, u, xc + (i64)col[p] * k);
            _mm256_storeu_pd(y + i * k + c0, _mm256_add_pd(_mm256_add_pd(a[0], a[2]), _mm256_add_pd(a[4], a[6])));
            _mm256_storeu_pd(y + i * k + c0 + 4,
                             _mm256_add_pd(_mm256_add_pd(a[1], a[3]), _mm256_add_pd(a[5], a[7])));
#else
            double a[4][8] = {{0}};
            for (i64 p = p0; p < p1; p++) {
                const double *xr = xc + (i64)col[p] * k;
                double *acc = a[(p - p0) & 3];
                for (int c = 0; c < 8; c++) acc[c] += xr[c];
            }
            for (int c = 0; c < 8; c++) y[i * k + c0 + c] = (a[0][c] + a[1][c]) + (a[2][c] + a[3][c]);
#endif
        }
    }
}

/* Z (n x k) = mask^T Q, Q m x k float64, k a multiple of 8. */
void cl_sp_tmm_pat(const i64 *row_ptr, const uint16_t *col, i64 m, i64 n, const double *q, i64 k, double *z) {
    memset(z, 0, (size_t)(n * k) * sizeof(double));
    for (i64 i = 0; i < m; i++) {
        for (i64 c0 = 0; c0 < k; c0 += 8) {
            const double *qr = q + i * k + c0;
#ifdef __AVX2__
            const __m256d q0 = _mm256_loadu_pd(qr), q1 = _mm256_loadu_pd(qr + 4);
            for (i64 p = row_ptr[i]; p < row_ptr[i + 1]; p++) {
                double *zr = z + (i64)col[p] * k + c0;
                _mm256_storeu_pd(zr, _mm256_add_pd(_mm256_loadu_pd(zr), q0));
                _mm256_storeu_pd(zr + 4, _mm256_add_pd(_mm256_loadu_pd(zr + 4), q1));
            }
#else
            for (i64 p = row_ptr[i]; p < row_ptr[i + 1]; p++) {
                double *zr = z + (i64)col[p] * k + c0;
                for (int c = 0; c < 8; c++) zr[c] += qr[c];
            }
#endif
        }
    }
}
