// See device.h for why the channel looks the way it does.
#include "device.h"

#include <errno.h>
#include <fcntl.h>
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
  Unref();
}

void FuseDevice::OnClose(uv_handle_t* handle) { delete reinterpret_cast<uv_poll_t*>(handle); }

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
  // A bounded batch keeps other loop work (sockets, timers) from starving.
  int budget = 64;
  uint64_t spin_until = 0;
  while (running_ && budget > 0) {
    ssize_t n = read(fd_, in_.data(), in_.size());
    if (n > 0) {
      budget--;
      Emit(size_t(n));
      if (spin_ns_) spin_until = NowNs() + spin_ns_;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == ENOENT) continue;  // request aborted before we read it
    if (n < 0 && errno == EAGAIN) {
      if (spin_until && NowNs() < spin_until) continue;
      return;
    }
    Fail(n == 0 ? ENODEV : errno);  // ENODEV: the file system was unmounted
    return;
  }
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
  return Napi::Number::New(env, WriteAll(fd_, iov, int(cnt)));
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

// setSpin(microseconds): how long to keep reading after a request before
// going back to sleep in the event loop.  0 disables spinning.
Napi::Value FuseDevice::SetSpin(const Napi::CallbackInfo& info) {
  spin_ns_ = uint64_t(info[0].As<Napi::Number>().Uint32Value()) * 1000ull;
  return info.Env().Undefined();
}

Napi::Value FuseDevice::LoopRef(const Napi::CallbackInfo& info) {
  if (poll_) uv_ref(reinterpret_cast<uv_handle_t*>(poll_));
  return info.Env().Undefined();
}

Napi::Value FuseDevice::LoopUnref(const Napi::CallbackInfo& info) {
  if (poll_) uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
  return info.Env().Undefined();
}
