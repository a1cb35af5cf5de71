// NHWC float32 2-D convolution for XLA:CPU through oneDNN, as XLA FFI custom calls.
// Built and loaded by research/cpu/kernels/onednn.py; used by research/cpu/conv.py (conv_impl "onednn").
//
//   OnednnConvFwd      (x[N,H,W,Ci], w[KH,KW,Ci/G,Co])          -> y[N,Ho,Wo,Co]
//   OnednnConvBwdData  (dy[N,Ho,Wo,Co], w)                       -> dx[N,H,W,Ci]
//   OnednnConvBwdW     (x, dy)                                   -> dw[KH,KW,Ci/G,Co]
// (no bias: the layers add theirs outside, and the detector's biased convolutions are 1x1)
// attrs: stride (int64), pad (int64; symmetric request, the right/bottom pad is what the
// floor output size needs, as in lax.conv_general_dilated with ((p,p),(p,p))), groups (int64
// G >= 1, lax's feature_group_count: output channels [g*Co/G, (g+1)*Co/G) see input channels
// [g*Ci/G, (g+1)*Ci/G); the HWIO weights are oneDNN's `hwigo`, one primitive for all groups).
// Dilation 1. Activations stay NHWC; weights are reordered from HWIO into the
// layout oneDNN picks (`any`) per call, diff weights reordered back to HWIO.
// Primitives are cached per shape (creation costs 0.1-10 ms); the scratchpad is user-managed
// in a thread-local buffer so concurrent execution from several XLA threads is safe.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

using namespace research_onednn;  // ffi, memory, tag, dt, Engine, Stream, Buf, Mem, B1/B4/R4

namespace {

thread_local Buf tl_scratch, tl_wei, tl_src, tl_dst;

struct Geo {
  int64_t N, H, W, Ci, Ho, Wo, Co, K, S, P, PR_h, PR_w, G;
  std::string key(char kind) const {
    char b[256];
    std::snprintf(b, sizeof b, "%c_%ld_%ld_%ld_%ld_%ld_%ld_%ld_%ld_%ld", kind, N, H, W, Ci, Co, K, S, P, G);
    return b;
  }
  memory::dims src() const { return {N, Ci, H, W}; }
  memory::dims dst() const { return {N, Co, Ho, Wo}; }
  // oneDNN weight dims: {Co, Ci, K, K}, or {G, Co/G, Ci/G, K, K} for a grouped convolution
  memory::dims wei() const {
    if (G == 1) return {Co, Ci, K, K};
    return {G, Co / G, Ci / G, K, K};
  }
  tag wei_user_tag() const { return G == 1 ? tag::hwio : tag::hwigo; }  // both HWIO in memory
  memory::dims strides() const { return {S, S}; }
  memory::dims padl() const { return {P, P}; }
  memory::dims padr() const { return {PR_h, PR_w}; }
};

// Ci: input channels of x (all groups); Co: output channels (all groups).
Geo MakeGeo(int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t K, int64_t Co, int64_t S,
            int64_t P, int64_t G) {
  if (G < 1 || Ci % G || Co % G) throw std::invalid_argument("groups must divide both channel counts");
  Geo g{N, H, W, Ci, 0, 0, Co, K, S, P, 0, 0, G};
  g.Ho = (H + 2 * P - K) / S + 1;
  g.Wo = (W + 2 * P - K) / S + 1;
  g.PR_h = (g.Ho - 1) * S + K - H - P;  // may be < P: XLA ignores the unused padding too
  g.PR_w = (g.Wo - 1) * S + K - W - P;
  return g;
}

dnnl::primitive_attr Attr() {
  dnnl::primitive_attr a;
  a.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return a;
}

dnnl::convolution_forward::primitive_desc FwdPd(const Geo& g) {
  memory::desc src(g.src(), dt::f32, tag::nhwc), dst(g.dst(), dt::f32, tag::nhwc);
  memory::desc wei(g.wei(), dt::f32, tag::any);
  return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
          wei, dst, g.strides(), g.padl(), g.padr(), Attr()};
}

struct Entry {
  dnnl::primitive prim;
  memory::desc wei_md;        // the primitive's weight layout
  memory::desc wei_hwio;      // HWIO user layout
  bool need_reorder = false;
  dnnl::reorder reorder;      // hwio -> wei_md (fwd, bwd-data) or wei_md -> hwio (bwd-w)
  memory::desc src_md, dst_md, scratch_md;
  // bwd-weights: x and dy are read as NHWC where oneDNN has an optimised kernel for it, else reordered into the
  // layout it picks (BwdWEntry)
  bool src_reorder = false, dst_reorder = false;
  dnnl::reorder src_r, dst_r;
  memory::desc src_user, dst_user;
};

std::mutex mu;
std::unordered_map<std::string, std::shared_ptr<Entry>> cache;

template <typename Make>
std::shared_ptr<Entry> Get(const std::string& key, Make make) {
  {
    std::lock_guard<std::mutex> l(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto e = make();  // outside the lock: creation is slow
  std::lock_guard<std::mutex> l(mu);
  return cache.emplace(key, e).first->second;
}

dnnl::reorder MakeReorder(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

// The primitive's weight layout `prim_md` against the user's HWIO; the reorder goes into the
// primitive's layout (forward, input gradient) or back to HWIO (kernel gradient).
void SetWeights(Entry& e, const Geo& g, const memory::desc& prim_md, bool into_prim) {
  e.wei_md = prim_md;
  e.wei_hwio = memory::desc(g.wei(), dt::f32, g.wei_user_tag());
  e.need_reorder = e.wei_md != e.wei_hwio;
  if (e.need_reorder)
    e.reorder = into_prim ? MakeReorder(e.wei_hwio, e.wei_md) : MakeReorder(e.wei_md, e.wei_hwio);
}

std::shared_ptr<Entry> FwdEntry(const Geo& g) {
  return Get(g.key('f'), [&] {
    auto pd = FwdPd(g);
    auto e = std::make_shared<Entry>();
    e->prim = dnnl::convolution_forward(pd);
    SetWeights(*e, g, pd.weights_desc(), true);
    e->src_md = pd.src_desc();
    e->dst_md = pd.dst_desc();
    e->scratch_md = pd.scratchpad_desc();
    return e;
  });
}

std::shared_ptr<Entry> BwdDataEntry(const Geo& g) {
  return Get(g.key('d'), [&] {
    auto hint = FwdPd(g);
    memory::desc src(g.src(), dt::f32, tag::nhwc), dst(g.dst(), dt::f32, tag::nhwc);
    memory::desc wei(g.wei(), dt::f32, tag::any);
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, src, wei, dst, g.strides(), g.padl(),
        g.padr(), hint, Attr());
    auto e = std::make_shared<Entry>();
    e->prim = dnnl::convolution_backward_data(pd);
    SetWeights(*e, g, pd.weights_desc(), true);
    e->src_md = pd.diff_src_desc();
    e->dst_md = pd.diff_dst_desc();
    e->scratch_md = pd.scratchpad_desc();
    return e;
  });
}

dnnl::convolution_backward_weights::primitive_desc BwdWPd(const Geo& g, tag act) {
  memory::desc src(g.src(), dt::f32, act), dst(g.dst(), dt::f32, act);
  memory::desc wei(g.wei(), dt::f32, tag::any);
  return {Engine(), dnnl::algorithm::convolution_direct, src, wei, dst, g.strides(), g.padl(), g.padr(), FwdPd(g),
          Attr()};
}

std::shared_ptr<Entry> BwdWEntry(const Geo& g) {
  return Get(g.key('w'), [&] {
    // x and dy as XLA holds them (NHWC): on a 2-core AVX-512 CPU this measured as fast as oneDNN's blocked layout
    // for 3x3 layers of 16-256 channels and the 3-channel stems, and the step is spared two reorders per layer
    // (HigherHRNet W32 train step -9 %, YOLOv5s -4 %, RT-DETR R18 -6 %; docs/yolov5.md "Kernel gradients on NHWC
    // activations"). Where oneDNN has only its reference kernel for NHWC, x and dy are reordered into the layout it
    // picks instead.
    auto pd = BwdWPd(g, tag::nhwc);
    if (std::string(pd.impl_info_str()).rfind("ref", 0) == 0) pd = BwdWPd(g, tag::any);
    auto e = std::make_shared<Entry>();
    e->prim = dnnl::convolution_backward_weights(pd);
    SetWeights(*e, g, pd.diff_weights_desc(), false);
    e->src_md = pd.src_desc();
    e->dst_md = pd.diff_dst_desc();
    e->src_user = memory::desc(g.src(), dt::f32, tag::nhwc);
    e->dst_user = memory::desc(g.dst(), dt::f32, tag::nhwc);
    e->src_reorder = e->src_md != e->src_user;
    e->dst_reorder = e->dst_md != e->dst_user;
    if (e->src_reorder) e->src_r = MakeReorder(e->src_user, e->src_md);
    if (e->dst_reorder) e->dst_r = MakeReorder(e->dst_user, e->dst_md);
    e->scratch_md = pd.scratchpad_desc();
    return e;
  });
}

// HWIO user weights as the primitive reads them (reordered into a per-thread buffer if needed).
memory PrimWeights(Entry& e, dnnl::stream& s, const float* w) {
  memory user = Mem(e.wei_hwio, w);
  if (!e.need_reorder) return user;
  memory wr = Mem(e.wei_md, tl_wei.get(e.wei_md.get_size()));
  e.reorder.execute(s, user, wr);
  return wr;
}

template <typename F>
ffi::Error Guard(F f) {
  try {
    f();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

memory Scratch(const Entry& e) {
  return Mem(e.scratch_md, tl_scratch.get(e.scratch_md.get_size()));
}

// Forward (x -> y) and input gradient (dy -> dx) alike: one activation in, one out, HWIO weights.
void RunWithWeights(Entry& e, const float* w, int in_arg, const memory::desc& in_md, const float* in,
                    int out_arg, const memory::desc& out_md, float* out) {
  auto& s = Stream();
  memory wmem = PrimWeights(e, s, w);
  e.prim.execute(s, {{in_arg, Mem(in_md, in)},
                     {DNNL_ARG_WEIGHTS, wmem},
                     {out_arg, Mem(out_md, out)},
                     {DNNL_ARG_SCRATCHPAD, Scratch(e)}});
  s.wait();
}

ffi::Error ConvFwd(B4 x, B4 w, R4 y, int64_t stride, int64_t pad, int64_t groups) {
  auto xd = x.dimensions(), wd = w.dimensions();
  return Guard([&] {
    Geo g = MakeGeo(xd[0], xd[1], xd[2], xd[3], wd[0], wd[3], stride, pad, groups);
    auto e = FwdEntry(g);
    RunWithWeights(*e, w.typed_data(), DNNL_ARG_SRC, e->src_md, x.typed_data(), DNNL_ARG_DST,
                   e->dst_md, y->typed_data());
  });
}

ffi::Error ConvBwdData(B4 dy, B4 w, R4 dx, int64_t stride, int64_t pad, int64_t groups) {
  auto xd = dx->dimensions(), wd = w.dimensions();
  return Guard([&] {
    Geo g = MakeGeo(xd[0], xd[1], xd[2], xd[3], wd[0], wd[3], stride, pad, groups);
    auto e = BwdDataEntry(g);
    RunWithWeights(*e, w.typed_data(), DNNL_ARG_DIFF_DST, e->dst_md, dy.typed_data(),
                   DNNL_ARG_DIFF_SRC, e->src_md, dx->typed_data());
  });
}

ffi::Error ConvBwdW(B4 x, B4 dy, R4 dw, int64_t stride, int64_t pad, int64_t groups) {
  auto xd = x.dimensions(), wd = dw->dimensions();
  return Guard([&] {
    Geo g = MakeGeo(xd[0], xd[1], xd[2], xd[3], wd[0], wd[3], stride, pad, groups);
    auto e = BwdWEntry(g);
    auto& s = Stream();
    memory user = Mem(e->wei_hwio, dw->typed_data());
    memory wmem = e->need_reorder ? Mem(e->wei_md, tl_wei.get(e->wei_md.get_size())) : user;
    memory xm = Mem(e->src_user, x.typed_data()), dym = Mem(e->dst_user, dy.typed_data());
    if (e->src_reorder) {
      memory t = Mem(e->src_md, tl_src.get(e->src_md.get_size()));
      e->src_r.execute(s, xm, t);
      xm = t;
    }
    if (e->dst_reorder) {
      memory t = Mem(e->dst_md, tl_dst.get(e->dst_md.get_size()));
      e->dst_r.execute(s, dym, t);
      dym = t;
    }
    e->prim.execute(s, {{DNNL_ARG_SRC, xm},
                        {DNNL_ARG_DIFF_DST, dym},
                        {DNNL_ARG_DIFF_WEIGHTS, wmem},
                        {DNNL_ARG_SCRATCHPAD, Scratch(*e)}});
    if (e->need_reorder) e->reorder.execute(s, wmem, user);
    s.wait();
  });
}


}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvFwd, ConvFwd,
                              ffi::Ffi::Bind().Arg<B4>().Arg<B4>().Ret<B4>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("pad")
                                  .Attr<int64_t>("groups"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdData, ConvBwdData,
                              ffi::Ffi::Bind().Arg<B4>().Arg<B4>().Ret<B4>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("pad")
                                  .Attr<int64_t>("groups"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdW, ConvBwdW,
                              ffi::Ffi::Bind().Arg<B4>().Arg<B4>().Ret<B4>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("pad")
                                  .Attr<int64_t>("groups"));

// Diagnostics for the Python side: how many primitives are cached.
extern "C" int onednn_conv_cache_size() {
  std::lock_guard<std::mutex> l(mu);
  return int(cache.size());
}
