// Symmetric contraction of MACE (correlation <= 3) for the CPU, forward and exact backward, per node:
//     P[q, c] = A[a_q, c] (singles) | A[a, c] A[b, c] (pairs) | pair[t_q, c] A[s_q, c] (triples)
//     B[i, m, c] = sum_q V[z_i][q, m, c] P[q, c]
// with V[z] = coefficients @ W_z folded in torch per element (see SymmetricContraction in mace.py). Features stay in
// the [N, D, C] layout (channel innermost, vectorised); the monomials of one node live in a thread-local buffer, so
// nothing of size [N, Q, C] is ever stored. Parallel over nodes with at::parallel_for.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

struct Monomials {
  const int64_t* singles; int64_t n1;
  const int64_t* pair_a; const int64_t* pair_b; int64_t n2;
  const int64_t* triple_pair; const int64_t* triple_single; int64_t n3;
};

// The degree-2 monomials A_a A_b of one node for a channel block of width W, in pairs [n2, W].
template <typename scalar_t>
inline void make_pairs(const Monomials& t, const scalar_t* a, scalar_t* pairs, int64_t C, int64_t W) {
  for (int64_t q = 0; q < t.n2; ++q) {
    const scalar_t* x = a + t.pair_a[q] * C;
    const scalar_t* y = a + t.pair_b[q] * C;
    scalar_t* o = pairs + q * W;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) o[c] = x[c] * y[c];
  }
}

// The monomials of one node for the channel block [c0, c0 + W) (W = CB, or `width` when CB == 0), in p [Q, W].
template <typename scalar_t, int CB>
inline void make_monomials(const Monomials& t, const scalar_t* a, scalar_t* p, int64_t C, int64_t width) {
  const int64_t W = CB > 0 ? CB : width;
  for (int64_t q = 0; q < t.n1; ++q) {
    const scalar_t* x = a + t.singles[q] * C;
    scalar_t* o = p + q * W;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) o[c] = x[c];
  }
  scalar_t* pairs = p + t.n1 * W;
  make_pairs(t, a, pairs, C, W);
  scalar_t* triples = pairs + t.n2 * W;
  for (int64_t q = 0; q < t.n3; ++q) {
    const scalar_t* x = pairs + t.triple_pair[q] * W;
    const scalar_t* y = a + t.triple_single[q] * C;
    scalar_t* o = triples + q * W;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) o[c] = x[c] * y[c];
  }
}

Monomials tables(const torch::Tensor& singles, const torch::Tensor& pairs, const torch::Tensor& triple_pair,
                 const torch::Tensor& triple_single) {
  TORCH_CHECK(singles.dtype() == torch::kInt64 && pairs.dtype() == torch::kInt64 &&
              triple_pair.dtype() == torch::kInt64 && triple_single.dtype() == torch::kInt64, "tables must be int64");
  TORCH_CHECK(singles.is_contiguous() && pairs.is_contiguous() && triple_pair.is_contiguous() &&
              triple_single.is_contiguous(), "tables must be contiguous");
  const int64_t n2 = pairs.size(1);
  return {singles.data_ptr<int64_t>(), singles.numel(), pairs.data_ptr<int64_t>(), pairs.data_ptr<int64_t>() + n2, n2,
          triple_pair.data_ptr<int64_t>(), triple_single.data_ptr<int64_t>(), triple_pair.numel()};
}

// Forward loop order: channel block (kBlockBytes of channels) > node > output row m > monomial q. The folded weights
// V[z] of one channel block (Q x M x block: 310 kB for MP-0 medium's 1o output, float32 or float64) then stay in L2
// for all the nodes of that element, instead of the whole V[z] (620 kB in float32) coming again from L3 for every
// node, and each output row's accumulator stays in registers. Each output is the same sum over q in the same order
// whatever the blocking (bitwise the unblocked kernel's). Measured on a Zen 3 VM (MPA-0 medium, 512 nodes): best
// times equal, median 18.2 -> 12.8 ms under the L3 contention of a shared host.
constexpr int64_t kBlockBytes = 256;  // 64 float32 or 32 float64 channels

template <typename scalar_t, int CB>
void forward_block(const Monomials& t, const scalar_t* a_ptr, const scalar_t* v_ptr, const int64_t* g_ptr,
                   scalar_t* b_ptr, int64_t begin, int64_t end, int64_t c0, int64_t width, int64_t D, int64_t C,
                   int64_t Q, int64_t M, scalar_t* p, scalar_t* acc) {
  const int64_t W = CB > 0 ? CB : width;
  for (int64_t i = begin; i < end; ++i) {
    make_monomials<scalar_t, CB>(t, a_ptr + i * D * C + c0, p, C, W);
    const scalar_t* v = v_ptr + g_ptr[i] * Q * M * C + c0;
    scalar_t* b = b_ptr + i * M * C + c0;
    for (int64_t m = 0; m < M; ++m) {  // one output row at a time: its accumulator stays in registers
      scalar_t sum[CB > 0 ? CB : 1];
      scalar_t* bm = CB > 0 ? sum : acc;
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) bm[c] = 0;
      for (int64_t q = 0; q < Q; ++q) {
        const scalar_t* pq = p + q * W;
        const scalar_t* vq = v + (q * M + m) * C;
#pragma omp simd
        for (int64_t c = 0; c < W; ++c) bm[c] += vq[c] * pq[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) b[m * C + c] = bm[c];
    }
  }
}

template <typename scalar_t>
void forward_kernel(const Monomials& t, const torch::Tensor& A, const torch::Tensor& V,
                    const torch::Tensor& group, torch::Tensor& B, int64_t N, int64_t D, int64_t C, int64_t Q,
                    int64_t M) {
  const scalar_t* a_ptr = A.data_ptr<scalar_t>();
  const scalar_t* v_ptr = V.data_ptr<scalar_t>();
  const int64_t* g_ptr = group.data_ptr<int64_t>();
  scalar_t* b_ptr = B.data_ptr<scalar_t>();
  constexpr int64_t CB = kBlockBytes / sizeof(scalar_t);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p(Q * CB), acc(CB);  // acc: the remainder block's output row
    for (int64_t c0 = 0; c0 < C; c0 += CB) {
      if (c0 + CB <= C) {
        forward_block<scalar_t, CB>(t, a_ptr, v_ptr, g_ptr, b_ptr, begin, end, c0, CB, D, C, Q, M, p.data(),
                                    acc.data());
      } else {
        forward_block<scalar_t, 0>(t, a_ptr, v_ptr, g_ptr, b_ptr, begin, end, c0, C - c0, D, C, Q, M, p.data(),
                                   acc.data());
      }
    }
  });
}

// Backward: dL/dP[q] = sum_m V[q, m] dL/dB[m], then the chain rule through the monomials, for up to kNodes nodes of
// one element at a time: each row V[q] (M x C) is read once for all of them and then stays in L1, where one node at
// a time read the whole V[z] (620 kB in float32 for MP-0 medium's 1o output: beyond a Zen 3 core's L2) per node.
// Monomials are walked backwards (triples, pairs, singles), so that only the pairs' gradients need a buffer (each
// triple's dL/dP is used once, at once) and the pairs' are complete before they are used. The sums run in the same
// order as the one-node loop (dL/dP over m; every gradient row in triple, pair, single order): the same bits.
// (Channel blocks as in the forward pass were measured 1.3-1.7x slower here: the chain rule's many short monomial
// rows then cost more loop overhead than V's traffic saves.)
// g[c] = sum_m vq[m, c] gb[m, c] (summed over m in order, each pass vectorised over the channels)
template <typename scalar_t>
inline void monomial_grad(const scalar_t* vq, const scalar_t* gb, scalar_t* g, int64_t M, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) g[c] = 0;
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* v = vq + m * C;
    const scalar_t* b = gb + m * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) g[c] += v[c] * b[c];
  }
}

constexpr int64_t kNodes = 4;

template <typename scalar_t>
void backward_kernel(const Monomials& t, const torch::Tensor& grad_B, const torch::Tensor& A,
                     const torch::Tensor& V, const torch::Tensor& group, torch::Tensor& grad_A, int64_t N,
                     int64_t D, int64_t C, int64_t Q, int64_t M) {
  const scalar_t* a_ptr = A.data_ptr<scalar_t>();
  const scalar_t* v_ptr = V.data_ptr<scalar_t>();
  const scalar_t* gb_ptr = grad_B.data_ptr<scalar_t>();
  const int64_t* g_ptr = group.data_ptr<int64_t>();
  scalar_t* ga_ptr = grad_A.data_ptr<scalar_t>();
  const int64_t n1 = t.n1, n2 = t.n2, n3 = t.n3;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    // per node of the group: its pair monomials and their gradients
    std::vector<scalar_t> pair_values(kNodes * n2 * C), pair_grads(kNodes * n2 * C), g(C);
    for (int64_t i = begin; i < end;) {
      int64_t k = 1;
      while (k < kNodes && i + k < end && g_ptr[i + k] == g_ptr[i]) ++k;
      const scalar_t* v = v_ptr + g_ptr[i] * Q * M * C;
      for (int64_t j = 0; j < k; ++j) {
        make_pairs(t, a_ptr + (i + j) * D * C, pair_values.data() + j * n2 * C, C, C);
        scalar_t* ga = ga_ptr + (i + j) * D * C;
        for (int64_t c = 0; c < D * C; ++c) ga[c] = 0;
      }
      // the pairs' dL/dP from V
      for (int64_t q = 0; q < n2; ++q) {
        const scalar_t* vq = v + (n1 + q) * M * C;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* gb = gb_ptr + (i + j) * M * C;
          monomial_grad(vq, gb, pair_grads.data() + (j * n2 + q) * C, M, C);
        }
      }
      // triples (pair x single): their dL/dP, at once into the single's and the pair's gradients
      for (int64_t q = 0; q < n3; ++q) {
        const scalar_t* vq = v + (n1 + n2 + q) * M * C;
        const int64_t pair = t.triple_pair[q], single = t.triple_single[q];
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* gb = gb_ptr + (i + j) * M * C;
          const scalar_t* pv = pair_values.data() + (j * n2 + pair) * C;
          scalar_t* gpair = pair_grads.data() + (j * n2 + pair) * C;
          const scalar_t* s = a_ptr + (i + j) * D * C + single * C;
          scalar_t* gs = ga_ptr + (i + j) * D * C + single * C;
          monomial_grad(vq, gb, g.data(), M, C);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            gs[c] += g[c] * pv[c];
            gpair[c] += g[c] * s[c];
          }
        }
      }
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* a = a_ptr + (i + j) * D * C;
        scalar_t* ga = ga_ptr + (i + j) * D * C;
        for (int64_t q = 0; q < n2; ++q) {  // pairs: x * y
          const scalar_t* gq = pair_grads.data() + (j * n2 + q) * C;
          const scalar_t* x = a + t.pair_a[q] * C;
          const scalar_t* y = a + t.pair_b[q] * C;
          scalar_t* gx = ga + t.pair_a[q] * C;
          scalar_t* gy = ga + t.pair_b[q] * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gx[c] += gq[c] * y[c];
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gy[c] += gq[c] * x[c];
        }
      }
      for (int64_t q = 0; q < n1; ++q) {  // singles
        const scalar_t* vq = v + q * M * C;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* gb = gb_ptr + (i + j) * M * C;
          scalar_t* gx = ga_ptr + (i + j) * D * C + t.singles[q] * C;
          monomial_grad(vq, gb, g.data(), M, C);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gx[c] += g[c];
        }
      }
      i += k;
    }
  });
}

}  // namespace

// A [N, D, C]; V [G, Q, M, C] (one folded block per element group); group [N] int64. Returns B [N, M, C].
torch::Tensor symmetric_contraction_forward(torch::Tensor A, torch::Tensor V, torch::Tensor group,
                                            torch::Tensor singles, torch::Tensor pairs, torch::Tensor triple_pair,
                                            torch::Tensor triple_single) {
  A = A.contiguous(); V = V.contiguous(); group = group.contiguous();
  const Monomials t = tables(singles, pairs, triple_pair, triple_single);
  const int64_t N = A.size(0), D = A.size(1), C = A.size(2), Q = V.size(1), M = V.size(2);
  TORCH_CHECK(Q == t.n1 + t.n2 + t.n3 && V.size(3) == C, "folded weights do not match the monomial tables");
  auto B = torch::empty({N, M, C}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "symmetric_contraction_forward",
                             [&] { forward_kernel<scalar_t>(t, A, V, group, B, N, D, C, Q, M); });
  return B;
}

// grad_B [N, M, C] -> grad_A [N, D, C] (the weights are constants).
torch::Tensor symmetric_contraction_backward(torch::Tensor grad_B, torch::Tensor A, torch::Tensor V,
                                             torch::Tensor group, torch::Tensor singles, torch::Tensor pairs,
                                             torch::Tensor triple_pair, torch::Tensor triple_single) {
  grad_B = grad_B.contiguous(); A = A.contiguous(); V = V.contiguous(); group = group.contiguous();
  const Monomials t = tables(singles, pairs, triple_pair, triple_single);
  const int64_t N = A.size(0), D = A.size(1), C = A.size(2), Q = V.size(1), M = V.size(2);
  auto grad_A = torch::empty_like(A);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "symmetric_contraction_backward",
                             [&] { backward_kernel<scalar_t>(t, grad_B, A, V, group, grad_A, N, D, C, Q, M); });
  return grad_A;
}
