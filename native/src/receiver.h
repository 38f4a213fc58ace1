// Receives a known number of bytes from a connected socket into a file at
// an offset, checksumming them with CRC-32C on the way, on a thread of its
// own.
//
// Why: a pull of a large file was bound by the consumer daemon's one
// JavaScript thread, which both served FUSE and moved every byte (a read
// callback per socket read, the CRC, the write(2) calls). Here the bytes
// go socket -> one reused buffer -> file without touching the JS heap, the
// CRC runs on bytes still in cache, and the event loop stays free for FUSE
// requests and other pulls while it runs.
//
// The socket belongs to a net.Socket, which must not read while this runs
// (the caller pauses it); the receiver works on dups of both descriptors,
// so the caller may close its own at any time, and cancel() shuts the
// socket down to wake the thread.
#pragma once

#include <napi.h>
#include <uv.h>

#include <atomic>
#include <cstdint>
#include <thread>

class FileReceiver : public Napi::ObjectWrap<FileReceiver> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit FileReceiver(const Napi::CallbackInfo& info);
  ~FileReceiver() override;

 private:
  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Received(const Napi::CallbackInfo& info);

  void Run();  // the thread
  static void OnDone(uv_async_t* handle);
  static void OnClose(uv_handle_t* handle);

  int sock_ = -1;  // our dups; the thread closes them
  int file_ = -1;
  int64_t offset_ = 0;
  int64_t length_ = 0;
  int stall_ms_ = 0;
  uint32_t crc_ = 0;
  std::atomic<int64_t> received_{0};
  std::atomic<bool> cancelled_{false};
  int err_ = 0;          // set by the thread before it signals
  bool file_err_ = false;  // the error came from the file, not the socket
  bool active_ = false;
  std::thread thread_;
  uv_async_t* async_handle_ = nullptr;
  Napi::FunctionReference on_done_;
  Napi::AsyncContext* async_ = nullptr;
};

// Keeps up to n receive buffers ready (touched) for the pulls to come; returns how many are kept.
Napi::Value ReserveReceiveBuffers(const Napi::CallbackInfo& info);
