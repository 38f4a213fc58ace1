// Sends a byte range of a file to a connected socket with sendfile(2), on
// the libuv loop of the Node main thread.
//
// Why: serving a file through JavaScript costs a read(2) into a buffer and
// a copy of that buffer into the socket, about half a CPU-second per GiB on
// the project VM. sendfile hands page-cache pages to the socket instead.
// The socket belongs to a net.Socket, so the sender works on a dup of its
// descriptor: closing the net.Socket meanwhile can then never make us write
// to an unrelated descriptor that reused the number, and cancel() shuts the
// dup down and closes it.
#pragma once

#include <napi.h>
#include <uv.h>

#include <cstdint>

class FileSender : public Napi::ObjectWrap<FileSender> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit FileSender(const Napi::CallbackInfo& info);
  ~FileSender() override;

 private:
  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Sent(const Napi::CallbackInfo& info);

  static void OnPoll(uv_poll_t* handle, int status, int events);
  static void OnTimer(uv_timer_t* handle);
  static void OnClose(uv_handle_t* handle);
  void Pump();
  void Finish(int err);
  void Teardown();

  int sock_ = -1;  // our dup of the socket
  int file_ = -1;  // not ours: the caller keeps it open until done
  int64_t offset_ = 0;
  int64_t end_ = 0;
  int64_t sent_ = 0;
  uint64_t stall_ms_ = 0;
  uint64_t last_progress_ = 0;
  uv_poll_t* poll_ = nullptr;
  uv_timer_t* timer_ = nullptr;
  bool active_ = false;
  Napi::FunctionReference on_done_;
  Napi::AsyncContext* async_ = nullptr;
};
