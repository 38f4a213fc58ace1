// Registered memory: a JS buffer (kept alive by the region) or a read-only
// shared mapping of a file. Registration lets RDMA transports use the pages
// without per-operation pinning, and its packed rkey lets a peer read them
// with get. Over TCP and shared memory registration is nearly free.
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "ucx.h"

namespace dyaducx {

Napi::Function Region::Init(Napi::Env env) {
  return DefineClass(env, "Region",
                     {
                         InstanceMethod("rkey", &Region::Rkey),
                         InstanceMethod("address", &Region::Address),
                         InstanceMethod("length", &Region::Length),
                         InstanceMethod("release", &Region::JsRelease),
                     });
}

Region::Region(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Region>(info) {}

Region::~Region() { Release(); }

ucs_status_t Region::MapBuffer(Worker* w, Napi::Object buffer, void* data, size_t length) {
  ucp_mem_map_params_t p;
  memset(&p, 0, sizeof(p));
  p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_PROT;
  p.address = data;
  p.length = length;
  p.prot = UCP_MEM_MAP_PROT_LOCAL_READ | UCP_MEM_MAP_PROT_LOCAL_WRITE | UCP_MEM_MAP_PROT_REMOTE_READ |
           UCP_MEM_MAP_PROT_REMOTE_WRITE;
  ucs_status_t st = ucp_mem_map(w->context(), &p, &memh_);
  if (st != UCS_OK) {
    memh_ = nullptr;
    return st;
  }
  w_ = w;
  addr_ = data;
  len_ = length;
  buffer_ = Napi::Persistent(buffer);
  return UCS_OK;
}

ucs_status_t Region::MapFile(Worker* w, int fd, size_t length, int* err) {
  void* a = mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0);
  if (a == MAP_FAILED) {
    *err = errno;
    return UCS_ERR_IO_ERROR;
  }
  ucp_mem_map_params_t p;
  memset(&p, 0, sizeof(p));
  p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_PROT;
  p.address = a;
  p.length = length;
  // Read-only pages cannot be registered for local write on RDMA devices.
  p.prot = UCP_MEM_MAP_PROT_LOCAL_READ | UCP_MEM_MAP_PROT_REMOTE_READ;
  ucs_status_t st = ucp_mem_map(w->context(), &p, &memh_);
  if (st != UCS_OK) {
    munmap(a, length);
    memh_ = nullptr;
    return st;
  }
  w_ = w;
  addr_ = a;
  len_ = length;
  mmapped_ = true;
  return UCS_OK;
}

ucp_mem_h Region::MemhFor(const void* p, size_t n) const {
  if (!memh_) return nullptr;
  auto* b = static_cast<const uint8_t*>(addr_);
  auto* q = static_cast<const uint8_t*>(p);
  return (q >= b && q + n <= b + len_) ? memh_ : nullptr;
}

void Region::Release() {
  if (memh_ && w_ && w_->context()) ucp_mem_unmap(w_->context(), memh_);
  memh_ = nullptr;
  if (mmapped_ && addr_) munmap(addr_, len_);
  mmapped_ = false;
  addr_ = nullptr;
  len_ = 0;
  if (!buffer_.IsEmpty()) buffer_.Reset();
  if (w_) w_->Forget(this);
  w_ = nullptr;
}

void Region::Forget() {
  memh_ = nullptr;
  if (mmapped_ && addr_) munmap(addr_, len_);
  mmapped_ = false;
  addr_ = nullptr;
  len_ = 0;
  if (!buffer_.IsEmpty()) buffer_.Reset();
  w_ = nullptr;
}

// rkey() -> Buffer: the packed remote key a peer unpacks to read this region.
Napi::Value Region::Rkey(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!memh_) {
    Napi::Error::New(env, "region released").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  void* buf = nullptr;
  size_t size = 0;
  ucs_status_t st = ucp_rkey_pack(w_->context(), memh_, &buf, &size);
  if (st != UCS_OK) {
    StatusError(env, st, "ucp_rkey_pack").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::Copy(env, static_cast<uint8_t*>(buf), size);
  ucp_rkey_buffer_release(buf);
  return out;
}

Napi::Value Region::Address(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), uint64_t(reinterpret_cast<uintptr_t>(addr_)));
}

Napi::Value Region::Length(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(len_)); }

Napi::Value Region::JsRelease(const Napi::CallbackInfo& info) {
  Release();
  return info.Env().Undefined();
}

}  // namespace dyaducx
