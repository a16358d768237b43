"""The backends of a run: one object per (parameters, grid, loans, seed, precision and the
importance-sampling shift) that computes pass-1 chunks (`run_chunk`), per-loan losses at given
scenarios (`loan_losses_at`) and, on JAX, loss gradients (`weighted_gradient`). `make_backend`
picks one by name and the devices present; a `Simulation` carries what builds one (in each
process that runs its tasks)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from gpucredit.kernels import reference
from gpucredit.kernels.outputs import ChunkOutput
from gpucredit.kernels.params import LoanArrays, ModelGrid, ModelParams
from gpucredit.portfolio.settings import BACKENDS, PRECISIONS, EngineError


class NumpyBackend:
    """The float64 reference: slow by design, the yardstick of every other backend."""

    name = "numpy"
    precision = "float64"
    device = "cpu (numpy reference)"
    default_chunk_size = 256

    def __init__(
        self,
        params: ModelParams,
        grid: ModelGrid,
        loans: LoanArrays,
        seed: int,
        normal_shift: np.ndarray | None = None,
    ):
        self.params, self.grid, self.loans, self.seed = params, grid, loans, seed
        self.normal_shift = normal_shift

    def run_chunk(
        self, first_scenario: int, count: int, padded_count: int | None = None
    ) -> ChunkOutput:
        """Scenarios [first, first + count). `padded_count` (the run's chunk size) is for
        compiled backends; the reference compiles nothing and ignores it."""
        scenarios = np.arange(first_scenario, first_scenario + count, dtype=np.uint32)
        out = reference.simulate_outcomes(
            self.params, self.grid, self.loans, self.seed, scenarios, self.normal_shift
        )
        shifted = self.normal_shift is not None
        w = np.exp(out.log_likelihood_ratio) if shifted else np.ones(count)
        return ChunkOutput(
            losses_usd=out.loss_usd.sum(axis=1),
            loan_loss_sum_usd=w @ out.loss_usd,
            loan_default_probability_sum=w @ out.default_probability,
            loan_defaulted_exposure_sum_usd=w @ out.defaulted_exposure_usd,
            log_weights=out.log_likelihood_ratio if shifted else None,
        )

    def loan_losses_at(self, scenarios: np.ndarray) -> np.ndarray:
        """[S, N] loss per loan at the given scenario indices."""
        return reference.simulate_chunk(
            self.params, self.grid, self.loans, self.seed, scenarios, self.normal_shift
        )


class JaxBackend:
    """The jit-compiled JAX kernels (CPU or GPU), float32 or float64."""

    name = "jax"
    default_chunk_size = 8192

    def __init__(
        self,
        params: ModelParams,
        grid: ModelGrid,
        loans: LoanArrays,
        seed: int,
        precision: str,
        block_size: int | None = None,
        normal_shift: np.ndarray | None = None,
    ):
        import jax

        from gpucredit.kernels import jax_engine

        self._engine = jax_engine
        self.params, self.grid, self.seed, self.precision = params, grid, seed, precision
        self.normal_shift = normal_shift
        self.n_loans = len(loans.gpu_count)
        # prepare_loans itself shrinks the block of a small book to the next power of two
        # >= N, so books that pad to the same shape share one compilation; passing
        # min(block_size, N) here would give every book size its own shape (and compile).
        self.blocks = jax_engine.prepare_loans(loans, precision, block_size)
        self.device = device_name(jax.devices()[0])
        self._loans, self._block_size = loans, block_size
        self._schedule_tangent = None  # d(schedule leaves)/d rate.level, built on first use

    def run_chunk(
        self, first_scenario: int, count: int, padded_count: int | None = None
    ) -> ChunkOutput:
        """Scenarios [first, first + count), computed by the program of `padded_count`
        scenarios when that is more (the run's chunk size: its short last chunk then reuses
        the full chunks' compilation) and the rest dropped."""
        size = max(count, padded_count or 0)
        if first_scenario + size > 2**32:  # indices are uint32
            size = count
        log_weights = None
        if self.normal_shift is not None:
            log_weights = np.asarray(
                self._engine.importance_log_weights(
                    self.grid, self.seed, first_scenario, size, self.normal_shift
                )
            )
        out = self._engine.chunk_outcomes(
            self.params,
            self.grid,
            self.blocks,
            self.seed,
            first_scenario,
            size,
            normal_shift=self.normal_shift,
            scenario_weights=None if log_weights is None else np.exp(log_weights),
            valid_count=count,
        )
        losses, loss_sum, pd_sum, ead_sum = (np.asarray(x, dtype=np.float64) for x in out)
        if log_weights is not None:
            log_weights = log_weights[:count]
        return ChunkOutput(losses[:count], loss_sum, pd_sum, ead_sum, log_weights)

    def loan_losses_at(self, scenarios: np.ndarray) -> np.ndarray:
        out = self._engine.loan_losses_at(
            self.params,
            self.grid,
            self.blocks,
            self.seed,
            np.asarray(scenarios, np.uint32),
            normal_shift=self.normal_shift,
        )
        return np.asarray(out, dtype=np.float64)

    @property
    def schedule_rate_tangent(self) -> tuple:
        """d(schedule leaves)/d rate.level (`jax_engine.schedule_tangent`), built on first use."""
        if self._schedule_tangent is None:
            self._schedule_tangent = self._engine.schedule_tangent(
                self._loans, float(self.params.rate_level), self.grid.steps_per_year,
                self._block_size,
            )  # fmt: skip
        return self._schedule_tangent

    def weighted_gradient(self, scenarios: np.ndarray, coefficients: np.ndarray) -> ModelParams:
        """Σ_j c_j ∂L(ω_j)/∂θ for every leaf θ of ModelParams (conditional mode); ∂/∂rate.level
        includes r(0)'s effect on the floating annuities' schedules (docs/spec.md §3)."""
        _, grads = self._engine.weighted_loss_gradient(
            self.params,
            self.grid,
            self.blocks,
            self.seed,
            np.asarray(scenarios, np.uint32),
            np.asarray(coefficients),
            normal_shift=self.normal_shift,
            schedule_rate_tangent=self.schedule_rate_tangent,
        )
        return grads


class ShardedJaxBackend:
    """The JAX backend with each chunk sharded over the local devices (jax.sharding).

    A chunk of D × `per_device` scenarios runs `per_device` scenarios on each device
    (kernels/sharding.py), so the losses are bit-identical to `JaxBackend` with chunk size
    `per_device` on one device; the per-loan sums agree to float rounding (added per device).
    Chunks of another size (the last one of a run) fall back to single-device sub-chunks of
    `per_device`, which keeps the losses identical there too.
    """

    name = "jax"

    def __init__(self, params, grid, loans, seed, precision, devices=None, per_device=None):
        from gpucredit.kernels.sharding import scenario_mesh

        per_device = per_device or GPU_CHUNK_SIZE  # the run's chunk is this × the devices

        self._single = JaxBackend(params, grid, loans, seed, precision)
        self.params, self.grid, self.seed, self.precision = params, grid, seed, precision
        self.blocks = self._single.blocks
        self.mesh = scenario_mesh(devices)
        self.per_device = per_device
        self.default_chunk_size = per_device * self.mesh.devices.size
        self.device = f"{self.mesh.devices.size} × {self._single.device}"

    def run_chunk(
        self, first_scenario: int, count: int, padded_count: int | None = None
    ) -> ChunkOutput:
        """`padded_count` as JaxBackend's. A chunk of another size than D × `per_device` (a
        run's short last chunk, or a run with its own --chunk-size) goes to one device in
        sub-chunks of min(per_device, padded_count or count) scenarios, each computed by the
        program of that size."""
        from gpucredit.kernels.sharding import sharded_chunk_outcomes

        if count != self.default_chunk_size:
            sub = min(self.per_device, padded_count or count)
            parts = [
                self._single.run_chunk(s, min(sub, first_scenario + count - s), sub)
                for s in range(first_scenario, first_scenario + count, sub)
            ]
            return ChunkOutput(
                np.concatenate([p.losses_usd for p in parts]),
                *(sum(getattr(p, f) for p in parts) for f in _SUM_FIELDS),
            )
        out = sharded_chunk_outcomes(
            self.params,
            self.grid,
            self.blocks,
            self.seed,
            first_scenario,
            self.per_device,
            self.mesh,
        )
        losses, *sums = (np.asarray(x, dtype=np.float64) for x in out)
        return ChunkOutput(losses, *(s.sum(axis=0) for s in sums))

    def loan_losses_at(self, scenarios: np.ndarray) -> np.ndarray:
        return self._single.loan_losses_at(scenarios)

    def weighted_gradient(self, scenarios: np.ndarray, coefficients: np.ndarray) -> ModelParams:
        return self._single.weighted_gradient(scenarios, coefficients)


_SUM_FIELDS = (
    "loan_loss_sum_usd",
    "loan_default_probability_sum",
    "loan_defaulted_exposure_sum_usd",
)


class CupyBackend:
    """The fused CUDA kernel (kernels/cupy_engine.py) for pass 1; the tail pass goes to the JAX
    engine on the same device, and runs take their gradients from a JaxBackend
    (`Simulation(gradient=True)`)."""

    name = "cupy"

    def __init__(
        self,
        params: ModelParams,
        grid: ModelGrid,
        loans: LoanArrays,
        seed: int,
        precision: str,
        block_size: int | None = None,
    ):
        import cupy as cp

        from gpucredit.kernels import cupy_engine

        self._engine = cupy_engine
        self.params, self.grid, self.loans, self.seed = params, grid, loans, seed
        self.precision = str(np.dtype(precision))
        self.block_size = block_size
        self.n_loans = len(loans.gpu_count)
        self.prepared = cupy_engine.prepare_loans_cupy(loans, np.dtype(precision))
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        self.device = f"gpu: {name.decode() if isinstance(name, bytes) else name} (cupy)"
        self._blocks = None

    def run_chunk(
        self, first_scenario: int, count: int, padded_count: int | None = None
    ) -> ChunkOutput:
        """`padded_count` is ignored: the kernel takes the scenario count at run time (only
        its random inputs, a small JAX program, compile once per chunk size)."""
        out = self._engine.chunk_outcomes_cupy(
            self.params, self.grid, self.prepared, self.seed, first_scenario, count
        )
        return ChunkOutput(*(np.asarray(x.get(), dtype=np.float64) for x in out))

    def loan_losses_at(self, scenarios: np.ndarray) -> np.ndarray:
        """[S, N] loss per loan at the given scenario indices (the JAX engine's)."""
        from gpucredit.kernels import jax_engine

        if self._blocks is None:
            self._blocks = jax_engine.prepare_loans(self.loans, self.precision, self.block_size)
        out = jax_engine.loan_losses_at(
            self.params, self.grid, self._blocks, self.seed, np.asarray(scenarios, np.uint32)
        )
        return np.asarray(out, dtype=np.float64)


def device_name(device) -> str:
    """'gpu (NVIDIA H100 80GB HBM3)', or 'cpu (2 cores)'."""

    if device.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, jax)"
    return f"{device.platform} ({getattr(device, 'device_kind', 'unknown')})"


def choose_backend(name: str) -> str:
    """`auto` is JAX (CPU or GPU). The CuPy kernel is chosen only by name: it ran 1.62× JAX's
    forward on an H100, but a whole run on it has not been checked on a GPU yet
    (bench/results/gpu-h100.md)."""
    if name not in BACKENDS:
        raise EngineError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "cupy":
        from gpucredit.kernels import cupy_engine

        if not cupy_engine.available():
            raise EngineError(
                "the cupy backend needs CuPy and an NVIDIA GPU (pip install 'gpucredit[gpu]')"
            )
    return "jax" if name == "auto" else name


def make_backend(
    name: str,
    precision: str,
    params: ModelParams,
    grid: ModelGrid,
    loans: LoanArrays,
    seed: int,
    normal_shift: np.ndarray | None = None,
):
    """The backend `name` for a run; `normal_shift` [T, K] turns on importance sampling."""
    name = choose_backend(name)
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; choose float32 or float64")
    if name == "numpy":
        return NumpyBackend(params, grid, loans, seed, normal_shift)
    if name == "cupy":
        if normal_shift is not None:
            raise EngineError("importance sampling runs on the jax and numpy backends, not cupy")
        return CupyBackend(params, grid, loans, seed, precision)
    if len(_local_gpus()) > 1 and normal_shift is None:
        return ShardedJaxBackend(params, grid, loans, seed, precision)  # several GPUs, one host
    # One device; importance sampling on a host of several GPUs too (the sharded chunks do
    # not carry likelihood ratios).
    return JaxBackend(params, grid, loans, seed, precision, normal_shift=normal_shift)


@dataclass(frozen=True, eq=False)
class Simulation:
    """One prepared simulation: the loans (schedules and PD references already computed),
    parameters, grid, seed, precision and importance-sampling shift of a run or of one stress
    case. Pass 1, per-loan tail losses and gradients are pure functions of it and a scenario
    index; a runner builds its backend once (`build`, in each process that runs its tasks:
    a Dask worker receives it once). `gradient`: the conditional-mode JAX backend of the
    sensitivities pass."""

    backend: str
    precision: str
    params: ModelParams
    grid: ModelGrid
    loans: LoanArrays
    seed: int
    normal_shift: np.ndarray | None = None
    gradient: bool = False

    def key(self) -> tuple:
        """What tells simulations apart without comparing arrays: values, and the identity of
        the array-holding fields (a runner keeps the simulation alive while it keys on it)."""
        return (
            self.backend, self.precision, id(self.params), self.grid, id(self.loans),
            self.seed, id(self.normal_shift), self.gradient,
        )  # fmt: skip

    def build(self):
        """The backend computing it (`make_backend`; the gradient backend is always JAX)."""
        if self.gradient:
            return JaxBackend(
                self.params,
                self.grid._replace(mode="conditional"),
                self.loans,
                self.seed,
                self.precision,
                normal_shift=self.normal_shift,
            )
        return make_backend(
            self.backend,
            self.precision,
            self.params,
            self.grid,
            self.loans,
            self.seed,
            self.normal_shift,
        )


def _local_gpus() -> list:
    import jax

    return [d for d in jax.devices() if d.platform == "gpu"]


GPU_CHUNK_SIZE = 65536  # scenarios per GPU and chunk: launch overhead is < 5% from here on


def gradient_chunk_size() -> int:
    """Tail scenarios per gradient task, decided on the driver: 256 on a CPU; 4,096 where JAX
    (which computes every gradient) has a GPU, since there a task of 256 is launch-bound
    (H100, example book: the tail forward takes 4.7 ms at 256 scenarios and 5.9 ms at 4,096;
    bench/results/gpu-h100.md). One value for the local and the Dask runner, so their
    results agree."""
    return 4096 if _local_gpus() else 256


def default_chunk_size(backend: str, importance_sampling: bool = False) -> int:
    """Scenarios per chunk when none is given, the one rule for the CLI and `simulate` (the
    chunking fixes the float32 numbers): the backend's own default on a CPU (small for the
    NumPy reference, which materialises [S, N] per period), 65,536 per GPU (CuPy, or JAX on
    one or more GPUs; importance sampling runs on one GPU): small chunks leave a GPU idle
    between kernel launches."""
    name = choose_backend(backend)
    if name == "numpy":
        return NumpyBackend.default_chunk_size
    if name == "cupy":
        return GPU_CHUNK_SIZE
    gpus = len(_local_gpus())
    if importance_sampling:
        gpus = min(gpus, 1)  # make_backend: one device
    return GPU_CHUNK_SIZE * gpus if gpus else JaxBackend.default_chunk_size
