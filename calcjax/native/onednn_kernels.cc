// oneDNN's 2D convolutions as XLA FFI handlers for JAX's CPU backend.
//
// Convolution, one handler per pass: forward (x, w -> y), backward data (dy, w -> dx) and backward weights
// (x, dy -> dw). Layouts are JAX's: activations NHWC (batch, height, width, channels), kernels HWIO
// (height, width, in, out), float32 or bfloat16 (every operand one dtype). Attributes, each two int64
// (height, width): `strides`, `dilation` (lax's rhs_dilation, 1 = dense), `pad_lo`, `pad_hi` (explicit
// padding before / after). oneDNN picks the kernel's internal layout ("any"); the HWIO kernel is reordered
// to it on each call (kernels are small).
// Primitives are built once per shape and kept. Built by calcjax/native/build.py (make install); loaded by
// calcjax/native/onednn.py.
#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's geometry in oneDNN's terms (dims in N, C, H, W / O, I, H, W order).
struct Geometry {
  memory::dims src, weights, dst, strides, dilates, pad_l, pad_r;
  memory::data_type dtype;

  std::string Key(char pass) const {
    std::ostringstream key;
    key << pass << int(dtype);
    for (const auto* d : {&src, &weights, &dst, &strides, &dilates, &pad_l, &pad_r}) {
      key << '|';
      for (auto v : *d) key << v << ',';
    }
    return key.str();
  }
  memory::desc Src() const { return memory::desc(src, dtype, Tag::nhwc); }
  memory::desc Dst() const { return memory::desc(dst, dtype, Tag::nhwc); }
  memory::desc Weights() const { return memory::desc(weights, dtype, Tag::hwio); }
  memory::desc AnyWeights() const { return memory::desc(weights, dtype, Tag::any); }
};

ffi::ErrorOr<memory::data_type> DnnlType(ffi::DataType t) {
  if (t == ffi::DataType::F32) return memory::data_type::f32;
  if (t == ffi::DataType::BF16) return memory::data_type::bf16;
  return ffi::Unexpected(
      ffi::Error::InvalidArgument("oneDNN convolution: dtype must be float32 or bfloat16"));
}

memory::dims Pair(ffi::Span<const int64_t> v, int64_t offset = 0) {
  return {v[0] + offset, v[1] + offset};
}

// x: (N, H, W, C), w: (KH, KW, C, O), y: (N, OH, OW, O).
ffi::ErrorOr<Geometry> MakeGeometry(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w,
                                    ffi::AnyBuffer::Dimensions y, ffi::DataType dtype,
                                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                                    ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || strides.size() != 2 || dilation.size() != 2 ||
      pad_lo.size() != 2 || pad_hi.size() != 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("oneDNN convolution: 2D NHWC / HWIO operands only"));
  }
  auto dt = DnnlType(dtype);
  if (dt.has_error()) return ffi::Unexpected(dt.error());
  Geometry g;
  g.src = {x[0], x[3], x[1], x[2]};
  g.weights = {w[3], w[2], w[0], w[1]};
  g.dst = {y[0], y[3], y[1], y[2]};
  g.strides = Pair(strides);
  g.dilates = Pair(dilation, -1);
  g.pad_l = Pair(pad_lo);
  g.pad_r = Pair(pad_hi);
  g.dtype = dt.value();
  return g;
}

// Every primitive takes its scratch memory from the caller (a buffer per calling thread, below): XLA runs
// independent custom calls on several threads at once, and oneDNN's own scratchpad may be shared.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.AnyWeights(), g.Dst(), g.strides, g.dilates, g.pad_l, g.pad_r, UserScratchpad());
}

// A built primitive, its scratch memory, and the layout it wants the kernel (or gives the kernel's
// gradient) in, with the reorder between that layout and HWIO where they differ.
struct Built {
  dnnl::primitive primitive;
  memory::desc scratchpad;
  memory::desc weights;
  dnnl::primitive reorder;  // empty where the layouts agree
  memory::desc reorder_scratchpad;
};

template <typename PrimitiveDesc, typename Primitive>
Built Build(const PrimitiveDesc& pd, const memory::desc& weights) {
  return Built{Primitive(pd), pd.scratchpad_desc(), weights, {}, {}};
}

// Adds the reorder `from` -> `to` (kernel layouts) to `built` unless they agree.
void AddReorder(Built& built, const memory::desc& from, const memory::desc& to) {
  if (from == to) return;
  dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, UserScratchpad());
  built.reorder = dnnl::reorder(pd);
  built.reorder_scratchpad = pd.scratchpad_desc();
}

// Runs `primitive` with `args` and this thread's scratch buffer, grown to `scratchpad`'s size.
void Run(const dnnl::primitive& primitive, const memory::desc& scratchpad,
         std::unordered_map<int, memory> args, dnnl::stream& s) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < scratchpad.get_size()) buffer.resize(scratchpad.get_size());
  args.insert({DNNL_ARG_SCRATCHPAD, memory(scratchpad, Engine(), buffer.data())});
  primitive.execute(s, args);
}

template <typename Make>
std::shared_ptr<Built> Cached(const std::string& key, Make make) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<Built>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto built = std::make_shared<Built>(make());
  cache.emplace(key, built);
  return built;
}

memory Wrap(const memory::desc& md, void* data) { return memory(md, Engine(), data); }

// The kernel in the layout the primitive wants (a reorder of the HWIO buffer, or the buffer itself).
memory KernelAs(const Geometry& g, const Built& built, void* hwio, dnnl::stream& s) {
  memory user = Wrap(g.Weights(), hwio);
  if (!built.reorder) return user;
  memory packed(built.weights, Engine());
  Run(built.reorder, built.reorder_scratchpad, {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, packed}}, s);
  return packed;
}

template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
}

Built ForwardBuilt(const Geometry& geo) {
  auto pd = ForwardDesc(geo);
  auto built = Build<decltype(pd), dnnl::convolution_forward>(pd, pd.weights_desc());
  AddReorder(built, geo.Weights(), pd.weights_desc());
  return built;
}

Built BackwardDataBuilt(const Geometry& geo) {
  dnnl::convolution_backward_data::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, geo.Src(), geo.AnyWeights(), geo.Dst(), geo.strides,
      geo.dilates, geo.pad_l, geo.pad_r, ForwardDesc(geo), UserScratchpad());
  auto built = Build<decltype(pd), dnnl::convolution_backward_data>(pd, pd.weights_desc());
  AddReorder(built, geo.Weights(), pd.weights_desc());
  return built;
}

// The two passes that read the kernel: forward (x -> y: `pass` 'f') and backward data (dy -> dx: 'd').
// `in` / `out` are the NHWC operands with their oneDNN argument ids and layouts.
struct Operand {
  int arg;
  memory::desc layout;
  void* data;
};

template <typename Make>
ffi::Error WithKernel(const Geometry& geo, char pass, Make make, const Operand& in, void* hwio,
                      const Operand& out) {
  return Guarded([&] {
    auto built = Cached(geo.Key(pass), [&] { return make(geo); });
    dnnl::stream s(Engine());
    memory kernel = KernelAs(geo, *built, hwio, s);
    Run(built->primitive, built->scratchpad,
        {{in.arg, Wrap(in.layout, in.data)},
         {DNNL_ARG_WEIGHTS, kernel},
         {out.arg, Wrap(out.layout, out.data)}},
        s);
    s.wait();
  });
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                       ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), x.element_type(), strides, dilation,
                        pad_lo, pad_hi);
  if (g.has_error()) return g.error();
  const Geometry& geo = g.value();
  return WithKernel(geo, 'f', ForwardBuilt, {DNNL_ARG_SRC, geo.Src(), x.untyped_data()}, w.untyped_data(),
                    {DNNL_ARG_DST, geo.Dst(), y->untyped_data()});
}

ffi::Error BackwardDataImpl(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                            ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                            ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), dy.element_type(), strides,
                        dilation, pad_lo, pad_hi);
  if (g.has_error()) return g.error();
  const Geometry& geo = g.value();
  return WithKernel(geo, 'd', BackwardDataBuilt, {DNNL_ARG_DIFF_DST, geo.Dst(), dy.untyped_data()},
                    w.untyped_data(), {DNNL_ARG_DIFF_SRC, geo.Src(), dx->untyped_data()});
}

ffi::Error BackwardWeightsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                               ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), x.element_type(), strides,
                        dilation, pad_lo, pad_hi);
  if (g.has_error()) return g.error();
  const Geometry& geo = g.value();
  return Guarded([&] {
    auto built = Cached(geo.Key('w'), [&] {
      auto hint = ForwardDesc(geo);
      dnnl::convolution_backward_weights::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, geo.Src(), geo.AnyWeights(), geo.Dst(),
          geo.strides, geo.dilates, geo.pad_l, geo.pad_r, hint, UserScratchpad());
      auto built = Build<decltype(pd), dnnl::convolution_backward_weights>(pd, pd.diff_weights_desc());
      AddReorder(built, pd.diff_weights_desc(), geo.Weights());
      return built;
    });
    dnnl::stream s(Engine());
    memory user = Wrap(geo.Weights(), dw->untyped_data());
    memory packed = built->reorder ? memory(built->weights, Engine()) : user;
    Run(built->primitive, built->scratchpad,
        {{DNNL_ARG_SRC, Wrap(geo.Src(), x.untyped_data())},
         {DNNL_ARG_DIFF_DST, Wrap(geo.Dst(), dy.untyped_data())},
         {DNNL_ARG_DIFF_WEIGHTS, packed}},
        s);
    if (built->reorder) {
      Run(built->reorder, built->reorder_scratchpad, {{DNNL_ARG_FROM, packed}, {DNNL_ARG_TO, user}}, s);
    }
    s.wait();
  });
}

}  // namespace

#define CALCJAX_CONV_BINDING()                               \
  ffi::Ffi::Bind()                                            \
      .Arg<ffi::AnyBuffer>()                                  \
      .Arg<ffi::AnyBuffer>()                                  \
      .Ret<ffi::AnyBuffer>()                                  \
      .Attr<ffi::Span<const int64_t>>("strides")              \
      .Attr<ffi::Span<const int64_t>>("dilation")             \
      .Attr<ffi::Span<const int64_t>>("pad_lo")               \
      .Attr<ffi::Span<const int64_t>>("pad_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CalcjaxConvForward, ForwardImpl, CALCJAX_CONV_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CalcjaxConvBackwardData, BackwardDataImpl, CALCJAX_CONV_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CalcjaxConvBackwardWeights, BackwardWeightsImpl, CALCJAX_CONV_BINDING());
