// CPU fast paths over raw buffers (no libtorch link); the rto_fast._C module is defined here, token_logprobs in
// logprobs.cpp. rto_fast._C.gae (generalized advantage estimation) and rto_fast._C.ppo_loss_fwd (the clipped PPO
// loss forward with its per-token gradients).
//
// The stream is flat: `segment_offsets` (int64, num_segments + 1 entries) splits it into rows of a padded batch
// or sequences of a packed stream; a False mask position also ends a response, so every maximal run of True
// inside a segment is one response whose recursion starts from V = A = 0 after its last token (SPEC.md 4).
// Accumulation is in double whatever the storage type; segments run in parallel with OpenMP.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

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
      if (!mask[t]) {
        advantages[t] = scalar_t(0);
        returns[t] = scalar_t(0);
        next_value = 0.0;
        next_advantage = 0.0;
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

// d max(u, c): the larger branch's gradient, half of each on a tie (what torch.maximum's backward does).
template <typename T>
inline T max_branch_grad(T unclipped, T clipped, T grad_unclipped, T grad_clipped) {
  if (unclipped > clipped) return grad_unclipped;
  if (clipped > unclipped) return grad_clipped;
  return T(0.5) * (grad_unclipped + grad_clipped);
}

constexpr int64_t kPpoChunk = 4096;  // tokens per partial-sum row: fixed, so the reduction order never changes

// One pass over the tokens: per chunk, weighted sums of (pg, vf, clipfrac, approx_kl, vf_clipfrac) into
// partials[chunk * 5 + k] (double); per-token math in the storage type (float32 like PyTorch's own); per token, d loss / d logprobs and d loss / d values already scaled by the weights.
// weight_mode: 0 = weights[0] for every token, 1 = weights[t / row_length], 2 = weights[t].
template <typename scalar_t>
void ppo_chunks(const scalar_t* logprobs, const scalar_t* old_logprobs, const scalar_t* advantages,
                const bool* mask, const scalar_t* values, const scalar_t* old_values, const scalar_t* returns,
                const double* weights, int64_t weight_mode, int64_t row_length, int64_t num_tokens,
                bool whiten, double whiten_mean, double whiten_rstd, double clip_low, double clip_high,
                bool clip_values, double value_clip, double vf_coef, scalar_t* grad_logprobs,
                scalar_t* grad_values, scalar_t* whitened, double* partials) {
  const int64_t num_chunks = (num_tokens + kPpoChunk - 1) / kPpoChunk;
#pragma omp parallel for schedule(static)
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    double sums[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    const int64_t end = std::min(num_tokens, (chunk + 1) * kPpoChunk);
    for (int64_t t = chunk * kPpoChunk; t < end; ++t) {
      if (!mask[t]) {
        grad_logprobs[t] = scalar_t(0);
        if (values) grad_values[t] = scalar_t(0);
        if (whiten) whitened[t] = scalar_t(0);
        continue;
      }
      const double weight = weight_mode == 0 ? weights[0] : weight_mode == 1 ? weights[t / row_length] : weights[t];
      scalar_t advantage = static_cast<scalar_t>(advantages[t]);
      if (whiten) {
        advantage = (advantage - scalar_t(whiten_mean)) * scalar_t(whiten_rstd);
        whitened[t] = static_cast<scalar_t>(advantage);
      }
      const scalar_t log_ratio = static_cast<scalar_t>(logprobs[t]) - static_cast<scalar_t>(old_logprobs[t]);
      const scalar_t ratio = std::exp(log_ratio);
      const scalar_t clamped = std::min(std::max(ratio, scalar_t(1.0 - clip_low)), scalar_t(1.0 + clip_high));
      const scalar_t pg_unclipped = -advantage * ratio;
      const scalar_t pg_clipped = -advantage * clamped;
      const bool ratio_in_range = ratio >= scalar_t(1.0 - clip_low) && ratio <= scalar_t(1.0 + clip_high);
      const scalar_t grad_pg = max_branch_grad(pg_unclipped, pg_clipped, pg_unclipped, ratio_in_range ? pg_unclipped : scalar_t(0));
      grad_logprobs[t] = static_cast<scalar_t>(weight * grad_pg);
      sums[0] += weight * std::max(pg_unclipped, pg_clipped);
      sums[2] += pg_clipped > pg_unclipped ? weight : 0.0;
      sums[3] += weight * (0.5 * double(log_ratio) * double(log_ratio));
      if (values) {
        const scalar_t value = static_cast<scalar_t>(values[t]);
        const scalar_t old_value = static_cast<scalar_t>(old_values[t]);
        const scalar_t target = static_cast<scalar_t>(returns[t]);
        scalar_t clipped_value = value;
        bool value_in_range = true;
        if (clip_values) {
          const scalar_t low = old_value - scalar_t(value_clip);
          const scalar_t high = old_value + scalar_t(value_clip);
          clipped_value = std::min(std::max(value, low), high);
          value_in_range = value >= low && value <= high;
        }
        const scalar_t error = value - target;
        const scalar_t clipped_error = clipped_value - target;
        const scalar_t vf_unclipped = error * error;
        const scalar_t vf_clipped = clipped_error * clipped_error;
        const scalar_t grad_vf = max_branch_grad(vf_unclipped, vf_clipped, error, value_in_range ? clipped_error : scalar_t(0));
        grad_values[t] = static_cast<scalar_t>(weight * vf_coef * grad_vf);
        sums[1] += weight * 0.5 * std::max(vf_unclipped, vf_clipped);
        sums[4] += vf_clipped > vf_unclipped ? weight : 0.0;
      }
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
  ppo_chunks<T>(reinterpret_cast<const T*>(logprobs), reinterpret_cast<const T*>(old_logprobs),                  \
                reinterpret_cast<const T*>(advantages), mask_ptr, reinterpret_cast<const T*>(values),            \
                reinterpret_cast<const T*>(old_values), reinterpret_cast<const T*>(returns), weights_ptr,        \
                weight_mode, row_length, num_tokens, whiten, whiten_mean, whiten_rstd, clip_low, clip_high,      \
                clip_values, value_clip, vf_coef, reinterpret_cast<T*>(grad_logprobs),                           \
                reinterpret_cast<T*>(grad_values), reinterpret_cast<T*>(whitened), partials_ptr)
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
