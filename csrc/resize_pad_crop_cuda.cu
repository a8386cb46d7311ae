// CUDA kernel of medst_fast::resize_pad_crop_normalize: the whole batch in one launch.
// Grid (S output rows, B images); one block per output row. Phase 1: the block computes that row's vertical
// taps for every input column into shared memory (coalesced reads of whole input rows). Phase 2: each thread
// reduces the horizontal taps of its output columns. Same arithmetic and order as the CPU kernel in ops.cpp.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "resize_pad_crop.h"

namespace medst_fast {

std::vector<ImageGeom> build_geometry(const std::vector<at::Tensor>& images, const at::Tensor& offsets,
                                      int64_t resize_to, int64_t out_size, int64_t filter);

__global__ void resize_pad_crop_normalize_kernel(const ImageGeom* __restrict__ geo, int S, int filter,
                                                 float* __restrict__ out) {
  extern __shared__ float tmp[];
  const int i = blockIdx.x;
  const int b = blockIdx.y;
  const ImageGeom g = geo[b];
  float* orow = out + ((int64_t)b * S + i) * S;
  const int64_t ry = g.y0 + i - g.top;
  if (ry < 0 || ry >= g.nh) {  // block-uniform: the whole row is padding
    for (int j = threadIdx.x; j < S; j += blockDim.x) orow[j] = normalise(0.f);
    return;
  }
  const uint8_t* img = reinterpret_cast<const uint8_t*>((uintptr_t)g.ptr);
  const AxisWindow wy = axis_window(filter, ry, g.h, g.nh);
  for (int64_t l = threadIdx.x; l < g.w; l += blockDim.x) {
    float acc = 0.f;
    for (int k = wy.k0; k < wy.k1; ++k) acc += axis_weight(wy, k) * (float)__ldg(img + (int64_t)k * g.w + l);
    tmp[l] = acc;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < S; j += blockDim.x) {
    const int64_t rx = g.x0 + j - g.left;
    float v = 0.f;
    if (rx >= 0 && rx < g.nw) {
      const AxisWindow wx = axis_window(filter, rx, g.w, g.nw);
      for (int l = wx.k0; l < wx.k1; ++l) v += axis_weight(wx, l) * tmp[l];
    }
    orow[j] = normalise(v);
  }
}

at::Tensor resize_pad_crop_normalize_cuda(at::TensorList images_in, const at::Tensor& offsets, int64_t resize_to,
                                          int64_t out_size, int64_t filter) {
  std::vector<at::Tensor> images(images_in.begin(), images_in.end());
  TORCH_CHECK(!images.empty(), "resize_pad_crop_normalize: empty image list");
  TORCH_CHECK(images[0].is_cuda(), "resize_pad_crop_normalize (CUDA): images must be CUDA tensors");
  c10::cuda::CUDAGuard guard(images[0].device());
  std::vector<ImageGeom> geo = build_geometry(images, offsets, resize_to, out_size, filter);
  const int64_t B = (int64_t)geo.size(), S = out_size;
  int64_t max_w = 0;
  for (const auto& g : geo) max_w = std::max(max_w, g.w);
  const size_t smem = (size_t)max_w * sizeof(float);
  int dev = images[0].get_device(), smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(smem <= (size_t)smem_optin, "resize_pad_crop_normalize: an image is ", max_w,
              " pixels wide; the CUDA kernel handles widths up to ", smem_optin / sizeof(float));
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(resize_pad_crop_normalize_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  // The table travels through pinned memory so the copy is asynchronous and ordered before the kernel.
  at::Tensor host = at::empty({B * 10}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), geo.data(), geo.size() * sizeof(ImageGeom));
  at::Tensor table = host.to(images[0].device(), /*non_blocking=*/true);
  at::Tensor out = at::empty({B, 1, S, S}, images[0].options().dtype(at::kFloat));
  dim3 grid((unsigned)S, (unsigned)B);
  resize_pad_crop_normalize_kernel<<<grid, 256, smem, stream>>>(
      reinterpret_cast<const ImageGeom*>(table.data_ptr<int64_t>()), (int)S, (int)filter, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace medst_fast

TORCH_LIBRARY_IMPL(medst_fast, CUDA, m) {
  m.impl("resize_pad_crop_normalize", &medst_fast::resize_pad_crop_normalize_cuda);
}
