// Where a CPU forward's wall-clock time goes, on a machine without perf (the device tool's): a
// preloaded library that samples the main thread's instruction pointer on a timer and writes the
// samples and the process's memory map at exit; bench/profile/symbolize.py turns them into a
// profile. The main thread is the one that runs the forward and the master of every OpenMP team, so
// its samples follow the critical path: a parallel region's imbalance shows as time in libgomp.
//
//   VF_SAMPLER_OUT=samples.txt VF_SAMPLER_US=100 LD_PRELOAD=libvf_wallclock_sampler.so vf_bench ...
//   python3 bench/profile/symbolize.py samples.txt build/bench     # folders holding unstripped binaries
//
// Put LD_PRELOAD on the measured process itself (`timeout 60 env LD_PRELOAD=... vf_bench`): a wrapper
// that inherits it writes the same file last. Besides the sampled address, each sample keeps up to
// nine words of the interrupted stack that point into the main executable (likely return addresses),
// so time in JIT code (oneDNN's kernels, which have no symbols) is attributed to the vf function that
// called it. The signal handler only reads memory and stores words: nothing else runs in it.
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr long kMaxSamples = 1 << 21;
constexpr int kDepth = 10;  // the address, then up to nine stack words into the executable
uintptr_t samples[kMaxSamples][kDepth];
std::atomic<long> taken{0};
timer_t timer;
uintptr_t text_begin = 0, text_end = 0, stack_end = 0;

void on_tick(int, siginfo_t*, void* context) {
  const long i = taken.load(std::memory_order_relaxed);
  if (i >= kMaxSamples) return;
  const auto* uc = static_cast<const ucontext_t*>(context);
  uintptr_t* row = samples[i];
  row[0] = uintptr_t(uc->uc_mcontext.gregs[REG_RIP]);
  const auto* sp = reinterpret_cast<const uintptr_t*>(uc->uc_mcontext.gregs[REG_RSP]);
  int k = 1;
  for (int w = 0; w < 2048 && k < kDepth && uintptr_t(sp + w + 1) <= stack_end; ++w)
    if (sp[w] >= text_begin && sp[w] < text_end) row[k++] = sp[w];
  for (; k < kDepth; ++k) row[k] = 0;
  taken.store(i + 1, std::memory_order_relaxed);
}

// The executable's code and the main thread's stack, from /proc/self/maps.
void find_ranges() {
  char exe[4096] = {};
  if (readlink("/proc/self/exe", exe, sizeof exe - 1) <= 0) return;
  FILE* maps = std::fopen("/proc/self/maps", "r");
  if (!maps) return;
  char line[4096];
  while (std::fgets(line, sizeof line, maps)) {
    unsigned long begin, end;
    char perms[8] = {}, path[4096] = {};
    if (std::sscanf(line, "%lx-%lx %7s %*s %*s %*s %4095s", &begin, &end, perms, path) < 3) continue;
    if (perms[2] == 'x' && std::strcmp(path, exe) == 0) {
      if (!text_begin || begin < text_begin) text_begin = begin;
      if (end > text_end) text_end = end;
    }
    if (std::strcmp(path, "[stack]") == 0) stack_end = end;
  }
  std::fclose(maps);
}

__attribute__((constructor)) void start() {
  const char* out = std::getenv("VF_SAMPLER_OUT");
  if (!out) return;
  find_ranges();
  struct sigaction sa {};
  sa.sa_sigaction = on_tick;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGPROF, &sa, nullptr);
  sigevent ev{};
  ev.sigev_notify = SIGEV_THREAD_ID;  // this (the main) thread only
  ev.sigev_signo = SIGPROF;
  ev._sigev_un._tid = pid_t(syscall(SYS_gettid));
  if (timer_create(CLOCK_MONOTONIC, &ev, &timer) != 0) return;
  const char* us = std::getenv("VF_SAMPLER_US");
  const long period_ns = std::clamp(us ? std::atol(us) : 100L, 10L, 999999L) * 1000L;
  itimerspec every{{0, period_ns}, {0, period_ns}};
  timer_settime(timer, 0, &every, nullptr);
}

__attribute__((destructor)) void stop() {
  const char* out = std::getenv("VF_SAMPLER_OUT");
  if (!out) return;
  timer_delete(timer);
  FILE* f = std::fopen(out, "w");
  if (!f) return;
  FILE* maps = std::fopen("/proc/self/maps", "r");
  char line[4096];
  while (maps && std::fgets(line, sizeof line, maps)) std::fprintf(f, "M %s", line);
  if (maps) std::fclose(maps);
  for (long i = 0; i < taken.load(); ++i) {
    std::fputc('S', f);
    for (int k = 0; k < kDepth; ++k) std::fprintf(f, " %lx", static_cast<unsigned long>(samples[i][k]));
    std::fputc('\n', f);
  }
  std::fclose(f);
}

}  // namespace
