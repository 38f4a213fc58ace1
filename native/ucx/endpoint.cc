// Endpoints (created from a peer's worker address) and the remote keys
// unpacked on them. An endpoint is normally created in
// UCP_ERR_HANDLING_MODE_PEER so a dead peer fails its requests and reports
// through onError instead of leaving them pending; a failed endpoint can
// only be closed with force.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ucx.h"

namespace dyaducx {

namespace {

void SendCb(void* request, ucs_status_t status, void* user) {
  auto* op = static_cast<Op*>(user);
  op->worker->Completed(op, request, status);
}

Napi::Value NotUsable(Napi::Env env, ucs_status_t failed) {
  Op* op = new Op(env, nullptr);
  Napi::Promise p = op->deferred.Promise();
  op->deferred.Reject(StatusError(env, failed != UCS_OK ? failed : UCS_ERR_NOT_CONNECTED, "endpoint").Value());
  delete op;
  return p;
}

}  // namespace

Napi::Function Endpoint::Init(Napi::Env env) {
  return DefineClass(env, "Endpoint",
                     {
                         InstanceMethod("amSend", &Endpoint::AmSend),
                         InstanceMethod("get", &Endpoint::Get),
                         InstanceMethod("unpackRkey", &Endpoint::UnpackRkey),
                         InstanceMethod("info", &Endpoint::Info),
                         InstanceMethod("state", &Endpoint::State),
                         InstanceMethod("close", &Endpoint::Close),
                     });
}

Endpoint::Endpoint(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Endpoint>(info) {}

Endpoint::~Endpoint() {
  // Only reachable once closed: an open endpoint holds a reference to itself.
  if (w_) w_->Forget(this);
}

ucs_status_t Endpoint::Open(Worker* w, Napi::Object worker_obj, const void* address, Napi::Function on_error,
                            bool peer_errors) {
  ucp_ep_params_t p;
  memset(&p, 0, sizeof(p));
  p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  p.address = static_cast<const ucp_address_t*>(address);
  // Shared-memory transports cannot detect a dead peer (UCX 1.13 refuses
  // them in PEER mode), so the caller may opt out and rely on its timeouts.
  p.err_mode = peer_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  p.err_handler.cb = OnError;
  p.err_handler.arg = this;
  ucs_status_t st = ucp_ep_create(w->handle(), &p, &ep_);
  if (st != UCS_OK) {
    ep_ = nullptr;
    return st;
  }
  w_ = w;
  worker_ref_ = Napi::Persistent(worker_obj);
  on_error_ = Napi::Persistent(on_error);
  Ref();  // UCX holds `this` as the error handler's argument until close
  return UCS_OK;
}

void Endpoint::OnError(void* arg, ucp_ep_h ep, ucs_status_t status) { static_cast<Endpoint*>(arg)->Failed(status); }

void Endpoint::Failed(ucs_status_t status) {
  if (failed_ == UCS_OK) failed_ = status;
  if (used_get_ && w_) w_->Taint();
  if (w_) w_->EndpointFailed(this, status);
}

void Endpoint::NotifyError(Napi::Env env, ucs_status_t status) {
  if (on_error_.IsEmpty()) return;
  on_error_.Call(Value(), {Napi::String::New(env, StatusName(status)), Napi::String::New(env, ucs_status_string(status))});
  if (env.IsExceptionPending()) {
    Napi::Error e = env.GetAndClearPendingException();
    fprintf(stderr, "dyad-fs: UCX endpoint error handler threw: %s\n", e.Message().c_str());
  }
}

void Endpoint::Forget(RemoteKey* k) { keys_.erase(k); }

void Endpoint::DestroyKeys() {
  // Keys must go before the endpoint they were unpacked on.
  for (RemoteKey* k : std::vector<RemoteKey*>(keys_.begin(), keys_.end())) k->Destroy();
  keys_.clear();
}

void Endpoint::Detach() {
  ep_ = nullptr;
  closing_ = true;
  on_error_.Reset();
  if (w_) w_->Forget(this);
  Unref();
}

void* Endpoint::CloseForShutdown(bool force) {
  if (!ep_) return nullptr;
  if (force && used_get_ && w_) w_->Taint();
  DestroyKeys();
  ucp_request_param_t p;
  memset(&p, 0, sizeof(p));
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t sp = ucp_ep_close_nbx(ep_, &p);
  Detach();
  return (sp == nullptr || UCS_PTR_IS_ERR(sp)) ? nullptr : sp;
}

// amSend(id, header: Buffer, data: Buffer | null, flags, region?) -> Promise<void>
Napi::Value Endpoint::AmSend(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsNumber() || !info[1].IsTypedArray() || !info[3].IsNumber()) {
    Napi::TypeError::New(env, "amSend(id, header, data | null, flags, region?)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!usable() || w_->closed() || failed_ != UCS_OK) return NotUsable(env, failed_);
  unsigned id = info[0].As<Napi::Number>().Uint32Value();
  Napi::Uint8Array hdr = info[1].As<Napi::Uint8Array>();
  const void* data = nullptr;
  size_t len = 0;
  Op* op = new Op(env, w_);
  op->what = "active message send";
  op->header.assign(reinterpret_cast<const char*>(hdr.Data()), hdr.ByteLength());
  op->Keep(Value());
  ucp_request_param_t p;
  memset(&p, 0, sizeof(p));
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  p.cb.send = SendCb;
  p.user_data = op;
  p.flags = info[3].As<Napi::Number>().Uint32Value();
  if (info[2].IsTypedArray()) {
    Napi::Uint8Array d = info[2].As<Napi::Uint8Array>();
    data = d.Data();
    len = d.ByteLength();
    op->Keep(info[2]);
    ucp_mem_h memh = info.Length() > 4 ? MemhOf(info[4], data, len) : nullptr;
    if (memh) {
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      p.memh = memh;
      op->Keep(info[4]);
    }
  }
  ucs_status_ptr_t sp = ucp_am_send_nbx(ep_, id, op->header.data(), op->header.size(), data, len, &p);
  return w_->Track(op, sp);
}

// get(buffer, remoteAddress: bigint, rkey, region?) -> Promise<void>
Napi::Value Endpoint::Get(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsTypedArray() || !info[1].IsBigInt() || !info[2].IsObject()) {
    Napi::TypeError::New(env, "get(buffer, remoteAddress: bigint, rkey, region?)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!usable() || w_->closed() || failed_ != UCS_OK) return NotUsable(env, failed_);
  RemoteKey* key = RemoteKey::Unwrap(info[2].As<Napi::Object>());
  if (!key || !key->handle()) {
    Napi::TypeError::New(env, "get: rkey destroyed or not a RemoteKey").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  bool lossless = false;
  uint64_t raddr = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  Napi::Uint8Array buf = info[0].As<Napi::Uint8Array>();
  Op* op = new Op(env, w_);
  op->what = "get";
  op->is_get = true;
  op->Keep(Value());
  op->Keep(info[0]);
  op->Keep(info[2]);
  ucp_request_param_t p;
  memset(&p, 0, sizeof(p));
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = SendCb;
  p.user_data = op;
  ucp_mem_h memh = info.Length() > 3 ? MemhOf(info[3], buf.Data(), buf.ByteLength()) : nullptr;
  if (memh) {
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    p.memh = memh;
    op->Keep(info[3]);
  }
  used_get_ = true;
  ucs_status_ptr_t sp = ucp_get_nbx(ep_, buf.Data(), buf.ByteLength(), raddr, key->handle(), &p);
  return w_->Track(op, sp);
}

// unpackRkey(packed: Buffer) -> RemoteKey
Napi::Value Endpoint::UnpackRkey(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray()) {
    Napi::TypeError::New(env, "unpackRkey(packed)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!usable()) {
    StatusError(env, failed_ != UCS_OK ? failed_ : UCS_ERR_NOT_CONNECTED, "endpoint").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Uint8Array packed = info[0].As<Napi::Uint8Array>();
  ucp_rkey_h key = nullptr;
  ucs_status_t st = ucp_ep_rkey_unpack(ep_, packed.Data(), &key);
  if (st != UCS_OK) {
    StatusError(env, st, "ucp_ep_rkey_unpack").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Object obj = w_->ctors()->rkey.New({});
  RemoteKey* k = RemoteKey::Unwrap(obj);
  k->Attach(this, key);
  keys_.insert(k);
  return obj;
}

Napi::Value Endpoint::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!ep_) return Napi::String::New(env, "");
  char* buf = nullptr;
  size_t len = 0;
  FILE* f = open_memstream(&buf, &len);
  if (!f) return Napi::String::New(env, "");
  ucp_ep_print_info(ep_, f);
  fclose(f);
  std::string s(buf ? buf : "", len);
  free(buf);
  return Napi::String::New(env, s);
}

// state() -> "open" | "closed" | the UCS_ERR_* code it failed with
Napi::Value Endpoint::State(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (failed_ != UCS_OK) return Napi::String::New(env, StatusName(failed_));
  return Napi::String::New(env, ep_ ? "open" : "closed");
}

// close(force) -> Promise<void>. Force cancels requests in flight; without
// it the endpoint is flushed first. A failed endpoint is always forced.
Napi::Value Endpoint::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Op* op = new Op(env, w_);
  op->what = "endpoint close";
  if (!ep_ || !w_ || w_->closed()) {
    Napi::Promise p = op->deferred.Promise();
    op->deferred.Resolve(env.Undefined());
    delete op;
    return p;
  }
  bool force = (info.Length() > 0 && info[0].ToBoolean().Value()) || failed_ != UCS_OK;
  if (force && used_get_) w_->Taint();
  DestroyKeys();
  op->Keep(Value());
  ucp_request_param_t p;
  memset(&p, 0, sizeof(p));
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  p.cb.send = SendCb;
  p.user_data = op;
  p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t sp = ucp_ep_close_nbx(ep_, &p);
  Worker* w = w_;
  Detach();
  Napi::Value promise = w->Track(op, sp);
  // A flush that fails because the peer is gone still leaves the endpoint closed.
  return promise;
}

Napi::Function RemoteKey::Init(Napi::Env env) {
  return DefineClass(env, "RemoteKey", {InstanceMethod("destroy", &RemoteKey::JsDestroy)});
}

RemoteKey::RemoteKey(const Napi::CallbackInfo& info) : Napi::ObjectWrap<RemoteKey>(info) {}

RemoteKey::~RemoteKey() {
  if (key_ && ep_) {
    ep_->Forget(this);
    Destroy();
  }
}

void RemoteKey::Destroy() {
  if (key_) ucp_rkey_destroy(key_);
  key_ = nullptr;
  ep_ = nullptr;
}

Napi::Value RemoteKey::JsDestroy(const Napi::CallbackInfo& info) {
  if (key_ && ep_) ep_->Forget(this);
  Destroy();
  return info.Env().Undefined();
}

}  // namespace dyaducx
