/* A 4-bit block-quantized linear for CPU decode (lmloop.engine.kernels builds and loads this).
 *
 * Written by hand because decode at batch 1 streams every weight once per token: the bytes
 * per weight set the speed, and PyTorch ships no fast CPU kernel for 4-bit weights (its
 * int4 packed matmul measured 18-40x slower than fbgemm's int8 here). The formats:
 *
 *   q4  32 weights along the input dim: w ~= d * q + m, q in 0..15, two per byte
 *       (byte j holds q[j] low and q[j + 16] high): 16 bytes of codes and (d, m) as two
 *       halves in a separate array, 0.625 byte per weight (llama.cpp's Q4_1 size);
 *   a8  activations, quantized per call, 32 at a time: x ~= d * q, with s = d * sum(q)
 *       (the q4 offset's share: sum_j m * x_j = m * s).
 *
 * Codes and scales live in two arrays so that code loads stay aligned.
 *
 * y[r, n] = sum over blocks of d_w * d_x * (integer dot of the 32 pairs) + m_w * s_x,
 * with 8-bit integer products summed in 32 bits (AVX-VNNI or AVX2 where compiled with them,
 * plain C elsewhere). Output rows are split among the calling thread's OpenMP team: this file
 * is linked against PyTorch's own OpenMP runtime, so the team is the one torch.set_num_threads
 * sized, not a second pool of threads competing for the cores.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LM_AVX2 1
#endif

#define QK 32

typedef struct {
    float d, s;
    int8_t q[32];
} blk_a8;

typedef uint16_t f16; /* IEEE half: weight scales, as GGUF stores them */

/* four bytes read as one int32 wherever they sit: a broadcast straight from memory */
typedef int32_t __attribute__((may_alias, aligned(1))) i32_any;

static inline float f16_to_f32(f16 h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

int lm_simd(void) {
#if defined(LM_AVX2) && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
    return 2; /* VNNI */
#elif defined(LM_AVX2)
    return 1;
#else
    return 0;
#endif
}

#ifdef LM_AVX2
/* the largest of 8 lanes (no NaN among them) */
static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
#endif

/* max |v[j]| over j < n, NaNs skipped (as fmaxf's), 8 lanes at a time where AVX2 is compiled in:
 * max is exact in any order. (fmaxf is a libm call per value here: most of a row's
 * quantization time before.) */
static float absmax(const float *v, int n) {
    float m = 0.0f;
    int j = 0;
#ifdef LM_AVX2
    __m256 acc = _mm256_setzero_ps();
    const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (; j + 8 <= n; j += 8) /* a NaN lane keeps acc's value: max_ps answers its 2nd operand */
        acc = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + j), mag), acc);
    m = hmax(acc);
#endif
    for (; j < n; j++) m = fmaxf(m, fabsf(v[j]));
    return m;
}

/* q[j] = nearest integer (ties to even) of v[j] * id, or of v[j] / div when div != 0, for j < n
 * (|result| <= 127 by the callers' scaling); returns the sum of the q. 8 lanes at a time where
 * AVX2 is compiled in: the same products or quotients, rounded by the same rule (the default
 * rounding mode, as nearbyintf), so the same bytes as the scalar line. The scalar loop was a
 * libm call per value: 1.7 us for a 576-wide row, ~10 us a layer of one row's decode. */
static int round_i8(const float *v, int n, float id, float div, int8_t *q) {
    int j = 0, sum = 0;
#ifdef LM_AVX2
    __m256i acc = _mm256_setzero_si256();
    const __m256 idv = _mm256_set1_ps(id), dv = _mm256_set1_ps(div);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; j + 32 <= n; j += 32) {
        __m256i r[4];
        for (int t = 0; t < 4; t++) {
            __m256 x = _mm256_loadu_ps(v + j + 8 * t);
            x = div != 0.0f ? _mm256_div_ps(x, dv) : _mm256_mul_ps(x, idv);
            r[t] = _mm256_cvtps_epi32(x); /* MXCSR's rounding: to nearest, ties to even */
            acc = _mm256_add_epi32(acc, r[t]);
        }
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_permutevar8x32_epi32(b, order));
    }
    int lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, acc);
    for (int i = 0; i < 8; i++) sum += lanes[i];
#endif
    for (; j < n; j++) {
        int r = (int)nearbyintf(div != 0.0f ? v[j] / div : v[j] * id);
        q[j] = (int8_t)r;
        sum += r;
    }
    return sum;
}

static void quantize_a8(const float *x, blk_a8 *out, int nb) {
    for (int b = 0; b < nb; b++) {
        const float *v = x + b * QK;
        float amax = absmax(v, QK);
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        out[b].d = d;
        out[b].s = d * (float)round_i8(v, QK, id, 0.0f, out[b].q);
    }
}

/* Weight rows per group: the groups' codes are interleaved so that one register holds four
 * consecutive codes of each of the R rows (below), and a broadcast of four activation codes
 * then gives every row's partial sum in its own lane, with no horizontal sums. */
#define R 8
/* Activation rows per pass over a group: each block of the group's weights is loaded and
 * unpacked once and used for MT rows (a batched step, a prompt), in place of once per row.
 * (8 measured no faster with AVX-512's 32 registers.) The passes below switch on 1..MT. */
#define MT 4
#ifndef PF
#define PF 8192
#endif

/* The weights' layout (`lmloop.engine.kernels.Q4Linear` packs it): n_out / R full groups,
 * then the n_out % R rows left over.
 *   group g, block b: 128 bytes of codes at c + (g * nb + b) * 128, four 32-byte registers;
 *     register t, byte 4 * i + e holds row i's code of element 8t + e (low nibble) and of
 *     element 8t + 4 + e (high nibble); scales at p + (g * nb + b) * 16: the R rows' d, then
 *     their m (halves);
 *   a leftover row i, block b: 16 bytes at c + (G * nb * R + i * nb + b) * 16 (byte j holds
 *     q[j] low and q[j + 16] high), its (d, m) at p + 2 * (G * nb * R + i * nb + b).
 *
 * The arithmetic, one weight row against one activation row: per block, the 32 products are
 * summed exactly in integers; then acc += (float)sum * (d_w * d_x) and off += m_w * s_x, in
 * block order, and out = acc + off. Batch invariance rests on this: the operations that
 * produce a row's output and their order are the same whatever the row count and whichever
 * rows share a pass (the vector path computes a group's R weight rows in the lanes of one
 * register, each lane on its own), so a row's numbers never depend on the rest of the batch.
 * A single row is the same code with one activation row. */

/* Row i (< R) of a group's block b: its 32 codes, in element order. */
static inline void group_codes(const uint8_t *blk, int i, uint8_t q[32]) {
    for (int t = 0; t < 4; t++)
        for (int e = 0; e < 4; e++) {
            uint8_t v = blk[32 * t + 4 * i + e];
            q[8 * t + e] = v & 0x0F;
            q[8 * t + 4 + e] = v >> 4;
        }
}

static inline float plain_block(const uint8_t q[32], float d, float m, const blk_a8 *a,
                                float *off) {
    int s = 0;
    for (int j = 0; j < QK; j++) s += q[j] * a->q[j];
    *off = fmaf(m, a->s, *off); /* fused, as the vector path's */
    return (float)s * (d * a->d);
}

#ifndef LM_AVX2
/* out[m * R + i] for a group's R rows (c, p at the group) and activation rows m < nact. */
static void group_plain(const uint8_t *c, const f16 *p, const blk_a8 *a, int nact, int nb,
                        float *out) {
    uint8_t q[32];
    for (int m = 0; m < nact; m++)
        for (int i = 0; i < R; i++) {
            float acc = 0.0f, off = 0.0f;
            for (int b = 0; b < nb; b++) {
                group_codes(c + (size_t)b * 128, i, q);
                const f16 *pb = p + (size_t)b * 2 * R;
                acc += plain_block(q, f16_to_f32(pb[i]), f16_to_f32(pb[R + i]),
                                   a + (size_t)m * nb + b, &off);
            }
            out[m * R + i] = acc + off;
        }
}
#endif

/* One activation row against nrows leftover rows (row layout). */
static void rows_plain(const uint8_t *c, const f16 *p, int nrows, const blk_a8 *a, int nb,
                       float *out) {
    uint8_t q[32];
    for (int i = 0; i < nrows; i++) {
        float acc = 0.0f, off = 0.0f;
        for (int b = 0; b < nb; b++) {
            size_t k = (size_t)i * nb + b;
            for (int j = 0; j < 16; j++) q[j] = c[16 * k + j] & 0x0F, q[j + 16] = c[16 * k + j] >> 4;
            acc += plain_block(q, f16_to_f32(p[2 * k]), f16_to_f32(p[2 * k + 1]), a + b, &off);
        }
        out[i] = acc + off;
    }
}

#ifdef LM_AVX2
static inline __m256 load8_f16(const f16 *h) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
#else
    float f[8];
    for (int i = 0; i < 8; i++) f[i] = f16_to_f32(h[i]);
    return _mm256_loadu_ps(f);
#endif
}

/* Lane i: row i's integer dot product of one block (w: the 8 unpacked code registers, chunk t
 * = elements 4t..4t+3 of each row; a: the activation block's 32 codes). */
static inline __m256i block_dot(const __m256i w[8], const int8_t *a) {
    const i32_any *a4 = (const i32_any *)a;
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}; /* two latency chains */
    for (int t = 0; t < 8; t++) {
#if defined(__AVXVNNI__)
        s[t & 1] = _mm256_dpbusd_avx_epi32(s[t & 1], w[t], _mm256_set1_epi32(a4[t]));
#else
        s[t & 1] = _mm256_dpbusd_epi32(s[t & 1], w[t], _mm256_set1_epi32(a4[t]));
#endif
    }
    return _mm256_add_epi32(s[0], s[1]);
#else /* pair sums of (0..15) x (-128..127) fit 16 bits, and so do eight of them */
    __m256i s16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(a4[0]));
    for (int t = 1; t < 8; t++)
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[t], _mm256_set1_epi32(a4[t])));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
}

/* A group's R rows against nact activation rows. Both weight streams are prefetched PF bytes
 * of codes ahead: a core's own prefetchers left this loop at about half the bandwidth it
 * reaches with them (72 against 217 us for a 3072 x 576 q4 weight). */
static inline __attribute__((always_inline)) void group_tile(const uint8_t *c, const f16 *p,
                                                             const blk_a8 *a, int nact, int nb,
                                                             float *out) {
    __m256 acc[MT], off[MT];
    for (int m = 0; m < nact; m++) acc[m] = off[m] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        const uint8_t *cb = c + (size_t)b * 128;
        const f16 *pb = p + (size_t)b * 2 * R;
        _mm_prefetch((const char *)cb + PF, _MM_HINT_T0);
        _mm_prefetch((const char *)cb + PF + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)pb + PF / 4, _MM_HINT_T0);
        __m256i w[8];
        for (int t = 0; t < 4; t++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(cb + 32 * t));
            w[2 * t] = _mm256_and_si256(raw, low);
            w[2 * t + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        }
        __m256 dv = load8_f16(pb), mv = load8_f16(pb + R);
        for (int m = 0; m < nact; m++) {
            const blk_a8 *am = a + (size_t)m * nb + b;
            __m256 sums = _mm256_cvtepi32_ps(block_dot(w, am->q));
            acc[m] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dv, _mm256_set1_ps(am->d)), acc[m]);
            off[m] = _mm256_fmadd_ps(mv, _mm256_set1_ps(am->s), off[m]);
        }
    }
    for (int m = 0; m < nact; m++) _mm256_storeu_ps(out + m * R, _mm256_add_ps(acc[m], off[m]));
}
#endif

/* out[m * R + i] for a full group (c, p at the group) and activation rows m < nact <= MT. */
static void dot_group(const uint8_t *c, const f16 *p, const blk_a8 *a, int nact, int nb,
                      float *out) {
#ifdef LM_AVX2
    switch (nact) { /* constant row counts: each pass compiled with its tile in registers */
    case 1: group_tile(c, p, a, 1, nb, out); break;
    case 2: group_tile(c, p, a, 2, nb, out); break;
    case 3: group_tile(c, p, a, 3, nb, out); break;
    default: group_tile(c, p, a, MT, nb, out); break; /* MT = 4 */
    }
#else
    group_plain(c, p, a, nact, nb, out);
#endif
}

#ifdef LM_AVX2
/* e^x in 8 lanes (softmax's shifted scores, SwiGLU's sigmoid): x = n ln2 + r with |r| <=
 * ln2 / 2, e^r by a degree-7 polynomial (Cephes' expf coefficients), times 2^n through the
 * exponent bits; relative error ~1e-7 against expf. Below -87 (e^x < 2^-125) it gives 0, above
 * 87 e^87. */
static inline __m256 exp8(__m256 x) {
    const __m256 floor_ = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, floor_, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, floor_), _mm256_set1_ps(87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}
#endif

/* The input a row feeds to the kernel: x itself, RMSNorm(x) * norm_w, or (swiglu) the row
 * holds gate | up, k each, and the input is silu(gate) * up. Fusing these saves the decode
 * step a dozen small torch ops per layer (~1 us each, more than the 4-bit matmuls' runtime
 * share at this model size). */
static void prep_row(const float *x, int k, const float *norm_w, float eps, int swiglu,
                     float *out) {
    if (swiglu) {
        int j = 0;
#ifdef LM_AVX2
        const __m256 one = _mm256_set1_ps(1.0f);
        for (; j + 8 <= k; j += 8) { /* the scalar line's operations, e^-x 8 at a time */
            __m256 g = _mm256_loadu_ps(x + j), e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            __m256 v = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(x + k + j));
            _mm256_storeu_ps(out + j, v);
        }
#endif
        for (; j < k; j++) out[j] = x[j] / (1.0f + expf(-x[j])) * x[k + j];
    } else if (norm_w) {
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int j = 0; j < k; j++) ss += x[j] * x[j];
        float r = 1.0f / sqrtf(ss / (float)k + eps);
        for (int j = 0; j < k; j++) out[j] = x[j] * r * norm_w[j];
    } else {
        memcpy(out, x, sizeof(float) * (size_t)k);
    }
}

/* y (rows, n_out) = f(x) (rows, k) @ W^T (+ bias), or y += that (accumulate): W is n_out rows
 * of k / 32 q4 blocks (`codes` and `scales` as above), f is prep_row's (x rows are 2k wide
 * with swiglu). Returns 0, or -1 when k is not a multiple of 32 or memory ran out. */
int lm_qlinear(const uint8_t *codes, const f16 *scales, int n_out, int k, const float *x,
               int rows, float *y, const float *bias, const float *norm_w, float eps,
               int swiglu, int accumulate) {
    if (k % QK != 0 || rows <= 0) return -1;
    int nb = k / QK;
    blk_a8 *a = (blk_a8 *)malloc(sizeof(blk_a8) * (size_t)nb * (size_t)rows);
    float *buf = (float *)malloc(sizeof(float) * (size_t)k * (size_t)rows);
    if (a == NULL || buf == NULL) {
        free(a), free(buf);
        return -1;
    }
    size_t width = swiglu ? 2 * (size_t)k : (size_t)k;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int r = 0; r < rows; r++) { /* each row alone, whoever computes it */
        float *row = buf + (size_t)r * k;
        prep_row(x + (size_t)r * width, k, norm_w, eps, swiglu, row);
        quantize_a8(row, a + (size_t)r * nb, nb);
    }
    free(buf);
    /* each group of R weight rows is streamed once; its blocks are unpacked once per MT
     * activation rows */
    int groups = n_out / R, left = n_out % R;
#pragma omp parallel for schedule(static)
    for (int g = 0; g <= groups; g++) {
        if (g == groups && left == 0) continue;
        int n0 = g * R, nrows = g < groups ? R : left;
        float out[MT * R];
        for (int r0 = 0; r0 < rows; r0 += MT) {
            int nact = rows - r0 < MT ? rows - r0 : MT;
            const blk_a8 *ar = a + (size_t)r0 * nb;
            if (g < groups) {
                size_t k0 = (size_t)g * nb;
                dot_group(codes + 128 * k0, scales + 2 * R * k0, ar, nact, nb, out);
            } else {
                size_t k0 = (size_t)groups * R * nb;
                for (int m = 0; m < nact; m++)
                    rows_plain(codes + 16 * k0, scales + 2 * k0, left, ar + (size_t)m * nb, nb,
                               out + m * R);
            }
            for (int m = 0; m < nact; m++) {
                float *yr = y + (size_t)(r0 + m) * n_out + n0;
                for (int i = 0; i < nrows; i++) {
                    float v = out[m * R + i] + (bias ? bias[n0 + i] : 0.0f);
                    yr[i] = accumulate ? yr[i] + v : v;
                }
            }
        }
    }
    free(a);
    return 0;
}

/* An int8 linear whose rows never see each other: W is n_out rows of k int8 weights (-127..127)
 * with one fp32 scale per row (w ~= ws[n] * q), each activation row is quantized on its own
 * (absmax / 127, after prep_row's norm when norm_w is given), and the dot products are summed
 * in 32-bit integers, which is exact: no order of summation, batch size or tiling changes a
 * result. Then y[r, n] = isum * (d_r * ws[n]) (+ bias), or y += that. Made for the vocabulary
 * head of the 4-bit runner, where fbgemm's dynamic linear, which quantizes all its rows with
 * one scale, would make a row's logits depend on the others. k must be a multiple of 32
 * (k < 2^17 keeps the sums within 32 bits). Returns 0, or -1 on bad sizes or out of memory.
 *
 * Layout (`lmloop.engine.kernels.Q8Linear` packs it): n_out / R groups of R rows, group g's
 * k / 4 chunks of 32 bytes at w + (g * k / 4 + t) * 32, byte 4 * i + e = row i's weight
 * 4t + e; then the rows left over, k bytes each. wsum[n]: the sum of row n's weights. */
#ifdef LM_AVX2
/* Lane m * R + i of out: group row i's dot product with activation row m < nact (k values
 * each, k apart; au: the rows + 128 as bytes, for VNNI's unsigned operand, wsum then takes the
 * offset back out). Integer sums: exact, however the chains split them. */
static inline __attribute__((always_inline)) void group_dot8(const int8_t *w, const int8_t *a,
                                                             const uint8_t *au, int nact, int k,
                                                             const int32_t *wsum,
                                                             int32_t *out) {
    __m256i s0[MT], s1[MT]; /* two latency chains a row: even and odd chunks */
    for (int m = 0; m < nact; m++) s0[m] = s1[m] = _mm256_setzero_si256();
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    (void)a;
    for (int t = 0; t < k / 4; t += 2) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + 32 * (size_t)t));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 32 * (size_t)t + 32));
        for (int m = 0; m < nact; m++) {
            const i32_any *u = (const i32_any *)(au + (size_t)m * k + 4 * t);
#if defined(__AVXVNNI__)
            s0[m] = _mm256_dpbusd_avx_epi32(s0[m], _mm256_set1_epi32(u[0]), w0);
            s1[m] = _mm256_dpbusd_avx_epi32(s1[m], _mm256_set1_epi32(u[1]), w1);
#else
            s0[m] = _mm256_dpbusd_epi32(s0[m], _mm256_set1_epi32(u[0]), w0);
            s1[m] = _mm256_dpbusd_epi32(s1[m], _mm256_set1_epi32(u[1]), w1);
#endif
        }
    }
    __m256i off = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)wsum), 7);
    for (int m = 0; m < nact; m++)
        _mm256_storeu_si256((__m256i *)(out + m * R),
                            _mm256_sub_epi32(_mm256_add_epi32(s0[m], s1[m]), off));
#else /* |a| x sign-moved w: pair sums within 16 bits (|a|, |w| <= 127) */
    (void)au, (void)wsum;
    const __m256i one = _mm256_set1_epi16(1);
    for (int t = 0; t < k / 4; t += 2) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + 32 * (size_t)t));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 32 * (size_t)t + 32));
        for (int m = 0; m < nact; m++) {
            const i32_any *a4 = (const i32_any *)(a + (size_t)m * k + 4 * t);
            __m256i a0 = _mm256_set1_epi32(a4[0]), a1 = _mm256_set1_epi32(a4[1]);
            __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(a0), _mm256_sign_epi8(w0, a0));
            __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(a1), _mm256_sign_epi8(w1, a1));
            s0[m] = _mm256_add_epi32(s0[m], _mm256_madd_epi16(p0, one));
            s1[m] = _mm256_add_epi32(s1[m], _mm256_madd_epi16(p1, one));
        }
    }
    for (int m = 0; m < nact; m++)
        _mm256_storeu_si256((__m256i *)(out + m * R), _mm256_add_epi32(s0[m], s1[m]));
#endif
}
#endif

int lm_qlinear8(const int8_t *w, const float *wscale, const int32_t *wsum, int n_out, int k,
                const float *x, int rows, float *y, const float *bias, const float *norm_w,
                float eps, int accumulate) {
    if (k % QK != 0 || k >= (1 << 17) || rows <= 0) return -1;
    int8_t *aq = (int8_t *)malloc(2 * (size_t)k * (size_t)rows);
    float *d = (float *)malloc(sizeof(float) * (size_t)rows);
    float *row = (float *)malloc(sizeof(float) * (size_t)k);
    if (aq == NULL || d == NULL || row == NULL) {
        free(aq), free(d), free(row);
        return -1;
    }
    uint8_t *au = (uint8_t *)(aq + (size_t)k * rows);
    for (int r = 0; r < rows; r++) {
        prep_row(x + (size_t)r * k, k, norm_w, eps, 0, row);
        float amax = absmax(row, k);
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[r] = amax / 127.0f;
        round_i8(row, k, id, 0.0f, aq + (size_t)r * k);
        for (int j = 0; j < k; j++) au[(size_t)r * k + j] = (uint8_t)(aq[(size_t)r * k + j] + 128);
    }
    free(row);
    int groups = n_out / R;
#pragma omp parallel for schedule(static)
    for (int g = 0; g <= groups; g++) {
        int n0 = g * R, nrows = g < groups ? R : n_out % R;
        const int8_t *wg = w + (size_t)n0 * k;
        for (int r0 = 0; r0 < rows && nrows > 0; r0 += MT) {
            int nact = rows - r0 < MT ? rows - r0 : MT;
            int32_t isum[MT * R];
            const int8_t *ar = aq + (size_t)r0 * k;
#ifdef LM_AVX2
            const uint8_t *aur = au + (size_t)r0 * k;
            if (g < groups) {
                _mm_prefetch((const char *)wg + PF, _MM_HINT_T0);
                switch (nact) { /* constant row counts, as dot_group's */
                case 1: group_dot8(wg, ar, aur, 1, k, wsum + n0, isum); break;
                case 2: group_dot8(wg, ar, aur, 2, k, wsum + n0, isum); break;
                case 3: group_dot8(wg, ar, aur, 3, k, wsum + n0, isum); break;
                default: group_dot8(wg, ar, aur, MT, k, wsum + n0, isum); break;
                }
            } else
#endif
            {
                for (int m = 0; m < nact; m++)
                    for (int i = 0; i < nrows; i++) {
                        int32_t s = 0;
                        for (int j = 0; j < k; j++) {
                            int8_t wv = g < groups ? wg[(size_t)(j / 4) * 32 + 4 * i + j % 4]
                                                   : wg[(size_t)i * k + j];
                            s += (int32_t)wv * ar[(size_t)m * k + j];
                        }
                        isum[m * R + i] = s;
                    }
            }
            for (int m = 0; m < nact; m++) {
                float *yr = y + (size_t)(r0 + m) * n_out + n0;
                for (int i = 0; i < nrows; i++) {
                    float v = (float)isum[m * R + i] * (d[r0 + m] * wscale[n0 + i]);
                    if (bias) v += bias[n0 + i];
                    yr[i] = accumulate ? yr[i] + v : v;
                }
            }
        }
    }
    free(aq), free(d);
    return 0;
}

/* Attention over one row's int8 keys and values for a group of query heads that share them
 * (grouped-query attention: nh <= 3 heads at a time). Each key or value row is loaded and
 * converted to fp32 once for the group, not once per head. A head's sums run in the same
 * order whichever heads share the pass, so its numbers do not depend on the grouping. */

/* p[h * ps + t] = q_h . k_t for heads h < nh (q_h = q + h * D), t < n; k rows int8, D apart.
 * The AVX2 path (D = 64) reduces four keys' sums at once: one horizontal sum per slot was most
 * of the attention's time at long spans. */
#ifdef LM_AVX2
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

static inline __m256 load_i8x8(const int8_t *x) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)x)));
}

static inline __attribute__((always_inline)) int scores64(const float *q, const int nh,
                                                          const int8_t *k, int n, float *p,
                                                          size_t ps) {
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        __m256 acc[3][4];
        for (int h = 0; h < nh; h++)
            for (int j = 0; j < 4; j++) acc[h][j] = _mm256_setzero_ps();
        for (int c = 0; c < 8; c++)
            for (int j = 0; j < 4; j++) {
                __m256 kv = load_i8x8(k + (size_t)(t + j) * 64 + 8 * c);
                for (int h = 0; h < nh; h++)
                    acc[h][j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * 64 + 8 * c), kv, acc[h][j]);
            }
        for (int h = 0; h < nh; h++)
            _mm_storeu_ps(p + h * ps + t, hsum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]));
    }
    return t;
}
#endif

static void scores(const float *q, int nh, const int8_t *k, int D, int n, float *p, size_t ps) {
    int t = 0;
#ifdef LM_AVX2
    if (D == 64) { /* constant head counts: the accumulators stay in registers */
        t = nh == 1 ? scores64(q, 1, k, n, p, ps)
          : nh == 2 ? scores64(q, 2, k, n, p, ps)
                    : scores64(q, 3, k, n, p, ps);
    }
#endif
    for (; t < n; t++) {
        const int8_t *kt = k + (size_t)t * D;
        for (int h = 0; h < nh; h++) {
            const float *qh = q + (size_t)h * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; d++) dot += qh[d] * (float)kt[d];
            p[h * ps + t] = dot;
        }
    }
}

/* out_h (D) = sum over t < n of w_h[t] * v_t for heads h < nh (w_h = w + h * ws, out_h =
 * out + h * D), v rows int8 (D apart). */
#ifdef LM_AVX2
static inline __attribute__((always_inline)) void mix64(const float *w, size_t ws, const int nh,
                                                       const int8_t *v, int n, float *out) {
    for (int half = 0; half < 2; half++) { /* 4 x 8 outputs a head at a time: 12 registers */
        __m256 acc[3][4];
        for (int h = 0; h < nh; h++)
            for (int c = 0; c < 4; c++) acc[h][c] = _mm256_setzero_ps();
        for (int t = 0; t < n; t++) {
            const int8_t *vt = v + (size_t)t * 64 + 32 * half;
            __m256 vv[4];
            for (int c = 0; c < 4; c++) vv[c] = load_i8x8(vt + 8 * c);
            for (int h = 0; h < nh; h++) {
                __m256 wt = _mm256_set1_ps(w[h * ws + t]);
                for (int c = 0; c < 4; c++) acc[h][c] = _mm256_fmadd_ps(wt, vv[c], acc[h][c]);
            }
        }
        for (int h = 0; h < nh; h++)
            for (int c = 0; c < 4; c++) _mm256_storeu_ps(out + h * 64 + 32 * half + 8 * c, acc[h][c]);
    }
}
#endif

static void mix(const float *w, size_t ws, int nh, const int8_t *v, int D, int n, float *out) {
#ifdef LM_AVX2
    if (D == 64) {
        if (nh == 1) mix64(w, ws, 1, v, n, out);
        else if (nh == 2) mix64(w, ws, 2, v, n, out);
        else mix64(w, ws, 3, v, n, out);
        return;
    }
#endif
    for (int h = 0; h < nh; h++) {
        float *o = out + (size_t)h * D;
        const float *wh = w + h * ws;
        for (int d = 0; d < D; d++) o[d] = 0.0f;
        for (int t = 0; t < n; t++) {
            const int8_t *vt = v + (size_t)t * D;
            for (int d = 0; d < D; d++) o[d] += wh[t] * (float)vt[d];
        }
    }
}


/* p (n scores) -> softmax(p * ks) * vs: a key's scale multiplies its score, a value's its
 * probability (so `mix` reads the int8 values as they are). */
static void softmax_scaled(float *p, int n, const float *ks, const float *vs) {
    int t = 0;
    float mx = -INFINITY, sum = 0.0f;
#ifdef LM_AVX2
    __m256 m8 = _mm256_set1_ps(-INFINITY), s8 = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + t), _mm256_loadu_ps(ks + t));
        _mm256_storeu_ps(p + t, x);
        m8 = _mm256_max_ps(m8, x);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m8);
    for (int i = 0; i < 8; i++) mx = fmaxf(mx, lanes[i]);
#endif
    for (int u = t; u < n; u++) mx = fmaxf(mx, p[u] *= ks[u]);
    t = 0;
#ifdef LM_AVX2
    __m256 mxv = _mm256_set1_ps(mx);
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), mxv));
        _mm256_storeu_ps(p + t, e);
        s8 = _mm256_add_ps(s8, e);
    }
    _mm256_storeu_ps(lanes, s8);
    for (int i = 0; i < 8; i++) sum += lanes[i];
#endif
    for (int u = t; u < n; u++) sum += (p[u] = expf(p[u] - mx));
    float inv = 1.0f / sum;
    for (int u = 0; u < n; u++) p[u] *= inv * vs[u];
}

/* One decode step's attention for cache rows 0..n-1 of layer `layer`, over an int8 KV cache
 * laid out as the fast runner's (layer, k|v, row, kv head, slot, dim) with one fp32 scale per
 * (layer, k|v, row, kv head, slot). Row r's new token sits at position pos[r]; h (n rows) =
 * q | k | v (H, Hkv, Hkv heads of D); queries carry 1/sqrt(D) already. Rotary positions
 * (x * cos + roll(x, D/2) * sin, rows pos[r] of the tables, sin's first half negated) go on q
 * and k; k and v are quantized (absmax / 127 per head, as the runner's quantize_rows) into
 * slot pos[r] of row r; then y (n, H * D) = softmax(q . k * k_scale) over that row's slots
 * 0..pos[r], times v * v_scale. With crow, row r of h is a token of cache row crow[r] (a
 * prompt's tokens: several rows of h to one cache row, at consecutive positions): every new
 * key and value is written before any row attends, so each token sees its own prompt's earlier
 * tokens, and its numbers are those it would get as a decode step at its position. crow NULL:
 * row r is cache row r. Returns 0, or -1 when memory ran out. */
int lm_attend(const float *h, int n, const int *pos, const int *crow, int H, int Hkv, int D,
              const float *cos_tab, const float *sin_tab, int8_t *kv, float *kv_scale, int layer,
              int B, int S, float *y) {
    size_t head = (size_t)S * D, part = (size_t)B * Hkv * head, width = (size_t)(H + 2 * Hkv) * D;
    int8_t *kc = kv + (size_t)layer * 2 * part, *vc = kc + part;
    float *ks = kv_scale + (size_t)layer * 2 * (part / D), *vs = ks + part / D;
    float *q = (float *)malloc(sizeof(float) * (size_t)n * (H + Hkv) * D);
    if (q == NULL) return -1;
    int half = D / 2, maxn = 0;
    for (int r = 0; r < n; r++)
        if (pos[r] + 1 > maxn) maxn = pos[r] + 1;
    /* each row's rotary and cache writes on its own (a thread's share of the rows) */
#pragma omp parallel for schedule(static) if (n > 1)
    for (int r = 0; r < n; r++) {
        const float *hr = h + r * width, *cos = cos_tab + (size_t)pos[r] * D;
        const float *sin = sin_tab + (size_t)pos[r] * D;
        float *qr = q + (size_t)r * (H + Hkv) * D;
        for (int t = 0; t < H + Hkv; t++) { /* rotary, queries then keys: x[(d + half) % D] */
            const float *x = hr + (size_t)t * D;
            float *o = qr + (size_t)t * D;
            for (int d = 0; d < half; d++) o[d] = x[d] * cos[d] + x[d + half] * sin[d];
            for (int d = half; d < D; d++) o[d] = x[d] * cos[d] + x[d - half] * sin[d];
        }
        size_t cr = crow ? (size_t)crow[r] : (size_t)r;
        for (int g = 0; g < Hkv; g++) { /* the new key and value into slot pos[r] of its row */
            size_t at = (cr * Hkv + g) * head + (size_t)pos[r] * D;
            size_t sat = (cr * Hkv + g) * S + pos[r];
            const float *src[2] = {qr + (size_t)(H + g) * D, hr + (size_t)(H + Hkv + g) * D};
            int8_t *dst[2] = {kc + at, vc + at};
            float *sc[2] = {ks + sat, vs + sat};
            for (int c = 0; c < 2; c++) {
                float scale = fmaxf(absmax(src[c], D), 1e-8f) / 127.0f;
                round_i8(src[c], D, 0.0f, scale, dst[c]);
                *sc[c] = scale;
            }
        }
    }
    /* A task: a row's kv group, its query heads three at a time (one at a time when there are
     * too few groups to keep every thread busy: the numbers are the same either way). */
    int rep = H / Hkv, per = n * Hkv >= 8 ? 3 : 1, chunks = (rep + per - 1) / per, failed = 0;
#pragma omp parallel for schedule(dynamic, 1) if ((size_t)n * H * maxn * D > 65536)
    for (int task = 0; task < n * Hkv * chunks; task++) {
        int r = task / (Hkv * chunks), g = task / chunks % Hkv, h0 = task % chunks * per;
        int nh = rep - h0 < per ? rep - h0 : per, m = pos[r] + 1;
        size_t rg = (crow ? (size_t)crow[r] : (size_t)r) * Hkv + g;
        const int8_t *kh = kc + rg * head, *vh = vc + rg * head;
        const float *ksh = ks + rg * S, *vsh = vs + rg * S;
        const float *qh = q + ((size_t)r * (H + Hkv) + (size_t)g * rep + h0) * D;
        float *out = y + ((size_t)r * H + (size_t)g * rep + h0) * D;
        float *p = (float *)malloc(sizeof(float) * (size_t)nh * m);
        if (p == NULL) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        scores(qh, nh, kh, D, m, p, (size_t)m);
        for (int h = 0; h < nh; h++) softmax_scaled(p + (size_t)h * m, m, ksh, vsh);
        mix(p, (size_t)m, nh, vh, D, m, out);
        free(p);
    }
    free(q);
    return failed ? -1 : 0;
}

/* A whole decode step's layers in one call (what `FastLlamaRunner._decode_fused` made 5 calls a
 * layer for): for each layer l, with its four 4-bit linears at w[4l .. 4l+3] (qkv, o, gate|up,
 * down; codes, scales, output and input sizes, bias or NULL) and its two norms,
 *   h = qkv(RMSNorm(x) * norm1[l]); y = attention(h) (lm_attend, layer l);
 *   x += o(y); g = gate_up(RMSNorm(x) * norm2[l]); x += down(silu(gate) * up).
 * The same functions in the same order as the five calls: the same numbers, without ~150
 * Python-to-C crossings a step (~2-3 us each). x (n, C) is updated in place; h, y and g are
 * the caller's scratch rows; crow as lm_attend's (NULL: row r is cache row r; else a prompt's
 * tokens, or a mix of prompts' tokens and decoding rows: each row's numbers are its own).
 * Returns 0, or -1 when memory ran out. */
int lm_decode_layers(int L, int n, const int *pos, const uint8_t *const *codes,
                     const f16 *const *scales, const int *n_out, const int *k_in,
                     const float *const *bias, const float *const *norm1,
                     const float *const *norm2, float eps, int H, int Hkv, int D,
                     const float *cos_tab, const float *sin_tab, int8_t *kv, float *kv_scale,
                     int B, int S, float *x, float *h, float *y, float *g, const int *crow) {
    for (int l = 0; l < L; l++) {
        int j = 4 * l;
        if (lm_qlinear(codes[j], scales[j], n_out[j], k_in[j], x, n, h, bias[j], norm1[l], eps,
                       0, 0) ||
            lm_attend(h, n, pos, crow, H, Hkv, D, cos_tab, sin_tab, kv, kv_scale, l, B, S, y) ||
            lm_qlinear(codes[j + 1], scales[j + 1], n_out[j + 1], k_in[j + 1], y, n, x,
                       bias[j + 1], NULL, 0.0f, 0, 1) ||
            lm_qlinear(codes[j + 2], scales[j + 2], n_out[j + 2], k_in[j + 2], x, n, g,
                       bias[j + 2], norm2[l], eps, 0, 0) ||
            lm_qlinear(codes[j + 3], scales[j + 3], n_out[j + 3], k_in[j + 3], g, n, x,
                       bias[j + 3], NULL, 0.0f, 1, 1))
            return -1;
    }
    return 0;
}

/* The k largest values of each row of x (rows, n), k <= n, largest first: vals (rows, k) and
 * their column indices idx (rows, k). A NaN ranks above every number (as torch.topk's does),
 * and of equal values the lower index comes first. What the sampler's top-p asks of
 * torch.topk, written here because torch's took ~0.2 ms a 49,152-wide row (7% of a 16-row
 * decode step): one pass keeps the k best in a min-heap, a vector compare against the heap's
 * least skips 8 values at a time (almost all of a row once the heap holds likely tokens), and
 * the heap is sorted at the end. Rows are split among the OpenMP team. Returns 0, or -1 on
 * bad sizes or when memory ran out. */
static inline uint64_t rank_key(float v, int i) { /* larger key: the better value */
    uint32_t b;
    memcpy(&b, &v, 4);
    b = v != v ? 0xFFFFFFFFu : (b & 0x80000000u) ? ~b : (b | 0x80000000u); /* float order */
    return ((uint64_t)b << 32) | (uint32_t)(0xFFFFFFFFu - (uint32_t)i);
}

static void sift_down(uint64_t *h, int k, int at) {
    for (;;) {
        int l = 2 * at + 1, m = at;
        if (l < k && h[l] < h[m]) m = l;
        if (l + 1 < k && h[l + 1] < h[m]) m = l + 1;
        if (m == at) return;
        uint64_t t = h[at];
        h[at] = h[m], h[m] = t, at = m;
    }
}

int lm_topk(const float *x, int rows, int n, int k, float *vals, int64_t *idx) {
    if (k <= 0 || k > n || rows <= 0) return -1;
    int failed = 0;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * n;
        uint64_t *h = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)k);
        if (h == NULL) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int i = 0; i < k; i++) h[i] = rank_key(row[i], i);
        for (int i = k / 2 - 1; i >= 0; i--) sift_down(h, k, i);
        /* a later column ranks below an equal value already held: only a larger value (or a
         * NaN) can enter, so the vector test is "not <=" the least held value */
        int i = k;
#ifdef LM_AVX2
        for (; i + 8 <= n; i += 8) {
            uint32_t lb = (uint32_t)(h[0] >> 32);
            lb = lb == 0xFFFFFFFFu ? lb : (lb & 0x80000000u) ? (lb & 0x7FFFFFFFu) : ~lb;
            float least;
            memcpy(&least, &lb, 4); /* the heap's least value, back from its key */
            __m256 gt = _mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(least), _CMP_NLE_UQ);
            int mask = _mm256_movemask_ps(gt);
            while (mask) {
                int j = i + __builtin_ctz(mask);
                mask &= mask - 1;
                uint64_t key = rank_key(row[j], j);
                if (key > h[0]) h[0] = key, sift_down(h, k, 0);
            }
        }
#endif
        for (; i < n; i++) {
            uint64_t key = rank_key(row[i], i);
            if (key > h[0]) h[0] = key, sift_down(h, k, 0);
        }
        for (int m = k - 1; m >= 0; m--) { /* pop the least into the last free place */
            int col = (int)(0xFFFFFFFFu - (uint32_t)h[0]);
            vals[(size_t)r * k + m] = row[col];
            idx[(size_t)r * k + m] = col;
            h[0] = h[m];
            sift_down(h, m, 0);
        }
        free(h);
    }
    return failed ? -1 : 0;
}

/* A token for each row of logits x (rows, n): what the sampler's top-p and min-p path draws
 * (`lmloop.engine.sampling.pick_batch` with `draw=`), in one call a row in place of ~20 torch
 * ops (0.43 ms a token at one row, 1.9 ms a 16-row step: 12% of a decode step). Row r:
 *   y = x / temp[r]; e = exp(y - max y) (8 lanes at a time where compiled with AVX2), Z = sum e;
 *   with top_p[r] < 1 the nucleus: the likeliest tokens (p = e / Z; of equal p the lower id
 *   first) kept until the mass before one reaches top_p (at least one is kept), then those
 *   below min_p[r] times the likeliest dropped; with top_p[r] >= 1 every token, less those
 *   below min_p[r] times the likeliest;
 *   then the first kept token, in vocabulary order, whose running mass reaches u[r] * (the
 *   kept mass): the inversion `draw` does, u[r] in (0, 1] from the row's own generator.
 * Every row's numbers are its own (rows are split among the OpenMP team), so a row draws the
 * same token alone or in any batch. token[r] = -1 where the row cannot be sampled (a NaN or
 * an infinite logit, or every logit -inf): total[r] is then the sum that was not finite or
 * positive; else total[r] is the kept mass. The nucleus is found without sorting the row:
 * tokens with e >= 1/16 are gathered, then >= 1/256, ... until the gathered mass reaches
 * top_p (none outside can then be in it), and only those are sorted. Returns 0, or -1 when
 * memory ran out. */
typedef struct {
    float e;
    int i;
} cand_t;

static int cand_order(const void *a, const void *b) { /* larger e first, then lower id */
    const cand_t *x = (const cand_t *)a, *y = (const cand_t *)b;
    if (x->e != y->e) return x->e > y->e ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

static int cand_id(const void *a, const void *b) {
    const cand_t *x = (const cand_t *)a, *y = (const cand_t *)b;
    return (x->i > y->i) - (x->i < y->i);
}

/* e[i] = exp(x[i] / t - max): the max in *m, the sum returned (NaN when a logit is NaN or
 * +inf, or every one is -inf: the row cannot be sampled) */
static float row_exp(const float *x, int n, float t, float *e, float *m) {
    float mx = -INFINITY;
    int bad = 0, i = 0;
#ifdef LM_AVX2
    __m256 tv = _mm256_set1_ps(t), mv = _mm256_set1_ps(-INFINITY);
    __m256 badv = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 y = _mm256_div_ps(_mm256_loadu_ps(x + i), tv);
        _mm256_storeu_ps(e + i, y);
        badv = _mm256_or_ps(badv, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
        mv = _mm256_max_ps(mv, y);
    }
    bad = _mm256_movemask_ps(badv) != 0;
    mx = hmax(mv);
#endif
    for (; i < n; i++) {
        float y = x[i] / t;
        e[i] = y;
        bad |= y != y;
        mx = fmaxf(mx, y);
    }
    *m = mx;
    if (bad || mx == INFINITY || mx == -INFINITY) return NAN;
    double z = 0.0; /* summed in double, as torch sums a float tensor */
    i = 0;
#ifdef LM_AVX2
    __m256 mb = _mm256_set1_ps(mx);
    __m256d zv = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        __m256 v = exp8(_mm256_sub_ps(_mm256_loadu_ps(e + i), mb));
        _mm256_storeu_ps(e + i, v);
        zv = _mm256_add_pd(zv, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
    }
    double zl[4];
    _mm256_storeu_pd(zl, zv);
    z = (zl[0] + zl[1]) + (zl[2] + zl[3]);
#endif
    for (; i < n; i++) z += (e[i] = expf(e[i] - mx));
    return (float)z;
}

/* tokens with lo <= e < hi appended to c (count returned), their e summed into *mass */
static int gather(const float *e, int n, float lo, float hi, cand_t *c, int nc, double *mass) {
    int i = 0;
#ifdef LM_AVX2
    __m256 lv = _mm256_set1_ps(lo), hv = _mm256_set1_ps(hi);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(e + i);
        int mask = _mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(v, lv, _CMP_GE_OQ), _mm256_cmp_ps(v, hv, _CMP_LT_OQ)));
        while (mask) {
            int j = i + __builtin_ctz(mask);
            mask &= mask - 1;
            c[nc].e = e[j], c[nc].i = j, nc++;
            *mass += e[j];
        }
    }
#endif
    for (; i < n; i++)
        if (e[i] >= lo && e[i] < hi) c[nc].e = e[i], c[nc].i = i, nc++, *mass += e[i];
    return nc;
}

static int64_t sample_row(const float *x, int n, float t, float top_p, float min_p, float u,
                          float *e, cand_t *c, float *total) {
    float mx, z = row_exp(x, n, t, e, &mx);
    if (!(isfinite(z) && z > 0.0f)) {
        *total = z;
        return -1;
    }
    if (top_p >= 1.0f) { /* every token, less those below min_p of the likeliest (e = 1) */
        float floor_ = min_p > 0.0f ? min_p * (1.0f / z) : 0.0f;
        double sum = 0.0;
        int last = 0;
        for (int i = 0; i < n; i++) {
            float p = e[i] / z;
            e[i] = p < floor_ ? 0.0f : p;
            sum += e[i];
            if (e[i] > 0.0f) last = i;
        }
        /* the running sums in double, each compared as a float: torch's cumsum, then
         * searchsorted against the float32 target */
        float target = (float)((double)u * (double)(float)sum);
        double run = 0.0;
        *total = (float)sum;
        for (int i = 0; i < n; i++) {
            run += e[i];
            if (e[i] > 0.0f && (float)run >= target) return i;
        }
        return last;
    }
    /* the nucleus lies among the tokens gathered once their mass reaches top_p of z */
    int nc = 0;
    double mass = 0.0;
    float hi = INFINITY, lo = 1.0f / 16.0f;
    for (;;) {
        nc = gather(e, n, lo, hi, c, nc, &mass);
        if (mass >= (double)top_p * z || lo == 0.0f) break;
        hi = lo;
        lo = lo < 1e-30f ? 0.0f : lo / 16.0f;
    }
    qsort(c, (size_t)nc, sizeof(cand_t), cand_order);
    int kept = 0;
    double run = 0.0;
    for (; kept < nc; kept++) { /* drop a token once the mass before it reaches top_p */
        float p = c[kept].e / z;
        run += p;
        if (kept > 0 && (float)run - p >= top_p) break;
        c[kept].e = p;
    }
    if (min_p > 0.0f) { /* then min-p against the likeliest */
        float floor_ = min_p * c[0].e;
        int k = 1;
        while (k < kept && !(c[k].e < floor_)) k++;
        kept = k;
    }
    qsort(c, (size_t)kept, sizeof(cand_t), cand_id); /* vocabulary order, as `draw` */
    double sum = 0.0;
    for (int k = 0; k < kept; k++) sum += c[k].e;
    *total = (float)sum;
    float target = (float)((double)u * (double)(float)sum);
    run = 0.0;
    for (int k = 0; k < kept; k++) {
        run += c[k].e;
        if ((float)run >= target) return c[k].i;
    }
    return c[kept - 1].i;
}

int lm_sample(const float *x, int rows, int n, const float *temp, const float *top_p,
              const float *min_p, const float *u, int64_t *token, float *total) {
    if (rows <= 0 || n <= 0) return -1;
    int failed = 0;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int r = 0; r < rows; r++) {
        /* a thread's scratch, kept from call to call: a fresh 0.6 MB is mapped and faulted in
         * page by page on every call, which took as long as the sampling itself */
        static _Thread_local float *e = NULL;
        static _Thread_local cand_t *c = NULL;
        static _Thread_local int cap = 0;
        if (cap < n) {
            free(e), free(c);
            e = (float *)malloc(sizeof(float) * (size_t)n);
            c = (cand_t *)malloc(sizeof(cand_t) * (size_t)n);
            cap = e && c ? n : 0;
            if (cap == 0) {
                free(e), free(c);
                e = NULL, c = NULL;
#pragma omp atomic write
                failed = 1;
                continue;
            }
        }
        token[r] = sample_row(x + (size_t)r * n, n, temp[r], top_p[r], min_p[r], u[r], e, c,
                              total + r);
    }
    return failed ? -1 : 0;
}
