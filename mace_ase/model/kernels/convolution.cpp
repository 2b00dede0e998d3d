// Fused MACE interaction convolution for the CPU: for every receiver i,
//     out[i, b, c] = sum_k sum_{(pa, b)} G_{pa,b}(Y_ik) * W[ik, p, c] * x[sender(ik), a, c],
//     G_{pa,b}(Y) = sum_m value * Y[m]   (Clebsch-Gordan entries times e3nn's path weight, grouped by (pa, b)),
// and its exact backward pass, without forming any per-edge, per-path, per-channel tensor other than the radial
// weights W of the chunk being processed. Edges are in the padded receiver-major layout of mace.py: rows
// r*K .. r*K+K-1 belong to receiver r of the chunk. Inactive rows (padding, r >= r_max) contribute nothing.
//
// The radial weights of an edge come from a RadialSource: either a row of W (the exact radial MLP, computed by the
// caller per chunk) or, in the opt-in spline mode (radial_spline.py), the polynomial of the edge's interval,
//     W(u) = sum_k c_k u^k (Horner), table [rows, 4 or 6, P*C] (cubic or quintic), u in [0, 1) inside the interval,
// evaluated on the fly (in registers in the forward pass, into small per-thread block buffers in the backward pass:
// no [E, P, C] array at all); its backward pass returns dL/du. The exact mode's distinct-edge rows (fused.py,
// distinct_radial_rows) use the same path with two coefficients [W, dW/dr] at u = 0: then dL/du is dL/dr.
//
// Tables (built in fused.py from the ConvolutionPath modules):
//   pa     [n_pa, 2]   int64: (radial weight row p, sender feature component a) of each weight-times-feature vector
//   pairs  [n_pair, 3] int64: (pa index, output component b, start of its entries), plus one end row
//   terms  [n_term]    int64: spherical-harmonic component m of each entry; values [n_term] float64: its coefficient
// They are reordered per call (struct Coupling: by output row, by pa vector, by weight row, and as a dense [S, pairs]
// matrix). Compiled at first use by torch.utils.cpp_extension (see fused.py); parallel over receivers with
// at::parallel_for (each receiver's sums are independent of the thread count: results do not depend on it).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Channel blocks held in SIMD registers
// ---------------------------------------------------------------------------------------------------------------
// A Block is R SIMD vectors of consecutive channels (GCC/Clang vector extensions: zmm registers with AVX-512, ymm
// otherwise; the compiler splits them on narrower targets). The kernels walk the C channels in blocks of 8, 4, 2 and
// 1 vectors and finish an odd remainder one channel at a time (R = 1 "vector" of one lane), so that every loop below
// has a compile-time trip count and its accumulators stay in registers.
// Blocks of up to 8 vectors with AVX-512's 32 registers, 4 with AVX2's 16: the backward pass keeps about four blocks
// live (weights, features, their product, the accumulator), and 8-vector blocks spilled to the stack on AVX2
// (measured on a Zen 3 CPU: backward kernel 8-10 % faster with 4; the forward pass, whose accumulator is the only
// live block, stays at 8: kForwardVectors).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kMaxVectors = 8;
#else
constexpr int kVectorBytes = 32;
constexpr int kMaxVectors = 4;
#endif

template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(kVectorBytes)));
  static constexpr int kLanes = kVectorBytes / sizeof(T);
};

// Sum of the lanes of `Bytes` bytes of T at p, by halving (extracts and vector adds, no long scalar chain).
template <typename T, int Bytes>
T lane_sum(const void* p) {
  if constexpr (Bytes == sizeof(T)) {
    T t;
    std::memcpy(&t, p, sizeof(T));
    return t;
  } else if constexpr (Bytes == 2 * sizeof(T)) {
    T t[2];
    std::memcpy(t, p, Bytes);
    return t[0] + t[1];
  } else {
    typedef T H __attribute__((vector_size(Bytes / 2)));
    H lo, hi;
    std::memcpy(&lo, p, Bytes / 2);
    std::memcpy(&hi, static_cast<const char*>(p) + Bytes / 2, Bytes / 2);
    const H s = lo + hi;
    return lane_sum<T, Bytes / 2>(&s);
  }
}

template <typename T, typename V, int R>
struct Block {
  static constexpr int kLanes = sizeof(V) / sizeof(T);
  static constexpr int kVectors = R;
  static constexpr int kWidth = R * kLanes;  // channels
  V v[R];

  static Block load(const T* p) {
    Block b;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) std::memcpy(&b.v[r], p + r * kLanes, sizeof(V));
    return b;
  }
  static Block zero() {
    Block b;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) b.v[r] = V{};
    return b;
  }
  void store(T* p) const {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) std::memcpy(p + r * kLanes, &v[r], sizeof(V));
  }
  void add_scaled(T a, const Block& x) {  // this += a * x
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) v[r] += a * x.v[r];
  }
  void add_product(const Block& x, const Block& y) {  // this += x * y
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) v[r] += x.v[r] * y.v[r];
  }
  Block operator*(const Block& o) const {
    Block b;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) b.v[r] = v[r] * o.v[r];
    return b;
  }
  // sum over the vectors of this * o (a tree), added to (or, with `first`, stored into) the vector at out
  void dot_into(const Block& o, T* out, bool first) const {
    V s[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) s[r] = v[r] * o.v[r];
#pragma GCC unroll 8
    for (int h = R / 2; h > 0; h /= 2) {
#pragma GCC unroll 8
      for (int r = 0; r < h; ++r) s[r] += s[r + h];
    }
    if (!first) {
      V previous;
      std::memcpy(&previous, out, sizeof(V));
      s[0] += previous;
    }
    std::memcpy(out, &s[0], sizeof(V));
  }
  // sum of all channels (a tree over the vectors, then over the lanes)
  T sum() const {
    V s[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) s[r] = v[r];
#pragma GCC unroll 8
    for (int h = R / 2; h > 0; h /= 2) {
#pragma GCC unroll 8
      for (int r = 0; r < h; ++r) s[r] += s[r + h];
    }
    return lane_sum<T, sizeof(V)>(&s[0]);
  }
};

// The channel blocks of C channels: (first channel, vectors per block; 0 = one channel)
std::vector<std::pair<int64_t, int>> channel_blocks(int64_t C, int lanes, int max_vectors = kMaxVectors) {
  std::vector<std::pair<int64_t, int>> blocks;
  int64_t c = 0;
  for (int r = max_vectors; r >= 1; r /= 2) {
    while (C - c >= r * lanes) {
      blocks.emplace_back(c, r);
      c += r * lanes;
    }
  }
  for (; c < C; ++c) blocks.emplace_back(c, 0);
  return blocks;
}

// Calls f.template operator()<Block type>() for the block kind r (see channel_blocks).
template <typename T, typename F>
void dispatch_block(int r, F&& f) {
  using V = typename Simd<T>::V;
  switch (r) {
    case 8: f(Block<T, V, 8>()); break;
    case 4: f(Block<T, V, 4>()); break;
    case 2: f(Block<T, V, 2>()); break;
    case 1: f(Block<T, V, 1>()); break;
    default: f(Block<T, T, 1>()); break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Radial weights
// ---------------------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct RadialSource {
  const scalar_t* W = nullptr;         // [E, P*C] exact weights, or
  const scalar_t* table = nullptr;     // [rows, n_coef, P*C] polynomial coefficients (in u) of each interval
  const int64_t* interval = nullptr;   // [E] row of the table of each edge
  const scalar_t* u = nullptr;         // [E] position of the edge inside its interval
  int64_t PC = 0;
  int64_t C = 0;
  int64_t n_coef = 4;                  // 4: cubic, 6: quintic Hermite (radial_spline.DEGREE + 1), 2: [W, dW/dr]

  // The channel block [c0, c0 + width) of the edge's weight row p, in registers (Horner's rule).
  template <typename B>
  B row(int64_t e, int64_t p, int64_t c0) const {
    if (table == nullptr) return B::load(W + e * PC + p * C + c0);
    const scalar_t* c = table + interval[e] * n_coef * PC + p * C + c0;
    const scalar_t t = u[e];
    B value = B::load(c + (n_coef - 1) * PC);
    for (int64_t k = n_coef - 2; k >= 0; --k) {
      const B coefficient = B::load(c + k * PC);
#pragma GCC unroll 8
      for (int r = 0; r < B::kVectors; ++r) value.v[r] = coefficient.v[r] + t * value.v[r];
    }
    return value;
  }

  // The channel block [c0, c0 + width) of the edge's P weight rows: a pointer into W (row stride C), or the spline
  // evaluated into `w` (row stride width) and, when `dw` is given, its derivative dW/du into `dw`.
  template <typename B>
  const scalar_t* block(int64_t e, int64_t P, int64_t c0, scalar_t* w, scalar_t* dw, int64_t& stride) const {
    if (table == nullptr) {
      stride = C;
      return W + e * PC + c0;
    }
    stride = B::kWidth;
    const scalar_t* c = table + interval[e] * n_coef * PC + c0;
    const scalar_t t = u[e];
    for (int64_t p = 0; p < P; ++p) {
      const int64_t top = n_coef - 1;
      B value = B::load(c + top * PC + p * C), slope;
#pragma GCC unroll 8
      for (int r = 0; r < B::kVectors; ++r) slope.v[r] = static_cast<scalar_t>(top) * value.v[r];
      for (int64_t k = top - 1; k >= 0; --k) {  // value and slope by one Horner pass each
        const B coefficient = B::load(c + k * PC + p * C);
#pragma GCC unroll 8
        for (int r = 0; r < B::kVectors; ++r) {
          value.v[r] = coefficient.v[r] + t * value.v[r];
          if (k > 0) slope.v[r] = static_cast<scalar_t>(k) * coefficient.v[r] + t * slope.v[r];
        }
      }
      value.store(w + p * B::kWidth);
      if (dw != nullptr) slope.store(dw + p * B::kWidth);
    }
    return w;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Coupling tables, reordered for the kernels (built per call from fused.py's tables: a few hundred entries)
// ---------------------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct Coupling {
  int64_t n_pa = 0, n_pair = 0;
  std::vector<int64_t> p, a;                 // [n_pa]: radial weight row and sender component of each pa vector
  std::vector<int64_t> term_start, term_m;   // entries of pair j: term_start[j] .. term_start[j+1]
  std::vector<scalar_t> term_value;          // their coefficients, in the model's precision
  int64_t S = 0;
  int64_t stride = 0;                        // n_pair rounded up to 16: the row length of dense, G and dot
  std::vector<scalar_t> dense;               // [S, stride]: the same coefficients as a dense matrix (mostly zeros)
  std::vector<int64_t> m_start, m_j;         // the entries again, grouped by spherical-harmonic component m
  std::vector<scalar_t> m_value;
  // forward: output rows b that receive something, with their (pa, pair) entries
  std::vector<int64_t> row_b, row_start, row_q, row_j;
  // backward: each pa vector q with its (pair, output row) entries
  std::vector<int64_t> q_start, q_j, q_b;
  // the radial weight rows p that are used, each with its pa vectors q
  std::vector<int64_t> used_p, p_start, p_q;

  Coupling(const int64_t* pa, int64_t n_pa_, const int64_t* pairs, int64_t n_pair_, const int64_t* terms,
           const double* values, int64_t D_out, int64_t S_)
      : n_pa(n_pa_), n_pair(n_pair_), S(S_), stride((n_pair_ + 15) / 16 * 16), dense(S_ * stride, scalar_t(0)) {
    for (int64_t q = 0; q < n_pa; ++q) {
      p.push_back(pa[2 * q]);
      a.push_back(pa[2 * q + 1]);
    }
    for (int64_t j = 0; j <= n_pair; ++j) term_start.push_back(pairs[3 * j + 2] - pairs[2]);
    for (int64_t u = pairs[2]; u < pairs[3 * n_pair + 2]; ++u) {
      term_m.push_back(terms[u]);
      term_value.push_back(static_cast<scalar_t>(values[u]));
    }
    for (int64_t j = 0; j < n_pair; ++j) {
      for (int64_t u = term_start[j]; u < term_start[j + 1]; ++u) {
        TORCH_CHECK(term_m[u] >= 0 && term_m[u] < S, "coupling table out of range");
        dense[term_m[u] * stride + j] += term_value[u];
      }
    }
    for (int64_t m = 0; m < S; ++m) {
      m_start.push_back(m_j.size());
      for (int64_t j = 0; j < n_pair; ++j) {
        for (int64_t u = term_start[j]; u < term_start[j + 1]; ++u) {
          if (term_m[u] == m) {
            m_j.push_back(j);
            m_value.push_back(term_value[u]);
          }
        }
      }
    }
    m_start.push_back(m_j.size());
    std::vector<std::vector<int64_t>> by_b(D_out), by_q(n_pa);
    for (int64_t j = 0; j < n_pair; ++j) {
      TORCH_CHECK(pairs[3 * j] >= 0 && pairs[3 * j] < n_pa && pairs[3 * j + 1] >= 0 && pairs[3 * j + 1] < D_out,
                  "coupling table out of range");
      by_b[pairs[3 * j + 1]].push_back(j);
      by_q[pairs[3 * j]].push_back(j);
    }
    for (int64_t b = 0; b < D_out; ++b) {
      if (by_b[b].empty()) continue;
      row_b.push_back(b);
      row_start.push_back(row_q.size());
      for (int64_t j : by_b[b]) {
        row_q.push_back(pairs[3 * j]);
        row_j.push_back(j);
      }
    }
    row_start.push_back(row_q.size());
    for (int64_t q = 0; q < n_pa; ++q) {
      q_start.push_back(q_j.size());
      for (int64_t j : by_q[q]) {
        q_j.push_back(j);
        q_b.push_back(pairs[3 * j + 1]);
      }
    }
    q_start.push_back(q_j.size());
    std::vector<std::vector<int64_t>> by_p;
    for (int64_t q = 0; q < n_pa; ++q) {
      TORCH_CHECK(p[q] >= 0, "coupling table out of range");
      if (static_cast<int64_t>(by_p.size()) <= p[q]) by_p.resize(p[q] + 1);
      by_p[p[q]].push_back(q);
    }
    for (int64_t row = 0; row < static_cast<int64_t>(by_p.size()); ++row) {
      if (by_p[row].empty()) continue;
      used_p.push_back(row);
      p_start.push_back(p_q.size());
      p_q.insert(p_q.end(), by_p[row].begin(), by_p[row].end());
    }
    p_start.push_back(p_q.size());
  }

  // G[j] = sum_m dense[m, j] Y[m]: the coupling coefficients of one edge (a small dense matrix-vector product,
  // vectorised over 16 pairs at a time with the accumulators in registers). G has `stride` entries.
  void coefficients(const scalar_t* y, scalar_t* G) const {
    using B = Block<scalar_t, typename Simd<scalar_t>::V, 16 / Simd<scalar_t>::kLanes>;
    for (int64_t j = 0; j < stride; j += 16) {
      B even = B::zero(), odd = B::zero();  // two accumulators: half the FMA latency chain
      int64_t m = 0;
      for (; m + 1 < S; m += 2) {
        even.add_scaled(y[m], B::load(dense.data() + m * stride + j));
        odd.add_scaled(y[m + 1], B::load(dense.data() + (m + 1) * stride + j));
      }
      if (m < S) even.add_scaled(y[m], B::load(dense.data() + m * stride + j));
      for (int r = 0; r < B::kVectors; ++r) even.v[r] += odd.v[r];
      even.store(G + j);
    }
  }

  // dL/dY[m] = sum of value * dot_j over the entries (j, m), with dot_j given as the lanes of the SIMD vector
  // dot + j * L (L lanes): per m, its entries accumulated as a vector in registers, then one lane sum.
  void coefficients_backward(const scalar_t* dot, scalar_t* gy) const {
    using V = typename Simd<scalar_t>::V;
    using B = Block<scalar_t, V, 1>;
    constexpr int64_t L = Simd<scalar_t>::kLanes;
    for (int64_t m = 0; m < S; ++m) {
      B acc = B::zero();
      for (int64_t i = m_start[m]; i < m_start[m + 1]; ++i) acc.add_scaled(m_value[i], B::load(dot + m_j[i] * L));
      gy[m] = lane_sum<scalar_t, sizeof(V)>(&acc.v[0]);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------
// Loop order: receiver r (parallel) > group of kGroup of its active edges > channel block > output row b > the
// pairs (pa, b) > the edges of the group.
// Per edge, the coupling coefficients G_j(Y_e) are computed once (one scalar per pair), and per channel block the
// weight-times-feature vectors wx_q = W[p_q] * x[a_q] of the group's edges go to a small buffer (kGroup x n_pa x
// block width: L1), each weight row W[p] read (or, spline mode, evaluated) once into registers for all its q.
// Each output row block of the receiver (D_out x C: L1) is then loaded once into registers,
// receives sum_j sum_e G_j(e) wx_{q_j}(e) over its pairs and the group's edges (one load and one FMA per vector),
// and is stored once per group: instead of two loads and a store per FMA when the pairs are walked in table order
// edge by edge. The last group of a receiver is padded with zero coefficients and zero wx.
constexpr int kGroup = 2;
constexpr int kForwardVectors = 8;  // channel blocks of at most 8 vectors (2 x 22 wx rows of 512 bytes: L1)

template <typename scalar_t, typename B>
void forward_group_block(const Coupling<scalar_t>& tab, const RadialSource<scalar_t>& radial, const int64_t* edges,
                         int n_edges, int64_t P, int64_t C, int64_t D_in, int64_t c0, const scalar_t* x,
                         const int64_t* sender, const scalar_t* G, scalar_t* o, scalar_t* wx) {
  constexpr int64_t W = B::kWidth;
  const int64_t n_pa = tab.n_pa;
  for (int i = 0; i < kGroup; ++i) {
    scalar_t* wx_i = wx + i * n_pa * W;
    if (i >= n_edges) {
      for (int64_t q = 0; q < n_pa; ++q) B::zero().store(wx_i + q * W);
      continue;
    }
    const int64_t e = edges[i];
    const scalar_t* x_s = x + sender[e] * D_in * C + c0;
    // each weight row once (evaluated in registers in the spline mode), times the sender features it meets
    for (int64_t i_p = 0; i_p + 1 < static_cast<int64_t>(tab.p_start.size()); ++i_p) {
      const B w = radial.template row<B>(e, tab.used_p[i_p], c0);
      for (int64_t s = tab.p_start[i_p]; s < tab.p_start[i_p + 1]; ++s) {
        const int64_t q = tab.p_q[s];
        (w * B::load(x_s + tab.a[q] * C)).store(wx_i + q * W);
      }
    }
  }
  const int64_t n_rows = static_cast<int64_t>(tab.row_b.size());
  const int64_t G_stride = tab.stride;
  for (int64_t i = 0; i < n_rows; ++i) {
    scalar_t* ob = o + tab.row_b[i] * C + c0;
    B acc = B::load(ob);
    for (int64_t s = tab.row_start[i]; s < tab.row_start[i + 1]; ++s) {
      const scalar_t* t = wx + tab.row_q[s] * W;
      const scalar_t* g = G + tab.row_j[s];
#pragma GCC unroll 4
      for (int k = 0; k < kGroup; ++k) acc.add_scaled(g[k * G_stride], B::load(t + k * n_pa * W));
    }
    acc.store(ob);
  }
}

template <typename scalar_t>
void forward_kernel(const RadialSource<scalar_t>& radial, const scalar_t* Y, const scalar_t* x, const int64_t* sender,
                    const bool* active, scalar_t* out, int64_t n_recv, int64_t K, int64_t P, int64_t S,
                    int64_t D_in, int64_t D_out, int64_t C, const Coupling<scalar_t>& tab) {
  const auto blocks = channel_blocks(C, Simd<scalar_t>::kLanes, kForwardVectors);
  const int64_t max_width = kForwardVectors * Simd<scalar_t>::kLanes;
  at::parallel_for(0, n_recv, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> wx(kGroup * tab.n_pa * max_width), G(kGroup * tab.stride);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* o = out + r * D_out * C;
      std::fill(o, o + D_out * C, scalar_t(0));  // here, not a serial torch::zeros: parallel and cache-hot
      int64_t k = 0;
      while (k < K) {
        int64_t edges[kGroup];
        int n_edges = 0;
        for (; k < K && n_edges < kGroup; ++k) {
          if (active[r * K + k]) edges[n_edges++] = r * K + k;
        }
        if (n_edges == 0) break;
        for (int i = 0; i < kGroup; ++i) {
          if (i < n_edges) {
            tab.coefficients(Y + edges[i] * S, G.data() + i * tab.stride);
          } else {
            std::fill(G.begin() + i * tab.stride, G.begin() + (i + 1) * tab.stride, scalar_t(0));
          }
        }
        for (const auto& channel_block : blocks) {
          const int64_t c0 = channel_block.first;
          dispatch_block<scalar_t>(channel_block.second, [&](auto block) {
            forward_group_block<scalar_t, decltype(block)>(tab, radial, edges, n_edges, P, C, D_in, c0, x, sender,
                                                           G.data(), o, wx.data());
          });
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------
// With g = dL/dout of the receiver and wx_q = W[p_q] * x[a_q]:
//     dL/dwx_q = sum_{j in pairs of q} G_j g[b_j],   dot_j = <wx_{q_j}, g[b_j]>,   dL/dY[m] = sum_j value * dot_j,
//     dL/dW[p_q] += dL/dwx_q * x[a_q],   dL/dx[a_q] += dL/dwx_q * W[p_q],   dL/du = sum dL/dW * dW/du (spline).
// Loop order: receiver r (parallel) > edge k > channel block > pa vector q > its pairs. wx_q (computed in
// registers) and the accumulator dL/dwx_q stay in registers over the pairs of q; each pair loads one row block of g
// (the receiver's D_out x C gradient: L1, shared by its K edges) for two FMAs per vector; dL/dW and dL/dx are
// read-modified-written once per q. In the spline mode the weights and their u-derivative are evaluated per block
// into small buffers, dL/dW goes to a per-thread buffer and only dL/du leaves.

template <typename scalar_t, typename B>
void backward_edge_block(const Coupling<scalar_t>& tab, const RadialSource<scalar_t>& radial, int64_t e, int64_t P,
                         int64_t C, int64_t c0, const scalar_t* x_s, const scalar_t* g, const scalar_t* G,
                         scalar_t* dot, bool first, scalar_t* gw_e, scalar_t* gx_e, scalar_t* grad_u,
                         scalar_t* w_buffer, scalar_t* dw_buffer, scalar_t* gw_buffer) {
  constexpr int64_t W = B::kWidth;
  const bool spline = radial.table != nullptr;
  int64_t stride = 0;
  const scalar_t* w = radial.template block<B>(e, P, c0, w_buffer, dw_buffer, stride);
  // dL/dW rows of this block: the output (exact mode, already zeroed) or a zeroed buffer (spline mode)
  scalar_t* gw = spline ? gw_buffer : gw_e + c0;
  const int64_t gw_stride = spline ? W : C;
  if (spline) {
    for (int64_t p = 0; p < P; ++p) B::zero().store(gw + p * W);
  }
  for (int64_t q = 0; q < tab.n_pa; ++q) {
    const scalar_t* wp = w + tab.p[q] * stride;
    const scalar_t* xa = x_s + tab.a[q] * C + c0;
    const B w_q = B::load(wp), x_q = B::load(xa);
    const B t = w_q * x_q;
    B acc = B::zero();
    for (int64_t s = tab.q_start[q]; s < tab.q_start[q + 1]; ++s) {
      const int64_t j = tab.q_j[s];
      const B gb = B::load(g + tab.q_b[s] * C + c0);
      acc.add_scaled(G[j], gb);
      t.dot_into(gb, dot + j * Simd<scalar_t>::kLanes, first);
    }
    if (gx_e != nullptr) {  // dL/dx (not wanted where the sender features are constants: the first layer)
      scalar_t* gx = gx_e + tab.a[q] * C + c0;
      B gx_q = B::load(gx);
      gx_q.add_product(acc, w_q);
      gx_q.store(gx);
    }
    scalar_t* gwp = gw + tab.p[q] * gw_stride;
    B gw_q = B::load(gwp);
    gw_q.add_product(acc, x_q);
    gw_q.store(gwp);
  }
  if (spline) {
    B du = B::zero();
    for (int64_t p = 0; p < P; ++p) du.add_product(B::load(gw + p * W), B::load(dw_buffer + p * W));
    *grad_u += du.sum();
  }
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, const RadialSource<scalar_t>& radial, const scalar_t* Y,
                     const scalar_t* x, const int64_t* sender, const bool* active, scalar_t* grad_W,
                     scalar_t* grad_u, scalar_t* grad_Y,
                     scalar_t* grad_x_edge, int64_t n_recv, int64_t K, int64_t P, int64_t S, int64_t D_in,
                     int64_t D_out, int64_t C, const Coupling<scalar_t>& tab) {
  const auto blocks = channel_blocks(C, Simd<scalar_t>::kLanes);
  const int64_t max_width = kMaxVectors * Simd<scalar_t>::kLanes;
  const bool spline = radial.table != nullptr;
  at::parallel_for(0, n_recv, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t L = Simd<scalar_t>::kLanes;
    std::vector<scalar_t> G(tab.stride), dot(tab.n_pair * L);
    std::vector<scalar_t> w_buffer(spline ? P * max_width : 0), dw_buffer(spline ? P * max_width : 0),
        gw_buffer(spline ? P * max_width : 0);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = grad_out + r * D_out * C;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = r * K + k;
        scalar_t* gw_e = spline ? nullptr : grad_W + e * P * C;
        scalar_t* gx_e = grad_x_edge != nullptr ? grad_x_edge + e * D_in * C : nullptr;
        scalar_t* gy_e = grad_Y + e * S;
        // outputs are uninitialised buffers: zero this edge's rows here, while they are in cache
        if (gw_e != nullptr) std::fill(gw_e, gw_e + P * C, scalar_t(0));
        if (gx_e != nullptr) std::fill(gx_e, gx_e + D_in * C, scalar_t(0));
        std::fill(gy_e, gy_e + S, scalar_t(0));
        scalar_t du = 0;
        if (active[e]) {
          tab.coefficients(Y + e * S, G.data());
          // the first channel block stores the per-pair dot vectors, the others add to them
          const bool vector_first = !blocks.empty() && blocks.front().second != 0;
          if (!vector_first) std::fill(dot.begin(), dot.end(), scalar_t(0));
          const scalar_t* x_s = x + sender[e] * D_in * C;
          for (const auto& channel_block : blocks) {
            const int64_t c0 = channel_block.first;
            dispatch_block<scalar_t>(channel_block.second, [&](auto block) {
              backward_edge_block<scalar_t, decltype(block)>(tab, radial, e, P, C, c0, x_s, g, G.data(), dot.data(),
                                                             vector_first && c0 == 0, gw_e, gx_e, &du,
                                                             w_buffer.data(), dw_buffer.data(), gw_buffer.data());
            });
          }
          tab.coefficients_backward(dot.data(), gy_e);
        }
        if (grad_u != nullptr) grad_u[e] = du;
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
  auto out = torch::empty({n_recv, D_out, C}, x.options());  // each receiver's thread zeroes its own rows
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "convolution_forward", [&] {
    RadialSource<scalar_t> radial;
    radial.PC = P * C;
    radial.C = C;
    if (W.defined()) {
      radial.W = W.data_ptr<scalar_t>();
    } else {
      radial.table = table.data_ptr<scalar_t>();
      radial.n_coef = table.size(1);
      radial.interval = interval.data_ptr<int64_t>();
      radial.u = u.data_ptr<scalar_t>();
    }
    const Coupling<scalar_t> coupling(pa.data_ptr<int64_t>(), pa.size(0), pairs.data_ptr<int64_t>(), pairs.size(0) - 1,
                                      terms.data_ptr<int64_t>(), values.data_ptr<double>(), D_out, S);
    forward_kernel<scalar_t>(radial, Y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), sender.data_ptr<int64_t>(),
                             active.data_ptr<bool>(), out.data_ptr<scalar_t>(), n_recv, E / n_recv, P, S, D_in,
                             D_out, C, coupling);
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
  const bool need_x = grad_x_buffer.numel() > 0;  // an empty buffer: dL/dx is not wanted (returned empty)
  TORCH_CHECK(grad_Y_buffer.is_contiguous() && grad_x_buffer.is_contiguous() && grad_Y_buffer.numel() >= E * S &&
              (!need_x || grad_x_buffer.numel() >= E * D_in * C) && grad_Y_buffer.scalar_type() == x.scalar_type() &&
              grad_x_buffer.scalar_type() == x.scalar_type() &&
              (spline || (grad_W_buffer.is_contiguous() && grad_W_buffer.numel() >= E * P * C &&
                          grad_W_buffer.scalar_type() == x.scalar_type())),
              "gradient buffers too small or of the wrong dtype");
  auto grad_Y = grad_Y_buffer.view(-1).narrow(0, 0, E * S).view({E, S});
  auto grad_x_edge = need_x ? grad_x_buffer.view(-1).narrow(0, 0, E * D_in * C).view({E, D_in, C})
                            : grad_x_buffer.view(-1).narrow(0, 0, 0);
  torch::Tensor grad_radial = spline ? torch::empty({E}, x.options())
                                     : grad_W_buffer.view(-1).narrow(0, 0, E * P * C).view({E, P, C});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "convolution_backward", [&] {
    RadialSource<scalar_t> radial;
    radial.PC = P * C;
    radial.C = C;
    if (spline) {
      radial.table = table.data_ptr<scalar_t>();
      radial.n_coef = table.size(1);
      radial.interval = interval.data_ptr<int64_t>();
      radial.u = u.data_ptr<scalar_t>();
    } else {
      radial.W = W.data_ptr<scalar_t>();
    }
    const Coupling<scalar_t> coupling(pa.data_ptr<int64_t>(), pa.size(0), pairs.data_ptr<int64_t>(), pairs.size(0) - 1,
                                      terms.data_ptr<int64_t>(), values.data_ptr<double>(), D_out, S);
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), radial, Y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                              sender.data_ptr<int64_t>(), active.data_ptr<bool>(),
                              spline ? nullptr : grad_radial.data_ptr<scalar_t>(),
                              spline ? grad_radial.data_ptr<scalar_t>() : nullptr, grad_Y.data_ptr<scalar_t>(),
                              need_x ? grad_x_edge.data_ptr<scalar_t>() : nullptr, n_recv, E / n_recv, P, S, D_in,
                              D_out, C, coupling);
  });
  return {grad_radial, grad_Y, grad_x_edge};
}

void check_spline(const torch::Tensor& table, const torch::Tensor& interval, const torch::Tensor& u,
                  const torch::Tensor& x, int64_t P, int64_t C) {
  TORCH_CHECK(table.is_contiguous() && table.dim() == 3 && table.size(1) >= 2 && table.size(1) <= 6 &&
              table.size(2) == P * C && table.scalar_type() == x.scalar_type(),
              "spline table must be a contiguous [rows, 2 to 6, P*C] tensor");
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
// grad_W, grad_Y and grad_x_edge are output buffers (any contents) of at least E rows, reused between chunks; an
// empty grad_x buffer skips dL/dx (an empty grad_x is returned).
std::vector<torch::Tensor> convolution_backward(torch::Tensor grad_out, torch::Tensor W, torch::Tensor Y,
                                                torch::Tensor x, torch::Tensor sender, torch::Tensor active,
                                                torch::Tensor pa, torch::Tensor pairs, torch::Tensor terms,
                                                torch::Tensor values, torch::Tensor grad_W_buffer,
                                                torch::Tensor grad_Y_buffer, torch::Tensor grad_x_buffer) {
  W = W.contiguous();
  return backward_impl(grad_out, W, torch::Tensor(), torch::Tensor(), torch::Tensor(), Y, x, sender, active,
                       W.size(1), W.size(2), pa, pairs, terms, values, grad_W_buffer, grad_Y_buffer, grad_x_buffer);
}

// Spline mode: table [rows, 2 to 6, P*C], interval [E] (int64 rows of the table), u [E]. Returns [n_recv, D_out, C].
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

// index_add_rows(out, index, src): out[index[i]] += src[i] for all rows i, as torch's index_add_ (same order of
// additions per output row, so the same bits) but parallel: each task owns a range of output rows and scans the
// whole index for its rows (torch's CPU index_add_ is serial; for the per-edge sender gradients of the backward
// pass, 8,000 rows of kilobytes each, that was a serial ~0.5 ms per chunk).
void index_add_rows(torch::Tensor out, torch::Tensor index, torch::Tensor src) {
  TORCH_CHECK(out.device().is_cpu() && index.device().is_cpu() && src.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(out.is_contiguous() && src.is_contiguous() && index.is_contiguous() && index.dim() == 1 &&
              index.scalar_type() == torch::kInt64 && src.scalar_type() == out.scalar_type() &&
              src.size(0) == index.size(0) && src.numel() == index.size(0) * (out.numel() / std::max<int64_t>(
              out.size(0), 1)), "index_add_rows: out [N, ...], index [M] int64, src [M, ...] of out's row size");
  const int64_t N = out.size(0), M = index.size(0), F = M ? src.numel() / M : 0;
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < N, "index_add_rows: index out of range");
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "index_add_rows", [&] {
    scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t* ps = src.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = 0; i < M; ++i) {
        const int64_t row = idx[i];
        if (row < begin || row >= end) continue;
        scalar_t* o = po + row * F;
        const scalar_t* x = ps + i * F;
        for (int64_t f = 0; f < F; ++f) o[f] += x[f];  // (no pragma inside the dispatch macro; -O3 vectorises)
      }
    });
  });
}
