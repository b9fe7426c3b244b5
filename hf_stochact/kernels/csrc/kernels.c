/*
 * hf_stochact.kernels._C: the CPU loops behind the hf_stochact::* operators (hf_stochact/kernels/ops.py).
 *
 * Plain CPython extension (no torch headers, so `pip install` needs no torch at build time). The functions here
 * are called only from the operators' CPU implementations, which check every tensor first (plain strided CPU
 * storage, dtype, contiguity, sizes) and pass its data pointer; no pointer is ever taken anywhere else.
 *
 * 1. The SiLU/ReLU draw (StochA). The mask is a pure function of a 64-bit seed and the element index:
 *
 *      u(i)  = mix32(mix32(lo32(i) ^ k0) ^ (k1 + hi32(i)))       k0, k1 = low / high 32 bits of the seed
 *      m(i)  = u(i) < threshold  [& x(i) < 0 for the paper variant]    threshold = round(p * 2^32)
 *
 *    with mix32 the "lowbias32" integer hash (C. Wellons). The same formula in torch ops
 *    (hf_stochact/kernels/reference.py) gives bit-identical masks on any device, and backward regenerates the
 *    mask from the seed instead of storing it: a stochastic FFN saves for backward exactly what SiLU saves (x).
 *
 *      draw_forward:   y[i]  = m(i) ? y[i] : relu(x[i])          (y holds SiLU(x) on entry)
 *      draw_backward:  gx[i] = m(i) ? gx[i] : (x[i] <= 0 ? 0 : g[i])   (gx holds SiLU'(x) * g on entry)
 *
 * 2. The sparse ReLU FFN of a decode step: only the rows of active neurons are read, straight from the weights,
 *    with no gathered copy (large gathered copies page-fault on every call: BASELINE.md).
 *
 *      sparse_gated_mlp:  g = act(Wg x + bg) densely, idx = union over tokens of {i : g[t, i] != 0},
 *                         h = g[:, idx] * (Wu[idx] x + bu[idx]),  y = h WdT[idx] + bd
 *      sparse_down:       idx = union of {i : h[t, i] != 0},  y = h[:, idx] WT[idx] + b
 *
 *    Both return k = |idx|, or -1 when k exceeds max_active (the caller finishes densely; the gate is left in g).
 *    Scratch memory is allocated per call: no state is shared between calls or threads.
 *
 * x, h, g, y, biases: float32. Weights: float32 (dtype 0) or bfloat16 (dtype 1), rows contiguous.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Portability: OpenMP pragmas are ignored where setup.py found no OpenMP; prefetch and `omp simd` hints are
 * GCC/Clang spellings, empty elsewhere (MSVC). */
#if defined(_MSC_VER)
#define PRAGMA(x) __pragma(x)
#else
#define PRAGMA(x) _Pragma(#x)
#endif
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)
#define PRAGMA_SIMD PRAGMA(omp simd)
#else
#define PREFETCH(p) ((void)0)
#define PRAGMA_SIMD
#endif

/* Compile the hot loops for several x86 levels and pick one at load time (ifunc, GCC on x86-64 Linux only):
 * the 32-bit multiplies of the hash and the selects vectorise with AVX-512 / AVX2; other CPUs get the portable
 * build. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#define PARALLEL_MIN (1 << 16) /* below this many elements one thread is faster than waking a team */
#define MAX_T 16               /* tokens per sparse call */

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch; NaN stays a quiet NaN */
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Branch-free selects on bit patterns (the mask is random: branches would mispredict half the time).
 * sel(m, a, b) = m ? a : b for m in {0, 1}. */
static inline uint32_t sel32(uint32_t m, uint32_t a, uint32_t b) { return (a & (0u - m)) | (b & (m - 1u)); }
static inline uint16_t sel16(uint32_t m, uint16_t a, uint16_t b) { return (uint16_t)sel32(m, a, b); }

/* ---------------------------------------------------------------------------------------------------------------
 * 1. The draw */

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}


/* The draw is computed a block at a time: first the block's random words (pure 32-bit arithmetic over a 32-bit
 * counter, which vectorises: a block never crosses a multiple of 2^32 since BLOCK divides 2^32), then the select.
 * m(j) = all | (u(j) < t32), with all = 1 for threshold = 2^32 (p = 1). */
#define BLOCK 1024

static inline void block_bits(uint32_t k0, uint32_t k1, uint64_t start, uint32_t *u) {
    uint32_t lo = (uint32_t)start, hi = k1 + (uint32_t)(start >> 32);
    PRAGMA_SIMD for (uint32_t j = 0; j < BLOCK; ++j) u[j] = mix32(mix32((lo + j) ^ k0) ^ hi);
}

#define DRAW_LOOP(BODY)                                                                                           \
    PRAGMA(omp parallel for schedule(static) num_threads(nthreads) if (n > PARALLEL_MIN))                         \
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {                                                       \
        uint32_t u[BLOCK];                                                                                        \
        block_bits(k0, k1, (uint64_t)start, u);                                                                   \
        Py_ssize_t len = n - start < BLOCK ? n - start : BLOCK;                                                   \
        PRAGMA_SIMD for (Py_ssize_t j = 0; j < len; ++j) {                                                        \
            Py_ssize_t i = start + j;                                                                             \
            uint32_t drawn = all | (uint32_t)(u[j] < t32);                                                        \
            BODY                                                                                                  \
        }                                                                                                         \
    }

MULTIVERSION static void draw_forward_f32(const float *x, float *y, Py_ssize_t n, uint32_t k0, uint32_t k1,
                                          uint32_t all, uint32_t t32, int negative_only, int nthreads) {
    const uint32_t *xb = (const uint32_t *)x;
    uint32_t *yb = (uint32_t *)y;
    DRAW_LOOP({
        float xi = x[i];
        uint32_t m = drawn & (negative_only ? (uint32_t)(xi < 0.0f) : 1u);
        uint32_t keep = (uint32_t)(xi > 0.0f) | (uint32_t)(xi != xi); /* relu keeps x > 0 and NaN, else +0 */
        yb[i] = sel32(m, yb[i], xb[i] & (0u - keep));
    })
}

MULTIVERSION static void draw_forward_bf16(const uint16_t *x, uint16_t *y, Py_ssize_t n, uint32_t k0, uint32_t k1,
                                           uint32_t all, uint32_t t32, int negative_only, int nthreads) {
    DRAW_LOOP({
        float xf = bf16_to_f32(x[i]);
        uint32_t m = drawn & (negative_only ? (uint32_t)(xf < 0.0f) : 1u);
        uint32_t keep = (uint32_t)(xf > 0.0f) | (uint32_t)(xf != xf);
        y[i] = sel16(m, y[i], (uint16_t)(x[i] & (0u - keep)));
    })
}

MULTIVERSION static void draw_backward_f32(const float *x, const float *g, float *gx, Py_ssize_t n, uint32_t k0,
                                           uint32_t k1, uint32_t all, uint32_t t32, int negative_only,
                                           int nthreads) {
    const uint32_t *gb = (const uint32_t *)g;
    uint32_t *ob = (uint32_t *)gx;
    DRAW_LOOP({
        float xi = x[i];
        uint32_t m = drawn & (negative_only ? (uint32_t)(xi < 0.0f) : 1u);
        uint32_t pass = (uint32_t)!(xi <= 0.0f); /* torch's threshold_backward: 0 where x <= 0 */
        ob[i] = sel32(m, ob[i], gb[i] & (0u - pass));
    })
}

MULTIVERSION static void draw_backward_bf16(const uint16_t *x, const uint16_t *g, uint16_t *gx, Py_ssize_t n,
                                            uint32_t k0, uint32_t k1, uint32_t all, uint32_t t32, int negative_only,
                                            int nthreads) {
    DRAW_LOOP({
        float xf = bf16_to_f32(x[i]);
        uint32_t m = drawn & (negative_only ? (uint32_t)(xf < 0.0f) : 1u);
        uint32_t pass = (uint32_t)!(xf <= 0.0f);
        gx[i] = sel16(m, gx[i], (uint16_t)(g[i] & (0u - pass)));
    })
}

/* draw_forward(x, y, n, seed, threshold, negative_only, dtype, nthreads) and
 * draw_backward(x, g, gx, n, seed, threshold, negative_only, dtype, nthreads) */
static int parse_threshold(unsigned long long threshold, uint32_t *all, uint32_t *t32) {
    if (threshold > 0x100000000ULL) {
        PyErr_Format(PyExc_ValueError, "threshold must be in [0, 2^32], got %llu", threshold);
        return 0;
    }
    *all = threshold == 0x100000000ULL;
    *t32 = (uint32_t)threshold;
    return 1;
}

static PyObject *py_draw_forward(PyObject *self, PyObject *args) {
    unsigned long long x, y, seed, threshold;
    Py_ssize_t n;
    int negative_only, dtype, nthreads;
    uint32_t all, t32;
    if (!PyArg_ParseTuple(args, "KKnKKpii", &x, &y, &n, &seed, &threshold, &negative_only, &dtype, &nthreads))
        return NULL;
    if (!parse_threshold(threshold, &all, &t32)) return NULL;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    Py_BEGIN_ALLOW_THREADS
    if (dtype == 0)
        draw_forward_f32((const float *)x, (float *)y, n, k0, k1, all, t32, negative_only, nthreads);
    else
        draw_forward_bf16((const uint16_t *)x, (uint16_t *)y, n, k0, k1, all, t32, negative_only, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_draw_backward(PyObject *self, PyObject *args) {
    unsigned long long x, g, gx, seed, threshold;
    Py_ssize_t n;
    int negative_only, dtype, nthreads;
    uint32_t all, t32;
    if (!PyArg_ParseTuple(args, "KKKnKKpii", &x, &g, &gx, &n, &seed, &threshold, &negative_only, &dtype,
                          &nthreads))
        return NULL;
    if (!parse_threshold(threshold, &all, &t32)) return NULL;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    Py_BEGIN_ALLOW_THREADS
    if (dtype == 0)
        draw_backward_f32((const float *)x, (const float *)g, (float *)gx, n, k0, k1, all, t32, negative_only,
                          nthreads);
    else
        draw_backward_bf16((const uint16_t *)x, (const uint16_t *)g, (uint16_t *)gx, n, k0, k1, all, t32,
                           negative_only, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------------------------
 * 2. Sparse FFN of a decode step
 *
 * Rows are processed R at a time: R independent memory streams per thread (one row at a time leaves the memory
 * system idle at the start of every gathered row and every 4 KiB page), R x 16 accumulators (no FMA latency
 * chain), and x or y[slice] loaded once per R rows. Groups with fewer than R rows repeat their first row with a
 * zero weight. While a group is processed, the same offsets of the next group's rows are prefetched (the hardware
 * prefetcher cannot guess the next gathered row, and stops at every page boundary). */
#define R 4
#define W16 16

#define LOAD_F32(p, i) ((p)[i])
#define LOAD_BF16(p, i) bf16_to_f32((p)[i])

/* out[r] = row_r . x for the R rows of a group; nxt: the next group's rows (prefetched) or NULL */
#define DEFINE_DOTR(NAME, TYPE, LOAD, LINE)                                                                       \
    static inline void NAME(const TYPE *const *rows, const TYPE *const *nxt, const float *x, Py_ssize_t d,     \
                            float *out) {                                                                      \
        float acc[R][W16];                                                                                     \
        for (int r = 0; r < R; ++r)                                                                            \
            for (int l = 0; l < W16; ++l) acc[r][l] = 0.0f;                                                    \
        Py_ssize_t c0 = 0;                                                                                     \
        for (; c0 + W16 <= d; c0 += W16) {                                                                     \
            if (nxt && c0 % LINE == 0)                                                                         \
                for (int r = 0; r < R; ++r) PREFETCH(nxt[r] + c0);                           \
            for (int r = 0; r < R; ++r) {                                                                      \
                const TYPE *row = rows[r] + c0;                                                                \
                PRAGMA_SIMD for (int l = 0; l < W16; ++l) acc[r][l] += LOAD(row, l) * x[c0 + l];       \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < R; ++r) {                                                                          \
            float s = 0.0f;                                                                                    \
            for (Py_ssize_t c = c0; c < d; ++c) s += LOAD(rows[r], c) * x[c];                                  \
            for (int l = 0; l < W16; ++l) s += acc[r][l];                                                      \
            out[r] = s;                                                                                        \
        }                                                                                                      \
    }
DEFINE_DOTR(dotr_f32, float, LOAD_F32, 16)
DEFINE_DOTR(dotr_bf16, uint16_t, LOAD_BF16, 32)

/* the rows of group g (rows g*R .. g*R+R-1 of the list, the first one repeated past n) */
static inline void group_rows(const char *W, Py_ssize_t row_bytes, const int64_t *idx, Py_ssize_t n, Py_ssize_t g,
                              const char **rows) {
    for (int r = 0; r < R; ++r) {
        Py_ssize_t j = g * R + r < n ? g * R + r : g * R;
        rows[r] = W + (idx ? idx[j] : j) * row_bytes;
    }
}

MULTIVERSION static void rows_dot(const void *W, int dtype, const float *x, const int64_t *idx, Py_ssize_t n,
                                  Py_ssize_t d, Py_ssize_t T, const float *bias, float *out, Py_ssize_t out_stride,
                                  int nthreads) {
    Py_ssize_t groups = (n + R - 1) / R, row_bytes = d * (dtype == 0 ? 4 : 2);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n * d > PARALLEL_MIN)
    for (Py_ssize_t g = 0; g < groups; ++g) {
        const char *rows[R], *nxt[R];
        group_rows((const char *)W, row_bytes, idx, n, g, rows);
        /* contiguous rows stream by themselves: only gathered rows get a software prefetch */
        int pf = idx && g + 1 < groups;
        if (pf) group_rows((const char *)W, row_bytes, idx, n, g + 1, nxt);
        for (Py_ssize_t t = 0; t < T; ++t) {
            float acc[R];
            if (dtype == 0)
                dotr_f32((const float *const *)rows, pf && t == 0 ? (const float *const *)nxt : NULL, x + t * d, d,
                         acc);
            else
                dotr_bf16((const uint16_t *const *)rows, pf && t == 0 ? (const uint16_t *const *)nxt : NULL,
                          x + t * d, d, acc);
            for (int r = 0; r < R && g * R + r < n; ++r) {
                Py_ssize_t j = g * R + r;
                out[t * out_stride + j] = acc[r] + (bias ? bias[idx ? idx[j] : j] : 0.0f);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * y = h[:, idx] WT[idx] + b for one or several weights ("members"), the down step of every sparse path.
 *
 * The active rows of each member are split between the threads (each reads one contiguous stretch of the weight,
 * which the hardware prefetcher follows even with rows skipped), each thread sums into its own partial output,
 * and the partials are added column-wise at the end. One OpenMP region covers every member of the call. */

/* y[t * d + c] += sum_{j < n} h[t * hs + j] * WT[idx[j] * d + c], four rows per pass (the tail repeats a row with
 * weight 0), the next pass's rows prefetched */
#define DEFINE_AXPY_ROWS(NAME, TYPE, LOAD, LINE)                                                                  \
    static inline void NAME(const TYPE *WT, const float *h, Py_ssize_t hs, const int64_t *idx, Py_ssize_t n,   \
                            float *y, Py_ssize_t d, Py_ssize_t T) {                                            \
        Py_ssize_t groups = (n + R - 1) / R;                                                                   \
        for (Py_ssize_t g = 0; g < groups; ++g) {                                                              \
            const TYPE *rows[R], *nxt[R] = {0}; /* read only when pf */                                        \
            group_rows((const char *)WT, d * sizeof(TYPE), idx, n, g, (const char **)rows);                    \
            int pf = g + 1 < groups;                                                                           \
            if (pf) group_rows((const char *)WT, d * sizeof(TYPE), idx, n, g + 1, (const char **)nxt);         \
            const TYPE *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];                             \
            for (Py_ssize_t t = 0; t < T; ++t) {                                                               \
                float hr[R];                                                                                   \
                for (int r = 0; r < R; ++r) hr[r] = g * R + r < n ? h[t * hs + g * R + r] : 0.0f;               \
                float *yt = y + t * d;                                                                         \
                for (Py_ssize_t a = 0; a < d; a += W16) {                                                      \
                    Py_ssize_t b = a + W16 < d ? a + W16 : d;                                                  \
                    if (pf && t == 0 && a % LINE == 0)                                                         \
                        for (int r = 0; r < R; ++r) PREFETCH(nxt[r] + a);                                      \
                    PRAGMA_SIMD for (Py_ssize_t c = a; c < b; ++c) yt[c] +=                                    \
                        hr[0] * LOAD(r0, c) + hr[1] * LOAD(r1, c) + hr[2] * LOAD(r2, c) + hr[3] * LOAD(r3, c); \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }
DEFINE_AXPY_ROWS(axpy_rows_f32, float, LOAD_F32, 16)
DEFINE_AXPY_ROWS(axpy_rows_bf16, uint16_t, LOAD_BF16, 32)

/* The same step with AVX-512 intrinsics, eight rows per pass (one load and one store of y per eight weight rows),
 * chosen at run time on CPUs that have AVX-512F/BW (x86-64 GCC/Clang builds). bfloat16 weights are widened to
 * float32 in registers (a zero-extend and a shift: exact) and multiplied in float32, as the portable loop does. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_MSC_VER)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
#define R8 8

__attribute__((target("avx512f,avx512bw"))) static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

__attribute__((target("avx512f,avx512bw"))) static inline __m512 load16_f32(const float *p) {
    return _mm512_loadu_ps(p);
}

#define DEFINE_AXPY8_AVX512(NAME, TYPE, LOAD16, SCALAR, LINE_ELEMS)                                               \
    __attribute__((target("avx512f,avx512bw"))) static void NAME(const TYPE *WT, const float *h, Py_ssize_t hs,  \
                                                                 const int64_t *idx, Py_ssize_t n, float *y,     \
                                                                 Py_ssize_t d, Py_ssize_t T) {                   \
        Py_ssize_t groups = (n + R8 - 1) / R8, dv = d / 16 * 16;                                               \
        for (Py_ssize_t g = 0; g < groups; ++g) {                                                              \
            const TYPE *rw[R8];                                                                                \
            for (int r = 0; r < R8; ++r) {                                                                     \
                Py_ssize_t j = g * R8 + r < n ? g * R8 + r : g * R8;                                           \
                rw[r] = WT + (idx ? idx[j] : j) * d;                                                           \
            }                                                                                                  \
            const TYPE *nx[R8] = {0}; /* read only when pf */                                                \
            int pf = g + 1 < groups;                                                                           \
            if (pf)                                                                                            \
                for (int r = 0; r < R8; ++r) {                                                                 \
                    Py_ssize_t j = (g + 1) * R8 + r < n ? (g + 1) * R8 + r : (g + 1) * R8;                     \
                    nx[r] = WT + (idx ? idx[j] : j) * d;                                                       \
                }                                                                                              \
            for (Py_ssize_t t = 0; t < T; ++t) {                                                               \
                float hr[R8];                                                                                  \
                for (int r = 0; r < R8; ++r) hr[r] = g * R8 + r < n ? h[t * hs + g * R8 + r] : 0.0f;            \
                __m512 h0 = _mm512_set1_ps(hr[0]), h1 = _mm512_set1_ps(hr[1]), h2 = _mm512_set1_ps(hr[2]),     \
                       h3 = _mm512_set1_ps(hr[3]), h4 = _mm512_set1_ps(hr[4]), h5 = _mm512_set1_ps(hr[5]),     \
                       h6 = _mm512_set1_ps(hr[6]), h7 = _mm512_set1_ps(hr[7]);                                 \
                float *yt = y + t * d;                                                                         \
                Py_ssize_t c = 0;                                                                              \
                for (; c < dv; c += 16) {                                                                      \
                    if (pf && t == 0 && c % LINE_ELEMS == 0)                                                   \
                        for (int r = 0; r < R8; ++r) PREFETCH(nx[r] + c);                                      \
                    __m512 a = _mm512_fmadd_ps(h0, LOAD16(rw[0] + c), _mm512_loadu_ps(yt + c));                \
                    __m512 b = _mm512_mul_ps(h1, LOAD16(rw[1] + c));                                           \
                    a = _mm512_fmadd_ps(h2, LOAD16(rw[2] + c), a);                                             \
                    b = _mm512_fmadd_ps(h3, LOAD16(rw[3] + c), b);                                             \
                    a = _mm512_fmadd_ps(h4, LOAD16(rw[4] + c), a);                                             \
                    b = _mm512_fmadd_ps(h5, LOAD16(rw[5] + c), b);                                             \
                    a = _mm512_fmadd_ps(h6, LOAD16(rw[6] + c), a);                                             \
                    b = _mm512_fmadd_ps(h7, LOAD16(rw[7] + c), b);                                             \
                    _mm512_storeu_ps(yt + c, _mm512_add_ps(a, b));                                             \
                }                                                                                              \
                for (; c < d; ++c) {                                                                           \
                    float s = yt[c];                                                                           \
                    for (int r = 0; r < R8; ++r) s += hr[r] * SCALAR(rw[r], c);                                \
                    yt[c] = s;                                                                                 \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }
DEFINE_AXPY8_AVX512(axpy8_f32_avx512, float, load16_f32, LOAD_F32, 16)
DEFINE_AXPY8_AVX512(axpy8_bf16_avx512, uint16_t, load16_bf16, LOAD_BF16, 32)

static int avx512_ok = -1; /* -1: not checked yet */
static int use_avx512(void) {
    if (avx512_ok < 0) {
        __builtin_cpu_init();
        avx512_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    getenv("HF_STOCHACT_NO_AVX512") == NULL;
    }
    return avx512_ok;
}
#else
#define HAVE_AVX512_PATH 0
static int use_avx512(void) { return 0; }
#endif

typedef struct {
    const void *w;   /* WT [d_in, d_out], rows contiguous */
    const float *b;  /* bias [d_out] or NULL */
    void *y;         /* [T, d_out]: float32, or bfloat16 when io */
    Py_ssize_t d;    /* d_out */
    int dtype;       /* of w: 0 float32, 1 bfloat16 */
    float thr;       /* inputs with |x| <= thr count as 0 */
    Py_ssize_t k;    /* active rows (set by the call) */
    int64_t *idx;    /* their indices */
    float *h;        /* [T, k] their values (another token's value may have kept the row: 0 there) */
    float *part;     /* [P, T, d] partial outputs */
    float *yf;       /* [T, d] float32 output (y itself unless io) */
} Member;

MULTIVERSION static void sparse_rows_run(Member *m, int nm, Py_ssize_t T, int parts) {
    int avx512 = use_avx512();
    (void)avx512;
#pragma omp parallel num_threads(parts) if (parts > 1)
    {
#ifdef _OPENMP
        int p = omp_get_thread_num(), P = omp_get_num_threads();
#else
        int p = 0, P = 1;
#endif
        for (int i = 0; i < nm; ++i) {
            Member *mm = &m[i];
            if (mm->k < 0) continue;
            Py_ssize_t n = mm->k, d = mm->d;
            Py_ssize_t r0 = n * p / P, r1 = n * (p + 1) / P;
            float *acc = P == 1 ? mm->yf : mm->part + (Py_ssize_t)p * T * d;
            if (P == 1) {
                for (Py_ssize_t t = 0; t < T; ++t)
                    for (Py_ssize_t c = 0; c < d; ++c) acc[t * d + c] = mm->b ? mm->b[c] : 0.0f;
            } else {
                memset(acc, 0, (size_t)(T * d) * sizeof(float));
            }
            if (r1 > r0) {
#if HAVE_AVX512_PATH
                if (avx512) {
                    if (mm->dtype == 0)
                        axpy8_f32_avx512((const float *)mm->w, mm->h + r0, n, mm->idx + r0, r1 - r0, acc, d, T);
                    else
                        axpy8_bf16_avx512((const uint16_t *)mm->w, mm->h + r0, n, mm->idx + r0, r1 - r0, acc, d, T);
                    continue;
                }
#endif
                if (mm->dtype == 0)
                    axpy_rows_f32((const float *)mm->w, mm->h + r0, n, mm->idx + r0, r1 - r0, acc, d, T);
                else
                    axpy_rows_bf16((const uint16_t *)mm->w, mm->h + r0, n, mm->idx + r0, r1 - r0, acc, d, T);
            }
        }
        if (P > 1) {
#pragma omp barrier
            for (int i = 0; i < nm; ++i) {
                Member *mm = &m[i];
                if (mm->k < 0) continue;
                Py_ssize_t d = mm->d, c0 = d * p / P, c1 = d * (p + 1) / P;
                for (Py_ssize_t t = 0; t < T; ++t) {
                    float *yt = mm->yf + t * d;
                    for (Py_ssize_t c = c0; c < c1; ++c) {
                        float s = mm->b ? mm->b[c] : 0.0f;
                        for (int q = 0; q < P; ++q) s += mm->part[((Py_ssize_t)q * T + t) * d + c];
                        yt[c] = s;
                    }
                }
            }
        }
    }
}

/* y = h WT[idx] + bias for one weight (h [T, k] the values of the k active rows idx): the down step of
 * sparse_gated_mlp and sparse_down */
static void rows_axpy(const void *WT, int dtype, const float *h, const int64_t *idx, float *y, const float *bias,
                      Py_ssize_t d, Py_ssize_t k, Py_ssize_t T, int nthreads) {
    int P = k * d * T > PARALLEL_MIN && nthreads > 1 ? nthreads : 1;
    float *part = P > 1 ? (float *)malloc((size_t)P * (size_t)(T * d) * sizeof(float)) : NULL;
    if (part == NULL) P = 1; /* no memory for partial sums: one thread */
    Member m = {WT, bias, y, d, dtype, 0.0f, k, (int64_t *)idx, (float *)h, part, y};
    sparse_rows_run(&m, 1, T, P);
    free(part);
}


/* the token count both sparse entry points accept (sets a Python error otherwise) */
static int tokens_ok(Py_ssize_t T) {
    if (T >= 1 && T <= MAX_T) return 1;
    PyErr_Format(PyExc_ValueError, "tokens per call must be in [1, %d], got %zd", MAX_T, T);
    return 0;
}

/* union of non-zero columns of a [T, n] float32 matrix into idx; returns k */
static Py_ssize_t union_nonzero(const float *a, Py_ssize_t T, Py_ssize_t n, int64_t *idx) {
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        int on = 0;
        for (Py_ssize_t t = 0; t < T; ++t) on |= a[t * n + i] != 0.0f;
        if (on) idx[k++] = i;
    }
    return k;
}

/* sparse_gated_mlp(x, wg, bg, wu, bu, wdt, bd, g, y, d, dff, T, max_active, act, dtype, io, nthreads) -> k or -1
 * wg == 0: the caller already wrote the gate pre-activation (with its bias) into g. act: 0 ReLU, 1 ReLU^2.
 * io: 0 = x and y float32, 1 = x and y bfloat16 (converted here, saving two torch dispatches per call). */
static PyObject *py_sparse_gated_mlp(PyObject *self, PyObject *args) {
    unsigned long long x, wg, bg, wu, bu, wdt, bd, g, y;
    Py_ssize_t d, dff, T, max_active;
    int act, dtype, io, nthreads;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKnnnniiii", &x, &wg, &bg, &wu, &bu, &wdt, &bd, &g, &y, &d, &dff, &T,
                          &max_active, &act, &dtype, &io, &nthreads))
        return NULL;
    if (!tokens_ok(T)) return NULL;
    Py_ssize_t k = 0;
    int64_t *ix = (int64_t *)malloc((size_t)dff * sizeof(int64_t));
    float *hf = (float *)malloc((size_t)(T * dff) * sizeof(float));
    float *io_buf = io ? (float *)malloc((size_t)(2 * T * d) * sizeof(float)) : NULL;
    if (ix == NULL || hf == NULL || (io && io_buf == NULL)) {
        free(ix);
        free(hf);
        free(io_buf);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    float *gf = (float *)g;
    const float *xf = (const float *)x;
    float *yf = (float *)y;
    if (io) { /* bfloat16 in and out: float32 copies of x and y in the scratch */
        for (Py_ssize_t i = 0; i < T * d; ++i) io_buf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xf = io_buf;
        yf = io_buf + T * d;
    }
    /* 1. dense gate + activation */
    if (wg) rows_dot((const void *)wg, dtype, xf, NULL, dff, d, T, (const float *)bg, gf, dff, nthreads);
    for (Py_ssize_t t = 0; t < T; ++t)
        for (Py_ssize_t i = 0; i < dff; ++i) {
            float v = gf[t * dff + i];
            v = v > 0.0f ? v : (v != v ? v : 0.0f);
            gf[t * dff + i] = act == 1 ? v * v : v;
        }
    /* 2. union of active neurons */
    k = union_nonzero(gf, T, dff, ix);
    if (k <= max_active) {
        /* 3. up rows of active neurons, times the gate */
        rows_dot((const void *)wu, dtype, xf, ix, k, d, T, (const float *)bu, hf, k, nthreads);
        for (Py_ssize_t t = 0; t < T; ++t)
            for (Py_ssize_t j = 0; j < k; ++j) hf[t * k + j] *= gf[t * dff + ix[j]];
        /* 4. down: y = h @ WdT[idx] + bd */
        rows_axpy((const void *)wdt, dtype, hf, ix, yf, (const float *)bd, d, k, T, nthreads);
        if (io)
            for (Py_ssize_t i = 0; i < T * d; ++i) ((uint16_t *)y)[i] = f32_to_bf16(yf[i]);
    }
    Py_END_ALLOW_THREADS
    free(ix);
    free(hf);
    free(io_buf);
    return PyLong_FromSsize_t(k <= max_active ? k : -1);
}

/* union of columns of a [T, n] float32 matrix with |a| > thr for some token into idx; returns k (NaN counts as
 * active, as in union_nonzero) */
static Py_ssize_t union_above(const float *a, Py_ssize_t T, Py_ssize_t n, float thr, int64_t *idx) {
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        int on = 0;
        for (Py_ssize_t t = 0; t < T; ++t) on |= !(fabsf(a[t * n + i]) <= thr);
        if (on) idx[k++] = i;
    }
    return k;
}

/* sparse_down(h, wt, b, y, dff, d, T, max_active, dtype, nthreads, thr) -> k or -1: y = m(h)[:, idx] WT[idx] + b,
 * m(h) = h where |h| > thr, else 0 (thr = 0: the exact zeros of a ReLU hidden; thr > 0: TEAL's magnitude
 * threshold on a linear layer's input) */
static PyObject *py_sparse_down(PyObject *self, PyObject *args) {
    unsigned long long h, wt, b, y;
    Py_ssize_t dff, d, T, max_active;
    int dtype, nthreads;
    double thr_d = 0.0;
    if (!PyArg_ParseTuple(args, "KKKKnnnnii|d", &h, &wt, &b, &y, &dff, &d, &T, &max_active, &dtype, &nthreads,
                          &thr_d))
        return NULL;
    const float thr = (float)thr_d;
    if (!tokens_ok(T)) return NULL;
    Py_ssize_t k = 0;
    int64_t *ix = (int64_t *)malloc((size_t)dff * sizeof(int64_t));
    float *hk = (float *)malloc((size_t)(T * dff) * sizeof(float));
    if (ix == NULL || hk == NULL) {
        free(ix);
        free(hk);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    const float *hf = (const float *)h;
    k = thr > 0.0f ? union_above(hf, T, dff, thr, ix) : union_nonzero(hf, T, dff, ix);
    if (k <= max_active) {
        for (Py_ssize_t t = 0; t < T; ++t)
            for (Py_ssize_t j = 0; j < k; ++j) {
                float v = hf[t * dff + ix[j]];
                hk[t * k + j] = fabsf(v) <= thr ? 0.0f : v; /* another token's value kept the row */
            }
        rows_axpy((const void *)wt, dtype, hk, ix, (float *)y, (const float *)b, d, k, T, nthreads);
    }
    Py_END_ALLOW_THREADS
    free(ix);
    free(hk);
    return PyLong_FromSsize_t(k <= max_active ? k : -1);
}

/* ---------------------------------------------------------------------------------------------------------------
 * 3. Input-sparse linear layers that read one input, in one call (q/k/v; gate/up; any single layer)
 *
 *   sparse_rows:  for each member m: idx_m = union over tokens of {i : |x[t, i]| > thr_m},
 *                 y_m = x[:, idx_m] WT_m[idx_m] + b_m   (the machinery of section 2's down step) */

/* sparse_rows(x, T, d_in, max_active, io, nthreads, parallel_min, ys, members) -> tuple of k (or -1: more than
 * max_active rows active; that member's output is left unwritten and the caller finishes it densely). members: a
 * tuple of (w, b, d_out, dtype, thr); ys: the members' outputs [T, d_out_m]. x: float32 [T, d_in], or bfloat16
 * when io (then the outputs are bfloat16 too). The threads split the work only above parallel_min multiply-adds
 * (below it, waking a team costs more than a second thread gains). */
#define MAX_MEMBERS 8
static PyObject *py_sparse_rows(PyObject *self, PyObject *args) {
    unsigned long long x;
    Py_ssize_t T, din, max_active, parallel_min;
    int io, nthreads;
    PyObject *ys, *members;
    if (!PyArg_ParseTuple(args, "KnnniinO!O!", &x, &T, &din, &max_active, &io, &nthreads, &parallel_min,
                          &PyTuple_Type, &ys, &PyTuple_Type, &members))
        return NULL;
    if (!tokens_ok(T)) return NULL;
    Py_ssize_t nm = PyTuple_Size(members);
    if (nm < 1 || nm > MAX_MEMBERS || PyTuple_Size(ys) != nm) {
        PyErr_Format(PyExc_ValueError, "sparse_rows takes 1 to %d members and one output each, got %zd and %zd",
                     MAX_MEMBERS, nm, PyTuple_Size(ys));
        return NULL;
    }
    Member m[MAX_MEMBERS];
    Py_ssize_t dsum = 0;
    for (Py_ssize_t i = 0; i < nm; ++i) {
        unsigned long long w, b;
        double thr;
        if (!PyArg_ParseTuple(PyTuple_GetItem(members, i), "KKnid", &w, &b, &m[i].d, &m[i].dtype, &thr))
            return NULL;
        m[i].w = (const void *)w;
        m[i].b = (const float *)b;
        m[i].y = PyLong_AsVoidPtr(PyTuple_GetItem(ys, i));
        if (m[i].y == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "sparse_rows: a null output pointer");
            return NULL;
        }
        m[i].thr = (float)thr;
        dsum += m[i].d;
    }
    int parts = nthreads > 1 ? nthreads : 1;
    /* one allocation: x as float32 (io), per member idx [d_in] and h [T, d_in], partials [P, T, d], io outputs */
    size_t bytes = (size_t)(io ? T * din : 0) * sizeof(float) + (size_t)nm * (size_t)din * sizeof(int64_t) +
                   (size_t)nm * (size_t)(T * din) * sizeof(float) +
                   (size_t)(parts > 1 ? parts : 0) * (size_t)(T * dsum) * sizeof(float) +
                   (size_t)(io ? T * dsum : 0) * sizeof(float);
    char *scratch = (char *)malloc(bytes ? bytes : 1);
    if (scratch == NULL) return PyErr_NoMemory();
    PyObject *result = PyTuple_New(nm);
    if (result == NULL) {
        free(scratch);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    char *at = scratch;
    const float *xf = (const float *)x;
    if (io) {
        float *xc = (float *)at;
        for (Py_ssize_t i = 0; i < T * din; ++i) xc[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xf = xc;
        at += (size_t)(T * din) * sizeof(float);
    }
    Py_ssize_t work = 0;
    for (Py_ssize_t i = 0; i < nm; ++i) {
        Member *mm = &m[i];
        mm->idx = (int64_t *)at;
        at += (size_t)din * sizeof(int64_t);
        mm->h = (float *)at;
        at += (size_t)(T * din) * sizeof(float);
        Py_ssize_t k = mm->thr > 0.0f ? union_above(xf, T, din, mm->thr, mm->idx) : union_nonzero(xf, T, din, mm->idx);
        if (k > max_active) {
            mm->k = -1;
            continue;
        }
        mm->k = k;
        for (Py_ssize_t t = 0; t < T; ++t)
            for (Py_ssize_t j = 0; j < k; ++j) {
                float v = xf[t * din + mm->idx[j]];
                mm->h[t * k + j] = fabsf(v) <= mm->thr ? 0.0f : v;
            }
        work += k * mm->d * T;
    }
    int P = work > parallel_min ? parts : 1;
    for (Py_ssize_t i = 0; i < nm; ++i) {
        Member *mm = &m[i];
        mm->part = P > 1 ? (float *)at : NULL;
        if (parts > 1) at += (size_t)parts * (size_t)(T * mm->d) * sizeof(float);
    }
    for (Py_ssize_t i = 0; i < nm; ++i) {
        Member *mm = &m[i];
        if (io) {
            mm->yf = (float *)at;
            at += (size_t)(T * mm->d) * sizeof(float);
        } else {
            mm->yf = (float *)mm->y;
        }
    }
    sparse_rows_run(m, (int)nm, T, P);
    if (io)
        for (Py_ssize_t i = 0; i < nm; ++i)
            if (m[i].k >= 0)
                for (Py_ssize_t j = 0; j < T * m[i].d; ++j) ((uint16_t *)m[i].y)[j] = f32_to_bf16(m[i].yf[j]);
    Py_END_ALLOW_THREADS
    free(scratch);
    for (Py_ssize_t i = 0; i < nm; ++i) PyTuple_SetItem(result, i, PyLong_FromSsize_t(m[i].k));
    return result;
}

/* dense_rows(x, w, b, y, n, d, T, dtype, nthreads): y[t, j] = w[j] . x[t] + b[j] for all n rows of w [n, d] (the
 * natural nn.Linear layout, rows contiguous): a dense matrix-vector product for few tokens, rows split between the
 * threads (the LM head of a decode step). x, b, y float32; w float32 or bfloat16. */
static PyObject *py_dense_rows(PyObject *self, PyObject *args) {
    unsigned long long x, w, b, y;
    Py_ssize_t n, d, T;
    int dtype, nthreads;
    if (!PyArg_ParseTuple(args, "KKKKnnnii", &x, &w, &b, &y, &n, &d, &T, &dtype, &nthreads)) return NULL;
    if (!tokens_ok(T)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rows_dot((const void *)w, dtype, (const float *)x, NULL, n, d, T, (const float *)b, (float *)y, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_has_openmp(PyObject *self, PyObject *args) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

/* the native decode step (decode.c) */
PyObject *hf_stochact_decode_plan(PyObject *self, PyObject *args);
PyObject *hf_stochact_decode_step(PyObject *self, PyObject *args);

static PyMethodDef methods[] = {
    {"draw_forward", py_draw_forward, METH_VARARGS,
     "draw_forward(x, y, n, seed, threshold, negative_only, dtype, nthreads): y <- m ? y : relu(x)"},
    {"draw_backward", py_draw_backward, METH_VARARGS,
     "draw_backward(x, g, gx, n, seed, threshold, negative_only, dtype, nthreads): gx <- m ? gx : relu'(x) g"},
    {"sparse_gated_mlp", py_sparse_gated_mlp, METH_VARARGS,
     "sparse_gated_mlp(x, wg, bg, wu, bu, wdt, bd, g, y, d, dff, T, max_active, act, dtype, io, nthreads) -> k or -1"},
    {"sparse_down", py_sparse_down, METH_VARARGS,
     "sparse_down(h, wt, b, y, dff, d, T, max_active, dtype, nthreads) -> k or -1"},
    {"sparse_rows", py_sparse_rows, METH_VARARGS,
     "sparse_rows(x, T, d_in, max_active, io, nthreads, parallel_min, ys, ((w, b, d_out, dtype, thr), ...)) -> ks"},
    {"dense_rows", py_dense_rows, METH_VARARGS,
     "dense_rows(x, w, b, y, n, d, T, dtype, nthreads): y = x w^T + b, rows of w contiguous"},
    {"decode_plan", hf_stochact_decode_plan, METH_VARARGS,
     "decode_plan(model_spec, layer_specs) -> plan capsule (hf_stochact/kernels/native.py builds the specs)"},
    {"decode_step", hf_stochact_decode_step, METH_VARARGS,
     "decode_step(plan, token, rope, cache, seed, draws, logits, nthreads) -> 0, or -1 when a cache is full"},
    {"has_openmp", py_has_openmp, METH_NOARGS, "whether the loops were built with OpenMP"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
