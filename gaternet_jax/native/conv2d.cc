// 2-D NHWC convolutions on the CPU: forward and weight gradient, as XLA FFI handlers.
//
//   forward:          y[n][oy][ox][co] = sum over a, b, ci of x[n][oy*sh + a - pt][ox*sw + b - pl][ci] * w[a][b][ci][co]
//   weight gradient:  dw[a][b][ci][co] = sum over n, oy, ox of x[n][oy*sh + a - pt][ox*sw + b - pl][ci] * dy[n][oy][ox][co]
//
// (input positions outside the image are the convolution's zero padding and add nothing). The
// input gradient of a stride-1 convolution is the forward convolution of dy with the flipped,
// transposed kernel; models/native_conv.py builds it from the forward handler.
//
// Why: on the 2-core development CPU, XLA:CPU's Eigen convolutions took 3.0 ms for the forward
// pass of ResNet-20's 16-channel layer at batch 128 (1.8 ms here), and 5.2 ms for its weight
// gradient (1.3 ms here), which XLA computes as a convolution over the batch after transposing x
// and dy to batch-minor layouts, with image patches packed into fresh scratch memory on every call.
// README, Throughput has the measurements.
//
// How: both loops keep a tile of accumulators in vector registers, as many FMAs as possible per
// load. Forward: P output pixels x TV vectors of output channels, summed over every tap and
// input channel (a vector load of w and P broadcasts of x per input channel). Weight gradient: TC
// input channels x TV output-channel vectors of one tap, summed over an image's output pixels
// (TV vector loads of dy and TC broadcasts of x per pixel), output rows in cache-sized blocks.
// Work is shared out between the calling thread and XLA's intra-op thread pool (ShareWork).
//
// Requires: float32, rank-4 NHWC x / y / dy and HWIO w / dw, strides >= 1, top/left padding >= 0,
// no dilation, no groups. models/native_conv.py checks these and uses XLA's own convolution
// otherwise; the handlers check shapes again and return an error. Any channel counts: channels
// past the last whole block of vectors are read from zero-padded copies.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vector width and register tiles for the instruction set this is compiled for (-march=native).
// Each tile keeps its accumulators in registers: at most about half the register file, the rest
// for the operands of the inner loop.
#if defined(__AVX512F__)
constexpr int kLanes = 16;          // 32 registers of 16 floats
constexpr int kForwardPixels1 = 8;  // forward tile P x TV: 8 x 1 or 8 x 2 vectors
constexpr int kForwardPixels2 = 8;
constexpr int kGradChannels1 = 16;  // weight-gradient tile TC x TV: 16 x 1 or 8 x 2 vectors
constexpr int kGradChannels2 = 8;
#elif defined(__AVX__) || defined(__SSE2__)
#if defined(__AVX__)
constexpr int kLanes = 8;  // 16 registers of 8 floats
#else
constexpr int kLanes = 4;  // 16 registers of 4 floats
#endif
// 12 accumulators. Built with -mno-avx512f on the AVX-512 development CPU, ResNet-20's 16-channel
// layer (batch 128) took 3.1 ms forward and 3.8 ms for dw with 6 x 2 tiles, 4.2 and 5.0 ms with
// 4 x 2. Never measured on a CPU without AVX-512, so not used there by default (native/__init__).
constexpr int kForwardPixels1 = 8;
constexpr int kForwardPixels2 = 6;
constexpr int kGradChannels1 = 8;
constexpr int kGradChannels2 = 6;
#else
constexpr int kLanes = 4;  // e.g. NEON: 32 registers of 4 floats
constexpr int kForwardPixels1 = 8;
constexpr int kForwardPixels2 = 8;
constexpr int kGradChannels1 = 16;
constexpr int kGradChannels2 = 8;
#endif
// A GCC/Clang vector of kLanes floats: one register of the instruction set above.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// Bytes of dy and x rows per block of output rows in the weight gradient: on CIFAR shapes any
// block from 24 KB up was as fast; for ImageNet-sized images it keeps a block's passes in cache.
constexpr int64_t kBlockBytes = 128 * 1024;

struct Geometry {
  int64_t n, h, w, ci;     // x: [n, h, w, ci]
  int64_t oh, ow, co;      // y / dy: [n, oh, ow, co]
  int64_t kh, kw;          // w / dw: [kh, kw, ci, co]
  int64_t sh, sw, pt, pl;  // strides, top and left padding
};

__attribute__((always_inline)) inline Vec LoadVec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

__attribute__((always_inline)) inline void StoreVec(float* p, Vec v) {
  std::memcpy(p, &v, sizeof(Vec));
}

// Runs body(participant, item) for every item in [0, items), on the calling thread and up to
// `participants - 1` tasks of the pool; participant < participants indexes per-participant scratch.
// Which participant runs which item depends on timing; results must depend only on the item.
//
// A participant first registers (under the lock), then takes items from a counter until none are
// left. The caller's own loop ends with every item taken, so it then waits only for registered
// participants, which are running; a pool task that starts after that finds the work closed and
// returns. Nothing waits on a task that has not started, so this cannot deadlock on a busy pool,
// and late tasks touch only this shared state (kept alive by their shared_ptr), never the buffers.
class ShareWork {
 public:
  using Body = std::function<void(int, int64_t)>;

  // The calling thread and the pool's threads, at most one per item.
  static int Participants(ffi::ThreadPool& pool, int64_t items) {
    const int64_t helpers = std::max<int64_t>(0, pool.num_threads());
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(helpers + 1, items)));
  }

  static void Run(ffi::ThreadPool& pool, int64_t items, int participants, Body body) {
    auto state = std::make_shared<State>();
    state->items = items;
    state->max_participants = participants;
    state->body = std::move(body);
    for (int i = 1; i < participants; ++i) pool.Schedule([state] { state->Participate(); });
    state->Participate();
    std::unique_lock<std::mutex> lock(state->mu);
    state->idle.wait(lock, [&] { return state->running == 0; });
    state->closed = true;
    state->body = nullptr;
  }

 private:
  struct State {
    int64_t items = 0;
    int max_participants = 1;
    Body body;
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable idle;
    int registered = 0;
    int running = 0;
    bool closed = false;

    void Participate() {
      int me;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (closed || registered == max_participants) return;
        me = registered++;
        ++running;
      }
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) body(me, i);
      std::lock_guard<std::mutex> lock(mu);
      if (--running == 0) idle.notify_all();
    }
  };
};

// The output-channel axis in blocks of TV vectors: full blocks, then (when Co is not a multiple
// of TV * kLanes) one narrower block of ceil(rest / kLanes) vectors whose operands the kernels read
// from a zero-padded copy, so that every inner loop loads whole vectors.
struct Blocks {
  int tv;           // vectors per full block: 2 when Co has two vectors' worth, else 1
  int64_t full;     // channels in full blocks
  int64_t rest;     // channels in the last, narrower block (0: none)
  int rest_tv;      // vectors of that block
};

inline Blocks ChannelBlocks(int64_t co) {
  Blocks b;
  b.tv = co >= 2 * kLanes ? 2 : 1;
  b.full = co - co % (b.tv * kLanes);
  b.rest = co - b.full;
  b.rest_tv = static_cast<int>((b.rest + kLanes - 1) / kLanes);
  return b;
}

// Stores `width` channels (<= TV * kLanes) of one pixel's TV accumulators at `out`.
template <int TV>
__attribute__((always_inline)) inline void StoreChannels(float* out, const Vec (&acc)[TV],
                                                         int64_t width) {
  if (width == TV * kLanes) {
    for (int v = 0; v < TV; ++v) StoreVec(out + v * kLanes, acc[v]);
    return;
  }
  float lanes[TV * kLanes];
  std::memcpy(lanes, acc, sizeof(lanes));
  std::memcpy(out, lanes, width * sizeof(float));
}

// Adds `width` channels (<= TV * kLanes) of TV accumulators to the floats at `out`.
template <int TV>
__attribute__((always_inline)) inline void AddChannels(float* out, const Vec (&acc)[TV],
                                                       int64_t width) {
  if (width == TV * kLanes) {
    for (int v = 0; v < TV; ++v) StoreVec(out + v * kLanes, LoadVec(out + v * kLanes) + acc[v]);
    return;
  }
  float lanes[TV * kLanes];
  std::memcpy(lanes, acc, sizeof(lanes));
  for (int64_t i = 0; i < width; ++i) out[i] += lanes[i];
}

//===------------------------------------------------------------------------------------------===//
// Forward
//===------------------------------------------------------------------------------------------===//

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
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("conv_forward: x, w and y must have rank 4");
  }
  const Geometry g{xd[0],  xd[1],  xd[2],    xd[3],    yd[1],   yd[2],   yd[3],
                   wd[0],  wd[1],  stride_h, stride_w, pad_top, pad_left};
  if (yd[0] != g.n || wd[2] != g.ci || wd[3] != g.co || g.sh < 1 || g.sw < 1 || g.pt < 0 ||
      g.pl < 0) {
    return ffi::Error::InvalidArgument("conv_forward: unsupported shapes or attributes");
  }
  // The padded copy covers every tap of every output position; its border stays zero.
  const int64_t ph = std::max(g.pt + g.h, (g.oh - 1) * g.sh + g.kh);
  const int64_t pw = std::max(g.pl + g.w, (g.ow - 1) * g.sw + g.kw);
  const Blocks blocks = ChannelBlocks(g.co);
  const float* ws = w.typed_data();
  // The last block's kernel channels, zero-padded to whole vectors (read by every image) unless
  // they are whole vectors already.
  const bool pad_rest = blocks.rest % kLanes != 0;
  const int64_t rest_stride = pad_rest ? blocks.rest_tv * kLanes : g.co;
  std::vector<float> w_rest(pad_rest ? g.kh * g.kw * g.ci * rest_stride : 0, 0.0f);
  for (int64_t row = 0; pad_rest && row < g.kh * g.kw * g.ci; ++row) {
    std::memcpy(w_rest.data() + row * rest_stride, ws + row * g.co + blocks.full,
                blocks.rest * sizeof(float));
  }
  const float* w_rest_block = pad_rest ? w_rest.data() : ws + blocks.full;
  const int participants = ShareWork::Participants(pool, g.n);
  std::vector<std::vector<float>> padded(participants);
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  // Items are images: each output image is computed by one participant, in a fixed order.
  ShareWork::Run(pool, g.n, participants, [&](int me, int64_t i) {
    std::vector<float>& xpad = padded[me];
    if (xpad.empty()) xpad.assign(ph * pw * g.ci, 0.0f);
    const float* xi = xs + i * g.h * g.w * g.ci;
    for (int64_t r = 0; r < g.h; ++r) {
      std::memcpy(xpad.data() + ((r + g.pt) * pw + g.pl) * g.ci, xi + r * g.w * g.ci,
                  g.w * g.ci * sizeof(float));
    }
    float* yi = ys + i * g.oh * g.ow * g.co;
    const int64_t block = blocks.tv * kLanes;
    for (int64_t co0 = 0; co0 < blocks.full; co0 += block) {
      ForwardBlockAny(blocks.tv, g, pw, xpad.data(), ws + co0, g.co, yi, co0, block);
    }
    if (blocks.rest) {
      ForwardBlockAny(blocks.rest_tv, g, pw, xpad.data(), w_rest_block, rest_stride, yi,
                      blocks.full, blocks.rest);
    }
  });
  return ffi::Error::Success();
}

//===------------------------------------------------------------------------------------------===//
// Weight gradient
//===------------------------------------------------------------------------------------------===//

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
  const auto xd = x.dimensions(), dyd = dy.dimensions(), dwd = dw->dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || dwd.size() != 4) {
    return ffi::Error::InvalidArgument("conv_weight_grad: x, dy and dw must have rank 4");
  }
  const Geometry g{xd[0],  xd[1],  xd[2],    xd[3],    dyd[1],  dyd[2],  dyd[3],
                   dwd[0], dwd[1], stride_h, stride_w, pad_top, pad_left};
  if (dyd[0] != g.n || dwd[2] != g.ci || dwd[3] != g.co || g.sh < 1 || g.sw < 1 || g.pt < 0 ||
      g.pl < 0) {
    return ffi::Error::InvalidArgument("conv_weight_grad: unsupported shapes or attributes");
  }
  // The batch is cut into one fixed range of images per participant; each range is summed, in
  // image order, into its own copy of dw, and the copies are added in range order. So the result
  // does not depend on which thread ran which range, only on the number of threads (the same run
  // on the same machine gives the same bits).
  const int64_t size = g.kh * g.kw * g.ci * g.co;
  const Blocks blocks = ChannelBlocks(g.co);
  const bool pad_rest = blocks.rest % kLanes != 0;
  const int64_t rest_stride = blocks.rest_tv * kLanes;
  const int ranges = ShareWork::Participants(pool, g.n);
  std::vector<std::vector<float>> sums(ranges);
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  ShareWork::Run(pool, ranges, ranges, [&](int, int64_t r) {
    std::vector<float>& sum = sums[r];
    sum.assign(size, 0.0f);
    // The last block's dy channels of one image, zero-padded to whole vectors unless they are
    // whole vectors already.
    std::vector<float> dy_rest(pad_rest ? g.oh * g.ow * rest_stride : 0, 0.0f);
    for (int64_t i = r * g.n / ranges; i < (r + 1) * g.n / ranges; ++i) {
      const float* xi = xs + i * g.h * g.w * g.ci;
      const float* dyi = dys + i * g.oh * g.ow * g.co;
      const int64_t block = blocks.tv * kLanes;
      for (int64_t co0 = 0; co0 < blocks.full; co0 += block) {
        GradBlockAny(blocks.tv, g, xi, dyi + co0, g.co, sum.data(), co0, block);
      }
      if (blocks.rest && !pad_rest) {
        GradBlockAny(blocks.rest_tv, g, xi, dyi + blocks.full, g.co, sum.data(), blocks.full,
                     blocks.rest);
      } else if (blocks.rest) {
        for (int64_t pixel = 0; pixel < g.oh * g.ow; ++pixel) {
          std::memcpy(dy_rest.data() + pixel * rest_stride, dyi + pixel * g.co + blocks.full,
                      blocks.rest * sizeof(float));
        }
        GradBlockAny(blocks.rest_tv, g, xi, dy_rest.data(), rest_stride, sum.data(), blocks.full,
                     blocks.rest);
      }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(GaternetConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GaternetConvWeightGrad, ConvWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
