// Work distribution for the hotswap CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace hotswap {

// Below this many multiply-adds (~20 us on one core) a call runs on the
// calling thread: waking the pool costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 18;

// Runs worker(take) on up to torch's intra-op thread count; each worker calls
// take() for the next item index until it returns -1. Items are handed out
// one at a time (not in fixed chunks) because their costs differ a lot: a
// 4000-token row next to a 10-token one, causal tiles of growing length.
// at::parallel_for keeps the work on torch's own pool (no second OpenMP runtime).
template <typename Worker>
void run_items(int64_t n, int64_t work, Worker&& worker) {
  std::atomic<int64_t> next{0};
  auto take = [&]() -> int64_t {
    const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    return i < n ? i : -1;
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || work < kMinParallelWork || at::in_parallel_region()) {
    worker(take);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(take); });
}

}  // namespace hotswap
