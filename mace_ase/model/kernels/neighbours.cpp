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
  auto edge_offsets = torch::zeros({S + 1}, torch::kInt64);
  int64_t* bounds = edge_offsets.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) bounds[s + 1] = bounds[s] + int64_t(found[s].sender.size());
  const int64_t E = bounds[S];
  auto edge_index = torch::empty({2, E}, torch::kInt64);
  auto unit_shifts = torch::empty({E, 3}, torch::kInt64);
  int64_t* senders = edge_index.data_ptr<int64_t>();
  int64_t* receivers = senders + E;
  int64_t* shifts = unit_shifts.data_ptr<int64_t>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      std::copy(found[s].sender.begin(), found[s].sender.end(), senders + bounds[s]);
      std::copy(found[s].receiver.begin(), found[s].receiver.end(), receivers + bounds[s]);
      std::copy(found[s].shift.begin(), found[s].shift.end(), shifts + 3 * bounds[s]);
    }
  });
  return {edge_index, unit_shifts, edge_offsets};
}
