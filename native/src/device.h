// A /dev/fuse channel driven by the libuv loop of the Node main thread.
//
// Why this exists: a waiting request must cost no thread, so requests are read
// with a non-blocking fd watched by uv_poll and handed to JavaScript, which may
// answer at any later time with reply().  The data path that would otherwise
// cross into JavaScript per block (serving READ from a backing fd) is kept here
// as replyFromFd(), and the passthrough ioctls that let the kernel skip the
// daemon altogether are exposed as backingOpen()/backingClose().
#pragma once

#include <napi.h>
#include <uv.h>

#include <cstdint>
#include <vector>

class FuseDevice : public Napi::ObjectWrap<FuseDevice> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit FuseDevice(const Napi::CallbackInfo& info);
  ~FuseDevice() override;

 private:
  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Stop(const Napi::CallbackInfo& info);
  Napi::Value Reply(const Napi::CallbackInfo& info);
  Napi::Value ReplyFromFd(const Napi::CallbackInfo& info);
  Napi::Value BackingOpen(const Napi::CallbackInfo& info);
  Napi::Value BackingClose(const Napi::CallbackInfo& info);
  Napi::Value SetSpin(const Napi::CallbackInfo& info);
  Napi::Value LoopRef(const Napi::CallbackInfo& info);
  Napi::Value LoopUnref(const Napi::CallbackInfo& info);

  static void OnPoll(uv_poll_t* handle, int status, int events);
  static void OnIdle(uv_idle_t* handle);
  static void OnClose(uv_handle_t* handle);
  static void OnIdleClose(uv_handle_t* handle);
  void Drain();
  void NoteArrival();
  void SpinInLoop(uint64_t until);
  bool LoopHasWork();
  void Emit(size_t n);
  void Fail(int err);
  void StopPolling();

  int fd_ = -1;
  uv_poll_t* poll_ = nullptr;
  bool running_ = false;
  // Requests are read into one buffer sized for the largest WRITE the kernel
  // may send (max_write + headers) and copied out at their exact length.
  std::vector<uint8_t> in_;
  // Scratch space for READ payloads served by replyFromFd().
  std::vector<uint8_t> out_;
  // Spinning: for spin_ns_ after a request, Drain() keeps reading instead of
  // returning to sleep in epoll, so the caller's next request is read without
  // a wake-up (one across CPUs costs tens of microseconds on small VMs). When
  // the loop has other work meanwhile, Drain() returns to it and an idle
  // handle keeps the loop polling rather than sleeping for the rest of the
  // window. After kMaxMisses windows in a row that caught nothing, spinning
  // stops until a request comes within spin_ns_ of a reply again.
  uint64_t spin_ns_ = 0;
  uint64_t spin_until_ns_ = 0;
  uint64_t last_reply_ns_ = 0;
  int misses_ = 0;
  static constexpr int kMaxMisses = 3;
  uv_idle_t* idle_ = nullptr;
  Napi::FunctionReference on_request_;
  Napi::FunctionReference on_error_;
  Napi::AsyncContext* async_ = nullptr;
};
