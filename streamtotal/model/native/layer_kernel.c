/* Two small CPU kernels of a totalVI step that torch does in several passes each (float32, row-major).
 *
 * encoder_input: the encoder's input [log1p(x / (1 + mean_g x)), log1p(y / (1 + mean_t y))] of a minibatch, written
 *   into one [B, G + T] array (torch: a mean, a division, a concatenation and a log1p over [B, G], ~0.6 ms at
 *   B = 256, G = 2,000; here one read of the counts).
 * dropout: inverted dropout with a counter-based random stream (a hash of seed and element index): the same
 *   distribution as torch's (keep with probability 1 - p, scale by 1 / (1 - p), up to 2^-16 in p), one pass, and
 *   the mask depends only on the seed, which the caller draws from torch's generator, so runs stay reproducible
 *   and resumable. torch draws one Bernoulli per element from its Mersenne twister (~8 ns each).
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KERNEL
#endif

/* Encoder input.
 *   rna: [B, G] counts; protein: [B, T] counts, 0 where unmeasured (the caller replaces whatever they held);
 *   measured: [B] number of measured proteins per cell (>= 1), the protein mean's denominator;
 *   out: [B, G + T]. scale: divide by 1 + the row mean (else not); log: log1p (else identity).
 */
KERNEL void encoder_input(const float *restrict rna, const float *restrict protein, const float *restrict measured,
                          int64_t n_rows, int64_t n_genes, int64_t n_prot, int scale, int log_transform,
                          float *restrict out) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n_rows; b++) {
        const float *xr = rna + b * n_genes, *yr = protein + b * n_prot;
        float *o = out + b * (n_genes + n_prot);
        float rna_div = 1.0f, prot_div = 1.0f;
        if (scale) {
            double sx = 0.0, sy = 0.0;
            for (int64_t g = 0; g < n_genes; g++) sx += xr[g];
            for (int64_t t = 0; t < n_prot; t++) sy += yr[t];
            rna_div = (float)(1.0 + sx / (double)n_genes);
            prot_div = (float)(1.0 + sy / (double)measured[b]);
        }
        const float rna_inv = 1.0f / rna_div, prot_inv = 1.0f / prot_div;
        if (log_transform) {
            /* logf(1 + v), not log1pf: libmvec's vector logf is in every glibc since 2.22 (log1pf only since 2.35,
             * and not for AVX-512); for v >= 0 the absolute error is a float32 rounding, all a network input needs */
            for (int64_t g = 0; g < n_genes; g++) o[g] = logf(1.0f + xr[g] * rna_inv);
            for (int64_t t = 0; t < n_prot; t++) o[n_genes + t] = logf(1.0f + yr[t] * prot_inv);
        } else {
            for (int64_t g = 0; g < n_genes; g++) o[g] = xr[g] * rna_inv;
            for (int64_t t = 0; t < n_prot; t++) o[n_genes + t] = yr[t] * prot_inv;
        }
    }
}

/* A 32-bit integer hash with good avalanche (Wellons' "lowbias32"); 32-bit multiplies vectorise on AVX2/AVX-512F. */
static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* Dropout forward: out = x * keep * scale, and keep_scale = keep * scale (the backward's multiplier).
 *   Element i is kept when the top 16 bits of hash32(hash32(i + seed_lo) ^ seed_hi) are at or above threshold =
 *   round(p * 2^16). n elements (< 2^32); seed: 64 random bits drawn by the caller.
 */
KERNEL void dropout_forward(const float *restrict x, int64_t n, uint32_t threshold, float scale, uint64_t seed,
                            float *restrict out, float *restrict keep_scale) {
    const uint32_t lo = (uint32_t)seed, hi = (uint32_t)(seed >> 32);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const uint32_t u = hash32(hash32((uint32_t)i + lo) ^ hi) >> 16;
        const float m = u >= threshold ? scale : 0.0f;
        keep_scale[i] = m;
        out[i] = x[i] * m;
    }
}
