// See receiver.h for why this exists.
#include "receiver.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "crc32c.h"

namespace {

// One socket read at most; the CRC then runs while the bytes are in cache.
constexpr size_t kBuffer = 1 << 20;

int Dup(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }

// The thread sleeps in poll() until this much has queued (SO_RCVLOWAT),
// not until the first segment: it then wakes, reads, checksums and writes
// once per ~1 MiB instead of once per ~120 KB. Measured on the project VM,
// 64 MiB pulls between two processes, 4 alternating pairs of runs:
// 1.94-2.71 GB/s against 1.92-2.26 waking per segment, higher in 3 pairs
// and even in the 4th (marks of 256 and 512 KiB fell in between). The
// kernel grows the receive buffer to hold the mark, and still wakes a
// reader early when the socket runs short of memory.
constexpr int kLowWater = 1 << 20;

void SetLowWater(int sock, int bytes) { setsockopt(sock, SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof bytes); }

// Buffers outlive the pull that used them. A fresh 1 MiB buffer is 256 page
// faults on its first fill, and on the project VM a fault costs about
// 15 us: 3.7 ms per pull, about a tenth of a 64 MiB one. A few are kept
// for the pulls that follow (concurrent pulls take one each).
constexpr size_t kKeptBuffers = 4;
std::mutex kept_mu;
std::vector<uint8_t*> kept;

uint8_t* TakeBuffer() {
  {
    std::lock_guard<std::mutex> g(kept_mu);
    if (!kept.empty()) {
      uint8_t* b = kept.back();
      kept.pop_back();
      return b;
    }
  }
  return static_cast<uint8_t*>(std::malloc(kBuffer));
}

void GiveBack(uint8_t* b) {
  if (!b) return;
  {
    std::lock_guard<std::mutex> g(kept_mu);
    if (kept.size() < kKeptBuffers) {
      kept.push_back(b);
      return;
    }
  }
  std::free(b);
}

}  // namespace

// reserveReceiveBuffers(n) -> buffers now kept: fills the keep list with up
// to n touched buffers, so a daemon's first pull does not fault its buffer
// in (256 faults, about 3.7 ms on the project VM) while the consumer waits.
Napi::Value ReserveReceiveBuffers(const Napi::CallbackInfo& info) {
  size_t want = info.Length() > 0 && info[0].IsNumber() ? size_t(std::max(0.0, info[0].As<Napi::Number>().DoubleValue())) : 1;
  want = std::min(want, kKeptBuffers);
  size_t have;
  {
    std::lock_guard<std::mutex> g(kept_mu);
    have = kept.size();
  }
  // Touched outside the lock, so a receive thread ending meanwhile is not held up.
  for (; have < want; have++) {
    auto* b = static_cast<uint8_t*>(std::malloc(kBuffer));
    if (!b) break;
    for (size_t i = 0; i < kBuffer; i += 4096) b[i] = 0;
    GiveBack(b);
  }
  std::lock_guard<std::mutex> g(kept_mu);
  return Napi::Number::New(info.Env(), double(kept.size()));
}

Napi::Function FileReceiver::Init(Napi::Env env) {
  return DefineClass(env, "FileReceiver",
                     {
                         InstanceMethod("start", &FileReceiver::Start),
                         InstanceMethod("cancel", &FileReceiver::Cancel),
                         InstanceMethod("received", &FileReceiver::Received),
                     });
}

// new FileReceiver(socketFd, fileFd, offset, length, stallMs, crc,
//                  onDone(errno, received, crc, fileError))
// onDone runs once, from the loop: errno 0 means all `length` bytes were
// written at file[offset...] and `crc` extends the given one over them.
// Otherwise errno is the socket's (ETIMEDOUT: nothing arrived for stallMs;
// ECONNRESET: the peer closed early) or, with fileError true, the file's.
FileReceiver::FileReceiver(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FileReceiver>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 7 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber() ||
      !info[3].IsNumber() || !info[4].IsNumber() || !info[5].IsNumber() || !info[6].IsFunction()) {
    Napi::TypeError::New(env, "FileReceiver(socketFd, fileFd, offset, length, stallMs, crc, onDone)")
        .ThrowAsJavaScriptException();
    return;
  }
  offset_ = info[2].As<Napi::Number>().Int64Value();
  length_ = info[3].As<Napi::Number>().Int64Value();
  stall_ms_ = info[4].As<Napi::Number>().Int32Value();
  crc_ = info[5].As<Napi::Number>().Uint32Value();
  on_done_ = Napi::Persistent(info[6].As<Napi::Function>());
  sock_ = Dup(info[0].As<Napi::Number>().Int32Value());
  if (sock_ >= 0) file_ = Dup(info[1].As<Napi::Number>().Int32Value());
  if (sock_ < 0 || file_ < 0) {
    Napi::Error e = Napi::Error::New(env, "dup of a descriptor failed");
    e.Set("errno", Napi::Number::New(env, errno));
    if (sock_ >= 0) close(sock_);
    sock_ = -1;
    e.ThrowAsJavaScriptException();
    return;
  }
  async_ = new Napi::AsyncContext(env, "FileReceiver");
}

FileReceiver::~FileReceiver() {
  // Ref() is held while the thread runs, so only an environment being torn
  // down (process exit) gets here with it still running: stop it first, as
  // it uses this object.
  if (thread_.joinable()) {
    cancelled_.store(true);
    shutdown(sock_, SHUT_RDWR);
    thread_.join();
  }
  if (sock_ >= 0) close(sock_);
  if (file_ >= 0) close(file_);
  delete async_;
}

// start() -> 0 | -errno (then onDone is never called)
Napi::Value FileReceiver::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (active_ || sock_ < 0 || thread_.joinable()) return Napi::Number::New(env, -EALREADY);
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  async_handle_ = new uv_async_t;
  async_handle_->data = this;
  int rc = uv_async_init(loop, async_handle_, OnDone);
  if (rc != 0) {
    delete async_handle_;
    async_handle_ = nullptr;
    return Napi::Number::New(env, rc);
  }
  active_ = true;
  Ref();  // the thread and libuv point at us until OnDone
  thread_ = std::thread([this] { Run(); });
  return Napi::Number::New(env, 0);
}

// cancel(): stops without calling onDone. The socket is shut down (the
// sender would otherwise block on a full window); bytes the thread still
// writes land in a file the caller is discarding through its own fd.
Napi::Value FileReceiver::Cancel(const Napi::CallbackInfo& info) {
  if (active_ && !cancelled_.exchange(true)) shutdown(sock_, SHUT_RDWR);
  return info.Env().Undefined();
}

Napi::Value FileReceiver::Received(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), double(received_.load()));
}

void FileReceiver::Run() {
  uint8_t* buf = TakeBuffer();
  int64_t got = 0;
  uint32_t crc = crc_;
  int err = buf ? 0 : ENOMEM;
  bool file_err = false;
  // The last bytes must wake the thread too: the mark never exceeds what is left.
  int low = 1;
  // A peer sending slower than the mark fills per stall_ms_ is not silent:
  // a poll() that times out is followed by one more read before giving up.
  bool quiet = false;
  while (err == 0 && got < length_) {
    if (cancelled_.load()) {
      err = ECANCELED;
      break;
    }
    int64_t left = length_ - got;
    int mark = left < kLowWater ? int(left) : kLowWater;
    if (mark != low) SetLowWater(sock_, low = mark);
    size_t want = size_t(left) < kBuffer ? size_t(left) : kBuffer;
    ssize_t n = recv(sock_, buf, want, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        err = errno;
        break;
      }
      if (quiet) {
        err = ETIMEDOUT;
        break;
      }
      // Non-blocking (Node set it): wait for bytes, at most stall_ms_.
      pollfd p{sock_, POLLIN, 0};
      int r = poll(&p, 1, stall_ms_ > 0 ? stall_ms_ : -1);
      if (r == 0) quiet = true;
      else if (r < 0 && errno != EINTR) err = errno;
      continue;
    }
    quiet = false;
    if (n == 0) {
      err = cancelled_.load() ? ECANCELED : ECONNRESET;
      break;
    }
    crc = Crc32c(crc, buf, size_t(n));
    for (ssize_t w = 0; w < n;) {
      ssize_t k = pwrite(file_, buf + w, size_t(n - w), offset_ + got + w);
      if (k < 0) {
        if (errno == EINTR) continue;
        err = errno;
        file_err = true;
        break;
      }
      w += k;
    }
    if (err == 0) {
      got += n;
      received_.store(got);
    }
  }
  // The socket goes back to Node, whose reads expect the default mark.
  if (low != 1) SetLowWater(sock_, 1);
  GiveBack(buf);
  crc_ = crc;
  err_ = err;
  file_err_ = file_err;
  uv_async_send(async_handle_);
}

void FileReceiver::OnDone(uv_async_t* handle) {
  auto* self = static_cast<FileReceiver*>(handle->data);
  self->thread_.join();
  self->active_ = false;
  close(self->sock_);
  close(self->file_);
  self->sock_ = self->file_ = -1;
  uv_close(reinterpret_cast<uv_handle_t*>(handle), OnClose);
  self->async_handle_ = nullptr;
  if (!self->cancelled_.load()) {
    Napi::Env env = self->Env();
    Napi::HandleScope scope(env);
    self->on_done_.MakeCallback(self->Value(),
                                {Napi::Number::New(env, self->err_), Napi::Number::New(env, double(self->received_.load())),
                                 Napi::Number::New(env, self->crc_), Napi::Boolean::New(env, self->file_err_)},
                                *self->async_);
  }
  self->Unref();
}

void FileReceiver::OnClose(uv_handle_t* handle) { delete reinterpret_cast<uv_async_t*>(handle); }
