// Forward pass of a 2-D NHWC convolution on the CPU, an XLA FFI handler:
//
//   y[n][oy][ox][co] = sum over a, b, ci of x[n][oy*sh + a - pt][ox*sw + b - pl][ci] * w[a][b][ci][co]
//
// (input positions outside the image are the padding's zeros). Each image is copied into a
// zero-padded buffer, so no tap needs a bounds check; a tile of P output pixels x TV vectors of
// output channels is summed over every tap and input channel (a vector load of w and P broadcasts
// of x per input channel). Why and how fast: kernel_common.h.
#include "kernel_common.h"

namespace gaternet_native {
namespace {


// One image, read from a zero-padded copy xpad[ph][pw][ci] (so no tap needs a bounds check):
// y[oy][ox0 .. ox0+P)[co0 .. co0+width), width <= TV * kLanes. The kernel's channels co0.. are
// read as w_block[(a * kw + b) * ci + c][0 .. TV * kLanes), rows `w_stride` floats apart (w itself
// offset by co0, or the zero-padded copy of the last block).
template <int P, int TV>
void ForwardTile(const Geometry& g, int64_t pw, const float* xpad, const float* w_block,
                 int64_t w_stride, float* y, int64_t oy, int64_t ox0, int64_t co0,
                 int64_t width) {
  Vec acc[P][TV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < TV; ++v) acc[p][v] = Vec{};
  const int64_t pixel_step = g.sw * g.ci;
  for (int64_t a = 0; a < g.kh; ++a) {
    const float* x_row = xpad + ((oy * g.sh + a) * pw + ox0 * g.sw) * g.ci;
    for (int64_t b = 0; b < g.kw; ++b) {
      const float* xb = x_row + b * g.ci;
      const float* wb = w_block + (a * g.kw + b) * g.ci * w_stride;
      for (int64_t c = 0; c < g.ci; ++c) {
        Vec wv[TV];
        for (int v = 0; v < TV; ++v) wv[v] = LoadVec(wb + c * w_stride + v * kLanes);
        for (int p = 0; p < P; ++p) {
          const float s = xb[p * pixel_step + c];
          for (int v = 0; v < TV; ++v) acc[p][v] += s * wv[v];
        }
      }
    }
  }
  float* out = y + (oy * g.ow + ox0) * g.co + co0;
  for (int p = 0; p < P; ++p) StoreChannels<TV>(out + p * g.co, acc[p], width);
}

// ForwardTile<p, TV> for a run-time p in 1..P (the last tile of a row may be narrower).
template <int TV, int P>
void ForwardTileOfWidth(int p, const Geometry& g, int64_t pw, const float* xpad,
                        const float* w_block, int64_t w_stride, float* y, int64_t oy, int64_t ox0,
                        int64_t co0, int64_t width) {
  if constexpr (P > 0) {
    if (p == P) return ForwardTile<P, TV>(g, pw, xpad, w_block, w_stride, y, oy, ox0, co0, width);
    return ForwardTileOfWidth<TV, P - 1>(p, g, pw, xpad, w_block, w_stride, y, oy, ox0, co0,
                                         width);
  }
}

// Every row of one output image for the channel block [co0, co0 + width).
template <int TV>
void ForwardBlock(const Geometry& g, int64_t pw, const float* xpad, const float* w_block,
                  int64_t w_stride, float* y, int64_t co0, int64_t width) {
  constexpr int kP = TV == 1 ? kForwardPixels1 : kForwardPixels2;
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    for (int64_t ox0 = 0; ox0 < g.ow; ox0 += kP) {
      const int p = static_cast<int>(std::min<int64_t>(kP, g.ow - ox0));
      ForwardTileOfWidth<TV, kP>(p, g, pw, xpad, w_block, w_stride, y, oy, ox0, co0, width);
    }
  }
}

void ForwardBlockAny(int tv, const Geometry& g, int64_t pw, const float* xpad,
                     const float* w_block, int64_t w_stride, float* y, int64_t co0,
                     int64_t width) {
  if (tv == 2) return ForwardBlock<2>(g, pw, xpad, w_block, w_stride, y, co0, width);
  return ForwardBlock<1>(g, pw, xpad, w_block, w_stride, y, co0, width);
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                       int64_t pad_top, int64_t pad_left) {
  Geometry g;
  const ffi::Error invalid = MakeGeometry("conv_forward", "x, w and y", x.dimensions(),
                                          y->dimensions(), w.dimensions(), false, stride_h,
                                          stride_w, pad_top, pad_left, &g);
  if (!invalid.success()) return invalid;
  // The padded copy covers every tap of every output position; its border stays zero.
  const int64_t ph = std::max(g.pt + g.h, (g.oh - 1) * g.sh + g.kh);
  const int64_t pw = std::max(g.pl + g.w, (g.ow - 1) * g.sw + g.kw);
  const Blocks blocks = ChannelBlocks(g.co);
  const float* ws = w.typed_data();
  const LastBlock w_last = LastBlockOf(ws, g.kh * g.kw * g.ci, g.co, blocks);  // read by every image
  const int participants = ShareWork::Participants(pool, g.n);
  std::vector<std::vector<float>> padded(participants);
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  // Items are images: each output image is computed by one participant, in a fixed order.
  ShareWork::Run(pool, g.n, participants, [&](int me, int64_t i) {
    std::vector<float>& xpad = padded[me];
    if (xpad.empty()) xpad.assign(ph * pw * g.ci, 0.0f);
    CopyIntoPadded(xs + i * g.h * g.w * g.ci, g.h, g.w, g.ci, g.pt, g.pl, pw, xpad.data());
    float* yi = ys + i * g.oh * g.ow * g.co;
    ForEachBlock(blocks, ws, g.co, w_last, [&](int tv, const float* wb, int64_t stride,
                                               int64_t co0, int64_t width) {
      ForwardBlockAny(tv, g, pw, xpad.data(), wb, stride, yi, co0, width);
    });
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gaternet_native

XLA_FFI_DEFINE_HANDLER_SYMBOL(GaternetConvForward, gaternet_native::ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

