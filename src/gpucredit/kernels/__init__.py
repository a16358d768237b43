"""Numeric kernels: pure functions of arrays and a parameter pytree.

`kernels` imports nothing else of gpucredit. Modules:
  params       the parameter pytree, the static grid and the per-loan arrays
  rng          Threefry-2x32-20 random numbers of docs/spec.md §8 (NumPy and JAX)
  schedule     per-book constants (balance schedules, today's metrics), float64 NumPy
  reference    the NumPy reference of docs/spec.md §2-6, float64, slow by design
  jax_engine   the jit-compiled JAX forward pass and its gradients: the public API of
               jax_loans (the book in blocks), jax_factors (shocks, factor paths),
               jax_step (one block's period loop), jax_forward (the passes), jax_backward
               (the gradient) and jax_args (argument handling)
  jax_setup    configure_jax(): the JAX/XLA settings, set by entry points, not on import
  sharding     a pass-1 chunk sharded over the devices of one host
  cupy_engine  the CuPy forward kernel (NVIDIA GPUs)
"""
