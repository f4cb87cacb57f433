// CPU decode attention for qwen_kernels/cpu.py (built with cpu_matvec.cpp into one extension), the
// torch op qwen_cpu.decode_attention, which fills the model files' attention seam for one-token steps.
//
// Attention of one new token per sequence over its KV cache (a decode step), keys hidden by the
// mask (left padding, a sliding window, the unused slots of a static cache) skipped:
// out[b, h] = softmax(scale * K q) V with K, V the rows of key/value head h / (H / KVH). torch's
// fused CPU attention spends about 150 us per call on this small problem (14 heads, 64 dims, a few
// hundred keys); here the query heads that share a key/value head go together (each cache row is
// read and widened once for all of them), the exponentials are computed 16 at a time, and a long
// cache is split between the threads and merged (flash-decoding): 12 us for 14 heads over 192 keys,
// 160 us over 4,096 (the loop over heads before took 20 and 367).

#include "cpu_simd.h"

namespace qwen_cpu {
namespace {

template <typename T>
inline f32x16 floats16(const T* p) {  // 16 consecutive elements as floats
  if constexpr (std::is_same_v<T, float>) {
    return load<f32x16>(p);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    return bf16_to_floats(reinterpret_cast<const uint16_t*>(p));
  } else {
    f32x16 v;
    for (int l = 0; l < LANES; ++l) v[l] = static_cast<float>(p[l]);
    return v;
  }
}

constexpr int64_t MAX_HEAD_DIM = 256;
constexpr int MAX_GROUP = 8;  // query heads of one key/value head that one work unit takes together


// e^x for x <= 0, 16 at a time (e^-inf = 0): 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in
// [-ln 2 / 2, ln 2 / 2], e^r by its Taylor polynomial to r^6 (relative error below 2e-7, std::exp's
// float is within 1e-7), 2^n made in the exponent bits. One call does what 16 calls of expf do.
inline f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 hidden = x == -INFINITY ? f32x16{} + 1.f : f32x16{};   // 1 where x is -inf
  x = x < -87.f ? f32x16{} - 87.f : x;                              // 2^n stays a normal float
  const f32x16 n = (x * 1.44269504f + 12582912.f) - 12582912.f;      // round to nearest (1.5 * 2^23)
  const f32x16 r = x - n * 0.693359375f + n * 2.12194440e-4f;        // ln 2 in two parts: r exact
  f32x16 e = f32x16{} + (1.f / 720);
  e = e * r + (1.f / 120);
  e = e * r + (1.f / 24);
  e = e * r + (1.f / 6);
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;  // 2^n
  return hidden != 0.f ? f32x16{} : e * (f32x16)bits;
}

// One work unit: the query heads h0 .. h0+G-1 of one row b, which share the key/value head kv, over
// the keys [s0, s1). Each key and value row is widened to floats once and used by the G heads (a
// grouped-query model reads its cache G times less than a loop over the query heads would). The
// unit leaves, per head, the maximum score, the sum of exp(score - maximum) and the weighted sum of
// the values, which the caller merges across units (log-sum-exp, as flash-decoding does). VECS: the
// head dim / 16 when it is a constant the loops are compiled for (then the running sums stay in
// registers), else 0 and `vecs` says it.
template <int VECS, typename T>
void attend_keys(const T* const* qrows, int G, const T* keys, const T* values, int64_t key_stride,
                 int64_t value_stride, const bool* seen, int64_t mask_key_stride, int64_t s0, int64_t s1,
                 int64_t vecs, float scale, float* top, float* sum, float* acc, float* scores) {
  constexpr int64_t MAX_VECS = VECS ? VECS : MAX_HEAD_DIM / LANES;
  if (VECS) vecs = VECS;
  const int64_t n = s1 - s0;                            // scores: (G, n), head g's at g * n
  f32x16 qv[MAX_GROUP][MAX_VECS];
  for (int g = 0; g < G; ++g)
    for (int64_t j = 0; j < vecs; ++j) qv[g][j] = floats16(qrows[g] + j * LANES) * scale;
  for (int64_t s = 0; s < n; ++s) {                     // scores = scale * K q; hidden keys: -inf
    if (seen && !seen[(s0 + s) * mask_key_stride]) {
      for (int g = 0; g < G; ++g) scores[g * n + s] = -INFINITY;
      continue;
    }
    f32x16 kv[MAX_VECS];
    for (int64_t j = 0; j < vecs; ++j) kv[j] = floats16(keys + (s0 + s) * key_stride + j * LANES);
    for (int g = 0; g < G; ++g) {
      f32x16 dot = qv[g][0] * kv[0];
      for (int64_t j = 1; j < vecs; ++j) dot += qv[g][j] * kv[j];
      scores[g * n + s] = total(dot);
    }
  }
  for (int g = 0; g < G; ++g) {                         // softmax numerators against this unit's maximum
    float* row = scores + g * n;
    top[g] = *std::max_element(row, row + n);
    f32x16 sums = {};
    int64_t s = 0;
    for (; s + LANES <= n; s += LANES) {
      const f32x16 p = exp_nonpositive(load<f32x16>(row + s) - top[g]);
      std::memcpy(row + s, &p, sizeof p);
      sums += p;
    }
    sum[g] = total(sums);
    for (; s < n; ++s) {
      row[s] = row[s] == -INFINITY ? 0.f : std::exp(row[s] - top[g]);
      sum[g] += row[s];
    }
  }
  f32x16 out[MAX_GROUP][MAX_VECS] = {};
  for (int64_t s = 0; s < n; ++s) {                     // out = sum_s p_s V_s
    if (seen && !seen[(s0 + s) * mask_key_stride]) continue;
    f32x16 vv[MAX_VECS];
    for (int64_t j = 0; j < vecs; ++j) vv[j] = floats16(values + (s0 + s) * value_stride + j * LANES);
    for (int g = 0; g < G; ++g) {
      const float p = scores[g * n + s];
      for (int64_t j = 0; j < vecs; ++j) out[g][j] += p * vv[j];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int64_t j = 0; j < vecs; ++j) std::memcpy(acc + (g * vecs + j) * LANES, &out[g][j], sizeof(f32x16));
}

template <typename T>
at::Tensor decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& mask, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), S = k.size(2);
  const int64_t group = H / KVH, vecs = D / LANES;
  const bool* visible = mask.has_value() ? mask->data_ptr<bool>() : nullptr;  // (B or 1, 1, 1, S)
  const int64_t mask_batch_stride = mask.has_value() && mask->size(0) > 1 ? mask->stride(0) : 0;
  const int64_t mask_key_stride = mask.has_value() ? mask->stride(3) : 0;
  // Past the last visible key of each row: a static cache's unused tail is not read at all.
  std::vector<int64_t> keys_end(B, S);
  for (int64_t b = 0; visible && b < B; ++b)
    while (keys_end[b] > 0 && !visible[b * mask_batch_stride + (keys_end[b] - 1) * mask_key_stride]) --keys_end[b];
  const int64_t longest = *std::max_element(keys_end.begin(), keys_end.end());
  // Units: (row, key/value head, heads chunk of up to MAX_GROUP, keys split). Long caches are split
  // so that every thread has work even when B * KVH is small; each split is at least 256 keys.
  const int64_t chunks = (group + MAX_GROUP - 1) / MAX_GROUP, heads = (group + chunks - 1) / chunks;
  const int64_t units_wanted = 2 * at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min((longest + 255) / 256,
                                                       (units_wanted + B * KVH * chunks - 1) / (B * KVH * chunks)));
  const int64_t split_len = std::max<int64_t>(1, (longest + splits - 1) / splits);
  const int64_t units = B * KVH * chunks * splits;
  // Per unit and head: maximum, sum, D weighted values (merged below).
  std::vector<float> tops(units * heads), sums(units * heads), accs(units * heads * D);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(split_len * heads);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t split = u % splits, chunk = (u / splits) % chunks, kv = (u / splits / chunks) % KVH;
      const int64_t b = u / splits / chunks / KVH;
      const int64_t h0 = kv * group + chunk * heads, G = std::min(heads, (kv + 1) * group - h0);
      const int64_t s0 = split * split_len, s1 = std::min(keys_end[b], s0 + split_len);
      float* top = tops.data() + u * heads;
      if (s1 <= s0) {  // nothing visible here
        for (int64_t g = 0; g < G; ++g) top[g] = -INFINITY, sums[u * heads + g] = 0.f;
        continue;
      }
      const T* qrows[MAX_GROUP];
      for (int64_t g = 0; g < G; ++g) qrows[g] = qp + b * q.stride(0) + (h0 + g) * q.stride(1);
      auto run = [&](auto vecs_constant) {
        attend_keys<decltype(vecs_constant)::value, T>(
            qrows, int(G), kp + b * k.stride(0) + kv * k.stride(1), vp + b * v.stride(0) + kv * v.stride(1),
            k.stride(2), v.stride(2), visible ? visible + b * mask_batch_stride : nullptr, mask_key_stride, s0, s1,
            vecs, float(scale), top, sums.data() + u * heads, accs.data() + u * heads * D, scores.data());
      };
      if (vecs == 4) run(std::integral_constant<int, 4>());        // head_dim 64 (Qwen2 0.5B to 1.5B)
      else if (vecs == 8) run(std::integral_constant<int, 8>());   // head_dim 128 (most others, Qwen3)
      else run(std::integral_constant<int, 0>());
    }
  });
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  T* op = out.data_ptr<T>();
  std::vector<float> merged(D);
  for (int64_t b = 0; b < B; ++b)                       // merge the splits of each head
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kv = h / group, chunk = (h % group) / heads, g = (h % group) % heads;
      const int64_t first = ((b * KVH + kv) * chunks + chunk) * splits;
      float top = -INFINITY;
      for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, tops[(first + sp) * heads + g]);
      float total_sum = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t u = first + sp;
        if (tops[u * heads + g] == -INFINITY) continue;
        const float w = std::exp(tops[u * heads + g] - top);
        total_sum += w * sums[u * heads + g];
        for (int64_t d = 0; d < D; ++d) merged[d] += w * accs[(u * heads + g) * D + d];
      }
      if (total_sum == 0.f) total_sum = 1.f;  // no visible key (a padding row, never read): zeros
      for (int64_t d = 0; d < D; ++d) op[(b * H + h) * D + d] = T(merged[d] / total_sum);
    }
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && k.sizes() == v.sizes() &&
              k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0,
              "q (B, H, 1, D) and k, v (B, KVH, S, D) with H a multiple of KVH");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(q.size(3) % LANES == 0 && q.size(3) <= MAX_HEAD_DIM && k.size(2) > 0,
              "head_dim must be a multiple of 16 up to 256, with at least one key");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "one dtype");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->dim() == 4 &&
              (mask->size(0) == 1 || mask->size(0) == q.size(0)) && mask->size(2) == 1 &&
              mask->size(3) == k.size(2)), "the mask must be (B or 1, 1, 1, S) booleans");
  return by_dtype(q, [&](auto t) { return decode_attention_impl<decltype(t)>(q, k, v, mask, scale); });
}

}  // namespace
}  // namespace qwen_cpu

TORCH_LIBRARY_FRAGMENT(qwen_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen_cpu, CPU, m) {
  m.impl("decode_attention", &qwen_cpu::decode_attention);
}
