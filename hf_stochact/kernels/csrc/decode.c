/*
 * The native decode step: one call into C per generated token runs every decoder layer of a pre-norm transformer
 * (Llama, Mistral, Qwen2/3, SmolLM, Gemma 2 layouts), the final norm and the LM head, reading the model's own
 * parameters and HF's static KV cache in place. Built and checked by hf_stochact/kernels/native.py (the only code
 * that passes pointers here) from a plan made by hf_stochact/runtime/native.py.
 *
 *   plan = decode_plan(model_spec, layer_specs)   a capsule owning the plan (pointers, sizes: no tensor data)
 *   decode_step(plan, token, rope, cache, seeds, logits, nthreads) -> 0, or -1 when the cache is full
 *
 * Per layer, with x the residual stream (float32 throughout, whatever the weights' dtype):
 *
 *   a = n1(x); q, k, v = Wq a, Wk a, Wv a (+ biases); q, k <- qk-norms, RoPE; k, v -> cache at the layer's length
 *   o = Wo attention(q, cache)  (GQA, scale, optional tanh soft-cap, sliding window = the cache's own capacity)
 *   x += n2(o)                  (n2: Gemma 2's post-attention norm, identity elsewhere)
 *   m = n3(x); h = act(Wg m) * (Wu m); x += n4(Wd h)
 *
 * Linear layers come in two layouts: "rows" (nn.Linear's [out, in], a dot product per output, rows split between
 * the threads) and "input rows" ([in, out], what sparsify stores for thresholded layers and W_down: only the rows
 * of inputs with |x| > threshold are read, split between the threads with one partial sum each, added after a
 * barrier). A gated ReLU FFN whose down projection is in input rows reads only the up and down rows of its active
 * neurons (the gate is computed densely): exact ReLU sparsity.
 *
 * Threads: one OpenMP region per step; work-sharing loops end in the region's barriers (about seven per layer).
 * Scratch memory is allocated per call; the plan is read-only after it is built, so threads may share it.
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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define NMULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NMULTIVERSION
#endif
#if defined(_MSC_VER)
#define NPRAGMA(x) __pragma(x)
#else
#define NPRAGMA(x) _Pragma(#x)
#endif
#if defined(__GNUC__) || defined(__clang__)
#define NSIMD NPRAGMA(omp simd)
#define NPREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define NSIMD
#define NPREFETCH(p) ((void)0)
#endif

#define MAX_THREADS 64
#define ROWS 4   /* rows per pass of a dot-product loop */
#define LANES 16 /* accumulators per row */

enum { LAYOUT_ROWS = 0, LAYOUT_INPUT_ROWS = 1 };
enum { NORM_NONE = 0, NORM_RMS = 1, NORM_RMS_ONE_PLUS = 2 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2, ACT_RELU = 3, ACT_RELU2 = 4 };

typedef struct {
    const void *w;   /* NULL: absent */
    const float *b;  /* float32 bias or NULL */
    int dtype;       /* 0 float32, 1 bfloat16 */
    int layout;      /* LAYOUT_ROWS [dout, din] or LAYOUT_INPUT_ROWS [din, dout] */
    Py_ssize_t din, dout;
    float thr;       /* input rows: inputs with |x| <= thr skipped; thr < 0: every input row read */
    const float *rot; /* NULL, or R [din, din] float32: the layer reads x R (rotated thresholds) */
} Lin;

typedef struct {
    const void *w; /* NULL with kind NORM_NONE */
    int dtype, kind;
    float eps;
    Py_ssize_t d;
} Norm;

typedef struct {
    Norm n1, n2, n3, n4, qn, kn;
    Lin q, k, v, o, gate, up, down;
    int heads, kv_heads, head_dim, act, sparse_ffn, rope;
    float scale, softcap;
} Layer;

typedef struct {
    int n_layers, n_rope, rope_dim;
    Py_ssize_t d, vocab, max_din, max_dout, max_group, dff; /* max_group: the largest sum of a group's outputs */
    const void *embed;
    int embed_dtype;
    float embed_scale, logit_softcap;
    Norm final_norm;
    Lin head;
    Layer *layers;
} Plan;

static inline float nbf16(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t nto_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

static inline float load_w(const void *w, int dtype, Py_ssize_t i) {
    return dtype == 0 ? ((const float *)w)[i] : nbf16(((const uint16_t *)w)[i]);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Kernels (compiled for AVX-512, AVX2 and baseline x86-64, chosen at load time; portable C elsewhere) */

/* out[j - r0] = W[row(j)] . x + b[row(j)] for r0 <= j < r1, row(j) = idx ? idx[j] : j, rows of W [n, d]. One row at
 * a time, in memory order (a dense matrix is then one long sequential stream, which the hardware prefetcher follows
 * at full speed; x stays in L1), with 4 x LANES independent accumulators (no FMA latency chain), the row 2 KiB ahead
 * prefetched for gathered rows. */
#define UNROLL 4
#define DEFINE_DOT_ROWS(NAME, TYPE, LOAD)                                                                         \
    NMULTIVERSION static void NAME(const TYPE *W, const float *x, Py_ssize_t d, const int32_t *idx, Py_ssize_t r0, \
                                   Py_ssize_t r1, const float *b, float *out) {                                \
        const Py_ssize_t step = UNROLL * LANES, dv = d / step * step;                                          \
        for (Py_ssize_t j = r0; j < r1; ++j) {                                                                 \
            Py_ssize_t row = idx ? idx[j] : j;                                                                 \
            const TYPE *w = W + row * d;                                                                       \
            if (idx && j + 1 < r1)                                                                             \
                for (Py_ssize_t c = 0; c < d; c += 64 / (Py_ssize_t)sizeof(TYPE))                              \
                    NPREFETCH(W + (Py_ssize_t)idx[j + 1] * d + c);                                             \
            float acc[UNROLL][LANES];                                                                          \
            for (int u = 0; u < UNROLL; ++u)                                                                   \
                for (int l = 0; l < LANES; ++l) acc[u][l] = 0.0f;                                              \
            for (Py_ssize_t c = 0; c < dv; c += step)                                                          \
                for (int u = 0; u < UNROLL; ++u) {                                                             \
                    const TYPE *wu = w + c + u * LANES;                                                        \
                    const float *xu = x + c + u * LANES;                                                       \
                    NSIMD for (int l = 0; l < LANES; ++l) acc[u][l] += LOAD(wu, l) * xu[l];                    \
                }                                                                                              \
            float s = 0.0f;                                                                                    \
            for (Py_ssize_t c = dv; c < d; ++c) s += LOAD(w, c) * x[c];                                        \
            for (int u = 0; u < UNROLL; ++u)                                                                   \
                for (int l = 0; l < LANES; ++l) s += acc[u][l];                                                \
            out[j - r0] = s + (b ? b[row] : 0.0f);                                                             \
        }                                                                                                      \
    }
#define NLOAD_F32(p, i) ((p)[i])
#define NLOAD_BF16(p, i) nbf16((p)[i])
DEFINE_DOT_ROWS(dot_rows_f32, float, NLOAD_F32)
DEFINE_DOT_ROWS(dot_rows_bf16, uint16_t, NLOAD_BF16)

/* bfloat16 rows with AVX-512 (x86-64 GCC/Clang, chosen at run time): a 64-byte line holds 32 weights; shifting
 * each 32-bit lane left by 16 gives the even-indexed weights as float32, masking the low 16 bits the odd-indexed
 * ones (both exact), which multiply x's even and odd elements (deinterleaved once per call): one load, one shift,
 * one and, two FMAs per line. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_MSC_VER)
#include <immintrin.h>
#define HAVE_DECODE_AVX512 1
#ifndef PF_BYTES
#define PF_BYTES 1024 /* software prefetch distance of the dot products (a row's continuation or the next row) */
#endif
#define PF_F32 (PF_BYTES / 4)
#define PF_BF16 (PF_BYTES / 2)
__attribute__((target("avx512f,avx512bw"))) static void dot_rows_bf16_avx512(
    const uint16_t *W, const float *xe, const float *xo, const float *x, Py_ssize_t d, const int32_t *idx,
    Py_ssize_t r0, Py_ssize_t r1, const float *b, float *out) {
    const Py_ssize_t dv = d / 64 * 64;
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    for (Py_ssize_t j = r0; j < r1; ++j) {
        Py_ssize_t row = idx ? idx[j] : j;
        const uint16_t *w = W + row * d;
        if (idx && j + 1 < r1)
            for (Py_ssize_t c = 0; c < d; c += 32) NPREFETCH(W + (Py_ssize_t)idx[j + 1] * d + c);
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (Py_ssize_t c = 0; c < dv; c += 64) {
            NPREFETCH(w + c + PF_BF16);
            NPREFETCH(w + c + PF_BF16 + 32);
            __m512i v0 = _mm512_loadu_si512((const void *)(w + c));
            __m512i v1 = _mm512_loadu_si512((const void *)(w + c + 32));
            a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), _mm512_loadu_ps(xe + c / 2), a0);
            a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v0, hi)), _mm512_loadu_ps(xo + c / 2), a1);
            a2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), _mm512_loadu_ps(xe + c / 2 + 16),
                                 a2);
            a3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v1, hi)), _mm512_loadu_ps(xo + c / 2 + 16),
                                 a3);
        }
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (Py_ssize_t c = dv; c < d; ++c) s += nbf16(w[c]) * x[c];
        out[j - r0] = s + (b ? b[row] : 0.0f);
    }
}

__attribute__((target("avx512f"))) static void dot_rows_f32_avx512(const float *W, const float *x, Py_ssize_t d,
                                                                   const int32_t *idx, Py_ssize_t r0, Py_ssize_t r1,
                                                                   const float *b, float *out) {
    const Py_ssize_t dv = d / 64 * 64;
    for (Py_ssize_t j = r0; j < r1; ++j) {
        Py_ssize_t row = idx ? idx[j] : j;
        const float *w = W + row * d;
        if (idx && j + 1 < r1)
            for (Py_ssize_t c = 0; c < d; c += 16) NPREFETCH(W + (Py_ssize_t)idx[j + 1] * d + c);
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (Py_ssize_t c = 0; c < dv; c += 64) {
            NPREFETCH(w + c + PF_F32);
            NPREFETCH(w + c + PF_F32 + 16);
            NPREFETCH(w + c + PF_F32 + 32);
            NPREFETCH(w + c + PF_F32 + 48);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 16), _mm512_loadu_ps(x + c + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 32), _mm512_loadu_ps(x + c + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 48), _mm512_loadu_ps(x + c + 48), a3);
        }
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (Py_ssize_t c = dv; c < d; ++c) s += w[c] * x[c];
        out[j - r0] = s + (b ? b[row] : 0.0f);
    }
}

/* y[c] += sum_i h[i] * WT[idx[i]][c]: eight rows per pass (one load and store of y per eight weight rows), the next
 * eight rows prefetched; bfloat16 rows widened in registers (exact) */
#define DEFINE_AXPY8(NAME, TYPE, LOAD16, ROWBYTES_LINE)                                                            \
    __attribute__((target("avx512f,avx512bw"))) static void NAME(const TYPE *WT, const float *h, const int32_t *idx, \
                                                                 Py_ssize_t n, float *y, Py_ssize_t d) {          \
        const Py_ssize_t dv = d / 16 * 16;                                                                       \
        for (Py_ssize_t g = 0; g < n; g += 8) {                                                                  \
            const TYPE *r[8];                                                                                    \
            float hv[8];                                                                                         \
            for (int k = 0; k < 8; ++k) {                                                                        \
                int on = g + k < n;                                                                              \
                r[k] = WT + (Py_ssize_t)idx[on ? g + k : g] * d;                                                 \
                hv[k] = on ? h[g + k] : 0.0f;                                                                    \
            }                                                                                                    \
            const TYPE *nx[8]; /* the next pass's rows, prefetched line by line as this pass reads its lines */ \
            int pf = g + 8 < n;                                                                                  \
            for (int k = 0; k < 8; ++k)                                                                          \
                nx[k] = WT + (Py_ssize_t)idx[pf && g + 8 + k < n ? g + 8 + k : (pf ? g + 8 : g)] * d;            \
            __m512 h0 = _mm512_set1_ps(hv[0]), h1 = _mm512_set1_ps(hv[1]), h2 = _mm512_set1_ps(hv[2]),            \
                   h3 = _mm512_set1_ps(hv[3]), h4 = _mm512_set1_ps(hv[4]), h5 = _mm512_set1_ps(hv[5]),            \
                   h6 = _mm512_set1_ps(hv[6]), h7 = _mm512_set1_ps(hv[7]);                                        \
            for (Py_ssize_t c = 0; c < dv; c += 16) {                                                            \
                if (pf && c % ROWBYTES_LINE == 0)                                                                \
                    for (int k = 0; k < 8; ++k) NPREFETCH(nx[k] + c);                                            \
                __m512 a = _mm512_fmadd_ps(h0, LOAD16(r[0] + c), _mm512_loadu_ps(y + c));                        \
                __m512 b = _mm512_mul_ps(h1, LOAD16(r[1] + c));                                                  \
                a = _mm512_fmadd_ps(h2, LOAD16(r[2] + c), a);                                                    \
                b = _mm512_fmadd_ps(h3, LOAD16(r[3] + c), b);                                                    \
                a = _mm512_fmadd_ps(h4, LOAD16(r[4] + c), a);                                                    \
                b = _mm512_fmadd_ps(h5, LOAD16(r[5] + c), b);                                                    \
                a = _mm512_fmadd_ps(h6, LOAD16(r[6] + c), a);                                                    \
                b = _mm512_fmadd_ps(h7, LOAD16(r[7] + c), b);                                                    \
                _mm512_storeu_ps(y + c, _mm512_add_ps(a, b));                                                    \
            }                                                                                                    \
            for (Py_ssize_t c = dv; c < d; ++c) {                                                                \
                float acc = y[c];                                                                                \
                for (int k = 0; k < 8; ++k) acc += hv[k] * (float)LOADS(TYPE, r[k], c);                          \
                y[c] = acc;                                                                                      \
            }                                                                                                    \
        }                                                                                                        \
    }
#define LOADS(TYPE, p, c) (sizeof(TYPE) == 4 ? ((const float *)(const void *)(p))[c] : nbf16(((const uint16_t *)(const void *)(p))[c]))

__attribute__((target("avx512f,avx512bw"))) static inline __m512 ld16_f32(const float *p) { return _mm512_loadu_ps(p); }
DEFINE_AXPY8(axpy8_f32, float, ld16_f32, 16)

/* bfloat16, eight rows per pass without widening shuffles: each 64-byte line of a row (32 columns) gives its even
 * columns by a shift and its odd ones by a mask (as the dot product does), summed into y kept deinterleaved per
 * 32-column chunk ([16 even | 16 odd]; columns past the last full chunk in natural order): lin_input_reduce puts
 * them back in order (deinterleaved_partials()). */
__attribute__((target("avx512f,avx512bw"))) static void axpy8_bf16(const uint16_t *WT, const float *h,
                                                                   const int32_t *idx, Py_ssize_t n, float *y,
                                                                   Py_ssize_t d) {
    const Py_ssize_t dv = d / 32 * 32;
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    for (Py_ssize_t g = 0; g < n; g += 8) {
        const uint16_t *r[8], *nx[8];
        float hs[8];
        __m512 hv[8];
        int pf = g + 8 < n;
        for (int k = 0; k < 8; ++k) {
            int on = g + k < n;
            r[k] = WT + (Py_ssize_t)idx[on ? g + k : g] * d;
            hs[k] = on ? h[g + k] : 0.0f;
            hv[k] = _mm512_set1_ps(hs[k]);
            nx[k] = WT + (Py_ssize_t)idx[pf && g + 8 + k < n ? g + 8 + k : (pf ? g + 8 : g)] * d;
        }
        for (Py_ssize_t c = 0; c < dv; c += 32) {
            if (pf)
                for (int k = 0; k < 8; ++k) NPREFETCH(nx[k] + c);
            __m512 e = _mm512_loadu_ps(y + c), o = _mm512_loadu_ps(y + c + 16);
            for (int k = 0; k < 8; ++k) {
                __m512i v = _mm512_loadu_si512((const void *)(r[k] + c));
                e = _mm512_fmadd_ps(hv[k], _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), e);
                o = _mm512_fmadd_ps(hv[k], _mm512_castsi512_ps(_mm512_and_si512(v, hi)), o);
            }
            _mm512_storeu_ps(y + c, e);
            _mm512_storeu_ps(y + c + 16, o);
        }
        for (Py_ssize_t c = dv; c < d; ++c) {
            float acc = y[c];
            for (int k = 0; k < 8; ++k) acc += hs[k] * nbf16(r[k][c]);
            y[c] = acc;
        }
    }
}

static int decode_avx512(void) {
    static int cached = -1;
    if (cached < 0) {
        const char *off = getenv("HF_STOCHACT_NO_AVX512");
        __builtin_cpu_init();
        cached = (off == NULL || off[0] == '\0' || off[0] == '0') && __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512bw");
    }
    return cached;
}
#else
#define HAVE_DECODE_AVX512 0
static int decode_avx512(void) { return 0; }
#endif

/* y[c] += sum_i h[i] * WT[idx[i]][c] for i < n, rows of WT [*, d]: four rows per pass (the portable loop) */
#define DEFINE_AXPY4(NAME, TYPE, LOAD, LINE)                                                                      \
    NMULTIVERSION static void NAME(const TYPE *WT, const float *h, const int32_t *idx, Py_ssize_t n, float *y,  \
                                   Py_ssize_t d) {                                                               \
        Py_ssize_t i = 0;                                                                                        \
        for (; i + 4 <= n; i += 4) {                                                                             \
            const TYPE *r0 = WT + (Py_ssize_t)idx[i] * d, *r1 = WT + (Py_ssize_t)idx[i + 1] * d,                 \
                       *r2 = WT + (Py_ssize_t)idx[i + 2] * d, *r3 = WT + (Py_ssize_t)idx[i + 3] * d;             \
            if (i + 8 <= n)                                                                                      \
                for (Py_ssize_t c = 0; c < d; c += LINE)                                                         \
                    for (int k = 4; k < 8; ++k) NPREFETCH(WT + (Py_ssize_t)idx[i + k] * d + c);                  \
            const float h0 = h[i], h1 = h[i + 1], h2 = h[i + 2], h3 = h[i + 3];                                  \
            NSIMD for (Py_ssize_t c = 0; c < d; ++c) y[c] +=                                                     \
                h0 * LOAD(r0, c) + h1 * LOAD(r1, c) + h2 * LOAD(r2, c) + h3 * LOAD(r3, c);                       \
        }                                                                                                        \
        for (; i < n; ++i) {                                                                                     \
            const TYPE *r = WT + (Py_ssize_t)idx[i] * d;                                                         \
            const float hi = h[i];                                                                               \
            NSIMD for (Py_ssize_t c = 0; c < d; ++c) y[c] += hi * LOAD(r, c);                                    \
        }                                                                                                        \
    }
DEFINE_AXPY4(axpy_rows_f32n, float, NLOAD_F32, 16)
DEFINE_AXPY4(axpy_rows_bf16n, uint16_t, NLOAD_BF16, 32)

/* ---------------------------------------------------------------------------------------------------------------
 * Scratch (per call) */

typedef struct {
    float *x, *a, *q, *k, *v, *att, *o, *g, *u, *h, *y, *scores;
    float *part;     /* [P][max_dout] partial sums of input-rows layers */
    float *xeo;      /* [P][max_din + 64] each thread's deinterleaved input (bf16 AVX-512 kernel) */
    float *xr;       /* [3][max_din]: a group's rotated inputs */
    int32_t *idx;    /* [P][max_din]: each thread's list of active input rows */
    float *val;      /* [P][max_din]: their values */
    int32_t *ffn_idx; /* [dff] the active neurons of a sparse FFN */
    Py_ssize_t ffn_k;
    Py_ssize_t max_len, max_din;
} Scratch;

static inline void thread_range(Py_ssize_t n, int p, int P, Py_ssize_t *a, Py_ssize_t *b) {
    *a = n * p / P;
    *b = n * (p + 1) / P;
}

/* rows r0 <= j < r1 of the list (idx, or every row) of a rows-layout weight, dispatched on the CPU's instructions;
 * xeo: this thread's scratch for the deinterleaved x of the bf16 AVX-512 kernel */
static void dot_rows(const Lin *L, const float *x, const int32_t *idx, Py_ssize_t r0, Py_ssize_t r1, float *out,
                     float *xeo) {
#if HAVE_DECODE_AVX512
    if (decode_avx512()) {
        if (L->dtype == 0) {
            dot_rows_f32_avx512((const float *)L->w, x, L->din, idx, r0, r1, L->b, out);
        } else {
            Py_ssize_t half = L->din / 2;
            for (Py_ssize_t i = 0; i < half; ++i) {
                xeo[i] = x[2 * i];
                xeo[half + i] = x[2 * i + 1];
            }
            dot_rows_bf16_avx512((const uint16_t *)L->w, xeo, xeo + half, x, L->din, idx, r0, r1, L->b, out);
        }
        return;
    }
#endif
    (void)xeo;
    if (L->dtype == 0)
        dot_rows_f32((const float *)L->w, x, L->din, idx, r0, r1, L->b, out);
    else
        dot_rows_bf16((const uint16_t *)L->w, x, L->din, idx, r0, r1, L->b, out);
}

/* whether axpy_rows leaves its sums deinterleaved (the bfloat16 AVX-512 kernel) */
static inline int deinterleaved_partials(const Lin *L) { return L->dtype == 1 && decode_avx512(); }

/* y += h[i] * row idx[i] of an input-rows weight, for i < n, dispatched on the CPU's instructions */
static void axpy_rows(const Lin *L, const float *h, const int32_t *idx, Py_ssize_t n, float *y) {
#if HAVE_DECODE_AVX512
    if (decode_avx512()) {
        if (L->dtype == 0)
            axpy8_f32((const float *)L->w, h, idx, n, y, L->dout);
        else
            axpy8_bf16((const uint16_t *)L->w, h, idx, n, y, L->dout);
        return;
    }
#endif
    if (L->dtype == 0)
        axpy_rows_f32n((const float *)L->w, h, idx, n, y, L->dout);
    else
        axpy_rows_bf16n((const uint16_t *)L->w, h, idx, n, y, L->dout);
}

/* Rows layout: this thread's share of the outputs (rows split in blocks of ROWS, no barrier). */
static void lin_rows_part(const Lin *L, const float *x, float *y, int p, int P, float *xeo) {
    Py_ssize_t blocks = (L->dout + ROWS - 1) / ROWS, b0, b1;
    thread_range(blocks, p, P, &b0, &b1);
    Py_ssize_t r0 = b0 * ROWS, r1 = b1 * ROWS < L->dout ? b1 * ROWS : L->dout;
    if (r1 <= r0) return;
    dot_rows(L, x, NULL, r0, r1, y + r0, xeo);
}

/* Input-rows layout, phase 1: every thread lists the active inputs (the same list in each thread: a scan of din
 * floats is cheaper than a barrier), takes its share and sums it into its partial [dout] at part_off. */
static void lin_input_part(const Lin *L, const float *x, Scratch *s, int p, int P, Py_ssize_t part_stride,
                           Py_ssize_t part_off) {
    int32_t *idx = s->idx + (Py_ssize_t)p * s->max_din;
    float *val = s->val + (Py_ssize_t)p * s->max_din;
    Py_ssize_t n = 0;
    const float thr = L->thr;
    for (Py_ssize_t i = 0; i < L->din; ++i) {
        float xi = x[i];
        /* thr >= 0: |x| > thr (NaN kept); thr < 0: every non-zero input (exact zeros add nothing) */
        int on = thr >= 0.0f ? !(fabsf(xi) <= thr) : xi != 0.0f;
        if (on) {
            idx[n] = (int32_t)i;
            val[n++] = xi;
        }
    }
    Py_ssize_t a, b;
    thread_range(n, p, P, &a, &b);
    float *part = s->part + (Py_ssize_t)p * part_stride + part_off;
    memset(part, 0, (size_t)L->dout * sizeof(float));
    if (b > a) axpy_rows(L, val + a, idx + a, b - a, part);
}

/* Input-rows layout, phase 2 (after a barrier): this thread's columns of y = bias + sum of the partials. */
static void lin_input_reduce(const Lin *L, const Scratch *s, float *y, int p, int P, Py_ssize_t part_stride,
                             Py_ssize_t part_off) {
    Py_ssize_t c0, c1;
    thread_range(L->dout, p, P, &c0, &c1);
    const Py_ssize_t dv = deinterleaved_partials(L) ? L->dout / 32 * 32 : 0;
    for (Py_ssize_t c = c0; c < c1; ++c) {
        Py_ssize_t j = c % 32, src = c < dv ? c - j + (j & 1 ? 16 + j / 2 : j / 2) : c;
        float acc = L->b ? L->b[c] : 0.0f;
        for (int q = 0; q < P; ++q) acc += s->part[(Py_ssize_t)q * part_stride + part_off + src];
        y[c] = acc;
    }
}

/* ys[i] = Ls[i] x for a group of layers reading one input, by every thread of the region, ending with a barrier:
 * rows-layout layers need none in between; input-rows layers keep their partial sums side by side (part_off), so
 * the whole group costs two barriers at most. */
static void lin_run(const Lin *const *Ls, const float *x, float *const *ys, int n, Scratch *s, int p, int P,
                    Py_ssize_t part_stride) {
    /* rotated inputs first: x R once per distinct R of the group (an input-rows product over R's rows) */
    const float *xin[4] = {x, x, x, x};
    const float *rots[4] = {NULL, NULL, NULL, NULL};
    int nrot = 0;
    for (int i = 0; i < n; ++i) {
        if (Ls[i]->rot == NULL) continue;
        int k = 0;
        while (k < nrot && rots[k] != Ls[i]->rot) ++k;
        if (k == nrot) rots[nrot++] = Ls[i]->rot;
        xin[i] = s->xr + (Py_ssize_t)k * s->max_din;
    }
    if (nrot > 0) {
        Lin R[4];
        Py_ssize_t off = 0;
        for (int k = 0; k < nrot; ++k) {
            const Lin *owner = NULL;
            for (int i = 0; i < n && owner == NULL; ++i)
                if (Ls[i]->rot == rots[k]) owner = Ls[i];
            memset(&R[k], 0, sizeof(Lin));
            R[k].w = rots[k];
            R[k].layout = LAYOUT_INPUT_ROWS;
            R[k].din = R[k].dout = owner->din;
            R[k].thr = -1.0f;
            lin_input_part(&R[k], x, s, p, P, part_stride, off);
            off += R[k].dout;
        }
#pragma omp barrier
        off = 0;
        for (int k = 0; k < nrot; ++k) {
            lin_input_reduce(&R[k], s, s->xr + (Py_ssize_t)k * s->max_din, p, P, part_stride, off);
            off += R[k].dout;
        }
#pragma omp barrier
    }
    Py_ssize_t off = 0;
    for (int i = 0; i < n; ++i) {
        if (Ls[i]->layout == LAYOUT_ROWS) {
            lin_rows_part(Ls[i], xin[i], ys[i], p, P, s->xeo + (Py_ssize_t)p * (s->max_din + 64));
        } else {
            lin_input_part(Ls[i], xin[i], s, p, P, part_stride, off);
            off += Ls[i]->dout;
        }
    }
    if (off > 0) {
#pragma omp barrier
        off = 0;
        for (int i = 0; i < n; ++i)
            if (Ls[i]->layout == LAYOUT_INPUT_ROWS) {
                lin_input_reduce(Ls[i], s, ys[i], p, P, part_stride, off);
                off += Ls[i]->dout;
            }
    }
#pragma omp barrier
}

static void norm_apply(const Norm *N, const float *x, float *out, Py_ssize_t d) {
    if (N->kind == NORM_NONE) {
        if (out != x) memcpy(out, x, (size_t)d * sizeof(float));
        return;
    }
    double ss = 0.0;
    for (Py_ssize_t i = 0; i < d; ++i) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / (double)d + (double)N->eps));
    for (Py_ssize_t i = 0; i < d; ++i) {
        float w = load_w(N->w, N->dtype, i);
        out[i] = x[i] * inv * (N->kind == NORM_RMS_ONE_PLUS ? 1.0f + w : w);
    }
}

static inline float act_value(int act, float g) {
    switch (act) {
    case ACT_SILU: return g / (1.0f + expf(-g));
    case ACT_GELU_TANH: {
        const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
        return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
    }
    case ACT_GELU: return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    case ACT_RELU: return g > 0.0f ? g : (g != g ? g : 0.0f);
    case ACT_RELU2: { float r = g > 0.0f ? g : (g != g ? g : 0.0f); return r * r; }
    default: return g;
    }
}

/* The stochastic activation's draw, as hf_stochact/kernels/csrc/kernels.c: SiLU where u(i) < p, else ReLU */
static inline uint32_t dmix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* per layer and call: a stochastic draw (generate(..., stochastic_activation=True)) */
typedef struct {
    uint64_t threshold; /* P(smooth branch) * 2^32; 0: no draw in this layer */
    int negative_only;  /* draw on negative inputs only (StochA: x >= 0 stays x) */
    int smooth;         /* the smooth branch's activation (ACT_*); the other branch is ReLU */
} LayerDraw;

static inline float stochastic_value(float g, uint64_t seed, uint32_t i, const LayerDraw *dr) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    uint32_t u = dmix32(dmix32(i ^ k0) ^ k1);
    int drawn = dr->threshold >= 0x100000000ULL || (uint64_t)u < dr->threshold;
    if (dr->negative_only && !(g < 0.0f)) drawn = 0;
    return drawn ? act_value(dr->smooth, g) : act_value(ACT_RELU, g);
}

/* RoPE in place on n_heads vectors of head_dim, rotate-half convention, first rot dims (cos/sin [rot]) */
static void rope_apply(float *v, int n_heads, int head_dim, const float *cs, int rot) {
    const float *c = cs, *sn = cs + rot;
    int half = rot / 2;
    for (int h = 0; h < n_heads; ++h) {
        float *x = v + (Py_ssize_t)h * head_dim;
        for (int i = 0; i < half; ++i) {
            float a = x[i], b = x[i + half];
            x[i] = a * c[i] - b * sn[i];
            x[i + half] = b * c[i + half] + a * sn[i + half];
        }
    }
}

typedef struct {
    void *k, *v;         /* [1, kv_heads, cap, head_dim] */
    int dtype;
    Py_ssize_t cap;
    int64_t *length;     /* cumulative_length (int64 scalar) */
    Py_ssize_t slide_len; /* -1: a full-attention layer; else the sliding layer's cumulative_length_int */
    Py_ssize_t pos;      /* where this step's k/v go; n: how many cached entries attention reads */
    Py_ssize_t n;
    int roll;            /* sliding layer full: shift by one first */
} CacheLayer;

static inline void store_kv(void *dst, int dtype, Py_ssize_t off, const float *src, int n) {
    if (dtype == 0)
        memcpy((float *)dst + off, src, (size_t)n * sizeof(float));
    else
        for (int i = 0; i < n; ++i) ((uint16_t *)dst)[off + i] = nto_bf16(src[i]);
}

NMULTIVERSION static float dot_kv(const void *K, int dtype, Py_ssize_t off, const float *q, int hd) {
    float acc[LANES] = {0};
    int hv = hd / LANES * LANES;
    float s = 0.0f;
    if (dtype == 0) {
        const float *k = (const float *)K + off;
        for (int c = 0; c < hv; c += LANES) NSIMD for (int l = 0; l < LANES; ++l) acc[l] += q[c + l] * k[c + l];
        for (int c = hv; c < hd; ++c) s += q[c] * k[c];
    } else {
        const uint16_t *k = (const uint16_t *)K + off;
        for (int c = 0; c < hv; c += LANES)
            NSIMD for (int l = 0; l < LANES; ++l) acc[l] += q[c + l] * nbf16(k[c + l]);
        for (int c = hv; c < hd; ++c) s += q[c] * nbf16(k[c]);
    }
    for (int l = 0; l < LANES; ++l) s += acc[l];
    return s;
}

NMULTIVERSION static void axpy_kv(const void *V, int dtype, Py_ssize_t off, float w, float *out, int hd) {
    if (dtype == 0) {
        const float *v = (const float *)V + off;
        NSIMD for (int i = 0; i < hd; ++i) out[i] += w * v[i];
    } else {
        const uint16_t *v = (const uint16_t *)V + off;
        NSIMD for (int i = 0; i < hd; ++i) out[i] += w * nbf16(v[i]);
    }
}

/* attention of head h over the layer's n cached entries into out [head_dim] */
static void attend(const Layer *Ly, const CacheLayer *C, const float *q, int h, float *scores, float *out) {
    int hd = Ly->head_dim, group = Ly->heads / Ly->kv_heads, kvh = h / group;
    Py_ssize_t base = (Py_ssize_t)kvh * C->cap * hd;
    float m = -INFINITY;
    for (Py_ssize_t t = 0; t < C->n; ++t) {
        float s = dot_kv(C->k, C->dtype, base + t * hd, q, hd) * Ly->scale;
        if (Ly->softcap > 0.0f) s = tanhf(s / Ly->softcap) * Ly->softcap;
        scores[t] = s;
        if (s > m) m = s;
    }
    float sum = 0.0f;
    for (Py_ssize_t t = 0; t < C->n; ++t) {
        scores[t] = expf(scores[t] - m);
        sum += scores[t];
    }
    for (int i = 0; i < hd; ++i) out[i] = 0.0f;
    float inv = 1.0f / sum;
    for (Py_ssize_t t = 0; t < C->n; ++t) axpy_kv(C->v, C->dtype, base + t * hd, scores[t] * inv, out, hd);
}

static void roll_left(void *buf, int dtype, int kv_heads, Py_ssize_t cap, int hd) {
    size_t el = dtype == 0 ? 4 : 2, row = (size_t)hd * el;
    for (int h = 0; h < kv_heads; ++h) {
        char *b = (char *)buf + (size_t)h * (size_t)cap * row;
        memmove(b, b + row, (size_t)(cap - 1) * row);
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * The step */

static void run_layer(const Plan *pl, int li, CacheLayer *C, const float *rope, uint64_t seed, const LayerDraw *dr,
                      Scratch *s, int p, int P, Py_ssize_t part_stride) {
    const Layer *Ly = &pl->layers[li];
    Py_ssize_t d = pl->d;
    int hd = Ly->head_dim;
    /* 1. attention input */
    if (p == 0) norm_apply(&Ly->n1, s->x, s->a, d);
#pragma omp barrier
    {
        const Lin *Ls[3] = {&Ly->q, &Ly->k, &Ly->v};
        float *const ys[3] = {s->q, s->k, s->v};
        lin_run(Ls, s->a, ys, 3, s, p, P, part_stride);
    }
    /* 2. q/k norms, RoPE, the cache write */
    if (p == 0) {
        if (Ly->qn.kind != NORM_NONE)
            for (int h = 0; h < Ly->heads; ++h) norm_apply(&Ly->qn, s->q + h * hd, s->q + h * hd, hd);
        if (Ly->kn.kind != NORM_NONE)
            for (int h = 0; h < Ly->kv_heads; ++h) norm_apply(&Ly->kn, s->k + h * hd, s->k + h * hd, hd);
        if (pl->rope_dim > 0) {
            const float *cs = rope + (Py_ssize_t)Ly->rope * 2 * pl->rope_dim;
            rope_apply(s->q, Ly->heads, hd, cs, pl->rope_dim);
            rope_apply(s->k, Ly->kv_heads, hd, cs, pl->rope_dim);
        }
        if (C->roll) {
            roll_left(C->k, C->dtype, Ly->kv_heads, C->cap, hd);
            roll_left(C->v, C->dtype, Ly->kv_heads, C->cap, hd);
        }
        for (int h = 0; h < Ly->kv_heads; ++h) {
            Py_ssize_t off = ((Py_ssize_t)h * C->cap + C->pos) * hd;
            store_kv(C->k, C->dtype, off, s->k + h * hd, hd);
            store_kv(C->v, C->dtype, off, s->v + h * hd, hd);
        }
    }
#pragma omp barrier
    /* 3. attention, heads split between the threads */
    {
        Py_ssize_t h0, h1;
        thread_range(Ly->heads, p, P, &h0, &h1);
        for (Py_ssize_t h = h0; h < h1; ++h)
            attend(Ly, C, s->q + h * hd, (int)h, s->scores + (Py_ssize_t)p * s->max_len, s->att + h * hd);
    }
#pragma omp barrier
    {
        const Lin *Ls[1] = {&Ly->o};
        float *const ys[1] = {s->o};
        lin_run(Ls, s->att, ys, 1, s, p, P, part_stride);
    }
    /* 4. residual, FFN input */
    if (p == 0) {
        norm_apply(&Ly->n2, s->o, s->o, d);
        for (Py_ssize_t i = 0; i < d; ++i) s->x[i] += s->o[i];
        norm_apply(&Ly->n3, s->x, s->a, d);
    }
#pragma omp barrier
    Py_ssize_t dff = Ly->gate.dout;
    if (Ly->sparse_ffn && dr == NULL) {
        /* exact ReLU sparsity: dense gate, then the up rows and down rows of the active neurons only */
        {
            const Lin *Ls[1] = {&Ly->gate};
            float *const ys[1] = {s->g};
            lin_run(Ls, s->a, ys, 1, s, p, P, part_stride);
        }
        if (p == 0) {
            Py_ssize_t k = 0;
            for (Py_ssize_t i = 0; i < dff; ++i) {
                float r = act_value(Ly->act, s->g[i]);
                if (r != 0.0f) {
                    s->ffn_idx[k] = (int32_t)i;
                    s->g[k++] = r; /* compacted in place: k <= i */
                }
            }
            s->ffn_k = k;
        }
#pragma omp barrier
        Py_ssize_t k = s->ffn_k, a0, a1;
        thread_range(k, p, P, &a0, &a1);
        if (a1 > a0) {
            dot_rows(&Ly->up, s->a, s->ffn_idx, a0, a1, s->h + a0, s->xeo + (Py_ssize_t)p * (s->max_din + 64));
            for (Py_ssize_t j = a0; j < a1; ++j) s->h[j] *= s->g[j];
        }
#pragma omp barrier
        /* down rows of the active neurons, split between the threads, one partial sum each */
        {
            float *part = s->part + (Py_ssize_t)p * part_stride;
            memset(part, 0, (size_t)d * sizeof(float));
            if (a1 > a0) axpy_rows(&Ly->down, s->h + a0, s->ffn_idx + a0, a1 - a0, part);
        }
#pragma omp barrier
        lin_input_reduce(&Ly->down, s, s->y, p, P, part_stride, 0);
#pragma omp barrier
    } else {
        {
            const Lin *Ls[2] = {&Ly->gate, &Ly->up};
            float *const ys[2] = {s->g, s->u};
            lin_run(Ls, s->a, ys, 2, s, p, P, part_stride);
        }
        {
            Py_ssize_t c0, c1;
            thread_range(dff, p, P, &c0, &c1);
            if (dr != NULL) {
                for (Py_ssize_t i = c0; i < c1; ++i)
                    s->h[i] = stochastic_value(s->g[i], seed, (uint32_t)i, dr) * s->u[i];
            } else {
                for (Py_ssize_t i = c0; i < c1; ++i) s->h[i] = act_value(Ly->act, s->g[i]) * s->u[i];
            }
        }
#pragma omp barrier
        {
            const Lin *Ls[1] = {&Ly->down};
            float *const ys[1] = {s->y};
            lin_run(Ls, s->h, ys, 1, s, p, P, part_stride);
        }
    }
    if (p == 0) {
        norm_apply(&Ly->n4, s->y, s->y, d);
        for (Py_ssize_t i = 0; i < d; ++i) s->x[i] += s->y[i];
    }
#pragma omp barrier
}

static void plan_free(PyObject *capsule) {
    Plan *pl = (Plan *)PyCapsule_GetPointer(capsule, "hf_stochact.decode_plan");
    if (pl == NULL) return;
    free(pl->layers);
    free(pl);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Python entry points */

static int parse_lin(PyObject *t, Lin *L) {
    unsigned long long w = 0, b = 0, rot = 0;
    double thr = -1.0;
    if (t == Py_None) {
        memset(L, 0, sizeof(*L));
        return 1;
    }
    if (!PyArg_ParseTuple(t, "KKiinndK", &w, &b, &L->dtype, &L->layout, &L->din, &L->dout, &thr, &rot)) return 0;
    L->w = (const void *)w;
    L->b = (const float *)b;
    L->thr = (float)thr;
    L->rot = (const float *)rot;
    if (L->w == NULL || L->din < 1 || L->dout < 1 || (L->dtype != 0 && L->dtype != 1) ||
        (L->layout != LAYOUT_ROWS && L->layout != LAYOUT_INPUT_ROWS)) {
        PyErr_SetString(PyExc_ValueError, "decode_plan: a bad linear spec");
        return 0;
    }
    return 1;
}

static int parse_norm(PyObject *t, Norm *N) {
    unsigned long long w = 0;
    double eps = 0.0;
    if (t == Py_None) {
        memset(N, 0, sizeof(*N));
        return 1;
    }
    if (!PyArg_ParseTuple(t, "Kiidn", &w, &N->dtype, &N->kind, &eps, &N->d)) return 0;
    N->w = (const void *)w;
    N->eps = (float)eps;
    if (N->w == NULL || N->d < 1 || (N->kind != NORM_RMS && N->kind != NORM_RMS_ONE_PLUS)) {
        PyErr_SetString(PyExc_ValueError, "decode_plan: a bad norm spec");
        return 0;
    }
    return 1;
}

static int fail(const char *what) {
    PyErr_Format(PyExc_ValueError, "decode_plan: inconsistent sizes (%s)", what);
    return 0;
}

static int lin_fits(const Lin *L, Py_ssize_t din, Py_ssize_t dout) {
    return L->w != NULL && L->din == din && L->dout == dout;
}

/* decode_plan((embed, embed_dtype, embed_scale, vocab, d, final_norm, head, logit_softcap, n_rope, rope_dim),
 *             (layer, ...)) with layer = (n1, n2, n3, n4, qn, kn, q, k, v, o, gate, up, down,
 *             heads, kv_heads, head_dim, act, sparse_ffn, rope, scale, softcap) */
static PyObject *py_decode_plan(PyObject *self, PyObject *args) {
    PyObject *model, *layers;
    if (!PyArg_ParseTuple(args, "O!O!", &PyTuple_Type, &model, &PyTuple_Type, &layers)) return NULL;
    Plan *pl = (Plan *)calloc(1, sizeof(Plan));
    if (pl == NULL) return PyErr_NoMemory();
    unsigned long long embed = 0;
    double escale = 1.0, lsoft = 0.0;
    PyObject *fn, *head;
    if (!PyArg_ParseTuple(model, "KidnnOOdii", &embed, &pl->embed_dtype, &escale, &pl->vocab, &pl->d, &fn, &head,
                          &lsoft, &pl->n_rope, &pl->rope_dim))
        goto error;
    pl->embed = (const void *)embed;
    pl->embed_scale = (float)escale;
    pl->logit_softcap = (float)lsoft;
    if (!parse_norm(fn, &pl->final_norm) || !parse_lin(head, &pl->head)) goto error;
    if (pl->embed == NULL || pl->d < 1 || pl->vocab < 1 || !lin_fits(&pl->head, pl->d, pl->vocab) ||
        pl->head.layout != LAYOUT_ROWS || pl->final_norm.d != pl->d || pl->n_rope < 0 || pl->rope_dim < 0 ||
        pl->rope_dim % 2) {
        fail("model");
        goto error;
    }
    pl->n_layers = (int)PyTuple_Size(layers);
    pl->layers = (Layer *)calloc((size_t)(pl->n_layers ? pl->n_layers : 1), sizeof(Layer));
    if (pl->layers == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    pl->max_din = pl->d;
    pl->max_dout = pl->d;
    for (int i = 0; i < pl->n_layers; ++i) {
        Layer *Ly = &pl->layers[i];
        PyObject *n[6], *l[7];
        double scale, softcap;
        if (!PyArg_ParseTuple(PyTuple_GetItem(layers, i), "OOOOOOOOOOOOOiiiiiidd", &n[0], &n[1], &n[2], &n[3],
                              &n[4], &n[5], &l[0], &l[1], &l[2], &l[3], &l[4], &l[5], &l[6], &Ly->heads,
                              &Ly->kv_heads, &Ly->head_dim, &Ly->act, &Ly->sparse_ffn, &Ly->rope, &scale, &softcap))
            goto error;
        if (!parse_norm(n[0], &Ly->n1) || !parse_norm(n[1], &Ly->n2) || !parse_norm(n[2], &Ly->n3) ||
            !parse_norm(n[3], &Ly->n4) || !parse_norm(n[4], &Ly->qn) || !parse_norm(n[5], &Ly->kn) ||
            !parse_lin(l[0], &Ly->q) || !parse_lin(l[1], &Ly->k) || !parse_lin(l[2], &Ly->v) ||
            !parse_lin(l[3], &Ly->o) || !parse_lin(l[4], &Ly->gate) || !parse_lin(l[5], &Ly->up) ||
            !parse_lin(l[6], &Ly->down))
            goto error;
        Ly->scale = (float)scale;
        Ly->softcap = (float)softcap;
        Py_ssize_t d = pl->d, H = Ly->heads, Hk = Ly->kv_heads, hd = Ly->head_dim, dff = Ly->gate.dout;
        if (H < 1 || Hk < 1 || H % Hk || hd < 1 || hd % 2 || pl->rope_dim > hd || Ly->rope < 0 ||
            (pl->rope_dim && Ly->rope >= pl->n_rope) || Ly->act < ACT_SILU || Ly->act > ACT_RELU2) {
            fail("heads/rope/activation");
            goto error;
        }
        if (Ly->n1.kind == NORM_NONE || Ly->n1.d != d || Ly->n3.kind == NORM_NONE || Ly->n3.d != d ||
            (Ly->n2.kind != NORM_NONE && Ly->n2.d != d) || (Ly->n4.kind != NORM_NONE && Ly->n4.d != d) ||
            (Ly->qn.kind != NORM_NONE && Ly->qn.d != hd) || (Ly->kn.kind != NORM_NONE && Ly->kn.d != hd)) {
            fail("norms");
            goto error;
        }
        if (!lin_fits(&Ly->q, d, H * hd) || !lin_fits(&Ly->k, d, Hk * hd) || !lin_fits(&Ly->v, d, Hk * hd) ||
            !lin_fits(&Ly->o, H * hd, d) || !lin_fits(&Ly->gate, d, dff) || !lin_fits(&Ly->up, d, dff) ||
            !lin_fits(&Ly->down, dff, d)) {
            fail("linear layers");
            goto error;
        }
        if (Ly->sparse_ffn && (Ly->gate.layout != LAYOUT_ROWS || Ly->up.layout != LAYOUT_ROWS ||
                               Ly->down.layout != LAYOUT_INPUT_ROWS || (Ly->act != ACT_RELU && Ly->act != ACT_RELU2) ||
                               Ly->gate.rot || Ly->up.rot || Ly->down.rot || Ly->down.thr >= 0.0f)) {
            fail("sparse FFN");
            goto error;
        }
        const Lin *all[7] = {&Ly->q, &Ly->k, &Ly->v, &Ly->o, &Ly->gate, &Ly->up, &Ly->down};
        for (int j = 0; j < 7; ++j) {
            if (all[j]->din > pl->max_din) pl->max_din = all[j]->din;
            if (all[j]->dout > pl->max_dout) pl->max_dout = all[j]->dout;
        }
        if (dff > pl->dff) pl->dff = dff;
        Py_ssize_t qkv = Ly->q.dout + Ly->k.dout + Ly->v.dout, gu = Ly->gate.dout + Ly->up.dout;
        if (qkv > pl->max_group) pl->max_group = qkv;
        if (gu > pl->max_group) pl->max_group = gu;
        if (pl->max_dout > pl->max_group) pl->max_group = pl->max_dout;

    }
    if (3 * pl->max_din > pl->max_group) pl->max_group = 3 * pl->max_din; /* up to three rotations of one input */
    PyObject *capsule = PyCapsule_New(pl, "hf_stochact.decode_plan", plan_free);
    if (capsule == NULL) goto error;
    return capsule;
error:
    free(pl->layers);
    free(pl);
    return NULL;
}

/* decode_step(plan, token, rope, cache, seed, draws, logits, nthreads) -> 0, or -1 if a full-attention layer's
 * cache is full (the caller falls back). draws: None, or per layer None or (P(smooth) * 2^32, negative_only,
 * smooth activation): the layer's FFN activation is drawn per element from seed (a seed per layer derived from it). rope: pointer to float32 [n_rope, 2, rope_dim] (cos, sin per position table);
 * cache: one (k, v, dtype, cap, length_ptr, slide_len) per layer, slide_len -1 for full attention;
 * logits: float32 [vocab]. */
static PyObject *py_decode_step(PyObject *self, PyObject *args) {
    PyObject *capsule, *cache, *draws;
    long long token;
    unsigned long long rope, logits, seed;
    int nthreads;
    if (!PyArg_ParseTuple(args, "OLKO!KOKi", &capsule, &token, &rope, &PyTuple_Type, &cache, &seed, &draws, &logits,
                          &nthreads))
        return NULL;
    Plan *pl = (Plan *)PyCapsule_GetPointer(capsule, "hf_stochact.decode_plan");
    if (pl == NULL) return NULL;
    if (token < 0 || token >= pl->vocab) {
        PyErr_Format(PyExc_ValueError, "decode_step: token %lld outside the vocabulary [0, %zd)", token, pl->vocab);
        return NULL;
    }
    if (PyTuple_Size(cache) != pl->n_layers) {
        PyErr_SetString(PyExc_ValueError, "decode_step: one cache entry per layer expected");
        return NULL;
    }
    if (pl->rope_dim > 0 && rope == 0) {
        PyErr_SetString(PyExc_ValueError, "decode_step: no rope table");
        return NULL;
    }
    if (draws != Py_None && (!PyTuple_Check(draws) || PyTuple_Size(draws) != pl->n_layers)) {
        PyErr_SetString(PyExc_ValueError, "decode_step: draws must be None or one entry per layer");
        return NULL;
    }
    CacheLayer *C = (CacheLayer *)calloc((size_t)(pl->n_layers ? pl->n_layers : 1), sizeof(CacheLayer));
    LayerDraw *D = (LayerDraw *)calloc((size_t)(pl->n_layers ? pl->n_layers : 1), sizeof(LayerDraw));
    int *has_draw = (int *)calloc((size_t)(pl->n_layers ? pl->n_layers : 1), sizeof(int));
    if (C == NULL || D == NULL || has_draw == NULL) {
        free(C);
        free(D);
        free(has_draw);
        return PyErr_NoMemory();
    }
    for (int i = 0; draws != Py_None && i < pl->n_layers; ++i) {
        PyObject *e = PyTuple_GetItem(draws, i);
        if (e == Py_None) continue;
        unsigned long long thr;
        if (!PyArg_ParseTuple(e, "Kii", &thr, &D[i].negative_only, &D[i].smooth) || thr > 0x100000000ULL ||
            D[i].smooth < ACT_SILU || D[i].smooth > ACT_RELU2) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "decode_step: a bad draw");
            free(C);
            free(D);
            free(has_draw);
            return NULL;
        }
        D[i].threshold = thr;
        has_draw[i] = 1;
    }
    Py_ssize_t max_len = 1;
    int full = 0;
    for (int i = 0; i < pl->n_layers; ++i) {
        unsigned long long k, v, len;
        if (!PyArg_ParseTuple(PyTuple_GetItem(cache, i), "KKinKn", &k, &v, &C[i].dtype, &C[i].cap, &len,
                              &C[i].slide_len)) {
            free(C);
            free(D);
            free(has_draw);
            return NULL;
        }
        C[i].k = (void *)k;
        C[i].v = (void *)v;
        C[i].length = (int64_t *)len;
        if (C[i].k == NULL || C[i].v == NULL || C[i].length == NULL || C[i].cap < 1 ||
            (C[i].dtype != 0 && C[i].dtype != 1)) {
            free(C);
            free(D);
            free(has_draw);
            PyErr_SetString(PyExc_ValueError, "decode_step: a bad cache entry");
            return NULL;
        }
        if (C[i].slide_len < 0) {
            int64_t at = *C[i].length;
            if (at < 0 || at >= C[i].cap) full = 1;
            C[i].pos = at;
            C[i].n = at + 1;
        } else if (C[i].slide_len < C[i].cap) {
            C[i].pos = C[i].slide_len;
            C[i].n = C[i].slide_len + 1;
        } else {
            C[i].roll = 1;
            C[i].pos = C[i].cap - 1;
            C[i].n = C[i].cap;
        }
        if (C[i].n > max_len) max_len = C[i].n;
    }
    if (full) {
        free(C);
        free(D);
        free(has_draw);
        return PyLong_FromLong(-1);
    }
    int P = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    Py_ssize_t d = pl->d, hmax = 0;
    for (int i = 0; i < pl->n_layers; ++i) {
        Py_ssize_t qd = (Py_ssize_t)pl->layers[i].heads * pl->layers[i].head_dim;
        if (qd > hmax) hmax = qd;
    }
    Py_ssize_t part_stride = pl->max_group; /* the head is rows layout: it needs no partial sums */
    Py_ssize_t dff = pl->dff > 1 ? pl->dff : 1;
    size_t floats = (size_t)(4 * d + 4 * hmax + 3 * dff + d) + (size_t)P * (size_t)max_len +
                    (size_t)P * (size_t)part_stride + (size_t)P * (size_t)pl->max_din +
                    (size_t)P * (size_t)(pl->max_din + 64) + 4 * (size_t)pl->max_din;
    size_t ints = (size_t)P * (size_t)pl->max_din + (size_t)dff;
    char *mem = (char *)malloc(floats * sizeof(float) + ints * sizeof(int32_t) + 64);
    if (mem == NULL) {
        free(C);
        free(D);
        free(has_draw);
        return PyErr_NoMemory();
    }
    Scratch s;
    float *f = (float *)mem;
    s.x = f; f += d;
    s.a = f; f += d;
    s.o = f; f += d;
    s.y = f; f += d;
    s.q = f; f += hmax;
    s.k = f; f += hmax;
    s.v = f; f += hmax;
    s.att = f; f += hmax;
    s.g = f; f += dff;
    s.u = f; f += dff;
    s.h = f; f += dff;
    s.scores = f; f += (Py_ssize_t)P * max_len;
    s.part = f; f += (Py_ssize_t)P * part_stride;
    s.val = f; f += (Py_ssize_t)P * pl->max_din;
    s.xeo = f; f += (Py_ssize_t)P * (pl->max_din + 64);
    s.xr = f; f += 4 * pl->max_din;
    s.idx = (int32_t *)f;
    s.ffn_idx = s.idx + (Py_ssize_t)P * pl->max_din;
    s.max_len = max_len;
    s.max_din = pl->max_din;
    float *out = (float *)logits;
    (void)decode_avx512(); /* the CPU check once, before the threads read its cached answer */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < d; ++i) s.x[i] = load_w(pl->embed, pl->embed_dtype, token * d + i) * pl->embed_scale;
#pragma omp parallel num_threads(P)
    {
#ifdef _OPENMP
        int p = omp_get_thread_num(), np = omp_get_num_threads();
#else
        int p = 0, np = 1;
#endif
        for (int li = 0; li < pl->n_layers; ++li) {
            uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (uint64_t)(li + 1); /* a seed per layer (splitmix64) */
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
            run_layer(pl, li, &C[li], (const float *)rope, z ^ (z >> 31), has_draw[li] ? &D[li] : NULL, &s, p, np,
                      part_stride);
        }
        if (p == 0) norm_apply(&pl->final_norm, s.x, s.a, d);
#pragma omp barrier
        lin_rows_part(&pl->head, s.a, out, p, np, s.xeo + (Py_ssize_t)p * (s.max_din + 64));
#pragma omp barrier
        if (pl->logit_softcap > 0.0f) {
            Py_ssize_t c0, c1;
            thread_range(pl->vocab, p, np, &c0, &c1);
            for (Py_ssize_t c = c0; c < c1; ++c) out[c] = tanhf(out[c] / pl->logit_softcap) * pl->logit_softcap;
        }
    }
    for (int i = 0; i < pl->n_layers; ++i)
        if (C[i].slide_len < 0 || C[i].slide_len < C[i].cap) *C[i].length += 1; /* as HF's update() */
    Py_END_ALLOW_THREADS
    free(mem);
    free(C);
    free(D);
    free(has_draw);
    return PyLong_FromLong(0);
}

PyObject *hf_stochact_decode_plan(PyObject *self, PyObject *args) { return py_decode_plan(self, args); }
PyObject *hf_stochact_decode_step(PyObject *self, PyObject *args) { return py_decode_step(self, args); }
