/* totalVI's per-cell protein terms, fused (CPU, float32 in and out, float64 inside).
 *
 * For every cell b and protein t with y = count, lb = sampled log background mean, a = foreground scale (>= 1),
 * pi = mixing logit (of the background component), theta = inverse dispersion, and the background's posterior mean
 * m and scale s against its prior N(pm, exp(pls)^2):
 *
 *   ll = C(y, theta) + logaddexp(back, fore)                              (log of the NB mixture)
 *   back = y d_b - (theta + y) softplus(d_b) - softplus(-pi),   d_b = lb - log theta
 *   fore = y d_f - (theta + y) softplus(d_f) - softplus(pi),    d_f = d_b + log a
 *   C(y, theta) = lgamma(y + theta) - lgamma(theta) - lgamma(y + 1)
 *   kl = pls - log s + (s^2 + (m - pm)^2) / (2 exp(2 pls)) - 1/2
 *
 * which is y log mu - (theta + y) log(theta + mu) + theta log theta + ... rewritten with log(theta + mu) = log theta +
 * softplus(log mu - log theta), so no two nearly equal logarithms are subtracted at large theta: the decomposition of
 * the torch path too (likelihoods.log_nb_mixture_from_log_means), which takes C in float32 by Stirling's series where
 * this kernel takes it in float64. Per cell it returns nll = -sum_t ll and kl = sum_t kl over the measured proteins.
 *
 * In torch these are ~60 operations forward and ~100 backward on [B, T] tensors (B = 256, T = 50): ~1.8 ms of a CPU
 * step spent mostly dispatching. Here the forward is one pass that also stores the elementwise derivatives, and the
 * backward one pass that scales them by the upstream per-cell gradients. lgamma and digamma are evaluated after a
 * shift of 6 by their asymptotic series (absolute error < 1e-9), which GCC vectorises with glibc's libmvec.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KERNEL
#endif

#define N_LOCAL 7 /* derivatives stored per element by the forward, see protein_forward */

/* lgamma(z), z > 0: lgamma(z + 6) by Stirling's series minus log(z (z+1) ... (z+5)). */
static inline double lgamma_pos(double z) {
    const double half_log_2pi = 0.91893853320467274178;
    double p = z * (z + 1.0) * (z + 2.0) * (z + 3.0) * (z + 4.0) * (z + 5.0);
    double w = z + 6.0, r = 1.0 / w, r2 = r * r;
    double series = r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (1.0 / 1680.0))));
    return (w - 0.5) * log(w) - w + half_log_2pi + series - log(p);
}

/* digamma(z), z > 0: digamma(z + 6) by the asymptotic series minus sum_{i<6} 1 / (z + i). */
static inline double digamma_pos(double z) {
    double shift = 1.0 / z + 1.0 / (z + 1.0) + 1.0 / (z + 2.0) + 1.0 / (z + 3.0) + 1.0 / (z + 4.0) + 1.0 / (z + 5.0);
    double w = z + 6.0, r = 1.0 / w, r2 = r * r;
    double series = r2 * (1.0 / 12.0 - r2 * (1.0 / 120.0 - r2 * (1.0 / 252.0 - r2 * (1.0 / 240.0))));
    return log(w) - 0.5 * r - series - shift;
}

/* softplus(z) = log(1 + e^z) and sigmoid(z), from e = exp(-|z|) so nothing overflows (-ffast-math assumes no inf) */
static inline double softplus_from(double z, double e) { return fmax(z, 0.0) + log(1.0 + e); }
static inline double sigmoid_from(double z, double e) {
    double s = 1.0 / (1.0 + e);
    return z >= 0.0 ? s : e * s;
}

/* One cell's terms (see protein_forward); inlined with with_local constant, so each version's gene loop has no
 * branch and is vectorised. */
static inline __attribute__((always_inline)) void protein_row(
    const float *restrict y, const float *restrict mask, const float *restrict log_back,
    const float *restrict back_scale, const float *restrict back_mean, const float *restrict fore_scale,
    const float *restrict mix_logits, const float *restrict th_row, const float *restrict prior_mean,
    const float *restrict prior_log_scale, int64_t n_prot, float *nll, float *kl, float *restrict l0,
    float *restrict l1, float *restrict l2, float *restrict l3, float *restrict l4, float *restrict l5,
    float *restrict l6, const int with_local) {
    double ll_sum = 0.0, kl_sum = 0.0;
    for (int64_t t = 0; t < n_prot; t++) {
        const int64_t i = t; /* the row's own pointers: every array below starts at this cell */
        /* Unmeasured entries are selected out, never multiplied by 0: whatever they hold (NaN, inf) would make
         * 0 * NaN = NaN of the cell's sums and of its gradients. */
        const int on = mask[i] != 0.0f;
        const double yv = y[i];
        const double th = th_row[t], lth = log(th), lb = log_back[i], a = fore_scale[i], pi = mix_logits[i];
        const double d_b = lb - lth, d_f = d_b + log(a);
        const double e_b = exp(-fabs(d_b)), e_f = exp(-fabs(d_f)), e_pi = exp(-fabs(pi));
        const double sp_b = softplus_from(d_b, e_b), sp_f = softplus_from(d_f, e_f);
        const double sp_pi = softplus_from(pi, e_pi); /* softplus(pi); softplus(-pi) = softplus(pi) - pi */
        const double ty = th + yv;
        const double back = yv * d_b - ty * sp_b - (sp_pi - pi);
        const double fore = yv * d_f - ty * sp_f - sp_pi;
        const double gap = fore - back, e_gap = exp(-fabs(gap));
        const double coeff = lgamma_pos(yv + th) - lgamma_pos(th) - lgamma_pos(yv + 1.0);
        ll_sum += on ? coeff + fmax(back, fore) + log(1.0 + e_gap) : 0.0;

        const double s = back_scale[i], dm = (double)back_mean[i] - (double)prior_mean[i];
        const double pls = prior_log_scale[i], inv_v = exp(-2.0 * pls), q = (s * s + dm * dm) * inv_v;
        kl_sum += on ? pls - log(s) + 0.5 * q - 0.5 : 0.0;

        if (with_local) {
            const double w = sigmoid_from(gap, e_gap); /* posterior probability of the foreground */
            const double sig_b = sigmoid_from(d_b, e_b), sig_f = sigmoid_from(d_f, e_f);
            const double dback = yv - ty * sig_b, dfore = yv - ty * sig_f; /* d back / d lb, d fore / d d_f */
            const double dth_b = sig_b - sp_b - yv * (1.0 - sig_b) / th;  /* d back / d theta */
            const double dth_f = sig_f - sp_f - yv * (1.0 - sig_f) / th;
            const double dpsi = digamma_pos(yv + th) - digamma_pos(th);
            l0[i] = on ? (float)((1.0 - w) * dback + w * dfore) : 0.0f;
            l1[i] = on ? (float)(w * dfore / a) : 0.0f;
            l2[i] = on ? (float)((1.0 - w) - sigmoid_from(pi, e_pi)) : 0.0f;
            l3[i] = on ? (float)(dpsi + (1.0 - w) * dth_b + w * dth_f) : 0.0f;
            l4[i] = on ? (float)(s * inv_v - 1.0 / s) : 0.0f;
            l5[i] = on ? (float)(dm * inv_v) : 0.0f;
            l6[i] = on ? (float)(1.0 - q) : 0.0f;
        }
    }
    *nll = (float)-ll_sum;
    *kl = (float)kl_sum;
}

/* Forward.
 *   y, log_back, back_scale, back_mean, fore_scale, mix_logits, prior_mean, prior_log_scale: [B, T] (row-major);
 *   mask: [B, T] 1.0 where measured, 0.0 where not (those entries contribute nothing and get zero derivatives,
 *   whatever any input holds there, NaN and inf included);
 *   theta: row b starts at theta + b * theta_stride (stride 0: one theta per protein).
 *   Writes nll, kl: [B]. When local is not NULL, also local: [N_LOCAL, B, T], zero where unmeasured:
 *     0: d ll / d lb   1: d ll / d a   2: d ll / d pi   3: d ll / d theta
 *     4: d kl / d s    5: d kl / d m (= -d kl / d pm)    6: d kl / d pls
 */
KERNEL void protein_forward(const float *y, const float *mask, const float *log_back, const float *back_scale,
                            const float *back_mean, const float *fore_scale, const float *mix_logits,
                            const float *theta, int64_t theta_stride, const float *prior_mean,
                            const float *prior_log_scale, int64_t n_rows, int64_t n_prot, float *nll, float *kl,
                            float *local) {
    const int64_t plane = n_rows * n_prot;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n_rows; b++) {
        const int64_t o = b * n_prot;
        /* restrict pointers per row and per derivative plane: without them GCC needs more run-time overlap checks
         * than it will emit and leaves the loop scalar (4x slower) */
        if (local)
            protein_row(y + o, mask + o, log_back + o, back_scale + o, back_mean + o, fore_scale + o, mix_logits + o,
                        theta + b * theta_stride, prior_mean + o, prior_log_scale + o, n_prot, nll + b, kl + b,
                        local + o, local + plane + o, local + 2 * plane + o, local + 3 * plane + o,
                        local + 4 * plane + o, local + 5 * plane + o, local + 6 * plane + o, 1);
        else
            protein_row(y + o, mask + o, log_back + o, back_scale + o, back_mean + o, fore_scale + o, mix_logits + o,
                        theta + b * theta_stride, prior_mean + o, prior_log_scale + o, n_prot, nll + b, kl + b,
                        NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0);
    }
}

/* out[b, t] = scale * g[b] * src[b, t] (skipped when out is NULL) */
static inline void scale_rows(float *out, const float *src, const float *g, float scale, int64_t n_rows, int64_t n_prot) {
    if (!out) return;
    for (int64_t b = 0; b < n_rows; b++) {
        const float gb = scale * g[b];
        for (int64_t t = 0; t < n_prot; t++) out[b * n_prot + t] = gb * src[b * n_prot + t];
    }
}

/* Backward: the forward's derivatives scaled by the upstream gradients grad_nll, grad_kl ([B]). Serial: a few
 * vectorised passes over [B, T] take microseconds, less than waking the OpenMP threads.
 *   Writes (each may be NULL: not needed) g_lb, g_a, g_pi, g_s, g_m, g_pm, g_pls: [B, T]; g_theta: [B, T], or [T]
 *   summed over cells when theta_stride is 0 (one theta per protein).
 */
KERNEL void protein_backward(const float *grad_nll, const float *grad_kl, const float *local, int64_t theta_stride,
                             int64_t n_rows, int64_t n_prot, float *g_lb, float *g_a, float *g_pi, float *g_theta,
                             float *g_s, float *g_m, float *g_pm, float *g_pls) {
    const int64_t plane = n_rows * n_prot;
    /* nll = -sum_t ll, so the likelihood's derivatives are scaled by -grad_nll */
    scale_rows(g_lb, local, grad_nll, -1.0f, n_rows, n_prot);
    scale_rows(g_a, local + plane, grad_nll, -1.0f, n_rows, n_prot);
    scale_rows(g_pi, local + 2 * plane, grad_nll, -1.0f, n_rows, n_prot);
    if (g_theta && theta_stride == 0) {
        for (int64_t t = 0; t < n_prot; t++) g_theta[t] = 0.0f;
        for (int64_t b = 0; b < n_rows; b++) {
            const float gb = -grad_nll[b];
            for (int64_t t = 0; t < n_prot; t++) g_theta[t] += gb * local[3 * plane + b * n_prot + t];
        }
    } else {
        scale_rows(g_theta, local + 3 * plane, grad_nll, -1.0f, n_rows, n_prot);
    }
    scale_rows(g_s, local + 4 * plane, grad_kl, 1.0f, n_rows, n_prot);
    scale_rows(g_m, local + 5 * plane, grad_kl, 1.0f, n_rows, n_prot);
    scale_rows(g_pm, local + 5 * plane, grad_kl, -1.0f, n_rows, n_prot);
    scale_rows(g_pls, local + 6 * plane, grad_kl, 1.0f, n_rows, n_prot);
}
