// Fused MACE interaction convolution for the CPU: for every receiver i,
//     out[i, b, c] = sum_k sum_{(pa, b)} G_{pa,b}(Y_ik) * W[ik, p, c] * x[sender(ik), a, c],
//     G_{pa,b}(Y) = sum_m value * Y[m]   (Clebsch-Gordan entries times e3nn's path weight, grouped by (pa, b)),
// and its exact backward pass, without forming any per-edge, per-path, per-channel tensor other than the radial
// weights W of the chunk being processed. Edges are in the padded receiver-major layout of mace.py: rows
// r*K .. r*K+K-1 belong to receiver r of the chunk. Inactive rows (padding, r >= r_max) contribute nothing.
//
// The radial weights of an edge come from a RadialSource: either a row of W (the exact radial MLP, computed by the
// caller per chunk) or, in the opt-in spline mode (radial_spline.py), the cubic polynomial of the edge's interval,
//     W(u) = c0 + u (c1 + u (c2 + u c3)),   table [rows, 4, P*C], u in [0, 1) the position inside the interval,
// evaluated on the fly into a per-thread buffer (no [E, P, C] array at all); its backward pass returns dL/du.
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
struct RadialSource {
  const scalar_t* W = nullptr;         // [E, P*C] exact weights, or
  const scalar_t* table = nullptr;     // [rows, 4, P*C] cubic coefficients of each interval
  const int64_t* interval = nullptr;   // [E] row of the table of each edge
  const scalar_t* u = nullptr;         // [E] position of the edge inside its interval
  int64_t PC = 0;

  // The edge's weights: a pointer into W, or the spline evaluated into `buffer` (PC values).
  const scalar_t* weights(int64_t e, scalar_t* buffer) const {
    if (table == nullptr) return W + e * PC;
    const scalar_t* c = table + interval[e] * 4 * PC;
    const scalar_t t = u[e];
#pragma omp simd
    for (int64_t i = 0; i < PC; ++i) buffer[i] = c[i] + t * (c[PC + i] + t * (c[2 * PC + i] + t * c[3 * PC + i]));
    return buffer;
  }

  // sum_i grad[i] * dW_i/du of the edge (spline mode only).
  scalar_t derivative_dot(int64_t e, const scalar_t* grad) const {
    const scalar_t* c = table + interval[e] * 4 * PC;
    const scalar_t t = u[e];
    scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < PC; ++i) dot += grad[i] * (c[PC + i] + t * (2 * c[2 * PC + i] + 3 * t * c[3 * PC + i]));
    return dot;
  }
};

template <typename scalar_t>
void forward_kernel(const RadialSource<scalar_t>& radial, const scalar_t* Y, const scalar_t* x, const int64_t* sender,
                    const bool* active, scalar_t* out, int64_t n_recv, int64_t K, int64_t P, int64_t S,
                    int64_t D_in, int64_t D_out, int64_t C, const int64_t* pa, int64_t n_pa, const int64_t* pairs,
                    int64_t n_pair, const int64_t* terms, const double* values) {
  at::parallel_for(0, n_recv, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> wx(n_pa * C), w_buffer(radial.table ? P * C : 0);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* o = out + r * D_out * C;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = r * K + k;
        if (!active[e]) continue;
        const scalar_t* w_e = radial.weights(e, w_buffer.data());
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
void backward_kernel(const scalar_t* grad_out, const RadialSource<scalar_t>& radial, const scalar_t* Y,
                     const scalar_t* x, const int64_t* sender, const bool* active, scalar_t* grad_W,
                     scalar_t* grad_u, scalar_t* grad_Y,
                     scalar_t* grad_x_edge, int64_t n_recv, int64_t K, int64_t P, int64_t S, int64_t D_in,
                     int64_t D_out, int64_t C, const int64_t* pa, int64_t n_pa, const int64_t* pairs, int64_t n_pair,
                     const int64_t* terms, const double* values) {
  at::parallel_for(0, n_recv, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> wx(n_pa * C), gwx(n_pa * C);
    // spline mode: the edge's weights and their gradient live in per-thread buffers; only dL/du leaves
    std::vector<scalar_t> w_buffer(radial.table ? P * C : 0), gw_buffer(radial.table ? P * C : 0);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = grad_out + r * D_out * C;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = r * K + k;
        scalar_t* gw_e = radial.table ? gw_buffer.data() : grad_W + e * P * C;
        scalar_t* gx_e = grad_x_edge + e * D_in * C;
        scalar_t* gy_e = grad_Y + e * S;
        // outputs are uninitialised buffers: zero this edge's rows here, while they are in cache
        for (int64_t u = 0; u < P * C; ++u) gw_e[u] = 0;
        for (int64_t u = 0; u < D_in * C; ++u) gx_e[u] = 0;
        for (int64_t u = 0; u < S; ++u) gy_e[u] = 0;
        if (grad_u != nullptr) grad_u[e] = 0;
        if (!active[e]) continue;
        const scalar_t* w_e = radial.weights(e, w_buffer.data());
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
        if (grad_u != nullptr) grad_u[e] = radial.derivative_dot(e, gw_e);
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

// Both radial sources share one implementation: `W` defined (exact) or `table`, `interval`, `u` (spline).
torch::Tensor forward_impl(const torch::Tensor& W, const torch::Tensor& table, const torch::Tensor& interval,
                           const torch::Tensor& u, torch::Tensor Y, torch::Tensor x, torch::Tensor sender,
                           torch::Tensor active, int64_t n_recv, int64_t D_out, int64_t P, int64_t C,
                           const torch::Tensor& pa, const torch::Tensor& pairs, const torch::Tensor& terms,
                           const torch::Tensor& values) {
  check_tables(pa, pairs, terms, values);
  Y = Y.contiguous(); x = x.contiguous(); sender = sender.contiguous(); active = active.contiguous();
  const int64_t E = Y.size(0), S = Y.size(1), D_in = x.size(1);
  TORCH_CHECK(n_recv > 0 && E % n_recv == 0, "edge rows must be a whole number of receivers");
  auto out = torch::zeros({n_recv, D_out, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "convolution_forward", [&] {
    RadialSource<scalar_t> radial;
    radial.PC = P * C;
    if (W.defined()) {
      radial.W = W.data_ptr<scalar_t>();
    } else {
      radial.table = table.data_ptr<scalar_t>();
      radial.interval = interval.data_ptr<int64_t>();
      radial.u = u.data_ptr<scalar_t>();
    }
    forward_kernel<scalar_t>(radial, Y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), sender.data_ptr<int64_t>(),
                             active.data_ptr<bool>(), out.data_ptr<scalar_t>(), n_recv, E / n_recv, P, S, D_in,
                             D_out, C, pa.data_ptr<int64_t>(), pa.size(0), pairs.data_ptr<int64_t>(),
                             pairs.size(0) - 1, terms.data_ptr<int64_t>(), values.data_ptr<double>());
  });
  return out;
}

std::vector<torch::Tensor> backward_impl(torch::Tensor grad_out, const torch::Tensor& W, const torch::Tensor& table,
                                         const torch::Tensor& interval, const torch::Tensor& u, torch::Tensor Y,
                                         torch::Tensor x, torch::Tensor sender, torch::Tensor active, int64_t P,
                                         int64_t C, const torch::Tensor& pa, const torch::Tensor& pairs,
                                         const torch::Tensor& terms, const torch::Tensor& values,
                                         const torch::Tensor& grad_W_buffer, const torch::Tensor& grad_Y_buffer,
                                         const torch::Tensor& grad_x_buffer) {
  check_tables(pa, pairs, terms, values);
  grad_out = grad_out.contiguous(); Y = Y.contiguous(); x = x.contiguous();
  sender = sender.contiguous(); active = active.contiguous();
  const int64_t n_recv = grad_out.size(0), D_out = grad_out.size(1);
  const int64_t E = Y.size(0), S = Y.size(1), D_in = x.size(1);
  const bool spline = !W.defined();
  TORCH_CHECK(grad_Y_buffer.is_contiguous() && grad_x_buffer.is_contiguous() && grad_Y_buffer.numel() >= E * S &&
              grad_x_buffer.numel() >= E * D_in * C && grad_Y_buffer.scalar_type() == x.scalar_type() &&
              grad_x_buffer.scalar_type() == x.scalar_type() &&
              (spline || (grad_W_buffer.is_contiguous() && grad_W_buffer.numel() >= E * P * C &&
                          grad_W_buffer.scalar_type() == x.scalar_type())),
              "gradient buffers too small or of the wrong dtype");
  auto grad_Y = grad_Y_buffer.view(-1).narrow(0, 0, E * S).view({E, S});
  auto grad_x_edge = grad_x_buffer.view(-1).narrow(0, 0, E * D_in * C).view({E, D_in, C});
  torch::Tensor grad_radial = spline ? torch::empty({E}, x.options())
                                     : grad_W_buffer.view(-1).narrow(0, 0, E * P * C).view({E, P, C});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "convolution_backward", [&] {
    RadialSource<scalar_t> radial;
    radial.PC = P * C;
    if (spline) {
      radial.table = table.data_ptr<scalar_t>();
      radial.interval = interval.data_ptr<int64_t>();
      radial.u = u.data_ptr<scalar_t>();
    } else {
      radial.W = W.data_ptr<scalar_t>();
    }
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), radial, Y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                              sender.data_ptr<int64_t>(), active.data_ptr<bool>(),
                              spline ? nullptr : grad_radial.data_ptr<scalar_t>(),
                              spline ? grad_radial.data_ptr<scalar_t>() : nullptr, grad_Y.data_ptr<scalar_t>(),
                              grad_x_edge.data_ptr<scalar_t>(), n_recv, E / n_recv, P, S, D_in, D_out, C,
                              pa.data_ptr<int64_t>(), pa.size(0), pairs.data_ptr<int64_t>(), pairs.size(0) - 1,
                              terms.data_ptr<int64_t>(), values.data_ptr<double>());
  });
  return {grad_radial, grad_Y, grad_x_edge};
}

void check_spline(const torch::Tensor& table, const torch::Tensor& interval, const torch::Tensor& u,
                  const torch::Tensor& x, int64_t P, int64_t C) {
  TORCH_CHECK(table.is_contiguous() && table.dim() == 3 && table.size(1) == 4 && table.size(2) == P * C &&
              table.scalar_type() == x.scalar_type(), "spline table must be a contiguous [rows, 4, P*C] tensor");
  TORCH_CHECK(interval.is_contiguous() && interval.scalar_type() == torch::kInt64 && u.is_contiguous() &&
              u.scalar_type() == x.scalar_type(), "spline coordinates: int64 intervals and u of the model dtype");
  if (interval.numel() > 0) {
    TORCH_CHECK(interval.min().item<int64_t>() >= 0 && interval.max().item<int64_t>() < table.size(0),
                "spline interval outside the table");
  }
}

}  // namespace

// W [E, P, C], Y [E, S], x [N, D_in, C], sender [E], active [E] (bool); E = n_recv * K. Returns [n_recv, D_out, C].
torch::Tensor convolution_forward(torch::Tensor W, torch::Tensor Y, torch::Tensor x, torch::Tensor sender,
                                  torch::Tensor active, int64_t n_recv, int64_t D_out, torch::Tensor pa,
                                  torch::Tensor pairs, torch::Tensor terms, torch::Tensor values) {
  W = W.contiguous();
  TORCH_CHECK(W.scalar_type() == x.scalar_type() && W.size(0) == Y.size(0), "W must be [E, P, C] of x's dtype");
  return forward_impl(W, torch::Tensor(), torch::Tensor(), torch::Tensor(), Y, x, sender, active, n_recv, D_out,
                      W.size(1), W.size(2), pa, pairs, terms, values);
}

// Returns (grad_W [E, P, C], grad_Y [E, S], grad_x per edge [E, D_in, C]: to be index_add-ed onto the senders).
// grad_W, grad_Y and grad_x_edge are output buffers (any contents) of at least E rows, reused between chunks.
std::vector<torch::Tensor> convolution_backward(torch::Tensor grad_out, torch::Tensor W, torch::Tensor Y,
                                                torch::Tensor x, torch::Tensor sender, torch::Tensor active,
                                                torch::Tensor pa, torch::Tensor pairs, torch::Tensor terms,
                                                torch::Tensor values, torch::Tensor grad_W_buffer,
                                                torch::Tensor grad_Y_buffer, torch::Tensor grad_x_buffer) {
  W = W.contiguous();
  return backward_impl(grad_out, W, torch::Tensor(), torch::Tensor(), torch::Tensor(), Y, x, sender, active,
                       W.size(1), W.size(2), pa, pairs, terms, values, grad_W_buffer, grad_Y_buffer, grad_x_buffer);
}

// Spline mode: table [rows, 4, P*C], interval [E] (int64 rows of the table), u [E]. Returns [n_recv, D_out, C].
torch::Tensor spline_convolution_forward(torch::Tensor table, torch::Tensor interval, torch::Tensor u,
                                         torch::Tensor Y, torch::Tensor x, torch::Tensor sender, torch::Tensor active,
                                         int64_t n_recv, int64_t D_out, int64_t P, torch::Tensor pa,
                                         torch::Tensor pairs, torch::Tensor terms, torch::Tensor values) {
  const int64_t C = x.size(2);
  interval = interval.contiguous(); u = u.contiguous();
  check_spline(table, interval, u, x, P, C);
  return forward_impl(torch::Tensor(), table, interval, u, Y, x, sender, active, n_recv, D_out, P, C, pa, pairs,
                      terms, values);
}

// Spline mode: returns (grad_u [E], grad_Y [E, S], grad_x per edge [E, D_in, C]).
std::vector<torch::Tensor> spline_convolution_backward(torch::Tensor grad_out, torch::Tensor table,
                                                       torch::Tensor interval, torch::Tensor u, torch::Tensor Y,
                                                       torch::Tensor x, torch::Tensor sender, torch::Tensor active,
                                                       int64_t P, torch::Tensor pa, torch::Tensor pairs,
                                                       torch::Tensor terms, torch::Tensor values,
                                                       torch::Tensor grad_Y_buffer, torch::Tensor grad_x_buffer) {
  const int64_t C = x.size(2);
  interval = interval.contiguous(); u = u.contiguous();
  check_spline(table, interval, u, x, P, C);
  return backward_impl(grad_out, torch::Tensor(), table, interval, u, Y, x, sender, active, P, C, pa, pairs, terms,
                       values, torch::Tensor(), grad_Y_buffer, grad_x_buffer);
}
