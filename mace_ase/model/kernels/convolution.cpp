// Fused MACE interaction convolution for the CPU: for every receiver i,
//     out[i, b, c] = sum_k sum_{(pa, b)} G_{pa,b}(Y_ik) * W[ik, p, c] * x[sender(ik), a, c],
//     G_{pa,b}(Y) = sum_m value * Y[m]   (Clebsch-Gordan entries times e3nn's path weight, grouped by (pa, b)),
// and its exact backward pass, without forming any per-edge, per-path, per-channel tensor other than the radial
// weights W of the chunk being processed. Edges are in the padded receiver-major layout of mace.py: rows
// r*K .. r*K+K-1 belong to receiver r of the chunk. Inactive rows (padding, r >= r_max) contribute nothing.
//
// Tables (built in fused.py from the ConvolutionPath modules):
//   pa     [n_pa, 2]   int64: (radial weight row p, sender feature component a) of each weight-times-feature vector
//   pairs  [n_pair, 3] int64: (pa index, output component b, start of its entries), plus one end row
//   terms  [n_term]    int64: spherical-harmonic component m of each entry; values [n_term] float64: its coefficient
// Compiled at first use by torch.utils.cpp_extension (see fused.py); parallel over receivers with at::parallel_for.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

template <typename scalar_t>
void forward_kernel(const scalar_t* W, const scalar_t* Y, const scalar_t* x, const int64_t* sender,
                    const bool* active, scalar_t* out, int64_t n_recv, int64_t K, int64_t P, int64_t S,
                    int64_t D_in, int64_t D_out, int64_t C, const int64_t* pa, int64_t n_pa, const int64_t* pairs,
                    int64_t n_pair, const int64_t* terms, const double* values) {
  at::parallel_for(0, n_recv, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> wx(n_pa * C);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* o = out + r * D_out * C;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = r * K + k;
        if (!active[e]) continue;
        const scalar_t* w_e = W + e * P * C;
        const scalar_t* x_s = x + sender[e] * D_in * C;
        const scalar_t* y_e = Y + e * S;
        for (int64_t q = 0; q < n_pa; ++q) {
          const scalar_t* w = w_e + pa[2 * q] * C;
          const scalar_t* xa = x_s + pa[2 * q + 1] * C;
          scalar_t* t = wx.data() + q * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) t[c] = w[c] * xa[c];
        }
        for (int64_t j = 0; j < n_pair; ++j) {
          scalar_t coef = 0;
          for (int64_t u = pairs[3 * j + 2]; u < pairs[3 * j + 5]; ++u) coef += static_cast<scalar_t>(values[u]) * y_e[terms[u]];
          const scalar_t* t = wx.data() + pairs[3 * j] * C;
          scalar_t* ob = o + pairs[3 * j + 1] * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ob[c] += coef * t[c];
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* W, const scalar_t* Y, const scalar_t* x,
                     const int64_t* sender, const bool* active, scalar_t* grad_W, scalar_t* grad_Y,
                     scalar_t* grad_x_edge, int64_t n_recv, int64_t K, int64_t P, int64_t S, int64_t D_in,
                     int64_t D_out, int64_t C, const int64_t* pa, int64_t n_pa, const int64_t* pairs, int64_t n_pair,
                     const int64_t* terms, const double* values) {
  at::parallel_for(0, n_recv, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> wx(n_pa * C), gwx(n_pa * C);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = grad_out + r * D_out * C;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = r * K + k;
        scalar_t* gw_e = grad_W + e * P * C;
        scalar_t* gx_e = grad_x_edge + e * D_in * C;
        scalar_t* gy_e = grad_Y + e * S;
        // outputs are uninitialised buffers: zero this edge's rows here, while they are in cache
        for (int64_t u = 0; u < P * C; ++u) gw_e[u] = 0;
        for (int64_t u = 0; u < D_in * C; ++u) gx_e[u] = 0;
        for (int64_t u = 0; u < S; ++u) gy_e[u] = 0;
        if (!active[e]) continue;
        const scalar_t* w_e = W + e * P * C;
        const scalar_t* x_s = x + sender[e] * D_in * C;
        const scalar_t* y_e = Y + e * S;
        for (int64_t q = 0; q < n_pa; ++q) {
          const scalar_t* w = w_e + pa[2 * q] * C;
          const scalar_t* xa = x_s + pa[2 * q + 1] * C;
          scalar_t* t = wx.data() + q * C;
          scalar_t* gt = gwx.data() + q * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            t[c] = w[c] * xa[c];
            gt[c] = 0;
          }
        }
        for (int64_t j = 0; j < n_pair; ++j) {
          const scalar_t* t = wx.data() + pairs[3 * j] * C;
          scalar_t* gt = gwx.data() + pairs[3 * j] * C;
          const scalar_t* gb = g + pairs[3 * j + 1] * C;
          scalar_t coef = 0;
          for (int64_t u = pairs[3 * j + 2]; u < pairs[3 * j + 5]; ++u) coef += static_cast<scalar_t>(values[u]) * y_e[terms[u]];
          scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < C; ++c) {
            dot += t[c] * gb[c];
            gt[c] += coef * gb[c];
          }
          for (int64_t u = pairs[3 * j + 2]; u < pairs[3 * j + 5]; ++u) gy_e[terms[u]] += static_cast<scalar_t>(values[u]) * dot;
        }
        for (int64_t q = 0; q < n_pa; ++q) {
          const scalar_t* w = w_e + pa[2 * q] * C;
          const scalar_t* xa = x_s + pa[2 * q + 1] * C;
          const scalar_t* gt = gwx.data() + q * C;
          scalar_t* gw = gw_e + pa[2 * q] * C;
          scalar_t* gx = gx_e + pa[2 * q + 1] * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            gw[c] += gt[c] * xa[c];
            gx[c] += gt[c] * w[c];
          }
        }
      }
    }
  });
}

void check_tables(const torch::Tensor& pa, const torch::Tensor& pairs, const torch::Tensor& terms,
                  const torch::Tensor& values) {
  TORCH_CHECK(pa.dtype() == torch::kInt64 && pairs.dtype() == torch::kInt64 && terms.dtype() == torch::kInt64,
              "index tables must be int64");
  TORCH_CHECK(values.dtype() == torch::kFloat64, "coefficients must be float64");
  TORCH_CHECK(pa.is_contiguous() && pairs.is_contiguous() && terms.is_contiguous() && values.is_contiguous(),
              "tables must be contiguous");
}

}  // namespace

// W [E, P, C], Y [E, S], x [N, D_in, C], sender [E], active [E] (bool); E = n_recv * K. Returns [n_recv, D_out, C].
torch::Tensor convolution_forward(torch::Tensor W, torch::Tensor Y, torch::Tensor x, torch::Tensor sender,
                                  torch::Tensor active, int64_t n_recv, int64_t D_out, torch::Tensor pa,
                                  torch::Tensor pairs, torch::Tensor terms, torch::Tensor values) {
  check_tables(pa, pairs, terms, values);
  W = W.contiguous(); Y = Y.contiguous(); x = x.contiguous(); sender = sender.contiguous(); active = active.contiguous();
  const int64_t E = W.size(0), P = W.size(1), C = W.size(2), S = Y.size(1), D_in = x.size(1);
  TORCH_CHECK(n_recv > 0 && E % n_recv == 0, "edge rows must be a whole number of receivers");
  auto out = torch::zeros({n_recv, D_out, C}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "convolution_forward", [&] {
    forward_kernel<scalar_t>(W.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                             sender.data_ptr<int64_t>(), active.data_ptr<bool>(), out.data_ptr<scalar_t>(), n_recv,
                             E / n_recv, P, S, D_in, D_out, C, pa.data_ptr<int64_t>(), pa.size(0),
                             pairs.data_ptr<int64_t>(), pairs.size(0) - 1, terms.data_ptr<int64_t>(),
                             values.data_ptr<double>());
  });
  return out;
}

// Returns (grad_W [E, P, C], grad_Y [E, S], grad_x per edge [E, D_in, C]: to be index_add-ed onto the senders).
// grad_W, grad_Y and grad_x_edge are output buffers (any contents) of at least E rows, reused between chunks.
std::vector<torch::Tensor> convolution_backward(torch::Tensor grad_out, torch::Tensor W, torch::Tensor Y,
                                                torch::Tensor x, torch::Tensor sender, torch::Tensor active,
                                                torch::Tensor pa, torch::Tensor pairs, torch::Tensor terms,
                                                torch::Tensor values, torch::Tensor grad_W_buffer,
                                                torch::Tensor grad_Y_buffer, torch::Tensor grad_x_buffer) {
  check_tables(pa, pairs, terms, values);
  grad_out = grad_out.contiguous(); W = W.contiguous(); Y = Y.contiguous(); x = x.contiguous();
  sender = sender.contiguous(); active = active.contiguous();
  const int64_t n_recv = grad_out.size(0), D_out = grad_out.size(1);
  const int64_t E = W.size(0), P = W.size(1), C = W.size(2), S = Y.size(1), D_in = x.size(1);
  TORCH_CHECK(grad_W_buffer.is_contiguous() && grad_Y_buffer.is_contiguous() && grad_x_buffer.is_contiguous() &&
              grad_W_buffer.numel() >= E * P * C && grad_Y_buffer.numel() >= E * S &&
              grad_x_buffer.numel() >= E * D_in * C && grad_W_buffer.scalar_type() == W.scalar_type() &&
              grad_Y_buffer.scalar_type() == W.scalar_type() && grad_x_buffer.scalar_type() == W.scalar_type(),
              "gradient buffers too small or of the wrong dtype");
  auto grad_W = grad_W_buffer.view(-1).narrow(0, 0, E * P * C).view({E, P, C});
  auto grad_Y = grad_Y_buffer.view(-1).narrow(0, 0, E * S).view({E, S});
  auto grad_x_edge = grad_x_buffer.view(-1).narrow(0, 0, E * D_in * C).view({E, D_in, C});
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "convolution_backward", [&] {
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(),
                              x.data_ptr<scalar_t>(), sender.data_ptr<int64_t>(), active.data_ptr<bool>(),
                              grad_W.data_ptr<scalar_t>(), grad_Y.data_ptr<scalar_t>(),
                              grad_x_edge.data_ptr<scalar_t>(), n_recv, E / n_recv, P, S, D_in, D_out, C,
                              pa.data_ptr<int64_t>(), pa.size(0), pairs.data_ptr<int64_t>(), pairs.size(0) - 1,
                              terms.data_ptr<int64_t>(), values.data_ptr<double>());
  });
  return {grad_W, grad_Y, grad_x_edge};
}
