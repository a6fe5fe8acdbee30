// Weight gradient of a 2-D NHWC convolution on the CPU, an XLA FFI handler:
//
//   dw[a][b][ci][co] = sum over n, oy, ox of x[n][oy*sh + a - pt][ox*sw + b - pl][ci] * dy[n][oy][ox][co]
//
// (input positions outside the image are the padding's zeros and add nothing). XLA:CPU computes
// this as a convolution over the batch after transposing x and dy to batch-minor layouts, with
// image patches packed into fresh scratch memory on every call; here a tile of TC input channels x
// TV output-channel vectors of one tap is summed over an image's output pixels (TV vector loads of
// dy and TC broadcasts of x per pixel), output rows in cache-sized blocks. Why and how fast:
// kernel_common.h.
#include "kernel_common.h"

namespace gaternet_native {
namespace {


// Output positions o in [lo, hi) whose input position o*s + k - p lies inside [0, in).
inline void ValidRange(int64_t out, int64_t in, int64_t s, int64_t k, int64_t p, int64_t* lo,
                       int64_t* hi) {
  const int64_t first = p - k > 0 ? (p - k + s - 1) / s : 0;
  const int64_t last_plus_one = in - 1 + p - k < 0 ? 0 : (in - 1 + p - k) / s + 1;
  *lo = std::min(first, out);
  *hi = std::min(last_plus_one, out);
}

// sum[a][b][ci0 + c][co0 .. co0+width) += sum over oy in [oy_lo, oy_hi), ox in [ox_lo, ox_hi) of
// x[iy][ix][ci0 + c] * dy[oy][ox][co0 ..], for c < TC (one image). dy's channels co0.. are read as
// dy_block[oy * ow + ox][0 .. TV * kLanes), pixels `dy_stride` floats apart (dy itself offset by
// co0, or the zero-padded copy of the last block).
template <int TC, int TV>
void GradTile(const Geometry& g, const float* x, const float* dy_block, int64_t dy_stride,
              float* sum, int64_t a, int64_t b, int64_t oy_lo, int64_t oy_hi, int64_t ox_lo,
              int64_t ox_hi, int64_t ci0, int64_t co0, int64_t width) {
  Vec acc[TC][TV];
  for (int c = 0; c < TC; ++c)
    for (int v = 0; v < TV; ++v) acc[c][v] = Vec{};
  for (int64_t oy = oy_lo; oy < oy_hi; ++oy) {
    const float* x_row = x + (oy * g.sh + a - g.pt) * g.w * g.ci + ci0;
    const float* dy_row = dy_block + oy * g.ow * dy_stride;
    for (int64_t ox = ox_lo; ox < ox_hi; ++ox) {
      const float* xp = x_row + (ox * g.sw + b - g.pl) * g.ci;
      const float* dp = dy_row + ox * dy_stride;
      Vec d[TV];
      for (int v = 0; v < TV; ++v) d[v] = LoadVec(dp + v * kLanes);
      for (int c = 0; c < TC; ++c) {
        const float s = xp[c];
        for (int v = 0; v < TV; ++v) acc[c][v] += s * d[v];
      }
    }
  }
  float* out = sum + ((a * g.kw + b) * g.ci + ci0) * g.co + co0;
  for (int c = 0; c < TC; ++c) AddChannels<TV>(out + c * g.co, acc[c], width);
}

// GradTile<tc, TV> for a run-time tc in 1..TC (the last input-channel tile may be narrower).
template <int TV, int TC>
void GradTileOfWidth(int tc, const Geometry& g, const float* x, const float* dy_block,
                     int64_t dy_stride, float* sum, int64_t a, int64_t b, int64_t oy_lo,
                     int64_t oy_hi, int64_t ox_lo, int64_t ox_hi, int64_t ci0, int64_t co0,
                     int64_t width) {
  if constexpr (TC > 0) {
    if (tc == TC) {
      return GradTile<TC, TV>(g, x, dy_block, dy_stride, sum, a, b, oy_lo, oy_hi, ox_lo, ox_hi,
                              ci0, co0, width);
    }
    return GradTileOfWidth<TV, TC - 1>(tc, g, x, dy_block, dy_stride, sum, a, b, oy_lo, oy_hi,
                                       ox_lo, ox_hi, ci0, co0, width);
  }
}

// One image's contribution to sum for the channel block [co0, co0 + width).
template <int TV>
void GradBlock(const Geometry& g, const float* x, const float* dy_block, int64_t dy_stride,
               float* sum, int64_t co0, int64_t width) {
  constexpr int kTc = TV == 1 ? kGradChannels1 : kGradChannels2;
  const int64_t row_bytes = (g.ow * g.co + g.sh * g.w * g.ci) * static_cast<int64_t>(sizeof(float));
  const int64_t block_rows = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(row_bytes, 1));
  for (int64_t r0 = 0; r0 < g.oh; r0 += block_rows) {
    const int64_t r1 = std::min(g.oh, r0 + block_rows);
    for (int64_t a = 0; a < g.kh; ++a) {
      int64_t oy_lo, oy_hi;
      ValidRange(g.oh, g.h, g.sh, a, g.pt, &oy_lo, &oy_hi);
      oy_lo = std::max(oy_lo, r0);
      oy_hi = std::min(oy_hi, r1);
      if (oy_lo >= oy_hi) continue;
      for (int64_t b = 0; b < g.kw; ++b) {
        int64_t ox_lo, ox_hi;
        ValidRange(g.ow, g.w, g.sw, b, g.pl, &ox_lo, &ox_hi);
        if (ox_lo >= ox_hi) continue;
        for (int64_t ci0 = 0; ci0 < g.ci; ci0 += kTc) {
          const int tc = static_cast<int>(std::min<int64_t>(kTc, g.ci - ci0));
          GradTileOfWidth<TV, kTc>(tc, g, x, dy_block, dy_stride, sum, a, b, oy_lo, oy_hi, ox_lo,
                                   ox_hi, ci0, co0, width);
        }
      }
    }
  }
}

void GradBlockAny(int tv, const Geometry& g, const float* x, const float* dy_block,
                  int64_t dy_stride, float* sum, int64_t co0, int64_t width) {
  if (tv == 2) return GradBlock<2>(g, x, dy_block, dy_stride, sum, co0, width);
  return GradBlock<1>(g, x, dy_block, dy_stride, sum, co0, width);
}

ffi::Error ConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h, int64_t stride_w,
                          int64_t pad_top, int64_t pad_left) {
  Geometry g;
  const ffi::Error invalid = MakeGeometry("conv_weight_grad", "x, dy and dw", x.dimensions(),
                                          dy.dimensions(), dw->dimensions(), false, stride_h,
                                          stride_w, pad_top, pad_left, &g);
  if (!invalid.success()) return invalid;
  // The batch is cut into one fixed range of images per participant; each range is summed, in
  // image order, into its own copy of dw, and the copies are added in range order. So the result
  // does not depend on which thread ran which range, only on the number of threads (the same run
  // on the same machine gives the same bits).
  const int64_t size = g.kh * g.kw * g.ci * g.co;
  const Blocks blocks = ChannelBlocks(g.co);
  const int ranges = ShareWork::Participants(pool, g.n);
  std::vector<std::vector<float>> sums(ranges);
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  ShareWork::Run(pool, ranges, ranges, [&](int, int64_t r) {
    std::vector<float>& sum = sums[r];
    sum.assign(size, 0.0f);
    for (int64_t i = r * g.n / ranges; i < (r + 1) * g.n / ranges; ++i) {
      const float* xi = xs + i * g.h * g.w * g.ci;
      const float* dyi = dys + i * g.oh * g.ow * g.co;
      const LastBlock dy_last = LastBlockOf(dyi, g.oh * g.ow, g.co, blocks);
      ForEachBlock(blocks, dyi, g.co, dy_last, [&](int tv, const float* db, int64_t stride,
                                                   int64_t co0, int64_t width) {
        GradBlockAny(tv, g, xi, db, stride, sum.data(), co0, width);
      });
    }
  });
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.0f);
  for (const std::vector<float>& sum : sums) {
    for (int64_t i = 0; i < size; ++i) out[i] += sum[i];
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gaternet_native

XLA_FFI_DEFINE_HANDLER_SYMBOL(GaternetConvWeightGrad, gaternet_native::ConvWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
