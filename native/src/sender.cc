// See sender.h for why this exists.
#include "sender.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

namespace {

// sendfile moves at most this much per call and per loop turn, so a fast
// consumer cannot keep the loop (which also serves FUSE) to itself.
constexpr int64_t kStep = 4 << 20;
constexpr int64_t kTurn = 16 << 20;

}  // namespace

Napi::Function FileSender::Init(Napi::Env env) {
  return DefineClass(env, "FileSender",
                     {
                         InstanceMethod("start", &FileSender::Start),
                         InstanceMethod("cancel", &FileSender::Cancel),
                         InstanceMethod("sent", &FileSender::Sent),
                     });
}

// new FileSender(socketFd, fileFd, offset, length, stallMs, onDone(errno, sent))
// onDone runs once, from the loop, never from inside start() or cancel():
// errno 0 with sent == length is success; errno 0 with less means the file
// ended early; ETIMEDOUT means the socket took nothing for stallMs.
FileSender::FileSender(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FileSender>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 6 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber() ||
      !info[3].IsNumber() || !info[4].IsNumber() || !info[5].IsFunction()) {
    Napi::TypeError::New(env, "FileSender(socketFd, fileFd, offset, length, stallMs, onDone)")
        .ThrowAsJavaScriptException();
    return;
  }
  int sock = info[0].As<Napi::Number>().Int32Value();
  file_ = info[1].As<Napi::Number>().Int32Value();
  offset_ = info[2].As<Napi::Number>().Int64Value();
  end_ = offset_ + info[3].As<Napi::Number>().Int64Value();
  stall_ms_ = info[4].As<Napi::Number>().Int64Value();
  on_done_ = Napi::Persistent(info[5].As<Napi::Function>());
  sock_ = fcntl(sock, F_DUPFD_CLOEXEC, 0);
  if (sock_ < 0) {
    Napi::Error e = Napi::Error::New(env, "dup of the socket failed");
    e.Set("errno", Napi::Number::New(env, errno));
    e.ThrowAsJavaScriptException();
    return;
  }
  async_ = new Napi::AsyncContext(env, "FileSender");
}

FileSender::~FileSender() {
  if (sock_ >= 0) close(sock_);
  delete async_;
}

// start() -> 0 | -errno (then onDone is never called)
Napi::Value FileSender::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (active_ || sock_ < 0) return Napi::Number::New(env, -EALREADY);
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  poll_ = new uv_poll_t;
  poll_->data = this;
  int rc = uv_poll_init(loop, poll_, sock_);
  if (rc != 0) {
    delete poll_;
    poll_ = nullptr;
    return Napi::Number::New(env, rc);
  }
  timer_ = new uv_timer_t;
  timer_->data = this;
  uv_timer_init(loop, timer_);
  active_ = true;
  Ref();  // libuv points at us until Teardown
  last_progress_ = uv_now(loop);
  uv_poll_start(poll_, UV_WRITABLE, OnPoll);
  if (stall_ms_ > 0) uv_timer_start(timer_, OnTimer, stall_ms_, stall_ms_);
  return Napi::Number::New(env, 0);
}

// cancel(): stops without calling onDone; the socket is shut down, since
// the receiver would otherwise wait for bytes that will never come.
Napi::Value FileSender::Cancel(const Napi::CallbackInfo& info) {
  if (active_) {
    shutdown(sock_, SHUT_RDWR);
    Teardown();
  }
  return info.Env().Undefined();
}

Napi::Value FileSender::Sent(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), double(sent_));
}

void FileSender::OnPoll(uv_poll_t* handle, int status, int events) {
  auto* self = static_cast<FileSender*>(handle->data);
  if (status < 0) return self->Finish(-status);
  self->Pump();
}

void FileSender::OnTimer(uv_timer_t* handle) {
  auto* self = static_cast<FileSender*>(handle->data);
  if (uv_now(handle->loop) - self->last_progress_ >= self->stall_ms_) self->Finish(ETIMEDOUT);
}

void FileSender::Pump() {
  int64_t budget = kTurn;
  while (offset_ < end_ && budget > 0) {
    int64_t want = end_ - offset_;
    if (want > kStep) want = kStep;
    off_t off = offset_;
    ssize_t n = sendfile(sock_, file_, &off, size_t(want));
    if (n > 0) {
      offset_ += n;
      sent_ += n;
      budget -= n;
      last_progress_ = uv_now(poll_->loop);
      continue;
    }
    if (n == 0) return Finish(0);  // end of file before `length`
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return;  // wait for the socket to drain
    return Finish(errno);
  }
  if (offset_ >= end_) Finish(0);
}

void FileSender::Finish(int err) {
  if (!active_) return;
  Teardown();
  Napi::Env env = Env();
  Napi::HandleScope scope(env);
  on_done_.MakeCallback(Value(), {Napi::Number::New(env, err), Napi::Number::New(env, double(sent_))}, *async_);
}

void FileSender::Teardown() {
  active_ = false;
  uv_poll_stop(poll_);
  uv_close(reinterpret_cast<uv_handle_t*>(poll_), OnClose);
  poll_ = nullptr;
  uv_timer_stop(timer_);
  uv_close(reinterpret_cast<uv_handle_t*>(timer_), OnClose);
  timer_ = nullptr;
  // libuv has forgotten the fd once uv_poll_stop returns, so it may close now.
  close(sock_);
  sock_ = -1;
  Unref();
}

void FileSender::OnClose(uv_handle_t* handle) {
  if (handle->type == UV_POLL)
    delete reinterpret_cast<uv_poll_t*>(handle);
  else
    delete reinterpret_cast<uv_timer_t*>(handle);
}
