// The kernels' thread pool and parallel_for (part of cpu_kernels.cpp: included there, in order).
#pragma once

namespace {

// The kernels' parallel loops run on a pool of their own instead of OpenMP's.
//
// Why: libgomp keeps one thread team per calling thread, and once more team threads exist
// than cores (the main thread's team plus a decoding thread's), it stops spinning between
// parallel regions: every region then wakes a sleeping thread. A server decodes in worker
// threads, so a layer's small products cost 2-3x their main-thread time there (measured:
// one 1536 x 576 product, 8 rows, 34 us on the main thread against 66-114 us in another
// thread; a pass of 8 one-token steps 10.8 ms against 15.7 ms). This pool is shared by
// every calling thread: its workers spin a while after each loop (the next layer's loop
// comes within microseconds) and sleep after that. One caller at a time uses it; a second
// caller meanwhile runs its loop alone (the cores are busy anyway).
//
// parallel_for splits [begin, end) as at::parallel_for does: at most at::get_num_threads()
// contiguous chunks of at least `grain`. Every kernel computes each output the same way
// whichever chunk holds it, so the split never changes a result.
class SpinPool {
 public:
  void run(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
    const int64_t range = end - begin;
    if (range <= 0) return;
    const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (range + grain - 1) / std::max<int64_t>(grain, 1));
    std::unique_lock<std::mutex> busy(use_, std::try_to_lock);
    if (tasks <= 1 || !busy.owns_lock()) {
      f(begin, end);
      return;
    }
    while (static_cast<int64_t>(workers_.size()) < tasks - 1) {
      const int index = static_cast<int>(workers_.size());
      const uint64_t seen = generation_.load();  // a new worker waits for the next loop, whenever it starts
      workers_.emplace_back([this, index, seen] { work(index, seen); });
      workers_.back().detach();
    }
    fn_ = &f;
    begin_ = begin, end_ = end, chunk_ = (range + tasks - 1) / tasks, tasks_ = tasks;
    remaining_.store(static_cast<int>(workers_.size()));  // every worker answers every loop, even one with no chunk
    generation_.fetch_add(1);  // seq_cst, against a worker going to sleep (work)
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    f(begin, std::min(end, begin + chunk_));
    while (remaining_.load(std::memory_order_acquire) > 0) _mm_pause();
  }

 private:
  static constexpr int64_t kSpins = 1 << 16;  // ~1 ms of pauses before a worker sleeps

  void work(int index, uint64_t seen) {
    while (true) {
      int64_t spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen && ++spins < kSpins) _mm_pause();
      if (generation_.load(std::memory_order_acquire) == seen) {
        sleeping_.fetch_add(1);
        std::unique_lock<std::mutex> lock(sleep_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = generation_.load(std::memory_order_acquire);
      const int64_t task = index + 1;  // the caller runs chunk 0
      const int64_t j0 = begin_ + task * chunk_;
      if (task < tasks_ && j0 < end_) (*fn_)(j0, std::min(end_, j0 + chunk_));
      remaining_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex use_, sleep_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0}, sleeping_{0};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 0, tasks_ = 0;
};

// The main thread keeps OpenMP (its team is the one libgomp keeps spinning: measured
// fastest there), every other thread uses the pool. One pool a process: a child made by
// fork() has none of its parent's threads, so it starts a pool of its own.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  static std::atomic<SpinPool*> pool{nullptr};
  static std::atomic<pid_t> owner{0};
  static std::mutex making;
  thread_local const bool main_thread = getpid() == static_cast<pid_t>(syscall(SYS_gettid));
  if (main_thread) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  const pid_t pid = getpid();
  if (owner.load() != pid) {
    std::lock_guard<std::mutex> lock(making);
    if (owner.load() != pid) {
      pool.store(new SpinPool());  // never freed: its detached workers live as long as the process
      owner.store(pid);
    }
  }
  pool.load()->run(begin, end, grain, f);
}

}  // namespace
