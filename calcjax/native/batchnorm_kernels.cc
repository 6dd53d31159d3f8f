// BatchNorm in training mode fused with the ReLU after it, as XLA FFI handlers for JAX's CPU backend.
//
// Forward (x, scale, bias -> y, mean, var): the batch statistics of x over every axis but the last
// (channels), then y = max((x - mean) * scale / sqrt(var + epsilon) + bias, 0). `var` is the biased
// variance (divided by the pixel count), as flax's BatchNorm normalises with and keeps.
// Backward (dy, x, scale, bias, mean, var, dmean, dvar -> dx, dscale, dbias): the gradient of that
// function, dmean / dvar being the cotangents of the statistics themselves.
// Operands float32, x and y (N, ..., C) in row-major order (NHWC for the network), the rest (C,);
// attribute `epsilon` (float32).
//
// The per-channel sums (for the statistics: of x - shift and its square, shift = the first pixel's value;
// for the gradient: of the masked dy and of it times x - mean) are added in float over runs of 16 pixels
// and in double across runs, as PyTorch's CPU BatchNorm sums in double: XLA's float32 reductions of the
// same sums lie up to 10x farther from the float64 result. The pixels are split into chunks fixed by the
// pixel count alone (spread over OpenMP threads, their sums added in chunk order), so the results repeat
// bitwise on any number of threads. Built by calcjax/native/build.py with onednn_kernels.cc into one
// library; loaded by calcjax/native/library.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRun = 16;        // pixels summed in float before their sums move to double
constexpr int64_t kMinChunk = 512;  // pixels per chunk at least
constexpr int64_t kMaxChunks = 64;

// The pixels [0, pixels) in `count` chunks, fixed by the pixel count alone.
struct Chunks {
  int64_t pixels, count, size;
  explicit Chunks(int64_t p) : pixels(p) {
    count = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, p / kMinChunk));
    size = (p + count - 1) / count;
  }
  int64_t Begin(int64_t k) const { return std::min(pixels, k * size); }
  int64_t End(int64_t k) const { return std::min(pixels, (k + 1) * size); }
};

// Sums over a chunk's pixels of d = x - shift and d * d, per channel, into s1 and s2.
__attribute__((target_clones("avx512f", "avx2", "default")))
void ShiftedSums(const float* __restrict x, const float* __restrict shift, int64_t c, int64_t begin,
                 int64_t end, double* __restrict s1, double* __restrict s2) {
  std::vector<float> run(2 * c);
  float* __restrict f1 = run.data();
  float* __restrict f2 = run.data() + c;
  std::fill(s1, s1 + c, 0.0);
  std::fill(s2, s2 + c, 0.0);
  for (int64_t p0 = begin; p0 < end; p0 += kRun) {
    std::fill(run.begin(), run.end(), 0.0f);
    for (int64_t p = p0; p < std::min(end, p0 + kRun); ++p) {
      const float* __restrict row = x + p * c;
      for (int64_t j = 0; j < c; ++j) {
        float d = row[j] - shift[j];
        f1[j] += d;
        f2[j] += d * d;
      }
    }
    for (int64_t j = 0; j < c; ++j) s1[j] += f1[j], s2[j] += f2[j];
  }
}

// y = max((x - mean) * a + bias, 0) over a chunk (a = scale / sqrt(var + epsilon)).
__attribute__((target_clones("avx512f", "avx2", "default")))
void NormaliseRelu(const float* __restrict x, const float* __restrict mean, const float* __restrict a,
                   const float* __restrict bias, int64_t c, int64_t begin, int64_t end, float* __restrict y) {
  for (int64_t p = begin; p < end; ++p) {
    const float* __restrict row = x + p * c;
    float* __restrict out = y + p * c;
    for (int64_t j = 0; j < c; ++j) out[j] = std::max((row[j] - mean[j]) * a[j] + bias[j], 0.0f);
  }
}

// Sums over a chunk of g = dy where the ReLU passed (its input > 0) else 0, and of g * (x - mean).
__attribute__((target_clones("avx512f", "avx2", "default")))
void GradientSums(const float* __restrict dy, const float* __restrict x, const float* __restrict mean,
                  const float* __restrict a, const float* __restrict bias, int64_t c, int64_t begin,
                  int64_t end, double* __restrict sg, double* __restrict sgx) {
  std::vector<float> run(2 * c);
  float* __restrict f1 = run.data();
  float* __restrict f2 = run.data() + c;
  std::fill(sg, sg + c, 0.0);
  std::fill(sgx, sgx + c, 0.0);
  for (int64_t p0 = begin; p0 < end; p0 += kRun) {
    std::fill(run.begin(), run.end(), 0.0f);
    for (int64_t p = p0; p < std::min(end, p0 + kRun); ++p) {
      const float* __restrict row = x + p * c;
      const float* __restrict g = dy + p * c;
      for (int64_t j = 0; j < c; ++j) {
        float centred = row[j] - mean[j];
        float gj = centred * a[j] + bias[j] > 0.0f ? g[j] : 0.0f;
        f1[j] += gj;
        f2[j] += gj * centred;
      }
    }
    for (int64_t j = 0; j < c; ++j) sg[j] += f1[j], sgx[j] += f2[j];
  }
}

// dx = k0 * g + k1 * (x - mean) + k2 over a chunk, g as in GradientSums.
__attribute__((target_clones("avx512f", "avx2", "default")))
void InputGradient(const float* __restrict dy, const float* __restrict x, const float* __restrict mean,
                   const float* __restrict a, const float* __restrict bias, const float* __restrict k0,
                   const float* __restrict k1, const float* __restrict k2, int64_t c, int64_t begin,
                   int64_t end, float* __restrict dx) {
  for (int64_t p = begin; p < end; ++p) {
    const float* __restrict row = x + p * c;
    const float* __restrict g = dy + p * c;
    float* __restrict out = dx + p * c;
    for (int64_t j = 0; j < c; ++j) {
      float centred = row[j] - mean[j];
      float gj = centred * a[j] + bias[j] > 0.0f ? g[j] : 0.0f;
      out[j] = k0[j] * gj + k1[j] * centred + k2[j];
    }
  }
}

// Per-chunk sums (chunk k's at [k * c, (k + 1) * c) of `first` and `second`) added in chunk order.
void AddChunks(const Chunks& chunks, int64_t c, const std::vector<double>& first,
               const std::vector<double>& second, std::vector<double>& total1, std::vector<double>& total2) {
  total1.assign(c, 0.0);
  total2.assign(c, 0.0);
  for (int64_t k = 0; k < chunks.count; ++k) {
    for (int64_t j = 0; j < c; ++j) total1[j] += first[k * c + j], total2[j] += second[k * c + j];
  }
}

ffi::Error CheckShapes(const char* pass, ffi::Buffer<ffi::F32>& x, std::initializer_list<int64_t> channels) {
  auto dims = x.dimensions();
  if (dims.size() < 2 || x.element_count() == 0) {
    return ffi::Error::InvalidArgument(std::string(pass) + ": x must be non-empty with 2 or more axes");
  }
  for (int64_t n : channels) {
    if (n != dims.back()) {
      return ffi::Error::InvalidArgument(std::string(pass) + ": per-channel operands must have x's last axis");
    }
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> var, float epsilon) {
  ffi::Error shapes = CheckShapes("BatchNorm-ReLU forward", x, {scale.element_count(), bias.element_count()});
  if (shapes.failure()) return shapes;
  const int64_t c = x.dimensions().back(), p = x.element_count() / c;
  const float* xs = x.typed_data();
  const Chunks chunks(p);
  std::vector<float> shift(xs, xs + c), m(c), a(c);
  std::vector<double> s1(chunks.count * c), s2(chunks.count * c), t1, t2;
#pragma omp parallel for schedule(static) if (chunks.count > 1)
  for (int64_t k = 0; k < chunks.count; ++k) {
    ShiftedSums(xs, shift.data(), c, chunks.Begin(k), chunks.End(k), &s1[k * c], &s2[k * c]);
  }
  AddChunks(chunks, c, s1, s2, t1, t2);
  for (int64_t j = 0; j < c; ++j) {
    const double mu = t1[j] / p, v = std::max(0.0, t2[j] / p - mu * mu);
    m[j] = float(shift[j] + mu);
    mean->typed_data()[j] = m[j];
    var->typed_data()[j] = float(v);
    a[j] = float(1.0 / std::sqrt(double(float(v)) + epsilon)) * scale.typed_data()[j];
  }
#pragma omp parallel for schedule(static) if (chunks.count > 1)
  for (int64_t k = 0; k < chunks.count; ++k) {
    NormaliseRelu(xs, m.data(), a.data(), bias.typed_data(), c, chunks.Begin(k), chunks.End(k),
                  y->typed_data());
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                        ffi::Buffer<ffi::F32> dmean, ffi::Buffer<ffi::F32> dvar,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias, float epsilon) {
  ffi::Error shapes = CheckShapes("BatchNorm-ReLU backward", x,
                                  {scale.element_count(), bias.element_count(), mean.element_count(),
                                   var.element_count(), dmean.element_count(), dvar.element_count()});
  if (shapes.failure()) return shapes;
  if (dy.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("BatchNorm-ReLU backward: dy must have x's shape");
  }
  const int64_t c = x.dimensions().back(), p = x.element_count() / c;
  const float *m = mean.typed_data(), *b = bias.typed_data();
  const Chunks chunks(p);
  std::vector<double> inv(c), sg(chunks.count * c), sgx(chunks.count * c), tg, tgx;
  std::vector<float> a(c), k0(c), k1(c), k2(c);
  for (int64_t j = 0; j < c; ++j) {
    inv[j] = 1.0 / std::sqrt(double(var.typed_data()[j]) + epsilon);
    a[j] = float(inv[j]) * scale.typed_data()[j];
  }
#pragma omp parallel for schedule(static) if (chunks.count > 1)
  for (int64_t k = 0; k < chunks.count; ++k) {
    GradientSums(dy.typed_data(), x.typed_data(), m, a.data(), b, c, chunks.Begin(k), chunks.End(k),
                 &sg[k * c], &sgx[k * c]);
  }
  AddChunks(chunks, c, sg, sgx, tg, tgx);
  for (int64_t j = 0; j < c; ++j) {
    const double w = scale.typed_data()[j], iv = inv[j];
    dbias->typed_data()[j] = float(tg[j]);
    dscale->typed_data()[j] = float(tgx[j] * iv);
    k0[j] = float(w * iv);
    k1[j] = float((2.0 * dvar.typed_data()[j] - w * iv * iv * iv * tgx[j]) / p);
    k2[j] = float((double(dmean.typed_data()[j]) - w * iv * tg[j]) / p);
  }
#pragma omp parallel for schedule(static) if (chunks.count > 1)
  for (int64_t k = 0; k < chunks.count; ++k) {
    InputGradient(dy.typed_data(), x.typed_data(), m, a.data(), b, k0.data(), k1.data(), k2.data(), c,
                  chunks.Begin(k), chunks.End(k), dx->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CalcjaxBatchNormReluForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CalcjaxBatchNormReluBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dmean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dvar
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<float>("epsilon"));
