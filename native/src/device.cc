// See device.h for why the channel looks the way it does.
#include "device.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cstring>

namespace {

// Debian 12 ships 6.1 uapi headers, older than passthrough (6.9), so the
// ioctl numbers are spelled out here: _IOW(229, 1, struct fuse_backing_map)
// and _IOW(229, 2, uint32_t).
struct fuse_backing_map_compat {
  int32_t fd;
  uint32_t flags;
  uint64_t padding;
};
constexpr unsigned long kBackingOpen = _IOW(229, 1, fuse_backing_map_compat);
constexpr unsigned long kBackingClose = _IOW(229, 2, uint32_t);

struct fuse_out_header_compat {
  uint32_t len;
  int32_t error;
  uint64_t unique;
};

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

// Each reply must be a single writev: the kernel treats one write as one
// message.  ENOENT means the request was interrupted or aborted and is not an
// error for the caller to act on.
int WriteAll(int fd, iovec* iov, int cnt) {
  for (;;) {
    ssize_t n = writev(fd, iov, cnt);
    if (n >= 0) return 0;
    if (errno == EINTR) continue;
    return -errno;
  }
}

}  // namespace

Napi::Function FuseDevice::Init(Napi::Env env) {
  return DefineClass(env, "FuseDevice",
                     {
                         InstanceMethod("start", &FuseDevice::Start),
                         InstanceMethod("stop", &FuseDevice::Stop),
                         InstanceMethod("reply", &FuseDevice::Reply),
                         InstanceMethod("replyFromFd", &FuseDevice::ReplyFromFd),
                         InstanceMethod("backingOpen", &FuseDevice::BackingOpen),
                         InstanceMethod("backingClose", &FuseDevice::BackingClose),
                         InstanceMethod("setSpin", &FuseDevice::SetSpin),
                         InstanceMethod("ref", &FuseDevice::LoopRef),
                         InstanceMethod("unref", &FuseDevice::LoopUnref),
                     });
}

// new FuseDevice(fd, bufferSize, onRequest(buf), onError(errno))
FuseDevice::FuseDevice(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FuseDevice>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsFunction() ||
      !info[3].IsFunction()) {
    Napi::TypeError::New(env, "FuseDevice(fd, bufferSize, onRequest, onError)").ThrowAsJavaScriptException();
    return;
  }
  fd_ = info[0].As<Napi::Number>().Int32Value();
  size_t size = info[1].As<Napi::Number>().Uint32Value();
  in_.resize(size);
  out_.resize(size);
  on_request_ = Napi::Persistent(info[2].As<Napi::Function>());
  on_error_ = Napi::Persistent(info[3].As<Napi::Function>());
  async_ = new Napi::AsyncContext(env, "FuseDevice");
}

FuseDevice::~FuseDevice() {
  delete async_;
  // The poll handle is closed by Stop(); if JS forgot, leak it rather than
  // free memory libuv still references.
}

Napi::Value FuseDevice::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (running_) return env.Undefined();
  int flags = fcntl(fd_, F_GETFL);
  if (flags < 0 || fcntl(fd_, F_SETFL, flags | O_NONBLOCK) < 0) {
    return Napi::Number::New(env, -errno);
  }
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  poll_ = new uv_poll_t;
  poll_->data = this;
  int rc = uv_poll_init(loop, poll_, fd_);
  if (rc == 0) rc = uv_poll_start(poll_, UV_READABLE, OnPoll);
  if (rc != 0) {
    delete poll_;
    poll_ = nullptr;
    return Napi::Number::New(env, rc);
  }
  idle_ = new uv_idle_t;
  idle_->data = this;
  uv_idle_init(loop, idle_);
  running_ = true;
  Ref();  // keep the JS object alive while libuv points at it
  return Napi::Number::New(env, 0);
}

Napi::Value FuseDevice::Stop(const Napi::CallbackInfo& info) {
  StopPolling();
  return info.Env().Undefined();
}

void FuseDevice::StopPolling() {
  if (!running_) return;
  running_ = false;
  uv_poll_stop(poll_);
  uv_close(reinterpret_cast<uv_handle_t*>(poll_), OnClose);
  poll_ = nullptr;
  uv_idle_stop(idle_);
  uv_close(reinterpret_cast<uv_handle_t*>(idle_), OnIdleClose);
  idle_ = nullptr;
  Unref();
}

void FuseDevice::OnClose(uv_handle_t* handle) { delete reinterpret_cast<uv_poll_t*>(handle); }

void FuseDevice::OnIdleClose(uv_handle_t* handle) { delete reinterpret_cast<uv_idle_t*>(handle); }

// Runs once per loop turn while spinning; the poll phase of the same turn
// (with a zero timeout, as an idle handle is active) finds any new request.
void FuseDevice::OnIdle(uv_idle_t* handle) {
  auto* self = static_cast<FuseDevice*>(handle->data);
  if (NowNs() < self->spin_until_ns_) return;
  uv_idle_stop(handle);
  self->misses_++;
}

void FuseDevice::OnPoll(uv_poll_t* handle, int status, int events) {
  auto* self = static_cast<FuseDevice*>(handle->data);
  if (status < 0) {
    self->Fail(-status);
    return;
  }
  self->Drain();
}

void FuseDevice::Drain() {
  Napi::Env env = Env();
  Napi::HandleScope scope(env);
  NoteArrival();
  // A bounded batch keeps other loop work (sockets, timers) from starving.
  int budget = 64;
  bool got = false;
  uint64_t until = 0;  // end of this spin window, once one has begun
  while (running_ && budget > 0) {
    ssize_t n = read(fd_, in_.data(), in_.size());
    if (n > 0) {
      budget--;
      got = true;
      if (until != 0) misses_ = 0;  // the window caught one
      until = 0;
      Emit(size_t(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == ENOENT) continue;  // request aborted before we read it
    if (n < 0 && errno == EAGAIN) {
      if (!got || !running_ || spin_ns_ == 0 || misses_ >= kMaxMisses) return;
      if (until == 0) {
        until = NowNs() + spin_ns_;
        if (uv_is_active(reinterpret_cast<uv_handle_t*>(idle_))) uv_idle_stop(idle_);
      }
      if (NowNs() >= until) {
        misses_++;
        return;
      }
      // The loop has other work (a socket, a finished thread-pool job, a
      // due timer, an immediate): let it run, spinning there instead of
      // here until the window ends.
      if (LoopHasWork()) return SpinInLoop(until);
      continue;
    }
    Fail(n == 0 ? ENODEV : errno);  // ENODEV: the file system was unmounted
    return;
  }
  if (got && running_ && spin_ns_ != 0 && misses_ < kMaxMisses) SpinInLoop(NowNs() + spin_ns_);
}

// The device turned readable: a request caught while the loop spun, or one
// that came so soon after a reply that a window would have caught it, means
// the caller is issuing requests back to back: spinning pays again.
void FuseDevice::NoteArrival() {
  if (spin_ns_ == 0) return;
  if (uv_is_active(reinterpret_cast<uv_handle_t*>(idle_)) || NowNs() - last_reply_ns_ < spin_ns_) misses_ = 0;
}

// Keeps the event loop from sleeping until `until` (OnIdle stops it).
void FuseDevice::SpinInLoop(uint64_t until) {
  spin_until_ns_ = until;
  if (!uv_is_active(reinterpret_cast<uv_handle_t*>(idle_))) uv_idle_start(idle_, OnIdle);
}

// Anything for the loop besides /dev/fuse? Its epoll descriptor reads as
// ready when any descriptor it watches is; a zero backend timeout means a
// timer is due or an immediate is queued.
bool FuseDevice::LoopHasWork() {
  uv_loop_t* loop = poll_->loop;
  uv_update_time(loop);
  if (uv_backend_timeout(loop) == 0) return true;
  // A request of our own also makes it ready: that one is read here.
  pollfd p[2] = {{uv_backend_fd(loop), POLLIN, 0}, {fd_, POLLIN, 0}};
  return poll(p, 2, 0) > 0 && (p[1].revents & POLLIN) == 0;
}

void FuseDevice::Emit(size_t n) {
  Napi::Env env = Env();
  Napi::HandleScope scope(env);
  Napi::Buffer<uint8_t> buf = Napi::Buffer<uint8_t>::Copy(env, in_.data(), n);
  // MakeCallback runs the microtask queue afterwards, so promise-based
  // handlers make progress without waiting for the next loop turn.
  on_request_.MakeCallback(Value(), {buf}, *async_);
  if (env.IsExceptionPending()) {
    // An exception out of a handler must not take the channel down.
    Napi::Error e = env.GetAndClearPendingException();
    fprintf(stderr, "dyad-fs: request handler threw: %s\n", e.Message().c_str());
  }
}

void FuseDevice::Fail(int err) {
  Napi::Env env = Env();
  Napi::HandleScope scope(env);
  StopPolling();
  on_error_.MakeCallback(Value(), {Napi::Number::New(env, err)}, *async_);
}

// reply(buffers: Buffer[]) -> 0 | -errno
Napi::Value FuseDevice::Reply(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) {
    Napi::TypeError::New(env, "reply(buffers[])").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Array arr = info[0].As<Napi::Array>();
  uint32_t cnt = arr.Length();
  iovec iov[16];
  if (cnt == 0 || cnt > 16) {
    Napi::RangeError::New(env, "reply takes 1..16 buffers").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  for (uint32_t i = 0; i < cnt; i++) {
    Napi::Value v = arr[i];
    if (!v.IsTypedArray()) {
      Napi::TypeError::New(env, "reply buffers must be Uint8Array").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    Napi::Uint8Array b = v.As<Napi::Uint8Array>();
    iov[i].iov_base = b.Data();
    iov[i].iov_len = b.ByteLength();
  }
  int rc = WriteAll(fd_, iov, int(cnt));
  last_reply_ns_ = NowNs();
  return Napi::Number::New(env, rc);
}

// replyFromFd(unique: bigint, fd, offset: number, size) -> bytes sent | -errno
// Serves a READ without the payload ever becoming a JS object.
Napi::Value FuseDevice::ReplyFromFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool lossless = false;
  uint64_t unique = info[0].As<Napi::BigInt>().Uint64Value(&lossless);
  int fd = info[1].As<Napi::Number>().Int32Value();
  int64_t offset = info[2].As<Napi::Number>().Int64Value();
  size_t size = info[3].As<Napi::Number>().Uint32Value();
  if (size > out_.size()) size = out_.size();
  fuse_out_header_compat hdr{};
  hdr.unique = unique;
  ssize_t n;
  do {
    n = pread(fd, out_.data(), size, offset);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    int err = errno;
    hdr.len = sizeof hdr;
    hdr.error = -err;
    iovec iov{&hdr, sizeof hdr};
    WriteAll(fd_, &iov, 1);
    return Napi::Number::New(env, -err);
  }
  hdr.len = uint32_t(sizeof hdr + size_t(n));
  iovec iov[2] = {{&hdr, sizeof hdr}, {out_.data(), size_t(n)}};
  int rc = WriteAll(fd_, iov, 2);
  last_reply_ns_ = NowNs();
  return Napi::Number::New(env, rc < 0 ? double(rc) : double(n));
}

// backingOpen(fd) -> backing id (> 0) | -errno
Napi::Value FuseDevice::BackingOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  fuse_backing_map_compat map{};
  map.fd = info[0].As<Napi::Number>().Int32Value();
  int id = ioctl(fd_, kBackingOpen, &map);
  return Napi::Number::New(env, id < 0 ? -errno : id);
}

// backingClose(id) -> 0 | -errno
Napi::Value FuseDevice::BackingClose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = info[0].As<Napi::Number>().Uint32Value();
  int rc = ioctl(fd_, kBackingClose, &id);
  return Napi::Number::New(env, rc < 0 ? -errno : 0);
}

// setSpin(microseconds): how long the loop keeps polling after a request
// before it may sleep (see device.h).  0 disables spinning.
Napi::Value FuseDevice::SetSpin(const Napi::CallbackInfo& info) {
  spin_ns_ = uint64_t(info[0].As<Napi::Number>().Uint32Value()) * 1000ull;
  return info.Env().Undefined();
}

Napi::Value FuseDevice::LoopRef(const Napi::CallbackInfo& info) {
  if (poll_) uv_ref(reinterpret_cast<uv_handle_t*>(poll_));
  if (idle_) uv_ref(reinterpret_cast<uv_handle_t*>(idle_));
  return info.Env().Undefined();
}

Napi::Value FuseDevice::LoopUnref(const Napi::CallbackInfo& info) {
  if (poll_) uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
  // A spin under way must not keep a process alive that is done otherwise.
  if (idle_) uv_unref(reinterpret_cast<uv_handle_t*>(idle_));
  return info.Env().Undefined();
}
