// Inference convolution with a per-channel affine (a BatchNorm with running statistics), an optional residual and
// ReLU fused into one oneDNN primitive (post-ops), as XLA FFI custom calls. Built with onednn_conv.cc into one
// library by research/cpu/kernels/onednn.py; used by `onednn.conv_affine_act` (HigherHRNet's inference).
//
//   OnednnConvAffineAct    (x[N,H,W,Ci], w[K,K,Ci,Co], a[Co], b[Co])                -> act(conv(x, w) * a + b)
//   OnednnConvAffineAddAct (x[N,H,W,Ci], w[K,K,Ci,Co], a[Co], b[Co], r[N,Ho,Wo,Co]) -> act(conv(x, w) * a + b + r)
// attrs: stride, pad (as in onednn_conv.cc: symmetric request, floor output size), relu (0 or 1).
// XLA:CPU runs the per-channel scale, bias, residual add and ReLU as separate passes over each output map (and
// folding the scale into the weights is a pass over the weights per call), which on a network of many small
// convolutions (HRNet: ~300 at 32-256 channels) costs about as much as the convolutions; oneDNN applies them while
// the output tile is in cache. Activations NHWC, float32; weights reordered from HWIO into the primitive's layout
// per call (a per-thread buffer), primitives cached per shape.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

using namespace research_onednn;  // ffi, memory, tag, dt, Engine, Stream, Buf, Mem, B1/B4/R4

namespace {

thread_local Buf tl_scratch, tl_wei;

struct Key {
  int64_t N, H, W, Ci, Co, K, S, P, Ho, Wo, PRh, PRw;
  bool residual, relu;
  std::string str() const {
    char b[256];
    std::snprintf(b, sizeof b, "i_%ld_%ld_%ld_%ld_%ld_%ld_%ld_%ld_%d_%d", N, H, W, Ci, Co, K, S, P, int(residual),
                  int(relu));
    return b;
  }
};

Key MakeKey(int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t K, int64_t Co, int64_t S, int64_t P, bool residual,
            bool relu) {
  Key k{N, H, W, Ci, Co, K, S, P, 0, 0, 0, 0, residual, relu};
  k.Ho = (H + 2 * P - K) / S + 1;
  k.Wo = (W + 2 * P - K) / S + 1;
  k.PRh = (k.Ho - 1) * S + K - H - P;
  k.PRw = (k.Wo - 1) * S + K - W - P;
  return k;
}

struct Entry {
  dnnl::convolution_forward prim;
  memory::desc src, dst, channel, wei, wei_hwio, scratch;
  bool need_reorder = false;
  dnnl::reorder reorder;
};

std::mutex mu;
std::unordered_map<std::string, std::shared_ptr<Entry>> cache;

std::shared_ptr<Entry> Get(const Key& k) {
  const std::string key = k.str();
  {
    std::lock_guard<std::mutex> l(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto e = std::make_shared<Entry>();
  e->src = memory::desc({k.N, k.Ci, k.H, k.W}, dt::f32, tag::nhwc);
  e->dst = memory::desc({k.N, k.Co, k.Ho, k.Wo}, dt::f32, tag::nhwc);
  e->channel = memory::desc({1, k.Co, 1, 1}, dt::f32, tag::nchw);  // per-channel vector, broadcast over N, H, W
  memory::desc wei_any({k.Co, k.Ci, k.K, k.K}, dt::f32, tag::any);
  dnnl::post_ops po;  // post-op i reads DNNL_ARG_ATTR_MULTIPLE_POST_OP(i) | DNNL_ARG_SRC_1
  po.append_binary(dnnl::algorithm::binary_mul, e->channel);
  po.append_binary(dnnl::algorithm::binary_add, e->channel);
  if (k.residual) po.append_binary(dnnl::algorithm::binary_add, e->dst);
  if (k.relu) po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_post_ops(po);
  dnnl::convolution_forward::primitive_desc pd(
      Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, e->src, wei_any, e->dst,
      {k.S, k.S}, {k.P, k.P}, {k.PRh, k.PRw}, attr);
  e->prim = dnnl::convolution_forward(pd);
  e->wei = pd.weights_desc();
  e->wei_hwio = memory::desc({k.Co, k.Ci, k.K, k.K}, dt::f32, tag::hwio);
  e->need_reorder = e->wei != e->wei_hwio;
  if (e->need_reorder)
    e->reorder = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e->wei_hwio, Engine(), e->wei));
  e->scratch = pd.scratchpad_desc();
  std::lock_guard<std::mutex> l(mu);
  return cache.emplace(key, e).first->second;
}

ffi::Error Run(B4 x, B4 w, B1 a, B1 b, const float* residual, R4 y, int64_t stride, int64_t pad, int64_t relu) {
  auto xd = x.dimensions(), wd = w.dimensions();
  Key k = MakeKey(xd[0], xd[1], xd[2], xd[3], wd[0], wd[3], stride, pad, residual != nullptr, relu != 0);
  try {
    auto e = Get(k);
    auto& s = Stream();
    memory wmem = Mem(e->wei_hwio, w.typed_data());
    if (e->need_reorder) {
      memory wr = Mem(e->wei, tl_wei.get(e->wei.get_size()));
      e->reorder.execute(s, wmem, wr);
      wmem = wr;
    }
    std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, Mem(e->src, x.typed_data())},
                                            {DNNL_ARG_WEIGHTS, wmem},
                                            {DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                                             Mem(e->channel, a.typed_data())},
                                            {DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1,
                                             Mem(e->channel, b.typed_data())},
                                            {DNNL_ARG_DST, Mem(e->dst, y->typed_data())},
                                            {DNNL_ARG_SCRATCHPAD, Mem(e->scratch, tl_scratch.get(e->scratch.get_size()))}};
    if (residual) args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(2) | DNNL_ARG_SRC_1] = Mem(e->dst, residual);
    e->prim.execute(s, args);
    s.wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, err.what());
  }
}

ffi::Error ConvAffineAct(B4 x, B4 w, B1 a, B1 b, R4 y, int64_t stride, int64_t pad, int64_t relu) {
  return Run(x, w, a, b, nullptr, y, stride, pad, relu);
}

ffi::Error ConvAffineAddAct(B4 x, B4 w, B1 a, B1 b, B4 r, R4 y, int64_t stride, int64_t pad, int64_t relu) {
  return Run(x, w, a, b, r.typed_data(), y, stride, pad, relu);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvAffineAct, ConvAffineAct,
                              ffi::Ffi::Bind().Arg<B4>().Arg<B4>().Arg<B1>().Arg<B1>().Ret<B4>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("pad").Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvAffineAddAct, ConvAffineAddAct,
                              ffi::Ffi::Bind().Arg<B4>().Arg<B4>().Arg<B1>().Arg<B1>().Arg<B4>().Ret<B4>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("pad").Attr<int64_t>("relu"));

// ---------------------------------------------------------------------------------------------------------------------
// OnednnMaterialize: the identity, with the output aliasing the input (no copy when XLA honours the alias). XLA:CPU
// cannot see through a custom call, so a value that passes through one is read from its buffer by every consumer
// instead of being recomputed inside them: XLA's fusion otherwise duplicates cheap elementwise producers into their
// consumers, and along a residual chain (x_k = relu(bn_k + x_{k-1})) the duplicates nest, so one backward fusion
// recomputed ~50 layers of BatchNorm arithmetic per element (research/higherhrnet/model.py `conv_bn`).
namespace {
ffi::Error MaterializeImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.untyped_data() != y->untyped_data()) {
    std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMaterialize, MaterializeImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
