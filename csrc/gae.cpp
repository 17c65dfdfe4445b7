// CPU fast paths over raw buffers (no libtorch link); the rto_fast._C module is defined here, token_logprobs in
// logprobs.cpp. rto_fast._C.gae (generalized advantage estimation) and rto_fast._C.ppo_loss_fwd (the clipped PPO
// loss forward with its per-token gradients).
//
// The stream is flat: `segment_offsets` (int64, num_segments + 1 entries) splits it into trajectories (rows of a
// padded batch or sequences of a packed stream). A trajectory's action tokens are its True mask positions; False
// positions (prompt, padding, tool output between turns) are skipped, so the recursion of an action token reads
// the next action token of the same trajectory and starts from V = A = 0 after the last one (docs/math.md 4).
// Accumulation is in double whatever the storage type; segments run in parallel with OpenMP.
#include <pybind11/pybind11.h>

#include <algorithm>
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

template <typename scalar_t>
void gae_segments(const scalar_t* rewards, const scalar_t* values, const bool* mask,
                  const int64_t* segment_offsets, int64_t num_segments, double gamma, double lam,
                  scalar_t* advantages, scalar_t* returns) {
  const double gamma_lam = gamma * lam;
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t segment = 0; segment < num_segments; ++segment) {
    const int64_t begin = segment_offsets[segment];
    const int64_t end = segment_offsets[segment + 1];
    double next_value = 0.0;
    double next_advantage = 0.0;
    for (int64_t t = end - 1; t >= begin; --t) {
      if (!mask[t]) {  // not an action: written 0, and the recursion carries over it
        advantages[t] = scalar_t(0);
        returns[t] = scalar_t(0);
        continue;
      }
      const double value = static_cast<double>(values[t]);
      const double delta = static_cast<double>(rewards[t]) + gamma * next_value - value;
      next_advantage = delta + gamma_lam * next_advantage;
      next_value = value;
      advantages[t] = static_cast<scalar_t>(next_advantage);
      returns[t] = static_cast<scalar_t>(next_advantage + value);
    }
  }
}

// Pointers arrive as integers (tensor.data_ptr()); the Python side guarantees contiguity, dtype and sizes.
void gae(uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t segment_offsets, int64_t num_segments,
         double gamma, double lam, uintptr_t advantages, uintptr_t returns, const std::string& dtype) {
  py::gil_scoped_release release;
  const auto* offsets = reinterpret_cast<const int64_t*>(segment_offsets);
  const auto* mask_ptr = reinterpret_cast<const bool*>(mask);
  if (dtype == "float32") {
    gae_segments<float>(reinterpret_cast<const float*>(rewards), reinterpret_cast<const float*>(values), mask_ptr,
                        offsets, num_segments, gamma, lam, reinterpret_cast<float*>(advantages),
                        reinterpret_cast<float*>(returns));
  } else if (dtype == "float64") {
    gae_segments<double>(reinterpret_cast<const double*>(rewards), reinterpret_cast<const double*>(values),
                         mask_ptr, offsets, num_segments, gamma, lam, reinterpret_cast<double*>(advantages),
                         reinterpret_cast<double*>(returns));
  } else {
    throw std::invalid_argument("gae: dtype must be float32 or float64, got " + dtype);
  }
}

// max / min that return NaN when either side is NaN (torch.maximum / torch.clamp semantics; std::max and a bare
// compare-and-select drop a NaN on one side). Written with `|` so that the same code serves GCC vector types.
template <typename T>
RTO_INLINE T nan_max(T a, T b) {
  return ((a < b) | (b != b)) ? b : a;
}
template <typename T>
RTO_INLINE T nan_min(T a, T b) {
  return ((b < a) | (b != b)) ? b : a;
}

// d max(u, c): the larger branch's gradient, half of each on a tie (what torch.maximum's backward does).
template <typename T>
inline T max_branch_grad(T unclipped, T clipped, T grad_unclipped, T grad_clipped) {
  if (unclipped > clipped) return grad_unclipped;
  if (clipped > unclipped) return grad_clipped;
  return T(0.5) * (grad_unclipped + grad_clipped);
}

constexpr int64_t kPpoChunk = 4096;  // tokens per partial-sum row: fixed, so the reduction order never changes

// Everything one pass of the loss reads and writes. weight_mode: 0 = weights[0] for every token,
// 1 = weights[t / row_length], 2 = weights[t]. values == nullptr: no value loss.
template <typename scalar_t>
struct PpoArgs {
  const scalar_t *logprobs, *old_logprobs, *advantages;
  const bool* mask;
  const scalar_t *values, *old_values, *returns;
  const double* weights;
  int64_t weight_mode, row_length;
  bool whiten;
  double whiten_mean, whiten_rstd, clip_low, clip_high;
  bool clip_values;
  double value_clip, vf_coef;
  scalar_t *grad_logprobs, *grad_values, *whitened;
};

template <typename scalar_t>
RTO_INLINE double token_weight(const PpoArgs<scalar_t>& a, int64_t t) {
  return a.weight_mode == 0 ? a.weights[0] : a.weight_mode == 1 ? a.weights[t / a.row_length] : a.weights[t];
}

// One token: its gradients (already scaled by its weight) and its weighted terms added to sums (pg, vf, clipfrac,
// approx_kl, vf_clipfrac). Per-token math in the storage type (float32 like PyTorch's own), sums in double.
template <typename scalar_t>
RTO_INLINE void ppo_token(const PpoArgs<scalar_t>& a, int64_t t, double* sums) {
  if (!a.mask[t]) {
    a.grad_logprobs[t] = scalar_t(0);
    if (a.values) a.grad_values[t] = scalar_t(0);
    if (a.whiten) a.whitened[t] = scalar_t(0);
    return;
  }
  const double weight = token_weight(a, t);
  scalar_t advantage = a.advantages[t];
  if (a.whiten) {
    advantage = (advantage - scalar_t(a.whiten_mean)) * scalar_t(a.whiten_rstd);
    a.whitened[t] = advantage;
  }
  const scalar_t log_ratio = a.logprobs[t] - a.old_logprobs[t];
  const scalar_t ratio = std::exp(log_ratio);
  const scalar_t low = scalar_t(1.0 - a.clip_low), high = scalar_t(1.0 + a.clip_high);
  const scalar_t clamped = nan_min(nan_max(ratio, low), high);
  const scalar_t pg_unclipped = -advantage * ratio;
  const scalar_t pg_clipped = -advantage * clamped;
  const bool ratio_in_range = ratio >= low && ratio <= high;
  const scalar_t grad_pg =
      max_branch_grad(pg_unclipped, pg_clipped, pg_unclipped, ratio_in_range ? pg_unclipped : scalar_t(0));
  a.grad_logprobs[t] = static_cast<scalar_t>(weight * grad_pg);
  sums[0] += weight * nan_max(pg_unclipped, pg_clipped);
  sums[2] += pg_clipped > pg_unclipped ? weight : 0.0;
  sums[3] += weight * (0.5 * double(log_ratio) * double(log_ratio));
  if (a.values) {
    const scalar_t value = a.values[t];
    const scalar_t target = a.returns[t];
    scalar_t clipped_value = value;
    bool value_in_range = true;
    if (a.clip_values) {
      const scalar_t value_low = a.old_values[t] - scalar_t(a.value_clip);
      const scalar_t value_high = a.old_values[t] + scalar_t(a.value_clip);
      clipped_value = nan_min(nan_max(value, value_low), value_high);
      value_in_range = value >= value_low && value <= value_high;
    }
    const scalar_t error = value - target;
    const scalar_t clipped_error = clipped_value - target;
    const scalar_t vf_unclipped = error * error;
    const scalar_t vf_clipped = clipped_error * clipped_error;
    const scalar_t grad_vf =
        max_branch_grad(vf_unclipped, vf_clipped, error, value_in_range ? clipped_error : scalar_t(0));
    a.grad_values[t] = static_cast<scalar_t>(weight * a.vf_coef * grad_vf);
    sums[1] += weight * 0.5 * nan_max(vf_unclipped, vf_clipped);
    sums[4] += vf_clipped > vf_unclipped ? weight : 0.0;
  }
}

// W float32 tokens at once: the operations of ppo_token lane by lane (selects for its branches), except that the
// weights multiply in float32 (ppo_token: double), the terms are summed in double lanes, and exp is simd.h's
// polynomial (about 1.4 ulp against the C library's 0.5). Returns false, touching nothing, when a valid token's
// log-ratio is outside [-80, 80] (ratios near float32's range ends): the caller then runs those tokens one by one.
template <int W>
struct DoubleVec {
  typedef double d __attribute__((vector_size(8 * W)));
  typedef uint8_t b __attribute__((vector_size(W)));
};

template <int W>
RTO_INLINE void add_valid(typename DoubleVec<W>::d& sum, typename Vec<W>::i valid, typename Vec<W>::f term) {
  sum += __builtin_convertvector(valid ? term : splat<W>(0.0f), typename DoubleVec<W>::d);
}

template <int W>
RTO_INLINE bool ppo_vector(const PpoArgs<float>& a, int64_t t, typename DoubleVec<W>::d* sums) {
  using f = typename Vec<W>::f;
  using i = typename Vec<W>::i;
  typename DoubleVec<W>::b mask_bytes;
  std::memcpy(&mask_bytes, a.mask + t, W);
  const i valid = __builtin_convertvector(mask_bytes, i) != 0;  // -1 where the token counts, else 0
  const f log_ratio = load<W>(a.logprobs, t) - load<W>(a.old_logprobs, t);
  const i extreme = valid & ((80.0f < log_ratio) | (log_ratio < -80.0f));
  uint64_t words[W / 2];
  std::memcpy(words, &extreme, sizeof(words));
  uint64_t any_extreme = 0;
  for (int j = 0; j < W / 2; ++j) any_extreme |= words[j];
  if (any_extreme) return false;
  const f zero = splat<W>(0.0f);

  f weight;
  if (a.weight_mode == 0) {
    weight = splat<W>(float(a.weights[0]));
  } else {
    for (int j = 0; j < W; ++j)
      weight[j] = float(a.weight_mode == 2 ? a.weights[t + j] : a.weights[(t + j) / a.row_length]);
  }
  f advantage = load<W>(a.advantages, t);
  if (a.whiten) {
    advantage = (advantage - float(a.whiten_mean)) * float(a.whiten_rstd);
    store<W>(a.whitened, t, valid ? advantage : zero);
  }
  const f ratio = exp_clamped<W>(log_ratio);
  const f low = splat<W>(float(1.0 - a.clip_low)), high = splat<W>(float(1.0 + a.clip_high));
  const f clamped = nan_min(nan_max(ratio, low), high);
  const f pg_unclipped = -advantage * ratio;
  const f pg_clipped = -advantage * clamped;
  // In range exactly when clamping left the ratio alone (a NaN ratio is in neither, as in ppo_token). Only `<`
  // compares here: GCC turns some other float compares of 16 lanes into scalar code.
  const f grad_clipped = clamped == ratio ? pg_unclipped : zero;
  const f grad_pg = pg_clipped < pg_unclipped ? pg_unclipped
                    : pg_unclipped < pg_clipped ? grad_clipped
                                                : 0.5f * (pg_unclipped + grad_clipped);
  store<W>(a.grad_logprobs, t, valid ? weight * grad_pg : zero);
  add_valid<W>(sums[0], valid, weight * nan_max(pg_unclipped, pg_clipped));
  add_valid<W>(sums[2], valid & (pg_unclipped < pg_clipped), weight);
  add_valid<W>(sums[3], valid, weight * (0.5f * log_ratio * log_ratio));
  if (a.values) {
    const f value = load<W>(a.values, t);
    const f target = load<W>(a.returns, t);
    f clipped_value = value;
    i value_in_range = valid | ~valid;  // every lane
    if (a.clip_values) {
      const f old_value = load<W>(a.old_values, t);
      const f value_low = old_value - float(a.value_clip), value_high = old_value + float(a.value_clip);
      clipped_value = nan_min(nan_max(value, value_low), value_high);
      value_in_range = clipped_value == value;
    }
    const f error = value - target;
    const f clipped_error = clipped_value - target;
    const f vf_unclipped = error * error;
    const f vf_clipped = clipped_error * clipped_error;
    const f grad_clipped_vf = value_in_range ? clipped_error : zero;
    const f grad_vf = vf_clipped < vf_unclipped ? error
                      : vf_unclipped < vf_clipped ? grad_clipped_vf
                                                  : 0.5f * (error + grad_clipped_vf);
    store<W>(a.grad_values, t, valid ? (weight * float(a.vf_coef)) * grad_vf : zero);
    add_valid<W>(sums[1], valid, (weight * 0.5f) * nan_max(vf_unclipped, vf_clipped));
    add_valid<W>(sums[4], valid & (vf_unclipped < vf_clipped), weight);
  }
  return true;
}

// The tokens [begin, end) of one chunk, W at a time where they can be, into sums[5].
template <int W>
RTO_INLINE void ppo_span_vectorized(const PpoArgs<float>& a, int64_t begin, int64_t end, double* sums) {
  using d = typename DoubleVec<W>::d;
  d lanes[5] = {d{}, d{}, d{}, d{}, d{}};
  int64_t t = begin;
  for (; t + W <= end; t += W) {
    if (!ppo_vector<W>(a, t, lanes)) {
      for (int64_t k = t; k < t + W; ++k) ppo_token(a, k, sums);
    }
  }
  for (; t < end; ++t) ppo_token(a, t, sums);
  for (int k = 0; k < 5; ++k)
    for (int j = 0; j < W; ++j) sums[k] += lanes[k][j];
}

#define RTO_PPO_SPAN(SUFFIX, ATTRIBUTES, WIDTH)                                                                     \
  ATTRIBUTES void ppo_span_##SUFFIX(const PpoArgs<float>& a, int64_t begin, int64_t end, double* sums) {           \
    ppo_span_vectorized<WIDTH>(a, begin, end, sums);                                                               \
  }

// 4, 8 and 8 lanes (one thread, 524288 tokens with values: 2.2, 1.0 and 1.0 ms against 8.6 ms token by token). The
// AVX-512 copy keeps 8 lanes: with 16, GCC turns part of the compare-and-select code into scalar code (2.3 ms).
RTO_SIMD_COPIES(RTO_PPO_SPAN, 4, 8, 8)

// One pass over the tokens in chunks of kPpoChunk (in parallel): per chunk, its weighted sums of (pg, vf, clipfrac,
// approx_kl, vf_clipfrac) into partials[chunk * 5 + k]; per token, d loss / d logprobs and d loss / d values already
// scaled by the weights. float32 runs the vectorized copy for this CPU (simd.h); float64 the per-token loop.
template <typename scalar_t>
void ppo_chunks(const PpoArgs<scalar_t>& a, int64_t num_tokens, double* partials) {
  const int64_t num_chunks = (num_tokens + kPpoChunk - 1) / kPpoChunk;
  [[maybe_unused]] const Isa isa = row_isa();
#pragma omp parallel for schedule(static)
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    double sums[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    const int64_t begin = chunk * kPpoChunk;
    const int64_t end = std::min(num_tokens, begin + kPpoChunk);
    if constexpr (std::is_same_v<scalar_t, float>) {
      RTO_DISPATCH(isa, ppo_span, a, begin, end, sums);
    } else {
      for (int64_t t = begin; t < end; ++t) ppo_token(a, t, sums);
    }
    for (int k = 0; k < 5; ++k) partials[chunk * 5 + k] = sums[k];
  }
}

void ppo_loss_fwd(uintptr_t logprobs, uintptr_t old_logprobs, uintptr_t advantages, uintptr_t mask,
                  uintptr_t values, uintptr_t old_values, uintptr_t returns, uintptr_t weights, int64_t weight_mode,
                  int64_t row_length, int64_t num_tokens, bool whiten, double whiten_mean, double whiten_rstd,
                  double clip_low, double clip_high, bool clip_values, double value_clip, double vf_coef,
                  uintptr_t grad_logprobs, uintptr_t grad_values, uintptr_t whitened, uintptr_t partials,
                  const std::string& dtype) {
  py::gil_scoped_release release;
  const auto* mask_ptr = reinterpret_cast<const bool*>(mask);
  const auto* weights_ptr = reinterpret_cast<const double*>(weights);
  auto* partials_ptr = reinterpret_cast<double*>(partials);
  if (row_length < 1) row_length = 1;
#define RTO_PPO_CALL(T)                                                                                          \
  ppo_chunks<T>(PpoArgs<T>{reinterpret_cast<const T*>(logprobs), reinterpret_cast<const T*>(old_logprobs),      \
                           reinterpret_cast<const T*>(advantages), mask_ptr, reinterpret_cast<const T*>(values),  \
                           reinterpret_cast<const T*>(old_values), reinterpret_cast<const T*>(returns),           \
                           weights_ptr, weight_mode, row_length, whiten, whiten_mean, whiten_rstd, clip_low,     \
                           clip_high, clip_values, value_clip, vf_coef, reinterpret_cast<T*>(grad_logprobs),     \
                           reinterpret_cast<T*>(grad_values), reinterpret_cast<T*>(whitened)},                   \
                num_tokens, partials_ptr)
  if (dtype == "float32") {
    RTO_PPO_CALL(float);
  } else if (dtype == "float64") {
    RTO_PPO_CALL(double);
  } else {
    throw std::invalid_argument("ppo_loss_fwd: dtype must be float32 or float64, got " + dtype);
  }
#undef RTO_PPO_CALL
}

}  // namespace

void register_logprobs(py::module_& module);  // csrc/logprobs.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "rto_fast CPU fast paths over raw buffers";
  m.def("gae", &gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("segment_offsets"),
        py::arg("num_segments"), py::arg("gamma"), py::arg("lam"), py::arg("advantages"), py::arg("returns"),
        py::arg("dtype"),
        "Segmented reverse GAE scan over contiguous CPU buffers given as data pointers.");
  m.def("ppo_loss_fwd", &ppo_loss_fwd, py::arg("logprobs"), py::arg("old_logprobs"), py::arg("advantages"),
        py::arg("mask"), py::arg("values"), py::arg("old_values"), py::arg("returns"), py::arg("weights"),
        py::arg("weight_mode"), py::arg("row_length"), py::arg("num_tokens"), py::arg("whiten"),
        py::arg("whiten_mean"), py::arg("whiten_rstd"), py::arg("clip_low"), py::arg("clip_high"),
        py::arg("clip_values"), py::arg("value_clip"), py::arg("vf_coef"), py::arg("grad_logprobs"),
        py::arg("grad_values"), py::arg("whitened"), py::arg("partials"), py::arg("dtype"),
        "Clipped PPO loss forward over contiguous CPU buffers: per-chunk partial sums (double, 5 per chunk of "
        "4096 tokens) and per-token gradients. values == 0 means no value loss.");
  register_logprobs(m);
}
