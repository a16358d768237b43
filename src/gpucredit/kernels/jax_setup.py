"""The JAX/XLA configuration the JAX kernels need, set by `configure_jax()` (not at import).

Process-wide settings:

- ``jax_enable_x64``: float64 arrays exist at all (without it JAX silently makes float32 of
  float64 input). It must be on before the first float64 array is created, and before any
  kernel is traced: a program traced without it computes in float32.
- ``--xla_cpu_prefer_vector_width=512`` in ``XLA_FLAGS``: XLA's CPU backend may emit
  512-bit vectors (AVX-512), ~25% faster period loop. XLA reads ``XLA_FLAGS`` once, when its
  first backend starts (the first array, device query or compilation), so this only acts if
  `configure_jax` runs before that; a width the user set is left alone. GPU backends ignore
  it.
- ``--xla_cpu_copy_insertion_use_region_analysis=true`` (jaxlib >= 0.10, where the flag
  exists: XLA aborts on a flag it does not know): without it XLA's CPU backend copies the
  period loop's [S, b] carry (cash, survival) every period of both passes (two of the ~8
  [S, b] arrays a period writes, `bench/hlo_profile.py`); about 8% on the conditional
  forward run. Buffers only: the numbers are bit-identical (the golden runs).

Entry points call `configure_jax()` first: the CLI's command group, `portfolio.engine.simulate`
and the test suite's conftest. The public functions of the JAX kernels (`kernels.jax_engine`,
`kernels.sharding`) call it too, at their first use, so a library caller that goes straight to
the kernels gets the same numbers; for the vector-width flag to act there, call
`configure_jax()` before doing anything else with JAX. Idempotent: after the first call it
returns at once (and does not undo a later change of any of these settings by the caller). Importing
this module does not import JAX.
"""

from __future__ import annotations

import os

__all__ = ["configure_jax"]

_configured = False


def _prefer_wide_cpu_vectors() -> None:
    """Append --xla_cpu_prefer_vector_width=512 to XLA_FLAGS unless a width is set there."""
    _add_xla_flag("xla_cpu_prefer_vector_width", "512")


def _region_analysis_copies() -> None:
    """Append --xla_cpu_copy_insertion_use_region_analysis=true where jaxlib knows the flag."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major_minor = tuple(int(x) for x in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return
    if major_minor >= (0, 10):
        _add_xla_flag("xla_cpu_copy_insertion_use_region_analysis", "true")


def _add_xla_flag(name: str, value: str) -> None:
    """Append --name=value to XLA_FLAGS unless the user set that flag."""
    flags = os.environ.get("XLA_FLAGS", "")
    if name not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --{name}={value}").strip()


def configure_jax() -> None:
    """Turn on float64 (``jax_enable_x64``), prefer 512-bit CPU vectors and region-analysis
    copy insertion (``XLA_FLAGS``).

    Once per process; call it before JAX's first backend starts for the XLA flag to act.
    """
    global _configured
    if _configured:
        return
    _prefer_wide_cpu_vectors()
    _region_analysis_copies()
    import jax

    jax.config.update("jax_enable_x64", True)
    _configured = True
