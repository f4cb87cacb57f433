// CPU matrix-vector products for decoding: y (M, N) = x (M, K) @ W^T (+ bias) for a few rows of x
// (M = the batch, 1 to 16) and a weight W (N, K) stored in bf16, in int8 with one scale per output
// row, or in int4 with a scale and a zero point per group of G inputs. Built on first use by
// qwen_kernels/cpu.py (torch.utils.cpp_extension, -O3 -march=native) as the torch ops
// qwen_cpu.linear_bf16 / linear_int8 / linear_int4 and dequantize_int4, which
// qwen_kernels/cpu.py's Linear and quantize.py's int8 and int4 layers call.
//
// Why: decoding reads every weight once per token, so its speed is the memory bandwidth that the
// matrix-vector products reach. On the 2-core test machine torch's kernels for these shapes read
// 8-15 GB/s; a plain loop over the rows reads as little, because each row is short (896 weights are
// 28 cache lines) and the CPU's prefetcher stops at its end. The loops below keep ROWS rows going
// at once and ask for the next tile's rows while they work on this one (__builtin_prefetch): 25-30
// GB/s, as fast as torch's own x.sum() reads memory here.
//
// The arithmetic is in the vector types of cpu_simd.h.
// Each thread takes a share of the output rows, ROWS at a time, and goes over a tile's rows once for
// up to XROWS rows of x, so that each weight is widened once per XROWS dot products and read from
// memory once whatever M is. Sums are in float32, as torch's kernels keep them.
//
// int4 layout (quantize.py's pack_int4 writes it): row n is K/2 bytes; inputs 32c .. 32c+31 are the
// 16 bytes 16c .. 16c+15, byte j with input 32c + j in its low nibble and 32c + 16 + j in its high
// one (llama.cpp's Q4_0 order), so one 16-byte load gives 32 consecutive inputs. Each group of G
// inputs has a scale s and a zero point z: w = (q - 8) * s + z, computed in registers as
// w = q * s + c with c = z - 8 s, then used as a float weight.

#include "cpu_simd.h"

namespace qwen_cpu {
namespace {

constexpr int ROWS = 4;   // weight rows per tile: independent sums, so the adds do not wait on each other
constexpr int XROWS = 4;  // rows of x per pass over a tile (ROWS * XROWS accumulators in registers)
constexpr int64_t MAX_GROUPS = 1024;  // int4: K / G of one row (K = 32768 at G = 32)

// The weight rows of one tile, as the loops read them: 16 floats at (r, k), one float at (r, k) for
// the K % 16 inputs left at the end of a row, and a prefetch of the same place R rows further on.
struct Bf16Rows {
  const uint16_t* w;  // row r at w + r * K
  int64_t K;
  f32x16 at(int r, int64_t k) const { return bf16_to_floats(w + r * K + k); }
  float one(int r, int64_t k) const { return bf16_to_float(w[r * K + k]); }
  void prefetch(int r, int64_t k) const { __builtin_prefetch(w + r * K + k, 0, 2); }
};

struct Int8Rows {  // the row scales are applied to the sums afterwards
  const int8_t* q;
  int64_t K;
  f32x16 at(int r, int64_t k) const { return int8_to_floats(q + r * K + k); }
  float one(int r, int64_t k) const { return float(q[r * K + k]); }
  void prefetch(int r, int64_t k) const { __builtin_prefetch(q + r * K + k, 0, 2); }
};

// sums[i][r] = (row r of the tile) . (row i of x), for R weight rows and X rows of x (x rows K apart).
template <int R, int X, typename Rows>
inline void tile_dots(const Rows& w, int64_t K, const float* x, float sums[XROWS][ROWS]) {
  f32x16 acc[X][R] = {};
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES) {
    for (int r = 0; r < R; ++r) {
      w.prefetch(R + r, k);  // the next tile: its rows are read while this one's are summed
      const f32x16 wv = w.at(r, k);
      for (int i = 0; i < X; ++i) acc[i][r] += wv * load<f32x16>(x + i * K + k);
    }
  }
  for (int i = 0; i < X; ++i)
    for (int r = 0; r < R; ++r) {
      sums[i][r] = total(acc[i][r]);
      for (int64_t j = k; j < K; ++j) sums[i][r] += w.one(r, j) * x[i * K + j];
    }
}

// int4: the same, each group's weights made floats in registers, w = q * s + c (s, c: (R, K/G)).
template <int R, int X>
inline void tile_dots_int4(const uint8_t* q, int64_t K, int64_t G, const float* s, const float* c,
                           const float* x, float sums[XROWS][ROWS]) {
  f32x16 acc[X][R] = {};
  const int64_t groups = K / G, row_bytes = K / 2;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t k = g * G; k < (g + 1) * G; k += 2 * LANES) {  // 32 inputs: 16 bytes of each row
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(q + (R + r) * row_bytes + k / 2, 0, 2);
        const u8x16 b = load<u8x16>(q + r * row_bytes + k / 2);
        const float sg = s[r * groups + g], cg = c[r * groups + g];
        const f32x16 w_lo = uint8_to_floats(b & 15) * sg + cg;   // inputs k .. k+15
        const f32x16 w_hi = uint8_to_floats(b >> 4) * sg + cg;   // inputs k+16 .. k+31
        for (int i = 0; i < X; ++i)
          acc[i][r] += w_lo * load<f32x16>(x + i * K + k) + w_hi * load<f32x16>(x + i * K + k + LANES);
      }
    }
  }
  for (int i = 0; i < X; ++i)
    for (int r = 0; r < R; ++r) sums[i][r] = total(acc[i][r]);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// int4 with bf16 activations on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids): no float weights, no
// shuffles. 64 bytes of a row (128 inputs) are read as 32 16-bit lanes; shifting each lane by 0, 4,
// 8 and 12 and keeping 4 bits gives four vectors of 32 nibbles, and OR-ing 0x4300 into a lane holding
// q gives the bf16 number 128 + q exactly (0x4300 is 128.0, whose last mantissa bit is worth 1).
// vdpbf16ps multiplies 32 such weights by 32 bf16 inputs, adding pairs into 16 float lanes; lane i
// only ever holds bytes 4i .. 4i+3, one 32-input chunk, so each lane is scaled by its chunk's s:
//     sum_k ((q - 8) s + z) x  =  sum_g s * sum (128 + q) x  +  sum_g (z - 136 s) * sum x,
// the second term added by the caller. x comes in the order of the lanes (int4_bf16_order).
template <int R, int X>
inline void tile_dots_int4_bf16(const uint8_t* q, int64_t K, int64_t G, const float* s, const uint16_t* x,
                                float sums[XROWS][ROWS]) {
  __m512 acc[X][R];
  for (int i = 0; i < X; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const int64_t groups = K / G, row_bytes = K / 2;
  const __m512i nibble = _mm512_set1_epi16(0x0F), bf16_128 = _mm512_set1_epi16(0x4300);
  alignas(64) int32_t lane_group[LANES];  // the group of lane i, counted from the block's first
  for (int i = 0; i < LANES; ++i) lane_group[i] = int32_t((i / 4) * 32 / G);
  const __m512i lane_groups = _mm512_load_si512(lane_group);
  for (int64_t k = 0; k < K; k += 128) {
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(q + (2 * R + r) * row_bytes + k / 2, 0, 2);  // two tiles on: int4 rows are short
      const __m512i v = _mm512_loadu_si512(q + r * row_bytes + k / 2);
      const __m512bh w0 = (__m512bh)_mm512_or_si512(_mm512_and_si512(v, nibble), bf16_128);
      const __m512bh w1 = (__m512bh)_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), bf16_128);
      const __m512bh w2 = (__m512bh)_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 8), nibble), bf16_128);
      const __m512bh w3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), bf16_128);
      const __m512 scale = _mm512_permutexvar_ps(lane_groups, _mm512_loadu_ps(s + r * groups + k / G));
      for (int i = 0; i < X; ++i) {
        const uint16_t* xi = x + i * K + k;
        __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xi));
        part = _mm512_dpbf16_ps(part, w1, (__m512bh)_mm512_loadu_si512(xi + 32));
        part = _mm512_dpbf16_ps(part, w2, (__m512bh)_mm512_loadu_si512(xi + 64));
        part = _mm512_dpbf16_ps(part, w3, (__m512bh)_mm512_loadu_si512(xi + 96));
        acc[i][r] = _mm512_fmadd_ps(part, scale, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < X; ++i)
    for (int r = 0; r < R; ++r) sums[i][r] = _mm512_reduce_add_ps(acc[i][r]);
}

// x (M, K) bf16 -> the same numbers in the order of tile_dots_int4_bf16's lanes (K % 128 == 0): per
// 128 inputs, vector v = 0..3 of 32 lanes; lane w of vector v multiplies the nibble (v % 2: high)
// of byte p = 2w + v / 2 of the block, which holds input 32 (p / 16) + 16 (v % 2) + p % 16.
std::vector<uint16_t> int4_bf16_order(const at::Tensor& x) {
  const int64_t n = x.numel();
  const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  int source[128];
  for (int v = 0; v < 4; ++v)
    for (int w = 0; w < 32; ++w) {
      const int byte = 2 * w + v / 2;
      source[32 * v + w] = 32 * (byte / 16) + 16 * (v % 2) + byte % 16;
    }
  std::vector<uint16_t> out(n);
  for (int64_t b = 0; b < n; b += 128)
    for (int i = 0; i < 128; ++i) out[b + i] = p[b + source[i]];
  return out;
}
#endif

// Calls dots(R, X) for the tiles of R = ROWS rows (fewer at the end) with X = XROWS rows of x (fewer
// at the end); the template arguments must be constants, hence the switches.
template <typename Dots>
inline void for_tile(int R, int X, Dots dots) {
  auto with_x = [&](auto r) {
    switch (X) {
      case 1: dots(r, std::integral_constant<int, 1>()); break;
      case 2: dots(r, std::integral_constant<int, 2>()); break;
      case 3: dots(r, std::integral_constant<int, 3>()); break;
      default: dots(r, std::integral_constant<int, 4>()); break;
    }
  };
  if (R == ROWS) with_x(std::integral_constant<int, ROWS>());
  else with_x(std::integral_constant<int, 1>());  // the last rows, one at a time
}

// ------------------------------------------------------------------------------------------------
// The ops: x to floats once, the N output rows split over torch's threads, y written in x's dtype.
// ------------------------------------------------------------------------------------------------

// Runs tile(n0, R, m0, X, sums) over every tile of weight rows and every XROWS rows of x, in
// parallel over the tiles, and writes y[m, n] = sums * scale(n) + bias[n]. T: x's, y's and the
// bias' dtype.
template <typename T, typename Tile, typename Scale>
at::Tensor run_tiles(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, Tile tile,
                     Scale scale) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  T* out = y.data_ptr<T>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  const int64_t tiles = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    float sums[XROWS][ROWS];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * ROWS;
      const int R = int(std::min<int64_t>(ROWS, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += XROWS) {
        const int X = int(std::min<int64_t>(XROWS, M - m0));
        if (R == ROWS) {
          tile(n0, R, m0, X, sums);
        } else {  // the last rows of W, one at a time
          for (int r = 0; r < R; ++r) {
            float one[XROWS][ROWS];
            tile(n0 + r, 1, m0, X, one);
            for (int i = 0; i < X; ++i) sums[i][r] = one[i][0];
          }
        }
        for (int i = 0; i < X; ++i)
          for (int r = 0; r < R; ++r)
            out[(m0 + i) * N + n0 + r] =
                T(sums[i][r] * scale(n0 + r) + (b ? static_cast<float>(b[n0 + r]) : 0.f));
      }
    }
  });
  return y;
}

template <typename T>
std::vector<float> floats(const at::Tensor& x) {  // x (M, K) as float32
  const T* p = x.data_ptr<T>();
  std::vector<float> out(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) out[i] = static_cast<float>(p[i]);
  return out;
}

template <typename T>
at::Tensor linear_bf16_impl(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const int64_t K = x.size(1);
  const std::vector<float> xf = floats<T>(x);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto tile = [&](int64_t n0, int R, int64_t m0, int X, float sums[XROWS][ROWS]) {
    for_tile(R, X, [&](auto r, auto xr) {
      tile_dots<decltype(r)::value, decltype(xr)::value>(Bf16Rows{wp + n0 * K, K}, K, xf.data() + m0 * K, sums);
    });
  };
  return run_tiles<T>(x, w.size(0), bias, tile, [](int64_t) { return 1.f; });
}

template <typename T>
at::Tensor linear_int8_impl(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias) {
  const int64_t K = x.size(1);
  const std::vector<float> xf = floats<T>(x);
  const int8_t* qp = q.data_ptr<int8_t>();
  const T* sp = scales.data_ptr<T>();
  auto tile = [&](int64_t n0, int R, int64_t m0, int X, float sums[XROWS][ROWS]) {
    for_tile(R, X, [&](auto r, auto xr) {
      tile_dots<decltype(r)::value, decltype(xr)::value>(Int8Rows{qp + n0 * K, K}, K, xf.data() + m0 * K, sums);
    });
  };
  return run_tiles<T>(x, q.size(0), bias, tile, [&](int64_t n) { return static_cast<float>(sp[n]); });
}

template <typename T>
at::Tensor linear_int4_impl(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t G, const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / G;
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const T* sp = scales.data_ptr<T>();
  const T* zp = zeros.data_ptr<T>();
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (std::is_same_v<T, at::BFloat16> && K % 128 == 0) {
    const std::vector<uint16_t> xb = int4_bf16_order(x);
    std::vector<float> xsum(M * groups);  // (M, K/G): the sum of x over each group, 16 inputs at a time
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<T>());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        f32x16 sum = {};
        for (int64_t k = g * G; k < (g + 1) * G; k += LANES) sum += bf16_to_floats(xp + m * K + k);
        xsum[m * groups + g] = total(sum);
      }
    const uint16_t* s16 = reinterpret_cast<const uint16_t*>(sp);
    const uint16_t* z16 = reinterpret_cast<const uint16_t*>(zp);
    auto tile = [&](int64_t n0, int R, int64_t m0, int X, float sums[XROWS][ROWS]) {
      // the tile's scales as floats and c = z - 136 s, (R, K/G), 16 at a time where they fill a vector
      float s[ROWS * MAX_GROUPS + LANES], c[ROWS * MAX_GROUPS];  // (+ LANES: read 16 at a time)
      const int64_t n = R * groups, first = n0 * groups;
      int64_t j = 0;
      for (; j + LANES <= n; j += LANES) {
        const f32x16 sv = bf16_to_floats(s16 + first + j);
        std::memcpy(s + j, &sv, sizeof sv);
        const f32x16 cv = bf16_to_floats(z16 + first + j) - 136.f * sv;
        std::memcpy(c + j, &cv, sizeof cv);
      }
      for (; j < n; ++j) {
        s[j] = bf16_to_float(s16[first + j]);
        c[j] = bf16_to_float(z16[first + j]) - 136.f * s[j];
      }
      for_tile(R, X, [&](auto r, auto xr) {
        tile_dots_int4_bf16<decltype(r)::value, decltype(xr)::value>(qp + n0 * (K / 2), K, G, s,
                                                                     xb.data() + m0 * K, sums);
      });
      for (int i = 0; i < X; ++i)  // + sum_g (z - 136 s) * (sum of x over g)
        for (int r = 0; r < R; ++r) {
          const float* cr = c + r * groups;
          const float* xs = xsum.data() + (m0 + i) * groups;
          __m512 dot = _mm512_setzero_ps();
          for (int64_t g = 0; g < groups; g += LANES) {  // the last 16 masked
            const __mmask16 in = groups - g >= LANES ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
            dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, cr + g), _mm512_maskz_loadu_ps(in, xs + g), dot);
          }
          sums[i][r] += _mm512_reduce_add_ps(dot);
        }
    };
    return run_tiles<T>(x, q.size(0), bias, tile, [](int64_t) { return 1.f; });
  }
#endif
  const std::vector<float> xf = floats<T>(x);
  auto tile = [&](int64_t n0, int R, int64_t m0, int X, float sums[XROWS][ROWS]) {
    float s[ROWS * MAX_GROUPS], c[ROWS * MAX_GROUPS];  // the tile's scales and c = z - 8 s, (R, K/G)
    for (int64_t i = 0; i < R * groups; ++i) {
      s[i] = static_cast<float>(sp[n0 * groups + i]);
      c[i] = static_cast<float>(zp[n0 * groups + i]) - 8.f * s[i];
    }
    for_tile(R, X, [&](auto r, auto xr) {
      tile_dots_int4<decltype(r)::value, decltype(xr)::value>(qp + n0 * (K / 2), K, G, s, c, xf.data() + m0 * K, sums);
    });
  };
  return run_tiles<T>(x, q.size(0), bias, tile, [](int64_t) { return 1.f; });
}

// ------------------------------------------------------------------------------------------------
// int4 weights back to a matrix (N, K) in the scales' dtype, for a prompt: one dequantization per
// call, then torch's matrix multiply, which is far faster than matrix-vector products for many rows.
// ------------------------------------------------------------------------------------------------

inline void store(float* out, f32x16 v) { std::memcpy(out, &v, sizeof v); }
inline void store(at::Half* out, f32x16 v) {
  for (int l = 0; l < LANES; ++l) out[l] = at::Half(v[l]);
}
inline void store(at::BFloat16* out, f32x16 v) {  // rounded to nearest even, as torch rounds
  const u32x16 bits = (u32x16)v;
  const u32x16 rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  const u16x16 halves = __builtin_convertvector(rounded, u16x16);
  std::memcpy(out, &halves, sizeof halves);
}

template <typename T>
at::Tensor dequantize_int4_impl(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros, int64_t G) {
  const int64_t N = q.size(0), K = 2 * q.size(1), groups = K / G;
  at::Tensor w = at::empty({N, K}, scales.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const T *sp = scales.data_ptr<T>(), *zp = zeros.data_ptr<T>();
  T* wp = w.data_ptr<T>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < K; k += 2 * LANES) {  // w = q * s + (z - 8 s), 32 inputs at a time
        const float sg = static_cast<float>(sp[n * groups + k / G]);
        const float cg = static_cast<float>(zp[n * groups + k / G]) - 8.f * sg;
        const u8x16 b = load<u8x16>(qp + n * (K / 2) + k / 2);
        store(wp + n * K + k, uint8_to_floats(b & 15) * sg + cg);
        store(wp + n * K + k + LANES, uint8_to_floats(b >> 4) * sg + cg);
      }
  });
  return w;
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t columns, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 2 && w.is_contiguous(),
              "x (M, K) and the weight must be contiguous matrices");
  TORCH_CHECK(w.size(1) == columns, "the weight has ", w.size(1), " columns, expected ", columns);
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == x.scalar_type() && bias->is_contiguous() &&
              bias->numel() == w.size(0)), "the bias must be (N,) in x's dtype");
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check(x, weight, x.size(1), bias);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "the weight must be bfloat16");
  return by_dtype(x, [&](auto t) { return linear_bf16_impl<decltype(t)>(x, weight, bias); });
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  check(x, qweight, x.size(1), bias);
  TORCH_CHECK(qweight.scalar_type() == at::kChar && scales.scalar_type() == x.scalar_type() &&
              scales.numel() == qweight.size(0) && scales.is_contiguous(),
              "qweight must be int8 and the scales (N,) in x's dtype");
  return by_dtype(x, [&](auto t) { return linear_int8_impl<decltype(t)>(x, qweight, scales, bias); });
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const int64_t K = x.size(1);
  check(x, qweight, K / 2, bias);
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0 && K / group_size <= MAX_GROUPS,
              "the group size must be a multiple of 32 that divides K, and K / group size <= ", MAX_GROUPS);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == x.scalar_type() &&
              zeros.scalar_type() == x.scalar_type() && scales.is_contiguous() && zeros.is_contiguous() &&
              scales.numel() == qweight.size(0) * (K / group_size) && zeros.numel() == scales.numel(),
              "qweight must be uint8 and the scales and zeros (N, K / group size) in x's dtype");
  return by_dtype(x, [&](auto t) { return linear_int4_impl<decltype(t)>(x, qweight, scales, zeros, group_size, bias); });
}

at::Tensor dequantize_int4(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.scalar_type() == at::kByte &&
              qweight.device().is_cpu(), "qweight must be a contiguous (N, K/2) uint8 CPU matrix");
  const int64_t K = 2 * qweight.size(1);
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "the group size must be a multiple of 32 that divides K");
  TORCH_CHECK(scales.is_contiguous() && zeros.is_contiguous() && zeros.scalar_type() == scales.scalar_type() &&
              scales.numel() == qweight.size(0) * (K / group_size) && zeros.numel() == scales.numel(),
              "the scales and zeros must be (N, K / group size), in one dtype");
  return by_dtype(scales, [&](auto t) { return dequantize_int4_impl<decltype(t)>(qweight, scales, zeros, group_size); });
}

}  // namespace
}  // namespace qwen_cpu

TORCH_LIBRARY(qwen_cpu, m) {  // the library's ops; cpu_attention.cpp adds decode_attention
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  m.def("dequantize_int4(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen_cpu, CPU, m) {
  m.impl("linear_bf16", &qwen_cpu::linear_bf16);
  m.impl("linear_int8", &qwen_cpu::linear_int8);
  m.impl("linear_int4", &qwen_cpu::linear_int4);
  m.impl("dequantize_int4", &qwen_cpu::dequantize_int4);
}
