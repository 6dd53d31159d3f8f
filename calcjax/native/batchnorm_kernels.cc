// BatchNorm in training mode fused with the ReLU after it, as XLA FFI handlers for JAX's CPU backend.
//
// The input is given as pieces x_1 .. x_k that share every axis but the last (channels) and are read as
// their concatenation along it (a dense block's input: the block's input and each earlier layer's output),
// which is never built. With C the channels of all pieces:
// Forward (scale, bias, x_1 .. x_k -> y, mean, var): the batch statistics of each channel over every other
// axis, then y = max((x - mean) * scale / sqrt(var + epsilon) + bias, 0), y holding all C channels. `var` is
// the biased variance (divided by the pixel count), as flax's BatchNorm normalises with and keeps.
// Backward (dy, scale, bias, mean, var, dmean, dvar, x_1 .. x_k -> dscale, dbias, dx_1 .. dx_k): the
// gradient of that function, dmean / dvar being the cotangents of the statistics themselves.
// Operands float32 in row-major order (NHWC for the network): pieces (N, ..., c_i), y and dy (N, ..., C),
// the rest (C,); attribute `epsilon` (float32).
//
// The per-channel sums (for the statistics: of x - shift and its square, shift = the first pixel's value;
// for the gradient: of the masked dy and of it times x - mean) are added in float over runs of 16 pixels
// and in double across runs, as PyTorch's CPU BatchNorm sums in double: XLA's float32 reductions of the
// same sums lie up to 10x farther from the float64 result. The pixels are split into chunks fixed by the
// pixel count alone (spread over OpenMP threads, their sums added in chunk order), so the results repeat
// bitwise on any number of threads; built without FMA contraction (-ffp-contract=off), they also round
// alike on every instruction set and however the input is cut into pieces. Built by calcjax/native/build.py
// with onednn_kernels.cc into one library; loaded by calcjax/native/library.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The loops below are compiled for AVX-512, AVX2 and plain x86-64, the best chosen when the library loads;
// elsewhere (aarch64) once, for the compiler's target.
#if defined(__x86_64__)
#define CALCJAX_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CALCJAX_VECTOR_CLONES
#endif

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

// One piece of the input: `c` channels per pixel (its row stride), at channel `offset` of the whole.
struct Piece {
  const float* x;
  int64_t c, offset;
};

// Eight floats: one pixel of an 8-channel piece (SSE, AVX2 or AVX-512 registers as the target clone has
// them).
typedef float Floats8 __attribute__((vector_size(32)));

inline Floats8 Load8(const float* p) {
  Floats8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Adds a run's float sums to the double ones.
inline void AddRun(const Floats8& run, double* total) {
  for (int i = 0; i < 8; ++i) total[i] += run[i];
}

// Sums over pixels [begin, end) of d = x - shift and d * d, per channel, into s1 and s2.
CALCJAX_VECTOR_CLONES
void ShiftedSums(const float* __restrict x, int64_t c, const float* __restrict shift, int64_t begin,
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

// ShiftedSums for a piece of 8 channels (a dense layer's output at growth rate 8), its sums in registers:
// the same additions in the same order (so the same bits), 7x faster than the loop above at that width.
CALCJAX_VECTOR_CLONES
void ShiftedSums8(const float* __restrict x, int64_t, const float* __restrict shift, int64_t begin,
                  int64_t end, double* __restrict s1, double* __restrict s2) {
  const Floats8 k = Load8(shift);
  std::fill(s1, s1 + 8, 0.0);
  std::fill(s2, s2 + 8, 0.0);
  for (int64_t p0 = begin; p0 < end; p0 += kRun) {
    Floats8 f1 = {}, f2 = {};
    for (int64_t p = p0; p < std::min(end, p0 + kRun); ++p) {
      const Floats8 d = Load8(x + p * 8) - k;
      f1 += d;
      f2 += d * d;
    }
    AddRun(f1, s1);
    AddRun(f2, s2);
  }
}

// y = max((x - mean) * a + bias, 0) over pixels [begin, end) (a = scale / sqrt(var + epsilon)); x has `c`
// channels per pixel, y's rows are `ys` apart.
CALCJAX_VECTOR_CLONES
void NormaliseRelu(const float* __restrict x, int64_t c, const float* __restrict mean,
                   const float* __restrict a, const float* __restrict bias, int64_t begin, int64_t end,
                   float* __restrict y, int64_t ys) {
  for (int64_t p = begin; p < end; ++p) {
    const float* __restrict row = x + p * c;
    float* __restrict out = y + p * ys;
    for (int64_t j = 0; j < c; ++j) out[j] = std::max((row[j] - mean[j]) * a[j] + bias[j], 0.0f);
  }
}

// Sums over pixels [begin, end) of g = dy where the ReLU passed (its input > 0) else 0, and of
// g * (x - mean); dy's rows are `dys` apart.
CALCJAX_VECTOR_CLONES
void GradientSums(const float* __restrict dy, int64_t dys, const float* __restrict x, int64_t c,
                  const float* __restrict mean, const float* __restrict a, const float* __restrict bias,
                  int64_t begin, int64_t end, double* __restrict sg, double* __restrict sgx) {
  std::vector<float> run(2 * c);
  float* __restrict f1 = run.data();
  float* __restrict f2 = run.data() + c;
  std::fill(sg, sg + c, 0.0);
  std::fill(sgx, sgx + c, 0.0);
  for (int64_t p0 = begin; p0 < end; p0 += kRun) {
    std::fill(run.begin(), run.end(), 0.0f);
    for (int64_t p = p0; p < std::min(end, p0 + kRun); ++p) {
      const float* __restrict row = x + p * c;
      const float* __restrict g = dy + p * dys;
      for (int64_t j = 0; j < c; ++j) {
        float centred = row[j] - mean[j];
        const float gv = g[j];  // read unconditionally, so the loop vectorises
        float gj = centred * a[j] + bias[j] > 0.0f ? gv : 0.0f;
        f1[j] += gj;
        f2[j] += gj * centred;
      }
    }
    for (int64_t j = 0; j < c; ++j) sg[j] += f1[j], sgx[j] += f2[j];
  }
}

// GradientSums for a piece of 8 channels (as ShiftedSums8: the same bits, 4x faster at that width).
CALCJAX_VECTOR_CLONES
void GradientSums8(const float* __restrict dy, int64_t dys, const float* __restrict x, int64_t,
                   const float* __restrict mean, const float* __restrict a, const float* __restrict bias,
                   int64_t begin, int64_t end, double* __restrict sg, double* __restrict sgx) {
  const Floats8 zero = {}, m = Load8(mean), av = Load8(a), bv = Load8(bias);
  std::fill(sg, sg + 8, 0.0);
  std::fill(sgx, sgx + 8, 0.0);
  for (int64_t p0 = begin; p0 < end; p0 += kRun) {
    Floats8 f1 = {}, f2 = {};
    for (int64_t p = p0; p < std::min(end, p0 + kRun); ++p) {
      const Floats8 centred = Load8(x + p * 8) - m;
      const Floats8 g = centred * av + bv > zero ? Load8(dy + p * dys) : zero;
      f1 += g;
      f2 += g * centred;
    }
    AddRun(f1, sg);
    AddRun(f2, sgx);
  }
}

// Per-channel constants of the input gradient: dx = k0 * g + k1 * (x - mean) + k2.
struct GradientTerms {
  const float *a, *bias, *k0, *k1, *k2;
};

// dx = k0 * g + k1 * (x - mean) + k2 over pixels [begin, end), g as in GradientSums.
CALCJAX_VECTOR_CLONES
void InputGradient(const float* __restrict dy, int64_t dys, const float* __restrict x, int64_t c,
                   const float* __restrict mean, GradientTerms t, int64_t begin, int64_t end,
                   float* __restrict dx) {
  const float* __restrict a = t.a;
  const float* __restrict bias = t.bias;
  const float* __restrict k0 = t.k0;
  const float* __restrict k1 = t.k1;
  const float* __restrict k2 = t.k2;
  for (int64_t p = begin; p < end; ++p) {
    const float* __restrict row = x + p * c;
    const float* __restrict g = dy + p * dys;
    float* __restrict out = dx + p * c;
    for (int64_t j = 0; j < c; ++j) {
      float centred = row[j] - mean[j];
      const float gv = g[j];  // read unconditionally, so the loop vectorises
        float gj = centred * a[j] + bias[j] > 0.0f ? gv : 0.0f;
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

ffi::Error Invalid(const char* pass, const std::string& rule) {
  return ffi::Error::InvalidArgument(std::string(pass) + ": " + rule);
}

// The pieces args[first ..], checked: float32, one shape but the last axis, C channels together.
ffi::Error ReadPieces(const char* pass, const ffi::RemainingArgs& args, size_t first, int64_t channels,
                      std::vector<Piece>& pieces, int64_t& pixels) {
  if (args.size() <= first) return Invalid(pass, "no input pieces");
  int64_t offset = 0;
  for (size_t i = first; i < args.size(); ++i) {
    auto piece = args.get<ffi::Buffer<ffi::F32>>(i);
    if (piece.has_error()) return Invalid(pass, "input pieces must be float32");
    auto dims = piece->dimensions();
    if (dims.size() < 2 || piece->element_count() == 0) {
      return Invalid(pass, "input pieces must be non-empty with 2 or more axes");
    }
    const int64_t c = dims.back(), p = piece->element_count() / c;
    if (i > first && p != pixels) return Invalid(pass, "input pieces must share every axis but the last");
    pixels = p;
    pieces.push_back({piece->typed_data(), c, offset});
    offset += c;
  }
  if (offset != channels) return Invalid(pass, "per-channel operands must have the pieces' channels together");
  return ffi::Error::Success();
}

// The batch statistics of every channel (mean, and the biased variance in double); `shift` the first
// pixel's values.
void Statistics(const std::vector<Piece>& pieces, const Chunks& chunks, int64_t channels,
                std::vector<double>& mean, std::vector<double>& var, std::vector<float>& shift) {
  std::vector<double> s1(chunks.count * channels), s2(chunks.count * channels), t1, t2;
  shift.resize(channels);
  for (const Piece& q : pieces) std::copy(q.x, q.x + q.c, shift.begin() + q.offset);
#pragma omp parallel for schedule(static) if (chunks.count > 1)
  for (int64_t k = 0; k < chunks.count; ++k) {
    for (const Piece& q : pieces) {
      const auto sums = q.c == 8 ? ShiftedSums8 : ShiftedSums;
      sums(q.x, q.c, &shift[q.offset], chunks.Begin(k), chunks.End(k), &s1[k * channels + q.offset],
           &s2[k * channels + q.offset]);
    }
  }
  AddChunks(chunks, channels, s1, s2, t1, t2);
  mean.resize(channels);
  var.resize(channels);
  for (int64_t j = 0; j < channels; ++j) {
    mean[j] = t1[j] / chunks.pixels;
    var[j] = std::max(0.0, t2[j] / chunks.pixels - mean[j] * mean[j]);
    mean[j] += shift[j];
  }
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, ffi::RemainingArgs args,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> var, float epsilon) {
  const char* pass = "BatchNorm-ReLU forward";
  const int64_t channels = scale.element_count();
  std::vector<Piece> pieces;
  int64_t pixels = 0;
  ffi::Error read = ReadPieces(pass, args, 0, channels, pieces, pixels);
  if (read.failure()) return read;
  if (bias.element_count() != channels || y->element_count() != pixels * channels) {
    return Invalid(pass, "bias and y must have the pieces' channels together");
  }
  const Chunks chunks(pixels);
  std::vector<double> mu, v;
  std::vector<float> shift, m(channels), a(channels);
  Statistics(pieces, chunks, channels, mu, v, shift);
  for (int64_t j = 0; j < channels; ++j) {
    m[j] = float(mu[j]);
    mean->typed_data()[j] = m[j];
    var->typed_data()[j] = float(v[j]);
    a[j] = float(1.0 / std::sqrt(double(float(v[j])) + epsilon)) * scale.typed_data()[j];
  }
#pragma omp parallel for schedule(static) if (chunks.count > 1)
  for (int64_t k = 0; k < chunks.count; ++k) {
    for (const Piece& q : pieces) {
      NormaliseRelu(q.x, q.c, &m[q.offset], &a[q.offset], bias.typed_data() + q.offset, chunks.Begin(k),
                    chunks.End(k), y->typed_data() + q.offset, channels);
    }
  }
  return ffi::Error::Success();
}

// The backward pass's per-channel operands: scale, bias, mean, var, dmean, dvar (args 1 .. 6).
struct ChannelOperands {
  const float *scale, *bias, *mean, *var, *dmean, *dvar;
};

ffi::Error ReadChannelOperands(const char* pass, const ffi::RemainingArgs& args, ChannelOperands& s,
                               int64_t& channels) {
  const float** fields[] = {&s.scale, &s.bias, &s.mean, &s.var, &s.dmean, &s.dvar};
  for (size_t i = 0; i < 6; ++i) {
    auto arg = args.get<ffi::Buffer<ffi::F32>>(1 + i);
    if (arg.has_error()) return Invalid(pass, "per-channel operands must be float32");
    if (i == 0) channels = arg->element_count();
    if (arg->element_count() != channels) return Invalid(pass, "per-channel operands must have one length");
    *fields[i] = arg->typed_data();
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::RemainingArgs args, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias, ffi::RemainingRets rets, float epsilon) {
  const char* pass = "BatchNorm-ReLU backward";
  ChannelOperands s;
  int64_t channels = 0, pixels = 0;
  std::vector<Piece> pieces;
  auto dy = args.get<ffi::Buffer<ffi::F32>>(0);
  if (dy.has_error()) return Invalid(pass, "dy must be float32");
  ffi::Error read = ReadChannelOperands(pass, args, s, channels);
  if (read.failure()) return read;
  read = ReadPieces(pass, args, 7, channels, pieces, pixels);
  if (read.failure()) return read;
  if (dy->element_count() != pixels * channels) {
    return Invalid(pass, "dy must have the pieces' pixels and channels");
  }
  if (rets.size() != pieces.size()) return Invalid(pass, "one input gradient per piece");
  std::vector<float*> dx;
  for (size_t i = 0; i < pieces.size(); ++i) {
    auto out = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (out.has_error() || (*out)->element_count() != pixels * pieces[i].c) {
      return Invalid(pass, "each input gradient must have its piece's shape");
    }
    dx.push_back((*out)->typed_data());
  }
  const Chunks chunks(pixels);
  std::vector<double> inv(channels), sg(chunks.count * channels), sgx(chunks.count * channels), tg, tgx;
  std::vector<float> a(channels), k0(channels), k1(channels), k2(channels);
  for (int64_t j = 0; j < channels; ++j) {
    inv[j] = 1.0 / std::sqrt(double(s.var[j]) + epsilon);
    a[j] = float(inv[j]) * s.scale[j];
  }
  const float* g = dy->typed_data();
#pragma omp parallel for schedule(static) if (chunks.count > 1)
  for (int64_t k = 0; k < chunks.count; ++k) {
    for (const Piece& q : pieces) {
      const auto sums = q.c == 8 ? GradientSums8 : GradientSums;
      sums(g + q.offset, channels, q.x, q.c, s.mean + q.offset, &a[q.offset], s.bias + q.offset,
           chunks.Begin(k), chunks.End(k), &sg[k * channels + q.offset], &sgx[k * channels + q.offset]);
    }
  }
  AddChunks(chunks, channels, sg, sgx, tg, tgx);
  for (int64_t j = 0; j < channels; ++j) {
    const double w = s.scale[j], iv = inv[j];
    dbias->typed_data()[j] = float(tg[j]);
    dscale->typed_data()[j] = float(tgx[j] * iv);
    k0[j] = float(w * iv);
    k1[j] = float((2.0 * s.dvar[j] - w * iv * iv * iv * tgx[j]) / pixels);
    k2[j] = float((double(s.dmean[j]) - w * iv * tg[j]) / pixels);
  }
#pragma omp parallel for schedule(static) if (chunks.count > 1)
  for (int64_t k = 0; k < chunks.count; ++k) {
    for (size_t i = 0; i < pieces.size(); ++i) {
      const Piece& q = pieces[i];
      GradientTerms terms{&a[q.offset], s.bias + q.offset, &k0[q.offset], &k1[q.offset], &k2[q.offset]};
      InputGradient(g + q.offset, channels, q.x, q.c, s.mean + q.offset, terms, chunks.Begin(k), chunks.End(k),
                    dx[i]);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CalcjaxBatchNormReluForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .RemainingArgs()               // x_1 .. x_k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CalcjaxBatchNormReluBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()  // dy, scale, bias, mean, var, dmean, dvar, x_1 .. x_k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .RemainingRets()               // dx_1 .. dx_k
                                  .Attr<float>("epsilon"));
