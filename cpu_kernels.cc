// CPU float32 kernels that cpu_kernels.py compiles (with paddle.utils.cpp_extension) where Paddle's own CPU kernels
// are single-threaded scalar code: softmax over the last axis (attention), GELU with the tanh approximation, and
// LayerNorm over the last axis without weight and bias; each forward and backward.
//
// Rows (elements, for GELU) are split into `threads` contiguous ranges on Paddle's OpenMP threads. Within a row the
// sums run in 16 fixed lanes (element i adds into lane i % 16), combined in a fixed order, and every operation is a
// single IEEE operation (built with -ffp-contract=off), so the result depends only on the row's values: not on the
// thread count, the tensor's address or the instruction set. exp is the Cephes single-precision polynomial
// (relative error < 4e-7), on 16-float GCC vectors.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "paddle/extension.h"

namespace {

// 16 floats; GCC lowers the arithmetic to AVX-512, two AVX2 or four SSE registers, whatever the build targets.
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline vfloat splat(float x) { return vfloat{} + x; }

// exp(x), lane by lane.
inline vfloat exp_poly(vfloat x) {
  x = x < splat(-87.33654f) ? splat(-87.33654f) : x;  // exp(-87.34) ~ 1.2e-38, the smallest normal float
  x = x > splat(88.0f) ? splat(88.0f) : x;  // exp(88) ~ 1.7e38 < FLT_MAX: 2^n stays a finite float
  const vfloat round = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vfloat n = (x * 1.44269504088896341f + round) - round;
  vfloat r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sum_lanes(vfloat v) {
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

inline vfloat lane_index() {
  vfloat v;
  for (int j = 0; j < kLanes; ++j) v[j] = static_cast<float>(j);
  return v;
}

// The last n % 16 elements of a row, zero-filled to a full vector; `valid` selects them.
inline vfloat load_tail(const float* p, int64_t count) {
  float buffer[kLanes] = {0.0f};
  std::memcpy(buffer, p, count * sizeof(float));
  return load(buffer);
}

inline void store_tail(float* p, vfloat v, int64_t count) {
  float buffer[kLanes];
  store(buffer, v);
  std::memcpy(p, buffer, count * sizeof(float));
}

void softmax_rows(const float* x, float* y, int64_t begin, int64_t end, int64_t n) {
  const int64_t full = n / kLanes * kLanes, tail = n - full;
  const vfloat valid_tail = lane_index() < splat(static_cast<float>(tail)) ? splat(1.0f) : splat(0.0f);
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * n;
    float* yr = y + row * n;
    vfloat vmax = splat(xr[0]);  // the row's maximum (exact in any order)
    for (int64_t i = 0; i < full; i += kLanes) {
      const vfloat v = load(xr + i);
      vmax = v > vmax ? v : vmax;
    }
    float m = xr[0];
    for (int j = 0; j < kLanes; ++j) m = vmax[j] > m ? vmax[j] : m;
    for (int64_t i = full; i < n; ++i) m = xr[i] > m ? xr[i] : m;
    const vfloat vm = splat(m);
    vfloat lanes = splat(0.0f);
    for (int64_t i = 0; i < full; i += kLanes) {
      const vfloat e = exp_poly(load(xr + i) - vm);
      store(yr + i, e);
      lanes += e;
    }
    vfloat e_tail = splat(0.0f);
    if (tail) {
      e_tail = exp_poly(load_tail(xr + full, tail) - vm) * valid_tail;
      lanes += e_tail;
    }
    const vfloat inv = splat(1.0f / sum_lanes(lanes));
    for (int64_t i = 0; i < full; i += kLanes) store(yr + i, load(yr + i) * inv);
    if (tail) store_tail(yr + full, e_tail * inv, tail);
  }
}

// dx = y * (dy - sum(dy * y)) per row
void softmax_grad_rows(const float* y, const float* dy, float* dx, int64_t begin, int64_t end, int64_t n) {
  const int64_t full = n / kLanes * kLanes, tail = n - full;
  for (int64_t row = begin; row < end; ++row) {
    const float* yr = y + row * n;
    const float* dyr = dy + row * n;
    float* dxr = dx + row * n;
    vfloat lanes = splat(0.0f);
    for (int64_t i = 0; i < full; i += kLanes) lanes += load(dyr + i) * load(yr + i);
    if (tail) lanes += load_tail(dyr + full, tail) * load_tail(yr + full, tail);
    const vfloat dot = splat(sum_lanes(lanes));
    for (int64_t i = 0; i < full; i += kLanes) store(dxr + i, load(yr + i) * (load(dyr + i) - dot));
    if (tail) store_tail(dxr + full, load_tail(yr + full, tail) * (load_tail(dyr + full, tail) - dot), tail);
  }
}

// GELU with the tanh approximation: 0.5 x (1 + tanh(k (x + c x^3))), and its derivative
constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluC = 0.044715f;

inline vfloat tanh_of(vfloat u) {  // (e^2u - 1) / (e^2u + 1); exp_poly clamps, so the ends give exactly -1 and 1
  const vfloat e = exp_poly(u * 2.0f);
  return (e - 1.0f) / (e + 1.0f);
}

inline vfloat gelu_tanh(vfloat x) { return x * 0.5f * (tanh_of((x + x * x * x * kGeluC) * kGeluK) + 1.0f); }

inline vfloat gelu_tanh_grad(vfloat x, vfloat dy) {
  const vfloat t = tanh_of((x + x * x * x * kGeluC) * kGeluK);
  const vfloat slope = (t + 1.0f) * 0.5f + x * 0.5f * (1.0f - t * t) * kGeluK * (x * x * (3.0f * kGeluC) + 1.0f);
  return dy * slope;
}

// Elementwise over [begin, end) of flat arrays, 16 at a time, the tail through a zero-filled buffer.
template <typename Fn>
void elementwise(const float* a, const float* b, float* out, int64_t begin, int64_t end, Fn fn) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) store(out + i, fn(load(a + i), b ? load(b + i) : vfloat{}));
  if (i < end) store_tail(out + i, fn(load_tail(a + i, end - i), b ? load_tail(b + i, end - i) : vfloat{}), end - i);
}

// LayerNorm over the last axis without weight and bias (SD3's norms): y = (x - mean) * rstd
void layer_norm_rows(const float* x, float* y, float* mean, float* rstd, float epsilon, int64_t begin, int64_t end,
                     int64_t n) {
  const int64_t full = n / kLanes * kLanes, tail = n - full;
  const vfloat valid_tail = lane_index() < splat(static_cast<float>(tail)) ? splat(1.0f) : splat(0.0f);
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * n;
    float* yr = y + row * n;
    vfloat lanes = splat(0.0f);
    for (int64_t i = 0; i < full; i += kLanes) lanes += load(xr + i);
    if (tail) lanes += load_tail(xr + full, tail);
    const float m = sum_lanes(lanes) / static_cast<float>(n);
    const vfloat vm = splat(m);
    lanes = splat(0.0f);
    for (int64_t i = 0; i < full; i += kLanes) {
      const vfloat d = load(xr + i) - vm;
      lanes += d * d;
    }
    if (tail) {
      const vfloat d = (load_tail(xr + full, tail) - vm) * valid_tail;
      lanes += d * d;
    }
    const float r = 1.0f / __builtin_sqrtf(sum_lanes(lanes) / static_cast<float>(n) + epsilon);
    const vfloat vr = splat(r);
    for (int64_t i = 0; i < full; i += kLanes) store(yr + i, (load(xr + i) - vm) * vr);
    if (tail) store_tail(yr + full, (load_tail(xr + full, tail) - vm) * vr, tail);
    mean[row] = m;
    rstd[row] = r;
  }
}

// dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)), xhat = (x - mean) * rstd
void layer_norm_grad_rows(const float* x, const float* mean, const float* rstd, const float* dy, float* dx,
                          int64_t begin, int64_t end, int64_t n) {
  const int64_t full = n / kLanes * kLanes, tail = n - full;
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * n;
    const float* dyr = dy + row * n;
    float* dxr = dx + row * n;
    const vfloat vm = splat(mean[row]), vr = splat(rstd[row]);
    vfloat sum_dy = splat(0.0f), sum_dy_xhat = splat(0.0f);
    for (int64_t i = 0; i < full; i += kLanes) {
      const vfloat g = load(dyr + i);
      sum_dy += g;
      sum_dy_xhat += g * ((load(xr + i) - vm) * vr);
    }
    if (tail) {  // zero-filled dy makes the padded lanes add nothing
      const vfloat g = load_tail(dyr + full, tail);
      sum_dy += g;
      sum_dy_xhat += g * ((load_tail(xr + full, tail) - vm) * vr);
    }
    const vfloat mean_dy = splat(sum_lanes(sum_dy) / static_cast<float>(n));
    const vfloat mean_dy_xhat = splat(sum_lanes(sum_dy_xhat) / static_cast<float>(n));
    for (int64_t i = 0; i < full; i += kLanes) {
      const vfloat xhat = (load(xr + i) - vm) * vr;
      store(dxr + i, (load(dyr + i) - mean_dy - xhat * mean_dy_xhat) * vr);
    }
    if (tail) {
      const vfloat xhat = (load_tail(xr + full, tail) - vm) * vr;
      store_tail(dxr + full, (load_tail(dyr + full, tail) - mean_dy - xhat * mean_dy_xhat) * vr, tail);
    }
  }
}

// Runs fn(begin, end) over [0, rows) in up to `threads` contiguous ranges, on the OpenMP threads of Paddle's own
// runtime (libiomp5, which MKL uses too): after a matmul those threads are awake and waiting for work, where new
// threads would have to share the cores with them.
void parallel_rows(int64_t rows, int64_t n, int64_t threads, const std::function<void(int64_t, int64_t)>& fn) {
  constexpr int64_t kMinElementsPerThread = 1 << 16;
  threads = std::max<int64_t>(1, std::min(threads, rows * n / kMinElementsPerThread));
  threads = std::min(threads, rows);
  const int64_t chunk = (rows + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t t = 0; t < threads; ++t) fn(std::min(rows, t * chunk), std::min(rows, (t + 1) * chunk));
}

void check(const paddle::Tensor& t, const char* name) {
  PD_CHECK(t.is_cpu(), "cpu_kernels: ", name, " must be a CPU tensor");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, "cpu_kernels: ", name, " must be float32");
  PD_CHECK(t.shape().size() >= 1 && t.numel() > 0, "cpu_kernels: ", name, " must be non-empty");
}

}  // namespace

std::vector<paddle::Tensor> SoftmaxForward(const paddle::Tensor& x, int64_t threads) {
  check(x, "X");
  auto out = paddle::empty_like(x);
  const int64_t n = x.shape().back();
  const float* xp = x.data<float>();
  float* yp = out.data<float>();
  parallel_rows(x.numel() / n, n, threads, [&](int64_t b, int64_t e) { softmax_rows(xp, yp, b, e, n); });
  return {out};
}

std::vector<paddle::Tensor> SoftmaxBackward(const paddle::Tensor& out, const paddle::Tensor& grad_out,
                                            int64_t threads) {
  check(out, "Out");
  check(grad_out, "Out@GRAD");
  auto grad_x = paddle::empty_like(out);
  const int64_t n = out.shape().back();
  const float* yp = out.data<float>();
  const float* dyp = grad_out.data<float>();
  float* dxp = grad_x.data<float>();
  parallel_rows(out.numel() / n, n, threads, [&](int64_t b, int64_t e) { softmax_grad_rows(yp, dyp, dxp, b, e, n); });
  return {grad_x};
}

PD_BUILD_OP(pcm_softmax)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(SoftmaxForward));

PD_BUILD_GRAD_OP(pcm_softmax)
    .Inputs({"Out", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(SoftmaxBackward));

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x, int64_t threads) {
  check(x, "X");
  auto out = paddle::empty_like(x);
  const float* xp = x.data<float>();
  float* yp = out.data<float>();
  parallel_rows(x.numel(), 1, threads, [&](int64_t b, int64_t e) {
    elementwise(xp, nullptr, yp, b, e, [](vfloat v, vfloat) { return gelu_tanh(v); });
  });
  return {out};
}

std::vector<paddle::Tensor> GeluBackward(const paddle::Tensor& x, const paddle::Tensor& grad_out, int64_t threads) {
  check(x, "X");
  check(grad_out, "Out@GRAD");
  auto grad_x = paddle::empty_like(x);
  const float* xp = x.data<float>();
  const float* dyp = grad_out.data<float>();
  float* dxp = grad_x.data<float>();
  parallel_rows(x.numel(), 1, threads, [&](int64_t b, int64_t e) {
    elementwise(xp, dyp, dxp, b, e, [](vfloat v, vfloat g) { return gelu_tanh_grad(v, g); });
  });
  return {grad_x};
}

PD_BUILD_OP(pcm_gelu_tanh)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(GeluForward));

PD_BUILD_GRAD_OP(pcm_gelu_tanh)
    .Inputs({"X", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(GeluBackward));

std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x, float epsilon, int64_t threads) {
  check(x, "X");
  const int64_t n = x.shape().back(), rows = x.numel() / n;
  auto out = paddle::empty_like(x);
  auto mean = paddle::empty({rows}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto rstd = paddle::empty({rows}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* xp = x.data<float>();
  float *yp = out.data<float>(), *mp = mean.data<float>(), *rp = rstd.data<float>();
  parallel_rows(rows, n, threads, [&](int64_t b, int64_t e) { layer_norm_rows(xp, yp, mp, rp, epsilon, b, e, n); });
  return {out, mean, rstd};
}

std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x, const paddle::Tensor& mean,
                                              const paddle::Tensor& rstd, const paddle::Tensor& grad_out,
                                              float epsilon, int64_t threads) {
  check(x, "X");
  check(grad_out, "Out@GRAD");
  const int64_t n = x.shape().back(), rows = x.numel() / n;
  auto grad_x = paddle::empty_like(x);
  const float *xp = x.data<float>(), *mp = mean.data<float>(), *rp = rstd.data<float>(), *dyp = grad_out.data<float>();
  float* dxp = grad_x.data<float>();
  parallel_rows(rows, n, threads, [&](int64_t b, int64_t e) { layer_norm_grad_rows(xp, mp, rp, dyp, dxp, b, e, n); });
  return {grad_x};
}

PD_BUILD_OP(pcm_layer_norm)
    .Inputs({"X"})
    .Outputs({"Out", "Mean", "Rstd"})
    .Attrs({"epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LayerNormForward));

PD_BUILD_GRAD_OP(pcm_layer_norm)
    .Inputs({"X", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));
