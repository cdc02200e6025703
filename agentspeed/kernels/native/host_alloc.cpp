// A caching host allocator for torch's CPU tensors: blocks of >= 1 MiB are mapped once, kept
// when freed and handed to later requests of about their size, as llama.cpp's graph allocator
// and torch's own CUDA allocator reuse their buffers.
//
// Why: a prefill step allocates the same activations layer after layer. Through glibc those
// come from a thread arena's 64 MiB heaps, whose fragmentation held about twice the step's
// live size (a 2,690-token Qwen2.5-1.5B prompt: +232 to +244 MiB at the peak, +129 MiB through
// this allocator); making glibc map each one (M_MMAP_THRESHOLD) frees them but pays a page fault
// per 4 KiB on every allocation again. Here a block is faulted in once and reused (on 2 MiB
// pages from its first reuse, where the kernel grants them).
//
// Contract: requests below kMinBlock go to c10's alloc_cpu unchanged. A big request takes the
// smallest cached block of at least its size and at most kReuseFactor times it, else a new
// mapping; freed blocks stay cached while the cache holds at most `limit` bytes, beyond which
// the largest cached blocks are unmapped. Thread-safe (one mutex). Built against the installed
// torch's c10 headers and loaded with ctypes; installed with c10::SetCPUAllocator.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace {

constexpr size_t kMinBlock = size_t(1) << 20;
constexpr size_t kHuge = size_t(2) << 20;  // the x86 huge-page size
// Sizes are rounded to 64 KiB: rounding to whole huge pages cost +85 MiB on a Q6_K model's
// weights (2.6 MB tensors in 4 MiB blocks).
constexpr size_t kGranule = size_t(64) << 10;
constexpr size_t kReuseFactor = 8;

struct Block {
  size_t size;
  bool huge;  // advised to huge pages (see acquire)
};

struct Stats {
  uint64_t mapped, peak_mapped, cached, hits, misses, unmapped;
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  CachingCpuAllocator(size_t limit, bool huge) : limit_(limit), huge_(huge) {}

  c10::DataPtr allocate(size_t n) override {
    void* p = n >= kMinBlock ? acquire(n) : c10::alloc_cpu(n);
    return {p, p, &Delete, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &Delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void Delete(void* p);

  void release(void* p) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) {  // a small block (tensors made before install keep their own deleter)
      c10::free_cpu(p);
      return;
    }
    Block b = it->second;
    live_.erase(it);
    free_.emplace(b.size, std::make_pair(p, b.huge));
    st_.cached += b.size;
    trim(limit_);
  }

  void empty() {
    std::lock_guard<std::mutex> g(mu_);
    trim(0);
  }

  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return st_;
  }

 private:
  void* acquire(size_t n) {
    size_t size = (n + kGranule - 1) / kGranule * kGranule;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first / kReuseFactor <= size) {
        auto [p, huge] = it->second;
        size_t got = it->first;
        st_.cached -= got;
        free_.erase(it);
        st_.hits++;
        if (huge_ && !huge && got >= kHuge) {
          // A block freed and asked for again holds activations, which are read many times
          // over: drop its 4 KiB pages so that its next use faults it in as 2 MiB pages. A new
          // block gets small pages, as a long-lived tensor touched in part (a KV cache) must:
          // 2 MiB pages would make it resident 2 MiB at a time.
          madvise(p, got, MADV_DONTNEED);
          madvise(p, got, MADV_HUGEPAGE);
          huge = true;
        }
        live_.emplace(p, Block{got, huge});
        return p;
      }
      st_.misses++;
    }
    // 2 MiB-aligned where it spans a huge page, so the kernel can back it with huge pages.
    size_t align = size >= kHuge ? kHuge : 4096;
    size_t span = size + align - 4096;
    auto* raw = static_cast<char*>(mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (raw == MAP_FAILED) {
      empty();  // give the cache back and try once more before failing
      raw = static_cast<char*>(mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
      TORCH_CHECK_WITH(OutOfMemoryError, raw != MAP_FAILED, "agentspeed caching allocator: cannot map ", size,
                       " bytes");
    }
    auto addr = reinterpret_cast<uintptr_t>(raw);
    auto* p = reinterpret_cast<char*>((addr + align - 1) / align * align);
    size_t head = p - raw, tail = span - head - size;
    if (head) munmap(raw, head);
    if (tail) munmap(p + size, tail);
    std::lock_guard<std::mutex> g(mu_);
    live_.emplace(p, Block{size, false});
    st_.mapped += size;
    if (st_.mapped > st_.peak_mapped) st_.peak_mapped = st_.mapped;
    return p;
  }

  // Unmap the largest cached blocks until at most `keep` bytes stay cached. (mu_ held)
  void trim(size_t keep) {
    while (st_.cached > keep && !free_.empty()) {
      auto it = std::prev(free_.end());
      munmap(it->second.first, it->first);
      st_.cached -= it->first;
      st_.mapped -= it->first;
      st_.unmapped += it->first;
      free_.erase(it);
    }
  }

  std::mutex mu_;
  std::multimap<size_t, std::pair<void*, bool>> free_;  // size -> cached block, huge
  std::unordered_map<void*, Block> live_;  // big block in use
  Stats st_{};
  size_t limit_;
  bool huge_;
};

CachingCpuAllocator* g_alloc = nullptr;

void CachingCpuAllocator::Delete(void* p) {
  if (p) g_alloc->release(p);
}

}  // namespace

extern "C" {

int agentspeed_host_alloc_abi() { return 1; }

// Install once per process (later calls only change nothing and return 0). Tensors allocated
// before keep the deleter of the allocator that made them, so installing late is safe.
int agentspeed_host_alloc_install(uint64_t limit_bytes, int huge_pages) {
  if (g_alloc) return 0;
  g_alloc = new CachingCpuAllocator(limit_bytes, huge_pages != 0);  // never freed: tensors may outlive any owner
  c10::SetCPUAllocator(g_alloc, /*priority=*/100);
  return 1;
}

void agentspeed_host_alloc_empty_cache() {
  if (g_alloc) g_alloc->empty();
}

// mapped, peak mapped, cached (free) bytes, hits, misses, unmapped bytes
void agentspeed_host_alloc_stats(uint64_t* out) {
  Stats s = g_alloc ? g_alloc->stats() : Stats{};
  out[0] = s.mapped;
  out[1] = s.peak_mapped;
  out[2] = s.cached;
  out[3] = s.hits;
  out[4] = s.misses;
  out[5] = s.unmapped;
}
}
