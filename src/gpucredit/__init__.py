"""gpucredit: Monte Carlo credit risk for loan books secured by GPU fleets."""

__version__ = "0.1.0"
