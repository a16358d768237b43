"""The JAX/XLA configuration the JAX kernels need, set by `configure_jax()` (not at import).

Two process-wide settings:

- ``jax_enable_x64``: float64 arrays exist at all (without it JAX silently makes float32 of
  float64 input). It must be on before the first float64 array is created, and before any
  kernel is traced: a program traced without it computes in float32.
- ``--xla_cpu_prefer_vector_width=512`` in ``XLA_FLAGS``: XLA's CPU backend may emit
  512-bit vectors (AVX-512), ~25% faster period loop. XLA reads ``XLA_FLAGS`` once, when its
  first backend starts (the first array, device query or compilation), so this only acts if
  `configure_jax` runs before that; a width the user set is left alone. GPU backends ignore
  it.

Entry points call `configure_jax()` first: the CLI's command group, `portfolio.engine.simulate`
and the test suite's conftest. The public functions of the JAX kernels (`kernels.jax_engine`,
`kernels.sharding`) call it too, at their first use, so a library caller that goes straight to
the kernels gets the same numbers; for the vector-width flag to act there, call
`configure_jax()` before doing anything else with JAX. Idempotent: after the first call it
returns at once (and does not undo a later change of either setting by the caller). Importing
this module does not import JAX.
"""

from __future__ import annotations

import os

__all__ = ["configure_jax"]

_configured = False


def _prefer_wide_cpu_vectors() -> None:
    """Append --xla_cpu_prefer_vector_width=512 to XLA_FLAGS unless a width is set there."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_prefer_vector_width" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_prefer_vector_width=512").strip()


def configure_jax() -> None:
    """Turn on float64 (``jax_enable_x64``) and prefer 512-bit CPU vectors (``XLA_FLAGS``).

    Once per process; call it before JAX's first backend starts for the XLA flag to act.
    """
    global _configured
    if _configured:
        return
    _prefer_wide_cpu_vectors()
    import jax

    jax.config.update("jax_enable_x64", True)
    _configured = True
