// Shared by the CPU fast paths (csrc/logprobs.cpp, csrc/gae.cpp): W-float vectors written with GCC / clang vector
// extensions, float32 / bfloat16 loads and stores, a vectorized exp, and the choice among the copies compiled for
// three instruction sets (x86-64 baseline, AVX2 + FMA, AVX-512), made once per process and shared by every file.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace rto_simd {

#define RTO_INLINE inline __attribute__((always_inline))

// W floats in one GCC / clang vector-extension value: 4 in the baseline copy (one SSE register; wider generic vectors
// were 2.5x slower there), 8 in the AVX2 copy, 16 in the AVX-512 copy.
template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};

struct Bf16 {
  uint16_t bits;
};

template <int W>
RTO_INLINE typename Vec<W>::f splat(float v) {
  return typename Vec<W>::f{} + v;
}

RTO_INLINE float load1(const float* data, int64_t i) { return data[i]; }
RTO_INLINE float load1(const Bf16* data, int64_t i) {
  const uint32_t bits = uint32_t(data[i].bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

template <int W>
RTO_INLINE typename Vec<W>::f load(const float* data, int64_t i) {
  typename Vec<W>::f v;
  std::memcpy(&v, data + i, sizeof(v));
  return v;
}
// bfloat16 -> float32 is a zero-extension to 32 bits and a shift. For 8 and 16 lanes the zero-extension is written
// as the one vpmovzxwd it is: GCC compiled the vector-extension form to two 128-bit halves and an insert.
template <int W>
RTO_INLINE typename Vec<W>::f load(const Bf16* data, int64_t i) {
  using u = typename Vec<W>::u;
  typename Vec<W>::h h;
  std::memcpy(&h, data + i, sizeof(h));
  u wide;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if constexpr (W == 8)
    asm("vpmovzxwd %1, %0" : "=x"(wide) : "xm"(h));
  else if constexpr (W == 16)
    asm("vpmovzxwd %1, %0" : "=v"(wide) : "vm"(h));
  else
    wide = __builtin_convertvector(h, u);
#else
  wide = __builtin_convertvector(h, u);
#endif
  return (typename Vec<W>::f)(wide << 16);
}

template <int W>
RTO_INLINE void store(float* data, int64_t i, typename Vec<W>::f v) {
  std::memcpy(data + i, &v, sizeof(v));
}
template <int W>
RTO_INLINE void store(Bf16* data, int64_t i, typename Vec<W>::f v) {
  // Round to nearest even, as torch's float -> bfloat16 conversion does; NaN becomes the quiet NaN 0x7fc0.
  using u = typename Vec<W>::u;
  const u bits = (u)v;
  const u rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const u result = v != v ? u{} + 0x7fc0u : rounded;
  const typename Vec<W>::h h = __builtin_convertvector(result, typename Vec<W>::h);
  std::memcpy(data + i, &h, sizeof(h));
}

RTO_INLINE void store1(float* data, int64_t i, float v) { data[i] = v; }
RTO_INLINE void store1(Bf16* data, int64_t i, float v) {
  Bf16 lanes[8];
  store<8>(lanes, 0, splat<8>(v));
  data[i] = lanes[0];
}

// a > b ? a : b per lane, b where either is NaN: maxps' rule, as that one instruction. GCC compiles the select
// form of vector extensions to a compare and a blend (two instructions), and its intrinsics cannot be inlined
// through the untargeted templates here, hence the asm. W is the lane count of the copy that inlines it (4: SSE,
// 8: AVX, 16: AVX-512); scalar and non-x86 code keep the select form.
template <int W>
RTO_INLINE typename Vec<W>::f max_ps(typename Vec<W>::f a, typename Vec<W>::f b) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  typename Vec<W>::f result;
  if constexpr (W == 4)
    asm("maxps %2, %0" : "=x"(result) : "0"(a), "xm"(b));
  else if constexpr (W == 8)
    asm("vmaxps %2, %1, %0" : "=x"(result) : "x"(a), "xm"(b));
  else
    asm("vmaxps %2, %1, %0" : "=v"(result) : "v"(a), "vm"(b));
  return result;
#else
  return a > b ? a : b;
#endif
}

// The lower end of exp_clamped's input, the floor of d = z - m and of log p. NaN is kept (max(low, x) gives x
// when x is NaN), so NaN in gives NaN out.
constexpr float kExpInputFloor = -88.0f;
template <int W>
RTO_INLINE typename Vec<W>::f clamp_exp_input(typename Vec<W>::f x) {
  return max_ps<W>(splat<W>(kExpInputFloor), x);
}
RTO_INLINE float clamp_exp_input(float x) { return kExpInputFloor > x ? kExpInputFloor : x; }

// exp(d) for d in [-88, 88] (or NaN). Exactly 0 from about -87.7 down (2^n with n = -127 is +0), so a -inf logit
// (a masked vocabulary entry, clamped to -88 first) gets p = 0 and a zero gradient. d = n ln 2 + r with n rounded by
// the 1.5 * 2^23 trick (plain adds, no SSE4.1 round); exp(r) = 1 + r + r^2 q(r) with q a cubic fitted for the
// smallest maximum relative error on |r| <= ln 2 / 2 (1.6e-7 in float32 arithmetic, about 1.4 ulp; Cephes' quintic
// q halves that error and costs 10% more time here); 2^n from the exponent bits: k = d log2(e) + 1.5 * 2^23 holds n
// in its low mantissa bits (its bits are 0x4b400000 + n), so bits(k) << 23 is n << 23 and adding 127 << 23 gives 2^n
// without a float-to-int conversion. The input range keeps n + 127 in [0, 254]: no clamp of n.
// r: the 8- and 16-lane copies run where FMA is (simd.h's AVX2 and AVX-512 attributes contract a * b + c), so
// d - n ln2 is one fused rounding; float32's ln 2 is 1.9e-9 off, which moves exp by n * 1.9e-9 relative (5e-8 where
// exp(d) > 1e-11). That one step took the forward from 0.38 to 0.34 ns per logit on one Zen 3 core. The 4-lane copy
// (SSE2, no FMA: n ln 2 would be rounded on its own) splits ln 2 in two (Cody-Waite): n times the high part is exact.
template <int W>
RTO_INLINE typename Vec<W>::f exp_clamped(typename Vec<W>::f d) {
  using f = typename Vec<W>::f;
  using u = typename Vec<W>::u;
  const f k = d * 1.44269504088896341f + 12582912.0f;
  const f n = k - 12582912.0f;
  f r;
  if constexpr (W >= 8)
    r = d - n * 0.693147180559945309f;
  else
    r = (d - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  f p = r * 8.31253e-3f + 4.189011e-2f;  // q(r)
  p = p * r + 0.16667114f;
  p = p * r + 0.49999232f;
  p = (p * r) * r + r + 1.0f;
  const u scale = (((u)k) << 23) + (127u << 23);
  return p * (f)scale;
}

RTO_INLINE float exp_clamped(float d) { return exp_clamped<4>(splat<4>(d))[0]; }

enum class Isa { kBaseline, kAvx2, kAvx512 };

// Function attributes of the AVX copies. No -ffast-math; the AVX copies contract multiply-adds into FMAs, so they can
// differ from the baseline in the last bit, and a given machine always runs the same copy.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RTO_SIMD_X86 1
#define RTO_AVX2_ATTRIBUTES __attribute__((target("avx2,fma"), optimize("fp-contract=fast")))
#define RTO_AVX512_ATTRIBUTES \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma"), optimize("fp-contract=fast")))
inline Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kBaseline;
}
// FUNCTION_avx512 / _avx2 / _baseline (defined by the including file) for the copy in use.
#define RTO_DISPATCH(ISA, FUNCTION, ...)                      \
  switch (ISA) {                                              \
    case rto_simd::Isa::kAvx512: FUNCTION##_avx512(__VA_ARGS__); break; \
    case rto_simd::Isa::kAvx2: FUNCTION##_avx2(__VA_ARGS__); break;     \
    default: FUNCTION##_baseline(__VA_ARGS__);                \
  }
// DEFINE(SUFFIX, ATTRIBUTES, WIDTH) for each copy: FUNCTION_baseline / _avx2 / _avx512 with their lane counts.
#define RTO_SIMD_COPIES(DEFINE, BASELINE_WIDTH, AVX2_WIDTH, AVX512_WIDTH) \
  DEFINE(baseline, __attribute__((noinline)), BASELINE_WIDTH)             \
  DEFINE(avx2, RTO_AVX2_ATTRIBUTES, AVX2_WIDTH)                           \
  DEFINE(avx512, RTO_AVX512_ATTRIBUTES, AVX512_WIDTH)
#else
#define RTO_SIMD_X86 0
inline Isa detect_isa() { return Isa::kBaseline; }
#define RTO_DISPATCH(ISA, FUNCTION, ...) FUNCTION##_baseline(__VA_ARGS__)
#define RTO_SIMD_COPIES(DEFINE, BASELINE_WIDTH, AVX2_WIDTH, AVX512_WIDTH) \
  DEFINE(baseline, __attribute__((noinline)), BASELINE_WIDTH)
#endif

// The copy in use: the best one the CPU has, unless set_cpu_isa chose another (tests run every copy this way).
inline std::atomic<int> g_isa{-1};

inline Isa row_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = static_cast<int>(detect_isa());
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<Isa>(isa);
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

inline std::string cpu_isa() { return isa_name(row_isa()); }

// Choose the copy by name ("baseline", "avx2", "avx512", or "best"); one this CPU cannot run raises ValueError.
inline void set_cpu_isa(const std::string& name) {
  const Isa best = detect_isa();
  Isa wanted;
  if (name == "best") wanted = best;
  else if (name == "baseline") wanted = Isa::kBaseline;
  else if (name == "avx2") wanted = Isa::kAvx2;
  else if (name == "avx512") wanted = Isa::kAvx512;
  else throw std::invalid_argument("set_cpu_isa: unknown name '" + name + "'; expected baseline, avx2, avx512 or best");
  if (static_cast<int>(wanted) > static_cast<int>(best))
    throw std::invalid_argument("set_cpu_isa: this CPU cannot run '" + name + "' (best: " + isa_name(best) + ")");
  g_isa.store(static_cast<int>(wanted), std::memory_order_relaxed);
}

}  // namespace rto_simd
