// One-token decode attention over a KV cache, as an XLA:CPU FFI custom call (and, further down,
// the greedy picks and the weight-streaming matvec of the decode step).
//
// Why a kernel: a decode step gives each (row, KV head) G queries against S cached keys. XLA:CPU
// runs that either as many tiny batched products or as generic reduce loops, both far below the
// machine's memory speed (about 20 GFLOP/s on bench_decode's batch-64 step, where the attention
// was ~40% of the step). Here each (row, KV head) is one pass over its keys and one over its
// values, in float32 vector lanes, reading only the slots [0, length) written so far: the scores
// as broadcast-query FMAs along 16 keys at a time, the softmax with a vectorised exp, the values
// with the group's outputs held in registers.
//
// Keys lie in blocks of 16 slots, each block (hd, 16): the 16 keys' element i side by side. The
// scores read one vector per element, and a (row, KV head)'s first n slots are one contiguous run
// of memory. In the plain (hd, S) transpose, each block was a vector from each of hd rows S apart:
// hd streams at once, which the hardware prefetcher does not follow, and the kernel waited on
// memory (bench_decode's bfloat16 batch-64 step: 455 us per layer against 254 us when the cache
// was warm in L3). Blocked, with the prefetches below and a one-instruction bfloat16 widening, the
// step went from 16.6 to 14.1 ms (hand-timed, 2 threads).
//
// Built and registered by cfrl_jax/kernels/cpu_decode.py (g++ -O3 -march=native).
//
// Operands (B rows, T query positions per row, Hkv KV heads, G query heads per KV head, S cache
// slots, hd head dim; T = 1 in a decode step, the prompt length in a prefill):
//   q       (B, T, Hkv, G, hd) float32, already scaled by 1/sqrt(hd)
//   k       (B, Hkv, S / 16, hd, 16) keys in blocks of 16 slots (S a multiple of 16), float32 or
//           bfloat16 (as bfloat16 or its uint16 bits)
//   v       (B, Hkv, S, hd) values, in k's dtype
//   mask    (B, S) int32, nonzero on slots holding real tokens
//   length  (B, T) int32, slots each query reads (later slots are ignored); 0 < length <= S.
//           A prefill's query t reads [0, t]: causal attention with the mask's pads.
// Result:
//   out     (B, T, Hkv, G, hd) float32 = softmax over the masked scores of q.k, times v

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// GCC/Clang vector extensions: 16 float lanes, lowered to the target's own registers (one AVX-512
// register, two AVX2 ones, four NEON ones) without intrinsics.
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint32_t U16x __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

inline float Widen(float x) { return x; }
inline float Widen(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline F16 Load(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline F16 Load(const uint16_t* p) {  // bfloat16 bits widen to float32 exactly by a shift
#if defined(__AVX512F__)
  // One 256 -> 512-bit widening: GCC splits the generic form below into 128-bit halves, four
  // shuffles on the port the FMAs also use.
  const __m512i w = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  F16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
#else
  H16 h;
  std::memcpy(&h, p, sizeof h);
  U16x w = __builtin_convertvector(h, U16x) << 16;
  F16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
#endif
}
template <typename T>
inline F16 LoadPartial(const T* p, int64_t count) {  // the first count < 16 lanes; zeros after
  T buf[kLanes] = {};
  std::memcpy(buf, p, count * sizeof(T));
  return Load(buf);
}
// Lanes [0, count) of the 16 ints at p nonzero (true = all bits set); all 16 lie in the buffer.
inline I16 RealSlots(const int32_t* p, int64_t count) {
  I16 v;
  std::memcpy(&v, p, sizeof v);
  const I16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return (v != 0) & (lane < static_cast<int32_t>(count));
}
// Hot loops multiply vectors by scalars directly (the extensions broadcast them); elsewhere:
inline F16 Splat(float x) { return F16{} + x; }
inline float MaxLanes(F16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
inline float SumLanes(F16 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp(x) for x <= 0, to ~1 ulp: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2, e^r by a
// degree-7 series (Cephes' expf coefficients). Vectorised, where std::exp would be a call per lane.
inline F16 ExpNonPositive(F16 x) {
  x = x < Splat(-87.f) ? Splat(-87.f) : x;
  const F16 magic = Splat(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to integer
  F16 n = (x * Splat(1.44269504088896341f) + magic) - magic;
  F16 r = x - n * Splat(0.693359375f) - n * Splat(-2.12194440e-4f);
  F16 p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * r * r + r + Splat(1.f);
  I16 e = (__builtin_convertvector(n, I16) + 127) << 23;
  F16 scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// Software prefetch distances, in key blocks and value slots: the hardware prefetcher alone left the
// batch-64 bfloat16 step ~0.5 ms slower (hand-timed, bench_decode's model; 1 / 4 did as well).
// Past the slots read, or past the cache's end, they fetch lines nobody uses: x86 prefetches never
// fault.
constexpr int64_t kKeysAhead = 2;
constexpr int64_t kValuesAhead = 8;

// Scores of GN queries (q: GN rows of hd) against the 16 slots from s0 of the blocked keys kb
// (S / 16 blocks of (hd, 16)): one broadcast query element times the 16 keys' element per FMA, the
// GN queries sharing each load. GN and hd static, so the accumulators stay in registers. All 16
// lanes are computed (the block is allocated whole); those past the slots read are ignored.
template <int GN, int64_t hd, typename T>
inline void ScoreBlock(const float* q, const T* kb, int64_t s0, float* scores, int64_t np) {
  F16 even[GN] = {}, odd[GN] = {};  // two accumulators per query: twice the independent FMA chains
  const T* block = kb + s0 * hd;
  for (int64_t i = 0; i < hd; i += 2) {  // hd is a multiple of 16
    // Rows i and i + 1 kKeysAhead blocks on: one 64-byte line (16-bit keys) or two (float32).
    __builtin_prefetch(block + (kKeysAhead * hd + i) * kLanes);
    if (sizeof(T) == 4) __builtin_prefetch(block + (kKeysAhead * hd + i + 1) * kLanes);
    const F16 k0 = Load(block + i * kLanes);
    const F16 k1 = Load(block + (i + 1) * kLanes);
    for (int g = 0; g < GN; ++g) {
      even[g] += k0 * q[g * hd + i];
      odd[g] += k1 * q[g * hd + i + 1];
    }
  }
  for (int g = 0; g < GN; ++g) {
    const F16 a = even[g] + odd[g];
    std::memcpy(scores + g * np + s0, &a, sizeof a);
  }
}

// out (GN, hd) = inv_total[g] * sum over the n slots of p[g][s] * v[s] (p: GN rows of np).
template <int GN, int NV, typename T>
inline void ValueBlock(const float* p, int64_t np, const T* v, const int32_t* mask, int64_t n,
                       const float* inv_total, float* out) {
  constexpr int64_t hd = NV * kLanes;
  F16 acc[GN][NV] = {};
  for (int64_t s = 0; s < n; ++s) {
    if (!mask[s]) continue;
    const T* vs = v + s * hd;
    for (int j = 0; j < NV; j += 64 / (kLanes * sizeof(T))) {  // each 64-byte line of the slot
      __builtin_prefetch(vs + kValuesAhead * hd + j * kLanes);   // kValuesAhead slots on
    }
    F16 vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = Load(vs + j * kLanes);
    for (int g = 0; g < GN; ++g) {
      const float pg = p[g * np + s];
      for (int j = 0; j < NV; ++j) acc[g][j] += vv[j] * pg;
    }
  }
  for (int g = 0; g < GN; ++g) {
    for (int j = 0; j < NV; ++j) {
      const F16 o = acc[g][j] * inv_total[g];
      std::memcpy(out + g * hd + j * kLanes, &o, sizeof o);
    }
  }
}

constexpr int kGroup = 4;  // queries sharing each loaded key row / value row

// One (row, KV head) in float32 lanes: G queries against the first n of S slots.
//   q (G, hd); kb: keys in blocks (S / 16, hd, 16); v: values (S, hd); mask (S,); out (G, hd).
//   scores: scratch of G * round_up(n, 16) floats; inv_total: scratch of G floats. NV = hd / 16.
template <int NV, typename T>
void AttendLanes(const float* q, const T* kb, const T* v, const int32_t* mask, int64_t n,
                 int64_t G, float* scores, float* inv_total, float* out) {
  constexpr int64_t hd = NV * kLanes;
  const int64_t np = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t s0 = 0; s0 < n; s0 += kLanes) {
    int64_t g0 = 0;
    for (; g0 + kGroup <= G; g0 += kGroup) {
      ScoreBlock<kGroup, hd>(q + g0 * hd, kb, s0, scores + g0 * np, np);
    }
    switch (G - g0) {
      case 3: ScoreBlock<3, hd>(q + g0 * hd, kb, s0, scores + g0 * np, np); break;
      case 2: ScoreBlock<2, hd>(q + g0 * hd, kb, s0, scores + g0 * np, np); break;
      case 1: ScoreBlock<1, hd>(q + g0 * hd, kb, s0, scores + g0 * np, np); break;
      default: break;
    }
  }
  // Softmax numerators over the real slots (exactly 0 elsewhere); normalised in ValueBlock.
  const F16 zero = {};
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * np;
    F16 mx = Splat(-std::numeric_limits<float>::max());
    for (int64_t s0 = 0; s0 < n; s0 += kLanes) {
      const I16 real = RealSlots(mask + s0, std::min(kLanes, n - s0));
      const F16 x = Load(sg + s0);
      mx = real ? (x > mx ? x : mx) : mx;
    }
    const float m = MaxLanes(mx);
    F16 total = {};
    for (int64_t s0 = 0; s0 < n; s0 += kLanes) {
      const I16 real = RealSlots(mask + s0, std::min(kLanes, n - s0));
      const F16 p = real ? ExpNonPositive(Load(sg + s0) - Splat(m)) : zero;
      total += p;
      std::memcpy(sg + s0, &p, sizeof p);
    }
    const float t = SumLanes(total);
    inv_total[g] = t > 0.f ? 1.f / t : 0.f;  // no real slot: a zero output
  }
  int64_t g0 = 0;
  for (; g0 + kGroup <= G; g0 += kGroup) {
    ValueBlock<kGroup, NV>(scores + g0 * np, np, v, mask, n, inv_total + g0, out + g0 * hd);
  }
  switch (G - g0) {
    case 3: ValueBlock<3, NV>(scores + g0 * np, np, v, mask, n, inv_total + g0, out + g0 * hd); break;
    case 2: ValueBlock<2, NV>(scores + g0 * np, np, v, mask, n, inv_total + g0, out + g0 * hd); break;
    case 1: ValueBlock<1, NV>(scores + g0 * np, np, v, mask, n, inv_total + g0, out + g0 * hd); break;
    default: break;
  }
}

// The same for any head dim, one float at a time (tiny test models; hd not a multiple of 16).
template <typename T>
void AttendScalar(const float* q, const T* kb, const T* v, const int32_t* mask, int64_t n,
                  int64_t G, int64_t hd, float* scores, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float m = -std::numeric_limits<float>::max();
    for (int64_t s = 0; s < n; ++s) {
      float acc = 0.f;
      const T* ks = kb + (s / kLanes) * hd * kLanes + s % kLanes;
      for (int64_t i = 0; i < hd; ++i) acc += q[g * hd + i] * Widen(ks[i * kLanes]);
      sg[s] = acc;
      if (mask[s]) m = std::max(m, acc);
    }
    float total = 0.f;
    for (int64_t s = 0; s < n; ++s) {
      sg[s] = mask[s] ? std::exp(sg[s] - m) : 0.f;
      total += sg[s];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    float* og = out + g * hd;
    std::fill(og, og + hd, 0.f);
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t i = 0; i < hd; ++i) og[i] += sg[s] * Widen(v[s * hd + i]);
    }
    for (int64_t i = 0; i < hd; ++i) og[i] *= inv;
  }
}

template <typename T>
void AttendOne(const float* q, const T* kb, const T* v, const int32_t* mask, int64_t n,
               int64_t G, int64_t hd, float* scores, float* inv_total, float* out) {
  switch (hd) {
    case 16: return AttendLanes<1>(q, kb, v, mask, n, G, scores, inv_total, out);
    case 32: return AttendLanes<2>(q, kb, v, mask, n, G, scores, inv_total, out);
    case 64: return AttendLanes<4>(q, kb, v, mask, n, G, scores, inv_total, out);
    case 128: return AttendLanes<8>(q, kb, v, mask, n, G, scores, inv_total, out);
    case 256: return AttendLanes<16>(q, kb, v, mask, n, G, scores, inv_total, out);
    default: return AttendScalar(q, kb, v, mask, n, G, hd, scores, out);
  }
}

// Runs fn(0 .. total-1) on the calling thread and up to workers - 1 tasks of XLA's intra-op pool,
// in chunks of consecutive items claimed one at a time: the caller finishes alone if the pool
// never gets to a task (no deadlock when every pool thread is busy), and late tasks find nothing
// left and return.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, F fn) {
  struct Work {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), total);
  if (workers <= 1) {
    for (int64_t i = 0; i < total; ++i) fn(i);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, total / (4 * workers));
  auto work = std::make_shared<Work>();
  auto run = [work, total, chunk, &fn]() {
    for (int64_t i0; (i0 = work->next.fetch_add(chunk)) < total;) {
      const int64_t i1 = std::min(total, i0 + chunk);
      for (int64_t i = i0; i < i1; ++i) fn(i);
      work->done.fetch_add(i1 - i0, std::memory_order_release);
    }
  };
  // Tasks outliving this call touch only `work` (kept alive by the shared_ptr): they claim an
  // index >= total and return without calling fn.
  for (int64_t t = 1; t < workers; ++t) pool.Schedule([run]() { run(); });
  run();
  while (work->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

template <typename T>
ffi::Error Attend(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> q, const T* k, const T* v,
                  ffi::Buffer<ffi::S32> mask, ffi::Buffer<ffi::S32> length,
                  ffi::ResultBuffer<ffi::F32> out, int64_t B, int64_t Tq, int64_t Hkv, int64_t G,
                  int64_t S, int64_t hd) {
  const int32_t* len = length.typed_data();
  for (int64_t i = 0; i < B * Tq; ++i) {
    if (len[i] < 1 || len[i] > S) {
      return ffi::Error::InvalidArgument("decode_attention: length[" + std::to_string(i) + "] = " +
                                         std::to_string(len[i]) + " is outside [1, " +
                                         std::to_string(S) + "]");
    }
  }
  const float* qd = q.typed_data();
  const int32_t* md = mask.typed_data();
  float* od = out->typed_data();
  // Item i = ((b * Tq + t) * Hkv + h): query position t of row b, KV head h.
  ParallelFor(pool, B * Tq * Hkv, [&](int64_t i) {
    thread_local std::vector<float> scores, inv_total;
    const int64_t bt = i / Hkv, b = bt / Tq, h = i % Hkv;
    const int64_t n = len[bt];
    const int64_t need = G * ((n + kLanes - 1) / kLanes * kLanes);
    if (static_cast<int64_t>(scores.size()) < need) scores.resize(need);
    if (static_cast<int64_t>(inv_total.size()) < G) inv_total.resize(G);
    const int64_t kv = (b * Hkv + h) * S * hd;
    AttendOne(qd + i * G * hd, k + kv, v + kv, md + b * S, n, G, hd, scores.data(), inv_total.data(),
              od + i * G * hd);
  });
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                               ffi::AnyBuffer v, ffi::Buffer<ffi::S32> mask,
                               ffi::Buffer<ffi::S32> length, ffi::ResultBuffer<ffi::F32> out) {
  // q (..., Tq, Hkv, G, hd): Tq query positions per row. Any leading axes (the rows, and those a
  // vmapped call adds) are batch axes, the same on every operand.
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto md = mask.dimensions(), ld = length.dimensions();
  const size_t r = qd.size();
  bool ok = r >= 5 && kd.size() == r && vd.size() == r - 1 && md.size() == r - 3 && ld.size() == r - 3;
  int64_t B = 1;
  for (size_t a = 0; ok && a + 4 < r; ++a) {
    ok = kd[a] == qd[a] && vd[a] == qd[a] && md[a] == qd[a] && ld[a] == qd[a];
    B *= qd[a];
  }
  const int64_t Tq = ok ? qd[r - 4] : 0, Hkv = ok ? qd[r - 3] : 0, G = ok ? qd[r - 2] : 0;
  const int64_t hd = ok ? qd[r - 1] : 0, S = ok ? vd[r - 3] : 0;
  ok = ok && ld[r - 4] == Tq && kd[r - 4] == Hkv && kd[r - 3] * kLanes == S && kd[r - 2] == hd &&
       kd[r - 1] == kLanes && vd[r - 4] == Hkv && vd[r - 2] == hd && md[r - 4] == S;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q (..., T, Hkv, G, hd), k (..., Hkv, S / 16, hd, 16), "
        "v (..., Hkv, S, hd), mask (..., S) and length (..., T) with the same leading axes");
  }
  if (k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("decode_attention: k and v differ in dtype");
  }
  switch (k.element_type()) {
    case ffi::F32:
      return Attend(pool, q, k.typed_data<float>(), v.typed_data<float>(), mask, length, out, B, Tq,
                    Hkv, G, S, hd);
    case ffi::U16:
    case ffi::BF16:
      return Attend(pool, q, static_cast<const uint16_t*>(k.untyped_data()),
                    static_cast<const uint16_t*>(v.untyped_data()), mask, length, out, B, Tq, Hkv, G,
                    S, hd);
    default:
      return ffi::Error::InvalidArgument(
          "decode_attention: k and v must be float32, bfloat16 or uint16 (bfloat16 bits)");
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy pick over logits laid out (V, B): per column b, the first index of the maximum and its
// log-probability, max - logsumexp = -log(sum(exp(z - max))). The head's product runs fastest with the (V, d) weight as its left operand, which
// gives (V, B) logits; XLA:CPU's reductions along V (either layout), and its transpose back to
// (B, V), each cost a decode step more than the product itself. Here: one chunked pass over V for
// max / argmax and the sum of exponentials (GreedyColumns), 16 columns per vector.

constexpr int64_t kPickChunk = 256;

// Columns [c0, c0 + 16) (or the count < 16 left) of z (V, B).
void GreedyColumns(const float* z, int64_t V, int64_t B, int64_t c0, int32_t* token, float* logprob) {
  const int64_t count = std::min(kLanes, B - c0);
  if (count < kLanes) {  // the last few columns, one at a time
    for (int64_t c = c0; c < c0 + count; ++c) {
      float m = z[c];
      int32_t arg = 0;
      for (int64_t v = 1; v < V; ++v) {
        if (z[v * B + c] > m) m = z[v * B + c], arg = static_cast<int32_t>(v);
      }
      double total = 0.;
      for (int64_t v = 0; v < V; ++v) total += std::exp(z[v * B + c] - m);
      token[c] = arg;
      logprob[c] = static_cast<float>(-std::log(total));
    }
    return;
  }
  // One pass over V in chunks of kPickChunk rows: each chunk's max first, then its exponentials
  // while it is still in L1, the running sum rescaled when the max grows. Two passes over all of
  // V read the (V, B) logits twice, at a stride of B floats (0.88 ms at B = 64, V = 32000).
  F16 m = Load(z + c0);
  I16 arg = {};
  F16 total = {};
  for (int64_t v0 = 0; v0 < V; v0 += kPickChunk) {
    const int64_t v1 = std::min(V, v0 + kPickChunk);
    F16 cm = m;
    for (int64_t v = v0; v < v1; ++v) {
      const F16 x = Load(z + v * B + c0);
      const I16 more = x > cm;  // strictly: the first maximum is kept
      cm = more ? x : cm;
      arg = more ? I16{} + static_cast<int32_t>(v) : arg;
    }
    const I16 grew = cm > m;  // only there: m = cm = -inf would give a NaN factor
    total = grew ? total * ExpNonPositive(m - cm) : total;
    m = cm;
    // Where every logit so far is -inf, subtract 0 instead (-inf - -inf is NaN): their terms are
    // then ExpNonPositive's floor, e^-87, and vanish once the max grows.
    const F16 shift = m == Splat(-std::numeric_limits<float>::infinity()) ? F16{} : m;
    F16 total0 = {}, total1 = {};  // two chains of adds
    int64_t v = v0;
    for (; v + 1 < v1; v += 2) {
      total0 += ExpNonPositive(Load(z + v * B + c0) - shift);
      total1 += ExpNonPositive(Load(z + (v + 1) * B + c0) - shift);
    }
    if (v < v1) total0 += ExpNonPositive(Load(z + v * B + c0) - shift);
    total += total0 + total1;
  }
  for (int i = 0; i < kLanes; ++i) {
    token[c0 + i] = arg[i];
    logprob[c0 + i] = -std::log(total[i]);
  }
}

// The operands of greedy_pick (batch_axis 1) and greedy_pick_rows (batch_axis 0): 2-D logits with
// at least one vocabulary entry, and (B,) tokens and log-probs for their B rows.
bool PickShapes(const ffi::Buffer<ffi::F32>& z, const ffi::Buffer<ffi::S32>& token,
                const ffi::Buffer<ffi::F32>& logprob, int batch_axis) {
  auto zd = z.dimensions(), td = token.dimensions(), ld = logprob.dimensions();
  return zd.size() == 2 && zd[1 - batch_axis] >= 1 && td.size() == 1 && td[0] == zd[batch_axis] &&
         ld.size() == 1 && ld[0] == zd[batch_axis];
}

ffi::Error GreedyPickImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z,
                          ffi::ResultBuffer<ffi::S32> token, ffi::ResultBuffer<ffi::F32> logprob) {
  auto zd = z.dimensions();
  if (!PickShapes(z, *token, *logprob, /*batch_axis=*/1)) {
    return ffi::Error::InvalidArgument("greedy_pick: expected logits (V, B), V >= 1, and results (B,)");
  }
  const int64_t V = zd[0], B = zd[1];
  const float* zp = z.typed_data();
  int32_t* tp = token->typed_data();
  float* lp = logprob->typed_data();
  ParallelFor(pool, (B + kLanes - 1) / kLanes,
              [&](int64_t i) { GreedyColumns(zp, V, B, i * kLanes, tp, lp); });
  return ffi::Error::Success();
}


// Greedy choice along rows laid out (B, V): the first argmax of each row and its log-softmax
// value, in vector lanes along V (greedy_pick's (V, B) form needs 16 rows to fill its lanes).
void GreedyRow(const float* z, int64_t V, int32_t* token, float* logprob) {
  const I16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  F16 m = Splat(-std::numeric_limits<float>::infinity());
  I16 arg = lane;
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    const F16 x = Load(z + v);
    const I16 more = x > m;  // strictly: each lane keeps its first maximum
    m = more ? x : m;
    arg = more ? lane + static_cast<int32_t>(v) : arg;
  }
  float best = MaxLanes(m);
  int32_t first = std::numeric_limits<int32_t>::max();
  for (int i = 0; i < kLanes; ++i) {
    if (m[i] == best) first = std::min(first, arg[i]);
  }
  for (; v < V; ++v) {  // the tail comes after every vector element: only a strictly larger one wins
    if (z[v] > best) best = z[v], first = static_cast<int32_t>(v);
  }
  F16 total0 = {}, total1 = {};
  v = 0;
  for (; v + 2 * kLanes <= V; v += 2 * kLanes) {
    total0 += ExpNonPositive(Load(z + v) - Splat(best));
    total1 += ExpNonPositive(Load(z + v + kLanes) - Splat(best));
  }
  float total = SumLanes(total0 + total1);
  for (; v < V; ++v) total += std::exp(z[v] - best);
  *token = first;
  *logprob = -std::log(total);
}

ffi::Error GreedyPickRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z,
                              ffi::ResultBuffer<ffi::S32> token, ffi::ResultBuffer<ffi::F32> logprob) {
  auto zd = z.dimensions();
  if (!PickShapes(z, *token, *logprob, /*batch_axis=*/0)) {
    return ffi::Error::InvalidArgument("greedy_pick_rows: expected logits (B, V), V >= 1, and results (B,)");
  }
  const int64_t B = zd[0], V = zd[1];
  const float* zp = z.typed_data();
  int32_t* tp = token->typed_data();
  float* lp = logprob->typed_data();
  ParallelFor(pool, B, [&](int64_t b) { GreedyRow(zp + b * V, V, tp + b, lp + b); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Matrix-vector products of the decode step: y = x w^T for a few rows x (B, K) and a weight-major
// matrix w (N, K) (each output is a contiguous dot product of length K).
//
// Why a kernel: a decode step with few rows is bound by streaming the weights from memory. Each
// task here owns a contiguous band of w's rows, which it reads once, front to back, R rows at a
// time; the B rows of x stay in L1/L2 and every loaded weight vector feeds up to 4 rows' FMAs.
// In the float32 decode step XLA:CPU's products streamed the same weights markedly slower (step
// 6.7 -> 4.4 ms at one row, 13.6 -> 9.1 ms at 8, bench_decode's model on 2 threads).

// Sum of the 16 lanes by halving (the loop form would be 15 dependent scalar adds).
inline float ReduceAdd(F16 v) {
  typedef float F8 __attribute__((vector_size(32)));
  typedef float F4 __attribute__((vector_size(16)));
  F8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  F4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// R weight rows (w, stride K) against BB rows of x (stride K): out[b * ob + r * orr] = x_b . w_r.
// R and BB static so the R * BB accumulators stay in registers. Each step prefetches the same
// column of the next tile's R rows (the band goes on downward): a fixed 1024 elements ahead along
// the row had landed two rows ahead, mostly inside the tile being read, and one core streamed the
// (32000, 512) head at 26 GB/s in bfloat16 and 34 in float32, against 43-50 and 37-40 this way
// (hand-timed, AMD EPYC). Past the end of w the address is not dereferenced: x86 prefetches never
// fault.
template <int R, int BB, typename T>
inline void DotTile(const float* x, const T* w, int64_t K, float* out, int64_t ob, int64_t orr) {
  F16 acc[R][BB] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    F16 wv[R];
    for (int r = 0; r < R; ++r) __builtin_prefetch(w + (R + r) * K + k);
    for (int r = 0; r < R; ++r) wv[r] = Load(w + r * K + k);
    for (int b = 0; b < BB; ++b) {
      const F16 xv = Load(x + b * K + k);
      for (int r = 0; r < R; ++r) acc[r][b] += wv[r] * xv;
    }
  }
  if (k < K) {
    const int64_t count = K - k;
    F16 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = LoadPartial(w + r * K + k, count);
    for (int b = 0; b < BB; ++b) {
      const F16 xv = LoadPartial(x + b * K + k, count);
      for (int r = 0; r < R; ++r) acc[r][b] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < BB; ++b) out[b * ob + r * orr] = ReduceAdd(acc[r][b]);
  }
}

// All B rows of x against R weight rows: x in blocks of 4 rows (the R rows' weights are read from
// memory by the first block and from L1 by the rest).
template <int R, typename T>
inline void DotRows(const float* x, int64_t B, const T* w, int64_t K, float* out, int64_t ob,
                    int64_t orr) {
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) DotTile<R, 4>(x + b * K, w, K, out + b * ob, ob, orr);
  switch (B - b) {
    case 3: DotTile<R, 3>(x + b * K, w, K, out + b * ob, ob, orr); break;
    case 2: DotTile<R, 2>(x + b * K, w, K, out + b * ob, ob, orr); break;
    case 1: DotTile<R, 1>(x + b * K, w, K, out + b * ob, ob, orr); break;
    default: break;
  }
}

// Weight rows per task: a band large enough that scheduling costs little against its streaming.
constexpr int64_t kMatvecBand = 32;

template <typename T>
void Matvec(ffi::ThreadPool& pool, const float* x, const T* w, int64_t B, int64_t N, int64_t K,
            float* y) {
  // y (B, N): out[b * N + n], so x row b strides N and weight row n strides 1.
  ParallelFor(pool, (N + kMatvecBand - 1) / kMatvecBand, [&](int64_t task) {
    const int64_t n1 = std::min(N, (task + 1) * kMatvecBand);
    int64_t n = task * kMatvecBand;
    if (B == 1) {  // one row: 8 weight rows per pass keep 8 accumulators busy
      for (; n + 8 <= n1; n += 8) DotTile<8, 1>(x, w + n * K, K, y + n, N, 1);
    }
    for (; n + 4 <= n1; n += 4) DotRows<4>(x, B, w + n * K, K, y + n, N, 1);
    for (; n < n1; ++n) DotRows<1>(x, B, w + n * K, K, y + n, N, 1);
  });
}

ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] ||
      yd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("matvec: expected x (B, K), w (N, K) and a result (B, N)");
  }
  const int64_t B = xd[0], N = wd[0], K = wd[1];
  switch (w.element_type()) {
    case ffi::F32:
      Matvec(pool, x.typed_data(), w.typed_data<float>(), B, N, K, y->typed_data());
      return ffi::Error::Success();
    case ffi::U16:
    case ffi::BF16:
      Matvec(pool, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()), B, N, K,
             y->typed_data());
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "matvec: w must be float32, bfloat16 or uint16 (bfloat16 bits)");
  }
}


// ---- matmul: x (M, K) times the same weight-major w (N, K), for many rows ----
//
// Why a second form: at a batch-64 decode step the products are compute-bound, and matvec's dot
// products along K reload every x row from L2 for each 4 weight rows and end in horizontal sums
// (as fast as XLA's library GEMM at 32 rows, no faster). Here x is transposed once into xt (K, Mp),
// Mp = M rounded up to 16 (at most kMatmulRows per pass over w), and a tile of MR weight rows
// keeps its (MR, Mp) block of the result in registers: per k, Mp / 16 vector loads of xt and MR
// weights broadcast straight from w's rows feed MR * Mp / 16 FMAs (24 accumulators). Every weight
// is read once per pass, sequentially along its row, and w needs no packing or other layout.

// Rows of x per pass over w: 4 vectors of 16, with 6 weight rows per tile 24 accumulators.
constexpr int64_t kMatmulRows = 64;
// Weight rows per task: a multiple of every tile height below (6, 8, 12) and of 16, so that a
// full band's result goes out in 16 x 16 transposed blocks.
constexpr int64_t kMatmulBand = 48;

// Transposes 16 vectors in place (row i lane j <-> row j lane i): four rounds, each swapping the
// off-diagonal b x b blocks of every 2b x 2b block (b = 8, 4, 2, 1).
inline void Transpose16(F16 (&r)[16]) {
#define CFRL_SWAP(B, ...)                                                       \
  for (int i = 0; i < 16; ++i) {                                                \
    if (i & B) continue;                                                        \
    const F16 a = r[i], c = r[i + B];                                           \
    r[i] = __builtin_shufflevector(a, c, __VA_ARGS__);                          \
    r[i + B] = Hi##B(a, c);                                                     \
  }
  auto Hi8 = [](F16 a, F16 c) {
    return __builtin_shufflevector(a, c, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  };
  auto Hi4 = [](F16 a, F16 c) {
    return __builtin_shufflevector(a, c, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  };
  auto Hi2 = [](F16 a, F16 c) {
    return __builtin_shufflevector(a, c, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  };
  auto Hi1 = [](F16 a, F16 c) {
    return __builtin_shufflevector(a, c, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  };
  CFRL_SWAP(8, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
  CFRL_SWAP(4, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
  CFRL_SWAP(2, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
  CFRL_SWAP(1, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
#undef CFRL_SWAP
}

// dst[c * ds + r] = src[r * ss + c] for r < R, c < C: full 16 x 16 blocks in vector registers,
// the edges one element at a time.
inline void TransposeCopy(const float* src, int64_t ss, int64_t R, int64_t C, float* dst, int64_t ds) {
  int64_t r0 = 0;
  for (; r0 + kLanes <= R; r0 += kLanes) {
    int64_t c0 = 0;
    for (; c0 + kLanes <= C; c0 += kLanes) {
      F16 t[16];
      for (int i = 0; i < 16; ++i) t[i] = Load(src + (r0 + i) * ss + c0);
      Transpose16(t);
      for (int i = 0; i < 16; ++i) std::memcpy(dst + (c0 + i) * ds + r0, &t[i], sizeof(F16));
    }
    for (int64_t r = r0; r < r0 + kLanes; ++r) {
      for (int64_t c = c0; c < C; ++c) dst[c * ds + r] = src[r * ss + c];
    }
  }
  for (int64_t r = r0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) dst[c * ds + r] = src[r * ss + c];
  }
}

// Terms per partial sum of matmul: each output sums kMatmulChunk products in registers, then adds
// that partial to its total. One in-order chain along all of K had grown a rounding error ~2x that
// of matvec's 16-lane sums (K = 1408), enough to move a GRPO loss by 2.5e-4 relative between runs
// whose products took the two kernels.
constexpr int64_t kMatmulChunk = 128;

// out (R, MV * 16) = w's R rows (stride K) times xt (K, MV * 16). The next tile's rows (the band
// continues downward) are prefetched along the way, one line per row and 16 k.
template <int R, int MV>
inline void OuterTile(const float* xt, const float* w, int64_t K, float* out) {
  constexpr int64_t Mp = MV * kLanes;
  for (int64_t k0 = 0; k0 < K; k0 += kMatmulChunk) {
    const int64_t k1 = std::min(K, k0 + kMatmulChunk);
    F16 acc[R][MV] = {};
    auto term = [&](int64_t k) {  // column k of the R weight rows times row k of xt
      F16 xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = Load(xt + k * Mp + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const float s = w[r * K + k];
        for (int v = 0; v < MV; ++v) acc[r][v] += xv[v] * s;
      }
    };
    int64_t k = k0;
    for (; k + kLanes <= k1; k += kLanes) {
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + (R + r) * K + k);
      for (int64_t kk = k; kk < k + kLanes; ++kk) term(kk);
    }
    for (; k < k1; ++k) term(k);
    // The totals wait in out (L1) while a chunk runs: 24 accumulators leave no registers for them.
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < MV; ++v) {
        float* o = out + r * Mp + v * kLanes;
        const F16 sum = k0 ? Load(o) + acc[r][v] : acc[r][v];
        std::memcpy(o, &sum, sizeof(F16));
      }
    }
  }
}

// `rows` weight rows from w (at most kMatmulBand) against the Mp columns of xt into band (rows, Mp):
// tiles of MR rows, the last few rows one at a time.
template <int MR, int MV>
inline void OuterBand(const float* xt, const float* w, int64_t K, int64_t rows, float* band) {
  constexpr int64_t Mp = MV * kLanes;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) OuterTile<MR, MV>(xt, w + r * K, K, band + r * Mp);
  for (; r < rows; ++r) OuterTile<1, MV>(xt, w + r * K, K, band + r * Mp);
}

template <int MV>
void MatmulPass(ffi::ThreadPool& pool, const float* xt, int64_t M, const float* w, int64_t N,
                int64_t K, float* y) {
  // MR * MV = 24 accumulators (12 at one vector), leaving registers for the MV x vectors and the
  // broadcast weight.
  constexpr int MR = MV == 4 ? 6 : MV == 3 ? 8 : 12;
  constexpr int64_t Mp = MV * kLanes;
  ParallelFor(pool, (N + kMatmulBand - 1) / kMatmulBand, [&](int64_t task) {
    const int64_t n0 = task * kMatmulBand, rows = std::min(N - n0, kMatmulBand);
    alignas(64) float band[kMatmulBand * Mp];
    OuterBand<MR, MV>(xt, w + n0 * K, K, rows, band);
    TransposeCopy(band, Mp, rows, M, y + n0, N);   // band (rows, M) -> y[m, n0 + r]
  });
}

void Matmul(ffi::ThreadPool& pool, const float* x, const float* w, int64_t M, int64_t N, int64_t K,
            float* y) {
  if (K == 0) {  // empty sums (no tile would write them)
    std::fill(y, y + M * N, 0.f);
    return;
  }
  thread_local std::vector<float> xt;
  for (int64_t m0 = 0; m0 < M; m0 += kMatmulRows) {
    const int64_t rows = std::min(M - m0, kMatmulRows);
    const int64_t MV = (rows + kLanes - 1) / kLanes, Mp = MV * kLanes;
    if (xt.size() < static_cast<size_t>(K * Mp)) xt.resize(K * Mp);
    if (rows < Mp) {                                       // zero columns [rows, Mp)
      for (int64_t k = 0; k < K; ++k) std::memset(xt.data() + k * Mp + rows, 0, (Mp - rows) * sizeof(float));
    }
    TransposeCopy(x + m0 * K, K, rows, K, xt.data(), Mp);   // x rows (rows, K) -> xt (K, Mp)
    float* out = y + m0 * N;
    switch (MV) {
      case 1: MatmulPass<1>(pool, xt.data(), rows, w, N, K, out); break;
      case 2: MatmulPass<2>(pool, xt.data(), rows, w, N, K, out); break;
      case 3: MatmulPass<3>(pool, xt.data(), rows, w, N, K, out); break;
      default: MatmulPass<4>(pool, xt.data(), rows, w, N, K, out); break;
    }
  }
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] ||
      yd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("matmul: expected x (M, K), w (N, K) and a result (M, N)");
  }
  Matmul(pool, x.typed_data(), w.typed_data(), xd[0], wd[0], wd[1], y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfrlDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfrlGreedyPick, GreedyPickImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfrlMatvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfrlGreedyPickRows, GreedyPickRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfrlMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
