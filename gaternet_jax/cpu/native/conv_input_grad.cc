// Input gradient of a 2-D NHWC convolution on the CPU (a transposed convolution), an XLA FFI
// handler. For y = conv(x, w) with strides (sh, sw) and top/left padding (pt, pl):
//
//   dx[n][iy][ix][ci] = sum over taps (a, b) with oy = (iy + pt - a) / sh and ox = (ix + pl - b) / sw
//                       whole numbers inside dy, and over co, of dy[n][oy][ox][co] * w[a][b][ci][co]
//
// The kernel arrives with its channel axes swapped (wt[a][b][co][ci], a small copy the Python side
// makes) so that ci, the output channels here, are the contiguous ones. The output pixels of one row
// fall into sw classes by (ix + pl) mod sw: a class takes exactly the taps b of that residue, and
// consecutive pixels of a class read consecutive dy pixels. So a tile of P pixels of one class x TV
// vectors of ci is summed over its taps and every co (a vector load of wt and P broadcasts of dy
// per co), from a zero-padded copy of the image's dy that needs no bounds checks. At stride 1 this
// is the forward convolution of dy with the flipped kernel. XLA:CPU's own version of the stride-2
// case took 6.5 ms for ResNet-20's first strided layer at batch 128 on the 2-core development CPU
// (benchmarks/conv_kernels.py). Conventions and threading: kernel_common.h.
#include "kernel_common.h"

namespace gaternet_native {
namespace {

struct InputGradGeometry {
  Geometry g;       // of the forward convolution: x / dx [n, h, w, ci], dy [n, oh, ow, co]
  int64_t top, left;  // rows / columns of zeros above / left of dy in the padded copy
  int64_t pw;         // width of the padded copy
};

// The taps of one output row (or one class of columns) and the dy row (column) each reads: tap a
// reads dy row oy = (iy + pt - a) / sh where that is a whole number (a row of zeros, in the padded
// copy, where it is outside dy). Found once per row and class, not in every tile.
struct Taps {
  int count = 0;
  int64_t tap[16];     // a (or b)
  int64_t offset[16];  // oy (or the column of the class's first pixel)
};

inline Taps TapsOf(int64_t i, int64_t k, int64_t s, int64_t pad) {
  Taps taps;
  for (int64_t a = 0; a < k && taps.count < 16; ++a) {
    const int64_t t = i + pad - a;
    if (((t % s) + s) % s != 0) continue;
    taps.tap[taps.count] = a;
    taps.offset[taps.count] = t / s;  // exact: t is a multiple of s
    ++taps.count;
  }
  return taps;
}

// dx[iy][first + sw * (j0 + p)][c0 .. c0+width) for p < P: one tile of the output class starting
// at column `first`. wt's channels c0.. are read as wt_block[(a * kw + b) * co + k][0 .. TV *
// kLanes), rows `w_stride` floats apart (wt itself offset by c0, or the zero-padded copy of the
// last block).
template <int P, int TV>
void InputGradTile(const InputGradGeometry& t, const Taps& rows, const Taps& columns,
                   const float* dypad, const float* wt_block, int64_t w_stride, float* dx,
                   int64_t iy, int64_t first, int64_t j0, int64_t c0, int64_t width) {
  const Geometry& g = t.g;
  Vec acc[P][TV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < TV; ++v) acc[p][v] = Vec{};
  for (int i = 0; i < rows.count; ++i) {
    const int64_t a = rows.tap[i], oy = rows.offset[i];
    for (int j = 0; j < columns.count; ++j) {
      const int64_t b = columns.tap[j], ox0 = columns.offset[j] + j0;
      const float* dy_row = dypad + ((oy + t.top) * t.pw + ox0 + t.left) * g.co;
      const float* wb = wt_block + (a * g.kw + b) * g.co * w_stride;
      for (int64_t k = 0; k < g.co; ++k) {
        Vec wv[TV];
        for (int v = 0; v < TV; ++v) wv[v] = LoadVec(wb + k * w_stride + v * kLanes);
        for (int p = 0; p < P; ++p) {
          const float s = dy_row[p * g.co + k];
          for (int v = 0; v < TV; ++v) acc[p][v] += s * wv[v];
        }
      }
    }
  }
  float* out = dx + (iy * g.w + first + g.sw * j0) * g.ci + c0;
  for (int p = 0; p < P; ++p) StoreChannels<TV>(out + p * g.sw * g.ci, acc[p], width);
}

// InputGradTile<p, TV> for a run-time p in 1..P (the last tile of a class may be narrower).
template <int TV, int P>
void InputGradTileOfWidth(int p, const InputGradGeometry& t, const Taps& rows, const Taps& columns,
                          const float* dypad, const float* wt_block, int64_t w_stride, float* dx,
                          int64_t iy, int64_t first, int64_t j0, int64_t c0, int64_t width) {
  if constexpr (P > 0) {
    if (p == P) {
      return InputGradTile<P, TV>(t, rows, columns, dypad, wt_block, w_stride, dx, iy, first, j0,
                                  c0, width);
    }
    return InputGradTileOfWidth<TV, P - 1>(p, t, rows, columns, dypad, wt_block, w_stride, dx, iy,
                                           first, j0, c0, width);
  }
}

// Every row and class of one image's dx for the channel block [c0, c0 + width).
template <int TV>
void InputGradBlock(const InputGradGeometry& t, const float* dypad, const float* wt_block,
                    int64_t w_stride, float* dx, int64_t c0, int64_t width) {
  constexpr int kP = TV == 1 ? kForwardPixels1 : kForwardPixels2;
  const Geometry& g = t.g;
  for (int64_t iy = 0; iy < g.h; ++iy) {
    const Taps rows = TapsOf(iy, g.kh, g.sh, g.pt);
    for (int64_t q = 0; q < g.sw; ++q) {
      const int64_t first = ((q - g.pl) % g.sw + g.sw) % g.sw;  // first ix with (ix + pl) % sw == q
      if (first >= g.w) continue;
      const Taps columns = TapsOf(first, g.kw, g.sw, g.pl);
      const int64_t count = (g.w - first + g.sw - 1) / g.sw;
      for (int64_t j0 = 0; j0 < count; j0 += kP) {
        const int p = static_cast<int>(std::min<int64_t>(kP, count - j0));
        InputGradTileOfWidth<TV, kP>(p, t, rows, columns, dypad, wt_block, w_stride, dx, iy, first,
                                     j0, c0, width);
      }
    }
  }
}

void InputGradBlockAny(int tv, const InputGradGeometry& t, const float* dypad,
                       const float* wt_block, int64_t w_stride, float* dx, int64_t c0,
                       int64_t width) {
  if (tv == 2) return InputGradBlock<2>(t, dypad, wt_block, w_stride, dx, c0, width);
  return InputGradBlock<1>(t, dypad, wt_block, w_stride, dx, c0, width);
}

ffi::Error ConvInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> wt,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t stride_h, int64_t stride_w,
                         int64_t pad_top, int64_t pad_left) {
  InputGradGeometry t;
  const ffi::Error invalid = MakeGeometry("conv_input_grad", "dy, wt and dx", dx->dimensions(),
                                          dy.dimensions(), wt.dimensions(), true, stride_h,
                                          stride_w, pad_top, pad_left, &t.g);
  if (!invalid.success()) return invalid;
  const Geometry& g = t.g;
  if (g.kh > 16 || g.kw > 16) return UnsupportedGeometry("conv_input_grad");
  // dy rows a tap may read: oy from floor((pt - kh + 1) / sh) to floor((h - 1 + pt) / sh).
  t.top = std::max<int64_t>(0, (g.kh - 1 - g.pt + g.sh - 1) / g.sh);
  t.left = std::max<int64_t>(0, (g.kw - 1 - g.pl + g.sw - 1) / g.sw);
  const int64_t bottom = std::max<int64_t>(0, (g.h - 1 + g.pt) / g.sh - (g.oh - 1));
  const int64_t right = std::max<int64_t>(0, (g.w - 1 + g.pl) / g.sw - (g.ow - 1));
  const int64_t ph = t.top + g.oh + bottom;
  t.pw = t.left + g.ow + right;
  const Blocks blocks = ChannelBlocks(g.ci);
  const float* ws = wt.typed_data();
  const LastBlock w_last = LastBlockOf(ws, g.kh * g.kw * g.co, g.ci, blocks);  // read by every image
  const int participants = ShareWork::Participants(pool, g.n);
  std::vector<std::vector<float>> padded(participants);
  const float* dys = dy.typed_data();
  float* dxs = dx->typed_data();
  // Items are images: each dx image is computed by one participant, in a fixed order.
  ShareWork::Run(pool, g.n, participants, [&](int me, int64_t i) {
    std::vector<float>& dypad = padded[me];
    if (dypad.empty()) dypad.assign(ph * t.pw * g.co, 0.0f);
    CopyIntoPadded(dys + i * g.oh * g.ow * g.co, g.oh, g.ow, g.co, t.top, t.left, t.pw,
                   dypad.data());
    float* dxi = dxs + i * g.h * g.w * g.ci;
    ForEachBlock(blocks, ws, g.ci, w_last, [&](int tv, const float* wb, int64_t stride,
                                               int64_t c0, int64_t width) {
      InputGradBlockAny(tv, t, dypad.data(), wb, stride, dxi, c0, width);
    });
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gaternet_native

XLA_FFI_DEFINE_HANDLER_SYMBOL(GaternetConvInputGrad, gaternet_native::ConvInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wt: w with ci and co swapped
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
