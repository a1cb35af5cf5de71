"""oneDNN convolutions as XLA:CPU custom calls (`onednn_conv.cc`): build, load, call.

PyTorch runs its CPU convolutions through oneDNN; XLA:CPU has its own, which measured 1.5-3x
slower on the high-resolution, few-channel layers of a detector (the stem, strided 3x3s, 3x3s
with 32-64 channels). This module gives JAX the oneDNN primitives through the XLA FFI:

  conv(x, w, stride, padding, groups=1) -> y            NHWC x, HWIO w, float32, symmetric padding
  conv_input_grad(dy, w, x_shape, stride, padding, groups=1) -> dx
  conv_kernel_grad(x, dy, w_shape, stride, padding, groups=1) -> dw

`groups` is lax's `feature_group_count` (w `[k, k, Ci / groups, Co]`), one oneDNN primitive for
all groups.

The library comes from the pinned PyPI wheels `onednn-cpu-gomp` (libdnnl.so.3, GNU OpenMP) and
`onednn-devel-cpu-gomp` (headers), installed into the environment's prefix. The C++ source is
compiled once with the system C++ compiler (`$CXX`, default g++; about 4 s) into
`$RESEARCH_KERNEL_CACHE` (default `<repo>/.cache/kernels`), named by a hash of the source, the
jaxlib version and the oneDNN paths, under a file lock (test workers build it once), and loaded
with ctypes. `available()` says whether this works here and, if not, why; `research.cpu.conv`
falls back to its XLA computation then.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "onednn_conv.cc")
SOURCES = (SOURCE, os.path.join(_HERE, "onednn_conv_infer.cc"))  # compiled into one library
HEADERS = (os.path.join(_HERE, "onednn_common.h"),)
_TARGETS = ("OnednnConvFwd", "OnednnConvBwdData", "OnednnConvBwdW", "OnednnConvAffineAct", "OnednnConvAffineAddAct",
            "OnednnMaterialize")


class OnednnUnavailable(RuntimeError):
    """The oneDNN kernels cannot be built or loaded here (the message says what is missing)."""


def _cache_dir() -> str:
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(_HERE))), ".cache", "kernels")
    return os.environ.get("RESEARCH_KERNEL_CACHE", default)


def _find_onednn() -> tuple[str, str]:
    """(include dir, path of libdnnl.so.3) from the environment's prefix."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, "/usr/local", "/usr")):
        inc, lib = os.path.join(prefix, "include"), os.path.join(prefix, "lib", "libdnnl.so.3")
        if os.path.isfile(os.path.join(inc, "oneapi", "dnnl", "dnnl.hpp")) and os.path.isfile(lib):
            return inc, lib
    raise OnednnUnavailable(
        f"oneDNN headers/library not found under {sys.prefix} (include/oneapi/dnnl/dnnl.hpp, "
        "lib/libdnnl.so.3): pip install -r requirements.txt (onednn-cpu-gomp, onednn-devel-cpu-gomp)")


def build() -> str:
    """Path of the compiled kernel library, building it if needed."""
    inc, lib = _find_onednn()
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise OnednnUnavailable(f"C++ compiler {cxx!r} not found (set $CXX), needed once to build {SOURCE}")
    srcs = []
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            srcs.append(f.read())
    jaxlib_version = importlib.metadata.version("jaxlib")  # the FFI headers come with it
    key = hashlib.sha256(b"\0".join([*srcs, jaxlib_version.encode(), inc.encode(), lib.encode()])).hexdigest()[:16]
    out_dir = _cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"onednn_conv-{key}.so")
    if os.path.exists(out):
        return out
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(out):  # built by another process meanwhile
                return out
            tmp = f"{out}.{os.getpid()}.tmp"
            cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-o", tmp, *SOURCES, "-I", inc,
                   "-I", jax.ffi.include_dir(), lib, f"-Wl,-rpath,{os.path.dirname(lib)}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise OnednnUnavailable(f"building {' '.join(SOURCES)} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
            os.replace(tmp, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@functools.lru_cache(maxsize=None)
def _load():
    """Builds (if needed), loads and registers the custom calls; OnednnUnavailable otherwise."""
    path = build()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise OnednnUnavailable(f"cannot load {path}: {e}") from e
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(True, "") if the kernels load here, else (False, the reason)."""
    try:
        _load()
    except OnednnUnavailable as e:
        return False, str(e)
    return True, ""


def cache_size() -> int:
    """Primitives created so far (one per layer shape and direction)."""
    return int(_load().onednn_conv_cache_size())


def _attrs(stride: int, padding: int) -> dict:
    return {"stride": np.int64(stride), "pad": np.int64(padding)}


def _conv_attrs(stride: int, padding: int, groups: int) -> dict:
    """The attributes of the three `onednn_conv.cc` handlers (the inference ones take no groups)."""
    return dict(_attrs(stride, padding), groups=np.int64(groups))


def _check_groups(cin: int, w_shape, groups: int) -> None:
    k, _, wcin, cout = w_shape
    if groups < 1 or cin % groups or cout % groups or wcin * groups != cin:
        raise ValueError(f"oneDNN conv: groups={groups} does not fit {cin} input channels and an HWIO kernel "
                         f"{tuple(w_shape)} (needs [k, k, {cin} / groups, Co] with groups dividing Co)")


def _out(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


def conv(x, w, stride: int, padding: int, groups: int = 1):
    """Forward: NHWC float32 x `[N, H, W, Ci]`, HWIO float32 w `[k, k, Ci / groups, Co]` (square
    kernel) -> `[N, Ho, Wo, Co]`. Raises ValueError if `groups` does not fit the shapes."""
    _load()
    n, h, wd, cin = x.shape
    k, _, _, cout = w.shape
    _check_groups(cin, w.shape, groups)
    out = jax.ShapeDtypeStruct((n, _out(h, k, stride, padding), _out(wd, k, stride, padding), cout),
                               jnp.float32)
    return jax.ffi.ffi_call("OnednnConvFwd", out)(x, w, **_conv_attrs(stride, padding, groups))


def conv_input_grad(dy, w, x_shape, stride: int, padding: int, groups: int = 1):
    """Input gradient `[N, H, W, Ci]` (`x_shape`) of `conv` from `dy` `[N, Ho, Wo, Co]`."""
    _load()
    _check_groups(x_shape[3], w.shape, groups)
    out = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
    return jax.ffi.ffi_call("OnednnConvBwdData", out)(dy, w, **_conv_attrs(stride, padding, groups))


def conv_kernel_grad(x, dy, w_shape, stride: int, padding: int, groups: int = 1):
    """Kernel gradient `[k, k, Ci / groups, Co]` (`w_shape`) of `conv` from `x` and `dy`."""
    _load()
    _check_groups(x.shape[3], w_shape, groups)
    out = jax.ShapeDtypeStruct(tuple(w_shape), jnp.float32)
    return jax.ffi.ffi_call("OnednnConvBwdW", out)(x, dy, **_conv_attrs(stride, padding, groups))


def conv_affine_act(x, w, scale, bias, stride: int, padding: int, relu: bool, residual=None):
    """Inference convolution with a per-channel affine, optional residual and ReLU in one oneDNN call
    (`onednn_conv_infer.cc`): `act(conv(x, w) * scale + bias [+ residual])` for NHWC float32 x `[N, H, W, Ci]`, HWIO
    w `[k, k, Ci, Co]` (square, groups 1), scale and bias `[Co]` (a BatchNorm with running statistics: scale =
    gamma / sqrt(var + eps), bias = beta - mean * scale; scale None: ones), residual `[N, Ho, Wo, Co]`; returns
    `[N, Ho, Wo, Co]`. Forward only (no gradient is defined).

    Raises:
      ValueError: a scale, bias or residual whose shape does not fit.
    """
    _load()
    n, h, wd, _ = x.shape
    k, _, _, cout = w.shape
    shape = (n, _out(h, k, stride, padding), _out(wd, k, stride, padding), cout)
    scale = jnp.ones((cout,), jnp.float32) if scale is None else scale
    for name, v in (("scale", scale), ("bias", bias)):
        if tuple(v.shape) != (cout,):
            raise ValueError(f"oneDNN conv_affine_act: {name} shape {tuple(v.shape)}, expected ({cout},)")
    attrs = dict(_attrs(stride, padding), relu=np.int64(bool(relu)))
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    args = (x, w, scale.astype(jnp.float32), bias.astype(jnp.float32))
    if residual is None:
        return jax.ffi.ffi_call("OnednnConvAffineAct", out)(*args, **attrs)
    if tuple(residual.shape) != shape:
        raise ValueError(f"oneDNN conv_affine_act: residual shape {tuple(residual.shape)}, expected {shape}")
    return jax.ffi.ffi_call("OnednnConvAffineAddAct", out)(*args, residual.astype(jnp.float32), **attrs)


@jax.custom_jvp
def materialize(x):
    """The identity, as a custom call XLA:CPU cannot fuse through (`OnednnMaterialize`, output aliasing the input):
    every consumer reads `x` from its buffer instead of recomputing it (see `onednn_conv_infer.cc`). Differentiable
    (the tangent passes through). Any shape and dtype."""
    _load()
    return jax.ffi.ffi_call("OnednnMaterialize", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            input_output_aliases={0: 0})(x)


@materialize.defjvp
def _materialize_jvp(primals, tangents):
    return materialize(primals[0]), tangents[0]
