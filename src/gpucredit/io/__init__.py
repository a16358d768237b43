"""The outside world, formats only: book files, the assumptions TOML, result files, the HTML
report and text summaries. It imports io, portfolio and kernels (tests/test_layers.py)."""
