/* The dense formulation's row passes on the CPU, one pass over the rows each (docs/math.md §6).

   R = U blockdiag(B): nb blocks b x b on the rows' aligned groups of b features, and U, which
   mixes the groups' first features (the roots) by Q (nb x nb): x @ U replaces the roots r of
   a row by r @ Q. ATen runs x @ blockdiag(B) as one BLAS call per block over strided rows,
   and the roots as separate strided passes; here a tile of rows goes through every block and
   the roots while it is in the cache.

   qgoft_rotate: y = x @ R ("premix": the roots mixed first, by the Q given) or y = x @
   blockdiag(M) @ U^T (the roots mixed after: the matrix given is then Q^T); M is B for the
   first, B^T for the second.
   qgoft_rotate_runs: y = x @ R_a for runs of rows, each with its adapter's factors (a mixed batch);
   the rows of adapter -1 copied as they are.
   qgoft_backward: for y = x @ R and g = dy: dx = g @ blockdiag(B^T) @ U^T, dB_j = x2_j^T g_j
   (x2: x with its roots mixed) and dQ = roots^T droots (droots: the roots of g blockdiag(B^T));
   it takes both Q and Q^T (QT), and any of dx, dB, dQ may be NULL (not wanted).
   qgoft_build: both factors' values from the parameters, in one call where ATen takes a
   dozen small ops (dense.py's _build: the values H * cumprod(C), gathered from the angles'
   cosines and sines or the blocks' entries, the identity and the scale, and scattered into
   the factors, and into their transposes); qgoft_build_backward: its gradient
   (dense.py's _build_backward). Both serial: they touch d (m + 1) values.

   Every function comes in float (_f32) and double (_f64): this file includes itself once per
   type. Threads: OpenMP, the caller's count; each thread takes a fixed share of the rows and
   sums into its own buffer, summed in thread order after: the same result on every call. */
#ifndef QGOFT_REAL

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* rows per tile: their accumulators stay in registers for b = 32 */
#define TILE 8
/* the widest block and the most roots a tile keeps on the stack */
#define MAX_B 64
#define MAX_NB 1024
/* the most factors in one column's product (K + 1 in dense.py: at most log2(d) + 1) */
#define MAX_K1 64

int qgoft_abi_version(void) { return 3; }

#define QGOFT_REAL float
#define QGOFT_NAME(x) x##_f32
#include __FILE__
#undef QGOFT_REAL
#undef QGOFT_NAME
#define QGOFT_REAL double
#define QGOFT_NAME(x) x##_f64
#include __FILE__

#else

#define real QGOFT_REAL

/* SIMD vectors of 64 bytes (the compiler lowers them to what the CPU has), loaded from
   and stored to memory aligned to one value only */
typedef real QGOFT_NAME(vec) __attribute__((vector_size(64), aligned(sizeof(real))));
#define VEC QGOFT_NAME(vec)
#define VL ((int)(64 / sizeof(real)))
#define MAX_V 4

/* out[r, :b] = in[r, :b] @ M for TILE rows, b = nv * VL; first[r * ldf], when given, replaces
   in[r, 0]. Called with nv a constant: the accumulators are TILE x nv vectors in registers. */
static inline __attribute__((always_inline)) void QGOFT_NAME(tile_block_v)(
        int nv, const real *in, ptrdiff_t ldi, const real *first, ptrdiff_t ldf, const real *M, real *out,
        ptrdiff_t ldo) {
    const int b = nv * VL;
    VEC acc[TILE][MAX_V];
    for (int r = 0; r < TILE; r++) {
        real v = first ? first[r * ldf] : in[r * ldi];
        for (int q = 0; q < nv; q++) acc[r][q] = v * ((const VEC *)M)[q];
    }
    for (int c = 1; c < b; c++) {
        const VEC *m = (const VEC *)(M + (ptrdiff_t)c * b);
        for (int r = 0; r < TILE; r++) {
            real v = in[r * ldi + c];
            for (int q = 0; q < nv; q++) acc[r][q] += v * m[q];
        }
    }
    for (int r = 0; r < TILE; r++)
        for (int q = 0; q < nv; q++) ((VEC *)(out + r * ldo))[q] = acc[r][q];
}

/* the same for any b and nr <= TILE rows, one value at a time */
static inline void QGOFT_NAME(tile_block)(int nr, int b, const real *in, ptrdiff_t ldi, const real *first,
                                          ptrdiff_t ldf, const real *M, real *out, ptrdiff_t ldo) {
    real acc[TILE][MAX_B];
    for (int r = 0; r < nr; r++)
        for (int o = 0; o < b; o++) acc[r][o] = 0;
    for (int c = 0; c < b; c++) {
        const real *m = M + (ptrdiff_t)c * b;
        for (int r = 0; r < nr; r++) {
            real v = (c == 0 && first) ? first[r * ldf] : in[r * ldi + c];
            for (int o = 0; o < b; o++) acc[r][o] += v * m[o];
        }
    }
    for (int r = 0; r < nr; r++)
        for (int o = 0; o < b; o++) out[r * ldo + o] = acc[r][o];
}

/* the block pass over nr rows: whole tiles of the usual widths as vectors */
static void QGOFT_NAME(tile_blocks)(int nr, int nb, int b, const real *in, ptrdiff_t ldi, const real *first,
                                    const real *M, real *out, ptrdiff_t ldo) {
    int nv = b % VL == 0 && nr == TILE ? b / VL : 0;
    for (int j = 0; j < nb; j++) {
        const real *f = first ? first + j : NULL;
        const real *mj = M + (ptrdiff_t)j * b * b;
        const real *ij = in + (ptrdiff_t)j * b;
        real *oj = out + (ptrdiff_t)j * b;
        switch (nv) {
        case 1: QGOFT_NAME(tile_block_v)(1, ij, ldi, f, MAX_NB, mj, oj, ldo); break;
        case 2: QGOFT_NAME(tile_block_v)(2, ij, ldi, f, MAX_NB, mj, oj, ldo); break;
        case 4: QGOFT_NAME(tile_block_v)(4, ij, ldi, f, MAX_NB, mj, oj, ldo); break;
        default: QGOFT_NAME(tile_block)(nr, b, ij, ldi, f, MAX_NB, mj, oj, ldo);
        }
    }
}

/* out[r][:nb] = A[r, :nb] @ M (M: nb x nb) for nr rows, A[r, i] at A[r * lr + i * lc]: the roots'
   small matmuls. Whole tiles of VL columns as vectors, TILE rows' accumulators in registers. */
static void QGOFT_NAME(roots_mm)(int nr, int nb, const real *A, ptrdiff_t lr, ptrdiff_t lc, const real *M,
                                 real (*out)[MAX_NB]) {
    for (int j0 = 0; j0 < nb; j0 += VL) {
        if (j0 + VL <= nb && nr == TILE) {
            VEC acc[TILE];
            for (int r = 0; r < TILE; r++) acc[r] = (VEC){0};
            for (int i = 0; i < nb; i++) {
                VEC m = *(const VEC *)(M + (ptrdiff_t)i * nb + j0);
                for (int r = 0; r < TILE; r++) acc[r] += A[r * lr + i * lc] * m;
            }
            for (int r = 0; r < TILE; r++) *(VEC *)(out[r] + j0) = acc[r];
        } else {
            /* fewer than VL columns left, or a short tile: row by row, as axpys over the columns */
            int j1 = j0 + VL < nb ? j0 + VL : nb;
            for (int r = 0; r < nr; r++) {
                real *o = out[r];
                for (int j = j0; j < j1; j++) o[j] = 0;
                for (int i = 0; i < nb; i++) {
                    real v = A[r * lr + i * lc];
                    const real *m = M + (ptrdiff_t)i * nb;
                    for (int j = j0; j < j1; j++) o[j] += v * m[j];
                }
            }
        }
    }
}

/* the roots of y (nr rows) gathered into pre[r], then replaced by pre[r] @ Q^T (QT: Q^T, contiguous) */
static void QGOFT_NAME(postmix)(int nr, int nb, int b, real *y, ptrdiff_t ldy, const real *QT, real (*pre)[MAX_NB],
                                real (*mixed)[MAX_NB]) {
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < nb; i++) pre[r][i] = y[r * ldy + (ptrdiff_t)i * b];
    QGOFT_NAME(roots_mm)(nr, nb, &pre[0][0], MAX_NB, 1, QT, mixed);
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nb; j++) y[r * ldy + (ptrdiff_t)j * b] = mixed[r][j];
}

/* dQ[i][:] += sum_r x[r, i b] pre[r][:] over nr rows */
static void QGOFT_NAME(roots_grad)(int nr, int nb, int b, const real *x, ptrdiff_t ldx, real (*pre)[MAX_NB],
                                   real *dQ) {
    for (int i = 0; i < nb; i++) {
        real *row = dQ + (ptrdiff_t)i * nb;
        for (int j0 = 0; j0 < nb; j0 += VL) {
            if (j0 + VL <= nb && nr == TILE) {
                VEC acc = *(VEC *)(row + j0);
                for (int r = 0; r < TILE; r++) acc += x[r * ldx + (ptrdiff_t)i * b] * *(const VEC *)(pre[r] + j0);
                *(VEC *)(row + j0) = acc;
            } else {
                int j1 = j0 + VL < nb ? j0 + VL : nb;
                for (int r = 0; r < nr; r++) {
                    real v = x[r * ldx + (ptrdiff_t)i * b];
                    for (int j = j0; j < j1; j++) row[j] += v * pre[r][j];
                }
            }
        }
    }
}

static inline void QGOFT_NAME(share)(long T, long *lo, long *hi) {
#ifdef _OPENMP
    long t = omp_get_thread_num(), n = omp_get_num_threads();
#else
    long t = 0, n = 1;
#endif
    *lo = T * t / n;
    *hi = T * (t + 1) / n;
}

void QGOFT_NAME(qgoft_rotate)(long T, int nb, int b, const real *x, long ldx, const real *M, const real *Q,
                              int premix, real *y, long ldy, int threads) {
#pragma omp parallel num_threads(threads)
    {
        real mixed[TILE][MAX_NB], pre[TILE][MAX_NB];
        long lo, hi;
        QGOFT_NAME(share)(T, &lo, &hi);
        for (long t = lo; t < hi; t += TILE) {
            int nr = (int)(hi - t < TILE ? hi - t : TILE);
            const real *xt = x + t * ldx;
            real *yt = y + t * ldy;
            if (Q && premix) {
                QGOFT_NAME(roots_mm)(nr, nb, xt, ldx, b, Q, mixed);
                QGOFT_NAME(tile_blocks)(nr, nb, b, xt, ldx, &mixed[0][0], M, yt, ldy);
            } else {
                QGOFT_NAME(tile_blocks)(nr, nb, b, xt, ldx, NULL, M, yt, ldy);
                if (Q) QGOFT_NAME(postmix)(nr, nb, b, yt, ldy, Q, pre, mixed);
            }
        }
    }
}

/* A mixed batch: runs of consecutive rows (start, rows, adapter) as int64 triples, each run rotated by
   its adapter's factors, M + adapter * mstride (B, nb x b x b) and Q + adapter * qstride (or Q NULL:
   no roots mix); adapter -1: the rows copied unchanged (d values each). The rows are shared out
   among the threads as for qgoft_rotate, a thread walking the runs that meet its share. */
void QGOFT_NAME(qgoft_rotate_runs)(long T, long nruns, const int64_t *runs, int nb, int b, long d, const real *x,
                                   long ldx, const real *M, long mstride, const real *Q, long qstride, real *y,
                                   long ldy, int threads) {
#pragma omp parallel num_threads(threads)
    {
        real mixed[TILE][MAX_NB];
        long lo, hi;
        QGOFT_NAME(share)(T, &lo, &hi);
        for (long k = 0; k < nruns; k++) {
            long start = runs[3 * k], end = start + runs[3 * k + 1], adapter = runs[3 * k + 2];
            if (end <= lo || start >= hi) continue;
            if (start < lo) start = lo;
            if (end > hi) end = hi;
            if (adapter < 0) {
                for (long t = start; t < end; t++) memcpy(y + t * ldy, x + t * ldx, (size_t)d * sizeof(real));
                continue;
            }
            const real *Ma = M + adapter * mstride, *Qa = Q ? Q + adapter * qstride : NULL;
            for (long t = start; t < end; t += TILE) {
                int nr = (int)(end - t < TILE ? end - t : TILE);
                const real *xt = x + t * ldx;
                if (Qa) QGOFT_NAME(roots_mm)(nr, nb, xt, ldx, b, Qa, mixed);
                QGOFT_NAME(tile_blocks)(nr, nb, b, xt, ldx, Qa ? &mixed[0][0] : NULL, Ma, y + t * ldy, ldy);
            }
        }
    }
}

/* dB_j += x2_j^T g_j over TILE rows, b = nv * VL (x2: x with its roots replaced by first[r * MAX_NB],
   when given); the tile's rows of g stay in registers */
static inline __attribute__((always_inline)) void QGOFT_NAME(tile_grad_v)(
        int nv, const real *x, ptrdiff_t ldx, const real *first, const real *g, ptrdiff_t ldg, real *dB) {
    const int b = nv * VL;
    VEC gv[TILE][MAX_V];
    for (int r = 0; r < TILE; r++)
        for (int q = 0; q < nv; q++) gv[r][q] = ((const VEC *)(g + r * ldg))[q];
    for (int a = 0; a < b; a++) {
        VEC *row = (VEC *)(dB + (ptrdiff_t)a * b);
        VEC acc[MAX_V];
        for (int q = 0; q < nv; q++) acc[q] = row[q];
        for (int r = 0; r < TILE; r++) {
            real v = (a == 0 && first) ? first[r * MAX_NB] : x[r * ldx + a];
            for (int q = 0; q < nv; q++) acc[q] += v * gv[r][q];
        }
        for (int q = 0; q < nv; q++) row[q] = acc[q];
    }
}

/* the same for any b and nr <= TILE rows, one value at a time */
static inline void QGOFT_NAME(tile_grad)(int nr, int b, const real *x, ptrdiff_t ldx, const real *first,
                                         const real *g, ptrdiff_t ldg, real *dB) {
    for (int a = 0; a < b; a++) {
        real *row = dB + (ptrdiff_t)a * b;
        for (int r = 0; r < nr; r++) {
            real v = (a == 0 && first) ? first[r * MAX_NB] : x[r * ldx + a];
            const real *gr = g + r * ldg;
            for (int o = 0; o < b; o++) row[o] += v * gr[o];
        }
    }
}

static void QGOFT_NAME(tile_grads)(int nr, int nb, int b, const real *x, ptrdiff_t ldx, const real *first,
                                   const real *g, ptrdiff_t ldg, real *dB) {
    int nv = b % VL == 0 && nr == TILE ? b / VL : 0;
    for (int j = 0; j < nb; j++) {
        const real *f = first ? first + j : NULL, *xj = x + (ptrdiff_t)j * b, *gj = g + (ptrdiff_t)j * b;
        real *dj = dB + (ptrdiff_t)j * b * b;
        switch (nv) {
        case 1: QGOFT_NAME(tile_grad_v)(1, xj, ldx, f, gj, ldg, dj); break;
        case 2: QGOFT_NAME(tile_grad_v)(2, xj, ldx, f, gj, ldg, dj); break;
        case 4: QGOFT_NAME(tile_grad_v)(4, xj, ldx, f, gj, ldg, dj); break;
        default: QGOFT_NAME(tile_grad)(nr, b, xj, ldx, f, gj, ldg, dj);
        }
    }
}

/* scratch: threads * (nb b b + nb nb) values, for the threads' own sums */
void QGOFT_NAME(qgoft_backward)(long T, int nb, int b, const real *x, long ldx, const real *g, long ldg,
                                const real *B, const real *BT, const real *Q, const real *QT, real *dx, long lddx, real *dB,
                                real *dQ, real *scratch, int threads) {
    const long nblock = (long)nb * b * b, nq = Q ? (long)nb * nb : 0, per = nblock + nq;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int me = omp_get_thread_num(), team = omp_get_num_threads();
#else
        int me = 0, team = 1;
#endif
        real *own = scratch + (ptrdiff_t)me * per;
        memset(own, 0, sizeof(real) * per);
        real mixed[TILE][MAX_NB], pre[TILE][MAX_NB];
        long lo, hi;
        QGOFT_NAME(share)(T, &lo, &hi);
        for (long t = lo; t < hi; t += TILE) {
            int nr = (int)(hi - t < TILE ? hi - t : TILE);
            const real *xt = x + t * ldx, *gt = g + t * ldg;
            if (Q && dB) QGOFT_NAME(roots_mm)(nr, nb, xt, ldx, b, Q, mixed);
            if (dB) QGOFT_NAME(tile_grads)(nr, nb, b, xt, ldx, Q ? &mixed[0][0] : NULL, gt, ldg, own);
            if (dx) {
                real *dxt = dx + t * lddx;
                QGOFT_NAME(tile_blocks)(nr, nb, b, gt, ldg, NULL, BT, dxt, lddx);
                if (Q) QGOFT_NAME(postmix)(nr, nb, b, dxt, lddx, QT, pre, mixed);
            } else if (Q && dQ) {
                /* the roots of g blockdiag(B^T) alone: row 0 of each block of B (whole vectors
                   summed lane by lane, where the width allows: a scalar sum is one chain of b
                   dependent multiply-adds) */
                for (int r = 0; r < nr; r++)
                    for (int j = 0; j < nb; j++) {
                        const real *gj = gt + r * ldg + (ptrdiff_t)j * b, *bj = B + (ptrdiff_t)j * b * b;
                        real s = 0;
                        if (b % VL == 0) {
                            VEC acc = (VEC){0};
                            for (int c = 0; c < b; c += VL) acc += *(const VEC *)(gj + c) * *(const VEC *)(bj + c);
                            for (int k = 0; k < VL; k++) s += acc[k];
                        } else {
                            for (int c = 0; c < b; c++) s += gj[c] * bj[c];
                        }
                        pre[r][j] = s;
                    }
            }
            if (Q && dQ) QGOFT_NAME(roots_grad)(nr, nb, b, xt, ldx, pre, own + nblock);
        }
#pragma omp barrier
        /* the threads' sums, added in thread order: each thread a share of the entries */
        long lo2, hi2;
        QGOFT_NAME(share)(per, &lo2, &hi2);
        for (long e = lo2; e < hi2; e++) {
            real s = 0;
            for (int k = 0; k < team; k++) s += scratch[(ptrdiff_t)k * per + e];
            if (e < nblock) {
                if (dB) dB[e] = s;
            } else if (dQ) {
                dQ[e - nblock] = s;
            }
        }
    }
}


/* The factors' values (dense.py's _build). source = [cos(angles), sin(angles)] (givens) or
   the blocks' entries (4 count values), then the identity's 1, 0, 0, 1, then the scale
   (nscale values, or none). Row i of the gather (N rows of 2 x K1 indices into source) gives
   the factors C[i, l] and H[i, t] of column i's K1 values H[i, t] * prod_{l <= t} C[i, l]
   (times sign[i, t] when sign is given), which go to flat[pos[i * K1 + t]] and, when flat_t
   is given, to flat_t[pos_t[i * K1 + t]]; every other slot of flat and flat_t (size values
   each) is zero. CH (N x 2 x K1: the gathered factors) and P (N x K1: the prefix products)
   keep what the backward reads. */
void QGOFT_NAME(qgoft_build)(long count, int givens, const real *params, long nscale, const real *scale,
                             real *source, long N, int K1, const int64_t *gather, const int64_t *pos,
                             const real *sign, long size, real *flat, const int64_t *pos_t, real *flat_t,
                             real *CH, real *P) {
    long entries = givens ? 2 * count : 4 * count;
    if (givens) {
        for (long j = 0; j < count; j++) {
            source[j] = cos(params[j]);
            source[count + j] = sin(params[j]);
        }
    } else {
        memcpy(source, params, (size_t)entries * sizeof(real));
    }
    source[entries] = 1;
    source[entries + 1] = 0;
    source[entries + 2] = 0;
    source[entries + 3] = 1;
    if (nscale) memcpy(source + entries + 4, scale, (size_t)nscale * sizeof(real));
    memset(flat, 0, (size_t)size * sizeof(real));
    if (flat_t) memset(flat_t, 0, (size_t)size * sizeof(real));
    for (long i = 0; i < N; i++) {
        const int64_t *gc = gather + i * 2 * K1, *gh = gc + K1;
        real p = 1;
        for (int t = 0; t < K1; t++) {
            real c = source[gc[t]], h = source[gh[t]];
            p *= c;
            real v = h * p;
            if (sign) v *= sign[i * K1 + t];
            flat[pos[i * K1 + t]] = v;
            if (flat_t) flat_t[pos_t[i * K1 + t]] = v;
            CH[i * 2 * K1 + t] = c;
            CH[i * 2 * K1 + K1 + t] = h;
            P[i * K1 + t] = p;
        }
    }
}

/* The gradient of qgoft_build (dense.py's _build_backward): dsource (nsource values) from
   dflat (the gradient of flat), as the sum over every product that read each value. The
   prefix products' gradient is the suffix recurrence S[l] = dP[l] + C[l + 1] S[l + 1], and
   dC[l] = P[l - 1] S[l] (S[0] for l = 0). Serial, in a fixed order. With givens, dangles
   (count values), when given, receives the angles' gradients, dsin cos - dcos sin. */
void QGOFT_NAME(qgoft_build_backward)(long N, int K1, const real *dflat, const int64_t *gather,
                                      const int64_t *pos, const real *sign, const real *CH, const real *P,
                                      long nsource, real *dsource, long count, const real *source,
                                      real *dangles) {
    real S[MAX_K1];
    memset(dsource, 0, (size_t)nsource * sizeof(real));
    for (long i = 0; i < N; i++) {
        const int64_t *gc = gather + i * 2 * K1, *gh = gc + K1;
        const real *C = CH + i * 2 * K1, *H = C + K1, *Pi = P + i * K1;
        for (int t = 0; t < K1; t++) {
            real dv = dflat[pos[i * K1 + t]];
            if (sign) dv *= sign[i * K1 + t];
            dsource[gh[t]] += dv * Pi[t];
            S[t] = dv * H[t];
        }
        for (int l = K1 - 2; l >= 0; l--) S[l] += C[l + 1] * S[l + 1];
        dsource[gc[0]] += S[0];
        for (int l = 1; l < K1; l++) dsource[gc[l]] += Pi[l - 1] * S[l];
    }
    if (dangles)
        for (long j = 0; j < count; j++)
            dangles[j] = dsource[count + j] * source[j] - dsource[j] * source[count + j];
}

#undef real
#undef VEC
#undef VL
#undef MAX_V
#endif
