// y [m, n] = x [m, k] (fp32) . (w [n, k] int8 * scale [n])^T for a few rows m (decode steps,
// speculative verification): int8 weight-only matmul for CPUs (models/int8_cpu.py says why).
//
// Each weight row is read and widened to fp32 once for all m rows of x. Two builds of the loop:
// AVX2 (8 lanes; the file is compiled with -mavx2 -mfma) and AVX-512 (16 lanes, enabled per
// function, so the library still loads on AVX2-only CPUs; the caller picks by `vector_bits`).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

using RowsFn = void (*)(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// AVX2: M rows of x against weight rows [lo, hi); k is a multiple of 16. Two accumulators per row
// of x, so consecutive FMAs do not wait on each other.
template <int M>
void rows256(const float* x, const int8_t* w, const float* scale, float* y, int64_t k, int64_t n, int64_t lo, int64_t hi) {
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

constexpr RowsFn kRows256[] = {rows256<1>, rows256<2>, rows256<3>, rows256<4>,
                               rows256<5>, rows256<6>, rows256<7>, rows256<8>};

#define SMELT_AVX512 __attribute__((target("avx512f")))

SMELT_AVX512 inline __m512 widen16(const int8_t* p) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// AVX-512: M rows of x against J weight rows at a time (J * M independent accumulators), weight
// rows [lo, hi) with hi - lo a multiple of J; k is a multiple of 16.
template <int M, int J>
SMELT_AVX512 void tile512(const float* x, const int8_t* w, const float* scale, float* y, int64_t k, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t j = lo; j < hi; j += J) {
    __m512 acc[J][M];
    for (int b = 0; b < J; ++b)
      for (int r = 0; r < M; ++r) acc[b][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      __m512 wv[J];
      for (int b = 0; b < J; ++b) wv[b] = widen16(w + (j + b) * k + i);
      for (int r = 0; r < M; ++r) {
        const __m512 xv = _mm512_loadu_ps(x + r * k + i);
        for (int b = 0; b < J; ++b) acc[b][r] = _mm512_fmadd_ps(xv, wv[b], acc[b][r]);
      }
    }
    for (int b = 0; b < J; ++b)
      for (int r = 0; r < M; ++r) y[r * n + j + b] = _mm512_reduce_add_ps(acc[b][r]) * scale[j + b];
  }
}

template <int M, int J>
SMELT_AVX512 void rows512(const float* x, const int8_t* w, const float* scale, float* y, int64_t k, int64_t n, int64_t lo, int64_t hi) {
  const int64_t mid = lo + (hi - lo) / J * J;
  tile512<M, J>(x, w, scale, y, k, n, lo, mid);
  tile512<M, 1>(x, w, scale, y, k, n, mid, hi);
}

// J so that J * M accumulators fit the 32 zmm registers with room for the widened weights.
constexpr RowsFn kRows512[] = {rows512<1, 4>, rows512<2, 4>, rows512<3, 2>, rows512<4, 2>,
                               rows512<5, 2>, rows512<6, 2>, rows512<7, 1>, rows512<8, 1>};


// AVX-512 VNNI: x quantized per row to int16 (`quantize_rows`), then int16 x int8 products summed
// in int32 by vpdpwssd, 32 per instruction where the fp32 loop does 16 per FMA plus the widening
// of every weight to fp32. Weights widen once to int16 for all M rows. k is a multiple of 32.
#define SMELT_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

template <int M, int J>
SMELT_VNNI void tile_vnni(const int16_t* xq, const float* xs, const int8_t* w, const float* scale, float* y, int64_t k,
                          int64_t n, int64_t lo, int64_t hi) {
  for (int64_t j = lo; j < hi; j += J) {
    __m512i acc[J][M];
    for (int b = 0; b < J; ++b)
      for (int r = 0; r < M; ++r) acc[b][r] = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 32) {
      __m512i wv[J];
      for (int b = 0; b < J; ++b)
        wv[b] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (j + b) * k + i)));
      for (int r = 0; r < M; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + r * k + i);
        for (int b = 0; b < J; ++b) acc[b][r] = _mm512_dpwssd_epi32(acc[b][r], xv, wv[b]);
      }
    }
    for (int b = 0; b < J; ++b)
      for (int r = 0; r < M; ++r)
        y[r * n + j + b] = static_cast<float>(_mm512_reduce_add_epi32(acc[b][r])) * xs[r] * scale[j + b];
  }
}

using VnniFn = void (*)(const int16_t*, const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

template <int M, int J>
SMELT_VNNI void rows_vnni(const int16_t* xq, const float* xs, const int8_t* w, const float* scale, float* y, int64_t k,
                          int64_t n, int64_t lo, int64_t hi) {
  const int64_t mid = lo + (hi - lo) / J * J;
  tile_vnni<M, J>(xq, xs, w, scale, y, k, n, lo, mid);
  tile_vnni<M, 1>(xq, xs, w, scale, y, k, n, mid, hi);
}

constexpr VnniFn kRowsVnni[] = {rows_vnni<1, 4>, rows_vnni<2, 4>, rows_vnni<3, 2>, rows_vnni<4, 2>,
                                rows_vnni<5, 2>, rows_vnni<6, 2>, rows_vnni<7, 1>, rows_vnni<8, 1>};

// The largest int16 magnitude for x such that no int32 sum of k products with int8 weights
// (|w| <= 128) can overflow; 32767 for k up to 512, 16383 at k = 1024 (still ~1e-4 of the row's max).
inline float int16_limit(int64_t k) {
  return static_cast<float>(std::min<int64_t>(32767, 2147483647LL / (128 * k)));
}

// Each row of x [m, k] as int16 with one fp32 scale: xq = round(x / s), s = max|x| / int16_limit(k).
SMELT_VNNI void quantize_rows(const float* x, int64_t m, int64_t k, int16_t* xq, float* xs) {
  const float limit = int16_limit(k);
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
    const float amax = _mm512_reduce_max_ps(mx);
    xs[r] = amax > 0 ? amax / limit : 1.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0 ? limit / amax : 0.0f);
    for (int64_t i = 0; i < k; i += 16) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + i), inv));  // round to nearest even
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + r * k + i), _mm512_cvtsepi32_epi16(q));
    }
  }
}

}  // namespace

// Whether this CPU runs the int16-activation (AVX-512 VNNI) build.
bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  return yes;
}


// x [m, k] fp32 contiguous, 1 <= m <= 8; w [n, k] int8 contiguous; scale [n] fp32; k % 16 == 0.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t vector_bits, bool int16_x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be [m, k] fp32 contiguous");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w must be [n, k] int8 contiguous");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1 && m <= 8, "1 to 8 rows, got ", m);
  TORCH_CHECK(w.size(1) == k && k % 16 == 0, "k must match and be a multiple of 16");
  TORCH_CHECK(scale.numel() == n && scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale must be [n] fp32");
  TORCH_CHECK(vector_bits == 256 || vector_bits == 512, "vector_bits is 256 (AVX2) or 512 (AVX-512), got ", vector_bits);
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  TORCH_CHECK(!int16_x || (vector_bits == 512 && has_vnni()), "int16 activations need AVX-512 VNNI (vector_bits 512)");
  if (int16_x && k % 32 == 0) {
    std::vector<int16_t> xq(m * k);
    float xs[8];
    quantize_rows(xp, m, k, xq.data(), xs);
    const VnniFn fn = kRowsVnni[m - 1];
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) { fn(xq.data(), xs, wp, sp, yp, k, n, lo, hi); });
    return y;
  }
  const RowsFn fn = (vector_bits == 512 ? kRows512 : kRows256)[m - 1];
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) { fn(xp, wp, sp, yp, k, n, lo, hi); });
  return y;
}

// smelt::int8_linear: x [..., k] @ (w [n, k] int8 * scale [n])^T -> [..., n]. A dispatcher op, so
// graphs call it as one op; more than 8 rows go 8 at a time with int16_x, else through at::mm.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t vector_bits, bool int16_x) {
  const auto flat = x.reshape({-1, x.size(-1)});
  at::Tensor y;
  if (flat.size(0) <= 8 && x.scalar_type() == at::kFloat && w.size(1) % 16 == 0) {
    y = int8_gemv(flat.contiguous(), w, scale, vector_bits, int16_x);
  } else if (int16_x && x.scalar_type() == at::kFloat && w.size(1) % 32 == 0) {
    // a prompt: 8 rows at a time, so no fp32 copy of the weights is made (one per layer per call at::mm needs)
    const auto rows = flat.contiguous();
    std::vector<at::Tensor> parts;
    for (int64_t r = 0; r < rows.size(0); r += 8)
      parts.push_back(int8_gemv(rows.slice(0, r, std::min<int64_t>(r + 8, rows.size(0))), w, scale, vector_bits, true));
    y = at::cat(parts);
  } else {
    y = at::mm(flat, w.t().to(x.scalar_type())) * scale.to(x.scalar_type());
  }
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return y.view(sizes);
}

TORCH_LIBRARY(smelt, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, int vector_bits=256, bool int16_x=False) -> Tensor");
  m.def("has_vnni() -> bool", &has_vnni);
}

TORCH_LIBRARY_IMPL(smelt, CPU, m) {
  m.impl("int8_linear", &int8_linear);
}
