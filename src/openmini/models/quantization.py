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
weights dominates, 4-8x fewer bytes than float32) and dequantize to a GEMM for more rows
(prefill: compute bound; MKL's float32 GEMM is about 2x faster than the weight-only kernels
on AVX2; on AMX / AVX512-BF16 CPUs the GEMM runs in bfloat16). ``forward`` returns float32
(native) or bfloat16/float32 (torch).

``resolve_dtype_mode`` maps the model's ``dtype_mode`` to a format and a KV cache dtype,
choosing by the CPU's features for ``"auto"``. ``OPENMINI_NATIVE_KERNELS=0`` disables the
native backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from openmini.models.attention import RowSplit
from openmini.models.layers import Linear

_log = logging.getLogger(__name__)

DTYPE_MODES = ("auto", "float32", "bfloat16", "int8", "int4", "mixed")
# above this many rows, quantized layers dequantize and run a float32 GEMM (measured
# crossover of the native kernels against dequantize + MKL sgemm on AVX2: 16-24 rows)
GEMM_MIN_ROWS = 16
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
    - ``"auto"``: ``"mixed"`` int4/int8 weights where the native kernels load (any x86 CPU
      with AVX2 + FMA and a C compiler); else ``"bfloat16"`` on CPUs with AMX /
      AVX512-BF16; else ``"mixed"`` on the torch kernels.
    - ``"bfloat16"`` / ``"int8"`` / ``"int4"`` / ``"mixed"``: that weight format.

    The KV cache is bfloat16 on fast-bf16 CPUs, else float32: on AVX2 both attention paths
    are faster over float32 (SDPA 2-3x; the native kernel ~1.5x, it converts bf16 on load).
    All attention paths accept either dtype, so a caller short of memory may allocate a
    bfloat16 cache instead (half the bytes; top-1 agreement 99.75% on SmolLM2, measured).

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
        native = NativeKernels.load() is not None
        return ("bfloat16" if fast_bf16 and not native else "mixed"), kv_dtype
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
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* below this many multiply-adds a kernel runs on the calling thread only: waking the
   OpenMP team costs microseconds, and much more when another process holds the other core */
#define PARALLEL_MIN_WORK (1 << 16)
/* decode attention splits each sequence into pieces of this many context tokens */
#define DECODE_SPLIT_TOKENS 256

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

/* e^x for 8 floats: x = n ln2 + r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial
   (relative error < 1e-7), 2^n through the exponent bits. Inputs clamped to [-87, 88]. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* SwiGLU gate: out[m, i] = silu(gu[m, i]) * gu[m, I + i], silu(g) = g / (1 + e^-g); gu [M, 2I]. */
void om_silu_mul(const float* gu, int M, int I, float* out) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int m = 0; m < M; m++) {
        const float* g = gu + (size_t)m * 2 * I;
        const float* u = g + I;
        float* o = out + (size_t)m * I;
        int i = 0;
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
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

/* sum_g sr[g] * dx[g] * dot_g for one activation row, with exactly the operations (and
   their order) ROW4_LOOP does for each of its rows: a row's result never depends on how
   many rows the call has or where the row sits (batch invariance) */
#define ROW1_LOOP(UNPACK)                                                               \
    __m256 a0 = _mm256_setzero_ps();                                                    \
    for (int g = 0; g < G; g++) {                                                       \
        UNPACK(wr, g, w0, w1);                                                          \
        const __m256 sg = _mm256_set1_ps(sr[g]);                                        \
        a0 = _mm256_fmadd_ps(_mm256_mul_ps(sg, _mm256_broadcast_ss(dx0 + g)), GROUP_DOT(w0, w1, x0 + 32 * g), a0); \
    }                                                                                   \
    const float dot = hsum8(a0)

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
    #pragma omp parallel for schedule(static) if ((int64_t)M * N * K >= PARALLEL_MIN_WORK)
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
    #pragma omp parallel for schedule(static) if ((int64_t)M * N * K >= PARALLEL_MIN_WORK)
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
    const __m128i low4 = _mm_set1_epi8(0x0F);
    #pragma omp parallel for schedule(static) if ((int64_t)N * K >= PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < G; g++) {
            const __m128i b = _mm_loadu_si128((const __m128i*)(qw + (size_t)n * (K / 2) + 16 * g));
            const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
            const __m256 sc = _mm256_set1_ps(s[(size_t)n * G + g]), z = _mm256_set1_ps(mn[(size_t)n * G + g]);
            float* wr = w + (size_t)n * K + 32 * g;
            _mm256_storeu_ps(wr, _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), z));
            _mm256_storeu_ps(wr + 8, _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), z));
            _mm256_storeu_ps(wr + 16, _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), z));
            _mm256_storeu_ps(wr + 24, _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), z));
        }
    }
}

void om_q8_dequant(const int8_t* qw, const float* s, int N, int K, float* w) {
    const int G = K / 32;
    #pragma omp parallel for schedule(static) if ((int64_t)N * K >= PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < G; g++) {
            const int8_t* q = qw + (size_t)n * K + 32 * g;
            const __m256 sc = _mm256_set1_ps(s[(size_t)n * G + g]);
            float* wr = w + (size_t)n * K + 32 * g;
            for (int j = 0; j < 4; j++) {
                const __m128i v = _mm_loadl_epi64((const __m128i*)(q + 8 * j));
                _mm256_storeu_ps(wr + 8 * j, _mm256_mul_ps(sc, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
            }
        }
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

/* 8 cache elements as floats: float32 or bfloat16 (upper half of a float32) */
static inline __m256 load8(const void* p, int bf16) {
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
    return _mm256_loadu_ps((const float*)p);
}

/* store n floats (n % 8 == 0) as float32 or bfloat16 (round to nearest even) */
static inline void store_row(void* dst, const float* src, int n, int bf16) {
    if (!bf16) { memcpy(dst, src, sizeof(float) * (size_t)n); return; }
    uint16_t* d = (uint16_t*)dst;
    for (int i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, src + i, 4);
        d[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

/* Scores of 8 tokens for one query: 8 independent FMA chains, reduced by one hadd tree. */
static inline __attribute__((always_inline)) __m256 dot8_tokens(const __m256* q8, int nd, const char* kh,
                                                                 const int64_t* off, int es, int bf16) {
    __m256 acc[8];
    for (int i = 0; i < 8; i++) {
        const char* kr = kh + off[i] * es;
        __m256 a = _mm256_mul_ps(q8[0], load8(kr, bf16));
        for (int d = 1; d < nd; d++) a = _mm256_fmadd_ps(q8[d], load8(kr + 8 * d * es, bf16), a);
        acc[i] = a;
    }
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* The G query heads q [G, D] of one KV head over tokens [0, n) at element offsets off[t]
   from kh / vh. Writes the unnormalized partial result of this token range (flash-decoding):
   o [G, D] = sum_t e^(s_t - m) v_t, m [G] = max_t s_t, l [G] = sum_t e^(s_t - m), with
   s_t = scale q.k_t. Tokens go in chunks of 8 so each K/V row is read from memory once and
   from L1 for the other heads of the group. Always inlined: one loop per cache dtype. */
static inline __attribute__((always_inline)) int attend_group(
        const float* q, int G, const char* kh, const char* vh, const int64_t* off, int64_t n, int D,
        float scale, int bf16, float* o, float* m, float* l) {
    const int nd = D / 8, es = bf16 ? 2 : 4;
    float* sc = (float*)malloc(sizeof(float) * (size_t)G * (size_t)(n + 8));
    if (!sc) return 1;
    const int64_t ld = n + 8;  /* row stride of sc */
    for (int g = 0; g < G; g++) m[g] = -INFINITY;
    const __m256 vscale = _mm256_set1_ps(scale);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        for (int g = 0; g < G; g++) {
            __m256 q8[32];
            for (int d = 0; d < nd; d++) q8[d] = _mm256_loadu_ps(q + (size_t)g * D + 8 * d);
            _mm256_storeu_ps(sc + g * ld + t, _mm256_mul_ps(vscale, dot8_tokens(q8, nd, kh, off + t, es, bf16)));
        }
    }
    for (; t < n; t++) {
        const char* kr = kh + off[t] * es;
        for (int g = 0; g < G; g++) {
            __m256 a = _mm256_setzero_ps();
            for (int d = 0; d < nd; d++) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)g * D + 8 * d), load8(kr + 8 * d * es, bf16), a);
            sc[g * ld + t] = scale * hsum8(a);
        }
    }
    for (int g = 0; g < G; g++) {
        float* sg = sc + g * ld;
        float mx = -INFINITY;
        for (t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 vsum = _mm256_setzero_ps();
        for (t = 0; t + 8 <= n; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + t), vmx));
            _mm256_storeu_ps(sg + t, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum8(vsum);
        for (; t < n; t++) { sg[t] = expf(sg[t] - mx); sum += sg[t]; }
        m[g] = mx;
        l[g] = sum;
        memset(o + (size_t)g * D, 0, sizeof(float) * (size_t)D);
    }
    for (t = 0; t < n; t += 8) {
        const int64_t te = t + 8 < n ? t + 8 : n;
        for (int g = 0; g < G; g++) {
            float* og = o + (size_t)g * D;
            const float* sg = sc + g * ld;
            __m256 o8[32];
            for (int d = 0; d < nd; d++) o8[d] = _mm256_loadu_ps(og + 8 * d);
            for (int64_t u = t; u < te; u++) {
                const char* vr = vh + off[u] * es;
                const __m256 p = _mm256_set1_ps(sg[u]);
                for (int d = 0; d < nd; d++) o8[d] = _mm256_fmadd_ps(p, load8(vr + 8 * d * es, bf16), o8[d]);
            }
            for (int d = 0; d < nd; d++) _mm256_storeu_ps(og + 8 * d, o8[d]);
        }
    }
    free(sc);
    return 0;
}

/* Decode step of attention over a paged KV cache [2, NB, BS, Hkv, D] of float32
   (kv_bf16 = 0) or bfloat16 (kv_bf16 = 1): one new token per sequence. Row b of qkv (at
   qkv + b * qkv_stride) holds q [H, D], k [Hkv, D], v [Hkv, D] before RoPE; rope [B, D/2, 2]
   holds (cos, sin) of each token's position. Rotates q and k, writes k and v at slots[b],
   then for every query head computes softmax(scale q.K^T) V over the sequence's seq_lens[b]
   tokens, located through block_tables [B, MB]. out [B, H, D]. D % 8 == 0, D <= 256.
   Returns nonzero when a buffer could not be allocated. */
int om_paged_decode(const float* qkv, int64_t qkv_stride, const float* rope, const int64_t* slots, void* cache,
                    int kv_bf16, int64_t num_blocks, int bs, const int64_t* block_tables, int max_blocks,
                    const int64_t* seq_lens, int B, int H, int Hkv, int D, float scale, float* out) {
    const size_t row = (size_t)Hkv * D, plane = (size_t)num_blocks * bs * row;
    const int es = kv_bf16 ? 2 : 4;
    char* kc = (char*)cache;
    char* vc = kc + plane * es;
    float* qr = (float*)malloc(sizeof(float) * ((size_t)B * H * D + row));
    if (!qr) return 1;
    float* krow = qr + (size_t)B * H * D;
    for (int b = 0; b < B; b++) {
        const float* src = qkv + (size_t)b * qkv_stride;
        const float* cs = rope + (size_t)b * D;
        for (int h = 0; h < H; h++) rope_head(src + (size_t)h * D, cs, D, qr + ((size_t)b * H + h) * D);
        for (int h = 0; h < Hkv; h++) rope_head(src + (size_t)(H + h) * D, cs, D, krow + (size_t)h * D);
        store_row(kc + (size_t)slots[b] * row * es, krow, (int)row, kv_bf16);
        store_row(vc + (size_t)slots[b] * row * es, src + (size_t)(H + Hkv) * D, (int)row, kv_bf16);
    }
    const int G = H / Hkv;
    /* element offset of every context token's row, per sequence (shared by its heads) */
    int64_t S_total = 0;
    for (int b = 0; b < B; b++) S_total += seq_lens[b];
    int64_t* offs = (int64_t*)malloc(sizeof(int64_t) * (size_t)(S_total + 1));
    int64_t* starts = (int64_t*)malloc(sizeof(int64_t) * (size_t)(B + 1));
    /* work item = (sequence, KV head, token split). A sequence is split into pieces of
       DECODE_SPLIT_TOKENS tokens, a count that depends on its own length only, so its
       result is the same whatever else is in the batch (batch invariance). */
    int* nsplit = (int*)malloc(sizeof(int) * (size_t)(B + 1));
    int* first = (int*)malloc(sizeof(int) * (size_t)(B + 1));
    int items = 0;
    for (int b = 0; b < B && nsplit && first; b++) {
        const int64_t pieces = (seq_lens[b] + DECODE_SPLIT_TOKENS - 1) / DECODE_SPLIT_TOKENS;
        nsplit[b] = pieces > 1 ? (int)pieces : 1;
        first[b] = items;
        items += Hkv * nsplit[b];
    }
    int* item_seq = (int*)malloc(sizeof(int) * (size_t)(items + 1));
    float* part = (float*)malloc(sizeof(float) * (size_t)(items + 1) * G * (D + 2));  /* o [G, D], m [G], l [G] */
    if (!offs || !starts || !part || !nsplit || !first || !item_seq) {
        free(offs); free(starts); free(part); free(nsplit); free(first); free(item_seq); free(qr);
        return 1;
    }
    for (int b = 0; b < B; b++)
        for (int i = 0; i < Hkv * nsplit[b]; i++) item_seq[first[b] + i] = b;
    starts[0] = 0;
    for (int b = 0; b < B; b++) {
        const int64_t* bt = block_tables + (size_t)b * max_blocks;
        for (int64_t t = 0; t < seq_lens[b]; t++) offs[starts[b] + t] = ((int64_t)bt[t / bs] * bs + t % bs) * (int64_t)row;
        starts[b + 1] = starts[b] + seq_lens[b];
    }
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) if (S_total * Hkv * D >= PARALLEL_MIN_WORK / 8)
    for (int it = 0; it < items; it++) {
        const int b = item_seq[it], h = (it - first[b]) / nsplit[b], sp = (it - first[b]) % nsplit[b];
        const int64_t S = seq_lens[b];
        const int64_t t0 = (int64_t)sp * DECODE_SPLIT_TOKENS;
        const int64_t t1 = t0 + DECODE_SPLIT_TOKENS < S ? t0 + DECODE_SPLIT_TOKENS : S;
        float* pw = part + (size_t)it * G * (D + 2);
        const float* q = qr + ((size_t)b * H + (size_t)h * G) * D;
        const char* kh = kc + (size_t)h * D * es;
        const char* vh = vc + (size_t)h * D * es;
        int err;
        if (t1 <= t0) {  /* empty split */
            for (int g = 0; g < G; g++) { pw[G * D + g] = -INFINITY; pw[G * D + G + g] = 0.f; }
            memset(pw, 0, sizeof(float) * (size_t)G * D);
            err = 0;
        } else if (kv_bf16) {
            err = attend_group(q, G, kh, vh, offs + starts[b] + t0, t1 - t0, D, scale, 1, pw, pw + G * D, pw + G * D + G);
        } else {
            err = attend_group(q, G, kh, vh, offs + starts[b] + t0, t1 - t0, D, scale, 0, pw, pw + G * D, pw + G * D + G);
        }
        if (err) failed = 1;
    }
    /* combine the splits: out = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i */
    for (int b = 0; b < B && !failed; b++) {
        for (int h = 0; h < Hkv; h++) {
            for (int g = 0; g < G; g++) {
                const float* p0 = part + (size_t)(first[b] + h * nsplit[b]) * G * (D + 2);
                float M = -INFINITY;
                for (int sp = 0; sp < nsplit[b]; sp++) {
                    const float mi = p0[(size_t)sp * G * (D + 2) + G * D + g];
                    M = mi > M ? mi : M;
                }
                float* o = out + ((size_t)b * H + (size_t)h * G + g) * D;
                float L = 0.f;
                for (int d = 0; d < D; d++) o[d] = 0.f;
                for (int sp = 0; sp < nsplit[b]; sp++) {
                    const float* pi = p0 + (size_t)sp * G * (D + 2);
                    const float li = pi[G * D + G + g];
                    if (li == 0.f) continue;
                    const float w = expf(pi[G * D + g] - M);
                    L += w * li;
                    for (int d = 0; d < D; d++) o[d] += w * pi[(size_t)g * D + d];
                }
                const float inv = 1.0f / L;
                for (int d = 0; d < D; d++) o[d] *= inv;
            }
        }
    }
    free(part);
    free(item_seq);
    free(first);
    free(nsplit);
    free(starts);
    free(offs);
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
        self.paged_decode_fn.argtypes = [p, i64, p, p, p, i, i64, i, p, i, p, i, i, i, i, ctypes.c_float, p]
        self.paged_decode_fn.restype = ctypes.c_int
        self.silu_mul_fn = lib.om_silu_mul
        self.silu_mul_fn.argtypes = [p, i, i, p]
        self.silu_mul_fn.restype = None

    def silu_mul(self, gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
        """SwiGLU gate ``silu(gate) * up`` of gate_up [T, 2I] float32 contiguous -> [T, I]."""
        out = torch.empty(gate_up.shape[0], intermediate)
        self.silu_mul_fn(gate_up.data_ptr(), gate_up.shape[0], intermediate, out.data_ptr())
        return out

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
            kv_cache: [2, num_blocks, block_size, Hkv, D] float32 or bfloat16, contiguous,
                updated in place.
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
            int(kv_cache.dtype == torch.bfloat16), num_blocks, bs, block_tables.data_ptr(), block_tables.shape[1],
            seq_lens.data_ptr(), B, num_heads, Hkv, D, scale, out.data_ptr(),
        )
        _check_status(status)
        return out

    @staticmethod
    def supports_decode(qkv: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether ``paged_decode`` takes these tensors (float32 qkv with contiguous rows,
        float32 or bfloat16 cache, D % 8 == 0)."""
        D = kv_cache.shape[-1]
        return (
            kv_cache.dtype in (torch.float32, torch.bfloat16)
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
        try:
            if not torch.cpu._is_avx2_supported():
                return None
        except AttributeError:  # torch without the probe
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
                    cmd += [str(src), "-o", str(out), "-lm"]
                    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                    os.replace(out, path)  # atomic: concurrent processes never load a partial file
            return cls(ctypes.CDLL(str(path)))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            stderr = detail.decode(errors="replace")[:500]
            _log.warning("native kernels unavailable, using torch kernels: %s %s", exc, stderr)
            return None


# ----------------------------------------------------------------------------------------
# quantized linear layers
# ----------------------------------------------------------------------------------------


def _bias_add(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (bf16 or fp32) + fp32 bias -> fp32 (one op; keeps large biases exact)."""
    return y if bias is None else torch.add(bias, y)


def _dequantized_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ w[out, in].T (+ bias) -> float32, as a bf16 GEMM where the CPU has AMX /
    AVX512-BF16 (oneDNN), else float32 (MKL)."""
    if cpu_has_fast_bf16():
        return _bias_add(F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).float(), bias)
    return F.linear(x.float(), w, bias)


def _check_status(status: int) -> None:
    if status:
        raise MemoryError("a native kernel could not allocate its work buffer")


class BF16Linear(nn.Module):
    """Linear layer with bfloat16 weights; bf16 matmul, bias added in float32.

    Like the int layers below, an inference-only module: its tensors are plain attributes
    (not parameters or buffers, so not in ``state_dict``), which keeps attribute access on the
    per-token path cheap.
    """

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().to(torch.bfloat16)  # [out, in]
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def forward(self, x: torch.Tensor, rows: RowSplit | None = None) -> torch.Tensor:
        """x: [T, in] -> [T, out] (bfloat16 without bias, else float32); ``rows`` unused."""
        return _bias_add(F.linear(x.to(torch.bfloat16), self.weight), self.bias)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, rows: RowSplit | None = None) -> torch.Tensor:
        """``residual += self(x)`` in place; returns residual [T, out] float32."""
        return residual.add_(self.forward(x))


class _WeightOnlyLinear(nn.Module):
    """Shared forward logic of the int8 / int4 layers (subclasses give ``_native``,
    ``dequantized``, ``kernels``, ``bias``, ``out_features``, ``gemm_min_rows`` and
    ``_torch_kernel`` for the torch backend)."""

    def forward(self, x: torch.Tensor, rows: RowSplit | None = None) -> torch.Tensor:
        """x: [T, in] -> [T, out] (float32; bfloat16 for the torch kernel without bias).

        ``rows`` (native backend): decode rows run the weight-only kernel, prefill rows a
        padded GEMM (see ``RowSplit``). Without it the kernel is chosen by row count:
        native up to ``gemm_min_rows`` rows, GEMM above.
        """
        M = x.shape[0]
        # by row count: the torch backend, or no plan (the LM head is never given one)
        if self.kernels is None or rows is None:
            if M > self.gemm_min_rows:
                return _dequantized_gemm(x, self.dequantized(), self.bias)
            if self.kernels is None:
                return _bias_add(self._torch_kernel(x), self.bias)
            return self._native(x, torch.empty(M, self.out_features), 0)
        if rows.decode_range is not None:
            s, e = rows.decode_range
            if e - s == M:
                return self._native(x, torch.empty(M, self.out_features), 0)
            if e == s:
                return self._prefill_gemm(x)
            y = torch.empty(M, self.out_features)
            self._native(x[s:e], y[s:e], 0)  # rows of a contiguous tensor: contiguous view
            if s:
                y[:s] = self._prefill_gemm(x[:s])
            if e < M:
                y[e:] = self._prefill_gemm(x[e:])
            return y
        y = torch.empty(M, self.out_features)
        dec, pre = rows.decode_index, rows.prefill_index
        y.index_copy_(0, dec, self._native(x.index_select(0, dec), torch.empty(dec.shape[0], self.out_features), 0))
        y.index_copy_(0, pre, self._prefill_gemm(x.index_select(0, pre)))
        return y

    def _prefill_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """GEMM of prefill rows [P, in] -> [P, out], padded to ``GEMM_MIN_ROWS + 1`` rows."""
        P = x.shape[0]
        if P > GEMM_MIN_ROWS:
            return _dequantized_gemm(x, self.dequantized(), self.bias)
        padded = x.new_zeros(GEMM_MIN_ROWS + 1, x.shape[1])
        padded[:P] = x
        return _dequantized_gemm(padded, self.dequantized(), self.bias)[:P]

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, rows: RowSplit | None = None) -> torch.Tensor:
        """``residual += self(x)`` in place; returns residual [T, out] float32 (contiguous)."""
        M = x.shape[0]
        if self.kernels is not None and residual.is_contiguous():
            all_decode = rows is not None and rows.decode_range == (0, M)
            if all_decode or (rows is None and M <= self.gemm_min_rows):
                return self._native(x, residual, 1)
        return residual.add_(self.forward(x, rows))


class Int8Linear(_WeightOnlyLinear):
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
        self.gemm_min_rows = GEMM_MIN_ROWS  # apply_weight_format raises it for the LM head
        w = linear.weight.detach().float()  # [out, in]
        if self.kernels is not None:
            g = w.view(N, K // GROUP, GROUP)
            scales = (g.abs().amax(-1) / 127.0).clamp(min=1e-30)  # [N, G]
            q = torch.round(g / scales[..., None]).clamp(-127, 127).to(torch.int8).view(N, K)
        else:
            scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)  # [N]
            q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = q.contiguous()  # [out, in] int8
        self.scales = scales.contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32 weight this layer multiplies by."""
        N, K = self.out_features, self.in_features
        if self.kernels is not None:
            w = torch.empty(N, K)
            self.kernels.q8_dequant(self.weight.data_ptr(), self.scales.data_ptr(), N, K, w.data_ptr())
            return w
        return self.weight.float().mul_(self.scales.float()[:, None])

    def _torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales)

    def _native(self, x: torch.Tensor, y: torch.Tensor, accumulate: int) -> torch.Tensor:
        x = x.float().contiguous()
        _check_status(
            self.kernels.q8_gemm(
                x.data_ptr(), x.shape[0], self.in_features, self.weight.data_ptr(), self.scales.data_ptr(),
                self.out_features, y.data_ptr(), accumulate,
            )
        )
        return y if self.bias is None else y.add_(self.bias)


class Int4Linear(_WeightOnlyLinear):
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
        self.gemm_min_rows = GEMM_MIN_ROWS  # apply_weight_format raises it for the LM head
        q, scale, zero, _ = int4_quantize(linear.weight.detach(), bf16_scales=kernels is None)
        if kernels is not None:
            g = q.view(N, K // GROUP, 2, GROUP // 2)  # halves of each group
            self.weight = (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, K // 2).contiguous()
            self.scales = scale.contiguous()  # [N, G]
            self.mins = (zero - 8 * scale).contiguous()  # [N, G]
        else:
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            self.scales_zeros = sz  # [G, N, 2] bf16
            self.q_centered = (q.to(torch.int16) - 8).to(torch.int8).view(N, K // GROUP, GROUP)
            self.scale_f32 = scale[..., None].contiguous()  # [N, G, 1]
            self.zero_f32 = zero[..., None].contiguous()  # [N, G, 1]
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32 weight this layer multiplies by."""
        N, K = self.out_features, self.in_features
        if self.kernels is not None:
            w = torch.empty(N, K)
            self.kernels.q4_dequant(
                self.weight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), N, K, w.data_ptr()
            )
            return w
        return torch.addcmul(self.zero_f32, self.q_centered.float(), self.scale_f32).view(N, K)

    def _torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, GROUP, self.scales_zeros)

    def _native(self, x: torch.Tensor, y: torch.Tensor, accumulate: int) -> torch.Tensor:
        x = x.float().contiguous()
        _check_status(
            self.kernels.q4_gemm(
                x.data_ptr(), x.shape[0], self.in_features, self.weight.data_ptr(), self.scales.data_ptr(),
                self.mins.data_ptr(), self.out_features, y.data_ptr(), accumulate,
            )
        )
        return y if self.bias is None else y.add_(self.bias)


class Int8Embedding(nn.Module):
    """Embedding table in int8 with one float32 scale per group of 32 columns (symmetric,
    absmax / 127; lossless for GGUF ``Q8_0`` tables); rows are dequantized on lookup.

    Args:
        weight: [vocab, d] float table, d a multiple of 32.
        shared: a native ``Int8Linear`` LM head holding the same (tied) matrix, whose int8
            data and scales are reused instead of a second copy.

    Raises:
        ValueError: d not a multiple of 32.
    """

    def __init__(self, weight: torch.Tensor, shared: "Int8Linear | None" = None) -> None:
        super().__init__()
        V, d = weight.shape
        if d % GROUP:
            raise ValueError(f"int8 embedding needs a width divisible by {GROUP}, got {d}")
        self.num_embeddings, self.embedding_dim = V, d
        if shared is not None and shared.kernels is not None and tuple(shared.weight.shape) == (V, d):
            self.weight, self.scales = shared.weight, shared.scales  # [V, d] int8, [V, d/32]
        else:
            g = weight.detach().float().view(V, d // GROUP, GROUP)
            scales = (g.abs().amax(-1) / 127.0).clamp(min=1e-30)  # [V, G]
            self.weight = torch.round(g / scales[..., None]).clamp(-127, 127).to(torch.int8).view(V, d)
            self.scales = scales.contiguous()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] int64 -> [T, d] float32."""
        T = ids.shape[0]
        q = self.weight.index_select(0, ids).view(T, -1, GROUP).float()  # [T, G, 32]
        return q.mul_(self.scales.index_select(0, ids)[..., None]).view(T, self.embedding_dim)


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
            if name == "lm_head" and kernels is not None:
                # logits are computed for a few sampled rows only: never materialize the
                # dequantized [vocab, d] float32 matrix (113 MB for SmolLM2, 545 MB for Qwen2.5)
                new.gemm_min_rows = 1 << 30
            setattr(module, name, new)
    return model
