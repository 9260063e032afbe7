/* Fused forward and backward of the per-cell NB log-likelihood of totalVI's RNA counts (CPU, float32).
 *
 * For every cell b (row) and gene g, with mu = l * softmax(h)_g and one theta per gene:
 *
 *   ll_b = sum_g  x log mu - (x + theta) log(theta + mu) + theta log theta + C(x, theta)
 *   C(x, theta) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
 *
 * torch computes this in ~25 passes over the [B, G] tensors (see rna_likelihood.py); here the forward is three
 * passes per row (max, exp + sums, the rest) and the backward two, with the row in cache, over OpenMP threads
 * of the process's runtime (torch's, so torch.set_num_threads applies). C and D(x, theta) = digamma(x + theta) -
 * digamma(theta) come from per-gene tables of counts below W (count_terms.py builds them); larger counts add an
 * exact correction from the asymptotic series, in double.
 *
 * Sums are accumulated in double. Counts must be non-negative integers below 2^24 (what raw counts are);
 * otherwise the forward reports it and the caller uses the general path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_EXACT_INT 16777216.0f /* 2^24: float32 holds every integer below it */

/* One build runs on any x86-64: the kernels are compiled for AVX-512, AVX2 and the baseline, and the loader picks
 * the best the CPU has (a module built on a login node must run on older compute nodes too). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KERNEL
#endif

/* lgamma(z) for z >= 30 by Stirling's series; relative error < 1e-16 there. */
static double lgamma_large(double z) {
    const double half_log_2pi = 0.91893853320467274178;
    double r = 1.0 / z, r2 = r * r;
    double series = r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (1.0 / 1680.0))));
    return (z - 0.5) * log(z) - z + half_log_2pi + series;
}

/* digamma(z) for z >= 30 by the asymptotic series; absolute error < 1e-16 there. */
static double digamma_large(double z) {
    double r = 1.0 / z, r2 = r * r;
    double series = r2 * (1.0 / 12.0 - r2 * (1.0 / 120.0 - r2 * (1.0 / 252.0 - r2 * (1.0 / 240.0))));
    return log(z) - 0.5 * r - series;
}

/* Count tables of the per-gene terms for counts k < width:
 *   c_table[g, k] = C(k, theta_g) = sum_{j<k} log(theta_g + j) - lgamma(k + 1) = sum_{j<k} [log(theta_g + j) - log(j + 1)]
 *   d_table[g, k] = D(k, theta_g) = sum_{j<k} 1 / (theta_g + j)                 (skipped when d_table is NULL)
 * in float64 ([G, width] row-major). The gene loop is innermost so that it vectorises (one log per element). */
KERNEL void nb_tables(const float *theta, int64_t n_genes, int64_t width, double *c_table, double *d_table) {
#pragma omp parallel for schedule(static)
    for (int64_t g0 = 0; g0 < n_genes; g0 += 256) {
        const int64_t g1 = g0 + 256 < n_genes ? g0 + 256 : n_genes;
        double c[256], d[256];
        for (int64_t g = g0; g < g1; g++) {
            c[g - g0] = 0.0;
            d[g - g0] = 0.0;
            c_table[g * width] = 0.0;
            if (d_table) d_table[g * width] = 0.0;
        }
        for (int64_t k = 1; k < width; k++) {
            const double j = (double)(k - 1), log_k = log((double)k);
            for (int64_t g = g0; g < g1; g++) {
                const double th = (double)theta[g] + j;
                c[g - g0] += log(th) - log_k;
                d[g - g0] += 1.0 / th;
                c_table[g * width + k] = c[g - g0];
            }
            if (d_table)
                for (int64_t g = g0; g < g1; g++) d_table[g * width + k] = d[g - g0];
        }
    }
}

/* Forward.
 *   x, h: [B, G] counts and logits (row-major, contiguous); log_lib: [B]; theta, log_theta: [G];
 *   c_table: [G, W] C(k, theta_g) for k < W (float64, as built); width: W (>= 31, so that the series below,
 *   used from W - 1 on, are exact).
 *   Writes ll: [B]; mu: [B, G] the means; log1p_mu_theta: [B, G] log(1 + mu / theta) (both kept for the backward).
 *   log(theta + mu) is split as log theta + log1p(mu / theta) so that neither the likelihood nor the dispersion
 *   gradient subtracts two nearly equal logarithms at large theta (where NB tends to Poisson).
 *   Returns 0, or 1 when some count is not an integer in [0, 2^24) (outputs are then meaningless).
 */
KERNEL int nb_forward(const float *x, const float *h, const float *log_lib, const float *theta, const float *log_theta,
               const double *c_table, int64_t width, int64_t n_rows, int64_t n_genes, float *ll, float *mu,
               float *log1p_mu_theta) {
    int bad_any = 0;
#pragma omp parallel for schedule(static) reduction(| : bad_any)
    for (int64_t b = 0; b < n_rows; b++) {
        const float *xr = x + b * n_genes, *hr = h + b * n_genes;
        float *mr = mu + b * n_genes, *tr = log1p_mu_theta + b * n_genes;
        float m = -INFINITY;
        for (int64_t g = 0; g < n_genes; g++) m = hr[g] > m ? hr[g] : m;
        double s = 0.0, xh = 0.0, sx = 0.0, x_log_theta = 0.0;
        for (int64_t g = 0; g < n_genes; g++) {
            float e = expf(hr[g] - m);
            mr[g] = e;
            s += e;
            xh += (double)xr[g] * (double)(hr[g] - m);
            sx += xr[g];
            x_log_theta += (double)xr[g] * (double)log_theta[g];
        }
        const double log_l = log_lib[b];
        const float scale = (float)(exp(log_l) / s);
        double acc = 0.0, coeff = 0.0;
        int bad = 0, big = 0;
        for (int64_t g = 0; g < n_genes; g++) {
            float xv = xr[g];
            float mv = mr[g] * scale;
            mr[g] = mv;
            float t = log1pf(mv / theta[g]);
            tr[g] = t;
            acc += (double)(xv + theta[g]) * (double)t;
            /* NaN, infinity and negatives from the bits: -ffast-math lets the compiler assume floats are finite */
            uint32_t bits;
            memcpy(&bits, &xv, sizeof bits);
            int k = (int)xv;
            bad |= (((bits >> 23) & 0xffu) == 0xffu) | (int)(bits >> 31) | (xv >= MAX_EXACT_INT) | ((float)k != xv);
            big |= k >= width;
            int kc = k < width ? (k < 0 ? 0 : k) : (int)(width - 1);
            coeff += c_table[g * width + kc];
        }
        if (big) {
            /* C(x) = C(W-1) + [lgamma(x + theta) - lgamma(W-1 + theta)] - [lgamma(x + 1) - lgamma(W)] */
            for (int64_t g = 0; g < n_genes; g++) {
                double xv = xr[g];
                if (xv < (double)width) continue;
                double th = theta[g], w1 = (double)(width - 1);
                coeff += lgamma_large(xv + th) - lgamma_large(xv + 1.0);
                coeff -= lgamma_large(w1 + th) - lgamma_large(w1 + 1.0);
            }
        }
        /* log mu = (h - m) - log s + log l, so sum x log mu = xh - sx (log s - log l); and
         * theta log theta - (x + theta) log(theta + mu) = -x log theta - (x + theta) log1p(mu / theta) */
        ll[b] = (float)(xh - sx * (log(s) - log_l) - x_log_theta - acc + coeff);
        bad_any |= bad;
    }
    return bad_any;
}

/* Backward.
 *   grad: [B] upstream gradient of ll; x, mu, log1p_mu_theta: as the forward; log_lib: [B]; theta: [G];
 *   d_table: [G, W] D(k, theta_g) for k < W (float64).
 *   Writes grad_h: [B, G]; grad_log_lib: [B]; grad_log_theta: [G] (any of them may be NULL: not needed).
 *   Returns 0, or 1 when memory for per-thread sums or a scratch row could not be allocated (outputs meaningless).
 *
 * With r = 1 / (theta + mu):
 *   d ll / d log mu    = x - (x + theta) mu r = theta (x - mu) r
 *   d ll / d log theta = theta [log theta + 1 - log(theta + mu) - (x + theta) r + D(x, theta)]
 *                      = theta [D(x, theta) - log1p(mu / theta) - (x - mu) r]
 * The second forms have no cancellation: at large theta the bracket of the first is a difference of terms near
 * log theta + 1, and its float32 rounding, times theta, swamped the gradient.
 */
KERNEL int nb_backward(const float *grad, const float *x, const float *mu, const float *log1p_mu_theta,
                 const float *log_lib, const float *theta, const double *d_table, int64_t width, int64_t n_rows,
                 int64_t n_genes, float *grad_h, float *grad_log_lib, float *grad_log_theta) {
    double *theta_acc = NULL;
    int failed = 0;
    if (grad_log_theta) {
        theta_acc = calloc((size_t)n_genes, sizeof(double));
        if (!theta_acc) return 1;
    }
#pragma omp parallel reduction(| : failed)
    {
        /* Each row's d ll / d log mu goes into grad_h's row, or into this scratch row when grad_h is not wanted. The
         * gene loops below have no branches, so GCC vectorises them (a conditional store in the loop kept it
         * scalar: ~2x slower). */
        double *local = NULL;
        float *scratch = grad_h ? NULL : malloc((size_t)n_genes * sizeof(float));
        failed |= !grad_h && scratch == NULL;
        if (theta_acc) {
            local = calloc((size_t)n_genes, sizeof(double));
            failed |= local == NULL;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_rows; b++) {
            if (failed) continue; /* an allocation failed: the caller raises, outputs are meaningless */
            const float *xr = x + b * n_genes, *mr = mu + b * n_genes, *tr = log1p_mu_theta + b * n_genes;
            const float gb = grad[b];
            float *gr = grad_h ? grad_h + b * n_genes : scratch;
            double total = 0.0;
            if (local) {
                for (int64_t g = 0; g < n_genes; g++) {
                    float xv = xr[g], th = theta[g], mv = mr[g];
                    float diff_r = (xv - mv) / (th + mv); /* (x - mu) r */
                    float dlogmu = th * diff_r;
                    total += dlogmu;
                    gr[g] = dlogmu;
                    int k = (int)xv;
                    int kc = k < width ? k : (int)(width - 1); /* counts are checked non-negative by the forward */
                    local[g] += (double)gb * (d_table[g * width + kc] - (double)tr[g] - (double)diff_r);
                }
                /* the few counts >= W: D(x) = D(W-1) + digamma(x + theta) - digamma(W-1 + theta) (a scan of the row
                 * is cheaper than tracking them in the loop above) */
                for (int64_t g = 0; g < n_genes; g++) {
                    double xv = xr[g];
                    if (xv < (double)width) continue;
                    double th = theta[g], w1 = (double)(width - 1);
                    local[g] += (double)gb * (digamma_large(xv + th) - digamma_large(w1 + th));
                }
            } else {
                for (int64_t g = 0; g < n_genes; g++) {
                    float xv = xr[g], th = theta[g], mv = mr[g];
                    float dlogmu = th * ((xv - mv) / (th + mv));
                    total += dlogmu;
                    gr[g] = dlogmu;
                }
            }
            if (grad_log_lib) grad_log_lib[b] = (float)(gb * total);
            if (grad_h) {
                /* log mu = h - logsumexp(h) + log l: d/dh = dlogmu - softmax(h) sum(dlogmu), softmax = mu / l */
                const float coef = (float)(-total * exp(-(double)log_lib[b]));
                for (int64_t g = 0; g < n_genes; g++) gr[g] = gb * (gr[g] + mr[g] * coef);
            }
        }
        if (local) {
#pragma omp critical
            for (int64_t g = 0; g < n_genes; g++) theta_acc[g] += local[g];
            free(local);
        }
        free(scratch);
    }
    if (grad_log_theta) {
        for (int64_t g = 0; g < n_genes; g++) grad_log_theta[g] = (float)(theta_acc[g] * (double)theta[g]);
        free(theta_acc);
    }
    return failed;
}
