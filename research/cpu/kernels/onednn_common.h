// What the oneDNN kernels of this folder share (onednn_conv.cc, onednn_conv_infer.cc): one CPU engine, a stream per
// thread, growable aligned per-thread buffers, and the FFI buffer types. Inline functions, so both translation
// units of the library use the same engine.
#pragma once

#include <cstddef>
#include <cstdlib>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace research_onednn {

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

inline dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

inline dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

// Growable, 64-byte aligned scratch buffer (one per thread and purpose).
struct Buf {
  void* p = nullptr;
  size_t n = 0;
  void* get(size_t want) {
    if (want > n) {
      std::free(p);
      n = (want + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, n);
    }
    return p;
  }
  ~Buf() { std::free(p); }
};

// A oneDNN memory over a buffer XLA owns.
inline dnnl::memory Mem(const dnnl::memory::desc& md, const void* p) {
  return dnnl::memory(md, Engine(), const_cast<void*>(p));
}

using B1 = xla::ffi::Buffer<xla::ffi::F32, 1>;
using B4 = xla::ffi::Buffer<xla::ffi::F32, 4>;
using R4 = xla::ffi::ResultBuffer<xla::ffi::F32, 4>;

}  // namespace research_onednn
