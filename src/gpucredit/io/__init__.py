"""The outside world: book files, the assumptions TOML, result files and the HTML report."""
