// CPU generalized advantage estimation over raw buffers (no libtorch link), exposed as rto_fast._C.gae.
//
// The stream is flat: `segment_offsets` (int64, num_segments + 1 entries) splits it into rows of a padded batch
// or sequences of a packed stream; a False mask position also ends a response, so every maximal run of True
// inside a segment is one response whose recursion starts from V = A = 0 after its last token (SPEC.md 4).
// Accumulation is in double whatever the storage type; segments run in parallel with OpenMP.
#include <pybind11/pybind11.h>

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rto_fast CPU fast paths over raw buffers";
  m.def("gae", &gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("segment_offsets"),
        py::arg("num_segments"), py::arg("gamma"), py::arg("lam"), py::arg("advantages"), py::arg("returns"),
        py::arg("dtype"),
        "Segmented reverse GAE scan over contiguous CPU buffers given as data pointers.");
}
