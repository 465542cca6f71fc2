// Flash attention for XLA:CPU, forward and backward, as XLA FFI custom calls (see llama_jax/cpu_kernels.py).
//
// Why: XLA:CPU writes every softmax pass over a score block to memory and runs the head_dim-wide products at about
// half its matrix-multiply rate. Here each 64-key block of scores lives in a few KiB of cache between the products,
// the softmax is online (one pass), and the products are register-tiled outer products: bfloat16 pairs summed in
// float32 (vdpbf16ps) where the CPU has AVX512-BF16 and the inputs are bfloat16, float32 FMAs otherwise.
//
// Layouts (as the model holds them): q [b, s, heads, d]; k, v [b, t, kv_heads, d]; query head h reads kv head
// h / group. Slots and segment ids ([b, s] / [b, t] int32) give the mask: query i sees key j iff
// key_slot[j] <= query_slot[i] and key_segment[j] == query_segment[i]. The log-normaliser is [b, heads, s] float32;
// a query that sees no key gets output 0 and log-normaliser +inf (so its backward contributes 0).
// Inputs and outputs are bfloat16 or float32; everything inside is float32.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 64;  // queries and keys per block; a multiple of the vector width

// One vector is one machine register: 16 floats with AVX-512, 8 otherwise (AVX2, NEON pairs). A register tile
// holds 6 rows × kTileVectors accumulators, sized to leave registers for the B row and the broadcast A element:
// 24 of AVX-512's 32, 12 of AVX2's 16. Wider vectors than the machine's, or more accumulators than its registers,
// spill on every multiply-add.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kTileVectors = 4;
#else
constexpr int kLanes = 8;
constexpr int kTileVectors = 2;
#endif

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef float vf_unaligned __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_unaligned*>(p) = x; }
// Lane 0 shuffled into every lane: one broadcast instruction. (vf{} + x costs an extra add of 0.0, which may not be
// dropped since -0.0 + 0.0 is +0.0; filling the lanes one by one compiles to a chain of inserts.)
inline vf splat(float x) { return __builtin_shuffle(vf{x}, vi{}); }

// exp for x <= 0 (Cephes' expf polynomial, ~1 ulp); inputs below -87 give ~0, NaN gives NaN.
inline vf exp_nonpositive(vf x) {
  const vf input = x;
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vf shifted = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) in the low mantissa bits
  const vf n = shifted - 12582912.0f;
  const vi n_int = (vi)shifted - 0x4B400000;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf y = p * r * r + r + 1.0f;
  const vf result = (vf)((vi)y + (n_int << 23));
  return input != input ? input : result;
}

// NaN-propagating maximum: a NaN score (a diverged run) must reach the loss, as in XLA's softmax.
inline vf nan_max(vf x, vf m) { return (x > m) | (x != x) ? x : m; }

// Reduce the lanes by halving (log2(kLanes) shuffles) rather than lane by lane.
template <typename Op>
inline float reduce_lanes(vf x, Op op) {
#if defined(__AVX512F__)
  x = op(x, __builtin_shuffle(x, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  x = op(x, __builtin_shuffle(x, vi{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3}));
  x = op(x, __builtin_shuffle(x, vi{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1}));
  x = op(x, __builtin_shuffle(x, vi{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0}));
#else
  x = op(x, __builtin_shuffle(x, vi{4, 5, 6, 7, 0, 1, 2, 3}));
  x = op(x, __builtin_shuffle(x, vi{2, 3, 0, 1, 2, 3, 0, 1}));
  x = op(x, __builtin_shuffle(x, vi{1, 0, 1, 0, 1, 0, 1, 0}));
#endif
  return x[0];
}
inline float horizontal_max(vf x) { return reduce_lanes(x, nan_max); }
inline float horizontal_sum(vf x) { return reduce_lanes(x, [](vf a, vf b) { return a + b; }); }

// C[rows, kLanes·vectors] (+)= A[rows, depth] · B[depth, kLanes·vectors], with A(r, k) at a[r·a_row + k·a_col] (so A may be
// read transposed), B and C row-major. The accumulators stay in registers for the whole depth.
template <int kRows, int kVectors>
inline void tile(int depth, const float* a, long a_row, long a_col, const float* b, long ldb, float* c, long ldc,
                 bool accumulate) {
  vf acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = accumulate ? load(c + r * ldc + v * kLanes) : vf{};
  for (int k = 0; k < depth; ++k) {
    vf bk[kVectors];
    for (int v = 0; v < kVectors; ++v) bk[v] = load(b + k * ldb + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const vf ar = splat(a[r * a_row + k * a_col]);
      for (int v = 0; v < kVectors; ++v) acc[r][v] += ar * bk[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
}

// Calls tile(rows, vectors, r, col) over C[m, n] (n a multiple of kLanes) in strips of 6, 2 and 1 rows and up to
// kTileVectors vectors of columns, with rows and vectors as compile-time constants.
template <typename Tile>
inline void for_each_tile(int m, int n, const Tile& tile) {
  for (int col = 0; col < n; col += kTileVectors * kLanes) {
    const int vectors = std::min(kTileVectors * kLanes, n - col) / kLanes;
    const auto strip = [&](auto rows, int r) {
      switch (vectors) {
#if defined(__AVX512F__)
        case 4: return tile(rows, std::integral_constant<int, 4>{}, r, col);
        case 3: return tile(rows, std::integral_constant<int, 3>{}, r, col);
#endif
        case 2: return tile(rows, std::integral_constant<int, 2>{}, r, col);
        default: return tile(rows, std::integral_constant<int, 1>{}, r, col);
      }
    };
    int r = 0;
    for (; r + 6 <= m; r += 6) strip(std::integral_constant<int, 6>{}, r);
    for (; r + 2 <= m; r += 2) strip(std::integral_constant<int, 2>{}, r);
    for (; r < m; ++r) strip(std::integral_constant<int, 1>{}, r);
  }
}

// C[m, n] (+)= A[m, depth] · B[depth, n] in float32.
void matmul(int m, int n, int depth, const float* a, long a_row, long a_col, const float* b, long ldb, float* c,
            long ldc, bool accumulate) {
  for_each_tile(m, n, [&](auto rows, auto vectors, int r, int col) {
    tile<decltype(rows)::value, decltype(vectors)::value>(depth, a + r * a_row, a_row, a_col, b + col, ldb,
                                                          c + r * ldc + col, ldc, accumulate);
  });
}

#if defined(__AVX512BF16__)

// C[rows, 16·vectors] (+)= A · B with bfloat16 products summed in float32 (vdpbf16ps, twice the float32 FMA rate):
// A row-major bfloat16 [rows, 2·pairs]; B as 32-bit words [pairs, ldb], word (k, n) = (B[2k, n], B[2k+1, n]).
template <int kRows, int kVectors>
inline void tile_bf16(int pairs, const uint16_t* a, long lda, const uint32_t* b, long ldb, float* c, long ldc,
                      bool accumulate) {
  __m512 acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + v * kLanes) : _mm512_setzero_ps();
  for (int k = 0; k < pairs; ++k) {
    __m512bh bk[kVectors];
    for (int v = 0; v < kVectors; ++v) bk[v] = (__m512bh)_mm512_loadu_si512(b + k * ldb + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      uint32_t word;
      std::memcpy(&word, a + r * lda + 2 * k, 4);
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bk[v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(c + r * ldc + v * kLanes, acc[r][v]);
}

void matmul_bf16(int m, int n, int pairs, const uint16_t* a, long lda, const uint32_t* b, long ldb, float* c,
                 long ldc, bool accumulate) {
  for_each_tile(m, n, [&](auto rows, auto vectors, int r, int col) {
    tile_bf16<decltype(rows)::value, decltype(vectors)::value>(pairs, a + r * lda, lda, b + col, ldb,
                                                               c + r * ldc + col, ldc, accumulate);
  });
}

// float32 → bfloat16, round to nearest even (as XLA's convert), 16 at a time.
inline void store_bf16(uint16_t* out, vf x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh((__m512)x));
}
#endif

// ── Element types ────────────────────────────────────────────────────────────────────────────────────────────────
inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, uint16_t* out) {  // round to nearest even, as XLA's convert
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *out = static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

struct Shape {
  long batch, queries, heads, keys, kv_heads, head_dim;
  long group() const { return heads / kv_heads; }
  long padded_keys() const { return (keys + kBlock - 1) / kBlock * kBlock; }
};

struct Mask {
  const int32_t *query_slots, *query_segments, *key_slots, *key_segments;  // [b, s], [b, t]
};

// Per (batch row, kv head): the slots and segments of that row, and whether a (query block, key block) pair can
// hold any allowed entry (a cheap bound; the exact mask is applied per element).
struct KeyBlock {
  vi slots[kBlock / kLanes], segments[kBlock / kLanes];
};

struct RowMask {
  const int32_t *q_slot, *q_seg, *k_slot, *k_seg;
  long queries, keys;

  bool block_may_attend(long q0, long qn, long k0, long kn) const {
    int32_t q_slot_max = q_slot[q0], k_slot_min = k_slot[k0];
    int32_t q_seg_min = q_seg[q0], q_seg_max = q_seg[q0], k_seg_min = k_seg[k0], k_seg_max = k_seg[k0];
    for (long i = q0; i < q0 + qn; ++i) {
      q_slot_max = std::max(q_slot_max, q_slot[i]);
      q_seg_min = std::min(q_seg_min, q_seg[i]);
      q_seg_max = std::max(q_seg_max, q_seg[i]);
    }
    for (long j = k0; j < k0 + kn; ++j) {
      k_slot_min = std::min(k_slot_min, k_slot[j]);
      k_seg_min = std::min(k_seg_min, k_seg[j]);
      k_seg_max = std::max(k_seg_max, k_seg[j]);
    }
    return k_slot_min <= q_slot_max && k_seg_min <= q_seg_max && q_seg_min <= k_seg_max;
  }

  // The slots and segments of the 64 keys from k0 as vectors (keys past the end: never allowed), so that each
  // query row's mask is a few vector compares.
  KeyBlock key_block(long k0) const {
    alignas(64) int32_t slots[kBlock], segments[kBlock];
    for (int c = 0; c < kBlock; ++c) {
      const bool inside = k0 + c < keys;
      slots[c] = inside ? k_slot[k0 + c] : std::numeric_limits<int32_t>::max();
      segments[c] = inside ? k_seg[k0 + c] : std::numeric_limits<int32_t>::min();
    }
    KeyBlock block;
    for (int v = 0; v < kBlock / kLanes; ++v) {
      block.slots[v] = *reinterpret_cast<const vi*>(slots + v * kLanes);
      block.segments[v] = *reinterpret_cast<const vi*>(segments + v * kLanes);
    }
    return block;
  }

  void allowed(const KeyBlock& block, long query, vi out[kBlock / kLanes]) const {
    for (int v = 0; v < kBlock / kLanes; ++v)
      out[v] = (block.slots[v] <= q_slot[query]) & (block.segments[v] == q_seg[query]);
  }
};

RowMask row_mask(const Mask& mask, const Shape& shape, long b) {
  return {mask.query_slots + b * shape.queries, mask.query_segments + b * shape.queries,
          mask.key_slots + b * shape.keys, mask.key_segments + b * shape.keys, shape.queries, shape.keys};
}

// Keys (or values) of one (batch row, kv head) as float32, row-major [padded t, d], or transposed block by block,
// [padded t / 64][d][64]; padding is zero. Either way one key block is 64·d contiguous floats: a plain transposed
// [d, padded t] would put a block's d rows a power-of-two stride apart (4 KiB at 1K keys, 16 KiB at 4K), all in
// the same few L1 sets, and the score product would miss L1 on most of its loads.
template <typename T>
void pack_keys(const T* x, const Shape& shape, long b, long kv, bool transposed, float* out) {
  const long t_pad = shape.padded_keys(), d = shape.head_dim;
  std::fill(out, out + t_pad * d, 0.0f);
  for (long j = 0; j < shape.keys; ++j) {
    const T* src = x + ((b * shape.keys + j) * shape.kv_heads + kv) * d;
    float* block_t = out + j / kBlock * kBlock * d + j % kBlock;
    for (long e = 0; e < d; ++e) (transposed ? block_t[e * kBlock] : out[j * d + e]) = to_float(src[e]);
  }
}

// Rows (group head g, query i) of one query block, [group · n, d] float32 from a [b, s, heads, d] array.
template <typename T>
void pack_queries(const T* x, const Shape& shape, long b, long kv, long q0, long n, float scale, float* out) {
  const long d = shape.head_dim, group = shape.group();
  for (long g = 0; g < group; ++g)
    for (long i = 0; i < n; ++i) {
      const T* src = x + ((b * shape.queries + q0 + i) * shape.heads + kv * group + g) * d;
      float* dst = out + (g * n + i) * d;
      for (long e = 0; e < d; ++e) dst[e] = to_float(src[e]) * scale;
    }
}

template <typename T>
void unpack_queries(const float* rows, const Shape& shape, long b, long kv, long q0, long n, T* x) {
  const long d = shape.head_dim, group = shape.group();
  for (long g = 0; g < group; ++g)
    for (long i = 0; i < n; ++i) {
      T* dst = x + ((b * shape.queries + q0 + i) * shape.heads + kv * group + g) * d;
      const float* src = rows + (g * n + i) * d;
      for (long e = 0; e < d; ++e) from_float(src[e], dst + e);
    }
}

// Runs task(0..count-1) on the caller and XLA's intra-op threads. The caller never waits on a helper that has not
// started (it can run every task itself), so this cannot deadlock however busy the pool is; helpers that start late
// find nothing left and only touch the shared counters.
void parallel_for(ffi::ThreadPool& pool, long count, const std::function<void(long)>& task) {
  struct State {
    std::atomic<long> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const std::function<void(long)>* task_ptr = &task;
  auto work = [state, count, task_ptr]() {
    for (long i; (i = state->next.fetch_add(1)) < count;) {
      (*task_ptr)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const long helpers = std::min<long>(pool.num_threads(), count) - 1;
  for (long h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// ── Forward ──────────────────────────────────────────────────────────────────────────────────────────────────────
// The forward pass's two products, S = Q·Kᵀ and O += P·V, for one (batch row, kv head): in float32 for any input
// type, or with bfloat16 products for bfloat16 inputs where the CPU has them (P rounded to bfloat16, as XLA does).
template <typename T>
struct FloatProducts {
  const Shape& shape;
  const long d, t_pad;
  std::vector<float> keys_t, values, queries;

  explicit FloatProducts(const Shape& shape)
      : shape(shape), d(shape.head_dim), t_pad(shape.padded_keys()), keys_t(d * t_pad), values(t_pad * d),
        queries(shape.group() * kBlock * d) {}
  void pack_keys_values(const T* k, const T* v, long b, long kv) {
    pack_keys(k, shape, b, kv, /*transposed=*/true, keys_t.data());
    pack_keys(v, shape, b, kv, /*transposed=*/false, values.data());
  }
  void pack_query_block(const T* q, long b, long kv, long q0, long n) {
    pack_queries(q, shape, b, kv, q0, n, 1.0f, queries.data());
  }
  void scores(long rows, long k0, float* out) {
    matmul(rows, kBlock, d, queries.data(), d, 1, keys_t.data() + k0 * d, kBlock, out, kBlock, false);
  }
  void add_values(long rows, long k0, const float* probs, float* acc) {
    matmul(rows, d, kBlock, probs, kBlock, 1, values.data() + k0 * d, d, acc, d, true);
  }
};

#if defined(__AVX512BF16__)
// Words (k, n) = (x[2k, n], x[2k+1, n]) of a [length, width] bfloat16 matrix with row stride `stride`, as
// [padded / 2, width]; rows past `length` are zero.
void pack_pairs_down(const uint16_t* x, long stride, long length, long padded, long width, uint32_t* out) {
  for (long k = 0; k < padded / 2; ++k)
    for (long n = 0; n < width; ++n) {
      const uint32_t low = 2 * k < length ? x[2 * k * stride + n] : 0;
      const uint32_t high = 2 * k + 1 < length ? x[(2 * k + 1) * stride + n] : 0;
      out[k * width + n] = low | high << 16;
    }
}

// Words (e, j) = (x[j, 2e], x[j, 2e+1]) of the same matrix, as [width / 2, padded]; columns past `length` are zero.
void pack_pairs_across(const uint16_t* x, long stride, long length, long padded, long width, uint32_t* out) {
  std::fill(out, out + width / 2 * padded, 0u);
  for (long j = 0; j < length; ++j)
    for (long e = 0; e < width / 2; ++e) std::memcpy(out + e * padded + j, x + j * stride + 2 * e, 4);
}

struct Bf16Products {
  const Shape& shape;
  const long d, t_pad;
  std::vector<uint32_t> key_words, value_words;
  std::vector<uint16_t> queries, probs;

  explicit Bf16Products(const Shape& shape)
      : shape(shape), d(shape.head_dim), t_pad(shape.padded_keys()), key_words(d / 2 * t_pad),
        value_words(t_pad / 2 * d), queries(shape.group() * kBlock * d), probs(shape.group() * kBlock * kBlock) {}
  void pack_keys_values(const uint16_t* k, const uint16_t* v, long b, long kv) {
    const long offset = (b * shape.keys * shape.kv_heads + kv) * d, stride = shape.kv_heads * d;
    pack_pairs_across(k + offset, stride, shape.keys, t_pad, d, key_words.data());
    pack_pairs_down(v + offset, stride, shape.keys, t_pad, d, value_words.data());
  }
  void pack_query_block(const uint16_t* q, long b, long kv, long q0, long n) {
    const long group = shape.group();
    for (long g = 0; g < group; ++g)
      for (long i = 0; i < n; ++i)
        std::memcpy(queries.data() + (g * n + i) * d, q + ((b * shape.queries + q0 + i) * shape.heads + kv * group + g) * d,
                    d * sizeof(uint16_t));
  }
  void scores(long rows, long k0, float* out) {
    matmul_bf16(rows, kBlock, d / 2, queries.data(), d, key_words.data() + k0, t_pad, out, kBlock, false);
  }
  void add_values(long rows, long k0, const float* probs_f32, float* acc) {
    for (long i = 0; i < rows * kBlock; i += kLanes) store_bf16(probs.data() + i, load(probs_f32 + i));
    matmul_bf16(rows, d, kBlock / 2, probs.data(), kBlock, value_words.data() + k0 / 2 * d, d, acc, d, true);
  }
};
#endif

template <typename T, typename Products>
void forward(ffi::ThreadPool& pool, const Shape& shape, const Mask& mask, const T* q, const T* k, const T* v, T* out,
             float* log_normaliser) {
  const long d = shape.head_dim, group = shape.group();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  parallel_for(pool, shape.batch * shape.kv_heads, [&](long task) {
    const long b = task / shape.kv_heads, kv = task % shape.kv_heads;
    const RowMask rows_mask = row_mask(mask, shape, b);
    Products products(shape);
    std::vector<float> acc(group * kBlock * d), scores(group * kBlock * kBlock), row_max(group * kBlock),
        row_sum(group * kBlock);
    products.pack_keys_values(k, v, b, kv);
    for (long q0 = 0; q0 < shape.queries; q0 += kBlock) {
      const long n = std::min<long>(kBlock, shape.queries - q0), rows = group * n;
      products.pack_query_block(q, b, kv, q0, n);
      std::fill(acc.begin(), acc.begin() + rows * d, 0.0f);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (long k0 = 0; k0 < shape.keys; k0 += kBlock) {
        if (!rows_mask.block_may_attend(q0, n, k0, std::min<long>(kBlock, shape.keys - k0))) continue;
        products.scores(rows, k0, scores.data());
        const KeyBlock key_block = rows_mask.key_block(k0);
        for (long i = 0; i < n; ++i) {
          vi allowed[kBlock / kLanes];
          rows_mask.allowed(key_block, q0 + i, allowed);
          for (long g = 0; g < group; ++g) {
            const long r = g * n + i;
            float* s = scores.data() + r * kBlock;
            vf m = splat(-std::numeric_limits<float>::infinity());
            for (int u = 0; u < kBlock / kLanes; ++u) {
              const vf x = load(s + u * kLanes) * scale;
              store(s + u * kLanes, x);
              m = allowed[u] ? nan_max(x, m) : m;
            }
            const float block_max = horizontal_max(m);
            if (block_max == -std::numeric_limits<float>::infinity()) {  // nothing allowed in this block
              std::fill(s, s + kBlock, 0.0f);
              continue;
            }
            const float new_max = std::isnan(row_max[r]) || row_max[r] > block_max ? row_max[r] : block_max;
            const float rescale = std::exp(row_max[r] - new_max);
            vf sum = vf{};
            for (int u = 0; u < kBlock / kLanes; ++u) {
              const vf p = exp_nonpositive(load(s + u * kLanes) - new_max);
              const vf kept = allowed[u] ? p : vf{};
              store(s + u * kLanes, kept);
              sum += kept;
            }
            row_sum[r] = row_sum[r] * rescale + horizontal_sum(sum);
            row_max[r] = new_max;
            if (rescale != 1.0f)
              for (long e = 0; e < d; ++e) acc[r * d + e] *= rescale;
          }
        }
        products.add_values(rows, k0, scores.data(), acc.data());
      }
      for (long r = 0; r < rows; ++r) {
        const long g = r / n, i = r % n;
        const bool any = row_sum[r] > 0;
        const float inverse = any ? 1.0f / row_sum[r] : 0.0f;
        for (long e = 0; e < d; ++e) acc[r * d + e] *= inverse;
        log_normaliser[(b * shape.heads + kv * group + g) * shape.queries + q0 + i] =
            any ? row_max[r] + std::log(row_sum[r]) : std::numeric_limits<float>::infinity();
      }
      unpack_queries(acc.data(), shape, b, kv, q0, n, out);
    }
  });
}

// ── Backward ─────────────────────────────────────────────────────────────────────────────────────────────────────
// Per (batch row, kv head), key block by key block: P from the saved log-normaliser, dV += Pᵀ·dO, dP = dO·Vᵀ,
// dS = P ⊙ (dP − rowsum(dO ⊙ O)), dK += dSᵀ·Q, dQ += dS·K (kept in float32 for the whole row until the end).
// S = Q·Kᵀ, dP = dO·Vᵀ and dQ += dS·K come from a products policy as in the forward pass (dS rounded to bfloat16
// for dQ, as XLA does); dV and dK read P and dS transposed in place, in float32.
template <typename T>
struct FloatGradProducts {
  const Shape& shape;
  const long d, t_pad;
  std::vector<float> keys, keys_t, values_t;
  const float *queries = nullptr, *grads_out = nullptr;  // the float32 query-side rows, [group · s, d]

  void use_float_rows(const float* query_rows, const float* grad_out_rows) {
    queries = query_rows;
    grads_out = grad_out_rows;
  }
  explicit FloatGradProducts(const Shape& shape)
      : shape(shape), d(shape.head_dim), t_pad(shape.padded_keys()), keys(t_pad * d), keys_t(d * t_pad),
        values_t(d * t_pad) {}
  void pack_keys_values(const T* k, const T* v, long b, long kv) {
    pack_keys(k, shape, b, kv, /*transposed=*/false, keys.data());
    pack_keys(k, shape, b, kv, /*transposed=*/true, keys_t.data());
    pack_keys(v, shape, b, kv, /*transposed=*/true, values_t.data());
  }
  void pack_query_rows(const T*, const T*, long, long, long, long, long) {}
  void scores(long rows, long base, long k0, float* out) {
    matmul(rows, kBlock, d, queries + base * d, d, 1, keys_t.data() + k0 * d, kBlock, out, kBlock, false);
  }
  void grad_probs(long rows, long base, long k0, float* out) {
    matmul(rows, kBlock, d, grads_out + base * d, d, 1, values_t.data() + k0 * d, kBlock, out, kBlock,
           false);
  }
  void add_grad_queries(long rows, long k0, const float* grad_scores, float* grads_q) {
    matmul(rows, d, kBlock, grad_scores, kBlock, 1, keys.data() + k0 * d, d, grads_q, d, true);
  }
};

#if defined(__AVX512BF16__)
struct Bf16GradProducts {
  const Shape& shape;
  const long d, t_pad;
  std::vector<uint32_t> key_words_across, value_words_across, key_words_down;
  std::vector<uint16_t> queries, grads_out, grad_scores;
  void use_float_rows(const float*, const float*) {}  // its own bfloat16 rows serve

  explicit Bf16GradProducts(const Shape& shape)
      : shape(shape), d(shape.head_dim), t_pad(shape.padded_keys()), key_words_across(d / 2 * t_pad),
        value_words_across(d / 2 * t_pad), key_words_down(t_pad / 2 * d), queries(shape.group() * shape.queries * d),
        grads_out(shape.group() * shape.queries * d), grad_scores(shape.group() * kBlock * kBlock) {}
  void pack_keys_values(const uint16_t* k, const uint16_t* v, long b, long kv) {
    const long offset = (b * shape.keys * shape.kv_heads + kv) * d, stride = shape.kv_heads * d;
    pack_pairs_across(k + offset, stride, shape.keys, t_pad, d, key_words_across.data());
    pack_pairs_across(v + offset, stride, shape.keys, t_pad, d, value_words_across.data());
    pack_pairs_down(k + offset, stride, shape.keys, t_pad, d, key_words_down.data());
  }
  void pack_query_rows(const uint16_t* q, const uint16_t* grad_out, long b, long kv, long q0, long n, long base) {
    const long group = shape.group();
    for (long g = 0; g < group; ++g)
      for (long i = 0; i < n; ++i) {
        const long from = ((b * shape.queries + q0 + i) * shape.heads + kv * group + g) * d, to = (base + g * n + i) * d;
        std::memcpy(queries.data() + to, q + from, d * sizeof(uint16_t));
        std::memcpy(grads_out.data() + to, grad_out + from, d * sizeof(uint16_t));
      }
  }
  void scores(long rows, long base, long k0, float* out) {
    matmul_bf16(rows, kBlock, d / 2, queries.data() + base * d, d, key_words_across.data() + k0, t_pad, out,
                kBlock, false);
  }
  void grad_probs(long rows, long base, long k0, float* out) {
    matmul_bf16(rows, kBlock, d / 2, grads_out.data() + base * d, d, value_words_across.data() + k0, t_pad, out,
                kBlock, false);
  }
  void add_grad_queries(long rows, long k0, const float* grad_scores_f32, float* grads_q) {
    for (long i = 0; i < rows * kBlock; i += kLanes) store_bf16(grad_scores.data() + i, load(grad_scores_f32 + i));
    matmul_bf16(rows, d, kBlock / 2, grad_scores.data(), kBlock, key_words_down.data() + k0 / 2 * d, d, grads_q, d,
                true);
  }
};
#endif

template <typename T, typename Products>
void backward(ffi::ThreadPool& pool, const Shape& shape, const Mask& mask, const T* q, const T* k, const T* v,
              const T* out, const float* log_normaliser, const T* grad_out, T* grad_q, T* grad_k, T* grad_v) {
  const long d = shape.head_dim, group = shape.group(), s = shape.queries;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  parallel_for(pool, shape.batch * shape.kv_heads, [&](long task) {
    const long b = task / shape.kv_heads, kv = task % shape.kv_heads;
    const RowMask rows_mask = row_mask(mask, shape, b);
    // Query-side rows for the whole sequence, block after block ([group · n, d] each, starting at q0 · group · d).
    Products products(shape);
    std::vector<float> queries(group * s * d), grads_out(group * s * d), grads_q(group * s * d, 0.0f),
        row_lse(group * s), row_dot(group * s), outs(group * kBlock * d);
    products.use_float_rows(queries.data(), grads_out.data());
    for (long q0 = 0; q0 < s; q0 += kBlock) {
      const long n = std::min<long>(kBlock, s - q0), base = q0 * group;
      pack_queries(q, shape, b, kv, q0, n, 1.0f, queries.data() + base * d);
      pack_queries(grad_out, shape, b, kv, q0, n, 1.0f, grads_out.data() + base * d);
      pack_queries(out, shape, b, kv, q0, n, 1.0f, outs.data());
      products.pack_query_rows(q, grad_out, b, kv, q0, n, base);
      for (long r = 0; r < group * n; ++r) {
        const long g = r / n, i = r % n;
        row_lse[base + r] = log_normaliser[(b * shape.heads + kv * group + g) * s + q0 + i];
        float dot = 0;
        for (long e = 0; e < d; ++e) dot += grads_out[(base + r) * d + e] * outs[r * d + e];
        row_dot[base + r] = dot;
      }
    }
    std::vector<float> probs(group * kBlock * kBlock), grad_scores(group * kBlock * kBlock), grad_keys(kBlock * d),
        grad_values(kBlock * d);
    products.pack_keys_values(k, v, b, kv);
    for (long k0 = 0; k0 < shape.keys; k0 += kBlock) {
      const long kn = std::min<long>(kBlock, shape.keys - k0);
      std::fill(grad_keys.begin(), grad_keys.end(), 0.0f);
      std::fill(grad_values.begin(), grad_values.end(), 0.0f);
      const KeyBlock key_block = rows_mask.key_block(k0);
      for (long q0 = 0; q0 < s; q0 += kBlock) {
        const long n = std::min<long>(kBlock, s - q0), rows = group * n, base = q0 * group;
        if (!rows_mask.block_may_attend(q0, n, k0, kn)) continue;
        const float* block_queries = queries.data() + base * d;
        const float* block_grads_out = grads_out.data() + base * d;
        products.scores(rows, base, k0, probs.data());
        products.grad_probs(rows, base, k0, grad_scores.data());
        for (long i = 0; i < n; ++i) {
          vi allowed[kBlock / kLanes];
          rows_mask.allowed(key_block, q0 + i, allowed);
          for (long g = 0; g < group; ++g) {
            const long r = g * n + i;
            const float lse = row_lse[base + r], dot = row_dot[base + r];
            float* p = probs.data() + r * kBlock;
            float* ds = grad_scores.data() + r * kBlock;
            for (int u = 0; u < kBlock / kLanes; ++u) {
              const vf x = load(p + u * kLanes) * scale - lse;
              const vf pu = allowed[u] ? exp_nonpositive(x > 0.0f ? vf{} : x) : vf{};
              store(p + u * kLanes, pu);
              store(ds + u * kLanes, pu * (load(ds + u * kLanes) - dot) * scale);
            }
          }
        }
        // Pᵀ and dSᵀ are read in place: A(c, r) = P[r, c].
        matmul(kBlock, d, rows, probs.data(), 1, kBlock, block_grads_out, d, grad_values.data(), d, true);
        matmul(kBlock, d, rows, grad_scores.data(), 1, kBlock, block_queries, d, grad_keys.data(), d, true);
        products.add_grad_queries(rows, k0, grad_scores.data(), grads_q.data() + base * d);
      }
      for (long j = 0; j < kn; ++j) {
        const long offset = ((b * shape.keys + k0 + j) * shape.kv_heads + kv) * d;
        for (long e = 0; e < d; ++e) {
          from_float(grad_keys[j * d + e], grad_k + offset + e);
          from_float(grad_values[j * d + e], grad_v + offset + e);
        }
      }
    }
    for (long q0 = 0; q0 < s; q0 += kBlock) {
      const long n = std::min<long>(kBlock, s - q0);
      unpack_queries(grads_q.data() + q0 * group * d, shape, b, kv, q0, n, grad_q);
    }
  });
}

// ── FFI bindings ─────────────────────────────────────────────────────────────────────────────────────────────────
ffi::Error check_shapes(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v, Shape* shape) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("flash attention: q, k, v must be [batch, length, heads, head_dim]");
  *shape = Shape{qd[0], qd[1], qd[2], kd[1], kd[2], qd[3]};
  if (kd[0] != qd[0] || kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] ||
      shape->kv_heads == 0 || shape->heads % shape->kv_heads != 0 || shape->head_dim % kLanes != 0)
    return ffi::Error::InvalidArgument("flash attention: mismatched q/k/v shapes or head_dim not a multiple of 16");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type() ||
      (q.element_type() != ffi::DataType::BF16 && q.element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("flash attention: q, k, v must all be bfloat16 or all float32");
  return ffi::Error::Success();
}

Mask mask_of(ffi::Buffer<ffi::S32> qs, ffi::Buffer<ffi::S32> qg, ffi::Buffer<ffi::S32> ks,
             ffi::Buffer<ffi::S32> kg) {
  return {qs.typed_data(), qg.typed_data(), ks.typed_data(), kg.typed_data()};
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Buffer<ffi::S32> query_slots, ffi::Buffer<ffi::S32> query_segments,
                        ffi::Buffer<ffi::S32> key_slots, ffi::Buffer<ffi::S32> key_segments,
                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> log_normaliser) {
  Shape shape;
  if (auto error = check_shapes(q, k, v, &shape); error.failure()) return error;
  const Mask mask = mask_of(query_slots, query_segments, key_slots, key_segments);
  if (q.element_type() == ffi::DataType::BF16)
#if defined(__AVX512BF16__)
    forward<uint16_t, Bf16Products>(pool, shape, mask, static_cast<const uint16_t*>(q.untyped_data()),
#else
    forward<uint16_t, FloatProducts<uint16_t>>(pool, shape, mask, static_cast<const uint16_t*>(q.untyped_data()),
#endif
            static_cast<const uint16_t*>(k.untyped_data()), static_cast<const uint16_t*>(v.untyped_data()),
            static_cast<uint16_t*>(out->untyped_data()), log_normaliser->typed_data());
  else
    forward<float, FloatProducts<float>>(pool, shape, mask, static_cast<const float*>(q.untyped_data()),
            static_cast<const float*>(k.untyped_data()), static_cast<const float*>(v.untyped_data()),
            static_cast<float*>(out->untyped_data()), log_normaliser->typed_data());
  return ffi::Error::Success();
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::Buffer<ffi::S32> query_slots, ffi::Buffer<ffi::S32> query_segments,
                         ffi::Buffer<ffi::S32> key_slots, ffi::Buffer<ffi::S32> key_segments, ffi::AnyBuffer out,
                         ffi::Buffer<ffi::F32> log_normaliser, ffi::AnyBuffer grad_out,
                         ffi::Result<ffi::AnyBuffer> grad_q, ffi::Result<ffi::AnyBuffer> grad_k,
                         ffi::Result<ffi::AnyBuffer> grad_v) {
  Shape shape;
  if (auto error = check_shapes(q, k, v, &shape); error.failure()) return error;
  const Mask mask = mask_of(query_slots, query_segments, key_slots, key_segments);
  if (q.element_type() == ffi::DataType::BF16) {
    using T = uint16_t;
#if defined(__AVX512BF16__)
    using Products = Bf16GradProducts;
#else
    using Products = FloatGradProducts<T>;
#endif
    backward<T, Products>(pool, shape, mask, static_cast<const T*>(q.untyped_data()), static_cast<const T*>(k.untyped_data()),
             static_cast<const T*>(v.untyped_data()), static_cast<const T*>(out.untyped_data()),
             log_normaliser.typed_data(), static_cast<const T*>(grad_out.untyped_data()),
             static_cast<T*>(grad_q->untyped_data()), static_cast<T*>(grad_k->untyped_data()),
             static_cast<T*>(grad_v->untyped_data()));
  } else {
    using T = float;
    backward<T, FloatGradProducts<T>>(pool, shape, mask, static_cast<const T*>(q.untyped_data()), static_cast<const T*>(k.untyped_data()),
             static_cast<const T*>(v.untyped_data()), static_cast<const T*>(out.untyped_data()),
             log_normaliser.typed_data(), static_cast<const T*>(grad_out.untyped_data()),
             static_cast<T*>(grad_q->untyped_data()), static_cast<T*>(grad_k->untyped_data()),
             static_cast<T*>(grad_v->untyped_data()));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxFlashAttentionForward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxFlashAttentionBackward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
