"""The factors' correlation matrix Σ (docs/spec.md §2, §10): assembly from the group values
and pairs of a merged `[correlation]` table, the positive-definiteness check, and the nearest
correlation matrix (Higham 2002) that `--repair-correlation` puts in place of a matrix that
fails it."""

from __future__ import annotations

import numpy as np

from gpucredit.kernels.params import MARKET_FACTORS, factor_names

MIN_EIGENVALUE = 1e-12  # a correlation matrix with a smaller eigenvalue is refused
REPAIR_EIGENVALUE = 1e-8  # the repaired matrix's eigenvalues are nudged to at least this


def assemble_correlation(correlation: dict, generations: tuple[str, ...]) -> np.ndarray:
    """Σ [K, K], K = 2G + 5, in the factor order of docs/spec.md §2, from the group values and
    the pairs of a merged `[correlation]` table. Symmetric with a unit diagonal."""
    G = len(generations)
    K = 2 * G + 5
    rent = list(range(G))
    price = list(range(G, 2 * G))
    btc, eth, power, rate, credit = (2 * G + j for j in range(len(MARKET_FACTORS)))
    crypto = [btc, eth]
    sigma = np.zeros((K, K))

    def put(rows, cols, value: float) -> None:
        for j in rows:
            for k in cols:
                if j != k:
                    sigma[j, k] = sigma[k, j] = value

    put(rent, rent, correlation["rent_rent"])
    put(price, price, correlation["price_price"])
    for g in range(G):
        for h in range(G):
            group = "rent_price_same" if g == h else "rent_price_cross"
            put([rent[g]], [price[h]], correlation[group])
    put([btc], [eth], correlation["btc_eth"])
    put(crypto, rent, correlation["crypto_rent"])
    put(crypto, price, correlation["crypto_price"])
    put([credit], rent, correlation["credit_rent"])
    put([credit], price, correlation["credit_price"])
    put([credit], crypto, correlation["credit_crypto"])
    put([power], rent, correlation["power_rent"])
    put([rate], crypto, correlation["rate_crypto"])
    index = {name: j for j, name in enumerate(factor_names(generations))}
    for pair in correlation.get("pairs", []):
        put([index[pair["a"]]], [index[pair["b"]]], pair["value"])
    np.fill_diagonal(sigma, 1.0)
    return sigma


def smallest_eigenvalue(sigma: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(sigma).min())


def is_positive_definite(sigma: np.ndarray) -> bool:
    """Cholesky succeeds and the smallest eigenvalue exceeds MIN_EIGENVALUE."""
    try:
        np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        return False
    return smallest_eigenvalue(sigma) > MIN_EIGENVALUE


def nearest_correlation(
    sigma: np.ndarray, tol: float = 1e-12, max_iterations: int = 10_000
) -> np.ndarray:
    """The nearest correlation matrix to a symmetric `sigma` [K, K] in the Frobenius norm:
    Higham (2002) alternating projections onto the PSD cone and the unit-diagonal set, with
    Dykstra's correction on the (non-affine) PSD step. Then eigenvalues are lifted to at
    least REPAIR_EIGENVALUE and the diagonal rescaled to 1, so the result is strictly PD."""
    a = (sigma + sigma.T) / 2
    y = a.copy()
    correction = np.zeros_like(a)  # Dykstra's ΔS
    for _ in range(max_iterations):
        r = y - correction
        w, v = np.linalg.eigh(r)
        x = (v * np.maximum(w, 0.0)) @ v.T  # projection onto the PSD cone
        correction = x - r
        y_next = x.copy()
        np.fill_diagonal(y_next, 1.0)  # projection onto unit-diagonal matrices
        change = np.linalg.norm(y_next - y) / max(np.linalg.norm(y), 1.0)
        y = y_next
        if change < tol:
            break
    # The limit is PSD with its smallest eigenvalue at 0: nudge it strictly inside.
    for _ in range(100):
        y = (y + y.T) / 2
        if is_positive_definite(y) and smallest_eigenvalue(y) >= REPAIR_EIGENVALUE / 2:
            break
        w, v = np.linalg.eigh(y)
        y = (v * np.maximum(w, REPAIR_EIGENVALUE)) @ v.T
        d = 1 / np.sqrt(np.diag(y))
        y = y * d[:, None] * d[None, :]
    np.fill_diagonal(y, 1.0)
    return y
