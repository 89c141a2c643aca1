// M2Rec's fused CPU kernels: the selective scan (forward, backward; generic, AVX-512 and AVX2 variants), the causal
// depthwise convolution (+ SiLU), and the causal filter summed directly: over whole sequences, and the window sum of
// a cached step. Compiled on first use by torch.utils.cpp_extension.load_inline from the copy of this file in cpu_scan_source.py (transformers' remote-code
// loader copies only .py files next to a checkpoint):
// after editing it, run `python scripts/embed_cpp_source.py` (tests/test_cpp_source.py fails while the copy is stale).
#include <torch/extension.h>

#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define M2REC_AVX512 1
#endif

// One binary serves every x86-64 CPU: the kernels are cloned for AVX-512 and AVX2 and the loader
// picks the best clone at run time, so a cached build never depends on the machine that built it.
#if defined(__has_attribute)
#if __has_attribute(target_clones) && defined(__x86_64__) && defined(__ELF__)
#define M2REC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef M2REC_CLONES
#define M2REC_CLONES
#endif

#if defined(__GNUC__)
#define M2REC_INLINE inline __attribute__((always_inline))
#else
#define M2REC_INLINE inline
#endif

namespace {

// The state dimension is processed in groups of kLanes (one AVX-512 register of floats) with one
// partial sum per lane, so a dot product over n ends in a short tree instead of a serial chain
// of scalar adds. The state dimension is zero-padded to a multiple of kLanes (padded states stay
// 0: their B, C and A are 0).
constexpr int64_t kLanes = 16;

template <typename T>
M2REC_INLINE T lane_sum(T* acc) {
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) acc[j] += acc[j + width];
  }
  return acc[0];
}

// exp for float written so that loops calling it vectorise (std::exp does not, without
// -ffast-math). Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2, then the Cephes
// polynomial: about 1 ulp. Below -87.3 (exp under the smallest normal float) it returns exactly 0
// through an integer mask, which keeps the loop free of branches and of slow denormals; above
// 88.4 (overflow) it saturates at 2.4e38. The scan only meets x = dt A <= 0.
M2REC_INLINE float exp_vec(float x) {
  const float lo = -87.33654f;
  const float xc = std::min(std::max(x, lo), 88.37626f);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a library call.
  const float round_magic = 12582912.0f;
  const float k = (xc * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t keep = -static_cast<int32_t>(x >= lo);
  const int32_t bits = ((static_cast<int32_t>(k) + 127) << 23) & keep;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// float64 serves tests, not speed: the library exp, exact to the last bit.
M2REC_INLINE double exp_vec(double x) { return std::exp(x); }

template <typename T>
M2REC_INLINE T sigmoid_vec(T x) {
  return T(1) / (T(1) + exp_vec(-x));
}

// Raw views of the (contiguous) inputs. u, dt, z: (B, D, L); A: (D, Np); Bt, Ct: (B, L, Np);
// D: (D,); h0, the state before the first step: (B, D, Np). z, D and h0 are nullptr when absent
// (no h0: the scan starts from 0). Np is N padded to a multiple of kLanes.
template <typename T>
struct Scan {
  const T* u;
  const T* dt;
  const T* z;
  const T* A;
  const T* Bt;
  const T* Ct;
  const T* D;
  const T* h0;
  int64_t dim, L, Np;
};

// One step of the recurrence for one (b, d): h_next = exp(dt A) * h_prev + dt u B_t, returns
// C_t . h_next. h_prev and h_next may be the same array. With kKeepDecay, exp(dt A) is also
// written to `decay` (the backward reuses it instead of computing the exponentials again).
template <bool kKeepDecay, typename T>
M2REC_INLINE T scan_step(const T* A, const T* Bn, const T* Cn, T dt, T dtu, const T* h_prev,
                         T* h_next, T* decay, int64_t Np) {
  T acc[kLanes] = {};
  for (int64_t n0 = 0; n0 < Np; n0 += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const int64_t n = n0 + j;
      const T a = exp_vec(dt * A[n]);
      if constexpr (kKeepDecay) decay[n] = a;
      const T hn = a * h_prev[n] + dtu * Bn[n];
      h_next[n] = hn;
      acc[j] += Cn[n] * hn;
    }
  }
  return lane_sum(acc);
}

// out = (out + D u) * silu(z) on rows [lo, hi), vectorised over t.
template <typename T>
M2REC_INLINE void skip_and_gate(const Scan<T>& s, T* out, int64_t lo, int64_t hi) {
  const int64_t L = s.L;
  for (int64_t row = lo; row < hi; ++row) {
    const T* u = s.u + row * L;
    const T Dd = s.D != nullptr ? s.D[row % s.dim] : T(0);
    T* y = out + row * L;
    if (s.z != nullptr) {
      const T* z = s.z + row * L;
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) y[t] = (y[t] + Dd * u[t]) * z[t] * sigmoid_vec(z[t]);
    } else {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) y[t] += Dd * u[t];
    }
  }
}

// Forward of rows [lo, hi) of the B * D rows: out (B, D, L), last (B, D, Np).
// The rows of one batch element share B_t and C_t, so time runs in tiles of kTile steps with all
// of these rows advanced through one tile before the next: the tile of B and C (kTile * Np * 2
// values) stays in L1 instead of being read again from memory for every row when L is long.
constexpr int64_t kTile = 64;

template <typename T>
M2REC_INLINE void forward_rows(const Scan<T>& s, T* out, T* last, int64_t lo, int64_t hi) {
  const int64_t L = s.L, Np = s.Np;
  if (s.h0 != nullptr) {
    std::copy(s.h0 + lo * Np, s.h0 + hi * Np, last + lo * Np);
  } else {
    std::fill(last + lo * Np, last + hi * Np, T(0));
  }
  for (int64_t first = lo; first < hi;) {
    const int64_t b = first / s.dim, end = std::min(hi, (b + 1) * s.dim);
    const T* Bt = s.Bt + b * L * Np;
    const T* Ct = s.Ct + b * L * Np;
    for (int64_t t0 = 0; t0 < L; t0 += kTile) {
      const int64_t t1 = std::min(L, t0 + kTile);
      for (int64_t row = first; row < end; ++row) {
        const T* u = s.u + row * L;
        const T* dt = s.dt + row * L;
        const T* A = s.A + (row % s.dim) * Np;
        T* y = out + row * L;
        T* h = last + row * Np;
        for (int64_t t = t0; t < t1; ++t) {
          y[t] = scan_step<false>(A, Bt + t * Np, Ct + t * Np, dt[t], dt[t] * u[t], h, h,
                                  static_cast<T*>(nullptr), Np);
        }
      }
    }
    skip_and_gate(s, out, first, end);
    first = end;
  }
}

#ifdef M2REC_AVX512
// The float32 forward on AVX-512 CPUs, vectorised over channels instead of over n: one vector
// holds 16 channels of one batch element, which share B_t[n] and C_t[n], so those are broadcast
// scalars and C_t . h_t accumulates in a vector with no horizontal sum per step. Each block of
// channel-last (B, L, D) data (the layout of the model's projections) or of (B, D, L) rows is
// first copied into contiguous (L, 16) tiles: reading channel-last steps in place, D floats
// apart, made the whole forward 1.7 times slower than these copies cost. exp(dt A) is computed
// as 2^(dt A log2 e) with vscalefps, which also gives 0 far below the float range, so the clamps
// and integer tricks of exp_vec are not needed. Two to three times the speed of forward_rows;
// same results to float32 rounding (the tests compare both to float64).
constexpr int64_t kChannels = 16;
constexpr float kLog2e = 1.44269504088896341f;

// 2^x = 2^k 2^f, k = round(x), |f| <= 1/2; 2^f by its Taylor polynomial in f ln 2 of degree 6
// (relative error below 1.3e-7). x below -256 is raised to -256, whose result is 0 as well.
__attribute__((target("avx512f"))) inline __m512 exp2_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-256.0f), x);  // NaN stays NaN: max returns its 2nd operand
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, k);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3,
// by its odd series to s^13 (relative error below 2e-8, also for tiny e).
__attribute__((target("avx512f"))) inline __m512 softplus_avx512(__m512 x) {
  const __m512 minus_abs = _mm512_min_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), x));
  const __m512 e = exp2_avx512(_mm512_mul_ps(minus_abs, _mm512_set1_ps(kLog2e)));
  const __m512 s = _mm512_div_ps(e, _mm512_add_ps(_mm512_set1_ps(2.0f), e));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 series = _mm512_set1_ps(1.0f / 13.0f);
  for (float c : {1.0f / 11.0f, 1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f, 1.0f / 3.0f, 1.0f}) {
    series = _mm512_fmadd_ps(series, s2, _mm512_set1_ps(c));
  }
  const __m512 log1p_e = _mm512_mul_ps(_mm512_add_ps(s, s), series);
  return _mm512_add_ps(_mm512_max_ps(x, _mm512_setzero_ps()), log1p_e);
}

// Copies steps t0..t0+steps of the 16-channel block (b, d0..d0+width) of a (B, D, L) tensor, or
// of a channel-last (B, L, D) one, into a (steps, 16) tile (lanes past width are 0), and back.
inline void block_to_tile(const float* src, bool channel_last, int64_t b, int64_t d0, int64_t width,
                          int64_t dim, int64_t L, int64_t t0, int64_t steps, float* tile) {
  std::fill(tile, tile + steps * kChannels, 0.0f);
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t j = 0; j < width; ++j) {
      tile[t * kChannels + j] =
          channel_last ? src[(b * L + t0 + t) * dim + d0 + j] : src[((b * dim) + d0 + j) * L + t0 + t];
    }
  }
}
inline void tile_to_block(const float* tile, bool channel_last, int64_t b, int64_t d0, int64_t width,
                          int64_t dim, int64_t L, int64_t t0, int64_t steps, float* dst) {
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t j = 0; j < width; ++j) {
      (channel_last ? dst[(b * L + t0 + t) * dim + d0 + j] : dst[((b * dim) + d0 + j) * L + t0 + t]) =
          tile[t * kChannels + j];
    }
  }
}

// The state of the 16-channel block starting at row0 (a row being (b, d)), between (B, D, Np) rows
// and an (Np, 16) tile: loaded from `rows`, or 0 where rows is nullptr or past `width`; stored into
// the first `width` channels.
inline void load_state_block(const float* rows, int64_t row0, int64_t width, int64_t Np, float* h) {
  for (int64_t n = 0; n < Np; ++n) {
    for (int64_t j = 0; j < kChannels; ++j) {
      h[n * kChannels + j] = rows != nullptr && j < width ? rows[(row0 + j) * Np + n] : 0.0f;
    }
  }
}
inline void store_state_block(const float* h, int64_t row0, int64_t width, int64_t Np, float* rows) {
  for (int64_t n = 0; n < Np; ++n) {
    for (int64_t j = 0; j < width; ++j) rows[(row0 + j) * Np + n] = h[n * kChannels + j];
  }
}

// The raw steps of a (steps, 16) tile of channels d0..d0+width, in place, as the step
// softplus(dt + delta_bias) (each part optional), and its derivative into `dstep` unless nullptr.
__attribute__((target("avx512f"))) void step_from_raw_avx512(float* dt, float* dstep, const float* delta_bias,
                                                             bool softplus, int64_t d0, int64_t width,
                                                             int64_t steps) {
  const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
  const __m512 bias = delta_bias != nullptr ? _mm512_maskz_loadu_ps(mask, delta_bias + d0) : _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t t = 0; t < steps; ++t) {
    const __m512 pre = _mm512_add_ps(_mm512_loadu_ps(dt + t * kChannels), bias);
    _mm512_storeu_ps(dt + t * kChannels, softplus ? softplus_avx512(pre) : pre);
    if (dstep != nullptr) {
      const __m512 sigmoid =
          _mm512_div_ps(one, _mm512_add_ps(one, exp2_avx512(_mm512_mul_ps(pre, _mm512_set1_ps(-kLog2e)))));
      _mm512_storeu_ps(dstep + t * kChannels, softplus ? sigmoid : one);
    }
  }
}

// Tasks [lo, hi): task = (batch element b, block of 16 channels). u, dt, z and out are either
// channel-last, (B, L, D), or rows, (B, D, L); either way the block is copied into (L, 16) tiles
// and y back from one. A block that ends past D is masked; its missing channels read dt = u = 0
// and A = 0, so their state stays 0.
//
// With `delta_bias` (D,) and/or `softplus`, dt is the raw step: dt = softplus(dt + delta_bias) is
// applied here, by step_from_raw_avx512 as in the backward.
__attribute__((target("avx512f"))) void forward_avx512(const Scan<float>& s, bool channel_last,
                                                       const float* delta_bias, bool softplus,
                                                       float* out, float* last, int64_t lo,
                                                       int64_t hi) {
  const int64_t L = s.L, Np = s.Np, dim = s.dim, blocks = (dim + kChannels - 1) / kChannels;
  std::vector<float> a2(Np * kChannels), h(Np * kChannels);  // A log2 e and the state, (Np, 16)
  std::vector<float> tiles(4 * L * kChannels);  // the block's dt, u, z and y
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t b = task / blocks, d0 = task % blocks * kChannels;
    const int64_t width = std::min(kChannels, dim - d0), row0 = b * dim + d0;
    const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
    for (int64_t n = 0; n < Np; ++n) {
      for (int64_t j = 0; j < kChannels; ++j) {
        a2[n * kChannels + j] = j < width ? s.A[(d0 + j) * Np + n] * kLog2e : 0.0f;
      }
    }
    load_state_block(s.h0, row0, width, Np, h.data());
    const __m512 skip = s.D != nullptr ? _mm512_maskz_loadu_ps(mask, s.D + d0) : _mm512_setzero_ps();
    float* dt_p = tiles.data();
    float* u_p = dt_p + L * kChannels;
    float* z_p = s.z != nullptr ? u_p + L * kChannels : nullptr;
    float* y_p = u_p + 2 * L * kChannels;
    block_to_tile(s.dt, channel_last, b, d0, width, dim, L, 0, L, dt_p);
    step_from_raw_avx512(dt_p, nullptr, delta_bias, softplus, d0, width, L);
    block_to_tile(s.u, channel_last, b, d0, width, dim, L, 0, L, u_p);
    if (s.z != nullptr) block_to_tile(s.z, channel_last, b, d0, width, dim, L, 0, L, z_p);
    for (int64_t t = 0; t < L; ++t) {
      const __m512 dt = _mm512_loadu_ps(dt_p + t * kChannels);
      const __m512 u = _mm512_maskz_loadu_ps(mask, u_p + t * kChannels);
      const __m512 dtu = _mm512_mul_ps(dt, u);
      const float* Bn = s.Bt + (b * L + t) * Np;
      const float* Cn = s.Ct + (b * L + t) * Np;
      // Two partial sums: the adds into y would otherwise form one chain of Np dependent FMAs.
      __m512 y0 = _mm512_setzero_ps(), y1 = _mm512_setzero_ps();
      for (int64_t n = 0; n < Np; n += 2) {
        float* h0 = h.data() + n * kChannels;
        float* h1 = h0 + kChannels;
        const __m512 a0 = exp2_avx512(_mm512_mul_ps(dt, _mm512_loadu_ps(a2.data() + n * kChannels)));
        const __m512 a1 = exp2_avx512(_mm512_mul_ps(dt, _mm512_loadu_ps(a2.data() + (n + 1) * kChannels)));
        const __m512 h0n = _mm512_fmadd_ps(a0, _mm512_loadu_ps(h0), _mm512_mul_ps(dtu, _mm512_set1_ps(Bn[n])));
        const __m512 h1n = _mm512_fmadd_ps(a1, _mm512_loadu_ps(h1), _mm512_mul_ps(dtu, _mm512_set1_ps(Bn[n + 1])));
        _mm512_storeu_ps(h0, h0n);
        _mm512_storeu_ps(h1, h1n);
        y0 = _mm512_fmadd_ps(_mm512_set1_ps(Cn[n]), h0n, y0);
        y1 = _mm512_fmadd_ps(_mm512_set1_ps(Cn[n + 1]), h1n, y1);
      }
      __m512 y = _mm512_fmadd_ps(skip, u, _mm512_add_ps(y0, y1));
      if (z_p != nullptr) {  // y * silu(z) = y z / (1 + exp(-z))
        const __m512 z = _mm512_maskz_loadu_ps(mask, z_p + t * kChannels);
        const __m512 e = exp2_avx512(_mm512_mul_ps(z, _mm512_set1_ps(-kLog2e)));
        y = _mm512_div_ps(_mm512_mul_ps(y, z), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      }
      _mm512_mask_storeu_ps(y_p + t * kChannels, mask, y);
    }
    tile_to_block(y_p, channel_last, b, d0, width, dim, L, 0, L, out);
    store_state_block(h.data(), row0, width, Np, last);
  }
}

// The float32 forward on CPUs with AVX2 and FMA but no AVX-512 (many AMD EPYC and desktop CPUs):
// the algorithm of forward_avx512 on the same (L, 16) tiles, each 16-channel step taken as two
// halves of 8 channels, one AVX2 register each. 2^x takes its 2^k from the exponent bits (AVX2
// has no vscalefps); silu(z) and softplus use the formulas of the AVX-512 forward. Inputs and
// output in the same layouts as there.
#define M2REC_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline
constexpr int64_t kHalf = kChannels / 2;

// 2^x by the polynomial of exp2_avx512, x first clamped to [-127, 127]; below -126 exactly 0 (the
// scan's decays far under the float range, as vscalefps gives them). NaN stays NaN. With
// kNonPositive the caller knows x <= 0 (a decay exp(dt A) with dt >= 0 and A <= 0, or exp(-|x|)):
// one clamp, at -127, is then enough, as k = -127 builds a zero exponent, so that 2^x is 0 below
// -126.5 (instead of -126) without the mask; 3 of the 15 instructions fewer, 1/8 of the scan's.
template <bool kNonPositive>
M2REC_AVX2_INLINE __m256 exp2_avx2(__m256 x) {
  __m256 normal;
  if constexpr (kNonPositive) {
    x = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // NaN: x
  } else {
    normal = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_NLT_UQ);  // true for NaN
    x = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), x));  // NaN: x
  }
  const __m256 k = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, k);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  const __m256 scaled = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  if constexpr (kNonPositive) return scaled;
  return _mm256_and_ps(scaled, normal);
}

// softplus as softplus_avx512: max(x, 0) + 2 atanh(s), s = e / (2 + e), e = exp(-|x|).
M2REC_AVX2_INLINE __m256 softplus_avx2(__m256 x) {
  const __m256 minus_abs = _mm256_min_ps(x, _mm256_sub_ps(_mm256_setzero_ps(), x));
  const __m256 e = exp2_avx2<true>(_mm256_mul_ps(minus_abs, _mm256_set1_ps(kLog2e)));
  const __m256 s = _mm256_div_ps(e, _mm256_add_ps(_mm256_set1_ps(2.0f), e));
  const __m256 s2 = _mm256_mul_ps(s, s);
  __m256 series = _mm256_set1_ps(1.0f / 13.0f);
  for (float c : {1.0f / 11.0f, 1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f, 1.0f / 3.0f, 1.0f}) {
    series = _mm256_fmadd_ps(series, s2, _mm256_set1_ps(c));
  }
  return _mm256_add_ps(_mm256_max_ps(x, _mm256_setzero_ps()), _mm256_mul_ps(_mm256_add_ps(s, s), series));
}

// Tasks [lo, hi) as in forward_avx512: task = (batch element b, block of 16 channels). The lanes
// past `width` read dt = u = z = 0 (block_to_tile) and A = 0, so their state stays 0. kDecays:
// every decay exp(dt A) has dt A <= 0 (`decays_only`).
template <bool kDecays>
__attribute__((target("avx2,fma"))) void forward_avx2(const Scan<float>& s, bool channel_last,
                                                       const float* delta_bias, bool softplus,
                                                       float* out, float* last, int64_t lo, int64_t hi) {
  const int64_t L = s.L, Np = s.Np, dim = s.dim, blocks = (dim + kChannels - 1) / kChannels;
  std::vector<float> a2(Np * kChannels), h(Np * kChannels);  // A log2 e and the state, (Np, 16)
  std::vector<float> tiles(4 * L * kChannels);  // the block's dt, u, z and y
  float bias_lanes[kChannels], skip_lanes[kChannels];  // delta_bias and D, 0 where absent or past width
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t b = task / blocks, d0 = task % blocks * kChannels;
    const int64_t width = std::min(kChannels, dim - d0), row0 = b * dim + d0;
    for (int64_t n = 0; n < Np; ++n) {
      for (int64_t j = 0; j < kChannels; ++j) {
        a2[n * kChannels + j] = j < width ? s.A[(d0 + j) * Np + n] * kLog2e : 0.0f;
      }
    }
    for (int64_t j = 0; j < kChannels; ++j) {
      bias_lanes[j] = delta_bias != nullptr && j < width ? delta_bias[d0 + j] : 0.0f;
      skip_lanes[j] = s.D != nullptr && j < width ? s.D[d0 + j] : 0.0f;
    }
    load_state_block(s.h0, row0, width, Np, h.data());
    float* dt_p = tiles.data();
    float* u_p = dt_p + L * kChannels;
    float* z_p = s.z != nullptr ? u_p + L * kChannels : nullptr;
    float* y_p = u_p + 2 * L * kChannels;
    block_to_tile(s.dt, channel_last, b, d0, width, dim, L, 0, L, dt_p);
    block_to_tile(s.u, channel_last, b, d0, width, dim, L, 0, L, u_p);
    if (s.z != nullptr) block_to_tile(s.z, channel_last, b, d0, width, dim, L, 0, L, z_p);
    for (int64_t t = 0; t < L; ++t) {
      const float* Bn = s.Bt + (b * L + t) * Np;
      const float* Cn = s.Ct + (b * L + t) * Np;
      for (int64_t half = 0; half < kChannels; half += kHalf) {
        const int64_t lane = t * kChannels + half;
        __m256 dt = _mm256_add_ps(_mm256_loadu_ps(dt_p + lane), _mm256_loadu_ps(bias_lanes + half));
        if (softplus) dt = softplus_avx2(dt);
        const __m256 u = _mm256_loadu_ps(u_p + lane);
        const __m256 dtu = _mm256_mul_ps(dt, u);
        // Two partial sums: the adds into y would otherwise form one chain of Np dependent FMAs.
        __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
        for (int64_t n = 0; n < Np; n += 2) {
          float* h0 = h.data() + n * kChannels + half;
          float* h1 = h0 + kChannels;
          const __m256 a0 =
              exp2_avx2<kDecays>(_mm256_mul_ps(dt, _mm256_loadu_ps(a2.data() + n * kChannels + half)));
          const __m256 a1 =
              exp2_avx2<kDecays>(_mm256_mul_ps(dt, _mm256_loadu_ps(a2.data() + (n + 1) * kChannels + half)));
          const __m256 h0n = _mm256_fmadd_ps(a0, _mm256_loadu_ps(h0), _mm256_mul_ps(dtu, _mm256_set1_ps(Bn[n])));
          const __m256 h1n =
              _mm256_fmadd_ps(a1, _mm256_loadu_ps(h1), _mm256_mul_ps(dtu, _mm256_set1_ps(Bn[n + 1])));
          _mm256_storeu_ps(h0, h0n);
          _mm256_storeu_ps(h1, h1n);
          y0 = _mm256_fmadd_ps(_mm256_set1_ps(Cn[n]), h0n, y0);
          y1 = _mm256_fmadd_ps(_mm256_set1_ps(Cn[n + 1]), h1n, y1);
        }
        __m256 y = _mm256_fmadd_ps(_mm256_loadu_ps(skip_lanes + half), u, _mm256_add_ps(y0, y1));
        if (z_p != nullptr) {  // y * silu(z) = y z / (1 + exp(-z))
          const __m256 z = _mm256_loadu_ps(z_p + lane);
          const __m256 e = exp2_avx2<false>(_mm256_mul_ps(z, _mm256_set1_ps(-kLog2e)));
          y = _mm256_div_ps(_mm256_mul_ps(y, z), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        }
        _mm256_storeu_ps(y_p + lane, y);
      }
    }
    tile_to_block(y_p, channel_last, b, d0, width, dim, L, 0, L, out);
    store_state_block(h.data(), row0, width, Np, last);
  }
}

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// step_from_raw_avx512 for AVX2: the raw steps of a (steps, 16) tile, in place, as the step
// softplus(dt + bias) (each part optional; bias_lanes holds the block's 16 biases, 0 where absent),
// and its derivative into `dstep` unless nullptr.
__attribute__((target("avx2,fma"))) void step_from_raw_avx2(float* dt, float* dstep, const float* bias_lanes,
                                                            bool softplus, int64_t steps) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < steps * kChannels; i += kHalf) {
    const __m256 pre = _mm256_add_ps(_mm256_loadu_ps(dt + i), _mm256_loadu_ps(bias_lanes + i % kChannels));
    _mm256_storeu_ps(dt + i, softplus ? softplus_avx2(pre) : pre);
    if (dstep != nullptr) {
      const __m256 sigmoid =
          _mm256_div_ps(one, _mm256_add_ps(one, exp2_avx2<false>(_mm256_mul_ps(pre, _mm256_set1_ps(-kLog2e)))));
      _mm256_storeu_ps(dstep + i, softplus ? sigmoid : one);
    }
  }
}

// The backward on AVX2, float32: backward_avx512's algorithm (see there: time chunks, the first
// pass for the states entering them, the recompute, the reverse sweep, dB and dC summed lane-wise
// over the blocks) with every 16-channel step taken as two halves of 8 channels, as forward_avx2.
// Same arguments and outputs as backward_avx512; kDecays as in forward_avx2.
template <bool kDecays>
__attribute__((target("avx2,fma"))) void backward_avx2(const Scan<float>& s, bool channel_last,
                                                        const float* delta_bias, bool softplus,
                                                        const float* dout, float* du, float* ddt,
                                                        float* dz, double* dA_rows, double* dD_rows,
                                                        double* dbias_rows, float* dBt, float* dCt,
                                                        float* out, float* dh0, int64_t chunk, int64_t lo,
                                                        int64_t hi) {
  const int64_t L = s.L, Np = s.Np, dim = s.dim, blocks = (dim + kChannels - 1) / kChannels;
  const int64_t T = std::max<int64_t>(1, std::min(chunk, L)), chunks = (L + T - 1) / T;
  const int64_t tile = T * kChannels, state = Np * kChannels;
  std::vector<float> work(8 * tile + 3 * T * state + 3 * state + 2 * kChannels);
  float* dt_t = work.data();  // (T, 16) tiles, as in backward_avx512
  float* dstep_t = dt_t + tile;
  float* u_t = dstep_t + tile;
  float* z_t = u_t + tile;
  float* dout_t = z_t + tile;
  float* y_t = dout_t + tile;
  float* du_t = y_t + tile;
  float* ddt_t = du_t + tile;
  float* hs = ddt_t + tile;  // (T, Np, 16)
  float* dBv = hs + T * state;
  float* dCv = dBv + T * state;
  float* a2 = dCv + T * state;  // (Np, 16) each
  float* A = a2 + state;
  float* h = A + state;
  float* bias_lanes = h + state;  // delta_bias and D of the block, 0 where absent or past width
  float* skip_lanes = bias_lanes + kChannels;
  std::vector<float> entering(chunks * blocks * state), gh(blocks * state), dA_f(blocks * state);
  std::vector<float> dD(blocks * kChannels), dbias(blocks * kChannels);
  std::vector<double> dA(blocks * state);
  const __m256 one = _mm256_set1_ps(1.0f);

  auto load_block = [&](int64_t d0, int64_t width) {
    for (int64_t n = 0; n < Np; ++n) {
      for (int64_t j = 0; j < kChannels; ++j) {
        A[n * kChannels + j] = j < width ? s.A[(d0 + j) * Np + n] : 0.0f;
        a2[n * kChannels + j] = A[n * kChannels + j] * kLog2e;
      }
    }
    for (int64_t j = 0; j < kChannels; ++j) {
      bias_lanes[j] = delta_bias != nullptr && j < width ? delta_bias[d0 + j] : 0.0f;
      skip_lanes[j] = s.D != nullptr && j < width ? s.D[d0 + j] : 0.0f;
    }
  };
  auto load_step = [&](int64_t b, int64_t d0, int64_t width, int64_t t0, int64_t steps, bool with_dstep) {
    block_to_tile(s.dt, channel_last, b, d0, width, dim, L, t0, steps, dt_t);
    step_from_raw_avx2(dt_t, with_dstep ? dstep_t : nullptr, bias_lanes, softplus, steps);
  };

  for (int64_t b = lo; b < hi; ++b) {
    for (int64_t blk = 0; blk < blocks; ++blk) {  // first pass: the state entering every chunk
      const int64_t d0 = blk * kChannels, width = std::min(kChannels, dim - d0);
      load_state_block(s.h0, b * dim + d0, width, Np, h);
      std::copy(h, h + state, entering.data() + blk * state);
      if (chunks > 1) load_block(d0, width);
      for (int64_t c = 0; c + 1 < chunks; ++c) {
        load_step(b, d0, width, c * T, T, false);
        block_to_tile(s.u, channel_last, b, d0, width, dim, L, c * T, T, u_t);
        for (int64_t t = 0; t < T; ++t) {
          const float* Bn = s.Bt + (b * L + c * T + t) * Np;
          for (int64_t half = 0; half < kChannels; half += kHalf) {
            const __m256 dt = _mm256_loadu_ps(dt_t + t * kChannels + half);
            const __m256 dtu = _mm256_mul_ps(dt, _mm256_loadu_ps(u_t + t * kChannels + half));
            for (int64_t n = 0; n < Np; ++n) {
              float* h_n = h + n * kChannels + half;
              const __m256 a = exp2_avx2<kDecays>(_mm256_mul_ps(dt, _mm256_loadu_ps(a2 + n * kChannels + half)));
              _mm256_storeu_ps(h_n, _mm256_fmadd_ps(a, _mm256_loadu_ps(h_n), _mm256_mul_ps(dtu, _mm256_set1_ps(Bn[n]))));
            }
          }
        }
        std::copy(h, h + state, entering.data() + ((c + 1) * blocks + blk) * state);
      }
    }
    std::fill(gh.begin(), gh.end(), 0.0f);
    std::fill(dA_f.begin(), dA_f.end(), 0.0f);
    std::fill(dA.begin(), dA.end(), 0.0);
    std::fill(dD.begin(), dD.end(), 0.0f);
    std::fill(dbias.begin(), dbias.end(), 0.0f);

    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * T, steps = std::min(T, L - t0);
      std::fill(dBv, dBv + 2 * T * state, 0.0f);  // dBv and dCv
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t d0 = blk * kChannels, width = std::min(kChannels, dim - d0);
        load_block(d0, width);
        load_step(b, d0, width, t0, steps, true);
        block_to_tile(s.u, channel_last, b, d0, width, dim, L, t0, steps, u_t);
        block_to_tile(dout, channel_last, b, d0, width, dim, L, t0, steps, dout_t);
        if (s.z != nullptr) block_to_tile(s.z, channel_last, b, d0, width, dim, L, t0, steps, z_t);
        const float* h_in = entering.data() + (c * blocks + blk) * state;  // h_{t0 - 1}
        float* gh_b = gh.data() + blk * state;
        float* dA_fb = dA_f.data() + blk * state;
        double* dA_b = dA.data() + blk * state;

        for (int64_t t = 0; t < steps; ++t) {  // forward recompute: h_t and y before the gate
          const float* Bn = s.Bt + (b * L + t0 + t) * Np;
          const float* Cn = s.Ct + (b * L + t0 + t) * Np;
          const float* h_prev = t > 0 ? hs + (t - 1) * state : h_in;
          float* h_t = hs + t * state;
          for (int64_t half = 0; half < kChannels; half += kHalf) {
            const int64_t lane = t * kChannels + half;
            const __m256 dt = _mm256_loadu_ps(dt_t + lane);
            const __m256 u = _mm256_loadu_ps(u_t + lane);
            const __m256 dtu = _mm256_mul_ps(dt, u);
            __m256 y = _mm256_setzero_ps();
            for (int64_t n = 0; n < Np; ++n) {
              const int64_t at = n * kChannels + half;
              const __m256 a = exp2_avx2<kDecays>(_mm256_mul_ps(dt, _mm256_loadu_ps(a2 + at)));
              const __m256 hn =
                  _mm256_fmadd_ps(a, _mm256_loadu_ps(h_prev + at), _mm256_mul_ps(dtu, _mm256_set1_ps(Bn[n])));
              _mm256_storeu_ps(h_t + at, hn);
              y = _mm256_fmadd_ps(_mm256_set1_ps(Cn[n]), hn, y);
            }
            _mm256_storeu_ps(y_t + lane, _mm256_fmadd_ps(_mm256_loadu_ps(skip_lanes + half), u, y));
          }
        }

        for (int64_t t = steps - 1; t >= 0; --t) {  // reverse sweep; gh = exp(dt_{t+1} A) dL/dh_{t+1}
          const float* Bn = s.Bt + (b * L + t0 + t) * Np;
          const float* Cn = s.Ct + (b * L + t0 + t) * Np;
          const float* h_t = hs + t * state;
          const float* h_prev = t > 0 ? hs + (t - 1) * state : h_in;
          for (int64_t half = 0; half < kChannels; half += kHalf) {
            const int64_t lane = t * kChannels + half;
            const __m256 dt = _mm256_loadu_ps(dt_t + lane);
            const __m256 u = _mm256_loadu_ps(u_t + lane);
            const __m256 dtu = _mm256_mul_ps(dt, u);
            const __m256 g_out = _mm256_loadu_ps(dout_t + lane);
            __m256 dy = g_out;
            if (s.z != nullptr) {
              const __m256 z = _mm256_loadu_ps(z_t + lane);
              const __m256 sig =
                  _mm256_div_ps(one, _mm256_add_ps(one, exp2_avx2<false>(_mm256_mul_ps(z, _mm256_set1_ps(-kLog2e)))));
              const __m256 y = _mm256_loadu_ps(y_t + lane);
              const __m256 dsilu = _mm256_mul_ps(sig, _mm256_fmadd_ps(z, _mm256_sub_ps(one, sig), one));
              _mm256_storeu_ps(dout_t + lane, _mm256_mul_ps(_mm256_mul_ps(g_out, y), dsilu));  // dz
              const __m256 gate = _mm256_mul_ps(z, sig);
              dy = _mm256_mul_ps(g_out, gate);
              _mm256_storeu_ps(y_t + lane, _mm256_mul_ps(y, gate));  // the output, for `out`
            }
            float* dD_h = dD.data() + blk * kChannels + half;
            _mm256_storeu_ps(dD_h, _mm256_fmadd_ps(dy, u, _mm256_loadu_ps(dD_h)));
            __m256 gA = _mm256_setzero_ps(), gB = _mm256_setzero_ps();
            for (int64_t n = 0; n < Np; ++n) {
              const int64_t at = n * kChannels + half;
              const __m256 gn = _mm256_fmadd_ps(dy, _mm256_set1_ps(Cn[n]), _mm256_loadu_ps(gh_b + at));
              const __m256 a = exp2_avx2<kDecays>(_mm256_mul_ps(dt, _mm256_loadu_ps(a2 + at)));
              const __m256 ga = _mm256_mul_ps(_mm256_mul_ps(gn, _mm256_loadu_ps(h_prev + at)), a);
              _mm256_storeu_ps(dA_fb + at, _mm256_fmadd_ps(ga, dt, _mm256_loadu_ps(dA_fb + at)));
              gA = _mm256_fmadd_ps(ga, _mm256_loadu_ps(A + at), gA);
              gB = _mm256_fmadd_ps(gn, _mm256_set1_ps(Bn[n]), gB);
              float* dC_tn = dCv + t * state + at;
              float* dB_tn = dBv + t * state + at;
              _mm256_storeu_ps(dC_tn, _mm256_fmadd_ps(dy, _mm256_loadu_ps(h_t + at), _mm256_loadu_ps(dC_tn)));
              _mm256_storeu_ps(dB_tn, _mm256_fmadd_ps(gn, dtu, _mm256_loadu_ps(dB_tn)));
              _mm256_storeu_ps(gh_b + at, _mm256_mul_ps(gn, a));
            }
            _mm256_storeu_ps(du_t + lane,
                             _mm256_fmadd_ps(dt, gB, _mm256_mul_ps(dy, _mm256_loadu_ps(skip_lanes + half))));
            const __m256 ddt_raw = _mm256_mul_ps(_mm256_fmadd_ps(u, gB, gA), _mm256_loadu_ps(dstep_t + lane));
            _mm256_storeu_ps(ddt_t + lane, ddt_raw);
            float* dbias_h = dbias.data() + blk * kChannels + half;
            _mm256_storeu_ps(dbias_h, _mm256_add_ps(_mm256_loadu_ps(dbias_h), ddt_raw));
          }
          if ((t0 + t) % kTile == 0) {  // float sums over at most kTile steps, then double
            for (int64_t i = 0; i < state; ++i) dA_b[i] += dA_fb[i];
            std::fill(dA_fb, dA_fb + state, 0.0f);
          }
        }
        tile_to_block(du_t, channel_last, b, d0, width, dim, L, t0, steps, du);
        tile_to_block(ddt_t, channel_last, b, d0, width, dim, L, t0, steps, ddt);
        if (s.z != nullptr) tile_to_block(dout_t, channel_last, b, d0, width, dim, L, t0, steps, dz);
        if (out != nullptr) tile_to_block(y_t, channel_last, b, d0, width, dim, L, t0, steps, out);
      }
      float* dB = dBt + (b * L + t0) * Np;
      float* dC = dCt + (b * L + t0) * Np;
      for (int64_t i = 0; i < steps * Np; ++i) {
        float sum_B = 0.0f, sum_C = 0.0f;
        for (int64_t j = 0; j < kChannels; ++j) {
          sum_B += dBv[i * kChannels + j];
          sum_C += dCv[i * kChannels + j];
        }
        dB[i] = sum_B;
        dC[i] = sum_C;
      }
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t d0 = blk * kChannels, width = std::min(kChannels, dim - d0);
      if (dh0 != nullptr) store_state_block(gh.data() + blk * state, b * dim + d0, width, Np, dh0);
      for (int64_t j = 0; j < width; ++j) {
        const int64_t row = b * dim + d0 + j;
        dD_rows[row] = dD[blk * kChannels + j];
        dbias_rows[row] = dbias[blk * kChannels + j];
        for (int64_t n = 0; n < Np; ++n) dA_rows[row * Np + n] = dA[blk * state + n * kChannels + j];
      }
    }
  }
}

// The backward on AVX-512, float32, vectorised over channels like forward_avx512. A task is one
// batch element. Time runs in chunks of `chunk` steps, the last chunk first, and within a chunk
// every 16-channel block in turn: its steps are copied into (T, 16) tiles, its states h_t
// (T, Np, 16) recomputed from the state entering the chunk, then the reverse sweep, which
// recomputes exp(dt A) instead of storing it and carries dL/dh into the chunk before. dB and dC,
// sums over channels, accumulate lane-wise over the blocks in (T, Np, 16) buffers and take one
// horizontal add per (t, n) at the end of the chunk, into that element's own rows (no races).
// The states entering each chunk come from a first forward pass, over every chunk but the last;
// with L <= chunk there is one chunk and no such pass. Chunks keep the buffers the sweep reads
// and writes at every step, (T, Np, 16) floats three times, in cache whatever L: with a single
// chunk of L = 4,000 steps they are 24 MB per thread and the backward runs at half speed.
//
// dt is the raw step, as in the forward: the step softplus(dt + delta_bias) (each part optional)
// is recomputed in the tile, and ddt is the gradient of the raw step. u, dt, z, dout and the
// gradients du, ddt, dz are channel-last or rows, as in the forward. dA (B, D, Np), dD and
// ddelta_bias (B, D) are per-row sums in double, added over b by the caller. With `out`, the
// forward's output, recomputed on the way, is written there too; with `dh0` (B, D, Np), the
// gradient of the initial state, which is what the reverse sweep carries out of step 0.
__attribute__((target("avx512f"))) void backward_avx512(const Scan<float>& s, bool channel_last,
                                                        const float* delta_bias, bool softplus,
                                                        const float* dout, float* du, float* ddt,
                                                        float* dz, double* dA_rows, double* dD_rows,
                                                        double* dbias_rows, float* dBt, float* dCt,
                                                        float* out, float* dh0, int64_t chunk, int64_t lo,
                                                        int64_t hi) {
  const int64_t L = s.L, Np = s.Np, dim = s.dim, blocks = (dim + kChannels - 1) / kChannels;
  const int64_t T = std::max<int64_t>(1, std::min(chunk, L)), chunks = (L + T - 1) / T;
  const int64_t tile = T * kChannels, state = Np * kChannels;
  std::vector<float> work(8 * tile + 3 * T * state + 3 * state);
  float* dt_t = work.data();  // (T, 16) tiles
  float* dstep_t = dt_t + tile;  // d step / d raw dt: sigmoid(dt + bias) with softplus, else 1
  float* u_t = dstep_t + tile;
  float* z_t = u_t + tile;
  float* dout_t = z_t + tile;
  float* y_t = dout_t + tile;  // C . h_t + D u before the gate, then the output
  float* du_t = y_t + tile;
  float* ddt_t = du_t + tile;  // dz reuses dout_t once it is read
  float* hs = ddt_t + tile;    // (T, Np, 16)
  float* dBv = hs + T * state;  // (T, Np, 16) lane-wise sums over blocks
  float* dCv = dBv + T * state;
  float* a2 = dCv + T * state;  // A log2 e, (Np, 16)
  float* A = a2 + state;        // A, (Np, 16)
  float* h = A + state;         // the first pass's state, (Np, 16)
  // What each block carries from chunk to chunk: the state entering every chunk, dL/dh, and its
  // sums over t (dA over the last steps in float, flushed to double every kTile steps).
  std::vector<float> entering(chunks * blocks * state), gh(blocks * state), dA_f(blocks * state);
  std::vector<float> dD(blocks * kChannels), dbias(blocks * kChannels);
  std::vector<double> dA(blocks * state);

  auto load_A = [&](int64_t d0, int64_t width) {
    for (int64_t n = 0; n < Np; ++n) {
      for (int64_t j = 0; j < kChannels; ++j) {
        A[n * kChannels + j] = j < width ? s.A[(d0 + j) * Np + n] : 0.0f;
        a2[n * kChannels + j] = A[n * kChannels + j] * kLog2e;
      }
    }
  };
  auto load_step = [&](int64_t b, int64_t d0, int64_t width, int64_t t0, int64_t steps, bool with_dstep) {
    block_to_tile(s.dt, channel_last, b, d0, width, dim, L, t0, steps, dt_t);
    step_from_raw_avx512(dt_t, with_dstep ? dstep_t : nullptr, delta_bias, softplus, d0, width, steps);
  };

  for (int64_t b = lo; b < hi; ++b) {
    // First pass: the state entering every chunk.
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t d0 = blk * kChannels, width = std::min(kChannels, dim - d0);
      load_state_block(s.h0, b * dim + d0, width, Np, h);
      std::copy(h, h + state, entering.data() + blk * state);  // chunk 0 starts from h0
      if (chunks > 1) load_A(d0, width);
      for (int64_t c = 0; c + 1 < chunks; ++c) {
        load_step(b, d0, width, c * T, T, false);
        block_to_tile(s.u, channel_last, b, d0, width, dim, L, c * T, T, u_t);
        for (int64_t t = 0; t < T; ++t) {
          const __m512 dt = _mm512_loadu_ps(dt_t + t * kChannels);
          const __m512 dtu = _mm512_mul_ps(dt, _mm512_loadu_ps(u_t + t * kChannels));
          const float* Bn = s.Bt + (b * L + c * T + t) * Np;
          for (int64_t n = 0; n < Np; ++n) {
            const __m512 a = exp2_avx512(_mm512_mul_ps(dt, _mm512_loadu_ps(a2 + n * kChannels)));
            _mm512_storeu_ps(h + n * kChannels, _mm512_fmadd_ps(a, _mm512_loadu_ps(h + n * kChannels),
                                                                _mm512_mul_ps(dtu, _mm512_set1_ps(Bn[n]))));
          }
        }
        std::copy(h, h + state, entering.data() + ((c + 1) * blocks + blk) * state);
      }
    }
    std::fill(gh.begin(), gh.end(), 0.0f);
    std::fill(dA_f.begin(), dA_f.end(), 0.0f);
    std::fill(dA.begin(), dA.end(), 0.0);
    std::fill(dD.begin(), dD.end(), 0.0f);
    std::fill(dbias.begin(), dbias.end(), 0.0f);

    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * T, steps = std::min(T, L - t0);
      std::fill(dBv, dBv + 2 * T * state, 0.0f);  // dBv and dCv
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t d0 = blk * kChannels, width = std::min(kChannels, dim - d0);
        const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
        load_step(b, d0, width, t0, steps, true);
        block_to_tile(s.u, channel_last, b, d0, width, dim, L, t0, steps, u_t);
        block_to_tile(dout, channel_last, b, d0, width, dim, L, t0, steps, dout_t);
        if (s.z != nullptr) block_to_tile(s.z, channel_last, b, d0, width, dim, L, t0, steps, z_t);
        load_A(d0, width);
        const __m512 skip = s.D != nullptr ? _mm512_maskz_loadu_ps(mask, s.D + d0) : _mm512_setzero_ps();
        const float* h_in = entering.data() + (c * blocks + blk) * state;  // h_{t0 - 1}
        float* gh_b = gh.data() + blk * state;
        float* dA_fb = dA_f.data() + blk * state;
        double* dA_b = dA.data() + blk * state;

        // Forward recompute: the states after every step of the chunk and y before the gate.
        for (int64_t t = 0; t < steps; ++t) {
          const __m512 dt = _mm512_loadu_ps(dt_t + t * kChannels);
          const __m512 u = _mm512_loadu_ps(u_t + t * kChannels);
          const __m512 dtu = _mm512_mul_ps(dt, u);
          const float* Bn = s.Bt + (b * L + t0 + t) * Np;
          const float* Cn = s.Ct + (b * L + t0 + t) * Np;
          const float* h_prev = t > 0 ? hs + (t - 1) * state : h_in;
          float* h_t = hs + t * state;
          __m512 y = _mm512_setzero_ps();
          for (int64_t n = 0; n < Np; ++n) {
            const __m512 a = exp2_avx512(_mm512_mul_ps(dt, _mm512_loadu_ps(a2 + n * kChannels)));
            const __m512 hn = _mm512_fmadd_ps(a, _mm512_loadu_ps(h_prev + n * kChannels),
                                              _mm512_mul_ps(dtu, _mm512_set1_ps(Bn[n])));
            _mm512_storeu_ps(h_t + n * kChannels, hn);
            y = _mm512_fmadd_ps(_mm512_set1_ps(Cn[n]), hn, y);
          }
          _mm512_storeu_ps(y_t + t * kChannels, _mm512_fmadd_ps(skip, u, y));
        }

        // Reverse sweep. Entering step t, gh = exp(dt_{t+1} A) * dL/dh_{t+1}.
        __m512 dD_v = _mm512_loadu_ps(dD.data() + blk * kChannels);
        __m512 dbias_v = _mm512_loadu_ps(dbias.data() + blk * kChannels);
        for (int64_t t = steps - 1; t >= 0; --t) {
          const __m512 dt = _mm512_loadu_ps(dt_t + t * kChannels);
          const __m512 u = _mm512_loadu_ps(u_t + t * kChannels);
          const __m512 dtu = _mm512_mul_ps(dt, u);
          const __m512 g_out = _mm512_loadu_ps(dout_t + t * kChannels);
          __m512 dy = g_out;  // dL/dy, y = C . h + D u being the output before the gate
          if (s.z != nullptr) {
            const __m512 z = _mm512_loadu_ps(z_t + t * kChannels);
            const __m512 one = _mm512_set1_ps(1.0f);
            const __m512 sig = _mm512_div_ps(
                one, _mm512_add_ps(one, exp2_avx512(_mm512_mul_ps(z, _mm512_set1_ps(-kLog2e)))));
            const __m512 y = _mm512_loadu_ps(y_t + t * kChannels);
            const __m512 dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(z, _mm512_sub_ps(one, sig), one));
            _mm512_storeu_ps(dout_t + t * kChannels, _mm512_mul_ps(_mm512_mul_ps(g_out, y), dsilu));  // dz
            const __m512 gate = _mm512_mul_ps(z, sig);
            dy = _mm512_mul_ps(g_out, gate);
            _mm512_storeu_ps(y_t + t * kChannels, _mm512_mul_ps(y, gate));  // the output, for `out`
          }
          dD_v = _mm512_fmadd_ps(dy, u, dD_v);
          const float* Bn = s.Bt + (b * L + t0 + t) * Np;
          const float* Cn = s.Ct + (b * L + t0 + t) * Np;
          const float* h_t = hs + t * state;
          const float* h_prev = t > 0 ? hs + (t - 1) * state : h_in;
          __m512 gA = _mm512_setzero_ps(), gB = _mm512_setzero_ps();
          for (int64_t n = 0; n < Np; ++n) {
            const __m512 gn = _mm512_fmadd_ps(dy, _mm512_set1_ps(Cn[n]), _mm512_loadu_ps(gh_b + n * kChannels));
            const __m512 a = exp2_avx512(_mm512_mul_ps(dt, _mm512_loadu_ps(a2 + n * kChannels)));
            const __m512 ga = _mm512_mul_ps(_mm512_mul_ps(gn, _mm512_loadu_ps(h_prev + n * kChannels)), a);
            float* dA_n = dA_fb + n * kChannels;  // ga above: dL/d(dt A[n])
            _mm512_storeu_ps(dA_n, _mm512_fmadd_ps(ga, dt, _mm512_loadu_ps(dA_n)));
            gA = _mm512_fmadd_ps(ga, _mm512_loadu_ps(A + n * kChannels), gA);
            gB = _mm512_fmadd_ps(gn, _mm512_set1_ps(Bn[n]), gB);
            float* dC_tn = dCv + (t * Np + n) * kChannels;
            float* dB_tn = dBv + (t * Np + n) * kChannels;
            _mm512_storeu_ps(dC_tn, _mm512_fmadd_ps(dy, _mm512_loadu_ps(h_t + n * kChannels), _mm512_loadu_ps(dC_tn)));
            _mm512_storeu_ps(dB_tn, _mm512_fmadd_ps(gn, dtu, _mm512_loadu_ps(dB_tn)));
            _mm512_storeu_ps(gh_b + n * kChannels, _mm512_mul_ps(gn, a));
          }
          _mm512_storeu_ps(du_t + t * kChannels, _mm512_fmadd_ps(dt, gB, _mm512_mul_ps(dy, skip)));
          const __m512 ddt_raw = _mm512_mul_ps(_mm512_fmadd_ps(u, gB, gA), _mm512_loadu_ps(dstep_t + t * kChannels));
          _mm512_storeu_ps(ddt_t + t * kChannels, ddt_raw);
          dbias_v = _mm512_add_ps(dbias_v, ddt_raw);
          if ((t0 + t) % kTile == 0) {  // float sums over at most kTile steps, then double
            for (int64_t i = 0; i < state; ++i) dA_b[i] += dA_fb[i];
            std::fill(dA_fb, dA_fb + state, 0.0f);
          }
        }
        _mm512_storeu_ps(dD.data() + blk * kChannels, dD_v);
        _mm512_storeu_ps(dbias.data() + blk * kChannels, dbias_v);
        tile_to_block(du_t, channel_last, b, d0, width, dim, L, t0, steps, du);
        tile_to_block(ddt_t, channel_last, b, d0, width, dim, L, t0, steps, ddt);
        if (s.z != nullptr) tile_to_block(dout_t, channel_last, b, d0, width, dim, L, t0, steps, dz);
        if (out != nullptr) tile_to_block(y_t, channel_last, b, d0, width, dim, L, t0, steps, out);
      }
      float* dB = dBt + (b * L + t0) * Np;
      float* dC = dCt + (b * L + t0) * Np;
      for (int64_t i = 0; i < steps * Np; ++i) {
        dB[i] = _mm512_reduce_add_ps(_mm512_loadu_ps(dBv + i * kChannels));
        dC[i] = _mm512_reduce_add_ps(_mm512_loadu_ps(dCv + i * kChannels));
      }
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t d0 = blk * kChannels, width = std::min(kChannels, dim - d0);
      if (dh0 != nullptr) store_state_block(gh.data() + blk * state, b * dim + d0, width, Np, dh0);
      for (int64_t j = 0; j < width; ++j) {
        const int64_t row = b * dim + d0 + j;
        dD_rows[row] = dD[blk * kChannels + j];
        dbias_rows[row] = dbias[blk * kChannels + j];
        for (int64_t n = 0; n < Np; ++n) dA_rows[row * Np + n] = dA[blk * state + n * kChannels + j];
      }
    }
  }
}

bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f"); }
#else
constexpr int64_t kChannels = 16;
void forward_avx512(const Scan<float>&, bool, const float*, bool, float*, float*, int64_t, int64_t) {}
void backward_avx512(const Scan<float>&, bool, const float*, bool, const float*, float*, float*, float*, double*,
                     double*, double*, float*, float*, float*, float*, int64_t, int64_t, int64_t) {}
bool cpu_has_avx512() { return false; }
template <bool>
void forward_avx2(const Scan<float>&, bool, const float*, bool, float*, float*, int64_t, int64_t) {}
template <bool>
void backward_avx2(const Scan<float>&, bool, const float*, bool, const float*, float*, float*, float*, double*,
                   double*, double*, float*, float*, float*, float*, int64_t, int64_t, int64_t) {}
bool cpu_has_avx2() { return false; }
#endif

template <typename T>
struct Grads {
  // du, ddt, dz (nullptr without z): (B, D, L). dA (B, D, Np) and dD (B, D): per-row sums over t
  // in the accumulation type, added over b by the caller. dBt, dCt (blocks, B, L, Np): sums over
  // the channels of one block (see bwd). out (B, D, L) or nullptr: the forward's output,
  // recomputed on the way. dh0 (B, D, Np) or nullptr: the gradient of the initial state.
  using acc_t = at::acc_type<T, false>;
  T* du;
  T* ddt;
  T* dz;
  T* out;
  T* dh0;
  acc_t* dA;
  acc_t* dD;
  T* dBt;
  T* dCt;
  int64_t batch, blocks, block_dim;
};

// Backward of tasks [lo, hi): task = (block of channels, batch element b).
template <typename T>
M2REC_INLINE void backward_tasks(const Scan<T>& s, const T* dout, const Grads<T>& g, int64_t lo,
                                 int64_t hi) {
  using acc_t = at::acc_type<T, false>;
  const int64_t L = s.L, Np = s.Np;
  // hs holds h_{-1} (h0, or 0), h_0, ..., h_{L-1} of one row and decays exp(dt_t A) for each t:
  // recomputed for every row, never stored across rows.
  std::vector<T> hs((L + 1) * Np), decays(L * Np), dys(L), ys(L), gh(Np);
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t block = task / g.batch, b = task % g.batch;
    const int64_t d_end = std::min(s.dim, (block + 1) * g.block_dim);
    T* dBt = g.dBt + (block * g.batch + b) * L * Np;
    T* dCt = g.dCt + (block * g.batch + b) * L * Np;
    const T* Bt = s.Bt + b * L * Np;
    const T* Ct = s.Ct + b * L * Np;
    for (int64_t d = block * g.block_dim; d < d_end; ++d) {
      const int64_t row = b * s.dim + d;
      const T* u = s.u + row * L;
      const T* dt = s.dt + row * L;
      const T* A = s.A + d * Np;
      const T* dy_out = dout + row * L;
      const T Dd = s.D != nullptr ? s.D[d] : T(0);

      if (s.h0 != nullptr) {
        std::copy(s.h0 + row * Np, s.h0 + (row + 1) * Np, hs.begin());
      } else {
        std::fill(hs.begin(), hs.begin() + Np, T(0));
      }
      for (int64_t t = 0; t < L; ++t) {
        ys[t] = scan_step<true>(A, Bt + t * Np, Ct + t * Np, dt[t], dt[t] * u[t],
                                hs.data() + t * Np, hs.data() + (t + 1) * Np,
                                decays.data() + t * Np, Np);
      }
      // dys = dL/dy, y = C . h + D u being the output before the gate.
      if (s.z != nullptr) {
        const T* z = s.z + row * L;
        T* dz = g.dz + row * L;
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) {
          const T sz = sigmoid_vec(z[t]);
          ys[t] += Dd * u[t];
          dz[t] = dy_out[t] * ys[t] * sz * (T(1) + z[t] * (T(1) - sz));
          dys[t] = dy_out[t] * z[t] * sz;
          ys[t] *= z[t] * sz;
        }
      } else {
        std::copy(dy_out, dy_out + L, dys.begin());
        if (g.out != nullptr) {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) ys[t] += Dd * u[t];
        }
      }
      if (g.out != nullptr) std::copy(ys.begin(), ys.end(), g.out + row * L);
      acc_t dD = 0;
      for (int64_t t = 0; t < L; ++t) dD += static_cast<acc_t>(dys[t] * u[t]);
      g.dD[row] = dD;

      // Reverse sweep. Entering step t, gh = exp(dt_{t+1} A) * dL/dh_{t+1}.
      acc_t* dA = g.dA + row * Np;
      std::fill(dA, dA + Np, acc_t(0));
      std::fill(gh.begin(), gh.end(), T(0));
      T* ghp = gh.data();
      T* du = g.du + row * L;
      T* ddt = g.ddt + row * L;
      for (int64_t t = L - 1; t >= 0; --t) {
        const T dtt = dt[t], dy = dys[t], dtu = dtt * u[t];
        const T* Bn = Bt + t * Np;
        const T* Cn = Ct + t * Np;
        const T* h_prev = hs.data() + t * Np;
        const T* hn = hs.data() + (t + 1) * Np;
        const T* decay = decays.data() + t * Np;
        T* dBn = dBt + t * Np;
        T* dCn = dCt + t * Np;
        T acc_gB[kLanes] = {};  // sum_n dL/dh_t[n] B_t[n]
        T acc_gA[kLanes] = {};  // sum_n dL/d(dt A[n]) A[n]
        for (int64_t n0 = 0; n0 < Np; n0 += kLanes) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) {
            const int64_t n = n0 + j;
            const T gn = ghp[n] + dy * Cn[n];
            const T a = decay[n];
            const T ga = gn * h_prev[n] * a;  // dL/d(dt A[n])
            dCn[n] += dy * hn[n];
            dBn[n] += gn * dtu;
            dA[n] += static_cast<acc_t>(ga * dtt);
            acc_gA[j] += ga * A[n];
            acc_gB[j] += gn * Bn[n];
            ghp[n] = gn * a;
          }
        }
        const T gB = lane_sum(acc_gB);
        du[t] = dy * Dd + dtt * gB;
        ddt[t] = lane_sum(acc_gA) + u[t] * gB;
      }
      if (g.dh0 != nullptr) std::copy(gh.begin(), gh.end(), g.dh0 + row * Np);
    }
  }
}

// Causal depthwise convolution on channel-last data, x (B, L, D) and weight transposed to (K, D):
// out[b, t] = bias + sum_k w[k] x[b, t - K + 1 + k], then SiLU if `silu`; vectorised over the D
// channels of a position, with none of the layout copies of the oneDNN convolution.
template <typename T>
M2REC_INLINE void conv_pre_activation(const T* x, const T* wt, const T* bias, T* y, int64_t t,
                                      int64_t dim, int64_t K) {
  // x and y point at position t of one sequence; positions before 0 are the zero padding.
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) y[d] = bias != nullptr ? bias[d] : T(0);
  for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
    const T* xs = x - (K - 1 - k) * dim;
    const T* wk = wt + k * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) y[d] += wk[d] * xs[d];
  }
}

// Positions [lo, hi) of the B * L positions.
template <typename T>
M2REC_INLINE void conv_forward_positions(const T* x, const T* wt, const T* bias, T* out,
                                         int64_t dim, int64_t L, int64_t K, bool silu, int64_t lo,
                                         int64_t hi) {
  for (int64_t p = lo; p < hi; ++p) {
    T* y = out + p * dim;
    conv_pre_activation(x + p * dim, wt, bias, y, p % L, dim, K);
    if (silu) {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) y[d] = y[d] * sigmoid_vec(y[d]);
    }
  }
}

// Gradients of batch elements [lo, hi): dx (B, L, D); dw_rows (B, K, D) and dbias_rows (B, D),
// per-sequence sums in the accumulation type that the caller adds over b.
template <typename T>
M2REC_INLINE void conv_backward_batches(const T* x, const T* wt, const T* bias, const T* dout,
                                        T* dx, at::acc_type<T, false>* dw_rows,
                                        at::acc_type<T, false>* dbias_rows, int64_t dim,
                                        int64_t L, int64_t K, bool silu, int64_t lo, int64_t hi) {
  using acc_t = at::acc_type<T, false>;
  std::vector<T> dpre(L * dim);  // dL/d(pre-activation) of one sequence
  for (int64_t b = lo; b < hi; ++b) {
    const T* xb = x + b * L * dim;
    const T* dyb = dout + b * L * dim;
    for (int64_t t = 0; t < L; ++t) {
      T* g = dpre.data() + t * dim;
      const T* dy = dyb + t * dim;
      if (silu) {
        conv_pre_activation(xb + t * dim, wt, bias, g, t, dim, K);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) {
          const T pre = g[d], sig = sigmoid_vec(pre);
          g[d] = dy[d] * sig * (T(1) + pre * (T(1) - sig));
        }
      } else {
        std::copy(dy, dy + dim, g);
      }
    }
    acc_t* dw = dw_rows + b * K * dim;
    acc_t* dbias = dbias_rows + b * dim;
    std::fill(dw, dw + K * dim, acc_t(0));
    std::fill(dbias, dbias + dim, acc_t(0));
    for (int64_t t = 0; t < L; ++t) {
      const T* g = dpre.data() + t * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) dbias[d] += g[d];
      for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
        const T* xs = xb + (t - (K - 1 - k)) * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) dw[k * dim + d] += static_cast<acc_t>(g[d] * xs[d]);
      }
    }
    // x[i] feeds out[i + K - 1 - k] for every k with that position below L.
    for (int64_t i = 0; i < L; ++i) {
      T* dxi = dx + (b * L + i) * dim;
      std::fill(dxi, dxi + dim, T(0));
      for (int64_t k = std::max<int64_t>(0, i + K - L); k < K; ++k) {
        const T* g = dpre.data() + (i + K - 1 - k) * dim;
        const T* wk = wt + k * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) dxi[d] += wk[d] * g[d];
      }
    }
  }
}

// Non-template entry points, so that the target clones apply; one per dtype.
M2REC_CLONES void forward_f32(const Scan<float>& s, float* out, float* last, int64_t lo,
                              int64_t hi) {
  forward_rows(s, out, last, lo, hi);
}
M2REC_CLONES void forward_f64(const Scan<double>& s, double* out, double* last, int64_t lo,
                              int64_t hi) {
  forward_rows(s, out, last, lo, hi);
}
M2REC_CLONES void backward_f32(const Scan<float>& s, const float* dout, const Grads<float>& g,
                               int64_t lo, int64_t hi) {
  backward_tasks(s, dout, g, lo, hi);
}
M2REC_CLONES void backward_f64(const Scan<double>& s, const double* dout, const Grads<double>& g,
                               int64_t lo, int64_t hi) {
  backward_tasks(s, dout, g, lo, hi);
}
void forward(const Scan<float>& s, float* out, float* last, int64_t lo, int64_t hi) {
  forward_f32(s, out, last, lo, hi);
}
void forward(const Scan<double>& s, double* out, double* last, int64_t lo, int64_t hi) {
  forward_f64(s, out, last, lo, hi);
}
void backward(const Scan<float>& s, const float* dout, const Grads<float>& g, int64_t lo,
              int64_t hi) {
  backward_f32(s, dout, g, lo, hi);
}
void backward(const Scan<double>& s, const double* dout, const Grads<double>& g, int64_t lo,
              int64_t hi) {
  backward_f64(s, dout, g, lo, hi);
}
M2REC_CLONES void conv_forward_f32(const float* x, const float* w, const float* bias, float* out,
                                   int64_t dim, int64_t L, int64_t K, bool silu, int64_t lo, int64_t hi) {
  conv_forward_positions(x, w, bias, out, dim, L, K, silu, lo, hi);
}
M2REC_CLONES void conv_forward_f64(const double* x, const double* w, const double* bias, double* out,
                                   int64_t dim, int64_t L, int64_t K, bool silu, int64_t lo, int64_t hi) {
  conv_forward_positions(x, w, bias, out, dim, L, K, silu, lo, hi);
}
M2REC_CLONES void conv_backward_f32(const float* x, const float* w, const float* bias, const float* dout,
                                    float* dx, double* dw_rows, double* dbias_rows, int64_t dim, int64_t L,
                                    int64_t K, bool silu, int64_t lo, int64_t hi) {
  conv_backward_batches(x, w, bias, dout, dx, dw_rows, dbias_rows, dim, L, K, silu, lo, hi);
}
M2REC_CLONES void conv_backward_f64(const double* x, const double* w, const double* bias,
                                    const double* dout, double* dx, double* dw_rows, double* dbias_rows,
                                    int64_t dim, int64_t L, int64_t K, bool silu, int64_t lo, int64_t hi) {
  conv_backward_batches(x, w, bias, dout, dx, dw_rows, dbias_rows, dim, L, K, silu, lo, hi);
}
void conv_forward(const float* x, const float* w, const float* bias, float* out, int64_t dim, int64_t L,
                  int64_t K, bool silu, int64_t lo, int64_t hi) {
  conv_forward_f32(x, w, bias, out, dim, L, K, silu, lo, hi);
}
void conv_forward(const double* x, const double* w, const double* bias, double* out, int64_t dim,
                  int64_t L, int64_t K, bool silu, int64_t lo, int64_t hi) {
  conv_forward_f64(x, w, bias, out, dim, L, K, silu, lo, hi);
}
void conv_backward(const float* x, const float* w, const float* bias, const float* dout, float* dx,
                   double* dw_rows, double* dbias_rows, int64_t dim, int64_t L, int64_t K, bool silu,
                   int64_t lo, int64_t hi) {
  conv_backward_f32(x, w, bias, dout, dx, dw_rows, dbias_rows, dim, L, K, silu, lo, hi);
}
void conv_backward(const double* x, const double* w, const double* bias, const double* dout, double* dx,
                   double* dw_rows, double* dbias_rows, int64_t dim, int64_t L, int64_t K, bool silu,
                   int64_t lo, int64_t hi) {
  conv_backward_f64(x, w, bias, dout, dx, dw_rows, dbias_rows, dim, L, K, silu, lo, hi);
}

// The inputs made contiguous, u, dt, z as (B, D, L) rows or, with `channel_last`, as (B, L, D);
// B and C as (B, L, Np) so the n loops read contiguous memory and A as (D, Np), both zero-padded
// in n. A tensor already in the wanted layout (such as a transposed view of a channel-last
// tensor) is not copied.
struct Inputs {
  at::Tensor u, dt, A, Bt, Ct, D, z, h0;  // D, z, h0 undefined when absent
  int64_t batch, dim, L, N, Np;

  template <typename T>
  Scan<T> view() const {
    return Scan<T>{u.data_ptr<T>(),
                   dt.data_ptr<T>(),
                   z.defined() ? z.data_ptr<T>() : nullptr,
                   A.data_ptr<T>(),
                   Bt.data_ptr<T>(),
                   Ct.data_ptr<T>(),
                   D.defined() ? D.data_ptr<T>() : nullptr,
                   h0.defined() ? h0.data_ptr<T>() : nullptr,
                   dim,
                   L,
                   Np};
  }
};

Inputs check_inputs(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& initial_state,
                    bool channel_last = false) {
  TORCH_CHECK(u.dim() == 3, "u must be (B, D, L), got ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "A must be (D, N) with D=", dim, ", got ",
              A.sizes());
  const int64_t N = A.size(1), Np = (N + kLanes - 1) / kLanes * kLanes;
  TORCH_CHECK(dt.sizes() == u.sizes(), "delta must match u ", u.sizes(), ", got ", dt.sizes());
  for (const at::Tensor* t : {&B, &C}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == N && t->size(2) == L,
                "B and C must be (B, N, L) = (", batch, ", ", N, ", ", L, "), got ", t->sizes());
  }
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "float32 or float64 expected, got ",
              dtype);
  auto check = [&](const at::Tensor& t) -> const at::Tensor& {
    TORCH_CHECK(t.device().is_cpu(), "CPU tensors expected");
    TORCH_CHECK(t.scalar_type() == dtype, "all inputs must share u's dtype ", dtype, ", got ",
                t.scalar_type());
    return t;
  };
  auto prep = [&](const at::Tensor& t) { return check(t).contiguous(); };
  auto rows = [&](const at::Tensor& t) {  // (B, D, L) -> the layout the kernel reads
    return channel_last ? check(t).transpose(1, 2).contiguous() : prep(t);
  };
  auto pad_n = [&](const at::Tensor& t) {  // (..., N) -> (..., Np), contiguous
    return Np == N ? t.contiguous() : at::constant_pad_nd(t, {0, Np - N}).contiguous();
  };
  Inputs in;
  in.u = rows(u);
  in.dt = rows(dt);
  in.A = pad_n(prep(A));
  in.Bt = pad_n(check(B).transpose(1, 2));  // (B, L, Np)
  in.Ct = pad_n(check(C).transpose(1, 2));
  if (D.has_value()) {
    TORCH_CHECK(D->numel() == dim, "D must have D=", dim, " entries, got ", D->sizes());
    in.D = prep(*D);
  }
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == u.sizes(), "z must match u ", u.sizes(), ", got ", z->sizes());
    in.z = rows(*z);
  }
  if (initial_state.has_value()) {
    TORCH_CHECK(initial_state->dim() == 3 && initial_state->size(0) == batch && initial_state->size(1) == dim &&
                    initial_state->size(2) == N,
                "initial_state must be (B, D, N) = (", batch, ", ", dim, ", ", N, "), got ", initial_state->sizes());
    in.h0 = pad_n(check(*initial_state));
  }
  in.batch = batch;
  in.dim = dim;
  in.L = L;
  in.N = N;
  in.Np = Np;
  return in;
}

// Whether u, delta and z (B, D, L) all are transposed views of contiguous channel-last (B, L, D)
// memory, which the AVX-512 kernels read in place.
bool channel_last_inputs(const at::Tensor& u, const at::Tensor& dt, const std::optional<at::Tensor>& z) {
  auto is_channel_last = [](const at::Tensor& t) {
    return t.stride(1) == 1 && t.stride(2) == t.size(1) && t.stride(0) == t.size(1) * t.size(2);
  };
  return is_channel_last(u) && is_channel_last(dt) && (!z.has_value() || is_channel_last(*z));
}

// Rows per task such that a task holds at least ~64k state updates: threads cost more below.
int64_t grain_rows(const Inputs& in) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, in.L * in.Np));
}

// Whether every decay exp(dt A) of the scan has dt A <= 0: the step goes through softplus (>= 0) and
// A <= 0 everywhere, as in Mamba (A = -exp(A_log)). The AVX2 kernels then clamp less (exp2_avx2).
bool decays_only(const Scan<float>& s, bool softplus) {
  if (!softplus) return false;
  for (int64_t i = 0; i < s.dim * s.Np; ++i) {
    if (!(s.A[i] <= 0.0f)) return false;  // NaN too
  }
  return true;
}

// Returns out (B, D, L) and the last state (B, D, N) of the scan started from initial_state
// (B, D, N) (0 when absent); the step is softplus(delta + delta_bias) (each part optional). For
// float32 inputs, `vector_width` (floats per vector) picks a channel-vectorised forward: 16 runs
// forward_avx512 on a CPU with AVX-512F, 8 (or 16 without AVX-512F) forward_avx2 on one with AVX2
// and FMA, 0 the generic loops; for channel-last inputs the vectorised forwards' out is a (B, D, L)
// view of channel-last memory too.
std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias,
                            const std::optional<at::Tensor>& initial_state, bool softplus,
                            int64_t vector_width) {
  if (delta_bias.has_value()) {
    TORCH_CHECK(delta_bias->numel() == u.size(1) && delta_bias->scalar_type() == u.scalar_type(),
                "delta_bias must be (D,) = (", u.size(1), ",) of u's dtype, got ", delta_bias->sizes());
  }
  const bool wide = vector_width >= 16 && cpu_has_avx512();
  if ((wide || (vector_width >= 8 && cpu_has_avx2())) && u.scalar_type() == at::kFloat) {
    const at::Tensor& dt = delta;
    const at::Tensor bias = delta_bias.has_value() ? delta_bias->contiguous() : at::Tensor();
    const bool channel_last = channel_last_inputs(u, dt, z);
    const Inputs in = check_inputs(u, dt, A, B, C, D, z, initial_state, channel_last);
    at::Tensor out = channel_last ? at::empty({in.batch, in.L, in.dim}, in.u.options())
                                  : at::empty({in.batch, in.dim, in.L}, in.u.options());
    at::Tensor last = at::empty({in.batch, in.dim, in.Np}, in.u.options());
    const Scan<float> s = in.view<float>();
    const bool decays = decays_only(s, softplus);
    const int64_t blocks = (in.dim + kChannels - 1) / kChannels;
    float* out_ptr = out.data_ptr<float>();
    float* last_ptr = last.data_ptr<float>();
    at::parallel_for(0, in.batch * blocks, std::max<int64_t>(1, grain_rows(in) / kChannels),
                     [&](int64_t lo, int64_t hi) {
                       (wide ? forward_avx512 : decays ? forward_avx2<true> : forward_avx2<false>)(
                           s, channel_last, bias.defined() ? bias.data_ptr<float>() : nullptr, softplus, out_ptr,
                           last_ptr, lo, hi);
                     });
    return {channel_last ? out.transpose(1, 2) : out, last.narrow(2, 0, in.N)};
  }
  at::Tensor dt = delta_bias.has_value() ? delta + delta_bias->unsqueeze(1) : delta;
  if (softplus) dt = at::softplus(dt);
  const Inputs in = check_inputs(u, dt, A, B, C, D, z, initial_state);
  at::Tensor out = at::empty({in.batch, in.dim, in.L}, in.u.options());
  at::Tensor last = at::empty({in.batch, in.dim, in.Np}, in.u.options());
  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "m2rec_selective_scan_fwd", [&] {
    const Scan<scalar_t> s = in.view<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* last_ptr = last.data_ptr<scalar_t>();
    at::parallel_for(0, in.batch * in.dim, grain_rows(in), [&](int64_t lo, int64_t hi) {
      forward(s, out_ptr, last_ptr, lo, hi);
    });
  });
  return {out, last.narrow(2, 0, in.N)};
}

// The backward of `fwd` for the same inputs (delta being the raw step). Returns du, ddelta, dA, dB,
// dC, dD, dz, ddelta_bias, out, dinitial_state (dD, dz, ddelta_bias, dinitial_state undefined where
// the input was absent; out, the forward's output recomputed on the way, only with `return_out`).
// With `reuse_inputs` the caller gives up u, delta, z and dout, whose memory may then hold du,
// ddelta, dz and out (the AVX-512 kernel copies each block of them into its tiles before it writes
// the block back). The vectorised backward (AVX-512 or AVX2, `vector_width` as in fwd) runs in
// time chunks of `chunk` steps (see backward_avx512).
std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias,
                            const std::optional<at::Tensor>& initial_state, bool softplus, bool return_out,
                            bool reuse_inputs, int64_t chunk, int64_t vector_width) {
  TORCH_CHECK(dout.sizes() == u.sizes(), "dout must match u ", u.sizes(), ", got ", dout.sizes());
  const bool wide = vector_width >= 16 && cpu_has_avx512();
  if ((wide || (vector_width >= 8 && cpu_has_avx2())) && u.scalar_type() == at::kFloat) {
    const at::Tensor& dt = delta;
    const at::Tensor bias = delta_bias.has_value() ? delta_bias->contiguous() : at::Tensor();
    const bool channel_last = channel_last_inputs(u, dt, z);
    const Inputs in = check_inputs(u, dt, A, B, C, D, z, initial_state, channel_last);
    const at::Tensor dout_c = channel_last ? dout.to(at::kFloat).transpose(1, 2).contiguous()
                                           : dout.to(at::kFloat).contiguous();
    const int64_t batch = in.batch, dim = in.dim, L = in.L, Np = in.Np, N = in.N;
    // in.u's layout (channel-last or rows); with reuse_inputs, the inputs' own memory
    auto output_like = [&](const at::Tensor& t) { return reuse_inputs ? t : at::empty_like(t); };
    at::Tensor du = output_like(in.u), ddt = output_like(in.dt);
    at::Tensor dz = in.z.defined() ? output_like(in.z) : at::Tensor();
    at::Tensor out = return_out ? output_like(dout_c) : at::Tensor();
    at::Tensor dBt = at::empty({batch, L, Np}, in.u.options());
    at::Tensor dCt = at::empty({batch, L, Np}, in.u.options());
    const auto acc_options = in.u.options().dtype(at::kDouble);
    at::Tensor dA_rows = at::empty({batch, dim, Np}, acc_options);
    at::Tensor dD_rows = at::empty({batch, dim}, acc_options);
    at::Tensor dbias_rows = at::empty({batch, dim}, acc_options);
    at::Tensor dh0 = in.h0.defined() ? at::empty_like(in.h0) : at::Tensor();
    const Scan<float> s = in.view<float>();
    const bool decays = decays_only(s, softplus);
    at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
      (wide ? backward_avx512 : decays ? backward_avx2<true> : backward_avx2<false>)(s, channel_last, bias.defined() ? bias.data_ptr<float>() : nullptr, softplus,
                      dout_c.data_ptr<float>(), du.data_ptr<float>(), ddt.data_ptr<float>(),
                      dz.defined() ? dz.data_ptr<float>() : nullptr, dA_rows.data_ptr<double>(),
                      dD_rows.data_ptr<double>(), dbias_rows.data_ptr<double>(), dBt.data_ptr<float>(),
                      dCt.data_ptr<float>(), out.defined() ? out.data_ptr<float>() : nullptr,
                      dh0.defined() ? dh0.data_ptr<float>() : nullptr, chunk, lo, hi);
    });
    auto as_input = [&](const at::Tensor& t) { return channel_last ? t.transpose(1, 2) : t; };
    return {as_input(du), as_input(ddt), dA_rows.sum(0).narrow(1, 0, N).to(at::kFloat),
            dBt.narrow(2, 0, N).transpose(1, 2).contiguous(), dCt.narrow(2, 0, N).transpose(1, 2).contiguous(),
            in.D.defined() ? dD_rows.sum(0).to(at::kFloat) : at::Tensor(),
            dz.defined() ? as_input(dz) : at::Tensor(),
            bias.defined() ? dbias_rows.sum(0).to(at::kFloat) : at::Tensor(),
            out.defined() ? as_input(out) : at::Tensor(), dh0.defined() ? dh0.narrow(2, 0, N) : at::Tensor()};
  }
  const at::Tensor pre_activation = delta_bias.has_value() ? delta + delta_bias->unsqueeze(1) : delta;
  const Inputs in =
      check_inputs(u, softplus ? at::softplus(pre_activation) : pre_activation, A, B, C, D, z, initial_state);
  const at::Tensor dout_c = dout.to(in.u.scalar_type()).contiguous();
  const int64_t batch = in.batch, dim = in.dim, L = in.L, Np = in.Np;

  // dB and dC are sums over channels. A task owns one batch element and one block of channels
  // and adds into that block's own (B, L, Np) partial sums, so no two threads write the same
  // memory. With at least as many batch elements as threads one block keeps every thread busy.
  const int64_t threads = at::get_num_threads();
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(dim, (threads + batch - 1) / std::max<int64_t>(batch, 1)));
  const int64_t block_dim = (dim + blocks - 1) / blocks;
  const auto acc_options =
      in.u.options().dtype(at::toAccumulateType(in.u.scalar_type(), /*is_cuda=*/false));
  at::Tensor du = at::empty_like(in.u), ddt = at::empty_like(in.u);
  at::Tensor dz = in.z.defined() ? at::empty_like(in.z) : at::Tensor();
  at::Tensor out = return_out ? at::empty_like(in.u) : at::Tensor();
  at::Tensor dBt = at::zeros({blocks, batch, L, Np}, in.u.options());
  at::Tensor dCt = at::zeros({blocks, batch, L, Np}, in.u.options());
  at::Tensor dA_rows = at::empty({batch, dim, Np}, acc_options);
  at::Tensor dD_rows = at::empty({batch, dim}, acc_options);
  at::Tensor dh0 = in.h0.defined() ? at::empty_like(in.h0) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "m2rec_selective_scan_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const Scan<scalar_t> s = in.view<scalar_t>();
    const scalar_t* dout_ptr = dout_c.data_ptr<scalar_t>();
    const Grads<scalar_t> g{du.data_ptr<scalar_t>(),
                            ddt.data_ptr<scalar_t>(),
                            dz.defined() ? dz.data_ptr<scalar_t>() : nullptr,
                            out.defined() ? out.data_ptr<scalar_t>() : nullptr,
                            dh0.defined() ? dh0.data_ptr<scalar_t>() : nullptr,
                            dA_rows.data_ptr<acc_t>(),
                            dD_rows.data_ptr<acc_t>(),
                            dBt.data_ptr<scalar_t>(),
                            dCt.data_ptr<scalar_t>(),
                            batch,
                            blocks,
                            block_dim};
    const int64_t grain = std::max<int64_t>(1, grain_rows(in) / block_dim);
    at::parallel_for(0, blocks * batch, grain, [&](int64_t lo, int64_t hi) {
      backward(s, dout_ptr, g, lo, hi);
    });
  });

  const auto dtype = in.u.scalar_type();
  const int64_t N = in.N;
  at::Tensor dA = dA_rows.sum(0).narrow(1, 0, N).to(dtype);
  // (blocks, B, L, Np) -> (B, N, L), the layout of the inputs B and C
  at::Tensor dB = dBt.sum(0).narrow(2, 0, N).transpose(1, 2).contiguous();
  at::Tensor dC = dCt.sum(0).narrow(2, 0, N).transpose(1, 2).contiguous();
  at::Tensor dD = in.D.defined() ? dD_rows.sum(0).to(dtype) : at::Tensor();
  if (softplus) ddt.mul_(at::sigmoid(pre_activation));
  // The sum over t in double, as dA and dD; over b first (rows are contiguous in t).
  at::Tensor dbias = delta_bias.has_value() ? ddt.sum(0).to(at::kDouble).sum(1).to(dtype) : at::Tensor();
  return {du, ddt, dA, dB, dC, dD, dz, dbias, out, dh0.defined() ? dh0.narrow(2, 0, N) : at::Tensor()};
}

// The convolution's inputs checked and made contiguous channel-last: x (B, D, L) -> (B, L, D) (no
// copy for a transposed view of channel-last memory), weight (D, K) -> (K, D), bias (D,) or none.
struct ConvInputs {
  at::Tensor x, wt, bias;  // bias undefined when absent
  int64_t batch, dim, L, K;
};

// weight (D, K) -> the (K, D) rows the kernels read, by a plain loop: ATen's strided copy
// (`weight.t().contiguous()`) of these few hundred numbers took 11 % of a batch-1 call of conv_fwd
// (B = 1, L = 200, D = 128: 69.5 against 61.7 us, one thread).
at::Tensor transposed_weight(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const int64_t dim = w.size(0), K = w.size(1);
  at::Tensor wt = at::empty({K, dim}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "m2rec_conv_weight_rows", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = wt.data_ptr<scalar_t>();
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t k = 0; k < K; ++k) dst[k * dim + d] = src[d * K + k];
    }
  });
  return wt;
}

ConvInputs check_conv_inputs(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3, "x must be (B, D, L), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1),
              "weight must be (D, K) with D=", x.size(1), ", got ", weight.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "float32 or float64 expected, got ", dtype);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(weight.scalar_type() == dtype, "weight must have x's dtype ", dtype);
  ConvInputs in{x.transpose(1, 2).contiguous(), transposed_weight(weight), at::Tensor(), x.size(0),
                x.size(1), x.size(2), weight.size(1)};
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == in.dim && bias->scalar_type() == dtype && bias->device().is_cpu(),
                "bias must be (D,) = (", in.dim, ",) of x's dtype, got ", bias->sizes());
    in.bias = bias->contiguous();
  }
  return in;
}

// Returns out (B, D, L), a view of channel-last memory.
at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    bool silu) {
  const ConvInputs in = check_conv_inputs(x, weight, bias);
  at::Tensor out = at::empty_like(in.x);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, in.dim * in.K));
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "m2rec_causal_conv1d_fwd", [&] {
    const scalar_t* b = in.bias.defined() ? in.bias.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, in.batch * in.L, grain, [&](int64_t lo, int64_t hi) {
      conv_forward(in.x.data_ptr<scalar_t>(), in.wt.data_ptr<scalar_t>(), b, out.data_ptr<scalar_t>(),
                   in.dim, in.L, in.K, silu, lo, hi);
    });
  });
  return out.transpose(1, 2);
}

// Returns dx (B, D, L) (a view of channel-last memory), dweight (D, K), dbias (undefined without bias).
std::vector<at::Tensor> conv_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, bool silu) {
  const ConvInputs in = check_conv_inputs(x, weight, bias);
  TORCH_CHECK(dout.sizes() == x.sizes(), "dout must match x ", x.sizes(), ", got ", dout.sizes());
  const at::Tensor dout_c = dout.to(in.x.scalar_type()).transpose(1, 2).contiguous();
  at::Tensor dx = at::empty_like(in.x);
  const auto acc_options = in.x.options().dtype(at::kDouble);
  at::Tensor dw_rows = at::empty({in.batch, in.K, in.dim}, acc_options);
  at::Tensor dbias_rows = at::empty({in.batch, in.dim}, acc_options);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "m2rec_causal_conv1d_bwd", [&] {
    const scalar_t* b = in.bias.defined() ? in.bias.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, in.batch, 1, [&](int64_t lo, int64_t hi) {
      conv_backward(in.x.data_ptr<scalar_t>(), in.wt.data_ptr<scalar_t>(), b, dout_c.data_ptr<scalar_t>(),
                    dx.data_ptr<scalar_t>(), dw_rows.data_ptr<double>(), dbias_rows.data_ptr<double>(),
                    in.dim, in.L, in.K, silu, lo, hi);
    });
  });
  const auto dtype = in.x.scalar_type();
  return {dx.transpose(1, 2), dw_rows.sum(0).t().to(dtype),
          in.bias.defined() ? dbias_rows.sum(0).to(dtype) : at::Tensor()};
}

// ---- the causal filter's window sum, one cached step: out[b, :] = sum_k kernel[k, :] * table[ids[b, k], :] ----
// Each user's window of item ids names rows of the embedded catalogue (table, I x D); the rows are weighted by the
// filter's kernel (W x D, lag-aligned with the window) and summed straight into the output row. At a step's sizes
// table and kernel stay in cache, so the (B, W, D) gathered window that the plain-PyTorch twin builds block by block
// (131 MB at B = 256, W = 2,000) is never written. An id outside the table's rows is skipped and reported.
template <typename T>
M2REC_INLINE bool window_sum_users(const int64_t* ids, const T* table, const T* kernel, T* out, int64_t rows,
                                   int64_t window, int64_t dim, int64_t lo, int64_t hi) {
  bool in_range = true;
  for (int64_t b = lo; b < hi; ++b) {
    T* sum = out + b * dim;
    std::fill(sum, sum + dim, T(0));
    const int64_t* user_ids = ids + b * window;
    for (int64_t k = 0; k < window; ++k) {
      const int64_t id = user_ids[k];
      if (id < 0 || id >= rows) {
        in_range = false;
        continue;
      }
      const T* row = table + id * dim;
      const T* weight = kernel + k * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) sum[d] += weight[d] * row[d];
    }
  }
  return in_range;
}
M2REC_CLONES bool window_sum_f32(const int64_t* ids, const float* table, const float* kernel, float* out,
                                 int64_t rows, int64_t window, int64_t dim, int64_t lo, int64_t hi) {
  return window_sum_users(ids, table, kernel, out, rows, window, dim, lo, hi);
}
M2REC_CLONES bool window_sum_f64(const int64_t* ids, const double* table, const double* kernel, double* out,
                                 int64_t rows, int64_t window, int64_t dim, int64_t lo, int64_t hi) {
  return window_sum_users(ids, table, kernel, out, rows, window, dim, lo, hi);
}
bool window_sum_range(const int64_t* ids, const float* table, const float* kernel, float* out, int64_t rows,
                      int64_t window, int64_t dim, int64_t lo, int64_t hi) {
  return window_sum_f32(ids, table, kernel, out, rows, window, dim, lo, hi);
}
bool window_sum_range(const int64_t* ids, const double* table, const double* kernel, double* out, int64_t rows,
                      int64_t window, int64_t dim, int64_t lo, int64_t hi) {
  return window_sum_f64(ids, table, kernel, out, rows, window, dim, lo, hi);
}

// window_ids (B, W) int64, table (I, D), kernel (W, D) of table's dtype -> (B, D).
at::Tensor window_sum(const at::Tensor& window_ids, const at::Tensor& table, const at::Tensor& kernel) {
  TORCH_CHECK(window_ids.dim() == 2 && window_ids.scalar_type() == at::kLong,
              "window_ids must be (B, W) int64, got ", window_ids.sizes(), " ", window_ids.scalar_type());
  TORCH_CHECK(table.dim() == 2, "table must be (I, D), got ", table.sizes());
  TORCH_CHECK(kernel.dim() == 2 && kernel.size(0) == window_ids.size(1) && kernel.size(1) == table.size(1),
              "kernel must be (W, D) = (", window_ids.size(1), ", ", table.size(1), "), got ", kernel.sizes());
  const auto dtype = table.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "float32 or float64 expected, got ", dtype);
  TORCH_CHECK(kernel.scalar_type() == dtype, "kernel must have table's dtype ", dtype);
  TORCH_CHECK(window_ids.device().is_cpu() && table.device().is_cpu() && kernel.device().is_cpu(),
              "CPU tensors expected");
  const at::Tensor ids = window_ids.contiguous(), rows = table.contiguous(), weights = kernel.contiguous();
  const int64_t batch = ids.size(0), window = ids.size(1), dim = rows.size(1);
  at::Tensor out = at::empty({batch, dim}, rows.options());
  std::atomic<bool> in_range{true};
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, window * dim));
  AT_DISPATCH_FLOATING_TYPES(dtype, "m2rec_window_sum", [&] {
    at::parallel_for(0, batch, grain, [&](int64_t lo, int64_t hi) {
      if (!window_sum_range(ids.data_ptr<int64_t>(), rows.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), rows.size(0), window, dim, lo, hi)) {
        in_range = false;
      }
    });
  });
  TORCH_CHECK(in_range.load(), "window_ids holds an id outside the table's rows 0..", rows.size(0) - 1);
  return out;
}

// ---- the causal filter over whole sequences, summed directly: out[b, t] = sum_lag kernel[lag] * x[b, t - lag] ----
// For the short sequences of inference a direct sum over the lags is cheaper than two FFTs of 2L points (and the
// (B, D, L + 1) complex spectrum between them): at L = 200 and batch 1 it is 1.3 M multiply-adds over memory that
// stays in cache. Channel-last throughout: a row of kLanes channels is summed over the lags in registers, and the
// sequence is read as the layers produce it, without the transposes the FFTs along L need.
// kPositions outputs at a time share each lag's kernel row and give the multiply-adds independent chains: with one
// position the sums wait on each other's latency (151 against 119 us for the FFTs at L = 200, batch 1, AVX2).
constexpr int64_t kPositions = 4;
// acc[0..Width) += sum over lags first..last of kernel[lag] * x[t - lag], channels d0..d0 + Width.
template <typename T, int64_t Width>
M2REC_INLINE void add_lags(T* acc, const T* x, const T* kernel, int64_t dim, int64_t d0, int64_t t, int64_t first,
                           int64_t last) {
  for (int64_t lag = first; lag <= last; ++lag) {
    const T* weight = kernel + lag * dim + d0;
    const T* row = x + (t - lag) * dim + d0;
#pragma omp simd
    for (int64_t j = 0; j < Width; ++j) acc[j] += weight[j] * row[j];
  }
}
template <typename T, int64_t Width>
M2REC_INLINE void filter_block(const T* x, const T* kernel, T* out, int64_t dim, int64_t length, int64_t lags,
                               int64_t d0) {
  int64_t t = 0;
  for (; t + kPositions <= length; t += kPositions) {
    T acc[kPositions][Width] = {};
    const int64_t shared = std::min(t, lags - 1);  // lags every one of the kPositions outputs has
    for (int64_t lag = 0; lag <= shared; ++lag) {
      const T* weight = kernel + lag * dim + d0;
      for (int64_t i = 0; i < kPositions; ++i) {
        const T* row = x + (t + i - lag) * dim + d0;
#pragma omp simd
        for (int64_t j = 0; j < Width; ++j) acc[i][j] += weight[j] * row[j];
      }
    }
    for (int64_t i = 1; i < kPositions; ++i) {  // the lags t + 1 .. t + i of the later outputs
      add_lags<T, Width>(acc[i], x, kernel, dim, d0, t + i, shared + 1, std::min(t + i, lags - 1));
    }
    for (int64_t i = 0; i < kPositions; ++i) std::copy(acc[i], acc[i] + Width, out + (t + i) * dim + d0);
  }
  for (; t < length; ++t) {
    T acc[Width] = {};
    add_lags<T, Width>(acc, x, kernel, dim, d0, t, 0, std::min(t, lags - 1));
    std::copy(acc, acc + Width, out + t * dim + d0);
  }
}
template <typename T>
M2REC_INLINE void filter_sequences(const T* x, const T* kernel, T* out, int64_t dim, int64_t length, int64_t lags,
                                   int64_t lo, int64_t hi) {
  for (int64_t b = lo; b < hi; ++b) {
    const T* xb = x + b * length * dim;
    T* outb = out + b * length * dim;
    int64_t d0 = 0;
    for (; d0 + kLanes <= dim; d0 += kLanes) filter_block<T, kLanes>(xb, kernel, outb, dim, length, lags, d0);
    for (; d0 < dim; ++d0) filter_block<T, 1>(xb, kernel, outb, dim, length, lags, d0);
  }
}
M2REC_CLONES void filter_sequences_f32(const float* x, const float* kernel, float* out, int64_t dim, int64_t length,
                                       int64_t lags, int64_t lo, int64_t hi) {
  filter_sequences(x, kernel, out, dim, length, lags, lo, hi);
}
M2REC_CLONES void filter_sequences_f64(const double* x, const double* kernel, double* out, int64_t dim,
                                       int64_t length, int64_t lags, int64_t lo, int64_t hi) {
  filter_sequences(x, kernel, out, dim, length, lags, lo, hi);
}
void filter_sequences_range(const float* x, const float* kernel, float* out, int64_t dim, int64_t length,
                            int64_t lags, int64_t lo, int64_t hi) {
  filter_sequences_f32(x, kernel, out, dim, length, lags, lo, hi);
}
void filter_sequences_range(const double* x, const double* kernel, double* out, int64_t dim, int64_t length,
                            int64_t lags, int64_t lo, int64_t hi) {
  filter_sequences_f64(x, kernel, out, dim, length, lags, lo, hi);
}

// x (B, D, L) (read channel-last: a transposed view of (B, L, D) memory is not copied), kernel (D, W) of x's dtype,
// lag 0 first -> (B, D, L), a view of channel-last memory. Lags beyond W (or beyond t) contribute nothing.
at::Tensor causal_filter(const at::Tensor& x, const at::Tensor& kernel) {
  TORCH_CHECK(x.dim() == 3, "x must be (B, D, L), got ", x.sizes());
  TORCH_CHECK(kernel.dim() == 2 && kernel.size(0) == x.size(1),
              "kernel must be (D, W) with D=", x.size(1), ", got ", kernel.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "float32 or float64 expected, got ", dtype);
  TORCH_CHECK(kernel.scalar_type() == dtype, "kernel must have x's dtype ", dtype);
  TORCH_CHECK(x.device().is_cpu() && kernel.device().is_cpu(), "CPU tensors expected");
  const at::Tensor rows = x.transpose(1, 2).contiguous(), weights = kernel.t().contiguous();  // (B, L, D), (W, D)
  const int64_t batch = rows.size(0), length = rows.size(1), dim = rows.size(2), lags = weights.size(0);
  at::Tensor out = at::empty_like(rows);
  const int64_t work = length * std::min(length, lags) * dim;  // multiply-adds per sequence, up to a factor 2
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work));
  AT_DISPATCH_FLOATING_TYPES(dtype, "m2rec_causal_filter", [&] {
    at::parallel_for(0, batch, grain, [&](int64_t lo, int64_t hi) {
      filter_sequences_range(rows.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             dim, length, lags, lo, hi);
    });
  });
  return out.transpose(1, 2);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "selective scan forward: out (B, D, L), last state (B, D, N)");
  m.def("has_avx512", &cpu_has_avx512, "whether this CPU runs the AVX-512 forward and backward");
  m.def("has_avx2", &cpu_has_avx2, "whether this CPU runs the AVX2 forward and backward (AVX2 and FMA)");
  m.def("conv_fwd", &conv_fwd, "causal depthwise conv1d (+ SiLU) forward: out (B, D, L)");
  m.def("conv_bwd", &conv_bwd, "causal depthwise conv1d (+ SiLU) backward: dx, dweight, dbias");
  m.def("window_sum", &window_sum, "the causal filter's window sum of one step: out (B, D)");
  m.def("causal_filter", &causal_filter, "the causal filter over whole sequences, summed directly: out (B, D, L)");
  m.def("bwd", &bwd, "selective scan backward: du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, out, dinitial_state");
}
