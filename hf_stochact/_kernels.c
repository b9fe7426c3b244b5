/*
 * hf_stochact._kernels: the two loops of the fast SiLU/ReLU draw on CPU, float32 and bfloat16.
 *
 * torch's CPU random generator is serial and costs ~8 ns per float; the blend needs bool ops that torch does not
 * vectorise well. These loops replace both with one pass each:
 *
 *   draw_blend:  m = (uniform16(seed, i) < threshold) [& x < 0 for the paper variant]
 *                y[i] = m ? silu_x[i] : relu(x[i]);  mask[i] = m
 *   blend_grad:  gx[i] = mask[i] ? silu_grad[i] : (x[i] > 0 ? g[i] : 0)
 *
 * SiLU and its gradient come from torch (vectorised); y and gx are written in place over them.
 * uniform16 is counter-based (SplitMix64 of seed and i / 4, one 16-bit slice per element), so the mask depends
 * only on the seed (drawn from torch's generator) and the element index: the same on any thread count, and
 * gradient checkpointing, which restores torch's RNG state, redraws the same seed and hence the same mask.
 *
 * Built by `pip install` as a plain CPython extension (no torch headers); pointers come from tensor.data_ptr().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Compile the hot loops for several x86 levels and pick one at load time (ifunc): the 64-bit multiplies of the
 * hash vectorise with AVX-512, the selects with AVX2; other CPUs get the portable build. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Branch-free selects on the bit patterns (the mask is random: branches would mispredict half the time).
 * sel(m, a, b) = m ? a : b for m in {0, 1}. relu keeps x where x > 0 or x is NaN (torch's semantics), else +0. */
static inline uint32_t sel32(uint32_t m, uint32_t a, uint32_t b) { return (a & (0u - m)) | (b & (m - 1u)); }
static inline uint16_t sel16(uint32_t m, uint16_t a, uint16_t b) { return (uint16_t)sel32(m, a, b); }

#define GOLDEN 0x9e3779b97f4a7c15ULL

/* Uniform 16-bit draws for elements [start, start + BLOCK): element i takes bits 16*(i%4) .. of word i/4
 * (little-endian view of the words as uint16). Two simple loops per block so the compiler vectorises both. */
#define BLOCK 1024
#define PARALLEL_MIN (1 << 16) /* below this many elements one thread is faster than waking a team */
static inline void draws(uint64_t seed, Py_ssize_t start, uint64_t words[BLOCK / 4]) {
    uint64_t w0 = (uint64_t)(start / 4);
    for (int w = 0; w < BLOCK / 4; ++w) words[w] = splitmix64(seed + (w0 + (uint64_t)w + 1) * GOLDEN);
}

MULTIVERSION static void draw_blend_f32(const float *x, float *y, uint8_t *mask, Py_ssize_t n, uint64_t seed,
                           uint32_t threshold, int negative_only, int nthreads) {
    const uint32_t *xb = (const uint32_t *)x;
    uint32_t *yb = (uint32_t *)y;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > PARALLEL_MIN)
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        uint64_t words[BLOCK / 4];
        const uint16_t *r = (const uint16_t *)words;
        draws(seed, start, words);
        Py_ssize_t len = n - start < BLOCK ? n - start : BLOCK;
        for (Py_ssize_t j = 0; j < len; ++j) {
            Py_ssize_t i = start + j;
            float xi = x[i];
            uint32_t m = (uint32_t)(r[j] < threshold) & (negative_only ? (uint32_t)(xi < 0.0f) : 1u);
            uint32_t keep = (uint32_t)(xi > 0.0f) | (uint32_t)(xi != xi);
            mask[i] = (uint8_t)m;
            yb[i] = sel32(m, yb[i], xb[i] & (0u - keep));
        }
    }
}

MULTIVERSION static void draw_blend_bf16(const uint16_t *x, uint16_t *y, uint8_t *mask, Py_ssize_t n, uint64_t seed,
                            uint32_t threshold, int negative_only, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > PARALLEL_MIN)
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        uint64_t words[BLOCK / 4];
        const uint16_t *r = (const uint16_t *)words;
        draws(seed, start, words);
        Py_ssize_t len = n - start < BLOCK ? n - start : BLOCK;
        for (Py_ssize_t j = 0; j < len; ++j) {
            Py_ssize_t i = start + j;
            float xf = bf16_to_f32(x[i]);
            uint32_t m = (uint32_t)(r[j] < threshold) & (negative_only ? (uint32_t)(xf < 0.0f) : 1u);
            uint32_t keep = (uint32_t)(xf > 0.0f) | (uint32_t)(xf != xf);
            mask[i] = (uint8_t)m;
            y[i] = sel16(m, y[i], (uint16_t)(x[i] & (0u - keep)));
        }
    }
}

MULTIVERSION static void blend_grad_f32(const float *x, const float *g, const uint8_t *mask, float *gx, Py_ssize_t n,
                           int nthreads) {
    const uint32_t *gb = (const uint32_t *)g;
    uint32_t *ob = (uint32_t *)gx;
#pragma omp parallel for simd schedule(static) num_threads(nthreads) if (n > PARALLEL_MIN)
    for (Py_ssize_t i = 0; i < n; ++i) {
        uint32_t m = mask[i], pos = (uint32_t)(x[i] > 0.0f);
        ob[i] = sel32(m, ob[i], gb[i] & (0u - pos));
    }
}

MULTIVERSION static void blend_grad_bf16(const uint16_t *x, const uint16_t *g, const uint8_t *mask, uint16_t *gx, Py_ssize_t n,
                            int nthreads) {
#pragma omp parallel for simd schedule(static) num_threads(nthreads) if (n > PARALLEL_MIN)
    for (Py_ssize_t i = 0; i < n; ++i) {
        uint32_t m = mask[i], pos = (uint32_t)(bf16_to_f32(x[i]) > 0.0f);
        gx[i] = sel16(m, gx[i], (uint16_t)(g[i] & (0u - pos)));
    }
}

static PyObject *py_draw_blend(PyObject *self, PyObject *args) {
    unsigned long long x, y, mask, seed;
    Py_ssize_t n;
    unsigned int threshold;
    int negative_only, dtype, nthreads;
    if (!PyArg_ParseTuple(args, "KKKnKIpii", &x, &y, &mask, &n, &seed, &threshold, &negative_only, &dtype,
                          &nthreads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (dtype == 0)
        draw_blend_f32((const float *)x, (float *)y, (uint8_t *)mask, n, seed, threshold, negative_only, nthreads);
    else
        draw_blend_bf16((const uint16_t *)x, (uint16_t *)y, (uint8_t *)mask, n, seed, threshold, negative_only, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_blend_grad(PyObject *self, PyObject *args) {
    unsigned long long x, g, mask, gx;
    Py_ssize_t n;
    int dtype, nthreads;
    if (!PyArg_ParseTuple(args, "KKKKnii", &x, &g, &mask, &gx, &n, &dtype, &nthreads)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (dtype == 0)
        blend_grad_f32((const float *)x, (const float *)g, (const uint8_t *)mask, (float *)gx, n, nthreads);
    else
        blend_grad_bf16((const uint16_t *)x, (const uint16_t *)g, (const uint8_t *)mask, (uint16_t *)gx, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Sparse FFN loops (hf_stochact.sparse): only the rows of active neurons are read, straight from the weights,
 * with no gathered copy (large gathered copies page-fault on every call: BASELINE.md).
 *
 *   gather_dot:  out[t, j] = sum_c W[idx[j], c] * x[t, c]        (the up projection, W = [d_ff, d])
 *   gather_axpy: y[t, c]   = sum_j h[t, j] * WT[idx[j], c]       (the down projection, WT = W_down^T = [d_ff, d])
 *
 * x, h, out, y are float32; W/WT are float32 (dtype 0) or bfloat16 (dtype 1), rows contiguous. T is small
 * (decode); each weight row is read once and used for all T tokens.
 */
#define MAX_T 16


/* ---------------------------------------------------------------------------------------------------------------
 * The whole sparse gated MLP of a decode step in one call (Python dispatch per torch op costs more than the
 * memory traffic of a small MLP):
 *
 *   g[t, i]  = act(Wg[i] . x[t] + bg[i])          all i (the gate stays dense), act = ReLU (0) or ReLU^2 (1)
 *   idx      = { i : g[t, i] != 0 for some t }     union over the T tokens, k = |idx|
 *   if k > max_active: return -1                   (g is left in g_out for the caller's dense fallback)
 *   h[t, j]  = g[t, idx_j] * (Wu[idx_j] . x[t] + bu[idx_j])
 *   y[t, :]  = sum_j h[t, j] WdT[idx_j, :] + bd
 *
 * x, biases, g_out, h, y: float32. Weights: float32 (dtype 0) or bfloat16 (dtype 1), rows contiguous.
 * Bias pointers may be 0. Returns k.
 */
/* Rows are processed R at a time: R independent memory streams per thread (one row at a time leaves the memory
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
                for (int r = 0; r < R; ++r) __builtin_prefetch(nxt[r] + c0, 0, 3);                           \
            for (int r = 0; r < R; ++r) {                                                                      \
                const TYPE *row = rows[r] + c0;                                                                \
                _Pragma("omp simd") for (int l = 0; l < W16; ++l) acc[r][l] += LOAD(row, l) * x[c0 + l];       \
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

/* y[t, :] = sum_j h[t, j] * WT[idx[j], :] (+ bias). Columns are split across threads, one contiguous slice each
 * (a multiple of 16 floats), so every gathered row is read as one long run per thread and no reduction between
 * threads is needed; y[:, slice] stays in L1/L2 while the rows stream through, R rows per pass. */
#define DEFINE_AXPYR(NAME, TYPE, LOAD, LINE)                                                                      \
    static inline void NAME(const TYPE *WT, const float *h, const int64_t *idx, float *y, Py_ssize_t d,        \
                            Py_ssize_t k, Py_ssize_t T, Py_ssize_t c0, Py_ssize_t c1) {                        \
        Py_ssize_t groups = (k + R - 1) / R;                                                                   \
        for (Py_ssize_t g = 0; g < groups; ++g) {                                                              \
            const TYPE *rows[R], *nxt[R];                                                                      \
            group_rows((const char *)WT, d * sizeof(TYPE), idx, k, g, (const char **)rows);                    \
            int pf = g + 1 < groups;                                                            \
            if (pf) group_rows((const char *)WT, d * sizeof(TYPE), idx, k, g + 1, (const char **)nxt);         \
            for (Py_ssize_t t = 0; t < T; ++t) {                                                               \
                float hr[R];                                                                                   \
                for (int r = 0; r < R; ++r) hr[r] = g * R + r < k ? h[t * k + g * R + r] : 0.0f;                \
                float *yt = y + t * d;                                                                         \
                const TYPE *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];                         \
                for (Py_ssize_t a = c0; a < c1; a += W16) {                                                    \
                    Py_ssize_t b = a + W16 < c1 ? a + W16 : c1;                                                \
                    if (pf && t == 0 && a % LINE == 0)                                                         \
                        for (int r = 0; r < R; ++r) __builtin_prefetch(nxt[r] + a, 0, 3);                     \
                    _Pragma("omp simd") for (Py_ssize_t c = a; c < b; ++c) yt[c] +=                            \
                        hr[0] * LOAD(r0, c) + hr[1] * LOAD(r1, c) + hr[2] * LOAD(r2, c) + hr[3] * LOAD(r3, c); \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }
DEFINE_AXPYR(axpyr_f32, float, LOAD_F32, 16)
DEFINE_AXPYR(axpyr_bf16, uint16_t, LOAD_BF16, 32)

MULTIVERSION static void rows_axpy(const void *WT, int dtype, const float *h, const int64_t *idx, float *y,
                                   const float *bias, Py_ssize_t d, Py_ssize_t k, Py_ssize_t T, int nthreads) {
    int parts = k * d > PARALLEL_MIN ? nthreads : 1;
    Py_ssize_t slice = ((d + parts - 1) / parts + W16 - 1) / W16 * W16;
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int p = 0; p < parts; ++p) {
        Py_ssize_t c0 = p * slice, c1 = c0 + slice < d ? c0 + slice : d;
        for (Py_ssize_t t = 0; t < T; ++t)
            for (Py_ssize_t c = c0; c < c1; ++c) y[t * d + c] = bias ? bias[c] : 0.0f;
        if (dtype == 0)
            axpyr_f32((const float *)WT, h, idx, y, d, k, T, c0, c1);
        else
            axpyr_bf16((const uint16_t *)WT, h, idx, y, d, k, T, c0, c1);
    }
}

static PyObject *py_gather(PyObject *self, PyObject *args, int axpy) {
    unsigned long long w, a, idx, out;
    Py_ssize_t d, k, T;
    int dtype, nthreads;
    if (!PyArg_ParseTuple(args, "KKKKnnnii", &w, &a, &idx, &out, &d, &k, &T, &dtype, &nthreads)) return NULL;
    if (T < 1 || T > MAX_T) {
        PyErr_Format(PyExc_ValueError, "T (tokens) must be in [1, %d], got %zd", MAX_T, T);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (axpy)
        rows_axpy((const void *)w, dtype, (const float *)a, (const int64_t *)idx, (float *)out, NULL, d, k, T,
                  nthreads);
    else
        rows_dot((const void *)w, dtype, (const float *)a, (const int64_t *)idx, k, d, T, NULL, (float *)out, k,
                 nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_gather_dot(PyObject *self, PyObject *args) { return py_gather(self, args, 0); }
static PyObject *py_gather_axpy(PyObject *self, PyObject *args) { return py_gather(self, args, 1); }

static PyObject *py_sparse_mlp(PyObject *self, PyObject *args) {
    unsigned long long x, wg, bg, wu, bu, wdt, bd, g, idx, h, y;
    Py_ssize_t d, dff, T, max_active;
    int act, dtype, nthreads;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKKnnnniii", &x, &wg, &bg, &wu, &bu, &wdt, &bd, &g, &idx, &h, &y, &d, &dff,
                          &T, &max_active, &act, &dtype, &nthreads))
        return NULL;
    if (T < 1 || T > MAX_T) {
        PyErr_Format(PyExc_ValueError, "T (tokens) must be in [1, %d], got %zd", MAX_T, T);
        return NULL;
    }
    Py_ssize_t k = 0;
    Py_BEGIN_ALLOW_THREADS
    float *gf = (float *)g, *hf = (float *)h, *yf = (float *)y;
    int64_t *ix = (int64_t *)idx;
    const float *xf = (const float *)x;
    /* 1. dense gate + activation (wg == 0: the caller already wrote the gate pre-activation into g) */
    if (wg) rows_dot((const void *)wg, dtype, xf, NULL, dff, d, T, (const float *)bg, gf, dff, nthreads);
    for (Py_ssize_t t = 0; t < T; ++t)
        for (Py_ssize_t i = 0; i < dff; ++i) {
            float v = gf[t * dff + i];
            v = v > 0.0f ? v : (v != v ? v : 0.0f);
            gf[t * dff + i] = act == 1 ? v * v : v;
        }
    /* 2. union of active neurons */
    for (Py_ssize_t i = 0; i < dff; ++i) {
        int on = 0;
        for (Py_ssize_t t = 0; t < T; ++t) on |= gf[t * dff + i] != 0.0f;
        if (on) ix[k++] = i;
    }
    if (k <= max_active) {
        /* 3. up rows of active neurons, times the gate */
        rows_dot((const void *)wu, dtype, xf, ix, k, d, T, (const float *)bu, hf, k, nthreads);
        for (Py_ssize_t t = 0; t < T; ++t)
            for (Py_ssize_t j = 0; j < k; ++j) hf[t * k + j] *= gf[t * dff + ix[j]];
        /* 4. down: y = h @ WdT[idx] + bd */
        rows_axpy((const void *)wdt, dtype, hf, ix, yf, (const float *)bd, d, k, T, nthreads);
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(k <= max_active ? k : -1);
}

static PyMethodDef methods[] = {
    {"draw_blend", py_draw_blend, METH_VARARGS,
     "draw_blend(x, y, mask, n, seed, threshold, negative_only, dtype, nthreads): y <- mask ? y : relu(x), mask drawn"},
    {"blend_grad", py_blend_grad, METH_VARARGS,
     "blend_grad(x, g, mask, gx, n, dtype, nthreads): gx <- mask ? gx : relu'(x) * g"},
    {"gather_dot", py_gather_dot, METH_VARARGS,
     "gather_dot(W, x, idx, out, d, k, T, dtype, nthreads): out[t, j] = W[idx[j]] . x[t]"},
    {"gather_axpy", py_gather_axpy, METH_VARARGS,
     "gather_axpy(WT, h, idx, y, d, k, T, dtype, nthreads): y[t] = sum_j h[t, j] WT[idx[j]]"},
    {"sparse_mlp", py_sparse_mlp, METH_VARARGS,
     "sparse_mlp(x, Wg, bg, Wu, bu, WdT, bd, g, idx, h, y, d, dff, T, max_active, act, dtype, nthreads) -> k or -1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
