// CPU fast path of token_logprobs over raw buffers: rto_fast._C.token_logprobs_fwd / token_logprobs_bwd.
//
// Forward, per row of logits x (V,) and z = x / temperature (computed as x * (1 / temperature)): m = max z,
// s = sum exp(z - m), t = sum exp(z - m)(z - m); log-prob = z[label] - m - log s, entropy = log s - t / s, row stats
// (m, log s) for backward. One sweep over the row with an online max: per 256-element block its max, then its sums
// while it is in L1 (2048 x 32000 fp32 on one Zen 5 core: 0.22 ns per logit, against 0.31 for a max sweep over the
// row followed by a sum sweep). Backward, per row:
// p = exp(z - m - log s), grad = (g_onehot [col == label] - p (g_lp + g_h (log p + H))) / temperature, written into
// `out`, which may be the logits buffer itself (each element is read before it is written).
//
// Why C++ rather than ATen ops: log_softmax + gather must write (or hold) the whole log-softmax, and a bf16 input
// costs a cast pass on top; here each row is read from memory once and nothing of size (N, V) is written. The loops
// use GCC / clang vector extensions (8 or 16 floats), exp is a Cody-Waite reduction with a polynomial, and sums over
// 256-element blocks go to double.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "simd.h"

namespace py = pybind11;

namespace {

using namespace rto_simd;

constexpr int64_t kBlock = 256;  // elements per block: its max, then its sums in float, which then go to double

// z = x * (1 / T), as the Triton kernels compute it (a division per logit cost 15-20% of the forward on a Zen 3 core
// at T = 0.7). `scale` is a compile-time constant in the row functions (Scale below): with a run-time flag the loops
// kept the scaling's path (2048 x 32000 fp32 forward on one Xeon core: 48.6 ms with the flag, 44.7 ms without).
template <typename V>
RTO_INLINE V scaled(V v, bool scale, float inv_temperature) {
  return scale ? v * inv_temperature : v;
}

template <int W>
RTO_INLINE float horizontal_max(typename Vec<W>::f v) {
  float best = v[0];
  for (int j = 1; j < W; ++j) best = v[j] > best ? v[j] : best;
  return best;
}

template <int W>
RTO_INLINE double horizontal_sum(typename Vec<W>::f v) {
  double sum = 0.0;
  for (int j = 0; j < W; ++j) sum += v[j];
  return sum;
}

template <int W, typename T>
RTO_INLINE float row_max(const T* x, int64_t vocab) {
  using f = typename Vec<W>::f;
  f a = splat<W>(-INFINITY), b = a;
  int64_t i = 0;
  for (; i + 2 * W <= vocab; i += 2 * W) {
    const f u = load<W>(x, i), v = load<W>(x, i + W);
    a = max_ps<W>(u, a);
    b = max_ps<W>(v, b);
  }
  float best = horizontal_max<W>(max_ps<W>(a, b));
  for (; i < vocab; ++i) best = std::max(best, load1(x, i));
  return best;
}

// The max of `count` logits; bfloat16 ones are also written to `converted` as float32, so that the sums read the
// block without converting it a second time.
template <int W>
RTO_INLINE float block_max(const float* x, int64_t count, float* /*converted*/) {
  return row_max<W>(x, count);
}
template <int W>
RTO_INLINE float block_max(const Bf16* x, int64_t count, float* converted) {
  using f = typename Vec<W>::f;
  f a = splat<W>(-INFINITY), b = a;  // two chains: one max per vector would wait on the previous one
  int64_t i = 0;
  for (; i + 2 * W <= count; i += 2 * W) {
    const f u = load<W>(x, i), v = load<W>(x, i + W);
    store<W>(converted, i, u);
    store<W>(converted, i + W, v);
    a = max_ps<W>(u, a);
    b = max_ps<W>(v, b);
  }
  for (; i + W <= count; i += W) {
    const f u = load<W>(x, i);
    store<W>(converted, i, u);
    a = max_ps<W>(u, a);
  }
  float best = horizontal_max<W>(max_ps<W>(a, b));
  for (; i < count; ++i) {
    converted[i] = load1(x, i);
    best = std::max(best, converted[i]);
  }
  return best;
}

// Asks for the cache lines of the block kPrefetchBlocks ahead while this block's exps are computed: the hardware
// prefetcher alone left float32 rows waiting on memory between blocks. Past the row's end it fetches the next row's
// start (also read next); a prefetch never faults.
constexpr int64_t kPrefetchBlocks = 4;
template <typename T>
RTO_INLINE void prefetch_block(const T* block) {
  const char* bytes = reinterpret_cast<const char*>(block);
  for (int64_t offset = 0; offset < kBlock * int64_t(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset);
}

// One row of the forward: log-prob of `label`, (m, log s) and, with Entropy, the entropy. Entropy is a compile-time
// flag: tested inside the loop, it kept the entropy accumulators in memory rather than in registers.
template <int W, bool Scale, bool Entropy, typename T>
RTO_INLINE void forward_row(const T* x, int64_t label, int64_t vocab, float inv_temperature, float* logprob,
                            float* stats, float* entropy) {
  using f = typename Vec<W>::f;
  constexpr bool scale = Scale;
  alignas(64) float converted[kBlock];
  float m = -INFINITY;
  double s = 0.0, t = 0.0;
  for (int64_t begin = 0; begin < vocab; begin += kBlock) {
    const int64_t end = std::min(vocab, begin + kBlock);
    prefetch_block(x + begin + kPrefetchBlocks * kBlock);
    // The block's max, then its sums, both while the block is in L1. A larger max rescales what is summed so far:
    // s' = c s and t' = c (t + (m - m') s) with c = exp(m - m'). max(x c) == max(x) c exactly (multiplying by
    // c = 1 / T > 0 is monotonic, and so is its rounding), so the final m is the exact max of z that backward expects.
    const float block_top = scaled(block_max<W>(x + begin, end - begin, converted), scale, inv_temperature);
    if (block_top > m) {
      if (s > 0.0) {
        const double shift = double(m) - double(block_top);
        const double c = std::exp(shift);
        t = c * (t + shift * s);
        s *= c;
      }
      m = block_top;
    }
    const float* values = std::is_same<T, float>::value ? reinterpret_cast<const float*>(x) + begin : converted;
    const int64_t count = end - begin;
    f s_a = f{}, s_b = f{}, t_a = f{}, t_b = f{};
    int64_t i = 0;
    for (; i + 2 * W <= count; i += 2 * W) {
      // The clamped d keeps 0 * -inf out of the entropy sum.
      const f d_a = clamp_exp_input<W>(scaled(load<W>(values, i), scale, inv_temperature) - m);
      const f d_b = clamp_exp_input<W>(scaled(load<W>(values, i + W), scale, inv_temperature) - m);
      const f e_a = exp_clamped<W>(d_a), e_b = exp_clamped<W>(d_b);
      s_a += e_a;
      s_b += e_b;
      if constexpr (Entropy) {
        t_a += e_a * d_a;
        t_b += e_b * d_b;
      }
    }
    double tail_s = 0.0, tail_t = 0.0;
    for (; i < count; ++i) {
      const float d = clamp_exp_input(scaled(values[i], scale, inv_temperature) - m);
      const float e = exp_clamped(d);
      tail_s += e;
      tail_t += e * d;
    }
    s += horizontal_sum<W>(s_a + s_b) + tail_s;
    if constexpr (Entropy) t += horizontal_sum<W>(t_a + t_b) + tail_t;
  }
  const double log_s = std::log(s);
  *logprob = static_cast<float>(double(scaled(load1(x, label), scale, inv_temperature) - m) - log_s);
  stats[0] = m;
  stats[1] = static_cast<float>(log_s);
  if constexpr (Entropy) *entropy = static_cast<float>(log_s - t / s);
}

// The gradient of `W` logits at x[i]: -p (g_lp + g_h (log p + H)) / T (the label's column is done separately).
template <int W, bool Scale, bool Entropy, typename T>
RTO_INLINE void backward_vector(const T* x, T* out, int64_t i, float inv_temperature, float m, float log_s, float g_h,
                                float base) {
  using f = typename Vec<W>::f;
  const f log_p = clamp_exp_input<W>((scaled(load<W>(x, i), Scale, inv_temperature) - m) - log_s);
  const f p = exp_clamped<W>(log_p);
  f grad = Entropy ? -p * (base + g_h * log_p) : -p * base;
  if (Scale) grad *= inv_temperature;
  store<W>(out, i, grad);
}

// One row of the backward: grad = (g_lp [col == label] - p (g_lp + g_h (log p + H))) / T into `out`, which may be
// the row itself (every element is read before it is written; the label's column is finished last). p = 0 wherever
// log p is clamped, so the clamp never shows in the gradient. Blocks of kBlock as in the forward, for the prefetch.
template <int W, bool Scale, bool Entropy, typename T>
RTO_INLINE void backward_row(const T* x, T* out, int64_t label, int64_t vocab, float inv_temperature, float m,
                             float log_s, float g_lp, float g_h, float entropy) {
  constexpr bool scale = Scale;
  const float base = g_lp + g_h * entropy;
  const bool has_label = label >= 0 && label < vocab;  // linear_token_logprobs: the label may be in another chunk
  float label_grad = 0.0f;
  if (has_label) {
    const float log_p = clamp_exp_input((scaled(load1(x, label), scale, inv_temperature) - m) - log_s);
    label_grad = g_lp - exp_clamped(log_p) * (Entropy ? base + g_h * log_p : base);
    if (scale) label_grad *= inv_temperature;
  }
  for (int64_t begin = 0; begin < vocab; begin += kBlock) {
    const int64_t end = std::min(vocab, begin + kBlock);
    prefetch_block(x + begin + kPrefetchBlocks * kBlock);
    int64_t i = begin;
    for (; i + 2 * W <= end; i += 2 * W) {
      backward_vector<W, Scale, Entropy>(x, out, i, inv_temperature, m, log_s, g_h, base);
      backward_vector<W, Scale, Entropy>(x, out, i + W, inv_temperature, m, log_s, g_h, base);
    }
    for (; i + W <= end; i += W) backward_vector<W, Scale, Entropy>(x, out, i, inv_temperature, m, log_s, g_h, base);
    for (; i < end; ++i) {
      const float log_p = clamp_exp_input((scaled(load1(x, i), scale, inv_temperature) - m) - log_s);
      float grad = -exp_clamped(log_p) * (Entropy ? base + g_h * log_p : base);
      if (scale) grad *= inv_temperature;
      store1(out, i, grad);
    }
  }
  if (has_label) store1(out, label, label_grad);
}

// Row functions for the three instruction sets of simd.h: the x86-64 baseline (SSE2; also what other architectures
// compile), AVX2 + FMA and AVX-512 (forward, 2048 x 32000 on 2 Zen 5 cores: 35, 12 and 7.6 ms).
#define RTO_ROW_FUNCTIONS(SUFFIX, ATTRIBUTES, WIDTH)                                                                   \
  template <typename T>                                                                                                \
  ATTRIBUTES void forward_row_##SUFFIX(const T* x, int64_t label, int64_t vocab, float inv_temperature,                \
                                       float* logprob, float* stats, float* entropy) {                                 \
    const bool scale = inv_temperature != 1.0f;                                                                        \
    if (scale && entropy)                                                                                              \
      forward_row<WIDTH, true, true>(x, label, vocab, inv_temperature, logprob, stats, entropy);                       \
    else if (scale)                                                                                                    \
      forward_row<WIDTH, true, false>(x, label, vocab, inv_temperature, logprob, stats, entropy);                      \
    else if (entropy)                                                                                                  \
      forward_row<WIDTH, false, true>(x, label, vocab, inv_temperature, logprob, stats, entropy);                      \
    else                                                                                                               \
      forward_row<WIDTH, false, false>(x, label, vocab, inv_temperature, logprob, stats, entropy);                     \
  }                                                                                                                    \
  template <typename T>                                                                                                \
  ATTRIBUTES void backward_row_##SUFFIX(const T* x, T* out, int64_t label, int64_t vocab, float inv_temperature,       \
                                        float m, float log_s, float g_lp, float g_h, float entropy,                    \
                                        bool with_entropy) {                                                           \
    const bool scale = inv_temperature != 1.0f;                                                                        \
    if (scale && with_entropy)                                                                                         \
      backward_row<WIDTH, true, true>(x, out, label, vocab, inv_temperature, m, log_s, g_lp, g_h, entropy);            \
    else if (scale)                                                                                                    \
      backward_row<WIDTH, true, false>(x, out, label, vocab, inv_temperature, m, log_s, g_lp, g_h, entropy);           \
    else if (with_entropy)                                                                                             \
      backward_row<WIDTH, false, true>(x, out, label, vocab, inv_temperature, m, log_s, g_lp, g_h, entropy);           \
    else                                                                                                               \
      backward_row<WIDTH, false, false>(x, out, label, vocab, inv_temperature, m, log_s, g_lp, g_h, entropy);          \
  }

RTO_SIMD_COPIES(RTO_ROW_FUNCTIONS, 4, 8, 16)


template <typename T>
void forward_rows(const T* logits, const int64_t* labels, int64_t n_rows, int64_t vocab, float inv_temperature,
                  int64_t ignore_index, float* logprobs, float* row_stats, float* entropy) {
  const Isa isa = row_isa();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n_rows; ++row) {
    const int64_t label = labels[row];
    float* entropy_row = entropy ? entropy + row : nullptr;
    if (label == ignore_index) {
      logprobs[row] = 0.0f;
      row_stats[2 * row] = 0.0f;
      row_stats[2 * row + 1] = 0.0f;
      if (entropy_row) *entropy_row = 0.0f;
      continue;
    }
    const T* x = logits + row * vocab;
    RTO_DISPATCH(isa, forward_row, x, label, vocab, inv_temperature, logprobs + row, row_stats + 2 * row, entropy_row);
  }
}

template <typename T>
void backward_rows(const T* logits, const int64_t* labels, const float* row_stats, const float* entropy,
                   const float* grad_logprobs, const float* grad_entropy, int64_t n_rows, int64_t vocab,
                   float inv_temperature, int64_t ignore_index, T* out) {
  const Isa isa = row_isa();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n_rows; ++row) {
    const int64_t label = labels[row];
    T* out_row = out + row * vocab;
    if (label == ignore_index) {  // exact zeros, even where an ignored row's logits are inf
      std::memset(static_cast<void*>(out_row), 0, sizeof(T) * vocab);
      continue;
    }
    const float g_lp = grad_logprobs ? grad_logprobs[row] : 0.0f;
    const float g_h = grad_entropy ? grad_entropy[row] : 0.0f;
    const float h = grad_entropy ? entropy[row] : 0.0f;
    const T* x = logits + row * vocab;
    RTO_DISPATCH(isa, backward_row, x, out_row, label, vocab, inv_temperature, row_stats[2 * row],
                 row_stats[2 * row + 1], g_lp, g_h, h, grad_entropy != nullptr);
  }
}

// Pointers arrive as integers (tensor.data_ptr()); the Python side guarantees contiguity, dtypes, sizes and labels in
// [0, V) or ignore_index. Optional buffers are 0.
void token_logprobs_fwd(uintptr_t logits, uintptr_t labels, int64_t n_rows, int64_t vocab, double temperature,
                        int64_t ignore_index, uintptr_t logprobs, uintptr_t row_stats, uintptr_t entropy,
                        const std::string& dtype) {
  py::gil_scoped_release release;
  const float inv_temperature = float(1.0 / temperature);  // z = x * (1 / T), as the Triton kernels compute it
  const auto* label_ptr = reinterpret_cast<const int64_t*>(labels);
  auto* out = reinterpret_cast<float*>(logprobs);
  auto* stats = reinterpret_cast<float*>(row_stats);
  auto* ent = reinterpret_cast<float*>(entropy);
  if (dtype == "float32") {
    forward_rows(reinterpret_cast<const float*>(logits), label_ptr, n_rows, vocab, inv_temperature, ignore_index,
                 out, stats, ent);
  } else if (dtype == "bfloat16") {
    forward_rows(reinterpret_cast<const Bf16*>(logits), label_ptr, n_rows, vocab, inv_temperature, ignore_index,
                 out, stats, ent);
  } else {
    throw std::invalid_argument("token_logprobs_fwd: dtype must be float32 or bfloat16, got " + dtype);
  }
}

void token_logprobs_bwd(uintptr_t logits, uintptr_t labels, uintptr_t row_stats, uintptr_t entropy,
                        uintptr_t grad_logprobs, uintptr_t grad_entropy, int64_t n_rows, int64_t vocab,
                        double temperature, int64_t ignore_index, uintptr_t out, const std::string& dtype) {
  py::gil_scoped_release release;
  const float inv_temperature = float(1.0 / temperature);
  const auto* label_ptr = reinterpret_cast<const int64_t*>(labels);
  const auto* stats = reinterpret_cast<const float*>(row_stats);
  const auto* ent = reinterpret_cast<const float*>(entropy);
  const auto* g_lp = reinterpret_cast<const float*>(grad_logprobs);
  const auto* g_h = reinterpret_cast<const float*>(grad_entropy);
  if (dtype == "float32") {
    backward_rows(reinterpret_cast<const float*>(logits), label_ptr, stats, ent, g_lp, g_h, n_rows, vocab,
                  inv_temperature, ignore_index, reinterpret_cast<float*>(out));
  } else if (dtype == "bfloat16") {
    backward_rows(reinterpret_cast<const Bf16*>(logits), label_ptr, stats, ent, g_lp, g_h, n_rows, vocab,
                  inv_temperature, ignore_index, reinterpret_cast<Bf16*>(out));
  } else {
    throw std::invalid_argument("token_logprobs_bwd: dtype must be float32 or bfloat16, got " + dtype);
  }
}

}  // namespace

void register_logprobs(py::module_& module) {
  module.def("token_logprobs_fwd", &token_logprobs_fwd,
             "token_logprobs forward over raw CPU buffers (float32 or bfloat16 logits, float32 outputs)");
  module.def("token_logprobs_bwd", &token_logprobs_bwd,
             "token_logprobs backward over raw CPU buffers; out may alias logits");
  module.def("cpu_isa", &cpu_isa, "Instruction set of the token_logprobs row functions in use");
  module.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
             "Use the baseline, avx2 or avx512 row functions (or the best this CPU has)");
}
