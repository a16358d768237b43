"""The domain: the book and the assumptions (built from a parsed document: document.py's schema
and merge rules, correlation.py's Σ), the run (settings, backends, runner, engine and the Dask
runner in distributed), risk measures, contributions, sensitivities, stress scenarios,
calibration, reverse stress, the synthetic book and the validation checks.

It imports portfolio and kernels only, never io or cli (tests/test_layers.py): files are read
and written by the callers.
"""
