// medst_fast._C: registers the medst_fast::* ops with the PyTorch dispatcher (TORCH_LIBRARY) and holds their
// CPU kernels. The CUDA kernels live in *.cu files and are registered there with TORCH_LIBRARY_IMPL; the
// Python module itself is empty: importing it is what loads the library and runs the registrations.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "resize_pad_crop.h"

namespace medst_fast {

// Validates the arguments and builds the per-image table; shared with the CUDA launcher.
std::vector<ImageGeom> build_geometry(const std::vector<at::Tensor>& images, const at::Tensor& offsets,
                                      int64_t resize_to, int64_t out_size, int64_t filter) {
  TORCH_CHECK(filter == kArea || filter == kBilinear, "resize_pad_crop_normalize: filter must be 0 (area) or 1 "
              "(bilinear), got ", filter);
  TORCH_CHECK(out_size > 0 && resize_to >= out_size, "resize_pad_crop_normalize: need 0 < out_size <= resize_to, got "
              "out_size=", out_size, " resize_to=", resize_to);
  const int64_t B = (int64_t)images.size();
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 2 &&
                  offsets.size(0) == B && offsets.size(1) == 2,
              "resize_pad_crop_normalize: offsets must be a CPU int64 tensor of shape (", B, ", 2)");
  at::Tensor off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  std::vector<ImageGeom> geo(B);
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& im = images[b];
    TORCH_CHECK(im.scalar_type() == at::kByte, "resize_pad_crop_normalize: images[", b, "] has dtype ",
                im.scalar_type(), ", expected uint8");
    TORCH_CHECK(im.device() == images[0].device(), "resize_pad_crop_normalize: images[", b, "] is on ", im.device(),
                " but images[0] is on ", images[0].device());
    TORCH_CHECK(im.dim() == 2 || (im.dim() == 3 && im.size(0) == 1), "resize_pad_crop_normalize: images[", b,
                "] must be (H, W) or (1, H, W), got ", im.sizes());
    TORCH_CHECK(im.is_contiguous(), "resize_pad_crop_normalize: images[", b, "] must be contiguous");
    ImageGeom& g = geo[b];
    g.h = im.size(-2);
    g.w = im.size(-1);
    TORCH_CHECK(g.h > 0 && g.w > 0, "resize_pad_crop_normalize: images[", b, "] is empty");
    // The official resize_img: ties resize the height; the shorter side truncates the same float64 product.
    if (g.h >= g.w) {
      g.nh = resize_to;
      g.nw = std::max<int64_t>(1, (int64_t)((double)g.w * ((double)resize_to / (double)g.h)));
    } else {
      g.nw = resize_to;
      g.nh = std::max<int64_t>(1, (int64_t)((double)g.h * ((double)resize_to / (double)g.w)));
    }
    g.top = (resize_to - g.nh) / 2;
    g.left = (resize_to - g.nw) / 2;
    g.y0 = o[2 * b];
    g.x0 = o[2 * b + 1];
    TORCH_CHECK(g.y0 >= 0 && g.x0 >= 0 && g.y0 <= resize_to - out_size && g.x0 <= resize_to - out_size,
                "resize_pad_crop_normalize: offsets[", b, "] = (", g.y0, ", ", g.x0, ") outside [0, ",
                resize_to - out_size, "]");
    g.ptr = (int64_t)(uintptr_t)im.data_ptr<uint8_t>();
    g.pad_ = 0;
  }
  return geo;
}

// One output row: a vertical pass over the taps of that row into `tmp` (contiguous input rows, so the inner
// loop vectorises), then a horizontal pass per output column. The CUDA kernel follows the same order.
static void cpu_row(const ImageGeom& g, int64_t i, int64_t S, int filter, float* tmp, float* out) {
  const int64_t ry = g.y0 + i - g.top;
  if (ry < 0 || ry >= g.nh) {
    std::fill(out, out + S, normalise(0.f));
    return;
  }
  const uint8_t* img = reinterpret_cast<const uint8_t*>((uintptr_t)g.ptr);
  const AxisWindow wy = axis_window(filter, ry, g.h, g.nh);
  std::fill(tmp, tmp + g.w, 0.f);
  for (int k = wy.k0; k < wy.k1; ++k) {
    const float wk = axis_weight(wy, k);
    const uint8_t* row = img + (int64_t)k * g.w;
    for (int64_t l = 0; l < g.w; ++l) tmp[l] += wk * (float)row[l];
  }
  for (int64_t j = 0; j < S; ++j) {
    const int64_t rx = g.x0 + j - g.left;
    if (rx < 0 || rx >= g.nw) {
      out[j] = normalise(0.f);
      continue;
    }
    const AxisWindow wx = axis_window(filter, rx, g.w, g.nw);
    float acc = 0.f;
    for (int l = wx.k0; l < wx.k1; ++l) acc += axis_weight(wx, l) * tmp[l];
    out[j] = normalise(acc);
  }
}

at::Tensor resize_pad_crop_normalize_cpu(at::TensorList images_in, const at::Tensor& offsets, int64_t resize_to,
                                         int64_t out_size, int64_t filter) {
  std::vector<at::Tensor> images(images_in.begin(), images_in.end());
  const std::vector<ImageGeom> geo = build_geometry(images, offsets, resize_to, out_size, filter);
  const int64_t B = (int64_t)geo.size(), S = out_size;
  at::Tensor out = at::empty({B, 1, S, S}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0) return out;
  int64_t max_w = 0;
  for (const auto& g : geo) max_w = std::max(max_w, g.w);
  float* po = out.data_ptr<float>();
  // Grain of 16 rows: enough work per task to amortise scheduling, fine enough to balance mixed sizes.
  at::parallel_for(0, B * S, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(max_w);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S, i = r % S;
      cpu_row(geo[b], i, S, (int)filter, tmp.data(), po + r * S);
    }
  });
  return out;
}

static bool built_with_cuda() {
#ifdef MEDST_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace medst_fast

TORCH_LIBRARY(medst_fast, m) {
  // images: list of uint8 (H_i, W_i) or (1, H_i, W_i), contiguous, one device; offsets: CPU int64 (B, 2) crop
  // origins (y0, x0) in the padded R x R canvas; filter: 0 area, 1 bilinear (antialiased). -> float32 (B,1,S,S)
  m.def("resize_pad_crop_normalize(Tensor[] images, Tensor offsets, int resize_to, int out_size, int filter) -> Tensor");
  m.def("built_with_cuda() -> bool", &medst_fast::built_with_cuda);
}

TORCH_LIBRARY_IMPL(medst_fast, CPU, m) {
  m.impl("resize_pad_crop_normalize", &medst_fast::resize_pad_crop_normalize_cpu);
}

// An importable, empty module: `import medst_fast._C` loads this library (and so the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "medst_fast compiled ops (registered in torch.ops.medst_fast)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
