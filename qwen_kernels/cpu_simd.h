// What qwen_kernels/cpu_matvec.cpp and cpu_attention.cpp share: 16-float vectors in GCC/Clang vector
// extensions (`a += w * x` on f32x16 compiles to the CPU's SIMD instructions: one AVX-512 register, two
// AVX2 ones, four NEON ones), unaligned loads, the loads that widen 16 bf16 / int8 / uint8 numbers to
// floats (AVX-512 intrinsics where the CPU has them: GCC 12 widens int8 lane by lane otherwise; the
// portable versions beside them), the sum of a vector's lanes, and the dispatch on a tensor's dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstring>
#include <vector>


namespace qwen_cpu {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
constexpr int LANES = 16;

template <typename V>
inline V load(const void* p) {  // an unaligned load of one vector
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 16 weights widened to 16 floats.
#if defined(__AVX512F__) && defined(__AVX512BW__)
inline f32x16 bf16_to_floats(const uint16_t* p) {  // bf16 is the top half of a float32
  return (f32x16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
}
inline f32x16 int8_to_floats(const int8_t* p) {
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline f32x16 uint8_to_floats(u8x16 v) { return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)v)); }
#else
inline f32x16 bf16_to_floats(const uint16_t* p) {
  return (f32x16)(__builtin_convertvector(load<u16x16>(p), u32x16) << 16);
}
inline f32x16 int8_to_floats(const int8_t* p) {
  return __builtin_convertvector(__builtin_convertvector(load<i8x16>(p), i32x16), f32x16);
}
inline f32x16 uint8_to_floats(u8x16 v) { return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16); }
#endif

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float total(f32x16 v) {  // the sum of the 16 lanes, as a tree (4 dependent adds, not 15)
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float a[LANES];
  std::memcpy(a, &v, sizeof a);
  for (int width = LANES / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) a[l] += a[l + width];
  return a[0];
#endif
}

// Dispatch on x's dtype (float32, bfloat16, float16); the scales, zeros and bias share it.
template <typename F>
at::Tensor by_dtype(const at::Tensor& x, F f) {
  switch (x.scalar_type()) {
    case at::kFloat: return f(float());
    case at::kBFloat16: return f(at::BFloat16());
    case at::kHalf: return f(at::Half());
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16, not ", x.scalar_type());
  }
}

}  // namespace qwen_cpu
