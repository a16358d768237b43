// gpucredit: the fused forward pass of MODEL.md §3-6 for a chunk of scenarios (CuPy backend).
//
// One template, four kernels: forward_kernel<real, kLoss> with real = float | double and
//   kLoss = false  pass 1: the liquidation volume Q[s, t, g] (MODEL.md §5);
//   kLoss = true   pass 2: the period loop again (cheaper than storing it), the haircut
//                  H[s, t, g] computed from Q on the host side, the loss per scenario and
//                  (optionally) per-loan sums over the block's scenarios.
// Compiled by NVRTC through cupy.RawModule(name_expressions=[...]); nothing is #included.
//
// Layout (kernels/cupy_engine.py builds every array):
//   * Loans are sorted by generation and each generation's run is padded with inert loans
//     (maturity 0: never active, no GPUs) to a multiple of 32, so every warp holds loans of
//     one generation: factor reads rent_g / price_g are warp-uniform shared-memory broadcasts,
//     and Q needs one warp reduction per period, not one per generation.  The padded book
//     (n_pad loans) is a whole number of tiles of blockDim.x loans.
//   * blockIdx.y = loan tile (threadIdx.x = one loan, its constants in registers, read once,
//     coalesced from SoA arrays [slot, n_pad]); blockIdx.x = a group of `per_block`
//     consecutive scenarios, looped over inside the block, the scenario's factor row staged
//     in shared memory.  Per-loan sums over the group stay in registers.
//   * Reductions are deterministic: warp shuffles (fixed butterfly), then warps in a fixed
//     order; across tiles Q is added as 64-bit fixed point (integer atomics are associative,
//     the quantum is 2^-62 of the generation's total pledged GPUs), and the per-tile losses
//     and per-group loan sums go to small partial arrays summed on the host side.  A
//     scenario's loss therefore does not depend on the chunk it was computed in.
//   * Never a [scenarios x loans] array in global memory.
//
// Arrays (row-major; S scenarios of the chunk, T periods, G generations, W = 3G + 6):
//   model        [M_COUNT]                  run constants (M_* below)
//   loan_real    [L_COUNT, n_pad]           per-loan constants (L_* below)
//   loan_int     [LI_COUNT, n_pad]          generation, borrower, t_M, last contracted period
//   loan_period  [P_COUNT, T, n_pad]        B(t-1), I(t), ln(n a / B(t-1)) for t = 1..T
//   factors      [S, T, W]                  per scenario and period t = 1..T: R_g (G), P_g (G),
//                                           ln P_g (G), BTC, ETH, power, r(t), Z(t), DF(t)
//   haircut      [S, T, G]                  H_g(t) (pass 2)
//   uniforms     [S, u_stride]              U_b (sampled mode)
//   qscale       [G]                        fixed-point scale 2^e_g of Q (pass 1)
//   volume       [S, T, G] uint64           Q in fixed point, zeroed by the caller (pass 1)
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
#define L_BTC 3               // b_i
#define L_ETH 4               // e_i
#define L_CRYPTO_PLEDGED 5    // 1 if pledged
#define L_THRESHOLD 6         // Phi^-1(p^Delta)
#define L_SQRT_RHO 7
#define L_INV_SQRT_1M_RHO 8   // 1 / sqrt(1 - rho)
#define L_CASH 9              // Cash(0)
#define L_LN_LC0 10
#define L_LN_CC0 11
#define L_LN_RF0 12
#define L_LN_REFI 13          // ln(lambda) + ln(n a / Bal): ln RF = clip(min(that + ln P, 0))
#define L_HAS_BALLOON 14      // 1 if Bal > 0
#define L_RATE 15             // fixed rate or floating spread
#define L_FLOATING 16         // 1 if floating
#define L_INCOME_CONTRACTED 17   // n N_h (k R^c - o) while t <= contract period
#define L_RENT_HOURS_CONTRACTED 18  // n N_h (1 - k) u
#define L_INCOME_FREE 19         // n N_h (-o) after the contract
#define L_RENT_HOURS_FREE 20     // n N_h u
#define L_COUNT 21

// loan_int[]
#define LI_GENERATION 0
#define LI_BORROWER 1
#define LI_MATURITY 2         // t_M (0: padding, never active)
#define LI_CONTRACT 3         // k(t) = contracted_share for t <= this
#define LI_COUNT 4

// loan_period[]
#define P_BALANCE 0           // B(t - 1)
#define P_INSTALLMENT 1       // I(t)
#define P_LN_GPUS_PER_BALANCE 2  // ln(n a / B(t - 1)), +-1e4 at the edges
#define P_COUNT 3

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
    const int sampled,
    const int want_loan_sums)
{
    GPUCREDIT_SMEM(smem);
    const int T = periods;
    const int G = n_generations;
    const int W = 3 * G + 6;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = blockDim.x >> 5;

    // Shared memory: factor row [T, W], haircut row [T, G], per-warp volume [n_warps, T],
    // per-warp partial loss [n_warps], then the warps' generations [n_warps] (int).
    real* s_factors = reinterpret_cast<real*>(smem);
    real* s_haircut = s_factors + T * W;
    real* s_volume = s_haircut + T * G;
    real* s_partial = s_volume + n_warps * T;
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
    const real threshold = loan_real[L_THRESHOLD * n_pad + i];
    const real sqrt_rho = loan_real[L_SQRT_RHO * n_pad + i];
    const real inv_sqrt_1m_rho = loan_real[L_INV_SQRT_1M_RHO * n_pad + i];
    const real cash0 = loan_real[L_CASH * n_pad + i];
    const real ln_lc0 = loan_real[L_LN_LC0 * n_pad + i];
    const real ln_cc0 = loan_real[L_LN_CC0 * n_pad + i];
    const real ln_rf0 = loan_real[L_LN_RF0 * n_pad + i];
    const real ln_refi = loan_real[L_LN_REFI * n_pad + i];
    const bool has_balloon = loan_real[L_HAS_BALLOON * n_pad + i] > real(0);
    const real rate_i = loan_real[L_RATE * n_pad + i];
    const real floating = loan_real[L_FLOATING * n_pad + i];
    const real income_c = loan_real[L_INCOME_CONTRACTED * n_pad + i];
    const real rent_hours_c = loan_real[L_RENT_HOURS_CONTRACTED * n_pad + i];
    const real income_f = loan_real[L_INCOME_FREE * n_pad + i];
    const real rent_hours_f = loan_real[L_RENT_HOURS_FREE * n_pad + i];

    const int gen = loan_int[LI_GENERATION * n_pad + i];
    const int borrower = loan_int[LI_BORROWER * n_pad + i];
    const int maturity = loan_int[LI_MATURITY * n_pad + i];
    const int contract = loan_int[LI_CONTRACT * n_pad + i];

    const real* balance_t = loan_period + (long long)P_BALANCE * T * n_pad + i;
    const real* installment_t = loan_period + (long long)P_INSTALLMENT * T * n_pad + i;
    const real* ln_gpus_t = loan_period + (long long)P_LN_GPUS_PER_BALANCE * T * n_pad + i;

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
        real cash = cash0;
        real survival = real(1);
        bool defaulted = false;
        real loss = real(0);

        for (int t = 1; t <= T; ++t) {
            const real* f = s_factors + (t - 1) * W;
            const real rent = f[gen];
            const real price = f[G + gen];
            const real ln_price = f[2 * G + gen];
            const real btc = f[3 * G];
            const real eth = f[3 * G + 1];
            const real power = f[3 * G + 2];
            const real base_rate = f[3 * G + 3];
            const real credit = f[3 * G + 4];

            const int o = (t - 1) * n_pad;
            const real balance = balance_t[o];
            const real installment = installment_t[o];
            const real ln_gpus = ln_gpus_t[o];

            const bool contracted = t <= contract;
            const real noi = (contracted ? income_c : income_f)
                + (contracted ? rent_hours_c : rent_hours_f) * rent - power_kwh * power;
            const real loan_rate = rate_i + floating * base_rate;
            const real debt_service = loan_rate * dt * balance + installment;
            const real crypto = btc_units * btc + eth_units * eth;

            const bool positive = debt_service > real(0);
            const real liquidity = (cash + crypto + noi) / (positive ? debt_service : real(1));
            const real ln_lc = positive ? gc_log(gc_clip(liquidity, floor_, cap)) : ln_cap;
            const real ln_cc = gc_clip(ln_price + ln_gpus, ln_floor, ln_cap);
            real shift = beta_l * (ln_lc - ln_lc0) + beta_c * (ln_cc - ln_cc0);
            if (has_balloon && t == maturity) {
                const real ln_rf = gc_clip(gc_min(ln_refi + ln_price, real(0)), ln_floor, ln_cap);
                shift += beta_r * (ln_rf - ln_rf0);
            }
            const real z = (threshold - shift - sqrt_rho * credit) * inv_sqrt_1m_rho;
            const real hazard = (t <= maturity) ? gc_ndtr(z) : real(0);
            const real survival_after = survival * (real(1) - hazard);
            real d;
            if (sampled) {
                const bool crossed = (real(1) - survival_after) >= u;  // 1 - S(t) >= U_b
                d = (crossed && !defaulted) ? real(1) : real(0);
                defaulted = defaulted || crossed;
            } else {
                d = survival * hazard;  // S(t - 1) h(t)
            }
            survival = survival_after;
            cash = gc_max(cash + noi - debt_service, real(0));

            if (!kLoss) {
                const real q = warp_sum(d * pledged_gpus);
                if (lane == 0) s_volume[warp * T + (t - 1)] = q;
            } else {
                const real h = s_haircut[(t - 1) * G + gen];
                const real discount = f[3 * G + 5];
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
            // Q[s, t, g]: this tile's warps of generation g, in warp order, as fixed point.
            for (int k = tid; k < T * G; k += blockDim.x) {
                const int t0 = k / G;
                const int g = k - t0 * G;
                double q = 0.0;
                for (int w = 0; w < n_warps; ++w) {
                    if (s_warp_gen[w] == g) q += (double)s_volume[w * T + t0];
                }
                if (q > 0.0) {
                    const unsigned long long fixed = (unsigned long long)llrint(q * qscale[g]);
                    atomicAdd(volume + (s * T + t0) * (long long)G + g, fixed);
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
