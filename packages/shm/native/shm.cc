// virtmesh_shm: MAP_SHARED file mappings exposed as external ArrayBuffers,
// page release (fallocate PUNCH_HOLE), allocated-bytes reporting, and a
// cross-process futex doorbell with an optional native waiter thread so the
// event loop never blocks.
//
// Argument validation with user-facing messages lives in src/index.ts; the
// checks here are a second line of defence so a bad call from JS can never
// turn into an out-of-bounds pointer.

#include <napi.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---------------------------------------------------------------------------
// errors

Napi::Error SysError(Napi::Env env, int err, const char* syscall, const std::string& path) {
  std::string msg = std::string(syscall);
  if (!path.empty()) msg += "(" + path + ")";
  msg += ": ";
  const char* name = nullptr;
  switch (err) {
    case EEXIST: name = "EEXIST"; break;
    case ENOENT: name = "ENOENT"; break;
    case EACCES: name = "EACCES"; break;
    case EPERM: name = "EPERM"; break;
    case ENOMEM: name = "ENOMEM"; break;
    case ENOSPC: name = "ENOSPC"; break;
    case EINVAL: name = "EINVAL"; break;
    case EOPNOTSUPP: name = "EOPNOTSUPP"; break;
    case EISDIR: name = "EISDIR"; break;
    case ENOTDIR: name = "ENOTDIR"; break;
    case EFBIG: name = "EFBIG"; break;
    case EFAULT: name = "EFAULT"; break;
    case EMFILE: name = "EMFILE"; break;
    default: name = "E?"; break;
  }
  msg += name;
  msg += " (";
  msg += strerror(err);
  msg += ")";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, name));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("syscall", Napi::String::New(env, syscall));
  if (!path.empty()) e.Set("path", Napi::String::New(env, path));
  return e;
}

// Reads a JS number that must be a non-negative safe integer.
uint64_t ToU64(const Napi::Value& v, const char* what) {
  Napi::Env env = v.Env();
  if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string(what) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d < 0 || std::floor(d) != d || d > 9007199254740991.0) {
    throw Napi::RangeError::New(env, std::string(what) + " must be a non-negative safe integer");
  }
  return static_cast<uint64_t>(d);
}

const uint64_t kPageSize = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));

// ---------------------------------------------------------------------------
// Region: one mmap of one file. Shared by the Mapping wrapper, every external
// ArrayBuffer handed to JS (through the finalizer hint) and every Futex on it,
// so the memory stays mapped while anything can still reach it, unless JS
// unmaps explicitly (then the ArrayBuffers are detached first).

struct Region {
  std::mutex mu;
  uint8_t* addr = nullptr;
  uint64_t len = 0;
  int fd = -1;
  std::string path;
  std::atomic<int> futexPins{0};

  void Release() {
    std::lock_guard<std::mutex> g(mu);
    if (addr != nullptr) {
      munmap(addr, len);
      addr = nullptr;
    }
    if (fd >= 0) {
      close(fd);
      fd = -1;
    }
  }
  ~Region() { Release(); }
};

using RegionRef = std::shared_ptr<Region>;

// ---------------------------------------------------------------------------
// Mapping

class Mapping : public Napi::ObjectWrap<Mapping> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "Mapping",
                       {
                           InstanceMethod<&Mapping::Buffer>("buffer"),
                           InstanceMethod<&Mapping::Unmap>("unmap"),
                           InstanceMethod<&Mapping::PunchHole>("punchHole"),
                           InstanceMethod<&Mapping::AllocatedBytes>("allocatedBytes"),
                           InstanceMethod<&Mapping::FileSize>("fileSize"),
                           InstanceMethod<&Mapping::IsMapped>("isMapped"),
                           InstanceMethod<&Mapping::DataSegments>("dataSegments"),
                       });
  }

  // new Mapping(path, size, create, mode)
  explicit Mapping(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Mapping>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 4 || !info[0].IsString() || !info[2].IsBoolean()) {
      throw Napi::TypeError::New(env, "Mapping(path: string, size: number, create: boolean, mode: number)");
    }
    std::string path = info[0].As<Napi::String>().Utf8Value();
    uint64_t size = ToU64(info[1], "size");
    bool create = info[2].As<Napi::Boolean>().Value();
    uint64_t mode = ToU64(info[3], "mode");
    if (size == 0) throw Napi::RangeError::New(env, "size must be > 0");
    if (mode > 07777) throw Napi::RangeError::New(env, "mode must be <= 0o7777");
    if (path.find('\0') != std::string::npos) throw Napi::TypeError::New(env, "path must not contain NUL");

    int flags = O_RDWR | O_CLOEXEC | (create ? (O_CREAT | O_EXCL) : 0);
    int fd = open(path.c_str(), flags, static_cast<mode_t>(mode));
    if (fd < 0) throw SysError(env, errno, "open", path);
    auto fail = [&](int err, const char* sc) {
      close(fd);
      if (create) unlink(path.c_str());
      return SysError(env, err, sc, path);
    };
    struct stat st;
    if (fstat(fd, &st) != 0) throw fail(errno, "fstat");
    if (!S_ISREG(st.st_mode)) {
      close(fd);
      throw Napi::TypeError::New(env, "mapFile: " + path + " is not a regular file");
    }
    if (create) {
      // The umask must not weaken or strengthen the mode the caller asked for.
      if (fchmod(fd, static_cast<mode_t>(mode)) != 0) throw fail(errno, "fchmod");
      if (ftruncate(fd, static_cast<off_t>(size)) != 0) throw fail(errno, "ftruncate");
    } else if (static_cast<uint64_t>(st.st_size) < size) {
      // Touching a page past EOF of a shared file mapping raises SIGBUS.
      close(fd);
      throw Napi::RangeError::New(env, "mapFile: " + path + " is " + std::to_string(st.st_size) +
                                           " bytes, smaller than the requested size " + std::to_string(size));
    }
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) throw fail(errno, "mmap");
    region_ = std::make_shared<Region>();
    region_->addr = static_cast<uint8_t*>(p);
    region_->len = size;
    region_->fd = fd;
    region_->path = path;
  }

  RegionRef region() const { return region_; }

 private:
  Region& Live(Napi::Env env, const char* op) {
    if (!region_ || region_->addr == nullptr) {
      throw Napi::Error::New(env, std::string(op) + ": mapping has been unmapped");
    }
    return *region_;
  }

  // buffer(offset, length): an external ArrayBuffer over [offset, offset+length).
  Napi::Value Buffer(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Region& r = Live(env, "buffer");
    uint64_t off = ToU64(info[0], "offset");
    uint64_t len = ToU64(info[1], "length");
    if (off > r.len || len > r.len - off) throw Napi::RangeError::New(env, "buffer: range outside the mapping");
    auto* hint = new RegionRef(region_);
    // If creation fails (length above the engine's limit, see
    // buffer.constants.MAX_LENGTH), Node 20 has already run the finalizer,
    // which deleted the hint; other versions may not. Leaking one shared_ptr
    // on that error path is preferred to a double free, and src/index.ts
    // checks the limit first.
    // (Raw N-API here: node-addon-api's wrapper frees its own finalizer data
    // on that error path too, which Node already freed.)
    napi_value raw;
    napi_status st = napi_create_external_arraybuffer(
        env, r.addr + off, len, [](napi_env, void*, void* h) { delete static_cast<RegionRef*>(h); }, hint, &raw);
    if (st != napi_ok) {
      if (env.IsExceptionPending()) throw env.GetAndClearPendingException();
      throw Napi::RangeError::New(env, "buffer: cannot create an ArrayBuffer of " + std::to_string(len) + " bytes");
    }
    Napi::ArrayBuffer ab(env, raw);
    // Drop references to buffers the GC already collected, then remember this
    // one weakly so unmap() can detach it.
    std::vector<Napi::Reference<Napi::ArrayBuffer>> live;
    for (auto& ref : views_) {
      if (!ref.IsEmpty() && !ref.Value().IsEmpty()) live.emplace_back(std::move(ref));
    }
    views_ = std::move(live);
    views_.emplace_back(Napi::Weak(ab));
    return ab;
  }

  // unmap(): detach every ArrayBuffer still alive, then munmap and close.
  Napi::Value Unmap(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!region_ || region_->addr == nullptr) return env.Undefined();
    int pins = region_->futexPins.load();
    if (pins > 0) {
      throw Napi::Error::New(env, "unmap: " + std::to_string(pins) +
                                      " doorbell(s) still use this mapping; close them first");
    }
    for (auto& ref : views_) {
      if (ref.IsEmpty()) continue;
      Napi::ArrayBuffer ab = ref.Value();
      if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
    }
    views_.clear();
    region_->Release();
    return env.Undefined();
  }

  // punchHole(offset, length): give the pages back to the host. The file keeps
  // its size; every mapping of it reads zeros in the range afterwards.
  Napi::Value PunchHole(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Region& r = Live(env, "releaseRange");
    uint64_t off = ToU64(info[0], "offset");
    uint64_t len = ToU64(info[1], "length");
    if (off > r.len || len > r.len - off) throw Napi::RangeError::New(env, "releaseRange: range outside the mapping");
    if (len == 0) return env.Undefined();
    if (fallocate(r.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                  static_cast<off_t>(len)) != 0) {
      int err = errno;
      // Filesystems without hole punching: MADV_REMOVE does the same through
      // the mapping where it is supported (tmpfs, shmem).
      if (err != EOPNOTSUPP || madvise(r.addr + off, len, MADV_REMOVE) != 0) {
        throw SysError(env, err, "fallocate", r.path);
      }
    }
    return env.Undefined();
  }

  Napi::Value AllocatedBytes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Region& r = Live(env, "allocatedBytes");
    struct stat st;
    if (fstat(r.fd, &st) != 0) throw SysError(env, errno, "fstat", r.path);
    return Napi::Number::New(env, static_cast<double>(st.st_blocks) * 512.0);
  }

  Napi::Value FileSize(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Region& r = Live(env, "fileSize");
    struct stat st;
    if (fstat(r.fd, &st) != 0) throw SysError(env, errno, "fstat", r.path);
    return Napi::Number::New(env, static_cast<double>(st.st_size));
  }

  // [start, end) pairs of the file's data in [offset, offset + length), from
  // lseek(SEEK_DATA / SEEK_HOLE): what lies between them is holes, which read as zeros
  // without touching (on tmpfs: allocating) a page.
  Napi::Value DataSegments(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Region& r = Live(env, "dataSegments");
    if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) {
      Napi::TypeError::New(env, "dataSegments(offset, length)").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    off_t pos = static_cast<off_t>(info[0].As<Napi::Number>().DoubleValue());
    off_t end = pos + static_cast<off_t>(info[1].As<Napi::Number>().DoubleValue());
    Napi::Array out = Napi::Array::New(env);
    uint32_t n = 0;
    while (pos < end) {
      off_t data = lseek(r.fd, pos, SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) break;  // no data past pos
        throw SysError(env, errno, "lseek(SEEK_DATA)", r.path);
      }
      if (data >= end) break;
      off_t hole = lseek(r.fd, data, SEEK_HOLE);
      if (hole < 0) throw SysError(env, errno, "lseek(SEEK_HOLE)", r.path);
      if (hole > end) hole = end;
      out.Set(n++, Napi::Number::New(env, static_cast<double>(data)));
      out.Set(n++, Napi::Number::New(env, static_cast<double>(hole)));
      pos = hole;
    }
    return out;
  }

  Napi::Value IsMapped(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), region_ && region_->addr != nullptr);
  }

  RegionRef region_;
  std::vector<Napi::Reference<Napi::ArrayBuffer>> views_;
};

// ---------------------------------------------------------------------------
// Futex: a 32-bit word in a MAP_SHARED mapping. No FUTEX_PRIVATE_FLAG, so the
// kernel keys the futex on (inode, offset) and a wake in one process reaches a
// waiter in another.

long Futex(uint32_t* addr, int op, uint32_t val, const struct timespec* ts, uint32_t val3) {
  return syscall(SYS_futex, addr, op, val, ts, nullptr, val3);
}

enum WaitStatus { kWoken = 0, kTimedOut = 1, kValueChanged = 2 };

class FutexWord : public Napi::ObjectWrap<FutexWord> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "FutexWord",
                       {
                           InstanceMethod<&FutexWord::Wake>("wake"),
                           InstanceMethod<&FutexWord::WaitSync>("waitSync"),
                           InstanceMethod<&FutexWord::Arm>("arm"),
                           InstanceMethod<&FutexWord::Settle>("settle"),
                           InstanceMethod<&FutexWord::Close>("close"),
                       });
  }

  // new FutexWord(mapping, byteOffset, onWake(status))
  explicit FutexWord(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FutexWord>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 3 || !info[0].IsObject() || !info[2].IsFunction()) {
      throw Napi::TypeError::New(env, "FutexWord(mapping: Mapping, byteOffset: number, onWake: Function)");
    }
    Napi::Object mobj = info[0].As<Napi::Object>();
    Mapping* m = Mapping::Unwrap(mobj);
    if (m == nullptr) throw Napi::TypeError::New(env, "FutexWord: first argument is not a Mapping");
    uint64_t off = ToU64(info[1], "byteOffset");
    region_ = m->region();
    if (!region_ || region_->addr == nullptr) throw Napi::Error::New(env, "FutexWord: mapping has been unmapped");
    if (off % 4 != 0 || off + 4 > region_->len) {
      throw Napi::RangeError::New(env, "FutexWord: byteOffset must be 4-aligned and inside the mapping");
    }
    word_ = reinterpret_cast<uint32_t*>(region_->addr + off);
    region_->futexPins.fetch_add(1);
    // Weak: the callback (a closure over the JS Doorbell) must not be kept
    // alive by the native side, or a Doorbell dropped without close() could
    // never be collected.
    napi_ref ref;
    NAPI_THROW_IF_FAILED_VOID(env, napi_create_reference(env, info[2], 0, &ref));
    onWake_ = new WakeTarget{ref};
    std::random_device rd;
    ownBit_ = 1u << (rd() % 32);
    napi_add_env_cleanup_hook(env, &FutexWord::CleanupHook, this);
    hookInstalled_ = true;
  }

  ~FutexWord() override {
    Stop();
    if (hookInstalled_) {
      napi_remove_env_cleanup_hook(Env(), &FutexWord::CleanupHook, this);
      hookInstalled_ = false;
    }
    if (!tsfnOwnsTarget_ && onWake_ != nullptr) {
      napi_delete_reference(Env(), onWake_->fn);
      delete onWake_;
    }
  }

 private:
  static void CallJs(napi_env env, napi_value, void* context, void* data) {
    int* p = static_cast<int*>(data);
    int status = *p;
    delete p;
    if (env == nullptr) return;  // tsfn torn down with calls still queued
    auto* target = static_cast<WakeTarget*>(context);
    napi_value fn = nullptr;
    if (napi_get_reference_value(env, target->fn, &fn) != napi_ok || fn == nullptr) return;
    napi_value arg, global, result;
    napi_create_int32(env, status, &arg);
    napi_get_global(env, &global);
    napi_call_function(env, global, fn, 1, &arg, &result);
  }

  static void FinalizeTsfn(napi_env env, void*, void* hint) {
    auto* target = static_cast<WakeTarget*>(hint);
    napi_delete_reference(env, target->fn);
    delete target;
  }

  static void CleanupHook(void* arg) {
    auto* self = static_cast<FutexWord*>(arg);
    self->hookInstalled_ = false;
    // The environment is going away: Node tears the thread-safe function down
    // itself, so only stop and join the thread.
    self->Stop(/*envTeardown=*/true);
  }

  void Check(Napi::Env env, const char* op) {
    if (closed_) throw Napi::Error::New(env, std::string(op) + ": doorbell is closed");
  }

  // wake(): wake every waiter on the word, in any process. Returns how many.
  Napi::Value Wake(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Check(env, "ring");
    long n = Futex(word_, FUTEX_WAKE, INT_MAX, nullptr, 0);
    if (n < 0) throw SysError(env, errno, "futex(FUTEX_WAKE)", region_->path);
    return Napi::Number::New(env, static_cast<double>(n));
  }

  // waitSync(expected, timeoutMs): block this thread while *word == expected.
  // timeoutMs < 0 means no timeout. Returns a WaitStatus.
  Napi::Value WaitSync(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Check(env, "waitSync");
    if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) {
      throw Napi::TypeError::New(env, "waitSync(expected: number, timeoutMs: number)");
    }
    uint32_t expected = info[0].As<Napi::Number>().Uint32Value();
    double ms = info[1].As<Napi::Number>().DoubleValue();
    struct timespec deadline;
    const struct timespec* dl = nullptr;
    if (ms >= 0 && std::isfinite(ms)) {
      clock_gettime(CLOCK_MONOTONIC, &deadline);
      double ns = std::floor(ms * 1e6);
      deadline.tv_sec += static_cast<time_t>(ns / 1e9);
      deadline.tv_nsec += static_cast<long>(std::fmod(ns, 1e9));
      if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
      }
      dl = &deadline;
    }
    for (;;) {
      // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, so a
      // retry after EINTR does not extend the timeout.
      long rc = Futex(word_, FUTEX_WAIT_BITSET, expected, dl, FUTEX_BITSET_MATCH_ANY);
      if (rc == 0) return Napi::Number::New(env, kWoken);
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return Napi::Number::New(env, kValueChanged);
      if (errno == ETIMEDOUT) return Napi::Number::New(env, kTimedOut);
      throw SysError(env, errno, "futex(FUTEX_WAIT_BITSET)", region_->path);
    }
  }

  // arm(expected): the waiter thread blocks while *word == expected, then
  // calls onWake(status) on the JS thread. While armed the doorbell keeps the
  // event loop alive (like a socket with a pending read); settle() lets go.
  Napi::Value Arm(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Check(env, "wait");
    if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "arm(expected: number)");
    uint32_t expected = info[0].As<Napi::Number>().Uint32Value();
    if (!thread_.joinable()) StartThread(env);
    napi_ref_threadsafe_function(env, tsfn_);
    {
      std::lock_guard<std::mutex> g(mu_);
      if (armed_) throw Napi::Error::New(env, "wait: already armed");
      armed_ = true;
      expected_ = expected;
    }
    cv_.notify_one();
    return env.Undefined();
  }

  Napi::Value Settle(const Napi::CallbackInfo& info) {
    if (!closed_ && tsfn_ != nullptr) napi_unref_threadsafe_function(info.Env(), tsfn_);
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Stop();
    if (hookInstalled_) {
      napi_remove_env_cleanup_hook(info.Env(), &FutexWord::CleanupHook, this);
      hookInstalled_ = false;
    }
    return info.Env().Undefined();
  }

  void StartThread(Napi::Env env) {
    // No JS function: CallJs looks the weak callback up each time. The tsfn
    // owns onWake_ from here on and frees it in its finalizer.
    napi_value name = Napi::String::New(env, "virtmesh-doorbell-waiter");
    NAPI_THROW_IF_FAILED_VOID(env, napi_create_threadsafe_function(env, nullptr, nullptr, name, 0, 1, nullptr,
                                                                   &FutexWord::FinalizeTsfn, onWake_,
                                                                   &FutexWord::CallJs, &tsfn_));
    tsfnOwnsTarget_ = true;
    napi_unref_threadsafe_function(env, tsfn_);
    threadExited_.store(false);
    thread_ = std::thread([this] { ThreadMain(); });
  }

  void ThreadMain() {
    for (;;) {
      uint32_t expected;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [this] { return armed_ || stopping_; });
        if (stopping_) break;
        expected = expected_;
      }
      int status = kWoken;
      for (;;) {
        // Wait with our own bit so Stop() can wake this thread alone; ring()
        // uses FUTEX_WAKE, which matches every bit.
        long rc = Futex(word_, FUTEX_WAIT_BITSET, expected, nullptr, ownBit_);
        if (rc == 0) break;
        if (errno == EINTR) continue;
        status = errno == EAGAIN ? kValueChanged : -errno;
        break;
      }
      bool stop;
      {
        std::lock_guard<std::mutex> g(mu_);
        armed_ = false;
        stop = stopping_;
      }
      if (stop) break;
      auto* st = new int(status);
      if (napi_call_threadsafe_function(tsfn_, st, napi_tsfn_nonblocking) != napi_ok) delete st;
    }
    threadExited_.store(true);
  }

  // Stops the waiter thread (if any) and unpins the mapping. Safe to call more
  // than once and from the env cleanup hook.
  void Stop(bool envTeardown = false) {
    if (closed_) return;
    closed_ = true;
    if (thread_.joinable()) {
      {
        std::lock_guard<std::mutex> g(mu_);
        stopping_ = true;
      }
      cv_.notify_one();
      // The thread may be between its stopping_ check and FUTEX_WAIT, so a
      // single wake could be lost: repeat until it has left. Only waiters
      // whose bitset shares ownBit_ are disturbed (they re-check and sleep).
      while (!threadExited_.load()) {
        Futex(word_, FUTEX_WAKE_BITSET, INT_MAX, nullptr, ownBit_);
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      thread_.join();
      if (!envTeardown) napi_release_threadsafe_function(tsfn_, napi_tsfn_release);
    }
    if (region_) {
      region_->futexPins.fetch_sub(1);
      region_.reset();
    }
  }

  RegionRef region_;
  uint32_t* word_ = nullptr;
  uint32_t ownBit_ = 1;
  struct WakeTarget {
    napi_ref fn;  // weak
  };
  WakeTarget* onWake_ = nullptr;
  bool tsfnOwnsTarget_ = false;
  napi_threadsafe_function tsfn_ = nullptr;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool armed_ = false;
  bool stopping_ = false;
  uint32_t expected_ = 0;
  std::atomic<bool> threadExited_{true};
  bool closed_ = false;
  bool hookInstalled_ = false;
};

// --- crc32c (Castagnoli) over guest memory: the migration's memory digest ---
// The SSE4.2 crc32 instruction where the CPU has it (about 8 bytes a cycle), else
// slicing-by-8 tables; both give the same value (RFC 3720's crc32c).
uint32_t crcTable[8][256];

void initCrcTables() {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    crcTable[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; i++) {
    for (int t = 1; t < 8; t++) crcTable[t][i] = (crcTable[t - 1][i] >> 8) ^ crcTable[0][crcTable[t - 1][i] & 0xff];
  }
}

uint32_t crc32cSoft(uint32_t crc, const uint8_t* p, size_t n) {
  crc = ~crc;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = crcTable[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    n--;
  }
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    w ^= crc;
    crc = crcTable[7][w & 0xff] ^ crcTable[6][(w >> 8) & 0xff] ^ crcTable[5][(w >> 16) & 0xff] ^ crcTable[4][(w >> 24) & 0xff] ^
          crcTable[3][(w >> 32) & 0xff] ^ crcTable[2][(w >> 40) & 0xff] ^ crcTable[1][(w >> 48) & 0xff] ^ crcTable[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = crcTable[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc32cHard(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = ~crc;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = __builtin_ia32_crc32qi(static_cast<uint32_t>(c), *p++);
    n--;
  }
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    c = __builtin_ia32_crc32di(c, w);
    p += 8;
    n -= 8;
  }
  while (n--) c = __builtin_ia32_crc32qi(static_cast<uint32_t>(c), *p++);
  return ~static_cast<uint32_t>(c);
}
const bool kHardCrc = __builtin_cpu_supports("sse4.2");
#else
const bool kHardCrc = false;
uint32_t crc32cHard(uint32_t crc, const uint8_t* p, size_t n) { return crc32cSoft(crc, p, n); }
#endif

// crc32c(data: ArrayBuffer | TypedArray view, offset, length, seed) -> number
Napi::Value Crc32c(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsNumber()) {
    Napi::TypeError::New(env, "crc32c(data, offset, length, seed)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  const uint8_t* base = nullptr;
  size_t size = 0;
  if (info[0].IsArrayBuffer()) {
    auto ab = info[0].As<Napi::ArrayBuffer>();
    base = static_cast<const uint8_t*>(ab.Data());
    size = ab.ByteLength();
  } else if (info[0].IsTypedArray()) {
    auto ta = info[0].As<Napi::TypedArray>();
    base = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    size = ta.ByteLength();
  } else {
    Napi::TypeError::New(env, "crc32c: data must be an ArrayBuffer or a typed array").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  double off = info[1].As<Napi::Number>().DoubleValue();
  double len = info[2].As<Napi::Number>().DoubleValue();
  uint32_t seed = info[3].As<Napi::Number>().Uint32Value();
  if (!(off >= 0 && len >= 0 && off + len <= static_cast<double>(size)) || std::floor(off) != off || std::floor(len) != len) {
    Napi::RangeError::New(env, "crc32c: offset and length must lie within the data").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  const uint8_t* p = base + static_cast<size_t>(off);
  uint32_t c = kHardCrc ? crc32cHard(seed, p, static_cast<size_t>(len)) : crc32cSoft(seed, p, static_cast<size_t>(len));
  return Napi::Number::New(env, c);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  initCrcTables();
  exports.Set("Mapping", Mapping::Init(env));
  exports.Set("FutexWord", FutexWord::Init(env));
  exports.Set("pageSize", Napi::Number::New(env, static_cast<double>(kPageSize)));
  exports.Set("crc32c", Napi::Function::New(env, Crc32c, "crc32c"));
  return exports;
}

}  // namespace

NODE_API_MODULE(virtmesh_shm, Init)
