// y [m, n] = x [m, k] (fp32) . (w [n, k] int8 * scale [n])^T for a few rows m (decode steps,
// speculative verification): int8 weight-only matmul for AVX2 CPUs (models/int8_cpu.py says why).
//
// Each weight row is read once for all m rows of x: 16 int8 are widened to fp32 in registers and
// multiplied into two accumulators per row of x (two, so consecutive FMAs do not wait on each other).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// M rows of x against weight rows [lo, hi); k is a multiple of 16.
template <int M>
void rows(const float* x, const int8_t* w, const float* scale, float* y, int64_t k, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t j = lo; j < hi; ++j) {
    const int8_t* row = w + j * k;
    __m256 a0[M], a1[M];
    for (int r = 0; r < M; ++r) {
      a0[r] = _mm256_setzero_ps();
      a1[r] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < k; i += 16) {
      const __m256 w0 = widen8(row + i), w1 = widen8(row + i + 8);
      for (int r = 0; r < M; ++r) {
        a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i), w0, a0[r]);
        a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + 8), w1, a1[r]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * n + j] = hsum(_mm256_add_ps(a0[r], a1[r])) * scale[j];
  }
}

using RowsFn = void (*)(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr RowsFn kRows[] = {rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>};

}  // namespace

// x [m, k] fp32 contiguous, 1 <= m <= 8; w [n, k] int8 contiguous; scale [n] fp32; k % 16 == 0.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be [m, k] fp32 contiguous");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w must be [n, k] int8 contiguous");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1 && m <= 8, "1 to 8 rows, got ", m);
  TORCH_CHECK(w.size(1) == k && k % 16 == 0, "k must match and be a multiple of 16");
  TORCH_CHECK(scale.numel() == n && scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale must be [n] fp32");
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const RowsFn fn = kRows[m - 1];
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) { fn(xp, wp, sp, yp, k, n, lo, hi); });
  return y;
}

// smelt::int8_linear: x [..., k] @ (w [n, k] int8 * scale [n])^T -> [..., n]. A dispatcher op, so
// inductor's C++ wrapper calls it without a Python frame; more than 8 rows go through at::mm.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const auto flat = x.reshape({-1, x.size(-1)});
  at::Tensor y;
  if (flat.size(0) <= 8 && x.scalar_type() == at::kFloat && w.size(1) % 16 == 0) {
    y = int8_gemv(flat.contiguous(), w, scale);
  } else {
    y = at::mm(flat, w.t().to(x.scalar_type())) * scale.to(x.scalar_type());
  }
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return y.view(sizes);
}

TORCH_LIBRARY(smelt, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(smelt, CPU, m) {
  m.impl("int8_linear", &int8_linear);
}
