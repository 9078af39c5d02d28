/* Training-mode BatchNorm2d, optionally followed by ReLU, of a channels-last float32 CPU tensor.

   The tensor (N, C, H, W) stored channels-last is N*H rows of W*C floats; column j of a row holds
   channel j % C. A training call makes two passes over the data inside one OpenMP parallel region (the
   OpenMP runtime PyTorch already loaded): every thread sums its own rows into its own per-column
   partial sums, one thread folds them to per-channel sums (in double, threads in order, so a given
   thread count always gives the same numbers), then every thread writes its rows. PyTorch's own
   kernel makes ~10 passes for the same work once the ReLU's is counted, and is slow for channel
   counts that are not a multiple of its vector width.

   Built and loaded by nas/cpu/native.py; see nas/cpu/batchnorm.py for the Python side. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static void row_range(int64_t rows, int thread, int threads, int64_t *first, int64_t *end) {
    int64_t per = rows / threads, extra = rows % threads;
    *first = thread * per + (thread < extra ? thread : extra);
    *end = *first + per + (thread < extra);
}

/* Per-column sums of a and of a*b over rows [first, end); with scale, a counts only where
   b * scale + shift > 0 (where the ReLU after the BatchNorm passed its input). */
static void column_sums(const float *a, const float *b, const float *scale, const float *shift, int64_t first,
                        int64_t end, int64_t k, float *restrict sum, float *restrict dot) {
    memset(sum, 0, k * sizeof(float));
    memset(dot, 0, k * sizeof(float));
    for (int64_t i = first; i < end; i++) {
        const float *ar = a + i * k, *br = b + i * k;
        if (scale) {
            for (int64_t j = 0; j < k; j++) {
                float v = br[j] * scale[j] + shift[j] <= 0 ? 0.f : ar[j];
                sum[j] += v;
                dot[j] += v * br[j];
            }
        } else {
            for (int64_t j = 0; j < k; j++) {
                sum[j] += ar[j];
                dot[j] += ar[j] * br[j];
            }
        }
    }
}

/* The threads' column sums folded to per-channel sums. */
static void channel_sums(const float *partial, int threads, int64_t k, int64_t c, double *sum, double *dot) {
    memset(sum, 0, c * sizeof(double));
    memset(dot, 0, c * sizeof(double));
    for (int t = 0; t < threads; t++) {
        const float *s = partial + (int64_t)t * 2 * k, *d = s + k;
        for (int64_t j = 0; j < k; j++) {
            sum[j % c] += s[j];
            dot[j % c] += d[j];
        }
    }
}

/* The per-column affine map of the forward: out = x * scale + shift, then the ReLU. The backward
   recomputes it to find where the ReLU passed, rather than reading the output back (a third of its
   memory traffic); built with -ffp-contract=off, so both compute the same floats. */
static void affine_columns(int64_t k, int64_t c, const float *weight, const float *bias, const float *mean,
                           const float *rstd, float *scale, float *shift) {
    for (int64_t j = 0; j < k; j++) {
        scale[j] = weight[j % c] * rstd[j % c];
        shift[j] = bias[j % c] - mean[j % c] * scale[j];
    }
}

/* Rows [first, end) of out = x * scale + shift, then max(., 0) with relu (NaN passes, as in torch.relu). */
static void normalize_rows(const float *x, float *out, int64_t first, int64_t end, int64_t k, const float *scale,
                           const float *shift, int relu) {
    for (int64_t i = first; i < end; i++) {
        const float *xr = x + i * k;
        float *o = out + i * k;
        if (relu) {
            for (int64_t j = 0; j < k; j++) {
                float v = xr[j] * scale[j] + shift[j];
                o[j] = v < 0 ? 0.f : v;
            }
        } else {
            for (int64_t j = 0; j < k; j++) o[j] = xr[j] * scale[j] + shift[j];
        }
    }
}

/* out = x normalized with the batch statistics, scaled and shifted (then max(., 0) with relu; NaN
   passes, as in torch.relu). Writes the batch mean and 1/sqrt(var + eps) per channel (for the
   backward), and updates the running statistics as nn.BatchNorm2d does: each moves `momentum` of
   the way to the batch's mean and unbiased variance, and the batch counter goes up by one.
   Returns 0, or 1 if out of memory. */
int nas_batchnorm_forward(const float *x, float *out, int64_t rows, int64_t k, int64_t c,
                          const float *weight, const float *bias, double eps, int relu, int threads,
                          float *mean, float *rstd, float *running_mean, float *running_var, double momentum,
                          int64_t *batches_tracked) {
    float *partial = malloc(sizeof(float) * (2 * k * threads + 2 * k));
    double *sums = malloc(sizeof(double) * 2 * c);
    if (!partial || !sums) {
        free(partial);
        free(sums);
        return 1;
    }
    float *scale = partial + 2 * k * threads, *shift = scale + k;
    double count = (double)rows * (double)(k / c);
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num();
        int64_t first, end;
        row_range(rows, t, threads, &first, &end);
        column_sums(x, x, NULL, NULL, first, end, k, partial + 2 * k * t, partial + 2 * k * t + k);
        #pragma omp barrier
        #pragma omp single
        {
            channel_sums(partial, threads, k, c, sums, sums + c);
            for (int64_t ch = 0; ch < c; ch++) {
                double m = sums[ch] / count, v = sums[c + ch] / count - m * m;
                if (v < 0) v = 0;
                mean[ch] = (float)m;
                rstd[ch] = (float)(1.0 / sqrt(v + eps));
                running_mean[ch] += (float)(momentum * (m - running_mean[ch]));
                running_var[ch] += (float)(momentum * (v * count / (count > 1 ? count - 1 : 1) - running_var[ch]));
            }
            *batches_tracked += 1;
            affine_columns(k, c, weight, bias, mean, rstd, scale, shift);
        }
        normalize_rows(x, out, first, end, k, scale, shift, relu);
    }
    free(partial);
    free(sums);
    return 0;
}

/* Evaluation-mode BatchNorm (then ReLU with relu): out = x normalized with the running statistics,
   scaled and shifted, in one pass. Returns 0, or 1 if out of memory. */
int nas_batchnorm_inference(const float *x, float *out, int64_t rows, int64_t k, int64_t c, const float *weight,
                            const float *bias, const float *running_mean, const float *running_var, double eps,
                            int relu, int threads) {
    float *rstd = malloc(sizeof(float) * (c + 2 * k));
    if (!rstd) return 1;
    float *scale = rstd + c, *shift = scale + k;
    for (int64_t ch = 0; ch < c; ch++) rstd[ch] = (float)(1.0 / sqrt((double)running_var[ch] + eps));
    affine_columns(k, c, weight, bias, running_mean, rstd, scale, shift);
    #pragma omp parallel num_threads(threads)
    {
        int64_t first, end;
        row_range(rows, omp_get_thread_num(), threads, &first, &end);
        normalize_rows(x, out, first, end, k, scale, shift, relu);
    }
    free(rstd);
    return 0;
}

/* Gradients of nas_batchnorm_forward: grad_x, and per channel grad_weight and grad_bias, from the
   gradient of its output, its input x and the mean and rstd it wrote (with relu, the ReLU's mask is
   recomputed from x). Returns 0, or 1 if out of memory. */
int nas_batchnorm_backward(const float *grad, const float *x, float *grad_x, int64_t rows, int64_t k, int64_t c,
                           const float *weight, const float *bias, const float *mean, const float *rstd, int relu,
                           int threads, float *grad_weight, float *grad_bias) {
    float *partial = malloc(sizeof(float) * (2 * k * threads + 5 * k));
    double *sums = malloc(sizeof(double) * 2 * c);
    if (!partial || !sums) {
        free(partial);
        free(sums);
        return 1;
    }
    float *a = partial + 2 * k * threads, *b = a + k, *offset = b + k, *scale = offset + k, *shift = scale + k;
    double count = (double)rows * (double)(k / c);
    affine_columns(k, c, weight, bias, mean, rstd, scale, shift);
    const float *mask_scale = relu ? scale : NULL;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num();
        int64_t first, end;
        row_range(rows, t, threads, &first, &end);
        column_sums(grad, x, mask_scale, shift, first, end, k, partial + 2 * k * t, partial + 2 * k * t + k);
        #pragma omp barrier
        #pragma omp single
        {
            channel_sums(partial, threads, k, c, sums, sums + c);
            for (int64_t ch = 0; ch < c; ch++) {
                /* grad_x = weight*rstd * (g - mean(g) - xhat * mean(g * xhat)), as a*g + b*x + offset */
                double grad_sum = sums[ch];
                double grad_dot_xhat = rstd[ch] * (sums[c + ch] - mean[ch] * grad_sum);
                double ach = (double)weight[ch] * rstd[ch];
                double bch = -ach * rstd[ch] * grad_dot_xhat / count;
                double och = -ach * grad_sum / count - bch * mean[ch];
                grad_weight[ch] = (float)grad_dot_xhat;
                grad_bias[ch] = (float)grad_sum;
                for (int64_t j = ch; j < k; j += c) {
                    a[j] = (float)ach;
                    b[j] = (float)bch;
                    offset[j] = (float)och;
                }
            }
        }
        for (int64_t i = first; i < end; i++) {
            const float *gr = grad + i * k, *xr = x + i * k;
            float *d = grad_x + i * k;
            if (relu) {
                for (int64_t j = 0; j < k; j++) {
                    float g = xr[j] * scale[j] + shift[j] <= 0 ? 0.f : gr[j];
                    d[j] = g * a[j] + xr[j] * b[j] + offset[j];
                }
            } else {
                for (int64_t j = 0; j < k; j++) d[j] = gr[j] * a[j] + xr[j] * b[j] + offset[j];
            }
        }
    }
    free(partial);
    free(sums);
    return 0;
}
