// Python bindings of the CPU kernels of mace_ase.model.fused (one extension module, compiled at first use).

#include <torch/extension.h>

#include <vector>

torch::Tensor convolution_forward(torch::Tensor W, torch::Tensor Y, torch::Tensor x, torch::Tensor sender,
                                  torch::Tensor active, int64_t n_recv, int64_t D_out, torch::Tensor pa,
                                  torch::Tensor pairs, torch::Tensor terms, torch::Tensor values);
std::vector<torch::Tensor> convolution_backward(torch::Tensor grad_out, torch::Tensor W, torch::Tensor Y,
                                                torch::Tensor x, torch::Tensor sender, torch::Tensor active,
                                                torch::Tensor pa, torch::Tensor pairs, torch::Tensor terms,
                                                torch::Tensor values, torch::Tensor grad_W_buffer,
                                                torch::Tensor grad_Y_buffer, torch::Tensor grad_x_buffer);
torch::Tensor spline_convolution_forward(torch::Tensor table, torch::Tensor interval, torch::Tensor u,
                                         torch::Tensor Y, torch::Tensor x, torch::Tensor sender, torch::Tensor active,
                                         int64_t n_recv, int64_t D_out, int64_t P, torch::Tensor pa,
                                         torch::Tensor pairs, torch::Tensor terms, torch::Tensor values);
std::vector<torch::Tensor> spline_convolution_backward(torch::Tensor grad_out, torch::Tensor table,
                                                       torch::Tensor interval, torch::Tensor u, torch::Tensor Y,
                                                       torch::Tensor x, torch::Tensor sender, torch::Tensor active,
                                                       int64_t P, torch::Tensor pa, torch::Tensor pairs,
                                                       torch::Tensor terms, torch::Tensor values,
                                                       torch::Tensor grad_Y_buffer, torch::Tensor grad_x_buffer);
torch::Tensor symmetric_contraction_forward(torch::Tensor A, torch::Tensor V, torch::Tensor group,
                                            torch::Tensor singles, torch::Tensor pairs, torch::Tensor triple_pair,
                                            torch::Tensor triple_single);
torch::Tensor symmetric_contraction_backward(torch::Tensor grad_B, torch::Tensor A, torch::Tensor V,
                                             torch::Tensor group, torch::Tensor singles, torch::Tensor pairs,
                                             torch::Tensor triple_pair, torch::Tensor triple_single);
torch::Tensor spherical_harmonics_forward(torch::Tensor v, torch::Tensor r, int64_t max_ell);
std::vector<torch::Tensor> spherical_harmonics_backward(torch::Tensor grad, torch::Tensor v, torch::Tensor r,
                                                        int64_t max_ell);
void index_add_rows(torch::Tensor out, torch::Tensor index, torch::Tensor src);
std::vector<torch::Tensor> direct_neighbour_search(torch::Tensor positions, torch::Tensor cells,
                                                   torch::Tensor node_offsets, torch::Tensor reach, double cutoff);
std::vector<torch::Tensor> cell_neighbour_search(torch::Tensor positions, torch::Tensor cell, torch::Tensor frame,
                                                 torch::Tensor inverse, torch::Tensor pbc, double cutoff,
                                                 double margin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("convolution_forward", &convolution_forward, "fused MACE convolution, forward (CPU)");
  m.def("convolution_backward", &convolution_backward, "fused MACE convolution, backward (CPU)");
  m.def("spline_convolution_forward", &spline_convolution_forward, "convolution, splined radial weights (CPU)");
  m.def("spline_convolution_backward", &spline_convolution_backward, "its backward pass: dL/du, dL/dY, dL/dx");
  m.def("symmetric_contraction_forward", &symmetric_contraction_forward, "symmetric contraction, forward (CPU)");
  m.def("symmetric_contraction_backward", &symmetric_contraction_backward, "symmetric contraction, backward (CPU)");
  m.def("spherical_harmonics_forward", &spherical_harmonics_forward, "Y_lm of edge directions, l <= 3 (CPU)");
  m.def("spherical_harmonics_backward", &spherical_harmonics_backward, "their backward pass: dL/dv, dL/dr");
  m.def("index_add_rows", &index_add_rows, "out[index[i]] += src[i], in place, parallel over output rows");
  m.def("direct_neighbour_search", &direct_neighbour_search, "neighbour lists of small structures (CPU)");
  m.def("cell_neighbour_search", &cell_neighbour_search, "neighbour list of one structure by linked cells (CPU)");
}
