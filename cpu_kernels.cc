// CPU float32 kernels that cpu_kernels.py compiles (with paddle.utils.cpp_extension) where Paddle's own CPU kernels
// are slow: attention without its N x N matrices in memory (with MKL's sgemm), softmax over the last axis, GELU with
// the tanh approximation and LayerNorm over the last axis without weight and bias, each forward and backward; and a
// frozen linear layer's bias added in place.
//
// Rows (elements, for GELU) are split into `threads` contiguous ranges on Paddle's OpenMP threads. Within a row the
// sums run in 16 fixed lanes (element i adds into lane i % 16), combined in a fixed order, and every operation is a
// single IEEE operation (built with -ffp-contract=off), so the result depends only on the row's values: not on the
// thread count, the tensor's address or the instruction set. exp is the Cephes single-precision polynomial
// (relative error < 4e-7), on 16-float GCC vectors; results below the smallest normal float are 0 (softmax, exp).
// Attention: see its section.
#include <algorithm>
#include <cmath>
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

// exp(x), lane by lane; 0 below exp(-87.34) ~ 1.2e-38, the smallest normal float (no subnormal results: MKL's
// sgemm runs many times slower on them, e.g. after a softmax of causally masked scores).
inline vfloat exp_poly(vfloat x) {
  const vfloat underflow = x < splat(-87.33654f) ? splat(1.0f) : splat(0.0f);
  x = x < splat(-87.33654f) ? splat(-87.33654f) : x;
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
  return underflow > splat(0.0f) ? splat(0.0f) : p * scale;
}

// v, with the lanes below the smallest normal float (subnormal, for v >= 0) set to 0
inline vfloat flush_subnormal(vfloat v) { return v < splat(1.17549435e-38f) ? splat(0.0f) : v; }

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

// Softmax of rows [begin, end) of an n-column matrix (y may be x). With `lse`, also each row's log-sum-exp.
void softmax_rows(const float* x, float* y, int64_t begin, int64_t end, int64_t n, float* lse = nullptr) {
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
    const float sum = sum_lanes(lanes);
    const vfloat inv = splat(1.0f / sum);
    for (int64_t i = 0; i < full; i += kLanes) store(yr + i, flush_subnormal(load(yr + i) * inv));
    if (tail) store_tail(yr + full, flush_subnormal(e_tail * inv), tail);
    if (lse) lse[row] = m + std::log(sum);
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

// LeakyReLU as Paddle's for a slope alpha < 1: max(v, alpha v), and its gradient g * (alpha where v < 0, 1 where
// v >= 0, else 0): one IEEE operation each, so Paddle's bits.
inline vfloat leaky_relu_of(vfloat v, vfloat alpha) {
  const vfloat s = alpha * v;
  return v < s ? s : v;
}

inline vfloat leaky_relu_grad_of(vfloat v, vfloat g, vfloat alpha) {
  return g * (v < splat(0.0f) ? alpha : (v >= splat(0.0f) ? splat(1.0f) : splat(0.0f)));
}

// Elementwise over [begin, end) of flat arrays, 16 at a time, the tail through a zero-filled buffer.
template <typename Fn>
void elementwise(const float* a, const float* b, float* out, int64_t begin, int64_t end, Fn fn) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) store(out + i, fn(load(a + i), b ? load(b + i) : vfloat{}));
  if (i < end) store_tail(out + i, fn(load_tail(a + i, end - i), b ? load_tail(b + i, end - i) : vfloat{}), end - i);
}

// The mean of n floats and 1 / sqrt(their variance + epsilon), two passes in 16 lanes.
void mean_and_rstd(const float* x, int64_t n, float epsilon, float* mean, float* rstd) {
  const int64_t full = n / kLanes * kLanes, tail = n - full;
  vfloat lanes = splat(0.0f);
  for (int64_t i = 0; i < full; i += kLanes) lanes += load(x + i);
  if (tail) lanes += load_tail(x + full, tail);
  const float m = sum_lanes(lanes) / static_cast<float>(n);
  const vfloat vm = splat(m);
  lanes = splat(0.0f);
  for (int64_t i = 0; i < full; i += kLanes) {
    const vfloat d = load(x + i) - vm;
    lanes += d * d;
  }
  if (tail) {
    const vfloat valid_tail = lane_index() < splat(static_cast<float>(tail)) ? splat(1.0f) : splat(0.0f);
    const vfloat d = (load_tail(x + full, tail) - vm) * valid_tail;
    lanes += d * d;
  }
  *mean = m;
  *rstd = 1.0f / __builtin_sqrtf(sum_lanes(lanes) / static_cast<float>(n) + epsilon);
}

// LayerNorm over the last axis without weight and bias (SD3's norms): y = (x - mean) * rstd
void layer_norm_rows(const float* x, float* y, float* mean, float* rstd, float epsilon, int64_t begin, int64_t end,
                     int64_t n) {
  const int64_t full = n / kLanes * kLanes, tail = n - full;
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * n;
    float* yr = y + row * n;
    mean_and_rstd(xr, n, epsilon, mean + row, rstd + row);
    const vfloat vm = splat(mean[row]), vr = splat(rstd[row]);
    for (int64_t i = 0; i < full; i += kLanes) store(yr + i, (load(xr + i) - vm) * vr);
    if (tail) store_tail(yr + full, (load_tail(xr + full, tail) - vm) * vr, tail);
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
  if (threads == 1) return fn(0, rows);  // no OpenMP region: one of a single thread would cost MKL's next call its team
  const int64_t chunk = (rows + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t t = 0; t < threads; ++t) fn(std::min(rows, t * chunk), std::min(rows, (t + 1) * chunk));
}

#ifdef PCM_WITH_MKL
}  // namespace
extern "C" int MKL_Set_Num_Threads_Local(int threads);  // the C interface (mkl_set_num_threads_local is Fortran's)
namespace {
#endif

// Runs fn(task, scratch) for task in [0, tasks), in contiguous ranges on up to `threads` OpenMP threads (see
// parallel_rows), each range with its own buffer of `scratch_floats` floats and MKL single-threaded on its thread.
void parallel_tasks(int64_t tasks, int64_t threads, int64_t scratch_floats,
                    const std::function<void(int64_t, float*)>& fn) {
  parallel_rows(tasks, 1LL << 16, threads, [&](int64_t begin, int64_t end) {  // each task worth a thread
    std::vector<float> scratch(scratch_floats);
#ifdef PCM_WITH_MKL
    const int previous = MKL_Set_Num_Threads_Local(1);
#endif
    for (int64_t task = begin; task < end; ++task) fn(task, scratch.data());
#ifdef PCM_WITH_MKL
    MKL_Set_Num_Threads_Local(previous);
#endif
  });
}

#ifdef PCM_WITH_MKL
// Attention without the N x N matrices in memory (as PyTorch's CPU flash attention): queries in blocks of kQueryBlock
// rows, their scores, probabilities and gradients in a per-thread buffer (kQueryBlock x N: in cache), the products
// through MKL's single-threaded sgemm (Paddle's MKL) on strided views of the [batch, tokens, heads, head_dim]
// tensors, so no transposes either. Forward keeps the log-sum-exp of each row; backward recomputes the
// probabilities from it (flash attention's backward). One task per (batch, head[, query block]) on one thread, with
// MKL on that thread alone, so the result does not depend on the thread count.
}  // namespace
extern "C" {
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
}
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int64_t kQueryBlock = 64;

struct AttentionShape {
  int64_t batch, queries, keys, heads, dim;
  int64_t ld() const { return heads * dim; }  // row stride of one head's [tokens, dim] view
};

// An additive bias on the scores: [batch or 1, heads or 1, queries, keys] (a stride of 0 broadcasts).
struct ScoreBias {
  const float* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0;
};

// One query block of one head: out rows = softmax(scale * q k^T + bias) v, lse rows (if lse) = their log-sum-exp.
void attention_block(const AttentionShape& s, const float* q, const float* k, const float* v, float* out, float* lse,
                     float scale, int64_t b, int64_t h, int64_t i0, float* scores, const ScoreBias& bias = {}) {
  const int64_t m = std::min(kQueryBlock, s.queries - i0), ld = s.ld(), n = s.keys;
  const int64_t q_offset = ((b * s.queries + i0) * s.heads + h) * s.dim, kv_offset = (b * s.keys * s.heads + h) * s.dim;
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, n, s.dim, scale, q + q_offset, ld, k + kv_offset, ld, 0.0f, scores, n);
  if (bias.data) {
    const float* rows = bias.data + b * bias.batch_stride + h * bias.head_stride + i0 * n;
    for (int64_t i = 0; i < m * n; ++i) scores[i] += rows[i];
  }
  softmax_rows(scores, scores, 0, m, n, lse ? lse + (b * s.heads + h) * s.queries + i0 : nullptr);
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m, s.dim, s.keys, 1.0f, scores, s.keys, v + kv_offset, ld, 0.0f,
              out + q_offset, ld);
}

// Gradients of one head, its query blocks in order (dk and dv accumulate over them).
void attention_grad_head(const AttentionShape& s, const float* q, const float* k, const float* v, const float* out,
                         const float* lse, const float* dout, float* dq, float* dk, float* dv, float scale, int64_t b,
                         int64_t h, float* probs) {
  const int64_t ld = s.ld(), n = s.keys, full = n / kLanes * kLanes, tail = n - full;
  const int64_t kv_offset = (b * s.keys * s.heads + h) * s.dim;
  float* dprobs = probs + kQueryBlock * n;
  for (int64_t i0 = 0; i0 < s.queries; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, s.queries - i0);
    const int64_t q_offset = ((b * s.queries + i0) * s.heads + h) * s.dim;
    const float* row_lse = lse + (b * s.heads + h) * s.queries + i0;
    const float beta = i0 == 0 ? 0.0f : 1.0f;
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, n, s.dim, scale, q + q_offset, ld, k + kv_offset, ld, 0.0f, probs, n);
    for (int64_t r = 0; r < m; ++r) {  // p = exp(scale q k^T - lse)
      float* pr = probs + r * n;
      const vfloat l = splat(row_lse[r]);
      for (int64_t i = 0; i < full; i += kLanes) store(pr + i, exp_poly(load(pr + i) - l));
      if (tail) store_tail(pr + full, exp_poly(load_tail(pr + full, tail) - l), tail);
    }
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, n, s.dim, m, 1.0f, probs, n, dout + q_offset, ld, beta, dv + kv_offset,
                ld);  // dv += p^T dout
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, n, s.dim, 1.0f, dout + q_offset, ld, v + kv_offset, ld, 0.0f, dprobs,
                n);  // dp = dout v^T
    for (int64_t r = 0; r < m; ++r) {  // ds = p * (dp - rowsum(dout * out))
      const float* dor = dout + q_offset + r * ld;
      const float* outr = out + q_offset + r * ld;
      float dot = 0.0f;
      for (int64_t d = 0; d < s.dim; ++d) dot += dor[d] * outr[d];
      const vfloat vdot = splat(dot);
      float* pr = probs + r * n;
      float* dpr = dprobs + r * n;
      for (int64_t i = 0; i < full; i += kLanes) store(dpr + i, load(pr + i) * (load(dpr + i) - vdot));
      if (tail) store_tail(dpr + full, load_tail(pr + full, tail) * (load_tail(dpr + full, tail) - vdot), tail);
    }
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m, s.dim, n, scale, dprobs, n, k + kv_offset, ld, 0.0f, dq + q_offset,
                ld);  // dq = scale ds k
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, n, s.dim, m, scale, dprobs, n, q + q_offset, ld, beta, dk + kv_offset,
                ld);  // dk += scale ds^T q
  }
}
#endif  // PCM_WITH_MKL

// Direct 2-D convolution, NCHW, groups 1, dilation 1, zero padding, forward only (no-grad passes: the VAE). Paddle's
// CPU convolution unfolds the input (im2col, 9x the input for 3x3) on one thread before a GEMM: 5x slower than
// PyTorch's oneDNN one on the small channel counts of the test VAEs. Here one task is one output row of one image:
// the input rows it reads are copied once, zero-padded and split by stride phase, then for every 8 output channels
// and 16 output columns 8 vector accumulators sum over (input channel, ky, kx) in that order, then add the bias:
// the result does not depend on the thread count. Fused multiply-adds (this function only).
constexpr int64_t kConvChannels = 8;

struct ConvShape {
  int64_t batch, channels, height, width, out_channels, kh, kw, stride_h, stride_w, pad_top, pad_left;
  int64_t out_height, out_width;
  int64_t phase_width() const { return (out_width + kLanes - 1) / kLanes * kLanes + kw; }  // per stride phase
};

__attribute__((optimize("fp-contract=fast"))) void conv_row(const ConvShape& s, const float* x, const float* w_packed,
                                                             const float* bias, float* out, int64_t n, int64_t oy,
                                                             float* rows) {
  const int64_t pw = s.phase_width(), row_floats = s.stride_w * pw;
  // rows[(ic * kh + ky)]: input row oy * stride_h - pad_top + ky of channel ic, phase p at [p * pw, (p + 1) * pw):
  // phase[p][j] = padded_row[j * stride_w + p], zero outside the image
  for (int64_t ic = 0; ic < s.channels; ++ic) {
    for (int64_t ky = 0; ky < s.kh; ++ky) {
      float* r = rows + (ic * s.kh + ky) * row_floats;
      std::fill(r, r + row_floats, 0.0f);
      const int64_t iy = oy * s.stride_h - s.pad_top + ky;
      if (iy < 0 || iy >= s.height) continue;
      const float* src = x + ((n * s.channels + ic) * s.height + iy) * s.width;
      if (s.stride_w == 1) {
        std::memcpy(r + s.pad_left, src, std::min(s.width, pw - s.pad_left) * sizeof(float));
        continue;
      }
      for (int64_t phase = 0; phase < s.stride_w; ++phase) {  // padded column j * stride_w + phase
        float* dst = r + phase * pw;
        for (int64_t j = 0; j < pw; ++j) {
          const int64_t ix = j * s.stride_w + phase - s.pad_left;
          if (ix >= 0 && ix < s.width) dst[j] = src[ix];
        }
      }
    }
  }
  const int64_t taps = s.channels * s.kh * s.kw;
  for (int64_t oc0 = 0; oc0 < s.out_channels; oc0 += kConvChannels) {
    const float* wb = w_packed + oc0 / kConvChannels * taps * kConvChannels;
    const int64_t live = std::min(kConvChannels, s.out_channels - oc0);
    for (int64_t ox = 0; ox < s.out_width; ox += kLanes) {
      vfloat acc[kConvChannels];
      for (int64_t j = 0; j < kConvChannels; ++j) acc[j] = splat(0.0f);
      const float* wt = wb;
      for (int64_t ic = 0; ic < s.channels; ++ic) {
        for (int64_t ky = 0; ky < s.kh; ++ky) {
          const float* r = rows + (ic * s.kh + ky) * row_floats;
          for (int64_t kx = 0; kx < s.kw; ++kx, wt += kConvChannels) {
            const vfloat in = load(r + (kx % s.stride_w) * pw + kx / s.stride_w + ox);
            for (int64_t j = 0; j < kConvChannels; ++j) acc[j] += in * wt[j];
          }
        }
      }
      const int64_t count = std::min<int64_t>(kLanes, s.out_width - ox);
      for (int64_t j = 0; j < live; ++j) {
        const vfloat v = bias ? acc[j] + bias[oc0 + j] : acc[j];
        float* dst = out + ((n * s.out_channels + oc0 + j) * s.out_height + oy) * s.out_width + ox;
        if (count == kLanes) store(dst, v); else store_tail(dst, v, count);
      }
    }
  }
}

// GroupNorm (pcm_group_norm: forward only, optional weight and bias; pcm_affine_group_norm: with weight and bias, and
// a backward, the discriminator heads'): per (image, group) the mean and variance of its channels x
// pixels in 16 lanes, then y = (x - mean) * rstd * weight[c] + bias[c].
void group_norm_group(const float* x, const float* weight, const float* bias, float* y, int64_t channels_per_group,
                      int64_t pixels, int64_t first_channel, float epsilon, float* mean_out, float* rstd_out) {
  mean_and_rstd(x, channels_per_group * pixels, epsilon, mean_out, rstd_out);
  const vfloat vm = splat(*mean_out), vr = splat(*rstd_out);
  for (int64_t c = 0; c < channels_per_group; ++c) {
    const float w = weight ? weight[first_channel + c] : 1.0f, b = bias ? bias[first_channel + c] : 0.0f;
    const vfloat vw = splat(w), vb = splat(b);
    const int64_t offset = c * pixels;
    elementwise(x + offset, nullptr, y + offset, 0, pixels, [&](vfloat v, vfloat) { return (v - vm) * vr * vw + vb; });
  }
}

// GroupNorm's gradients for one (image, group): dx, and this image's per-channel sums for dweight (dy * xhat) and
// dbias (dy), which the caller adds over the images in order.
void group_norm_grad_group(const float* x, const float* dy, const float* weight, float mean, float rstd, float* dx,
                           float* dweight_part, float* dbias_part, int64_t channels_per_group, int64_t pixels,
                           int64_t first_channel) {
  const int64_t full = pixels / kLanes * kLanes, tail = pixels - full;
  const vfloat vm = splat(mean), vr = splat(rstd);
  vfloat sum_g = splat(0.0f), sum_g_xhat = splat(0.0f);  // of dxhat = dy * weight[c], and of dxhat * xhat
  for (int64_t c = 0; c < channels_per_group; ++c) {
    const float* xc = x + c * pixels;
    const float* gc = dy + c * pixels;
    const vfloat w = splat(weight[first_channel + c]);
    vfloat db = splat(0.0f), dw = splat(0.0f);
    for (int64_t i = 0; i < full; i += kLanes) {
      const vfloat g = load(gc + i), xhat = (load(xc + i) - vm) * vr;
      db += g;
      dw += g * xhat;
    }
    if (tail) {  // zero-filled dy: the padded lanes add nothing
      const vfloat g = load_tail(gc + full, tail), xhat = (load_tail(xc + full, tail) - vm) * vr;
      db += g;
      dw += g * xhat;
    }
    dbias_part[c] = sum_lanes(db);
    dweight_part[c] = sum_lanes(dw);
    sum_g += db * w;
    sum_g_xhat += dw * w;
  }
  const float count = static_cast<float>(channels_per_group * pixels);
  const vfloat mean_g = splat(sum_lanes(sum_g) / count), mean_g_xhat = splat(sum_lanes(sum_g_xhat) / count);
  for (int64_t c = 0; c < channels_per_group; ++c) {
    const vfloat w = splat(weight[first_channel + c]);
    const int64_t offset = c * pixels;
    elementwise(x + offset, dy + offset, dx + offset, 0, pixels, [&](vfloat xv, vfloat g) {
      return (g * w - mean_g - (xv - vm) * vr * mean_g_xhat) * vr;
    });
  }
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

// x[row, :] += bias, in place (the frozen bias of a linear layer: the same sums as Paddle's add, without the
// broadcast kernel or a new tensor).
// out[row] += bias for each of `rows` rows of n floats (Paddle's sums)
void add_bias_rows(float* out, const float* bias, int64_t rows, int64_t n, int64_t threads) {
  parallel_rows(rows, n, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      elementwise(out + row * n, bias, out + row * n, 0, n, [](vfloat a, vfloat b) { return a + b; });
    }
  });
}

void AddBiasInplace(paddle::Tensor& x, const paddle::Tensor& bias, int64_t threads) {
  check(x, "X");
  check(bias, "Bias");
  const int64_t n = bias.numel();
  PD_CHECK(x.shape().back() == n, "cpu_kernels: the bias does not match the last axis");
  add_bias_rows(x.data<float>(), bias.data<float>(), x.numel() / n, n, threads);
}

PD_BUILD_OP(pcm_add_bias_)
    .Inputs({"X", "Bias"})
    .Outputs({"Out"})
    .Attrs({"threads: int64_t"})
    .SetInplaceMap({{"X", "Out"}})
    .SetKernelFn(PD_KERNEL(AddBiasInplace));

// x * factor for x [outer, n, inner] and factor [outer, 1, inner] (the SD3 blocks' AdaLN scales and gates against
// [batch, tokens, width]) without the factor expanded first, and its gradients: dx = dy * factor, and dfactor = the sum
// over n of dy * x, added in order of n as Paddle's sum over that axis does. Single IEEE operations: Paddle's bits.
struct FactorShape {
  int64_t outer, n, inner;
};

FactorShape factor_shape(const paddle::Tensor& x, const paddle::Tensor& factor) {
  check(x, "X");
  check(factor, "Factor");
  const auto &xs = x.shape(), &fs = factor.shape();
  PD_CHECK(xs.size() == 3 && fs.size() == 3 && fs[0] == xs[0] && fs[1] == 1 && fs[2] == xs[2],
           "cpu_kernels: factor_multiply takes X [outer, n, inner] and Factor [outer, 1, inner]");
  return {xs[0], xs[1], xs[2]};
}

void multiply_by_factor(const float* x, const float* factor, float* out, const FactorShape& s, int64_t threads) {
  parallel_rows(s.outer * s.n, s.inner, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      elementwise(x + row * s.inner, factor + row / s.n * s.inner, out + row * s.inner, 0, s.inner,
                  [](vfloat a, vfloat f) { return a * f; });
    }
  });
}

std::vector<paddle::Tensor> FactorMultiplyForward(const paddle::Tensor& x, const paddle::Tensor& factor,
                                                  int64_t threads) {
  const FactorShape s = factor_shape(x, factor);
  auto out = paddle::empty_like(x);
  multiply_by_factor(x.data<float>(), factor.data<float>(), out.data<float>(), s, threads);
  return {out};
}

std::vector<paddle::Tensor> FactorMultiplyBackward(const paddle::Tensor& x, const paddle::Tensor& factor,
                                                   const paddle::Tensor& grad_out, int64_t threads) {
  const FactorShape s = factor_shape(x, factor);
  check(grad_out, "Out@GRAD");
  auto dx = paddle::empty_like(x), dfactor = paddle::empty_like(factor);
  const float *xp = x.data<float>(), *dyp = grad_out.data<float>();
  multiply_by_factor(dyp, factor.data<float>(), dx.data<float>(), s, threads);
  float* dfp = dfactor.data<float>();
  const int64_t chunks = (s.inner + kLanes - 1) / kLanes;  // 16 columns of one outer index per task
  parallel_rows(s.outer * chunks, s.n * kLanes, threads, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / chunks, c = task % chunks * kLanes, width = std::min<int64_t>(kLanes, s.inner - c);
      const float *xr = xp + o * s.n * s.inner + c, *dyr = dyp + o * s.n * s.inner + c;
      vfloat sum = splat(0.0f);
      for (int64_t r = 0; r < s.n; ++r, xr += s.inner, dyr += s.inner) {
        sum += width == kLanes ? load(dyr) * load(xr) : load_tail(dyr, width) * load_tail(xr, width);
      }
      if (width == kLanes) {
        store(dfp + o * s.inner + c, sum);
      } else {
        store_tail(dfp + o * s.inner + c, sum, width);
      }
    }
  });
  return {dx, dfactor};
}

PD_BUILD_OP(pcm_factor_multiply)
    .Inputs({"X", "Factor"})
    .Outputs({"Out"})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(FactorMultiplyForward));

PD_BUILD_GRAD_OP(pcm_factor_multiply)
    .Inputs({"X", "Factor", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Factor")})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(FactorMultiplyBackward));

#ifdef PCM_WITH_MKL
AttentionShape attention_shape(const paddle::Tensor& q, const paddle::Tensor& k, const paddle::Tensor& v) {
  check(q, "Q");
  check(k, "K");
  check(v, "V");
  PD_CHECK(q.shape().size() == 4 && k.shape() == v.shape() && k.shape().size() == 4,
           "cpu_kernels: attention takes [batch, tokens, heads, head_dim] tensors, K and V of one shape");
  PD_CHECK(q.shape()[0] == k.shape()[0] && q.shape()[2] == k.shape()[2] && q.shape()[3] == k.shape()[3],
           "cpu_kernels: Q and K differ in batch, heads or head_dim");
  return {q.shape()[0], q.shape()[1], k.shape()[1], q.shape()[2], q.shape()[3]};
}

// Every query block of every head (one task each) into `out` (and `lse`, if given).
void attention_blocks(const AttentionShape& s, const paddle::Tensor& q, const paddle::Tensor& k,
                      const paddle::Tensor& v, float* out, float* lse, float scale, int64_t threads,
                      const ScoreBias& bias = {}) {
  const float *qp = q.data<float>(), *kp = k.data<float>(), *vp = v.data<float>();
  const int64_t blocks = (s.queries + kQueryBlock - 1) / kQueryBlock;
  parallel_tasks(s.batch * s.heads * blocks, threads, kQueryBlock * s.keys, [&](int64_t task, float* scores) {
    const int64_t head = task / blocks;
    attention_block(s, qp, kp, vp, out, lse, scale, head / s.heads, head % s.heads, task % blocks * kQueryBlock,
                    scores, bias);
  });
}

std::vector<paddle::Tensor> AttentionForward(const paddle::Tensor& q, const paddle::Tensor& k, const paddle::Tensor& v,
                                             float scale, int64_t threads) {
  const AttentionShape s = attention_shape(q, k, v);
  auto out = paddle::empty_like(q);
  auto lse = paddle::empty({s.batch, s.heads, s.queries}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  attention_blocks(s, q, k, v, out.data<float>(), lse.data<float>(), scale, threads);
  return {out, lse};
}

std::vector<paddle::Tensor> AttentionBackward(const paddle::Tensor& q, const paddle::Tensor& k,
                                              const paddle::Tensor& v, const paddle::Tensor& out,
                                              const paddle::Tensor& lse, const paddle::Tensor& grad_out, float scale,
                                              int64_t threads) {
  const AttentionShape s = attention_shape(q, k, v);
  check(grad_out, "Out@GRAD");
  auto dq = paddle::empty_like(q), dk = paddle::empty_like(k), dv = paddle::empty_like(v);
  const float *qp = q.data<float>(), *kp = k.data<float>(), *vp = v.data<float>(), *op = out.data<float>();
  const float *lp = lse.data<float>(), *gp = grad_out.data<float>();
  float *dqp = dq.data<float>(), *dkp = dk.data<float>(), *dvp = dv.data<float>();
  parallel_tasks(s.batch * s.heads, threads, 2 * kQueryBlock * s.keys, [&](int64_t head, float* buffers) {
    attention_grad_head(s, qp, kp, vp, op, lp, gp, dqp, dkp, dvp, scale, head / s.heads, head % s.heads, buffers);
  });
  return {dq, dk, dv};
}

// Joint attention (the SD3 blocks'): attention over the image tokens followed by the context tokens, from their
// separate projections (q, k, v of each part: [batch, tokens_i, heads * head_dim]) into separate outputs, without the
// concatenation's and the split's copies. One task per (batch, head): its rows of both parts are gathered into
// contiguous [tokens, head_dim] matrices, run through attention_block / attention_grad_head as one head of one image,
// and scattered back: the same products as the attention over the concatenated tokens (the same bits, tested).
struct JointParts {
  int64_t batch, tokens[2], heads, dim;
  int64_t total() const { return tokens[0] + tokens[1]; }
  int64_t head_floats() const { return total() * dim; }
};

// Parts [batch, tokens, heads * head_dim] (the projections as they come: the same memory as [.., heads, head_dim]).
JointParts joint_parts(const paddle::Tensor& a, const paddle::Tensor& b, int64_t heads) {
  check(a, "the image part");
  check(b, "the context part");
  const auto &sa = a.shape(), &sb = b.shape();
  PD_CHECK(sa.size() == 3 && sb.size() == 3 && sa[0] == sb[0] && sa[2] == sb[2] && heads > 0 && sa[2] % heads == 0,
           "cpu_kernels: joint attention takes [batch, tokens, heads * head_dim] parts of one batch and width");
  return {sa[0], {sa[1], sb[1]}, heads, sa[2] / heads};
}

// Head h of image b of the two parts (tensors of the parts' shape) into `rows` [tokens, dim], or back.
void gather_head(const JointParts& p, const float* const* parts, int64_t b, int64_t h, float* rows) {
  for (int i = 0; i < 2; ++i) {
    for (int64_t t = 0; t < p.tokens[i]; ++t, rows += p.dim)
      std::memcpy(rows, parts[i] + ((b * p.tokens[i] + t) * p.heads + h) * p.dim, p.dim * sizeof(float));
  }
}

void scatter_head(const JointParts& p, const float* rows, int64_t b, int64_t h, float* const* parts) {
  for (int i = 0; i < 2; ++i) {
    for (int64_t t = 0; t < p.tokens[i]; ++t, rows += p.dim)
      std::memcpy(parts[i] + ((b * p.tokens[i] + t) * p.heads + h) * p.dim, rows, p.dim * sizeof(float));
  }
}

std::vector<paddle::Tensor> JointAttentionForward(const paddle::Tensor& q1, const paddle::Tensor& k1,
                                                  const paddle::Tensor& v1, const paddle::Tensor& q2,
                                                  const paddle::Tensor& k2, const paddle::Tensor& v2, int64_t heads,
                                                  float scale, int64_t threads) {
  const JointParts p = joint_parts(q1, q2, heads);
  const JointParts kp = joint_parts(k1, k2, heads), vp = joint_parts(v1, v2, heads);
  PD_CHECK(kp.tokens[0] == p.tokens[0] && kp.tokens[1] == p.tokens[1] && vp.tokens[0] == p.tokens[0] &&
               vp.tokens[1] == p.tokens[1] && kp.heads == p.heads && vp.heads == p.heads && kp.dim == p.dim &&
               vp.dim == p.dim,
           "cpu_kernels: joint attention's q, k and v parts differ in shape");
  auto out1 = paddle::empty_like(q1), out2 = paddle::empty_like(q2);
  auto lse = paddle::empty({p.batch, p.heads, p.total()}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* q[2] = {q1.data<float>(), q2.data<float>()};
  const float* k[2] = {k1.data<float>(), k2.data<float>()};
  const float* v[2] = {v1.data<float>(), v2.data<float>()};
  float* out[2] = {out1.data<float>(), out2.data<float>()};
  float* lp = lse.data<float>();
  const int64_t n = p.total(), f = p.head_floats();
  const AttentionShape head{1, n, n, 1, p.dim};
  parallel_tasks(p.batch * p.heads, threads, 4 * f + kQueryBlock * n, [&](int64_t task, float* buffers) {
    const int64_t b = task / p.heads, h = task % p.heads;
    float *qh = buffers, *kh = qh + f, *vh = kh + f, *oh = vh + f, *scores = oh + f;
    gather_head(p, q, b, h, qh);
    gather_head(p, k, b, h, kh);
    gather_head(p, v, b, h, vh);
    for (int64_t i0 = 0; i0 < n; i0 += kQueryBlock)
      attention_block(head, qh, kh, vh, oh, lp + task * n, scale, 0, 0, i0, scores);
    scatter_head(p, oh, b, h, out);
  });
  return {out1, out2, lse};
}

// An output's gradient, or zeros where none flows (the context output of SD3's last block, which drops it).
paddle::Tensor gradient_or_zeros(const paddle::Tensor& grad, const paddle::Tensor& like) {
  if (grad.initialized()) {
    check(grad, "an output's gradient");
    return grad;
  }
  auto zeros = paddle::empty_like(like);
  std::memset(zeros.data<float>(), 0, zeros.numel() * sizeof(float));
  return zeros;
}

std::vector<paddle::Tensor> JointAttentionBackward(
    const paddle::Tensor& q1, const paddle::Tensor& k1, const paddle::Tensor& v1, const paddle::Tensor& q2,
    const paddle::Tensor& k2, const paddle::Tensor& v2, const paddle::Tensor& out1, const paddle::Tensor& out2,
    const paddle::Tensor& lse, const paddle::Tensor& grad_out1, const paddle::Tensor& grad_out2, int64_t heads,
    float scale, int64_t threads) {
  const JointParts p = joint_parts(q1, q2, heads);
  const paddle::Tensor g1 = gradient_or_zeros(grad_out1, out1), g2 = gradient_or_zeros(grad_out2, out2);
  std::vector<paddle::Tensor> grads;
  for (const auto* t : {&q1, &k1, &v1, &q2, &k2, &v2}) grads.push_back(paddle::empty_like(*t));
  const float* q[2] = {q1.data<float>(), q2.data<float>()};
  const float* k[2] = {k1.data<float>(), k2.data<float>()};
  const float* v[2] = {v1.data<float>(), v2.data<float>()};
  const float* o[2] = {out1.data<float>(), out2.data<float>()};
  const float* g[2] = {g1.data<float>(), g2.data<float>()};
  float* dq[2] = {grads[0].data<float>(), grads[3].data<float>()};
  float* dk[2] = {grads[1].data<float>(), grads[4].data<float>()};
  float* dv[2] = {grads[2].data<float>(), grads[5].data<float>()};
  const float* lp = lse.data<float>();
  const int64_t n = p.total(), f = p.head_floats();
  const AttentionShape head{1, n, n, 1, p.dim};
  parallel_tasks(p.batch * p.heads, threads, 8 * f + 2 * kQueryBlock * n, [&](int64_t task, float* buffers) {
    const int64_t b = task / p.heads, h = task % p.heads;
    float *qh = buffers, *kh = qh + f, *vh = kh + f, *oh = vh + f, *gh = oh + f;
    float *dqh = gh + f, *dkh = dqh + f, *dvh = dkh + f, *probs = dvh + f;
    gather_head(p, q, b, h, qh);
    gather_head(p, k, b, h, kh);
    gather_head(p, v, b, h, vh);
    gather_head(p, o, b, h, oh);
    gather_head(p, g, b, h, gh);
    attention_grad_head(head, qh, kh, vh, oh, lp + task * n, gh, dqh, dkh, dvh, scale, 0, 0, probs);
    scatter_head(p, dqh, b, h, dq);
    scatter_head(p, dkh, b, h, dk);
    scatter_head(p, dvh, b, h, dv);
  });
  return grads;
}

// Forward only (no-grad passes: the text encoders' attention with its causal mask or position bias).
std::vector<paddle::Tensor> AttentionWithBias(const paddle::Tensor& q, const paddle::Tensor& k, const paddle::Tensor& v,
                                              const paddle::Tensor& bias, float scale, int64_t threads) {
  const AttentionShape s = attention_shape(q, k, v);
  check(bias, "Bias");
  const auto& shape = bias.shape();
  PD_CHECK(shape.size() == 4 && (shape[0] == 1 || shape[0] == s.batch) && (shape[1] == 1 || shape[1] == s.heads) &&
               shape[2] == s.queries && shape[3] == s.keys,
           "cpu_kernels: the attention bias must be [batch or 1, heads or 1, queries, keys]");
  const int64_t rows = s.queries * s.keys;
  const ScoreBias score_bias{bias.data<float>(), shape[0] == 1 ? 0 : shape[1] * rows, shape[1] == 1 ? 0 : rows};
  auto out = paddle::empty_like(q);
  attention_blocks(s, q, k, v, out.data<float>(), nullptr, scale, threads, score_bias);
  return {out};
}

// The gated residual x + gate[b] * y of the SD3 blocks (x, y [B, N, D], gate [B, D]), forward only (no-grad passes):
// Paddle's multiply and add, one IEEE operation each (their bits), as one call on the threads.
std::vector<paddle::Tensor> GatedResidual(const paddle::Tensor& x, const paddle::Tensor& gate, const paddle::Tensor& y,
                                          int64_t threads) {
  check(x, "X");
  check(gate, "Gate");
  check(y, "Y");
  const auto& xs = x.shape();
  PD_CHECK(xs.size() == 3 && y.shape() == xs && gate.shape() == std::vector<int64_t>({xs[0], xs[2]}),
           "cpu_kernels: gated_residual takes X and Y [B, N, D] and Gate [B, D]");
  const int64_t tokens = xs[1], n = xs[2];
  auto out = paddle::empty_like(x);
  const float *xp = x.data<float>(), *gp = gate.data<float>(), *yp = y.data<float>();
  float* op = out.data<float>();
  parallel_rows(xs[0] * tokens, n, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float *xr = xp + row * n, *yr = yp + row * n, *gr = gp + row / tokens * n;
      float* outr = op + row * n;
      for (int64_t i = 0; i < n; ++i) outr[i] = xr[i] + yr[i] * gr[i];
    }
  });
  return {out};
}

PD_BUILD_OP(pcm_gated_residual)
    .Inputs({"X", "Gate", "Y"})
    .Outputs({"Out"})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(GatedResidual));

// adaLN modulation of a LayerNorm without weight and bias: y = LN(x) * (1 + scale[b]) + shift[b] for x [B, N, D],
// scale and shift [B, D]: the LayerNorm kernel's rows, then Paddle's scale (1 + s), multiply and add, one IEEE
// operation each: the bits of those four ops, as one call.
struct ModulateShape {
  int64_t tokens, n, rows;
};

ModulateShape modulate_shape(const paddle::Tensor& x, const paddle::Tensor& scale, const paddle::Tensor& shift) {
  check(x, "X");
  check(scale, "Scale");
  check(shift, "Shift");
  const auto& xs = x.shape();
  PD_CHECK(xs.size() == 3 && scale.shape() == std::vector<int64_t>({xs[0], xs[2]}) && shift.shape() == scale.shape(),
           "cpu_kernels: layer_norm_modulate takes X [B, N, D], Scale and Shift [B, D]");
  return {xs[1], xs[2], xs[0] * xs[1]};
}

// The normalized rows into `normed` (may be `out`), their mean and 1/std, the modulated rows into `out`.
void layer_norm_modulate_rows(const ModulateShape& s, const paddle::Tensor& x, const paddle::Tensor& scale,
                              const paddle::Tensor& shift, float epsilon, int64_t threads, float* normed, float* out,
                              float* mean, float* rstd) {
  const float *xp = x.data<float>(), *sp = scale.data<float>(), *hp = shift.data<float>();
  parallel_rows(s.rows, s.n, threads, [&](int64_t begin, int64_t end) {
    layer_norm_rows(xp, normed, mean, rstd, epsilon, begin, end, s.n);
    for (int64_t row = begin; row < end; ++row) {
      const float *sr = sp + row / s.tokens * s.n, *hr = hp + row / s.tokens * s.n, *yr = normed + row * s.n;
      float* outr = out + row * s.n;
      for (int64_t i = 0; i < s.n; ++i) outr[i] = yr[i] * (sr[i] * 1.0f + 1.0f) + hr[i];
    }
  });
}

// Forward only (no-grad passes).
std::vector<paddle::Tensor> LayerNormModulate(const paddle::Tensor& x, const paddle::Tensor& scale,
                                              const paddle::Tensor& shift, float epsilon, int64_t threads) {
  const ModulateShape s = modulate_shape(x, scale, shift);
  auto out = paddle::empty_like(x);
  std::vector<float> mean(s.rows), rstd(s.rows);
  layer_norm_modulate_rows(s, x, scale, shift, epsilon, threads, out.data<float>(), out.data<float>(), mean.data(),
                           rstd.data());
  return {out};
}

PD_BUILD_OP(pcm_layer_norm_modulate)
    .Inputs({"X", "Scale", "Shift"})
    .Outputs({"Out"})
    .Attrs({"epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LayerNormModulate));

// The same with gradients, keeping what the separate ops keep: the LayerNorm's input, mean and 1/std, the scale
// (as the multiply keeps 1 + scale) and, where the scale trains, the normalized rows (as the multiply keeps its other
// input). Backward: the shift's gradient is the sum over N of dy, the scale's the sum over N of dy * normed (in order
// of N, as Paddle's sums), the LayerNorm's backward runs on dy * (1 + scale): the separate ops' bits.
std::vector<paddle::Tensor> LayerNormModulateWithStats(const paddle::Tensor& x, const paddle::Tensor& scale,
                                                       const paddle::Tensor& shift, float epsilon, int64_t threads) {
  const ModulateShape s = modulate_shape(x, scale, shift);
  auto out = paddle::empty_like(x), normed = paddle::empty_like(x);
  auto mean = paddle::empty({s.rows}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto rstd = paddle::empty({s.rows}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  layer_norm_modulate_rows(s, x, scale, shift, epsilon, threads, normed.data<float>(), out.data<float>(),
                           mean.data<float>(), rstd.data<float>());
  return {out, normed, mean, rstd};
}

// dx (and, with `normed`, dscale and dshift) of LayerNormModulateWithStats.
std::vector<paddle::Tensor> layer_norm_modulate_grads(const paddle::Tensor& x, const float* normed,
                                                      const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                                      const paddle::Tensor& scale, const paddle::Tensor& grad_out,
                                                      int64_t threads) {
  check(grad_out, "Out@GRAD");
  const auto& xs = x.shape();
  const int64_t batch = xs[0], tokens = xs[1], n = xs[2], rows = batch * tokens;
  auto dx = paddle::empty_like(x);
  std::vector<float> dnormed(rows * n);
  const float *xp = x.data<float>(), *sp = scale.data<float>(), *gp = grad_out.data<float>();
  parallel_rows(rows, n, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // the multiply's backward: dy * (1 + scale)
      const float *sr = sp + row / tokens * n, *gr = gp + row * n;
      float* dr = dnormed.data() + row * n;
      for (int64_t i = 0; i < n; ++i) dr[i] = gr[i] * (sr[i] * 1.0f + 1.0f);
    }
    layer_norm_grad_rows(xp, mean.data<float>(), rstd.data<float>(), dnormed.data(), dx.data<float>(), begin, end, n);
  });
  if (!normed) return {dx};
  auto dscale = paddle::empty_like(scale), dshift = paddle::empty_like(scale);
  float *dsp = dscale.data<float>(), *dhp = dshift.data<float>();
  parallel_rows(batch, tokens * n, threads, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {  // sums over the tokens, in order
      float *ds = dsp + b * n, *dh = dhp + b * n;
      std::fill(ds, ds + n, 0.0f);
      std::fill(dh, dh + n, 0.0f);
      for (int64_t t = 0; t < tokens; ++t) {
        const float *gr = gp + (b * tokens + t) * n, *yr = normed + (b * tokens + t) * n;
        for (int64_t i = 0; i < n; ++i) {
          ds[i] += gr[i] * yr[i];
          dh[i] += gr[i];
        }
      }
    }
  });
  return {dx, dscale, dshift};
}

std::vector<paddle::Tensor> LayerNormModulateBackward(const paddle::Tensor& x, const paddle::Tensor& normed,
                                                      const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                                      const paddle::Tensor& scale, const paddle::Tensor& grad_out,
                                                      float epsilon, int64_t threads) {
  return layer_norm_modulate_grads(x, normed.data<float>(), mean, rstd, scale, grad_out, threads);
}

std::vector<paddle::Tensor> LayerNormFrozenModulateBackward(const paddle::Tensor& x, const paddle::Tensor& mean,
                                                            const paddle::Tensor& rstd, const paddle::Tensor& scale,
                                                            const paddle::Tensor& grad_out, float epsilon,
                                                            int64_t threads) {
  return layer_norm_modulate_grads(x, nullptr, mean, rstd, scale, grad_out, threads);
}

// A scale and shift that train (the student's AdaLN, through its LoRA): gradients for all three inputs.
PD_BUILD_OP(pcm_layer_norm_modulate_trained)
    .Inputs({"X", "Scale", "Shift"})
    .Outputs({"Out", "Normed", "Mean", "Rstd"})
    .Attrs({"epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LayerNormModulateWithStats));

PD_BUILD_GRAD_OP(pcm_layer_norm_modulate_trained)
    .Inputs({"X", "Normed", "Mean", "Rstd", "Scale", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Shift")})
    .Attrs({"epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LayerNormModulateBackward));

// A frozen scale and shift (the teacher as discriminator backbone): the gradient of X only.
PD_BUILD_OP(pcm_layer_norm_modulate_frozen)
    .Inputs({"X", "Scale", "Shift"})
    .Outputs({"Out", "Normed", "Mean", "Rstd"})
    .Attrs({"epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LayerNormModulateWithStats));

PD_BUILD_GRAD_OP(pcm_layer_norm_modulate_frozen)
    .Inputs({"X", "Mean", "Rstd", "Scale", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LayerNormFrozenModulateBackward));

// A no-grad Linear, x @ W (+ b) (+ ((x @ A) @ B) * scale for a LoRA layer), as one op: the products through the
// sgemm call Paddle's matmul makes for a [..., K] x [K, N] product (rows folded, no transposes), the bias and the
// scaled LoRA term added as Paddle's add and scale ops add them: Paddle's bits (tested), without five op calls.
// With `h`, also h = x @ A into it (rows x r floats; the LoRA op with gradients keeps it).
paddle::Tensor linear_product(const paddle::Tensor& x, const paddle::Tensor& weight,
                              const paddle::optional<paddle::Tensor>& bias,
                              const paddle::optional<paddle::Tensor>& lora_a,
                              const paddle::optional<paddle::Tensor>& lora_b, float scale, int64_t threads,
                              float* h = nullptr) {
  check(x, "X");
  check(weight, "Weight");
  const auto& ws = weight.shape();
  const int64_t k = ws[0], n = ws[1], rows = x.numel() / k;
  PD_CHECK(ws.size() == 2 && x.shape().back() == k, "cpu_kernels: linear takes X [..., K] and Weight [K, N]");
  std::vector<int64_t> out_shape = x.shape();
  out_shape.back() = n;
  auto out = paddle::empty(out_shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
  float* op = out.data<float>();
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, rows, n, k, 1.0f, x.data<float>(), k, weight.data<float>(), n, 0.0f, op,
              n);
  if (bias) {
    check(*bias, "Bias");
    PD_CHECK(bias->numel() == n, "cpu_kernels: linear's bias must have N elements");
    add_bias_rows(op, bias->data<float>(), rows, n, threads);
  }
  if (lora_a) {
    PD_CHECK(lora_b, "cpu_kernels: linear takes LoRA A and B together");
    const int64_t r = lora_a->shape()[1];
    PD_CHECK(lora_a->shape()[0] == k && lora_b->shape()[0] == r && lora_b->shape()[1] == n,
             "cpu_kernels: linear's LoRA A must be [K, r] and B [r, N]");
    std::vector<float> own_h(h ? 0 : rows * r), branch(rows * n);
    if (!h) h = own_h.data();
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, rows, r, k, 1.0f, x.data<float>(), k, lora_a->data<float>(), r, 0.0f, h,
                r);
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, rows, n, r, 1.0f, h, r, lora_b->data<float>(), n, 0.0f, branch.data(),
                n);
    const float* tp = branch.data();
    parallel_rows(rows, n, threads, [&](int64_t begin, int64_t end) {
      elementwise(op, tp, op, begin * n, end * n, [scale](vfloat a, vfloat t) { return a + (t * scale + 0.0f); });
    });
  }
  return out;
}

std::vector<paddle::Tensor> LinearNoGrad(const paddle::Tensor& x, const paddle::Tensor& weight,
                                         const paddle::optional<paddle::Tensor>& bias,
                                         const paddle::optional<paddle::Tensor>& lora_a,
                                         const paddle::optional<paddle::Tensor>& lora_b, float scale, int64_t threads) {
  return {linear_product(x, weight, bias, lora_a, lora_b, scale, threads)};
}

PD_BUILD_OP(pcm_linear)
    .Inputs({"X", "Weight", paddle::Optional("Bias"), paddle::Optional("LoraA"), paddle::Optional("LoraB")})
    .Outputs({"Out"})
    .Attrs({"scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LinearNoGrad));

// A frozen Linear with gradients where only its input needs one, as one op each way (frozen_linear's CPU float32
// path): forward is LinearNoGrad's; backward dx = dout @ W^T by the sgemm call Paddle's matmul makes. Keeps only W.
std::vector<paddle::Tensor> FrozenLinearForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                const paddle::optional<paddle::Tensor>& bias, int64_t threads) {
  return {linear_product(x, weight, bias, paddle::none, paddle::none, 1.0f, threads)};
}

// dx = dout @ W^T for dout [..., N] and W [K, N] (rows folded): the sgemm call of Paddle's matmul with transpose_y.
paddle::Tensor input_gradient(const paddle::Tensor& grad_out, const paddle::Tensor& weight) {
  const int64_t k = weight.shape()[0], n = weight.shape()[1], rows = grad_out.numel() / n;
  std::vector<int64_t> shape = grad_out.shape();
  shape.back() = k;
  auto dx = paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, rows, k, n, 1.0f, grad_out.data<float>(), n, weight.data<float>(), n, 0.0f,
              dx.data<float>(), k);
  return dx;
}

std::vector<paddle::Tensor> FrozenLinearBackward(const paddle::Tensor& weight, const paddle::Tensor& grad_out,
                                                 int64_t threads) {
  check(grad_out, "Out@GRAD");
  return {input_gradient(grad_out, weight)};
}

PD_BUILD_OP(pcm_frozen_linear)
    .Inputs({"X", "Weight", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(FrozenLinearForward));

PD_BUILD_GRAD_OP(pcm_frozen_linear)
    .Inputs({"Weight", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(FrozenLinearBackward));

// A LoRA Linear with a frozen base and a trained adapter, x @ W + b + ((x @ A) @ B) * scale, as one op each way
// (frozen_linear.LoraLinear's ops): forward is LinearNoGrad's, also returning h = x @ A, which backward needs with x.
// Backward: g = dout * scale (Paddle's scale op), dB = h^T g, dh = g B^T, dA = (dh^T x)^T, and, where the input needs
// one (pcm_lora_linear; else pcm_lora_adapter_linear), dx = dout W^T + dh A^T: the sgemm calls and sums of
// LoraLinear's Paddle ops.
std::vector<paddle::Tensor> LoraLinearForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                              const paddle::optional<paddle::Tensor>& bias,
                                              const paddle::Tensor& lora_a, const paddle::Tensor& lora_b, float scale,
                                              int64_t threads) {
  const int64_t k = weight.shape()[0], r = lora_a.shape()[1], rows = x.numel() / k;
  auto h = paddle::empty({rows, r}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  return {linear_product(x, weight, bias, lora_a, lora_b, scale, threads, h.data<float>()), h};
}

// dA and dB, then (with input_grad) dx.
std::vector<paddle::Tensor> lora_gradients(const paddle::Tensor& x, const paddle::Tensor& weight,
                                           const paddle::Tensor& lora_a, const paddle::Tensor& lora_b,
                                           const paddle::Tensor& h, const paddle::Tensor& grad_out, float scale,
                                           bool input_grad, int64_t threads) {
  check(grad_out, "Out@GRAD");
  const int64_t k = weight.shape()[0], n = weight.shape()[1], r = lora_a.shape()[1], rows = x.numel() / k;
  std::vector<float> g(rows * n), dh(rows * r), da_t(r * k);
  const float* gp = grad_out.data<float>();
  float* sp = g.data();
  parallel_rows(rows, n, threads, [&](int64_t begin, int64_t end) {
    elementwise(gp, nullptr, sp, begin * n, end * n, [scale](vfloat v, vfloat) { return v * scale + 0.0f; });
  });
  auto db = paddle::empty({r, n}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto da = paddle::empty({k, r}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  cblas_sgemm(kRowMajor, kTrans, kNoTrans, r, n, rows, 1.0f, h.data<float>(), r, sp, n, 0.0f, db.data<float>(), n);
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, rows, r, n, 1.0f, sp, n, lora_b.data<float>(), n, 0.0f, dh.data(), r);
  // dA = x^T dh as (dh^T x)^T: MKL's [r, rows] x [rows, K] product is 2-3x faster than one with r outputs
  cblas_sgemm(kRowMajor, kTrans, kNoTrans, r, k, rows, 1.0f, dh.data(), r, x.data<float>(), k, 0.0f, da_t.data(), k);
  float* dap = da.data<float>();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < r; ++j) dap[i * r + j] = da_t[j * k + i];
  if (!input_grad) return {da, db};
  auto dx = input_gradient(grad_out, weight);
  std::vector<float> branch(rows * k);
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, rows, k, r, 1.0f, dh.data(), r, lora_a.data<float>(), r, 0.0f,
              branch.data(), k);
  float* dxp = dx.data<float>();
  const float* bp = branch.data();
  parallel_rows(rows, k, threads, [&](int64_t begin, int64_t end) {
    elementwise(dxp, bp, dxp, begin * k, end * k, [](vfloat a, vfloat b) { return a + b; });
  });
  return {dx, da, db};
}

std::vector<paddle::Tensor> LoraLinearBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                               const paddle::Tensor& lora_a, const paddle::Tensor& lora_b,
                                               const paddle::Tensor& h, const paddle::Tensor& grad_out, float scale,
                                               int64_t threads) {
  return lora_gradients(x, weight, lora_a, lora_b, h, grad_out, scale, true, threads);
}

std::vector<paddle::Tensor> LoraAdapterBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                const paddle::Tensor& lora_a, const paddle::Tensor& lora_b,
                                                const paddle::Tensor& h, const paddle::Tensor& grad_out, float scale,
                                                int64_t threads) {
  return lora_gradients(x, weight, lora_a, lora_b, h, grad_out, scale, false, threads);
}

PD_BUILD_OP(pcm_lora_linear)
    .Inputs({"X", "Weight", paddle::Optional("Bias"), "LoraA", "LoraB"})
    .Outputs({"Out", "H"})
    .Attrs({"scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LoraLinearForward));

PD_BUILD_GRAD_OP(pcm_lora_linear)
    .Inputs({"X", "Weight", "LoraA", "LoraB", "H", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("LoraA"), paddle::Grad("LoraB")})
    .Attrs({"scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LoraLinearBackward));

// The same where the input needs no gradient (the student's embedders: context, pooled text, timestep): the
// adapter's gradients only.
PD_BUILD_OP(pcm_lora_adapter_linear)
    .Inputs({"X", "Weight", paddle::Optional("Bias"), "LoraA", "LoraB"})
    .Outputs({"Out", "H"})
    .Attrs({"scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LoraLinearForward));

PD_BUILD_GRAD_OP(pcm_lora_adapter_linear)
    .Inputs({"X", "Weight", "LoraA", "LoraB", "H", paddle::Grad("Out")})
    .Outputs({paddle::Grad("LoraA"), paddle::Grad("LoraB")})
    .Attrs({"scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(LoraAdapterBackward));

PD_BUILD_OP(pcm_attention_with_bias)
    .Inputs({"Q", "K", "V", "Bias"})
    .Outputs({"Out"})
    .Attrs({"scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(AttentionWithBias));

PD_BUILD_OP(pcm_attention)
    .Inputs({"Q", "K", "V"})
    .Outputs({"Out", "Lse"})
    .Attrs({"scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(AttentionForward));

PD_BUILD_GRAD_OP(pcm_attention)
    .Inputs({"Q", "K", "V", "Out", "Lse", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Q"), paddle::Grad("K"), paddle::Grad("V")})
    .Attrs({"scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(AttentionBackward));

PD_BUILD_OP(pcm_joint_attention)
    .Inputs({"Q1", "K1", "V1", "Q2", "K2", "V2"})
    .Outputs({"Out1", "Out2", "Lse"})
    .Attrs({"heads: int64_t", "scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(JointAttentionForward));

PD_BUILD_GRAD_OP(pcm_joint_attention)
    .Inputs({"Q1", "K1", "V1", "Q2", "K2", "V2", "Out1", "Out2", "Lse", paddle::Grad("Out1"), paddle::Grad("Out2")})
    .Outputs({paddle::Grad("Q1"), paddle::Grad("K1"), paddle::Grad("V1"), paddle::Grad("Q2"), paddle::Grad("K2"),
              paddle::Grad("V2")})
    .Attrs({"heads: int64_t", "scale: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(JointAttentionBackward));
#endif  // PCM_WITH_MKL

std::vector<paddle::Tensor> Conv2dForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                          const paddle::optional<paddle::Tensor>& bias, int64_t stride_h,
                                          int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                                          int64_t pad_right, int64_t threads) {
  check(x, "X");
  check(weight, "Weight");
  PD_CHECK(x.shape().size() == 4 && weight.shape().size() == 4 && weight.shape()[1] == x.shape()[1],
           "cpu_kernels: conv2d takes NCHW input and [out, in, kh, kw] weights of the same channels");
  PD_CHECK(stride_h > 0 && stride_w > 0 && pad_top >= 0 && pad_bottom >= 0 && pad_left >= 0 && pad_right >= 0,
           "cpu_kernels: conv2d strides must be positive and paddings non-negative");
  ConvShape s{x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3], weight.shape()[0], weight.shape()[2],
              weight.shape()[3], stride_h, stride_w, pad_top, pad_left, 0, 0};
  s.out_height = (s.height + pad_top + pad_bottom - s.kh) / stride_h + 1;
  s.out_width = (s.width + pad_left + pad_right - s.kw) / stride_w + 1;
  PD_CHECK(s.out_height > 0 && s.out_width > 0, "cpu_kernels: conv2d output would be empty");
  const float* bp = nullptr;
  if (bias) {
    check(*bias, "Bias");
    PD_CHECK(bias->numel() == s.out_channels, "cpu_kernels: conv2d bias must have one value per output channel");
    bp = bias->data<float>();
  }
  // weights as [out blocks of 8][in][kh][kw][8] (zero for missing output channels)
  const int64_t blocks = (s.out_channels + kConvChannels - 1) / kConvChannels, taps = s.channels * s.kh * s.kw;
  std::vector<float> packed(blocks * taps * kConvChannels, 0.0f);
  const float* wp = weight.data<float>();
  for (int64_t oc = 0; oc < s.out_channels; ++oc) {
    for (int64_t t = 0; t < taps; ++t) {
      packed[(oc / kConvChannels * taps + t) * kConvChannels + oc % kConvChannels] = wp[oc * taps + t];
    }
  }
  auto out = paddle::empty({s.batch, s.out_channels, s.out_height, s.out_width}, paddle::DataType::FLOAT32,
                           paddle::CPUPlace());
  const float* xp = x.data<float>();
  float* op = out.data<float>();
  const int64_t row_floats = s.channels * s.kh * s.stride_w * s.phase_width();
  parallel_tasks(s.batch * s.out_height, threads, row_floats, [&](int64_t task, float* rows) {
    conv_row(s, xp, packed.data(), bp, op, task / s.out_height, task % s.out_height, rows);
  });
  return {out};
}

PD_BUILD_OP(pcm_conv2d)
    .Inputs({"X", "Weight", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"stride_h: int64_t", "stride_w: int64_t", "pad_top: int64_t", "pad_bottom: int64_t",
            "pad_left: int64_t", "pad_right: int64_t", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(Conv2dForward));

std::vector<paddle::Tensor> GroupNormForward(const paddle::Tensor& x, const paddle::optional<paddle::Tensor>& weight,
                                             const paddle::optional<paddle::Tensor>& bias, int64_t groups,
                                             float epsilon, int64_t threads) {
  check(x, "X");
  PD_CHECK(x.shape().size() >= 2 && groups > 0 && x.shape()[1] % groups == 0,
           "cpu_kernels: group_norm takes [N, C, ...] with C a multiple of the groups");
  const int64_t batch = x.shape()[0], channels = x.shape()[1], pixels = x.numel() / (batch * channels);
  const float* wp = weight ? weight->data<float>() : nullptr;
  const float* bp = bias ? bias->data<float>() : nullptr;
  auto out = paddle::empty_like(x);
  auto mean = paddle::empty({batch * groups}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto rstd = paddle::empty({batch * groups}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* xp = x.data<float>();
  float *yp = out.data<float>(), *mp = mean.data<float>(), *rp = rstd.data<float>();
  const int64_t per_group = channels / groups, tasks = batch * groups;
  parallel_rows(tasks, per_group * pixels, threads, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t offset = task * per_group * pixels;  // images and groups are contiguous in NC...
      group_norm_group(xp + offset, wp, bp, yp + offset, per_group, pixels, task % groups * per_group, epsilon,
                       mp + task, rp + task);
    }
  });
  return {out, mean, rstd};
}

std::vector<paddle::Tensor> AffineGroupNormForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                   const paddle::Tensor& bias, int64_t groups, float epsilon,
                                                   int64_t threads) {
  check(weight, "Weight");
  check(bias, "Bias");
  PD_CHECK(weight.numel() == x.shape()[1] && bias.numel() == x.shape()[1],
           "cpu_kernels: group_norm weight and bias need one value per channel");
  return GroupNormForward(x, weight, bias, groups, epsilon, threads);
}

// out[c] = the sum over the images n of parts[n, c], added in order of n (per-channel parameter gradients).
void sum_over_images(const float* parts, int64_t batch, int64_t channels, float* out) {
  for (int64_t c = 0; c < channels; ++c) {
    float total = 0.0f;
    for (int64_t n = 0; n < batch; ++n) total += parts[n * channels + c];
    out[c] = total;
  }
}

std::vector<paddle::Tensor> AffineGroupNormBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                    const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                                    const paddle::Tensor& grad_out, int64_t groups, float epsilon,
                                                    int64_t threads) {
  check(grad_out, "Out@GRAD");
  const int64_t batch = x.shape()[0], channels = x.shape()[1], pixels = x.numel() / (batch * channels);
  const int64_t per_group = channels / groups, tasks = batch * groups;
  auto dx = paddle::empty_like(x);
  auto dweight = paddle::empty_like(weight), dbias = paddle::empty_like(weight);
  std::vector<float> dweight_parts(batch * channels), dbias_parts(batch * channels);
  const float *xp = x.data<float>(), *gp = grad_out.data<float>(), *wp = weight.data<float>();
  const float *mp = mean.data<float>(), *rp = rstd.data<float>();
  float* dxp = dx.data<float>();
  parallel_rows(tasks, per_group * pixels, threads, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t offset = task * per_group * pixels, first = task % groups * per_group;
      const int64_t part = task / groups * channels + first;
      group_norm_grad_group(xp + offset, gp + offset, wp, mp[task], rp[task], dxp + offset,
                            dweight_parts.data() + part, dbias_parts.data() + part, per_group, pixels, first);
    }
  });
  sum_over_images(dweight_parts.data(), batch, channels, dweight.data<float>());
  sum_over_images(dbias_parts.data(), batch, channels, dbias.data<float>());
  return {dx, dweight, dbias};
}

PD_BUILD_OP(pcm_affine_group_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Out", "Mean", "Rstd"})
    .Attrs({"groups: int64_t", "epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(AffineGroupNormForward));

PD_BUILD_GRAD_OP(pcm_affine_group_norm)
    .Inputs({"X", "Weight", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .Attrs({"groups: int64_t", "epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(AffineGroupNormBackward));

// The discriminator heads' conv bias, GroupNorm and LeakyReLU as one op (the 1x1 convolution runs without its bias):
// pre = x + conv_bias[c], then the GroupNorm kernel, then LeakyReLU as Paddle's: the bits of the three ops. Keeps
// pre (the GroupNorm's input) and the statistics, as the GroupNorm did; backward recomputes the GroupNorm's output
// for the LeakyReLU's gradient (the separate LeakyReLU kept it) and sums the conv bias's gradient over the images
// in order, each image's pixels in 16 lanes.
std::vector<paddle::Tensor> HeadNormForward(const paddle::Tensor& x, const paddle::Tensor& conv_bias,
                                            const paddle::Tensor& weight, const paddle::Tensor& bias, int64_t groups,
                                            float epsilon, float slope, int64_t threads) {
  check(x, "X");
  check(conv_bias, "ConvBias");
  PD_CHECK(x.shape().size() >= 2 && conv_bias.numel() == x.shape()[1] && slope < 1.0f,
           "cpu_kernels: head_norm takes [N, C, ...], one conv bias per channel and a slope below 1");
  const int64_t batch = x.shape()[0], channels = x.shape()[1], pixels = x.numel() / (batch * channels);
  auto pre = paddle::empty_like(x);
  const float *xp = x.data<float>(), *cb = conv_bias.data<float>();
  float* pp = pre.data<float>();
  parallel_rows(batch * channels, pixels, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const vfloat b = splat(cb[row % channels]);
      elementwise(xp + row * pixels, nullptr, pp + row * pixels, 0, pixels, [&](vfloat v, vfloat) { return v + b; });
    }
  });
  auto normed = AffineGroupNormForward(pre, weight, bias, groups, epsilon, threads);
  float* op = normed[0].data<float>();
  const vfloat alpha = splat(slope);
  parallel_rows(x.numel(), 1, threads, [&](int64_t b, int64_t e) {
    elementwise(op, nullptr, op, b, e, [&](vfloat v, vfloat) { return leaky_relu_of(v, alpha); });
  });
  return {normed[0], pre, normed[1], normed[2]};
}

std::vector<paddle::Tensor> HeadNormBackward(const paddle::Tensor& pre, const paddle::Tensor& weight,
                                             const paddle::Tensor& bias, const paddle::Tensor& mean,
                                             const paddle::Tensor& rstd, const paddle::Tensor& grad_out,
                                             int64_t groups, float epsilon, float slope, int64_t threads) {
  check(grad_out, "Out@GRAD");
  const int64_t batch = pre.shape()[0], channels = pre.shape()[1], pixels = pre.numel() / (batch * channels);
  const int64_t per_group = channels / groups;
  auto grad_normed = paddle::empty_like(pre);  // the LeakyReLU's input gradient, on the recomputed GroupNorm output
  const float *pp = pre.data<float>(), *wp = weight.data<float>(), *bp = bias.data<float>();
  const float *mp = mean.data<float>(), *rp = rstd.data<float>(), *gp = grad_out.data<float>();
  float* gn = grad_normed.data<float>();
  const vfloat alpha = splat(slope);
  parallel_rows(batch * channels, pixels, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % channels, task = row / channels * groups + c / per_group;
      const vfloat vm = splat(mp[task]), vr = splat(rp[task]), vw = splat(wp[c]), vb = splat(bp[c]);
      const int64_t offset = row * pixels;
      elementwise(pp + offset, gp + offset, gn + offset, 0, pixels, [&](vfloat v, vfloat g) {
        return leaky_relu_grad_of((v - vm) * vr * vw + vb, g, alpha);
      });
    }
  });
  auto grads = AffineGroupNormBackward(pre, weight, mean, rstd, grad_normed, groups, epsilon, threads);
  auto grad_conv_bias = paddle::empty({channels}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  std::vector<float> parts(batch * channels);
  const float* dx = grads[0].data<float>();
  parallel_rows(batch * channels, pixels, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      vfloat sum = splat(0.0f);
      const float* r = dx + row * pixels;
      int64_t i = 0;
      for (; i + kLanes <= pixels; i += kLanes) sum += load(r + i);
      if (i < pixels) sum += load_tail(r + i, pixels - i);
      parts[row] = sum_lanes(sum);
    }
  });
  sum_over_images(parts.data(), batch, channels, grad_conv_bias.data<float>());
  return {grads[0], grad_conv_bias, grads[1], grads[2]};
}

PD_BUILD_OP(pcm_head_norm)
    .Inputs({"X", "ConvBias", "Weight", "Bias"})
    .Outputs({"Out", "Pre", "Mean", "Rstd"})
    .Attrs({"groups: int64_t", "epsilon: float", "slope: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(HeadNormForward));

PD_BUILD_GRAD_OP(pcm_head_norm)
    .Inputs({"Pre", "Weight", "Bias", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("ConvBias"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .Attrs({"groups: int64_t", "epsilon: float", "slope: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(HeadNormBackward));

PD_BUILD_OP(pcm_group_norm)
    .Inputs({"X", paddle::Optional("Weight"), paddle::Optional("Bias")})
    .Outputs({"Out", "Mean", "Rstd"})
    .Attrs({"groups: int64_t", "epsilon: float", "threads: int64_t"})
    .SetKernelFn(PD_KERNEL(GroupNormForward));

// SiLU (forward only: no-grad passes): x / (1 + exp(-x))
std::vector<paddle::Tensor> SiluForward(const paddle::Tensor& x, int64_t threads) {
  check(x, "X");
  auto out = paddle::empty_like(x);
  const float* xp = x.data<float>();
  float* yp = out.data<float>();
  parallel_rows(x.numel(), 1, threads, [&](int64_t b, int64_t e) {
    elementwise(xp, nullptr, yp, b, e, [](vfloat v, vfloat) { return v / (exp_poly(-v) + 1.0f); });
  });
  return {out};
}

PD_BUILD_OP(pcm_silu)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int64_t"})
    .SetKernelFn(PD_KERNEL(SiluForward));
