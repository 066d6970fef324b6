// Scale-only LayerNorm (no bias), forward and backward; math in palmcore/ops.h.
#include <algorithm>
#include <cmath>

#include "cpu/cpu_ops.h"

namespace palmcore::cpu {

// xhat = (x - mean) · rstd, rstd = 1/sqrt(var + eps) (biased variance), out = xhat · scale
void layernorm_forward(const Tensor& x, const Tensor& scale, float eps, Tensor& out, Tensor& xhat,
                       Tensor& rstd) {
  const int64_t rows = x.dim(0), width = x.dim(1);
  const float* xs = x.data<float>();
  const float* g = scale.data<float>();
  float* o = out.data<float>();
  float* xh = xhat.data<float>();
  float* rs = rstd.data<float>();
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xs + r * width;
    float sum = 0.0f;
    for (int64_t c = 0; c < width; ++c) sum += xr[c];
    const float mean = sum / width;
    float sq = 0.0f;
    for (int64_t c = 0; c < width; ++c) sq += (xr[c] - mean) * (xr[c] - mean);
    const float inv = 1.0f / std::sqrt(sq / width + eps);
    rs[r] = inv;
    float* xhr = xh + r * width;
    float* orow = o + r * width;
    for (int64_t c = 0; c < width; ++c) {
      xhr[c] = (xr[c] - mean) * inv;
      orow[c] = xhr[c] * g[c];
    }
  }
}

// dxhat = dout · scale;  dx += rstd · (dxhat - mean(dxhat) - xhat · mean(dxhat · xhat));
// dscale += Σ_rows dout · xhat (column-parallel, rows in order: deterministic).
void layernorm_backward(const Tensor& dout, const Tensor& xhat, const Tensor& rstd,
                        const Tensor& scale, Tensor& dx, Tensor& dscale) {
  const int64_t rows = dout.dim(0), width = dout.dim(1);
  const float* dy = dout.data<float>();
  const float* xh = xhat.data<float>();
  const float* rs = rstd.data<float>();
  const float* g = scale.data<float>();
  float* dxs = dx.data<float>();
  float* dg = dscale.data<float>();
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
      const float* dyr = dy + r * width;
      const float* xhr = xh + r * width;
      float mean_dxhat = 0.0f, mean_dxhat_xhat = 0.0f;
      for (int64_t c = 0; c < width; ++c) {
        const float dxhat = dyr[c] * g[c];
        mean_dxhat += dxhat;
        mean_dxhat_xhat += dxhat * xhr[c];
      }
      mean_dxhat /= width;
      mean_dxhat_xhat /= width;
      float* dxr = dxs + r * width;
      for (int64_t c = 0; c < width; ++c)
        dxr[c] += rs[r] * (dyr[c] * g[c] - mean_dxhat - xhr[c] * mean_dxhat_xhat);
    }
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < width; c0 += kColumnBlock) {
      const int64_t c1 = std::min(width, c0 + kColumnBlock);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = c0; c < c1; ++c) dg[c] += dy[r * width + c] * xh[r * width + c];
    }
  }
}

}  // namespace palmcore::cpu
