// Work distribution for the hotswap CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hotswap {

// Below this many multiply-adds (~20 us on one core) a call runs on the
// calling thread: waking the pool costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 18;

// Runs worker(take) on up to the calling thread's torch thread count; each worker
// calls take() for the next item index until it returns -1. Items are handed out
// one at a time (not in fixed chunks) because their costs differ a lot: a
// 4000-token row next to a 10-token one, causal tiles of growing length.
//
// With torch's OpenMP backend this opens the parallel region itself, on the same
// libgomp and so the same pool as torch's own ops, rather than through
// at::parallel_for: that template's header-inlined lazy thread-count init keeps its
// own per-thread flag in this library, and on its first call from a thread it
// applies the count last set by *any* thread (a serial helper's
// torch.set_num_threads(1)) to the calling thread — the engine's thread then ran
// every later matmul on one core (a decode step 25 -> 38 ms).
template <typename Worker>
void run_items(int64_t n, int64_t work, Worker&& worker) {
  std::atomic<int64_t> next{0};
  auto take = [&]() -> int64_t {
    const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    return i < n ? i : -1;
  };
#ifdef _OPENMP
  const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), n));
  if (threads <= 1 || work < kMinParallelWork || omp_in_parallel()) {
    worker(take);
    return;
  }
  std::exception_ptr error;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
#pragma omp parallel num_threads(threads)
  {
    try {
      worker(take);
    } catch (...) {  // an exception must not leave the region: the first is rethrown below
      if (!failed.test_and_set()) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
#else
  // Another backend (or no -fopenmp): at::parallel_for keeps the work on torch's own pool.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || work < kMinParallelWork || at::in_parallel_region()) {
    worker(take);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(take); });
#endif
}

}  // namespace hotswap
