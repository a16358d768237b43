// gpucredit: the fused adjoint (reverse mode) of the conditional-mode two-pass loss
// (CuPy backend, kernels/cupy_adjoint.py), docs/spec.md §3-7.
//
// Compiled after forward.cu in one translation unit (the host concatenates the two sources;
// nothing is #included): it uses forward.cu's slot macros (M_*, L_*, LI_*, P_*, F_*), its
// gc_* helpers and warp_sum, and repeats forward.cu's period arithmetic (conditional mode
// only: a gradient is always the conditional-mode loss's) in gc_period below.
//
// The gradient J = Σ_s c_s L_s runs as kernels/jax_backward.py's `_loss_gradient` does:
//   1. pass 1 (forward.cu, forward_kernel<real, false>): Q[s, t, g];  H = H(θ, Q) in JAX;
//   2. recovery_kernel: the period loop with the haircut, the losses L_s and the recovery
//      weights R_g(t) = Σ_i DF d_i 1[EAD_i > Rec_i] n_i a_i (1 − c_i), so that the haircut's
//      cotangent is H̄ = c P R and Q̄ = (∂H/∂Q)ᵀ H̄ (JAX, before this kernel);
//   3. adjoint_kernel: per (loan, scenario) the period loop forward, storing the cash and the
//      survival before each period (local arrays of GPUCREDIT_ADJOINT_MAX_T), then backwards
//      through the periods recomputing everything else, with the cotangents c_s (of the
//      loss) and Q̄ (of the loan's liquidation volume n a d(t)) as seeds, H held fixed;
//   4. the cotangents of the factor rows go back through the factor table's VJP in JAX, the
//      per-loan and model cotangents to ModelParams on the host.
//
// Launch as forward.cu: blockIdx.y = a tile of blockDim.x loans (one per thread), blockIdx.x
// = a group of `per_block` consecutive scenarios looped over in the block. Every reduction is
// deterministic and without float atomics:
//   * factor-row cotangents: warp shuffles (a transposed butterfly, warp_sum16: 16 shuffles
//     for the 10 values of a period), then the block's warps in warp order, into a per-tile
//     partial array [tiles, S, T, W] summed on the host;
//   * per-loan cotangents: each thread owns its loan's entries of the group's partial array
//     [groups, A_SLOTS, n_pad] (read-modify-write in scenario order), summed on the host;
//   * recovery weights and losses: per-tile partials [tiles, S, T, G] and [tiles, S].
// Derivative conventions are JAX's: max/min/clip split the cotangent 1/2 : 1/2 at an exact
// tie, the hazard is 0 (and so is its cotangent) after maturity, Cash(t) = max(., 0).
//
// Arrays beyond forward.cu's (row-major; S scenarios, T periods, G generations, W = 3G + 7):
//   loss_bar          [S]                      c_s = ∂J/∂L_s
//   volume_bar        [S, T, G]                Q̄ = ∂J/∂Q (through the haircut)
//   scenario_loss     [tiles, S]               recovery_kernel: per-tile loss
//   recovery_weights  [tiles, S, T, G]         recovery_kernel: per-tile R_g(t)
//   factor_bar        [tiles, S, T, W]         adjoint_kernel: per-tile ∂J/∂factors[s, t, :]
//   loan_bar          [groups, 4T + A_TAIL, n_pad]  adjoint_kernel, zeroed by the caller:
//       slot k T + (t − 1), k = A_BASE .. A_LN_GPUS: ∂J/∂ base(t), B(t − 1), I(t),
//       ln(n a / B(t − 1)) summed over the group's scenarios; slot 4T + A_*: the loan's share
//       of ∂J/∂ ln_refi and of the model constants' cotangents.

#define GPUCREDIT_ADJOINT_MAX_T 64  // the host refuses longer grids

// loan_bar per-period blocks (slot k T + t − 1)
#define A_BASE 0
#define A_BALANCE 1
#define A_INSTALLMENT 2
#define A_LN_GPUS 3
#define A_PERIOD_BLOCKS 4
// loan_bar slots after the 4T per-period ones (slot 4T + A_*)
#define A_LN_REFI 0
#define A_BETA_L 1
#define A_BETA_C 2
#define A_BETA_R 3
#define A_FLOOR 4
#define A_CAP 5
#define A_LN_FLOOR 6
#define A_LN_CAP 7
#define A_TAIL 8

// The per-warp factor cotangents of one period: the loan's generation columns, then F_*.
#define B_RENT 0
#define B_PRICE 1
#define B_LN_PRICE 2
#define B_MARKET 3            // + F_BTC .. F_BTC_INCOME
#define B_COUNT (B_MARKET + F_COUNT)  // 10 <= 16 (warp_sum16)

__device__ __forceinline__ float gc_exp(float x) { return expf(x); }
__device__ __forceinline__ double gc_exp(double x) { return exp(x); }

// ∂max(a, b)/∂a as JAX takes it: 1 above, 0 below, 1/2 at a tie (∂min(a, b)/∂a = that of
// max(b, a) w.r.t. b: gc_above(b, a)).
template <typename real>
__device__ __forceinline__ real gc_above(real a, real b) {
    return a > b ? real(1) : (a == b ? real(0.5) : real(0));
}

// y = min(max(x, lo), hi) (gc_clip, jnp.clip): returns x̄ for ȳ and adds lō, hī.
template <typename real>
__device__ __forceinline__ real gc_clip_bar(real x, real lo, real hi, real y_bar, real& lo_bar,
                                            real& hi_bar) {
    const real m = gc_max(x, lo);
    const real m_bar = y_bar * gc_above(hi, m);
    hi_bar += y_bar - m_bar;
    const real x_bar = m_bar * gc_above(x, lo);
    lo_bar += m_bar - x_bar;
    return x_bar;
}

// A transposed warp reduction of 16 values per lane: lanes 2k and 2k + 1 return
// Σ over the warp of v[k]. 16 shuffles (8 + 4 + 2 + 1 + 1) instead of 16 × 5 for 16
// warp_sum's; each step halves the values a lane keeps (the half its lane bit names) and
// adds its partner's; the order of the additions is fixed, so the sums are reproducible.
template <int kHalf, typename real>
__device__ __forceinline__ void gc_fold(real (&v)[16], int lane) {
    const bool upper = (lane & (2 * kHalf)) != 0;
#pragma unroll
    for (int k = 0; k < kHalf; ++k) {
        const real keep = upper ? v[k + kHalf] : v[k];
        const real send = upper ? v[k] : v[k + kHalf];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, 2 * kHalf);
    }
}

template <typename real>
__device__ __forceinline__ real warp_sum16(real (&v)[16], int lane) {
    gc_fold<8>(v, lane);  // lane bit 4: v[0..7] = half 0 or 1 of the 16, over 2 lanes
    gc_fold<4>(v, lane);
    gc_fold<2>(v, lane);
    gc_fold<1>(v, lane);  // v[0] = Σ of value (lane >> 1) over the 16 lanes of the same bit 0
    return v[0] + __shfl_xor_sync(0xffffffffu, v[0], 1);
}

template <typename real>
struct GcModel {
    real dt, floor_, cap, ln_floor, ln_cap, beta_l, beta_c, beta_r;
};

template <typename real>
__device__ __forceinline__ GcModel<real> gc_load_model(const real* __restrict__ model) {
    GcModel<real> m;
    m.dt = model[M_DT];
    m.floor_ = model[M_FLOOR];
    m.cap = model[M_CAP];
    m.ln_floor = model[M_LN_FLOOR];
    m.ln_cap = model[M_LN_CAP];
    m.beta_l = model[M_BETA_L];
    m.beta_c = model[M_BETA_C];
    m.beta_r = model[M_BETA_R];
    return m;
}

template <typename real>
struct GcLoan {
    real pledged_gpus, recovery_gpus, power_kwh, btc_units, eth_units, crypto_pledged;
    real sqrt_rho, inv_sqrt_1m_rho, cash0, ln_refi, rate, floating;
    real income_c, rent_hours_c, income_f, rent_hours_f, btc_income;
    bool has_balloon;
    int gen, maturity, contract, offtaker;
};

template <typename real>
__device__ __forceinline__ GcLoan<real> gc_load_loan(const real* __restrict__ loan_real,
                                                     const int* __restrict__ loan_int,
                                                     int n_pad, int i) {
    GcLoan<real> L;
    L.pledged_gpus = loan_real[L_PLEDGED_GPUS * n_pad + i];
    L.recovery_gpus = loan_real[L_RECOVERY_GPUS * n_pad + i];
    L.power_kwh = loan_real[L_POWER_KWH * n_pad + i];
    L.btc_units = loan_real[L_BTC * n_pad + i];
    L.eth_units = loan_real[L_ETH * n_pad + i];
    L.crypto_pledged = loan_real[L_CRYPTO_PLEDGED * n_pad + i];
    L.sqrt_rho = loan_real[L_SQRT_RHO * n_pad + i];
    L.inv_sqrt_1m_rho = loan_real[L_INV_SQRT_1M_RHO * n_pad + i];
    L.cash0 = loan_real[L_CASH * n_pad + i];
    L.ln_refi = loan_real[L_LN_REFI * n_pad + i];
    L.has_balloon = loan_real[L_HAS_BALLOON * n_pad + i] > real(0);
    L.rate = loan_real[L_RATE * n_pad + i];
    L.floating = loan_real[L_FLOATING * n_pad + i];
    L.income_c = loan_real[L_INCOME_CONTRACTED * n_pad + i];
    L.rent_hours_c = loan_real[L_RENT_HOURS_CONTRACTED * n_pad + i];
    L.income_f = loan_real[L_INCOME_FREE * n_pad + i];
    L.rent_hours_f = loan_real[L_RENT_HOURS_FREE * n_pad + i];
    L.btc_income = loan_real[L_BTC_INCOME * n_pad + i];
    L.gen = loan_int[LI_GENERATION * n_pad + i];
    L.maturity = loan_int[LI_MATURITY * n_pad + i];
    L.contract = loan_int[LI_CONTRACT * n_pad + i];
    L.offtaker = loan_int[LI_OFFTAKER * n_pad + i];
    return L;
}

// The last period the loan's contract pays in scenario s: its own end and its offtaker's τ_j.
__device__ __forceinline__ int gc_contract_end(int contract, int offtaker,
                                               const int* __restrict__ offtaker_periods,
                                               long long s, int o_stride) {
    int end = contract;
    if (o_stride > 0 && offtaker >= 0) {
        const int tau = offtaker_periods[s * (long long)o_stride + offtaker];
        end = tau < end ? tau : end;
    }
    return end;
}

// One period's intermediates (forward.cu's arithmetic, conditional mode).
template <typename real>
struct GcPeriod {
    real rent_hours;    // this period's rent hours (contracted or free)
    real noi, loan_rate, debt_service, crypto, numerator;
    real ln_lc, ln_cc, ln_rf, z, hazard;
    bool positive, refinancing, active;
};

template <typename real>
__device__ __forceinline__ GcPeriod<real> gc_period(const GcModel<real>& m, const GcLoan<real>& L,
                                                    const real* f, int G, int t,
                                                    int contract_end, real cash, real balance,
                                                    real installment, real ln_gpus, real base) {
    GcPeriod<real> p;
    const real rent = f[L.gen];
    const real ln_price = f[2 * G + L.gen];
    const real btc = f[3 * G + F_BTC];
    const real eth = f[3 * G + F_ETH];
    const real power = f[3 * G + F_POWER];
    const real base_rate = f[3 * G + F_RATE];
    const real credit = f[3 * G + F_CREDIT];
    const real btc_index = f[3 * G + F_BTC_INCOME];

    const bool contracted = t <= contract_end;
    p.rent_hours = contracted ? L.rent_hours_c : L.rent_hours_f;
    p.noi = (contracted ? L.income_c : L.income_f) + p.rent_hours * rent
        - L.power_kwh * power + L.btc_income * btc_index;
    p.loan_rate = L.rate + L.floating * base_rate;
    p.debt_service = p.loan_rate * m.dt * balance + installment;
    p.crypto = L.btc_units * btc + L.eth_units * eth;
    p.numerator = cash + p.crypto + p.noi;

    p.positive = p.debt_service > real(0);
    const real liquidity = p.numerator / (p.positive ? p.debt_service : real(1));
    p.ln_lc = p.positive ? gc_log(gc_clip(liquidity, m.floor_, m.cap)) : m.ln_cap;
    p.ln_cc = gc_clip(ln_price + ln_gpus, m.ln_floor, m.ln_cap);
    real shift = m.beta_l * p.ln_lc + m.beta_c * p.ln_cc;
    p.refinancing = L.has_balloon && t == L.maturity;
    p.ln_rf = real(0);
    if (p.refinancing) {
        p.ln_rf = gc_clip(gc_min(L.ln_refi + ln_price, real(0)), m.ln_floor, m.ln_cap);
        shift += m.beta_r * p.ln_rf;
    }
    p.z = (base - shift - L.sqrt_rho * credit) * L.inv_sqrt_1m_rho;
    p.active = t <= L.maturity;
    p.hazard = p.active ? gc_ndtr(p.z) : real(0);
    return p;
}

// Stage the scenario's factor row [T, W] and one or two [T, G] rows in shared memory.
template <typename real>
__device__ __forceinline__ void gc_stage(real* dst, const real* __restrict__ src, int n) {
    for (int k = threadIdx.x; k < n; k += blockDim.x) dst[k] = src[k];
}

// Pass 2 with the recovery weights: the losses and R_g(t) of the chunk's scenarios.
template <typename real>
__global__ void __launch_bounds__(GPUCREDIT_MAX_THREADS) recovery_kernel(
    const real* __restrict__ model,
    const real* __restrict__ loan_real,
    const int* __restrict__ loan_int,
    const real* __restrict__ loan_period,
    const real* __restrict__ factors,
    const real* __restrict__ haircut,
    const int* __restrict__ offtaker_periods,
    real* __restrict__ scenario_loss,
    real* __restrict__ recovery_weights,
    const int n_scenarios,
    const int periods,
    const int n_generations,
    const int n_pad,
    const int per_block,
    const int o_stride)
{
    GPUCREDIT_SMEM(smem);
    const int T = periods;
    const int G = n_generations;
    const int W = 3 * G + F_COUNT;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = blockDim.x >> 5;

    // Shared memory: factor row [T, W], haircut row [T, G], per-warp recovery weights
    // [n_warps, T], per-warp loss [n_warps], then the warps' generations [n_warps] (int).
    real* s_factors = reinterpret_cast<real*>(smem);
    real* s_haircut = s_factors + T * W;
    real* s_weight = s_haircut + T * G;
    real* s_partial = s_weight + n_warps * T;
    int* s_warp_gen = reinterpret_cast<int*>(s_partial + n_warps);

    const int i = blockIdx.y * blockDim.x + tid;
    const GcModel<real> m = gc_load_model(model);
    const GcLoan<real> L = gc_load_loan(loan_real, loan_int, n_pad, i);
    const real* balance_t = loan_period + (long long)P_BALANCE * T * n_pad + i;
    const real* installment_t = loan_period + (long long)P_INSTALLMENT * T * n_pad + i;
    const real* ln_gpus_t = loan_period + (long long)P_LN_GPUS_PER_BALANCE * T * n_pad + i;
    const real* base_t = loan_period + (long long)P_HAZARD_BASE * T * n_pad + i;
    if (lane == 0) s_warp_gen[warp] = L.gen;  // warp-uniform by construction

    const long long first = (long long)blockIdx.x * per_block;
    long long last = first + per_block;
    if (last > n_scenarios) last = n_scenarios;

    for (long long s = first; s < last; ++s) {
        __syncthreads();  // the previous scenario's readers of shared memory are done
        gc_stage(s_factors, factors + s * (long long)(T * W), T * W);
        gc_stage(s_haircut, haircut + s * (long long)(T * G), T * G);
        __syncthreads();

        const int contract_end =
            gc_contract_end(L.contract, L.offtaker, offtaker_periods, s, o_stride);
        real cash = L.cash0;
        real survival = real(1);
        real loss = real(0);
        for (int t = 1; t <= T; ++t) {
            const real* f = s_factors + (t - 1) * W;
            const int o = (t - 1) * n_pad;
            const real balance = balance_t[o];
            const GcPeriod<real> p = gc_period(m, L, f, G, t, contract_end, cash, balance,
                                               installment_t[o], ln_gpus_t[o], base_t[o]);
            const real d = survival * p.hazard;
            survival = survival * (real(1) - p.hazard);
            cash = gc_max(cash + p.noi - p.debt_service, real(0));

            const real price = f[G + L.gen];
            const real h = s_haircut[(t - 1) * G + L.gen];
            const real recovery =
                L.recovery_gpus * price * (real(1) - h) + L.crypto_pledged * p.crypto;
            const real exposure = balance * (real(1) + p.loan_rate * m.dt);
            const real weight = f[3 * G + F_DISCOUNT] * d;
            loss += weight * gc_max(exposure - recovery, real(0));
            // R: ∂(Σ DF d LGD)/∂H_g(t) = P_g(t) R_g(t), the strict indicator as JAX's
            const real r = warp_sum(exposure > recovery ? weight * L.recovery_gpus : real(0));
            if (lane == 0) s_weight[warp * T + (t - 1)] = r;
        }

        const real block_loss = warp_sum(loss);
        if (lane == 0) s_partial[warp] = block_loss;
        __syncthreads();
        if (tid == 0) {
            real total = real(0);
            for (int w = 0; w < n_warps; ++w) total += s_partial[w];
            scenario_loss[(long long)blockIdx.y * n_scenarios + s] = total;
        }
        real* out = recovery_weights + ((long long)blockIdx.y * n_scenarios + s) * (T * G);
        for (int k = tid; k < T * G; k += blockDim.x) {
            const int t0 = k / G;
            const int g = k - t0 * G;
            real r = real(0);
            for (int w = 0; w < n_warps; ++w) {
                if (s_warp_gen[w] == g) r += s_weight[w * T + t0];
            }
            out[k] = r;
        }
    }
}

// The adjoint: ∂J/∂(factor rows, per-loan constants, model constants) for the seeds
// c_s (loss) and Q̄ (volumes), the haircut held fixed.
template <typename real>
__global__ void __launch_bounds__(GPUCREDIT_MAX_THREADS) adjoint_kernel(
    const real* __restrict__ model,
    const real* __restrict__ loan_real,
    const int* __restrict__ loan_int,
    const real* __restrict__ loan_period,
    const real* __restrict__ factors,
    const real* __restrict__ haircut,
    const int* __restrict__ offtaker_periods,
    const real* __restrict__ loss_bar,
    const real* __restrict__ volume_bar,
    real* __restrict__ factor_bar,
    real* __restrict__ loan_bar,
    const int n_scenarios,
    const int periods,
    const int n_generations,
    const int n_pad,
    const int per_block,
    const int o_stride)
{
    GPUCREDIT_SMEM(smem);
    const int T = periods;
    const int G = n_generations;
    const int W = 3 * G + F_COUNT;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = blockDim.x >> 5;

    // Shared memory: factor row [T, W], haircut row [T, G], Q̄ row [T, G], per-warp factor
    // cotangents [n_warps, T, B_COUNT], then the warps' generations [n_warps] (int).
    real* s_factors = reinterpret_cast<real*>(smem);
    real* s_haircut = s_factors + T * W;
    real* s_volume_bar = s_haircut + T * G;
    real* s_bar = s_volume_bar + T * G;
    int* s_warp_gen = reinterpret_cast<int*>(s_bar + n_warps * T * B_COUNT);

    const int i = blockIdx.y * blockDim.x + tid;
    const GcModel<real> m = gc_load_model(model);
    const GcLoan<real> L = gc_load_loan(loan_real, loan_int, n_pad, i);
    const real* balance_t = loan_period + (long long)P_BALANCE * T * n_pad + i;
    const real* installment_t = loan_period + (long long)P_INSTALLMENT * T * n_pad + i;
    const real* ln_gpus_t = loan_period + (long long)P_LN_GPUS_PER_BALANCE * T * n_pad + i;
    const real* base_t = loan_period + (long long)P_HAZARD_BASE * T * n_pad + i;
    if (lane == 0) s_warp_gen[warp] = L.gen;

    // This loan's entries of the group's partial array, [A_SLOTS] with stride n_pad.
    real* my_bar = loan_bar + (long long)blockIdx.x * (A_PERIOD_BLOCKS * T + A_TAIL) * n_pad + i;
    real ln_refi_bar = real(0);
    real beta_l_bar = real(0), beta_c_bar = real(0), beta_r_bar = real(0);
    real floor_bar = real(0), cap_bar = real(0), ln_floor_bar = real(0), ln_cap_bar = real(0);

    // The state before each period, stored by the forward sweep (the rest is recomputed).
    real cash_before[GPUCREDIT_ADJOINT_MAX_T];
    real survival_before[GPUCREDIT_ADJOINT_MAX_T];

    const long long first = (long long)blockIdx.x * per_block;
    long long last = first + per_block;
    if (last > n_scenarios) last = n_scenarios;

    for (long long s = first; s < last; ++s) {
        __syncthreads();
        gc_stage(s_factors, factors + s * (long long)(T * W), T * W);
        gc_stage(s_haircut, haircut + s * (long long)(T * G), T * G);
        gc_stage(s_volume_bar, volume_bar + s * (long long)(T * G), T * G);
        __syncthreads();

        const real c = loss_bar[s];
        const int contract_end =
            gc_contract_end(L.contract, L.offtaker, offtaker_periods, s, o_stride);

        // Forward sweep: store Cash(t − 1) and S(t − 1).
        real cash = L.cash0;
        real survival = real(1);
        for (int t = 1; t <= T; ++t) {
            const int o = (t - 1) * n_pad;
            cash_before[t - 1] = cash;
            survival_before[t - 1] = survival;
            const GcPeriod<real> p =
                gc_period(m, L, s_factors + (t - 1) * W, G, t, contract_end, cash,
                          balance_t[o], installment_t[o], ln_gpus_t[o], base_t[o]);
            survival = survival * (real(1) - p.hazard);
            cash = gc_max(cash + p.noi - p.debt_service, real(0));
        }

        // Backward sweep: cash_bar = ∂J/∂Cash(t), survival_bar = ∂J/∂S(t).
        real cash_bar = real(0);
        real survival_bar = real(0);
        for (int t = T; t >= 1; --t) {
            const real* f = s_factors + (t - 1) * W;
            const int o = (t - 1) * n_pad;
            const real balance = balance_t[o];
            const real ln_gpus = ln_gpus_t[o];
            cash = cash_before[t - 1];
            survival = survival_before[t - 1];
            const GcPeriod<real> p = gc_period(m, L, f, G, t, contract_end, cash, balance,
                                               installment_t[o], ln_gpus, base_t[o]);
            const real price = f[G + L.gen];
            const real ln_price = f[2 * G + L.gen];
            const real discount = f[3 * G + F_DISCOUNT];
            const real h = s_haircut[(t - 1) * G + L.gen];

            // Loss: DF d max(EAD − Rec, 0), d = S(t − 1) h(t); volume: n a d.
            const real recovery =
                L.recovery_gpus * price * (real(1) - h) + L.crypto_pledged * p.crypto;
            const real exposure = balance * (real(1) + p.loan_rate * m.dt);
            const real gap = exposure - recovery;
            const real lgd = gc_max(gap, real(0));
            const real d = survival * p.hazard;
            const real d_bar =
                c * discount * lgd + s_volume_bar[(t - 1) * G + L.gen] * L.pledged_gpus;
            const real discount_bar = c * d * lgd;
            const real gap_bar = c * discount * d * gc_above(gap, real(0));
            real balance_bar = gap_bar * (real(1) + p.loan_rate * m.dt);
            real loan_rate_bar = gap_bar * balance * m.dt;
            real price_bar = -gap_bar * L.recovery_gpus * (real(1) - h);
            real crypto_bar = -gap_bar * L.crypto_pledged;

            // S(t) = S(t − 1)(1 − h): h̄ and ∂J/∂S(t − 1).
            const real hazard_bar = survival * (d_bar - survival_bar);
            survival_bar = d_bar * p.hazard + survival_bar * (real(1) - p.hazard);

            // Cash(t) = max(Cash(t − 1) + NOI − DS, 0).
            const real carried = cash_bar * gc_above(cash + p.noi - p.debt_service, real(0));
            real noi_bar = carried;
            real debt_service_bar = -carried;
            cash_bar = carried;

            // h = Φ(z) while active; z = (base − shift − √ρ Z) / √(1 − ρ).
            const real z_bar = p.active
                ? hazard_bar * gc_exp(real(-0.5) * p.z * p.z) * real(0.3989422804014327)
                : real(0);
            const real base_bar = z_bar * L.inv_sqrt_1m_rho;
            const real shift_bar = -base_bar;
            const real credit_bar = -base_bar * L.sqrt_rho;
            beta_l_bar += shift_bar * p.ln_lc;
            beta_c_bar += shift_bar * p.ln_cc;
            real ln_price_bar = real(0);
            if (p.refinancing) {
                beta_r_bar += shift_bar * p.ln_rf;
                const real v = L.ln_refi + ln_price;
                const real u_bar = gc_clip_bar(gc_min(v, real(0)), m.ln_floor, m.ln_cap,
                                               shift_bar * m.beta_r, ln_floor_bar, ln_cap_bar);
                const real v_bar = u_bar * gc_above(real(0), v);  // min(v, 0)
                ln_refi_bar += v_bar;
                ln_price_bar += v_bar;
            }
            const real cc_bar = gc_clip_bar(ln_price + ln_gpus, m.ln_floor, m.ln_cap,
                                            shift_bar * m.beta_c, ln_floor_bar, ln_cap_bar);
            ln_price_bar += cc_bar;
            const real ln_lc_bar = shift_bar * m.beta_l;
            if (p.positive) {
                const real liquidity = p.numerator / p.debt_service;
                const real clipped = gc_clip(liquidity, m.floor_, m.cap);
                const real liquidity_bar = gc_clip_bar(liquidity, m.floor_, m.cap,
                                                       ln_lc_bar / clipped, floor_bar, cap_bar);
                const real numerator_bar = liquidity_bar / p.debt_service;
                debt_service_bar -= liquidity_bar * liquidity / p.debt_service;
                cash_bar += numerator_bar;
                crypto_bar += numerator_bar;
                noi_bar += numerator_bar;
            } else {
                ln_cap_bar += ln_lc_bar;
            }

            // DS = (rate + floating r) Δ B + I
            loan_rate_bar += debt_service_bar * m.dt * balance;
            balance_bar += debt_service_bar * p.loan_rate * m.dt;

            real* slot = my_bar + (long long)(t - 1) * n_pad;
            slot[(long long)A_BASE * T * n_pad] += base_bar;
            slot[(long long)A_BALANCE * T * n_pad] += balance_bar;
            slot[(long long)A_INSTALLMENT * T * n_pad] += debt_service_bar;
            slot[(long long)A_LN_GPUS * T * n_pad] += cc_bar;

            // The factor row's cotangents, reduced over the warp (one generation per warp):
            // lane 2k ends with Σ_warp bar[k].
            real bar[16];
            bar[B_RENT] = noi_bar * p.rent_hours;
            bar[B_PRICE] = price_bar;
            bar[B_LN_PRICE] = ln_price_bar;
            bar[B_MARKET + F_BTC] = crypto_bar * L.btc_units;
            bar[B_MARKET + F_ETH] = crypto_bar * L.eth_units;
            bar[B_MARKET + F_POWER] = -noi_bar * L.power_kwh;
            bar[B_MARKET + F_RATE] = loan_rate_bar * L.floating;
            bar[B_MARKET + F_CREDIT] = credit_bar;
            bar[B_MARKET + F_DISCOUNT] = discount_bar;
            bar[B_MARKET + F_BTC_INCOME] = noi_bar * L.btc_income;
#pragma unroll
            for (int k = B_COUNT; k < 16; ++k) bar[k] = real(0);
            const real summed = warp_sum16(bar, lane);
            if ((lane & 1) == 0 && (lane >> 1) < B_COUNT) {
                s_bar[(warp * T + (t - 1)) * B_COUNT + (lane >> 1)] = summed;
            }
        }

        __syncthreads();
        // factor_bar[tile, s, t, :]: the block's warps in warp order.
        real* out = factor_bar + ((long long)blockIdx.y * n_scenarios + s) * (T * W);
        for (int k = tid; k < T * W; k += blockDim.x) {
            const int t0 = k / W;
            const int col = k - t0 * W;
            real v = real(0);
            if (col < 3 * G) {
                const int kind = col / G;  // B_RENT, B_PRICE, B_LN_PRICE
                const int g = col - kind * G;
                for (int w = 0; w < n_warps; ++w) {
                    if (s_warp_gen[w] == g) v += s_bar[(w * T + t0) * B_COUNT + kind];
                }
            } else {
                const int b = B_MARKET + (col - 3 * G);
                for (int w = 0; w < n_warps; ++w) v += s_bar[(w * T + t0) * B_COUNT + b];
            }
            out[k] = v;
        }
    }

    real* tail = my_bar + (long long)A_PERIOD_BLOCKS * T * n_pad;
    tail[A_LN_REFI * (long long)n_pad] = ln_refi_bar;
    tail[A_BETA_L * (long long)n_pad] = beta_l_bar;
    tail[A_BETA_C * (long long)n_pad] = beta_c_bar;
    tail[A_BETA_R * (long long)n_pad] = beta_r_bar;
    tail[A_FLOOR * (long long)n_pad] = floor_bar;
    tail[A_CAP * (long long)n_pad] = cap_bar;
    tail[A_LN_FLOOR * (long long)n_pad] = ln_floor_bar;
    tail[A_LN_CAP * (long long)n_pad] = ln_cap_bar;
}
