"""The CPU speed layer: the same layers as flax.linen (same parameters, same outputs to float
rounding), computed faster on XLA:CPU, where the networks here train in CI and on laptops.

  layers.py   `Layers` / `select(conv_impl)`: the one place that chooses the implementations;
              models receive it as a module argument (on GPU/TPU: `PLAIN`, flax's computations)
  conv.py     convolutions: matrix products for 1x1, per-tap kernel gradients, phase-split strided
              input gradients, oneDNN kernels (`kernels/`) as XLA custom calls
  norm.py     BatchNorm + activation (SiLU, ReLU) with a memory-lean custom gradient
  pool.py     stride-1 max pooling with a cheap gradient (torch's tie routing)
  hostenv.py  glibc malloc tunables for XLA's large per-step buffers (`launch.py`, `run.sh`)

Nothing here changes what a model computes; tests/cpu/ checks each against the plain layer.
"""
