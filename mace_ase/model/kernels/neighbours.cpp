// Neighbour lists of small structures by direct search: every (sender, receiver, lattice translation) within a
// given range of translations is tested. For a few dozen atoms this beats a linked-cell search (matscipy) several
// times over, because there is nothing to bin and the pairs come out already in the canonical order of
// mace_ase/neighbours.py: sorted by (sender, receiver, translation), the translations in lexicographic order.
//
// Which pairs are kept is decided by exactly the arithmetic of neighbours.py's _squared_lengths and _shift_vectors
// (numpy, element by element), so the two searches give the same pairs, bit for bit, at the cutoff too:
//     T = (t0 * a0 + t1 * a1) + t2 * a2,   v = (x_r - x_s) + T,   |v|^2 = (v0 * v0 + v1 * v1) + v2 * v2 < cutoff^2,
// each operation rounded on its own: multiply-add contraction is switched off in this file (the package's compiler
// flags allow it elsewhere). Zero-length self pairs (s = r, t = 0) are dropped.
//
// A translation is skipped, without changing the result, when no pair can reach the cutoff through it: with e_k the
// extent of the structure's atoms along Cartesian axis k, every pair vector has |v_k| >= |T_k| - e_k, so if
// sum_k max(0, |T_k| - e_k)^2 >= (cutoff + margin)^2 there is none.
//
// Structures are independent: parallel over structures (at::parallel_for); each one's pairs are collected on their
// own and copied out in structure order, so the result does not depend on the number of threads.
//
// Larger structures: a linked-cell search with the same pair test (cell_neighbour_search, below), whose output is
// likewise already in the canonical order and bit-identical to matscipy's search followed by neighbours.py's exact
// filter and sort (tested), without the Python passes over all pairs.

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Pairs {
  std::vector<int64_t> sender, receiver, shift;  // shift: 3 per pair
};

void search_structure(const double* x, int64_t n, const double* a, const int64_t* reach, double cutoff,
                      int64_t first, Pairs& out) {
  const double cut2 = cutoff * cutoff;
  const double reachable = cutoff + 1e-6;  // Å: far above the rounding of the extents
  double low[3] = {0, 0, 0}, high[3] = {0, 0, 0};
  for (int k = 0; k < 3; ++k) {
    low[k] = high[k] = n > 0 ? x[k] : 0.0;
    for (int64_t i = 1; i < n; ++i) {
      low[k] = std::min(low[k], x[3 * i + k]);
      high[k] = std::max(high[k], x[3 * i + k]);
    }
  }
  // the translations that can hold a pair, in lexicographic order, as vectors and as integers
  std::vector<double> tx, ty, tz;
  std::vector<int64_t> integer;
  for (int64_t t0 = -reach[0]; t0 <= reach[0]; ++t0)
    for (int64_t t1 = -reach[1]; t1 <= reach[1]; ++t1)
      for (int64_t t2 = -reach[2]; t2 <= reach[2]; ++t2) {
        const double f0 = double(t0), f1 = double(t1), f2 = double(t2);
        double T[3];
        for (int k = 0; k < 3; ++k) T[k] = (f0 * a[k] + f1 * a[3 + k]) + f2 * a[6 + k];
        double gap2 = 0.0;
        for (int k = 0; k < 3; ++k) {
          const double gap = std::abs(T[k]) - (high[k] - low[k]);
          if (gap > 0) gap2 += gap * gap;
        }
        if (gap2 >= reachable * reachable) continue;
        tx.push_back(T[0]);
        ty.push_back(T[1]);
        tz.push_back(T[2]);
        integer.insert(integer.end(), {t0, t1, t2});
      }
  const int64_t n_shifts = int64_t(tx.size());
  int64_t zero = -1;  // the index of t = 0, if kept
  for (int64_t j = 0; j < n_shifts; ++j)
    if (integer[3 * j] == 0 && integer[3 * j + 1] == 0 && integer[3 * j + 2] == 0) zero = j;
  std::vector<double> length2(n_shifts);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t r = 0; r < n; ++r) {
      const double d0 = x[3 * r] - x[3 * s], d1 = x[3 * r + 1] - x[3 * s + 1], d2 = x[3 * r + 2] - x[3 * s + 2];
      for (int64_t j = 0; j < n_shifts; ++j) {  // all translations first (a vector loop), then the few kept
        const double v0 = d0 + tx[j], v1 = d1 + ty[j], v2 = d2 + tz[j];
        length2[j] = (v0 * v0 + v1 * v1) + v2 * v2;
      }
      for (int64_t j = 0; j < n_shifts; ++j) {
        if (!(length2[j] < cut2) || (s == r && j == zero)) continue;
        out.sender.push_back(first + s);
        out.receiver.push_back(first + r);
        out.shift.insert(out.shift.end(), integer.begin() + 3 * j, integer.begin() + 3 * j + 3);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Linked cells
// ---------------------------------------------------------------------------------------------------------------
// Atoms are binned by their fractional coordinates in the search box h (neighbours.py's _search_frame: the cell when
// fully periodic), wrapped into [0, 1) along periodic axes: f = x h^-1 = w + n, n integer. A pair within the cutoff
// differs by at most rc |h^-1 e_k| in f_k, hence by at most `reach_k` bins; every (bin offset d) of a sender's bin
// b gives one (bin, image) combination, bin (b + d) mod m and image t' = floor((b + d) / m), so no candidate is
// visited twice. A receiver r seen through image t' is the lattice translation t = t' - n_r + n_s of the original
// positions, which is what the exact test (the arithmetic above: T from the cell `a`, v = (x_r - x_s) + T) and the
// output use. Per sender the kept pairs are sorted by (receiver, translation): the canonical order.

struct CellGrid {
  int64_t m[3] = {1, 1, 1};        // bins per axis
  int64_t reach[3] = {0, 0, 0};    // bin offsets to visit per axis
  bool periodic[3] = {false, false, false};
  std::vector<int64_t> start;      // [bins + 1]: atoms of each bin in `atoms`
  std::vector<int64_t> atoms;      // atom numbers, bin by bin
  std::vector<int64_t> bin;        // [n, 3]: each atom's bin
  std::vector<int64_t> image;      // [n, 3]: each atom's n = floor(f) (0 along non-periodic axes)
};

CellGrid make_grid(const double* frame, int64_t n, const double* inverse, const bool* pbc, double rc) {
  CellGrid g;
  double norm[3];
  for (int k = 0; k < 3; ++k) {  // |h^-1 e_k|: column k of the inverse (f_k = x . column k)
    norm[k] = std::sqrt(inverse[k] * inverse[k] + inverse[3 + k] * inverse[3 + k] + inverse[6 + k] * inverse[6 + k]);
    g.periodic[k] = pbc[k];
    g.m[k] = std::max<int64_t>(1, int64_t(std::floor(std::min(1.0 / (rc * norm[k]), 1048576.0))));
  }
  // no more bins than ~4 per atom (a cell mostly of vacuum): larger bins only mean more candidates per bin
  while (g.m[0] * g.m[1] * g.m[2] > 4 * n + 64) {
    const int k = int(std::max_element(g.m, g.m + 3) - g.m);
    g.m[k] = (g.m[k] + 1) / 2;
  }
  // a pair within rc differs by at most rc |h^-1 e_k| m_k in (unrounded) bin coordinates, so its bins by at most the
  // floor of that plus one (the search margin in rc covers the rounding of f)
  for (int k = 0; k < 3; ++k) g.reach[k] = int64_t(std::floor(rc * norm[k] * double(g.m[k]))) + 1;
  g.bin.resize(3 * n);
  g.image.resize(3 * n);
  const int64_t bins = g.m[0] * g.m[1] * g.m[2];
  std::vector<int64_t> count(bins + 1, 0), flat(n);
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < 3; ++k) {
      const double* y = frame + 3 * i;
      const double f = y[0] * inverse[k] + y[1] * inverse[3 + k] + y[2] * inverse[6 + k];
      const double whole = g.periodic[k] ? std::floor(f) : 0.0;
      const double w = f - whole;
      g.image[3 * i + k] = int64_t(whole);
      g.bin[3 * i + k] = std::min(g.m[k] - 1, std::max<int64_t>(0, int64_t(std::floor(w * double(g.m[k])))));
    }
    flat[i] = (g.bin[3 * i] * g.m[1] + g.bin[3 * i + 1]) * g.m[2] + g.bin[3 * i + 2];
    ++count[flat[i] + 1];
  }
  for (int64_t b = 0; b < bins; ++b) count[b + 1] += count[b];
  g.start = count;
  g.atoms.resize(n);
  for (int64_t i = 0; i < n; ++i) g.atoms[count[flat[i]]++] = i;  // ascending atom numbers within a bin
  return g;
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Bin u along axis k (u may lie outside [0, m) by the visited offsets): its bin in the grid `c` and, along a
// periodic axis, the image `i` it belongs to; false where a non-periodic axis has no such bin.
inline bool wrap_bin(const CellGrid& g, int k, int64_t u, int64_t& c, int64_t& i) {
  if (!g.periodic[k]) {
    c = u;
    i = 0;
    return u >= 0 && u < g.m[k];
  }
  i = floor_div(u, g.m[k]);
  c = u - i * g.m[k];
  return true;
}

// The pairs of senders [begin, end), in canonical order, appended to out.
void cell_search_senders(const double* x, const double* a, const CellGrid& g, double cutoff, int64_t begin,
                         int64_t end, Pairs& out) {
  const double cut2 = cutoff * cutoff;
  struct Candidate { int64_t r, t0, t1, t2; };
  std::vector<Candidate> kept;
  for (int64_t s = begin; s < end; ++s) {
    kept.clear();
    const int64_t* bs = &g.bin[3 * s];
    int64_t c0, c1, c2, i0, i1, i2;
    for (int64_t d0 = -g.reach[0]; d0 <= g.reach[0]; ++d0) {
      if (!wrap_bin(g, 0, bs[0] + d0, c0, i0)) continue;
      for (int64_t d1 = -g.reach[1]; d1 <= g.reach[1]; ++d1) {
        if (!wrap_bin(g, 1, bs[1] + d1, c1, i1)) continue;
        for (int64_t d2 = -g.reach[2]; d2 <= g.reach[2]; ++d2) {
          if (!wrap_bin(g, 2, bs[2] + d2, c2, i2)) continue;
          const int64_t cell_bin = (c0 * g.m[1] + c1) * g.m[2] + c2;
          for (int64_t q = g.start[cell_bin]; q < g.start[cell_bin + 1]; ++q) {
            const int64_t r = g.atoms[q];
            const int64_t t0 = i0 - g.image[3 * r] + g.image[3 * s];
            const int64_t t1 = i1 - g.image[3 * r + 1] + g.image[3 * s + 1];
            const int64_t t2 = i2 - g.image[3 * r + 2] + g.image[3 * s + 2];
            if (r == s && t0 == 0 && t1 == 0 && t2 == 0) continue;
            const double f0 = double(t0), f1 = double(t1), f2 = double(t2);
            double v[3];
            for (int k = 0; k < 3; ++k) {
              const double T = (f0 * a[k] + f1 * a[3 + k]) + f2 * a[6 + k];
              v[k] = (x[3 * r + k] - x[3 * s + k]) + T;
            }
            if ((v[0] * v[0] + v[1] * v[1]) + v[2] * v[2] < cut2) kept.push_back({r, t0, t1, t2});
          }
        }
      }
    }
    std::sort(kept.begin(), kept.end(), [](const Candidate& p, const Candidate& q) {
      if (p.r != q.r) return p.r < q.r;
      if (p.t0 != q.t0) return p.t0 < q.t0;
      if (p.t1 != q.t1) return p.t1 < q.t1;
      return p.t2 < q.t2;
    });
    for (const Candidate& c : kept) {
      out.sender.push_back(s);
      out.receiver.push_back(c.r);
      out.shift.insert(out.shift.end(), {c.t0, c.t1, c.t2});
    }
  }
}

// The pairs of each part (structure or block of senders), one part after another: edge_index [2, E], unit_shifts
// [E, 3] and the parts' edge offsets [parts + 1]; copied in parallel.
std::vector<torch::Tensor> concatenate(const std::vector<Pairs>& found) {
  const int64_t parts = int64_t(found.size());
  auto edge_offsets = torch::zeros({parts + 1}, torch::kInt64);
  int64_t* bounds = edge_offsets.data_ptr<int64_t>();
  for (int64_t p = 0; p < parts; ++p) bounds[p + 1] = bounds[p] + int64_t(found[p].sender.size());
  const int64_t E = bounds[parts];
  auto edge_index = torch::empty({2, E}, torch::kInt64);
  auto unit_shifts = torch::empty({E, 3}, torch::kInt64);
  int64_t* senders = edge_index.data_ptr<int64_t>();
  int64_t* receivers = senders + E;
  int64_t* shifts = unit_shifts.data_ptr<int64_t>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      std::copy(found[p].sender.begin(), found[p].sender.end(), senders + bounds[p]);
      std::copy(found[p].receiver.begin(), found[p].receiver.end(), receivers + bounds[p]);
      std::copy(found[p].shift.begin(), found[p].shift.end(), shifts + 3 * bounds[p]);
    }
  });
  return {edge_index, unit_shifts, edge_offsets};
}

}  // namespace

// positions [N, 3] float64 (all structures, one after another), cells [S, 3, 3] float64 (lattice vectors as rows),
// node_offsets [S + 1] int64, reach [S, 3] int64 (translations t_k in [-reach_k, reach_k]; 0 along non-periodic
// directions; reach_0 < 0: skip the structure, which then has no pairs here). Returns edge_index [2, E] (node
// numbers of the packed graph), unit_shifts [E, 3] and edge_offsets [S + 1].
std::vector<torch::Tensor> direct_neighbour_search(torch::Tensor positions, torch::Tensor cells,
                                                   torch::Tensor node_offsets, torch::Tensor reach, double cutoff) {
  TORCH_CHECK(positions.dtype() == torch::kFloat64 && cells.dtype() == torch::kFloat64,
              "direct_neighbour_search: positions and cells must be float64");
  TORCH_CHECK(node_offsets.dtype() == torch::kInt64 && reach.dtype() == torch::kInt64,
              "direct_neighbour_search: node_offsets and reach must be int64");
  positions = positions.contiguous();
  cells = cells.contiguous();
  node_offsets = node_offsets.contiguous();
  reach = reach.contiguous();
  const int64_t S = cells.size(0);
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3 && cells.dim() == 3 && cells.size(1) == 3 &&
                  cells.size(2) == 3 && node_offsets.numel() == S + 1 && reach.dim() == 2 && reach.size(0) == S &&
                  reach.size(1) == 3,
              "direct_neighbour_search: bad shapes");
  const double* x = positions.data_ptr<double>();
  const double* a = cells.data_ptr<double>();
  const int64_t* offsets = node_offsets.data_ptr<int64_t>();
  const int64_t* range = reach.data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[S] == positions.size(0), "direct_neighbour_search: bad node offsets");
  std::vector<Pairs> found(S);
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s)
      if (range[3 * s] >= 0)
        search_structure(x + 3 * offsets[s], offsets[s + 1] - offsets[s], a + 9 * s, range + 3 * s, cutoff,
                         offsets[s], found[s]);
  });
  return concatenate(found);
}

// One structure by linked cells. positions [n, 3] (the exact test's coordinates), cell [3, 3] (its translations,
// lattice vectors as rows), frame [n, 3] and inverse [3, 3]: the search-box coordinates of the atoms and the
// inverse of the box (neighbours.py's _search_frame; binning only), pbc [3] bool, cutoff and the search margin.
// Returns edge_index [2, E] and unit_shifts [E, 3] in the canonical order. Parallel over blocks of senders.
std::vector<torch::Tensor> cell_neighbour_search(torch::Tensor positions, torch::Tensor cell, torch::Tensor frame,
                                                 torch::Tensor inverse, torch::Tensor pbc, double cutoff,
                                                 double margin) {
  TORCH_CHECK(positions.dtype() == torch::kFloat64 && cell.dtype() == torch::kFloat64 &&
                  frame.dtype() == torch::kFloat64 && inverse.dtype() == torch::kFloat64 &&
                  pbc.dtype() == torch::kBool,
              "cell_neighbour_search: float64 coordinates and a bool pbc");
  positions = positions.contiguous(); cell = cell.contiguous(); frame = frame.contiguous();
  inverse = inverse.contiguous(); pbc = pbc.contiguous();
  const int64_t n = positions.size(0);
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3 && frame.sizes() == positions.sizes() &&
                  cell.numel() == 9 && inverse.numel() == 9 && pbc.numel() == 3 && cutoff > 0 && margin >= 0,
              "cell_neighbour_search: bad shapes or cutoff");
  const double* x = positions.data_ptr<double>();
  const CellGrid grid = make_grid(frame.data_ptr<double>(), n, inverse.data_ptr<double>(), pbc.data_ptr<bool>(),
                                  cutoff + margin);
  constexpr int64_t kSenders = 256;
  const int64_t blocks = (n + kSenders - 1) / kSenders;
  std::vector<Pairs> found(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      cell_search_senders(x, cell.data_ptr<double>(), grid, cutoff, b * kSenders, std::min(n, (b + 1) * kSenders),
                          found[b]);
  });
  std::vector<torch::Tensor> packed = concatenate(found);
  return {packed[0], packed[1]};
}
