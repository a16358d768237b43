// gpucredit: the fused forward pass of docs/spec.md §3-6 (model v2) for a chunk of scenarios
// (CuPy backend).
//
// One template, four kernels: forward_kernel<real, kLoss> with real = float | double and
//   kLoss = false  pass 1: the book's liquidation volumes per scenario, period and generation
//                  (docs/spec.md §5): Q[s, t, g] = Σ n a d(t) and, in sampled mode, also the
//                  expected volume Σ n a S(t-1) h(t) (in conditional mode d = S(t-1) h(t),
//                  so Q is both);
//   kLoss = true   pass 2: the period loop again (cheaper than storing it), the haircut
//                  H[s, t, g] computed from the volumes on the host side (the market-wide
//                  fire sale: H_g = min(H_max, H0_g + H1 ((Q_g + max(F_g - N_g, 0) q̄_g) /
//                  D_g)^γ), q̄_g = expected volume / N_g), the loss per scenario and
//                  (optionally) per-loan sums over the block's scenarios.
// Compiled by NVRTC through cupy.RawModule(name_expressions=[...]); nothing is #included.
//
// The hazard (docs/spec.md §4) is h(t) = Φ((base(t) - β_L ln LC⁺(t) - β_C ln CC⁺(t)
// - 1[t = t_M, Bal > 0] β_R ln RF⁺ - √ρ Z(t)) / √(1 - ρ)) with the per-loan-period constant
// base(t) = Φ⁻¹(p^Δ) + β_L ln LC^ref(t) + β_C ln CC^ref(t) (+ β_R ln RF^ref at t = t_M when
// Bal > 0): the PD anchor's references are inputs of the run (LoanArrays), held fixed.
// Other income (docs/spec.md §3) is OI Δ (1 - b), folded into the per-loan income constants,
// plus OI Δ b times the scenario's BTC income index X_btc(t)/X_btc(0) e^{η tΔ} (a factor
// column). The credit factor Z(t) (a stationary AR(1)) comes with the factor table.
//
// Layout (kernels/cupy_engine.py builds every array):
//   * Loans are sorted by generation and each generation's run is padded with inert loans
//     (maturity 0: never active, no GPUs) to a multiple of 32, so every warp holds loans of
//     one generation: factor reads rent_g / price_g are warp-uniform shared-memory broadcasts,
//     and a volume needs one warp reduction per period, not one per generation.  The padded
//     book (n_pad loans) is a whole number of tiles of blockDim.x loans.
//   * blockIdx.y = loan tile (threadIdx.x = one loan, its constants in registers, read once,
//     coalesced from SoA arrays [slot, n_pad]); blockIdx.x = a group of `per_block`
//     consecutive scenarios, looped over inside the block, the scenario's factor row staged
//     in shared memory.  Per-loan sums over the group stay in registers.
//   * Reductions are deterministic: warp shuffles (fixed butterfly), then warps in a fixed
//     order; across tiles the volumes are added as 64-bit fixed point (integer atomics are
//     associative, the quantum is 2^-62 of the generation's total pledged GPUs), and the
//     per-tile losses and per-group loan sums go to small partial arrays summed on the host
//     side.  A scenario's loss therefore does not depend on the chunk it was computed in.
//   * Never a [scenarios x loans] array in global memory.
//
// Arrays (row-major; S scenarios of the chunk, T periods, G generations, W = 3G + F_COUNT,
// V = 2 volumes in sampled mode (realised, expected), 1 in conditional mode):
//   model        [M_COUNT]                  run constants (M_* below)
//   loan_real    [L_COUNT, n_pad]           per-loan constants (L_* below)
//   loan_int     [LI_COUNT, n_pad]          generation, borrower, t_M, last contracted period,
//                                           offtaker index (-1: none)
//   loan_period  [P_COUNT, T, n_pad]        B(t-1), I(t), ln(n a / B(t-1)), base(t), t = 1..T
//   factors      [S, T, W]                  per scenario and period t = 1..T: R_g (G), P_g (G),
//                                           ln P_g (G), then F_* below (BTC, ETH, power, r(t),
//                                           Z(t), DF(t), BTC income index)
//   haircut      [S, T, G]                  H_g(t) (pass 2)
//   uniforms     [S, u_stride]              U_b (sampled mode)
//   offtaker_periods [S, o_stride] int      τ_j, the offtakers' default periods (docs/spec.md
//                                           §4a; o_stride = 0: the book names none)
//   qscale       [G]                        fixed-point scale 2^e_g of the volumes (pass 1)
//   volume       [V, S, T, G] uint64        volumes in fixed point, zeroed by the caller
//                                           (pass 1): [0] Σ n a d(t), [1] Σ n a S(t-1) h(t)
//   scenario_loss[tiles, S]                 per-tile loss of each scenario (pass 2)
//   loan_sums    [groups, 3, n_pad]         Σ over the group's scenarios of the loss, Σ_t d,
//                                           Σ_t DF d EAD (pass 2, when want_loan_sums)

#ifndef GPUCREDIT_SMEM
#define GPUCREDIT_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// model[]
#define M_DT 0
#define M_FLOOR 1
#define M_CAP 2
#define M_LN_FLOOR 3
#define M_LN_CAP 4
#define M_BETA_L 5
#define M_BETA_C 6
#define M_BETA_R 7
#define M_COUNT 8

// loan_real[]
#define L_PLEDGED_GPUS 0      // n a
#define L_RECOVERY_GPUS 1     // n a (1 - c)
#define L_POWER_KWH 2         // n N_h w: opex of power = that x E(t)
#define L_BTC 3               // b_i (btc_units)
#define L_ETH 4               // e_i
#define L_CRYPTO_PLEDGED 5    // 1 if pledged
#define L_SQRT_RHO 6
#define L_INV_SQRT_1M_RHO 7   // 1 / sqrt(1 - rho)
#define L_CASH 8              // Cash(0)
#define L_LN_REFI 9           // ln(lambda) + ln(n a / Bal): ln RF = clip(min(that + ln P, 0))
#define L_HAS_BALLOON 10      // 1 if Bal > 0
#define L_RATE 11             // fixed rate or floating spread
#define L_FLOATING 12         // 1 if floating
#define L_INCOME_CONTRACTED 13   // n N_h (k R^c - o) + OI Delta (1 - b) while t <= contract
#define L_RENT_HOURS_CONTRACTED 14  // n N_h (1 - k) u
#define L_INCOME_FREE 15         // n N_h (-o) + OI Delta (1 - b) after the contract
#define L_RENT_HOURS_FREE 16     // n N_h u
#define L_BTC_INCOME 17          // OI Delta b: other income x the BTC income index
#define L_COUNT 18

// loan_int[]
#define LI_GENERATION 0
#define LI_BORROWER 1
#define LI_MATURITY 2         // t_M (0: padding, never active)
#define LI_CONTRACT 3         // k(t) = contracted_share for t <= this
#define LI_OFFTAKER 4         // j (docs/spec.md §4a), -1: none; the contract stops after τ_j
#define LI_COUNT 5

// loan_period[]
#define P_BALANCE 0           // B(t - 1)
#define P_INSTALLMENT 1       // I(t)
#define P_LN_GPUS_PER_BALANCE 2  // ln(n a / B(t - 1)), +-1e4 at the edges
#define P_HAZARD_BASE 3       // Phi^-1(p^Delta) + beta_L ln LC^ref(t) + beta_C ln CC^ref(t)
                              // (+ beta_R ln RF^ref when t = t_M and Bal > 0)
#define P_COUNT 4

// factors[]: the columns after the 3G generation columns R_g, P_g, ln P_g
#define F_BTC 0               // X_btc(t)
#define F_ETH 1               // X_eth(t)
#define F_POWER 2             // E(t)
#define F_RATE 3              // r(t)
#define F_CREDIT 4            // Z(t)
#define F_DISCOUNT 5          // DF(t)
#define F_BTC_INCOME 6        // X_btc(t) / X_btc(0) e^{eta t Delta}
#define F_COUNT 7

#define GPUCREDIT_MAX_THREADS 256

__device__ __forceinline__ float gc_log(float x) { return logf(x); }
__device__ __forceinline__ double gc_log(double x) { return log(x); }
__device__ __forceinline__ float gc_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double gc_min(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float gc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double gc_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float gc_ndtr(float x) { return normcdff(x); }
__device__ __forceinline__ double gc_ndtr(double x) { return normcdf(x); }

template <typename real>
__device__ __forceinline__ real gc_clip(real x, real lo, real hi) {
    return gc_min(gc_max(x, lo), hi);
}

// Sum over the 32 lanes of a warp; lane 0's result is the same for every run.
template <typename real>
__device__ __forceinline__ real warp_sum(real v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

template <typename real, bool kLoss>
__global__ void __launch_bounds__(GPUCREDIT_MAX_THREADS) forward_kernel(
    const real* __restrict__ model,
    const real* __restrict__ loan_real,
    const int* __restrict__ loan_int,
    const real* __restrict__ loan_period,
    const real* __restrict__ factors,
    const real* __restrict__ haircut,
    const real* __restrict__ uniforms,
    const int* __restrict__ offtaker_periods,
    const double* __restrict__ qscale,
    unsigned long long* __restrict__ volume,
    real* __restrict__ scenario_loss,
    real* __restrict__ loan_sums,
    const int n_scenarios,
    const int periods,
    const int n_generations,
    const int n_pad,
    const int per_block,
    const int u_stride,
    const int o_stride,
    const int sampled,
    const int want_loan_sums)
{
    GPUCREDIT_SMEM(smem);
    const int T = periods;
    const int G = n_generations;
    const int W = 3 * G + F_COUNT;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = blockDim.x >> 5;

    // Shared memory: factor row [T, W], haircut row [T, G], per-warp volumes [2, n_warps, T]
    // (realised, expected), per-warp partial loss [n_warps], then the warps' generations
    // [n_warps] (int).
    real* s_factors = reinterpret_cast<real*>(smem);
    real* s_haircut = s_factors + T * W;
    real* s_volume = s_haircut + T * G;
    real* s_partial = s_volume + 2 * n_warps * T;
    int* s_warp_gen = reinterpret_cast<int*>(s_partial + n_warps);

    const int i = blockIdx.y * blockDim.x + tid;  // loan (padded order); always < n_pad

    const real dt = model[M_DT];
    const real floor_ = model[M_FLOOR];
    const real cap = model[M_CAP];
    const real ln_floor = model[M_LN_FLOOR];
    const real ln_cap = model[M_LN_CAP];
    const real beta_l = model[M_BETA_L];
    const real beta_c = model[M_BETA_C];
    const real beta_r = model[M_BETA_R];

    const real pledged_gpus = loan_real[L_PLEDGED_GPUS * n_pad + i];
    const real recovery_gpus = loan_real[L_RECOVERY_GPUS * n_pad + i];
    const real power_kwh = loan_real[L_POWER_KWH * n_pad + i];
    const real btc_units = loan_real[L_BTC * n_pad + i];
    const real eth_units = loan_real[L_ETH * n_pad + i];
    const real crypto_pledged = loan_real[L_CRYPTO_PLEDGED * n_pad + i];
    const real sqrt_rho = loan_real[L_SQRT_RHO * n_pad + i];
    const real inv_sqrt_1m_rho = loan_real[L_INV_SQRT_1M_RHO * n_pad + i];
    const real cash0 = loan_real[L_CASH * n_pad + i];
    const real ln_refi = loan_real[L_LN_REFI * n_pad + i];
    const bool has_balloon = loan_real[L_HAS_BALLOON * n_pad + i] > real(0);
    const real rate_i = loan_real[L_RATE * n_pad + i];
    const real floating = loan_real[L_FLOATING * n_pad + i];
    const real income_c = loan_real[L_INCOME_CONTRACTED * n_pad + i];
    const real rent_hours_c = loan_real[L_RENT_HOURS_CONTRACTED * n_pad + i];
    const real income_f = loan_real[L_INCOME_FREE * n_pad + i];
    const real rent_hours_f = loan_real[L_RENT_HOURS_FREE * n_pad + i];
    const real btc_income = loan_real[L_BTC_INCOME * n_pad + i];

    const int gen = loan_int[LI_GENERATION * n_pad + i];
    const int borrower = loan_int[LI_BORROWER * n_pad + i];
    const int maturity = loan_int[LI_MATURITY * n_pad + i];
    const int contract = loan_int[LI_CONTRACT * n_pad + i];
    const int offtaker = loan_int[LI_OFFTAKER * n_pad + i];

    const real* balance_t = loan_period + (long long)P_BALANCE * T * n_pad + i;
    const real* installment_t = loan_period + (long long)P_INSTALLMENT * T * n_pad + i;
    const real* ln_gpus_t = loan_period + (long long)P_LN_GPUS_PER_BALANCE * T * n_pad + i;
    const real* base_t = loan_period + (long long)P_HAZARD_BASE * T * n_pad + i;

    if (lane == 0) s_warp_gen[warp] = gen;  // warp-uniform by construction

    real sum_loss = real(0);
    real sum_default = real(0);
    real sum_exposure = real(0);

    const long long first = (long long)blockIdx.x * per_block;
    long long last = first + per_block;
    if (last > n_scenarios) last = n_scenarios;

    for (long long s = first; s < last; ++s) {
        __syncthreads();  // the previous scenario's readers of shared memory are done
        const real* row = factors + s * (long long)(T * W);
        for (int k = tid; k < T * W; k += blockDim.x) s_factors[k] = row[k];
        if (kLoss) {
            const real* hrow = haircut + s * (long long)(T * G);
            for (int k = tid; k < T * G; k += blockDim.x) s_haircut[k] = hrow[k];
        }
        __syncthreads();

        const real u = sampled ? uniforms[s * (long long)u_stride + borrower] : real(1);
        // The contract pays through its own end and its offtaker's default period τ_j.
        int contract_end = contract;
        if (o_stride > 0 && offtaker >= 0) {
            const int tau = offtaker_periods[s * (long long)o_stride + offtaker];
            contract_end = tau < contract_end ? tau : contract_end;
        }
        real cash = cash0;
        real survival = real(1);
        bool defaulted = false;
        real loss = real(0);

        for (int t = 1; t <= T; ++t) {
            const real* f = s_factors + (t - 1) * W;
            const real rent = f[gen];
            const real price = f[G + gen];
            const real ln_price = f[2 * G + gen];
            const real btc = f[3 * G + F_BTC];
            const real eth = f[3 * G + F_ETH];
            const real power = f[3 * G + F_POWER];
            const real base_rate = f[3 * G + F_RATE];
            const real credit = f[3 * G + F_CREDIT];
            const real btc_index = f[3 * G + F_BTC_INCOME];

            const int o = (t - 1) * n_pad;
            const real balance = balance_t[o];
            const real installment = installment_t[o];
            const real ln_gpus = ln_gpus_t[o];
            const real base = base_t[o];

            const bool contracted = t <= contract_end;
            const real noi = (contracted ? income_c : income_f)
                + (contracted ? rent_hours_c : rent_hours_f) * rent - power_kwh * power
                + btc_income * btc_index;
            const real loan_rate = rate_i + floating * base_rate;
            const real debt_service = loan_rate * dt * balance + installment;
            const real crypto = btc_units * btc + eth_units * eth;

            const bool positive = debt_service > real(0);
            const real liquidity = (cash + crypto + noi) / (positive ? debt_service : real(1));
            const real ln_lc = positive ? gc_log(gc_clip(liquidity, floor_, cap)) : ln_cap;
            const real ln_cc = gc_clip(ln_price + ln_gpus, ln_floor, ln_cap);
            // The shift's reference terms are in base (the PD anchor's, constants of the run).
            real shift = beta_l * ln_lc + beta_c * ln_cc;
            if (has_balloon && t == maturity) {
                const real ln_rf = gc_clip(gc_min(ln_refi + ln_price, real(0)), ln_floor, ln_cap);
                shift += beta_r * ln_rf;
            }
            const real z = (base - shift - sqrt_rho * credit) * inv_sqrt_1m_rho;
            const real hazard = (t <= maturity) ? gc_ndtr(z) : real(0);
            const real expected = survival * hazard;  // S(t - 1) h(t)
            const real survival_after = survival * (real(1) - hazard);
            real d;
            if (sampled) {
                const bool crossed = (real(1) - survival_after) >= u;  // 1 - S(t) >= U_b
                d = (crossed && !defaulted) ? real(1) : real(0);
                defaulted = defaulted || crossed;
            } else {
                d = expected;
            }
            survival = survival_after;
            cash = gc_max(cash + noi - debt_service, real(0));

            if (!kLoss) {
                const real q = warp_sum(d * pledged_gpus);
                if (lane == 0) s_volume[warp * T + (t - 1)] = q;
                if (sampled) {  // a launch argument (warp-uniform): the expected volume too
                    const real e = warp_sum(expected * pledged_gpus);
                    if (lane == 0) s_volume[(n_warps + warp) * T + (t - 1)] = e;
                }
            } else {
                const real h = s_haircut[(t - 1) * G + gen];
                const real discount = f[3 * G + F_DISCOUNT];
                const real recovery =
                    recovery_gpus * price * (real(1) - h) + crypto_pledged * crypto;
                const real exposure = balance * (real(1) + loan_rate * dt);
                const real lgd = gc_max(exposure - recovery, real(0));
                const real weight = discount * d;
                loss += weight * lgd;
                sum_exposure += weight * exposure;
                sum_default += d;
            }
        }

        if (!kLoss) {
            __syncthreads();
            // volume[v, s, t, g]: this tile's warps of generation g, in warp order, as fixed
            // point; v = 0 the realised volume, v = 1 (sampled mode) the expected one.
            const int TG = T * G;
            const int n_volumes = sampled ? 2 : 1;
            for (int k = tid; k < n_volumes * TG; k += blockDim.x) {
                const int v = k / TG;
                const int r = k - v * TG;
                const int t0 = r / G;
                const int g = r - t0 * G;
                const real* s_v = s_volume + v * n_warps * T;
                double q = 0.0;
                for (int w = 0; w < n_warps; ++w) {
                    if (s_warp_gen[w] == g) q += (double)s_v[w * T + t0];
                }
                if (q > 0.0) {
                    const unsigned long long fixed = (unsigned long long)llrint(q * qscale[g]);
                    atomicAdd(volume + ((v * (long long)n_scenarios + s) * T + t0) * G + g, fixed);
                }
            }
        } else {
            sum_loss += loss;
            const real block_loss = warp_sum(loss);
            if (lane == 0) s_partial[warp] = block_loss;
            __syncthreads();
            if (tid == 0) {
                real total = real(0);
                for (int w = 0; w < n_warps; ++w) total += s_partial[w];
                scenario_loss[(long long)blockIdx.y * n_scenarios + s] = total;
            }
        }
    }

    if (kLoss && want_loan_sums) {
        real* out = loan_sums + (long long)blockIdx.x * 3 * n_pad + i;
        out[0] = sum_loss;
        out[n_pad] = sum_default;
        out[2 * (long long)n_pad] = sum_exposure;
    }
}
