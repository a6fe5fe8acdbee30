// Shared by the native CPU convolution kernels (conv_forward.cc, conv_input_grad.cc,
// conv_weight_grad.cc): vector type and register tiles for the instruction set, the geometry of a
// 2-D NHWC convolution, channel blocks, and the sharing of work with XLA's intra-op thread pool.
//
// Conventions of every kernel: float32, rank-4 NHWC activations (x [n, h, w, ci], y / dy
// [n, oh, ow, co]) and HWIO kernels (w / dw [kh, kw, ci, co]); strides >= 1, top/left padding
// >= 0, no dilation, no groups. models/native_conv.py checks these and uses XLA's own convolution
// otherwise; the handlers check shapes again and return an error. Any channel counts: channels
// past the last whole block of vectors are read from zero-padded copies.
//
// How (all three): a tile of accumulators stays in vector registers while as many FMAs as possible
// are done per load; work is shared out between the calling thread and XLA's intra-op thread pool
// (ShareWork). On the 2-core development CPU these run ResNet-20's convolutions ~1.5-3x faster
// than XLA:CPU's Eigen convolutions (docs/performance.md; benchmarks/conv_kernels.py).
#ifndef GATERNET_JAX_NATIVE_KERNEL_COMMON_H_
#define GATERNET_JAX_NATIVE_KERNEL_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace gaternet_native {


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

inline ffi::Error UnsupportedGeometry(const char* kernel) {
  return ffi::Error::InvalidArgument(std::string(kernel) + ": unsupported shapes or attributes");
}

// Every kernel's geometry from its operands' dimensions: x [n, h, w, ci], y [n, oh, ow, co] and
// the kernel [kh, kw, ci, co] ([kh, kw, co, ci] with `kernel_co_first`: the input gradient's
// transposed kernel); an InvalidArgument error, prefixed `kernel: `, for anything else.
// `operands` names the three operands for the rank error.
inline ffi::Error MakeGeometry(const char* kernel, const char* operands,
                               ffi::Span<const int64_t> x, ffi::Span<const int64_t> y,
                               ffi::Span<const int64_t> k, bool kernel_co_first, int64_t sh,
                               int64_t sw, int64_t pt, int64_t pl, Geometry* g) {
  if (x.size() != 4 || y.size() != 4 || k.size() != 4) {
    return ffi::Error::InvalidArgument(std::string(kernel) + ": " + operands +
                                       " must have rank 4");
  }
  *g = Geometry{x[0], x[1], x[2], x[3], y[1], y[2], y[3], k[0], k[1], sh, sw, pt, pl};
  const int64_t k_ci = kernel_co_first ? k[3] : k[2], k_co = kernel_co_first ? k[2] : k[3];
  if (y[0] != g->n || k_ci != g->ci || k_co != g->co || sh < 1 || sw < 1 || pt < 0 || pl < 0) {
    return UnsupportedGeometry(kernel);
  }
  return ffi::Error::Success();
}

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

// The last channel block of a row-major [rows][channels] matrix, read as rows of whole vectors:
// the matrix itself (offset to the block) when the block is whole vectors, else a zero-padded
// copy. `data` points into `copy` or the matrix; `stride` is the floats between rows.
struct LastBlock {
  std::vector<float> copy;
  const float* data = nullptr;
  int64_t stride = 0;
};

inline LastBlock LastBlockOf(const float* m, int64_t rows, int64_t channels, const Blocks& b) {
  LastBlock last;
  if (b.rest % kLanes == 0) {
    last.data = m + b.full;
    last.stride = channels;
    return last;
  }
  last.stride = b.rest_tv * kLanes;
  last.copy.assign(rows * last.stride, 0.0f);
  for (int64_t row = 0; row < rows; ++row) {
    std::memcpy(last.copy.data() + row * last.stride, m + row * channels + b.full,
                b.rest * sizeof(float));
  }
  last.data = last.copy.data();
  return last;
}

// Calls block(tv, operand, stride, c0, width) for every channel block [c0, c0 + width) of an
// output with `channels` channels: the full blocks read `m` itself (offset by c0, rows `channels`
// floats apart), the last one `last` (LastBlockOf(m, ...)).
template <typename Block>
void ForEachBlock(const Blocks& b, const float* m, int64_t channels, const LastBlock& last,
                  Block&& block) {
  const int64_t width = b.tv * kLanes;
  for (int64_t c0 = 0; c0 < b.full; c0 += width) block(b.tv, m + c0, channels, c0, width);
  if (b.rest) block(b.rest_tv, last.data, last.stride, b.full, b.rest);
}

// Copies an image [rows][cols][channels] into `padded` ([.][padded_cols][channels], zero where
// not written) at row `top`, column `left`; the caller zeroes `padded` once and reuses it.
inline void CopyIntoPadded(const float* image, int64_t rows, int64_t cols, int64_t channels,
                           int64_t top, int64_t left, int64_t padded_cols, float* padded) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(padded + ((r + top) * padded_cols + left) * channels, image + r * cols * channels,
                cols * channels * sizeof(float));
  }
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

}  // namespace gaternet_native

#endif  // GATERNET_JAX_NATIVE_KERNEL_COMMON_H_
