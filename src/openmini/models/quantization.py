"""Weight formats of the linear layers, applied to a loaded model as a module transform.

Formats (``apply_weight_format``):

- ``float32``: exact mode (tests against transformers); nothing changes.
- ``bfloat16``: bf16 weights, bf16 matmuls (oneDNN); fast on CPUs with AMX or AVX512-BF16,
  slow on plain AVX2 (there the CPU converts every element).
- ``int8``: weight-only int8 (symmetric absmax/127).
- ``int4``: weight-only int4, asymmetric (min/max) per group of 32 inputs,
  ``w = (q - 8) * scale + zero`` (int8 for layers whose shape the int4 kernels reject).
  Group-32 affine 4-bit is the layout of GGUF ``Q4_0``/``Q4_1`` (ggml ``block_q4_1 = {d, m,
  qs[16]}``, ``w = d*q + m``), so re-quantizing such weights by group min/max recovers them.
- ``mixed``: per layer, ``int4`` when that is lossless (relative RMS error below
  ``INT4_LOSSLESS_RTOL``: the weights already sit on a 4-bit grid, as in Q4_0/Q4_1 GGUF
  files), else ``int8``.

Two backends run the quantized formats:

- native (x86 with AVX2 + FMA and a C compiler): the small AVX2 kernels in ``_NATIVE_SRC``,
  compiled once with ``cc`` into ``$OPENMINI_HOME/kernels`` and called through ``ctypes``.
  int8 has one scale per group of 32 inputs (lossless for GGUF ``Q8_0``), int4 as above with
  float32 scales. Activations are quantized per group of 32 to int16 (relative error ~2e-5,
  far below bfloat16's 4e-3) and multiplied with ``vpmaddwd``; 1.3-2x faster than the torch
  kernels below at batch 1. They share torch's OpenMP runtime and thread count.
- torch (fallback): ``torch.ops.aten._weight_int8pack_mm`` (one scale per row) and
  ``_weight_int4pack_mm_for_cpu`` (bf16 scales) on bfloat16 activations.

Both run the weight-only kernels for up to ``GEMM_MIN_ROWS`` rows (decode: reading the
weights dominates, 4-8x fewer bytes than float32) and dequantize to a float32 GEMM for more
rows (prefill: compute bound, where MKL's float32 GEMM is about 2x faster than the weight-only
kernels on AVX2). ``forward`` returns float32 (native) or bfloat16/float32 (torch).

``resolve_dtype_mode`` maps the model's ``dtype_mode`` to a format and a KV cache dtype,
choosing by the CPU's features for ``"auto"``. ``OPENMINI_NATIVE_KERNELS=0`` disables the
native backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from openmini.models.layers import Linear

DTYPE_MODES = ("auto", "float32", "bfloat16", "int8", "int4", "mixed")
# above this many rows, quantized layers dequantize and run a float32 GEMM
GEMM_MIN_ROWS = 32
GROUP = 32
# relative RMS error under which int4 re-quantization counts as lossless (a float weight
# quantized to 4 bits gives ~8%; Q4_0/Q4_1 weights give float rounding only)
INT4_LOSSLESS_RTOL = 0.01


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX tiles or AVX512-BF16 (bf16 GEMMs faster than fp32)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # torch without the probes
        return False


def resolve_dtype_mode(dtype_mode: str) -> tuple[str, torch.dtype]:
    """Map a ``dtype_mode`` to ``(linear weight format, KV cache dtype)``.

    - ``"float32"``: float32 weights and KV cache.
    - ``"auto"``: on CPUs with fast bf16 (AMX / AVX512-BF16) bfloat16 weights and KV cache;
      otherwise ``"mixed"`` int4/int8 weights and a float32 KV cache (attention over a bf16
      cache is 2-3x slower on AVX2 than over float32, measured with SDPA and bmm).
    - ``"bfloat16"`` / ``"int8"`` / ``"int4"`` / ``"mixed"``: that weight format, KV cache
      bfloat16 on fast-bf16 CPUs else float32.

    Raises:
        ValueError: unknown mode.
    """
    if dtype_mode not in DTYPE_MODES:
        raise ValueError(f"unknown dtype_mode {dtype_mode!r}; expected one of {DTYPE_MODES}")
    if dtype_mode == "float32":
        return "float32", torch.float32
    fast_bf16 = cpu_has_fast_bf16()
    kv_dtype = torch.bfloat16 if fast_bf16 else torch.float32
    if dtype_mode == "auto":
        return ("bfloat16" if fast_bf16 else "mixed"), kv_dtype
    return dtype_mode, kv_dtype


# ----------------------------------------------------------------------------------------
# native AVX2 kernels
# ----------------------------------------------------------------------------------------

_NATIVE_SRC = r"""
/* Kernels for x86 AVX2 + FMA (no AVX512 needed).
   Weight-only int4/int8 products y[M, N] (+)= x[M, K] @ W[N, K]^T, K a multiple of 32 (one
   group). Activations are quantized per group of 32 to int16 (xq = round(x / dx),
   dx = max|x| / 32767); group dot products use vpmaddwd (int16 pairs -> int32), then one
   float FMA per group with the weight scale times dx.
   int4 layout: row n, group g = 16 bytes, byte j = q[32g + j] | q[32g + 16 + j] << 4,
   w = s[n, g] * q + mn[n, g] (q in 0..15).  int8 layout: w = s[n, g] * q (q in -127..127).
   Also: RMSNorm, and decode attention over the paged KV cache with RoPE applied in place. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* xq [M, K] int16, dx [M, G] scales, xs [M, G] = dx * sum of the group's xq */
static void quantize_x(const float* x, int M, int K, int16_t* xq, float* dx, float* xs) {
    const int G = K / 32;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i ones = _mm256_set1_epi16(1);
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < G; g++) {
            const float* xr = x + (size_t)m * K + 32 * g;
            int16_t* qr = xq + (size_t)m * K + 32 * g;
            __m256 v[4];
            __m256 amax = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) {
                v[j] = _mm256_loadu_ps(xr + 8 * j);
                amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], absmask));
            }
            __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
            a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
            const float am = _mm_cvtss_f32(a4);
            const float d = am / 32767.f, id = am > 0.f ? 32767.f / am : 0.f;
            const __m256 vid = _mm256_set1_ps(id);
            /* round to nearest even (as lrintf), pack to int16 keeping element order */
            const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], vid));
            const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], vid));
            const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], vid));
            const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], vid));
            const __m256i p01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
            const __m256i p23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);
            _mm256_storeu_si256((__m256i*)qr, p01);
            _mm256_storeu_si256((__m256i*)(qr + 16), p23);
            const int sum = hsum8i(_mm256_add_epi32(_mm256_madd_epi16(p01, ones), _mm256_madd_epi16(p23, ones)));
            dx[(size_t)m * G + g] = d;
            xs[(size_t)m * G + g] = d * (float)sum;
        }
    }
}

static int alloc_x(int M, int K, int16_t** xq, float** dx, float** xs) {
    const int G = K / 32;
    *xq = (int16_t*)malloc(sizeof(int16_t) * (size_t)M * K);
    *dx = (float*)malloc(sizeof(float) * (size_t)M * G);
    *xs = (float*)malloc(sizeof(float) * (size_t)M * G);
    return *xq && *dx && *xs;
}

/* One weight row against 1 or 4 activation rows; accumulators stay in registers.
   int4 group g: w0 = low nibbles (k = 0..15), w1 = high nibbles (k = 16..31). */
#define Q4_UNPACK(wr, g, w0, w1)                                                    \
    const __m128i b_ = _mm_loadu_si128((const __m128i*)((wr) + 16 * (g)));          \
    const __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(b_, low4));               \
    const __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b_, 4), low4))
#define Q8_UNPACK(wr, g, w0, w1)                                                         \
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)((wr) + 32 * (g))));  \
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)((wr) + 32 * (g) + 16)))
#define GROUP_DOT(w0, w1, xr) \
    _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(xr))), \
                                        _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)((xr) + 16)))))

/* sum_g sr[g] * dx[g] * dot_g for one activation row; two accumulators break the FMA chain */
#define ROW1_LOOP(UNPACK)                                                               \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                          \
    int g = 0;                                                                          \
    for (; g + 2 <= G; g += 2) {                                                        \
        { UNPACK(wr, g, w0, w1);                                                        \
          a0 = _mm256_fmadd_ps(_mm256_set1_ps(sr[g] * dx0[g]), GROUP_DOT(w0, w1, x0 + 32 * g), a0); } \
        { UNPACK(wr, g + 1, w0, w1);                                                    \
          a1 = _mm256_fmadd_ps(_mm256_set1_ps(sr[g + 1] * dx0[g + 1]), GROUP_DOT(w0, w1, x0 + 32 * (g + 1)), a1); } \
    }                                                                                   \
    for (; g < G; g++) {                                                                \
        UNPACK(wr, g, w0, w1);                                                          \
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(sr[g] * dx0[g]), GROUP_DOT(w0, w1, x0 + 32 * g), a0); \
    }                                                                                   \
    const float dot = hsum8(_mm256_add_ps(a0, a1))

#define ROW4_LOOP(UNPACK)                                                               \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                          \
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                          \
    for (int g = 0; g < G; g++) {                                                       \
        UNPACK(wr, g, w0, w1);                                                          \
        const __m256 sg = _mm256_set1_ps(sr[g]);                                        \
        a0 = _mm256_fmadd_ps(_mm256_mul_ps(sg, _mm256_broadcast_ss(dx0 + g)), GROUP_DOT(w0, w1, x0 + 32 * g), a0); \
        a1 = _mm256_fmadd_ps(_mm256_mul_ps(sg, _mm256_broadcast_ss(dx1 + g)), GROUP_DOT(w0, w1, x1 + 32 * g), a1); \
        a2 = _mm256_fmadd_ps(_mm256_mul_ps(sg, _mm256_broadcast_ss(dx2 + g)), GROUP_DOT(w0, w1, x2 + 32 * g), a2); \
        a3 = _mm256_fmadd_ps(_mm256_mul_ps(sg, _mm256_broadcast_ss(dx3 + g)), GROUP_DOT(w0, w1, x3 + 32 * g), a3); \
    }

static inline float dot8(const float* a, const float* b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float r = hsum8(acc);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

static inline void put(float* y, float v, int accumulate) { *y = accumulate ? *y + v : v; }

/* accumulate: 0 -> y = x W^T, 1 -> y += x W^T */
int om_q4_gemm(const float* x, int M, int K, const uint8_t* qw, const float* s, const float* mn, int N, float* y,
               int accumulate) {
    const int G = K / 32;
    int16_t* xq; float* dx; float* xs;
    if (!alloc_x(M, K, &xq, &dx, &xs)) { free(xq); free(dx); free(xs); return 1; }
    quantize_x(x, M, K, xq, dx, xs);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t* wr = qw + (size_t)n * (K / 2);
        const float* sr = s + (size_t)n * G;
        const float* mr = mn + (size_t)n * G;
        int m = 0;
        for (; m + 4 <= M; m += 4) {
            const int16_t *x0 = xq + (size_t)m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            const float *dx0 = dx + (size_t)m * G, *dx1 = dx0 + G, *dx2 = dx1 + G, *dx3 = dx2 + G;
            ROW4_LOOP(Q4_UNPACK)
            const float* xs0 = xs + (size_t)m * G;
            put(y + (size_t)m * N + n, hsum8(a0) + dot8(mr, xs0, G), accumulate);
            put(y + (size_t)(m + 1) * N + n, hsum8(a1) + dot8(mr, xs0 + G, G), accumulate);
            put(y + (size_t)(m + 2) * N + n, hsum8(a2) + dot8(mr, xs0 + 2 * G, G), accumulate);
            put(y + (size_t)(m + 3) * N + n, hsum8(a3) + dot8(mr, xs0 + 3 * G, G), accumulate);
        }
        for (; m < M; m++) {
            const int16_t* x0 = xq + (size_t)m * K;
            const float* dx0 = dx + (size_t)m * G;
            ROW1_LOOP(Q4_UNPACK);
            put(y + (size_t)m * N + n, dot + dot8(mr, xs + (size_t)m * G, G), accumulate);
        }
    }
    free(xq); free(dx); free(xs);
    return 0;
}

int om_q8_gemm(const float* x, int M, int K, const int8_t* qw, const float* s, int N, float* y, int accumulate) {
    const int G = K / 32;
    int16_t* xq; float* dx; float* xs;
    if (!alloc_x(M, K, &xq, &dx, &xs)) { free(xq); free(dx); free(xs); return 1; }
    quantize_x(x, M, K, xq, dx, xs);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t* wr = qw + (size_t)n * K;
        const float* sr = s + (size_t)n * G;
        int m = 0;
        for (; m + 4 <= M; m += 4) {
            const int16_t *x0 = xq + (size_t)m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            const float *dx0 = dx + (size_t)m * G, *dx1 = dx0 + G, *dx2 = dx1 + G, *dx3 = dx2 + G;
            ROW4_LOOP(Q8_UNPACK)
            put(y + (size_t)m * N + n, hsum8(a0), accumulate);
            put(y + (size_t)(m + 1) * N + n, hsum8(a1), accumulate);
            put(y + (size_t)(m + 2) * N + n, hsum8(a2), accumulate);
            put(y + (size_t)(m + 3) * N + n, hsum8(a3), accumulate);
        }
        for (; m < M; m++) {
            const int16_t* x0 = xq + (size_t)m * K;
            const float* dx0 = dx + (size_t)m * G;
            ROW1_LOOP(Q8_UNPACK);
            put(y + (size_t)m * N + n, dot, accumulate);
        }
    }
    free(xq); free(dx); free(xs);
    return 0;
}

void om_q4_dequant(const uint8_t* qw, const float* s, const float* mn, int N, int K, float* w) {
    const int G = K / 32;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < G; g++) {
            const uint8_t* b = qw + (size_t)n * (K / 2) + 16 * g;
            float* wr = w + (size_t)n * K + 32 * g;
            const float sc = s[(size_t)n * G + g], z = mn[(size_t)n * G + g];
            for (int j = 0; j < 16; j++) {
                wr[j] = sc * (float)(b[j] & 15) + z;
                wr[j + 16] = sc * (float)(b[j] >> 4) + z;
            }
        }
    }
}

void om_q8_dequant(const int8_t* qw, const float* s, int N, int K, float* w) {
    const int G = K / 32;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int k = 0; k < K; k++) w[(size_t)n * K + k] = s[(size_t)n * G + k / 32] * (float)qw[(size_t)n * K + k];
    }
}

/* RMSNorm (Zhang & Sennrich 2019), HF formula: y = w * x / sqrt(mean(x^2) + eps); x, y [M, K]. */
void om_rms_norm(const float* x, const float* w, float eps, int M, int K, float* y) {
    for (int m = 0; m < M; m++) {
        const float* xr = x + (size_t)m * K;
        float* yr = y + (size_t)m * K;
        __m256 acc = _mm256_setzero_ps();
        int k = 0;
        for (; k + 8 <= K; k += 8) { const __m256 v = _mm256_loadu_ps(xr + k); acc = _mm256_fmadd_ps(v, v, acc); }
        float ss = hsum8(acc);
        for (; k < K; k++) ss += xr[k] * xr[k];
        const float r = 1.0f / sqrtf(ss / (float)K + eps);
        for (k = 0; k < K; k++) yr[k] = w[k] * (xr[k] * r);
    }
}

/* rotate interleaved pairs of one head: (x0, x1) -> (x0 c - x1 s, x0 s + x1 c) */
static inline void rope_head(const float* x, const float* cs, int D, float* o) {
    for (int i = 0; i < D / 2; i++) {
        const float a = x[2 * i], b = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        o[2 * i] = a * c - b * s;
        o[2 * i + 1] = a * s + b * c;
    }
}

/* Decode step of attention over a paged float32 KV cache [2, NB, BS, Hkv, D]: one new token
   per sequence. Row b of qkv (at qkv + b * qkv_stride) holds q [H, D], k [Hkv, D], v [Hkv, D]
   before RoPE; rope [B, D/2, 2] holds (cos, sin) of each token's position. Rotates q and k,
   writes k and v at slots[b], then for every query head computes softmax(scale q.K^T) V over
   the sequence's seq_lens[b] tokens, located through block_tables [B, MB]. out [B, H, D].
   D % 8 == 0, D <= 256. Returns nonzero when a buffer could not be allocated. */
int om_paged_decode(const float* qkv, int64_t qkv_stride, const float* rope, const int64_t* slots, float* cache,
                    int64_t num_blocks, int bs, const int64_t* block_tables, int max_blocks,
                    const int64_t* seq_lens, int B, int H, int Hkv, int D, float scale, float* out) {
    const size_t row = (size_t)Hkv * D, plane = (size_t)num_blocks * bs * row;
    float* qr = (float*)malloc(sizeof(float) * (size_t)B * H * D);
    if (!qr) return 1;
    for (int b = 0; b < B; b++) {
        const float* src = qkv + (size_t)b * qkv_stride;
        const float* cs = rope + (size_t)b * D;
        for (int h = 0; h < H; h++) rope_head(src + (size_t)h * D, cs, D, qr + ((size_t)b * H + h) * D);
        float* kdst = cache + (size_t)slots[b] * row;
        for (int h = 0; h < Hkv; h++) rope_head(src + (size_t)(H + h) * D, cs, D, kdst + (size_t)h * D);
        memcpy(cache + plane + (size_t)slots[b] * row, src + (size_t)(H + Hkv) * D, sizeof(float) * row);
    }
    const int G = H / Hkv, nd = D / 8;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = (bh % H) / G;
        const int64_t S = seq_lens[b];
        const int64_t* bt = block_tables + (size_t)b * max_blocks;
        float* sc = (float*)malloc(sizeof(float) * (size_t)S);
        if (!sc) { failed = 1; continue; }
        __m256 q8[32];
        for (int d = 0; d < nd; d++) q8[d] = _mm256_loadu_ps(qr + (size_t)bh * D + 8 * d);
        float mx = -INFINITY;
        for (int64_t t0 = 0, j = 0; t0 < S; t0 += bs, j++) {
            const int n = S - t0 < bs ? (int)(S - t0) : bs;
            const float* kb = cache + (size_t)bt[j] * bs * row + (size_t)h * D;
            for (int o = 0; o < n; o++) {
                const float* kr = kb + (size_t)o * row;
                __m256 acc = _mm256_mul_ps(q8[0], _mm256_loadu_ps(kr));
                for (int d = 1; d < nd; d++) acc = _mm256_fmadd_ps(q8[d], _mm256_loadu_ps(kr + 8 * d), acc);
                const float v = scale * hsum8(acc);
                sc[t0 + o] = v;
                mx = v > mx ? v : mx;
            }
        }
        float sum = 0.f;
        for (int64_t t = 0; t < S; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
        __m256 o8[32];
        for (int d = 0; d < nd; d++) o8[d] = _mm256_setzero_ps();
        for (int64_t t0 = 0, j = 0; t0 < S; t0 += bs, j++) {
            const int n = S - t0 < bs ? (int)(S - t0) : bs;
            const float* vb = cache + plane + (size_t)bt[j] * bs * row + (size_t)h * D;
            for (int o = 0; o < n; o++) {
                const float* vr = vb + (size_t)o * row;
                const __m256 p = _mm256_set1_ps(sc[t0 + o]);
                for (int d = 0; d < nd; d++) o8[d] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * d), o8[d]);
            }
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (int d = 0; d < nd; d++) _mm256_storeu_ps(out + (size_t)bh * D + 8 * d, _mm256_mul_ps(o8[d], inv));
        free(sc);
    }
    free(qr);
    return failed;
}
"""


def _kernel_dir() -> Path:
    return Path(os.environ.get("OPENMINI_HOME") or Path.home() / ".cache" / "openmini") / "kernels"


class NativeKernels:
    """The compiled ``_NATIVE_SRC`` kernels, loaded with ``ctypes``.

    Use ``NativeKernels.load()``; it returns None where the backend is unavailable.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i = ctypes.c_void_p, ctypes.c_int
        self.q4_gemm = lib.om_q4_gemm
        self.q4_gemm.argtypes = [p, i, i, p, p, p, i, p, i]
        self.q4_gemm.restype = ctypes.c_int
        self.q8_gemm = lib.om_q8_gemm
        self.q8_gemm.argtypes = [p, i, i, p, p, i, p, i]
        self.q8_gemm.restype = ctypes.c_int
        self.q4_dequant = lib.om_q4_dequant
        self.q4_dequant.argtypes = [p, p, p, i, i, p]
        self.q4_dequant.restype = None
        self.q8_dequant = lib.om_q8_dequant
        self.q8_dequant.argtypes = [p, p, i, i, p]
        self.q8_dequant.restype = None
        self.rms_norm_fn = lib.om_rms_norm
        self.rms_norm_fn.argtypes = [p, p, ctypes.c_float, i, i, p]
        self.rms_norm_fn.restype = None
        self.paged_decode_fn = lib.om_paged_decode
        i64 = ctypes.c_int64
        self.paged_decode_fn.argtypes = [p, i64, p, p, p, i64, i, p, i, p, i, i, i, i, ctypes.c_float, p]
        self.paged_decode_fn.restype = ctypes.c_int

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """HF RMSNorm of x [T, d] float32 (contiguous) with weight [d] -> [T, d] float32."""
        y = torch.empty_like(x)
        self.rms_norm_fn(x.data_ptr(), weight.data_ptr(), eps, x.shape[0], x.shape[1], y.data_ptr())
        return y

    def paged_decode(
        self,
        qkv: torch.Tensor,
        rope: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        num_heads: int,
        scale: float,
    ) -> torch.Tensor:
        """RoPE, K/V write and attention of a step where every sequence decodes one token.

        Args:
            qkv: [B, (H + 2 Hkv) * D] float32 projections before RoPE, q/k rows in the
                interleaved pair layout; rows may be strided, each row contiguous.
            rope: [B, D/2, 2] float32 (cos, sin) of each token's position (contiguous).
            kv_cache: [2, num_blocks, block_size, Hkv, D] float32 contiguous, updated in place.
            slot_mapping: [B] int64; block_tables: [B, max_blocks] int64; seq_lens: [B] int64.
            num_heads: H.
            scale: softmax scale.

        Returns:
            [B, H, D] float32.

        Raises:
            MemoryError: the kernel could not allocate a buffer.
        """
        B = qkv.shape[0]
        _, num_blocks, bs, Hkv, D = kv_cache.shape
        out = torch.empty(B, num_heads, D)
        status = self.paged_decode_fn(
            qkv.data_ptr(), qkv.stride(0), rope.data_ptr(), slot_mapping.data_ptr(), kv_cache.data_ptr(),
            num_blocks, bs, block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(), B, num_heads,
            Hkv, D, scale, out.data_ptr(),
        )
        _check_status(status)
        return out

    @staticmethod
    def supports_decode(qkv: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether ``paged_decode`` takes these tensors (float32, contiguous rows, D % 8 == 0)."""
        D = kv_cache.shape[-1]
        return (
            kv_cache.dtype == torch.float32
            and qkv.dtype == torch.float32
            and D % 8 == 0
            and D <= 256
            and qkv.stride(1) == 1
            and kv_cache.is_contiguous()
        )

    @classmethod
    def load(cls) -> "NativeKernels | None":
        """Compile (once, cached by source hash) and load the kernels.

        Returns None, never raising, when ``OPENMINI_NATIVE_KERNELS=0``, the CPU lacks
        AVX2/FMA, or no C compiler (``$CC``, else ``cc``) builds the source.
        """
        if os.environ.get("OPENMINI_NATIVE_KERNELS", "1") == "0":
            return None
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return None
        tag = hashlib.sha256(_NATIVE_SRC.encode()).hexdigest()[:16]
        path = _kernel_dir() / f"openmini_quant_{tag}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                    src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
                    src.write_text(_NATIVE_SRC)
                    cmd = [os.environ.get("CC", "cc"), "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
                    subprocess.run([*cmd, str(src), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=120)
                    os.replace(out, path)  # atomic: concurrent processes never load a partial file
            return cls(ctypes.CDLL(str(path)))
        except (OSError, subprocess.SubprocessError):
            return None


# ----------------------------------------------------------------------------------------
# quantized linear layers
# ----------------------------------------------------------------------------------------


def _bias_add(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (bf16 or fp32) + fp32 bias -> fp32 (one op; keeps large biases exact)."""
    return y if bias is None else torch.add(bias, y)


def _check_status(status: int) -> None:
    if status:
        raise MemoryError("a native kernel could not allocate its work buffer")


class BF16Linear(nn.Module):
    """Linear layer with bfloat16 weights; bf16 matmul, bias added in float32."""

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))  # [out, in]
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out] (bfloat16 without bias, else float32)."""
        return _bias_add(F.linear(x.to(torch.bfloat16), self.weight), self.bias)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual += self(x)`` in place; returns residual [T, out] float32."""
        return residual.add_(self.forward(x))


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer (symmetric, absmax / 127).

    Native backend: one float32 scale per group of 32 inputs (``scales`` [out, in/32]).
    Torch backend: one bfloat16 scale per output row (``scales`` [out]).

    Args:
        linear: the float32 layer to quantize.
        kernels: native kernels, or None for the torch backend.
    """

    def __init__(self, linear: Linear, kernels: NativeKernels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = K, N = linear.in_features, linear.out_features
        self.kernels = kernels if K % GROUP == 0 else None
        w = linear.weight.detach().float()  # [out, in]
        if self.kernels is not None:
            g = w.view(N, K // GROUP, GROUP)
            scales = (g.abs().amax(-1) / 127.0).clamp(min=1e-30)  # [N, G]
            q = torch.round(g / scales[..., None]).clamp(-127, 127).to(torch.int8).view(N, K)
        else:
            scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)  # [N]
            q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q.contiguous())  # [out, in] int8
        self.register_buffer("scales", scales.contiguous())
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32 weight this layer multiplies by."""
        N, K = self.out_features, self.in_features
        if self.kernels is not None:
            w = torch.empty(N, K)
            self.kernels.q8_dequant(self.weight.data_ptr(), self.scales.data_ptr(), N, K, w.data_ptr())
            return w
        return self.weight.float().mul_(self.scales.float()[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out] (float32; bfloat16 for the torch kernel without bias)."""
        M = x.shape[0]
        if M > GEMM_MIN_ROWS:
            return F.linear(x.float(), self.dequantized(), self.bias)
        if self.kernels is None:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales)
            return _bias_add(y, self.bias)
        return self._native(x, torch.empty(M, self.out_features), 0)

    def _native(self, x: torch.Tensor, y: torch.Tensor, accumulate: int) -> torch.Tensor:
        x = x.float().contiguous()
        _check_status(
            self.kernels.q8_gemm(
                x.data_ptr(), x.shape[0], self.in_features, self.weight.data_ptr(), self.scales.data_ptr(),
                self.out_features, y.data_ptr(), accumulate,
            )
        )
        return y if self.bias is None else y.add_(self.bias)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual += self(x)`` in place; returns residual [T, out] float32 (contiguous)."""
        if self.kernels is not None and x.shape[0] <= GEMM_MIN_ROWS and residual.is_contiguous():
            return self._native(x, residual, 1)
        return residual.add_(self.forward(x))


class Int4Linear(nn.Module):
    """Weight-only int4 per group of 32 inputs: ``w = (q - 8) * scale + zero``, q in 0..15.

    Native backend: nibbles packed as in ``_NATIVE_SRC``, float32 ``scales`` and ``mins``
    ([out, in/32]; ``min = zero - 8 * scale``). Torch backend: the packed layout of
    ``_convert_weight_to_int4pack_for_cpu`` with bfloat16 scales/zeros, plus ``q - 8`` as int8
    to dequantize for the GEMM path.

    Args:
        linear: the float32 layer to quantize (``int4_supported`` shape).
        kernels: native kernels, or None for the torch backend.
    """

    def __init__(self, linear: Linear, kernels: NativeKernels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = K, N = linear.in_features, linear.out_features
        self.kernels = kernels
        q, scale, zero, _ = int4_quantize(linear.weight.detach(), bf16_scales=kernels is None)
        if kernels is not None:
            g = q.view(N, K // GROUP, 2, GROUP // 2)  # halves of each group
            self.register_buffer("weight", (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, K // 2).contiguous())
            self.register_buffer("scales", scale.contiguous())  # [N, G]
            self.register_buffer("mins", (zero - 8 * scale).contiguous())  # [N, G]
        else:
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            self.register_buffer("scales_zeros", sz)  # [G, N, 2] bf16
            self.register_buffer("q_centered", (q.to(torch.int16) - 8).to(torch.int8).view(N, K // GROUP, GROUP))
            self.register_buffer("scale_f32", scale[..., None].contiguous())  # [N, G, 1]
            self.register_buffer("zero_f32", zero[..., None].contiguous())  # [N, G, 1]
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32 weight this layer multiplies by."""
        N, K = self.out_features, self.in_features
        if self.kernels is not None:
            w = torch.empty(N, K)
            self.kernels.q4_dequant(self.weight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), N, K, w.data_ptr())
            return w
        return torch.addcmul(self.zero_f32, self.q_centered.float(), self.scale_f32).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out] (float32; bfloat16 for the torch kernel without bias)."""
        M = x.shape[0]
        if M > GEMM_MIN_ROWS:
            return F.linear(x.float(), self.dequantized(), self.bias)
        if self.kernels is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, GROUP, self.scales_zeros)
            return _bias_add(y, self.bias)
        return self._native(x, torch.empty(M, self.out_features), 0)

    def _native(self, x: torch.Tensor, y: torch.Tensor, accumulate: int) -> torch.Tensor:
        x = x.float().contiguous()
        _check_status(
            self.kernels.q4_gemm(
                x.data_ptr(), x.shape[0], self.in_features, self.weight.data_ptr(), self.scales.data_ptr(),
                self.mins.data_ptr(), self.out_features, y.data_ptr(), accumulate,
            )
        )
        return y if self.bias is None else y.add_(self.bias)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual += self(x)`` in place; returns residual [T, out] float32 (contiguous)."""
        if self.kernels is not None and x.shape[0] <= GEMM_MIN_ROWS and residual.is_contiguous():
            return self._native(x, residual, 1)
        return residual.add_(self.forward(x))


def int4_quantize(
    w: torch.Tensor, bf16_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantization per group of 32 along the input dimension (min/max).

    Args:
        w: [N, K] float weight, K a multiple of 32.
        bf16_scales: round scale and zero to bfloat16 first (what the torch kernel reads).

    Returns:
        ``(q [N, K] uint8 in 0..15, scale [N, K/32] f32, zero [N, K/32] f32, w_hat [N, K] f32)``
        with ``w_hat = (q - 8) * scale + zero``.

    Raises:
        ValueError: K not a multiple of 32.
    """
    N, K = w.shape
    if K % GROUP:
        raise ValueError(f"int4 needs in_features divisible by {GROUP}, got {K}")
    g = w.float().reshape(N, K // GROUP, GROUP)  # [N, G, 32]
    lo, hi = g.amin(-1), g.amax(-1)  # [N, G]
    scale = ((hi - lo) / 15).clamp(min=1e-30)  # [N, G]
    zero = lo + 8 * scale  # [N, G]
    if bf16_scales:
        scale, zero = scale.to(torch.bfloat16).float(), zero.to(torch.bfloat16).float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)  # [N, G, 32]
    w_hat = ((q - 8) * scale[..., None] + zero[..., None]).view(N, K)
    return q.view(N, K).to(torch.uint8), scale, zero, w_hat


def int4_supported(w: torch.Tensor) -> bool:
    """Whether the int4 kernels take a [N, K] weight (K % 32 == 0 and N % 16 == 0)."""
    return w.shape[1] % GROUP == 0 and w.shape[0] % 16 == 0


def int4_is_lossless(w: torch.Tensor) -> bool:
    """Whether ``int4_quantize`` reproduces ``w`` [N, K] within ``INT4_LOSSLESS_RTOL`` (RMS)."""
    if not int4_supported(w):
        return False
    _, _, _, w_hat = int4_quantize(w)
    err = (w_hat - w.float()).pow(2).mean().sqrt()
    return bool(err <= INT4_LOSSLESS_RTOL * w.float().pow(2).mean().sqrt())


def apply_weight_format(model: nn.Module, fmt: str, kernels: NativeKernels | None = None) -> nn.Module:
    """Replace every float32 ``Linear`` of a loaded model by the ``fmt`` version, in place.

    Args:
        model: a model whose weights are loaded (float32).
        fmt: ``"float32"`` (no change), ``"bfloat16"``, ``"int8"``, ``"int4"`` or ``"mixed"``.
        kernels: native kernels for the int formats (``NativeKernels.load()``), or None for
            the torch backend. With kernels, modules with a ``kernels`` attribute
            (``RMSNorm``, ``Attention``) get them as well.

    Returns:
        The same model.

    Raises:
        ValueError: unknown format.

    ``"int4"`` falls back to int8 for layers the int4 kernels cannot take
    (``int4_supported``).
    """
    if fmt == "float32":
        return model
    if fmt not in ("bfloat16", "int8", "int4", "mixed"):
        raise ValueError(f"unknown weight format {fmt!r}")
    for module in list(model.modules()):
        if kernels is not None and fmt != "bfloat16" and hasattr(module, "kernels"):
            module.kernels = kernels  # RMSNorm and Attention use the native kernels too
        for name, child in list(module.named_children()):
            if not isinstance(child, Linear):
                continue
            if fmt == "bfloat16":
                new: nn.Module = BF16Linear(child)
            elif fmt == "int8":
                new = Int8Linear(child, kernels)
            elif fmt == "int4" and int4_supported(child.weight):
                new = Int4Linear(child, kernels)
            elif fmt == "mixed" and int4_is_lossless(child.weight):
                new = Int4Linear(child, kernels)
            else:
                new = Int8Linear(child, kernels)
            setattr(module, name, new)
    return model
