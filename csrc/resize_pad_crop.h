// Shared by the CPU (.cpp) and CUDA (.cu) implementations of medst_fast::resize_pad_crop_normalize so that
// both compute the same weights in the same order. The definition (geometry, filters, normalisation) is
// documented in medst_fast/ops_image.py, whose PyTorch reference the op is tested against.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define MEDST_HD __host__ __device__ __forceinline__
#else
#define MEDST_HD inline
#endif

namespace medst_fast {

enum Filter : int { kArea = 0, kBilinear = 1 };

// One image's parameters, packed as 10 int64 per image (the CUDA kernel reads them from one device table).
struct ImageGeom {
  int64_t ptr;        // address of the first pixel (uint8, rows of `w` bytes)
  int64_t h, w;       // input size
  int64_t nh, nw;     // resized size (longer side = R)
  int64_t top, left;  // placement of the resized image in the zero R x R canvas
  int64_t y0, x0;     // crop origin in canvas coordinates
  int64_t pad_;       // keeps the record 80 bytes
};
static_assert(sizeof(ImageGeom) == 10 * sizeof(int64_t), "ImageGeom must be 10 int64");

// The taps [k0, k1) of output index `o` along one axis (n input -> m output pixels) and their weights.
struct AxisWindow {
  int filter;
  int64_t o, n, m;
  int k0, k1;
  float center, invscale, norm;
};

MEDST_HD float tri(float x) {
  x = x < 0.f ? -x : x;
  return x < 1.f ? 1.f - x : 0.f;
}

// Exact area: output o covers [o*n, (o+1)*n) and input k covers [k*m, (k+1)*m), both in units of 1/m
// pixel, so the overlaps are integers and the weights overlap/n are exact ratios (cv2 INTER_AREA).
// Bilinear: PIL/torch antialiased triangle filter, same arithmetic as torch's `antialias=True` path.
MEDST_HD float axis_weight(const AxisWindow& a, int k) {
  if (a.filter == kArea) {
    int64_t lo = (int64_t)k * a.m > a.o * a.n ? (int64_t)k * a.m : a.o * a.n;
    int64_t hi = (int64_t)(k + 1) * a.m < (a.o + 1) * a.n ? (int64_t)(k + 1) * a.m : (a.o + 1) * a.n;
    return hi > lo ? (float)(hi - lo) * a.norm : 0.f;
  }
  return tri(((float)k - a.center + 0.5f) * a.invscale) * a.norm;
}

MEDST_HD AxisWindow axis_window(int filter, int64_t o, int64_t n, int64_t m) {
  AxisWindow a;
  a.filter = filter; a.o = o; a.n = n; a.m = m;
  a.center = 0.f; a.invscale = 1.f;
  if (filter == kArea) {
    a.k0 = (int)((o * n) / m);
    a.k1 = (int)(((o + 1) * n + m - 1) / m);
    a.norm = 1.f / (float)n;
    return a;
  }
  const float scale = (float)n / (float)m;
  const float support = scale >= 1.f ? scale : 1.f;
  a.center = scale * ((float)o + 0.5f);
  a.invscale = scale >= 1.f ? 1.f / scale : 1.f;
  int k0 = (int)(a.center - support + 0.5f);
  int k1 = (int)(a.center + support + 0.5f);
  a.k0 = k0 < 0 ? 0 : k0;
  a.k1 = k1 > (int)n ? (int)n : k1;
  a.norm = 1.f;
  float total = 0.f;
  for (int k = a.k0; k < a.k1; ++k) total += axis_weight(a, k);
  a.norm = total > 0.f ? 1.f / total : 0.f;
  return a;
}

MEDST_HD float normalise(float v) { return (v / 255.0f - 0.5f) / 0.5f; }

}  // namespace medst_fast
