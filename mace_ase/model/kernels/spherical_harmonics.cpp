// Real spherical harmonics of the edge directions, l <= 3 (e3nn's basis with y as the polar axis, 'component'
// normalisation: sum_m Y_lm^2 = 2l + 1), and their backward pass, one edge per iteration (parallel over edges).
// The same polynomials as mace.py's spherical_harmonics(v / max(r, 1e-12)) (equal to rounding, ~1e-16 relative:
// the compiler may fuse multiply-adds), in one kernel instead of ~60 elementwise torch ops forward and ~100
// backward over all edges.
//
//   forward:  Y[e, k] = Y_k(n),  n = v_e / max(r_e, 1e-12)
//   backward: g_n = sum_k dL/dY_k dY_k/dn,  dL/dv = g_n / r,  dL/dr = -(g_n . v) / r^2  (0 where r < 1e-12)
//
// (the length's own gradient path, r = |v|, stays with torch.)

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

template <typename T>
struct Constants {  // the Python floats of mace.py, rounded to T as torch rounds a scalar operand
  const T s3 = T(std::sqrt(3.0)), s5 = T(std::sqrt(5.0)), s7 = T(std::sqrt(7.0)), half_s3 = T(std::sqrt(3.0) / 2.0);
  const T c56 = T(std::sqrt(5.0 / 6.0)), c38 = T(std::sqrt(3.0 / 8.0));
};

template <typename T>
inline void harmonics(T x, T y, T z, int max_ell, T* Y, const Constants<T>& k) {
  Y[0] = T(1);
  if (max_ell < 1) return;
  Y[1] = x * k.s3;
  Y[2] = y * k.s3;
  Y[3] = z * k.s3;
  if (max_ell < 2) return;
  const T s20 = k.s3 * x * z;
  const T s24 = k.half_s3 * (z * z - x * x);
  Y[4] = s20 * k.s5;
  Y[5] = k.s3 * x * y * k.s5;
  Y[6] = (y * y - T(0.5) * (x * x + z * z)) * k.s5;
  Y[7] = k.s3 * y * z * k.s5;
  Y[8] = s24 * k.s5;
  if (max_ell < 3) return;
  Y[9] = k.c56 * (s20 * z + s24 * x) * k.s7;
  Y[10] = k.s5 * s20 * y * k.s7;
  Y[11] = k.c38 * (T(4) * y * y - x * x - z * z) * x * k.s7;
  Y[12] = T(0.5) * y * (T(2) * y * y - T(3) * (x * x + z * z)) * k.s7;
  Y[13] = k.c38 * z * (T(4) * y * y - x * x - z * z) * k.s7;
  Y[14] = k.s5 * s24 * y * k.s7;
  Y[15] = k.c56 * (s24 * z - s20 * x) * k.s7;
}

// g . dY/dn for the components of one edge: the partial derivatives of the polynomials above in x, y, z
template <typename T>
inline void harmonics_backward(T x, T y, T z, int max_ell, const T* g, T* gn, const Constants<T>& k) {
  T gx = 0, gy = 0, gz = 0;
  if (max_ell >= 1) {
    gx += k.s3 * g[1];
    gy += k.s3 * g[2];
    gz += k.s3 * g[3];
  }
  if (max_ell >= 2) {
    const T a = k.s3 * k.s5;
    gx += a * (z * g[4] + y * g[5] - x * g[8]) - k.s5 * x * g[6];
    gy += a * (x * g[5] + z * g[7]) + T(2) * k.s5 * y * g[6];
    gz += a * (x * g[4] + y * g[7] + z * g[8]) - k.s5 * z * g[6];
  }
  if (max_ell >= 3) {
    const T b = k.s7 * k.c56 * k.s3;  // Y9 = b (1.5 x z^2 - 0.5 x^3), Y15 = b (0.5 z^3 - 1.5 x^2 z)
    const T c = k.s7 * k.s5 * k.s3;   // Y10 = c x y z, Y14 = c/2 (z^2 - x^2) y
    const T d = k.s7 * k.c38;         // Y11 = d (4 y^2 - x^2 - z^2) x, Y13 = d (4 y^2 - x^2 - z^2) z
    const T xx = x * x, yy = y * y, zz = z * z;
    gx += b * (T(1.5) * (zz - xx) * g[9] - T(3) * x * z * g[15]) + c * (y * z * g[10] - x * y * g[14]) +
          d * ((T(4) * yy - T(3) * xx - zz) * g[11] - T(2) * x * z * g[13]) - T(3) * k.s7 * x * y * g[12];
    gy += c * (x * z * g[10] + T(0.5) * (zz - xx) * g[14]) + d * T(8) * y * (x * g[11] + z * g[13]) +
          k.s7 * (T(3) * yy - T(1.5) * (xx + zz)) * g[12];
    gz += b * (T(3) * x * z * g[9] + T(1.5) * (zz - xx) * g[15]) + c * (x * y * g[10] + y * z * g[14]) +
          d * ((T(4) * yy - xx - T(3) * zz) * g[13] - T(2) * x * z * g[11]) - T(3) * k.s7 * y * z * g[12];
  }
  gn[0] = gx;
  gn[1] = gy;
  gn[2] = gz;
}

void check(const torch::Tensor& v, const torch::Tensor& r, int64_t max_ell) {
  TORCH_CHECK(v.device().is_cpu() && r.device().is_cpu(), "spherical harmonics kernel: CPU tensors only");
  TORCH_CHECK(v.dim() == 2 && v.size(1) == 3 && v.is_contiguous(), "vectors must be a contiguous [E, 3] tensor");
  TORCH_CHECK(r.numel() == v.size(0) && r.is_contiguous() && r.scalar_type() == v.scalar_type(),
              "lengths must be a contiguous [E, 1] tensor of the vectors' dtype");
  TORCH_CHECK(max_ell >= 0 && max_ell <= 3, "spherical harmonics kernel: l <= 3 only");
}

}  // namespace

torch::Tensor spherical_harmonics_forward(torch::Tensor v, torch::Tensor r, int64_t max_ell) {
  check(v, r, max_ell);
  const int64_t E = v.size(0), S = (max_ell + 1) * (max_ell + 1);
  auto Y = torch::empty({E, S}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "spherical_harmonics_forward", [&] {
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pr = r.data_ptr<scalar_t>();
    scalar_t* pY = Y.data_ptr<scalar_t>();
    const Constants<scalar_t> k;
    at::parallel_for(0, E, 4096, [&](int64_t begin, int64_t end) {
      scalar_t out[16];
      for (int64_t e = begin; e < end; ++e) {
        const scalar_t length = std::max(pr[e], scalar_t(1e-12));
        harmonics<scalar_t>(pv[3 * e] / length, pv[3 * e + 1] / length, pv[3 * e + 2] / length,
                            static_cast<int>(max_ell), out, k);
        for (int64_t s = 0; s < S; ++s) pY[e * S + s] = out[s];
      }
    });
  });
  return Y;
}

std::vector<torch::Tensor> spherical_harmonics_backward(torch::Tensor grad, torch::Tensor v, torch::Tensor r,
                                                        int64_t max_ell) {
  check(v, r, max_ell);
  const int64_t E = v.size(0), S = (max_ell + 1) * (max_ell + 1);
  TORCH_CHECK(grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == E && grad.size(1) == S &&
              grad.scalar_type() == v.scalar_type(), "grad must be a contiguous [E, (l+1)^2] tensor");
  auto grad_v = torch::empty_like(v);
  auto grad_r = torch::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "spherical_harmonics_backward", [&] {
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pr = r.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    scalar_t* gv = grad_v.data_ptr<scalar_t>();
    scalar_t* gr = grad_r.data_ptr<scalar_t>();
    const Constants<scalar_t> k;
    at::parallel_for(0, E, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const bool clamped = !(pr[e] >= scalar_t(1e-12));
        const scalar_t length = clamped ? scalar_t(1e-12) : pr[e];
        const scalar_t vx = pv[3 * e], vy = pv[3 * e + 1], vz = pv[3 * e + 2];
        scalar_t gn[3];
        harmonics_backward<scalar_t>(vx / length, vy / length, vz / length, static_cast<int>(max_ell), pg + e * S,
                                     gn, k);
        gv[3 * e] = gn[0] / length;
        gv[3 * e + 1] = gn[1] / length;
        gv[3 * e + 2] = gn[2] / length;
        gr[e] = clamped ? scalar_t(0) : -(gn[0] * vx + gn[1] * vy + gn[2] * vz) / (length * length);
      }
    });
  });
  return {grad_v, grad_r};
}
