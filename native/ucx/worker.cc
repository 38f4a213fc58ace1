// The ucp context + worker and its integration with the libuv loop; see ucx.h
// for the threading and completion model.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ucx.h"

namespace dyaducx {

namespace {

// Progress calls per pump before yielding to the rest of the loop: a busy
// transfer must not starve sockets and timers, nor the FUSE channel.
constexpr int kProgressBudget = 256;
// ucp_worker_arm may keep answering BUSY while data streams in; after this
// many rounds we yield and come back on the next loop iteration instead.
constexpr int kArmRounds = 4;

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

uint64_t NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000ull + uint64_t(ts.tv_nsec) / 1000000ull;
}

void OnCloseHandle(uv_handle_t* h) { free(h); }

void RecvAmCb(void* request, ucs_status_t status, size_t length, void* user) {
  auto* op = static_cast<Op*>(user);
  op->length = length;
  op->worker->Completed(op, request, status);
}

std::string ReadStream(void (*print)(void*, FILE*), void* obj) {
  char* buf = nullptr;
  size_t len = 0;
  FILE* f = open_memstream(&buf, &len);
  if (!f) return std::string();
  print(obj, f);
  fclose(f);
  std::string s(buf ? buf : "", len);
  free(buf);
  return s;
}

}  // namespace

const char* StatusName(ucs_status_t s) {
  switch (s) {
    case UCS_OK: return "UCS_OK";
    case UCS_INPROGRESS: return "UCS_INPROGRESS";
    case UCS_ERR_NO_MESSAGE: return "UCS_ERR_NO_MESSAGE";
    case UCS_ERR_NO_RESOURCE: return "UCS_ERR_NO_RESOURCE";
    case UCS_ERR_IO_ERROR: return "UCS_ERR_IO_ERROR";
    case UCS_ERR_NO_MEMORY: return "UCS_ERR_NO_MEMORY";
    case UCS_ERR_INVALID_PARAM: return "UCS_ERR_INVALID_PARAM";
    case UCS_ERR_UNREACHABLE: return "UCS_ERR_UNREACHABLE";
    case UCS_ERR_INVALID_ADDR: return "UCS_ERR_INVALID_ADDR";
    case UCS_ERR_NOT_IMPLEMENTED: return "UCS_ERR_NOT_IMPLEMENTED";
    case UCS_ERR_MESSAGE_TRUNCATED: return "UCS_ERR_MESSAGE_TRUNCATED";
    case UCS_ERR_NO_PROGRESS: return "UCS_ERR_NO_PROGRESS";
    case UCS_ERR_BUFFER_TOO_SMALL: return "UCS_ERR_BUFFER_TOO_SMALL";
    case UCS_ERR_NO_ELEM: return "UCS_ERR_NO_ELEM";
    case UCS_ERR_SOME_CONNECTS_FAILED: return "UCS_ERR_SOME_CONNECTS_FAILED";
    case UCS_ERR_NO_DEVICE: return "UCS_ERR_NO_DEVICE";
    case UCS_ERR_BUSY: return "UCS_ERR_BUSY";
    case UCS_ERR_CANCELED: return "UCS_ERR_CANCELED";
    case UCS_ERR_SHMEM_SEGMENT: return "UCS_ERR_SHMEM_SEGMENT";
    case UCS_ERR_ALREADY_EXISTS: return "UCS_ERR_ALREADY_EXISTS";
    case UCS_ERR_OUT_OF_RANGE: return "UCS_ERR_OUT_OF_RANGE";
    case UCS_ERR_TIMED_OUT: return "UCS_ERR_TIMED_OUT";
    case UCS_ERR_EXCEEDS_LIMIT: return "UCS_ERR_EXCEEDS_LIMIT";
    case UCS_ERR_UNSUPPORTED: return "UCS_ERR_UNSUPPORTED";
    case UCS_ERR_REJECTED: return "UCS_ERR_REJECTED";
    case UCS_ERR_NOT_CONNECTED: return "UCS_ERR_NOT_CONNECTED";
    case UCS_ERR_CONNECTION_RESET: return "UCS_ERR_CONNECTION_RESET";
    case UCS_ERR_ENDPOINT_TIMEOUT: return "UCS_ERR_ENDPOINT_TIMEOUT";
    default: return "UCS_ERR_OTHER";
  }
}

Napi::Error StatusError(Napi::Env env, ucs_status_t status, const std::string& what) {
  std::string msg = what.empty() ? ucs_status_string(status) : what + ": " + ucs_status_string(status);
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, StatusName(status)));
  e.Set("ucsStatus", Napi::Number::New(env, int(status)));
  return e;
}

ucp_mem_h MemhOf(Napi::Value region, const void* p, size_t n) {
  if (!region.IsObject()) return nullptr;
  Napi::Object o = region.As<Napi::Object>();
  Region* r = Region::Unwrap(o);
  return r ? r->MemhFor(p, n) : nullptr;
}

Napi::Function Worker::Init(Napi::Env env) {
  return DefineClass(env, "Worker",
                     {
                         InstanceMethod("address", &Worker::Address),
                         InstanceMethod("connect", &Worker::Connect),
                         InstanceMethod("setAmHandler", &Worker::SetAmHandler),
                         InstanceMethod("amRecv", &Worker::AmRecv),
                         InstanceMethod("amRelease", &Worker::AmRelease),
                         InstanceMethod("register", &Worker::Register),
                         InstanceMethod("mapFile", &Worker::MapFile),
                         InstanceMethod("info", &Worker::Info),
                         InstanceMethod("stats", &Worker::Stats),
                         InstanceMethod("setSpin", &Worker::SetSpin),
                         InstanceMethod("close", &Worker::Close),
                     });
}

// new Worker(config: {[UCX option without "UCX_"]: string}, name: string)
Worker::Worker(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Worker>(info) {
  Napi::Env env = info.Env();
  ctors_ = env.GetInstanceData<Ctors>();
  std::string name = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "node";
  if (!OpenWorker(env, info.Length() > 0 ? info[0] : env.Undefined(), name, UCP_FEATURE_AM | UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP,
                  &ctx_, &worker_))
    return;
  ucs_status_t st = ucp_worker_get_efd(worker_, &efd_);
  if (st == UCS_OK) st = ucp_worker_get_address(worker_, &addr_, &addr_len_);
  if (st != UCS_OK) {
    Shutdown(false);
    StatusError(env, st, "ucp worker").ThrowAsJavaScriptException();
    return;
  }

  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  auto* poll = static_cast<uv_poll_t*>(malloc(sizeof(uv_poll_t)));
  int rc = uv_poll_init(loop, poll, efd_);
  if (rc != 0) {
    free(poll);  // never initialised, so not for uv_close
  } else {
    poll_ = poll;
    poll_->data = this;
    rc = uv_poll_start(poll_, UV_READABLE, OnPoll);
  }
  if (rc == 0) {
    idle_ = static_cast<uv_idle_t*>(malloc(sizeof(uv_idle_t)));
    uv_idle_init(loop, idle_);  // cannot fail
    idle_->data = this;
  }
  if (rc != 0) {
    Shutdown(false);
    Napi::Error::New(env, std::string("uv_poll on the UCX event fd: ") + uv_strerror(rc)).ThrowAsJavaScriptException();
    return;
  }
  uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
  uv_unref(reinterpret_cast<uv_handle_t*>(idle_));
  async_ = new Napi::AsyncContext(env, "UcxWorker");
  Ref();  // libuv points at us until close()
  // Arm (or find work) right away so the first wake-up is not missed.
  SchedulePump();
}

Worker::~Worker() {
  // close() releases everything; a worker collected without it (only after
  // a failed constructor) has nothing left but the async context.
  delete async_;
}

void Worker::UpdateRef() {
  if (!poll_) return;
  // The loop stays alive only while requests are in flight, as a socket
  // with a pending read would; an idle worker never holds the process.
  bool want = !live_.empty();
  if (want == referenced_) return;
  referenced_ = want;
  if (want)
    uv_ref(reinterpret_cast<uv_handle_t*>(poll_));
  else
    uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
}

void Worker::SchedulePump() {
  if (closed_ || idle_on_ || !idle_) return;
  idle_on_ = true;
  uv_idle_start(idle_, OnIdle);
}

void Worker::OnPoll(uv_poll_t* h, int status, int events) {
  auto* self = static_cast<Worker*>(h->data);
  self->wakeups_++;
  self->Pump();
}

void Worker::OnIdle(uv_idle_t* h) {
  auto* self = static_cast<Worker*>(h->data);
  self->idle_on_ = false;
  uv_idle_stop(h);
  self->Pump();
}

void Worker::Pump() {
  if (closed_ || pumping_) return;
  pumping_ = true;
  pumps_++;
  uint64_t t0 = NowNs();
  bool more = false;
  uint64_t spin_until = 0;
  for (int round = 0;; round++) {
    int n = 0;
    for (;;) {
      if (ucp_worker_progress(worker_) != 0) {
        if (++n >= kProgressBudget) {
          more = true;
          break;
        }
        if (spin_ns_) spin_until = 0;
        continue;
      }
      // Optionally keep polling a little while requests are in flight: the
      // next event often comes within microseconds, and a sleep/wake-up
      // round trip through epoll costs more than that.
      if (!spin_ns_ || live_.empty() || n >= kProgressBudget) break;
      uint64_t now = NowNs();
      if (!spin_until) spin_until = now + spin_ns_;
      if (now >= spin_until) break;
    }
    if (more) break;
    ucs_status_t st = ucp_worker_arm(worker_);
    if (st == UCS_ERR_BUSY) {
      if (round + 1 < kArmRounds) continue;
      more = true;
    }
    break;
  }
  pumping_ = false;
  pump_ns_ += NowNs() - t0;
  if (more) SchedulePump();
  Dispatch();
}

void Worker::Completed(Op* op, void* request, ucs_status_t status) {
  if (op->queued) {
    // Already failed by close(); UCX is purging it while destroying the worker.
    if (request) ucp_request_free(request);
    return;
  }
  op->status = status;
  op->queued = true;
  if (status != UCS_OK && op->is_get) tainted_ = true;
  if (request) ucp_request_free(request);
  done_.push_back(op);
}

Napi::Value Worker::Track(Op* op, ucs_status_ptr_t sp) {
  Napi::Env env = Env();
  Napi::Promise promise = op->deferred.Promise();
  if (op->queued) {
    // Completed inside the call: Dispatch settles it with the others.
    live_.insert(op);
  } else if (sp == nullptr || UCS_PTR_IS_ERR(sp)) {
    op->status = sp == nullptr ? UCS_OK : UCS_PTR_STATUS(sp);
    if (op->status != UCS_OK && op->is_get) tainted_ = true;
    Settle(env, op);
  } else {
    op->request = sp;
    live_.insert(op);
    UpdateRef();
  }
  SchedulePump();
  return promise;
}

void Worker::Settle(Napi::Env env, Op* op) {
  if (op->status == UCS_OK) {
    if (op->resolve_length)
      op->deferred.Resolve(Napi::Number::New(env, double(op->length)));
    else
      op->deferred.Resolve(env.Undefined());
  } else {
    op->deferred.Reject(StatusError(env, op->status, op->what).Value());
  }
  delete op;
}

void Worker::EndpointFailed(Endpoint* ep, ucs_status_t status) { ep_errors_.push_back({ep, status}); }

void Worker::Forget(Endpoint* ep) { eps_.erase(ep); }
void Worker::Forget(Region* r) { regions_.erase(r); }

void Worker::Dispatch() {
  if (dispatching_) return;
  if (done_.empty() && am_events_.empty() && ep_errors_.empty()) return;
  dispatching_ = true;
  Napi::Env env = Env();
  Napi::HandleScope hs(env);
  // Settling promises outside any JS frame: the callback scope runs the
  // microtasks (their .then handlers) when it closes, as MakeCallback would.
  {
    Napi::CallbackScope cs(env, *async_);
    while (!done_.empty() || !am_events_.empty() || !ep_errors_.empty()) {
      std::vector<Op*> done;
      done.swap(done_);
      for (Op* op : done) {
        live_.erase(op);
        Settle(env, op);
      }
      UpdateRef();
      std::vector<EpErrorEvent> errs;
      errs.swap(ep_errors_);
      for (auto& e : errs) {
        if (eps_.count(e.ep)) e.ep->NotifyError(env, e.status);
      }
      std::vector<AmEvent> evs;
      evs.swap(am_events_);
      for (auto& ev : evs) {
        auto it = am_handlers_.find(ev.id);
        if (closed_ || it == am_handlers_.end() || it->second->fn.IsEmpty()) {
          if (ev.desc) {
            auto d = descs_.find(ev.desc);
            if (d != descs_.end()) {
              if (!closed_) ucp_am_data_release(worker_, d->second);
              descs_.erase(d);
            }
          }
          continue;
        }
        Napi::Value data = ev.desc ? env.Undefined()
                                   : Napi::Buffer<uint8_t>::Copy(env, ev.data.data(), ev.data.size()).As<Napi::Value>();
        Napi::Value hdr = Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<const uint8_t*>(ev.header.data()),
                                                      ev.header.size());
        it->second->fn.Call(Value(), {hdr, Napi::Number::New(env, double(ev.length)),
                                      Napi::Number::New(env, double(ev.desc)), data});
        if (env.IsExceptionPending()) {
          Napi::Error e = env.GetAndClearPendingException();
          fprintf(stderr, "dyad-fs: UCX active-message handler threw: %s\n", e.Message().c_str());
        }
      }
    }
  }
  dispatching_ = false;
}

ucs_status_t Worker::OnAm(void* arg, const void* header, size_t header_length, void* data, size_t length,
                          const ucp_am_recv_param_t* param) {
  auto* h = static_cast<AmHandler*>(arg);
  Worker* w = h->worker;
  AmEvent ev;
  ev.id = h->id;
  if (header_length) ev.header.assign(static_cast<const char*>(header), header_length);
  ev.length = length;
  if (param->recv_attr & (UCP_AM_RECV_ATTR_FLAG_RNDV | UCP_AM_RECV_ATTR_FLAG_DATA)) {
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) {
      // Persistent eager data: copy it now rather than hand JS a second kind of descriptor.
      ev.data.assign(static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + length);
      w->am_events_.push_back(std::move(ev));
      return UCS_OK;
    }
    ev.desc = ++w->next_desc_;
    w->descs_[ev.desc] = data;
    w->am_events_.push_back(std::move(ev));
    return UCS_INPROGRESS;
  }
  if (length) ev.data.assign(static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + length);
  w->am_events_.push_back(std::move(ev));
  return UCS_OK;
}

Napi::Value Worker::Address(const Napi::CallbackInfo& info) {
  if (closed_) return info.Env().Undefined();
  return Napi::Buffer<uint8_t>::Copy(info.Env(), reinterpret_cast<uint8_t*>(addr_), addr_len_);
}

// connect(address: Buffer, onError(code, message), peerErrors = true) -> Endpoint
Napi::Value Worker::Connect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_) {
    StatusError(env, UCS_ERR_NOT_CONNECTED, "worker closed").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (info.Length() < 2 || !info[0].IsTypedArray() || !info[1].IsFunction()) {
    Napi::TypeError::New(env, "connect(address: Buffer, onError: Function)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Uint8Array addr = info[0].As<Napi::Uint8Array>();
  Napi::Object obj = ctors_->endpoint.New({});
  Endpoint* ep = Endpoint::Unwrap(obj);
  bool peer_errors = info.Length() < 3 || info[2].ToBoolean().Value();
  ucs_status_t st = ep->Open(this, Value(), addr.Data(), info[1].As<Napi::Function>(), peer_errors);
  if (st != UCS_OK) {
    StatusError(env, st, "ucp_ep_create").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  eps_.insert(ep);
  SchedulePump();
  return obj;
}

// setAmHandler(id, fn(header: Buffer, length, desc, data?: Buffer) | null)
Napi::Value Worker::SetAmHandler(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_) return env.Undefined();
  if (info.Length() < 2 || !info[0].IsNumber()) {
    Napi::TypeError::New(env, "setAmHandler(id, fn | null)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  unsigned id = info[0].As<Napi::Number>().Uint32Value();
  auto& slot = am_handlers_[id];
  if (!slot) {
    slot = std::make_unique<AmHandler>();
    slot->worker = this;
    slot->id = id;
    ucp_am_handler_param_t p;
    memset(&p, 0, sizeof(p));
    p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS | UCP_AM_HANDLER_PARAM_FIELD_CB |
                   UCP_AM_HANDLER_PARAM_FIELD_ARG;
    p.id = id;
    p.flags = UCP_AM_FLAG_WHOLE_MSG;
    p.cb = OnAm;
    p.arg = slot.get();
    ucs_status_t st = ucp_worker_set_am_recv_handler(worker_, &p);
    if (st != UCS_OK) {
      am_handlers_.erase(id);
      StatusError(env, st, "ucp_worker_set_am_recv_handler").ThrowAsJavaScriptException();
      return env.Undefined();
    }
  }
  if (info[1].IsFunction())
    slot->fn = Napi::Persistent(info[1].As<Napi::Function>());
  else
    slot->fn.Reset();
  return env.Undefined();
}

// amRecv(desc, buffer, region?) -> Promise<number of bytes>
Napi::Value Worker::AmRecv(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsTypedArray()) {
    Napi::TypeError::New(env, "amRecv(desc, buffer, region?)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  uint64_t id = uint64_t(info[0].As<Napi::Number>().Int64Value());
  auto it = descs_.find(id);
  Op* op = new Op(env, this);
  op->what = "active message receive";
  op->resolve_length = true;
  if (closed_ || it == descs_.end()) {
    op->status = closed_ ? UCS_ERR_CANCELED : UCS_ERR_NO_ELEM;
    Napi::Promise p = op->deferred.Promise();
    Settle(env, op);
    return p;
  }
  void* desc = it->second;
  descs_.erase(it);
  Napi::Uint8Array buf = info[1].As<Napi::Uint8Array>();
  op->Keep(info[1]);
  ucp_request_param_t p;
  memset(&p, 0, sizeof(p));
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_RECV_INFO;
  p.cb.recv_am = RecvAmCb;
  p.user_data = op;
  p.recv_info.length = &op->length;
  ucp_mem_h memh = info.Length() > 2 ? MemhOf(info[2], buf.Data(), buf.ByteLength()) : nullptr;
  if (memh) {
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    p.memh = memh;
    op->Keep(info[2]);
  }
  // UCX owns the descriptor from here on, even if the call fails.
  ucs_status_ptr_t sp = ucp_am_recv_data_nbx(worker_, desc, buf.Data(), buf.ByteLength(), &p);
  return Track(op, sp);
}

// amRelease(desc): drop a rendezvous message without fetching it; the
// sender's request completes successfully.
Napi::Value Worker::AmRelease(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) return env.Undefined();
  uint64_t id = uint64_t(info[0].As<Napi::Number>().Int64Value());
  auto it = descs_.find(id);
  if (it == descs_.end()) return env.Undefined();
  if (!closed_) ucp_am_data_release(worker_, it->second);
  descs_.erase(it);
  SchedulePump();
  return env.Undefined();
}

// register(buffer) -> Region over the buffer's memory (kept alive by it)
Napi::Value Worker::Register(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_ || info.Length() < 1 || !info[0].IsTypedArray()) {
    Napi::TypeError::New(env, closed_ ? "worker closed" : "register(buffer)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Uint8Array buf = info[0].As<Napi::Uint8Array>();
  Napi::Object obj = ctors_->region.New({});
  Region* r = Region::Unwrap(obj);
  ucs_status_t st = r->MapBuffer(this, info[0].As<Napi::Object>(), buf.Data(), buf.ByteLength());
  if (st != UCS_OK) {
    StatusError(env, st, "ucp_mem_map").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  regions_.insert(r);
  return obj;
}

// mapFile(fd, length) -> Region over a read-only shared mapping of the file
Napi::Value Worker::MapFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_ || info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) {
    Napi::TypeError::New(env, closed_ ? "worker closed" : "mapFile(fd, length)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fd = info[0].As<Napi::Number>().Int32Value();
  double len = info[1].As<Napi::Number>().DoubleValue();
  if (len <= 0) {
    Napi::RangeError::New(env, "mapFile: length must be positive").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Object obj = ctors_->region.New({});
  Region* r = Region::Unwrap(obj);
  int err = 0;
  ucs_status_t st = r->MapFile(this, fd, size_t(len), &err);
  if (st != UCS_OK) {
    Napi::Error e = err ? Napi::Error::New(env, std::string("mmap: ") + strerror(err)) : StatusError(env, st, "ucp_mem_map");
    if (err) e.Set("errno", Napi::Number::New(env, err));
    e.ThrowAsJavaScriptException();
    return env.Undefined();
  }
  regions_.insert(r);
  return obj;
}

Napi::Value Worker::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_) return Napi::String::New(env, "");
  std::string s = ReadStream([](void* c, FILE* f) { ucp_context_print_info(static_cast<ucp_context_h>(c), f); }, ctx_);
  s += ReadStream([](void* w, FILE* f) { ucp_worker_print_info(static_cast<ucp_worker_h>(w), f); }, worker_);
  return Napi::String::New(env, s);
}

// setSpin(microseconds): how long Pump keeps polling after the worker went
// quiet while requests are in flight (0, the default, sleeps at once).
Napi::Value Worker::SetSpin(const Napi::CallbackInfo& info) {
  if (info.Length() > 0 && info[0].IsNumber()) spin_ns_ = uint64_t(info[0].As<Napi::Number>().DoubleValue() * 1000.0);
  return info.Env().Undefined();
}

Napi::Value Worker::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("inFlight", Napi::Number::New(env, double(live_.size())));
  o.Set("endpoints", Napi::Number::New(env, double(eps_.size())));
  o.Set("regions", Napi::Number::New(env, double(regions_.size())));
  o.Set("heldMessages", Napi::Number::New(env, double(descs_.size())));
  o.Set("closed", Napi::Boolean::New(env, closed_));
  o.Set("wakeups", Napi::Number::New(env, double(wakeups_)));
  o.Set("pumps", Napi::Number::New(env, double(pumps_)));
  o.Set("progressMs", Napi::Number::New(env, double(pump_ns_) / 1e6));
  return o;
}

// close(): endpoints (forced), held messages, registrations, then the
// worker and the context, in that order. Requests still in flight reject
// with UCS_ERR_CANCELED. Synchronous and bounded.
Napi::Value Worker::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_ || !worker_) return env.Undefined();
  // Endpoints that read with get are flushed, not forced, when they can be:
  // forcing one with emulated gets still queued is what leads UCX into the
  // crash described in Shutdown, so a failed flush taints the worker.
  std::vector<void*> flushing;
  for (Endpoint* ep : std::vector<Endpoint*>(eps_.begin(), eps_.end())) {
    if (!ep->used_get()) continue;
    if (ep->failed()) {
      tainted_ = true;
      continue;
    }
    void* req = ep->CloseForShutdown(false);
    if (req) flushing.push_back(req);
  }
  for (uint64_t until = NowMs() + 500;;) {
    ucp_worker_progress(worker_);
    bool all = true;
    for (void* r : flushing) all = all && ucp_request_check_status(r) != UCS_INPROGRESS;
    if (all || NowMs() > until) break;
  }
  for (void* r : flushing) {
    ucs_status_t st = ucp_request_check_status(r);
    if (st != UCS_OK) tainted_ = true;
    if (st != UCS_INPROGRESS) ucp_request_free(r);
  }
  // A file mapping still exposed may have peers' gets queued against it on
  // endpoints they created; the same purge would meet them.
  for (Region* r : regions_) tainted_ = tainted_ || r->file_mapping();
  std::vector<void*> closing;
  for (Endpoint* ep : std::vector<Endpoint*>(eps_.begin(), eps_.end())) {
    void* req = ep->CloseForShutdown(true);
    if (req) closing.push_back(req);
  }
  for (auto& d : descs_) ucp_am_data_release(worker_, d.second);
  descs_.clear();
  // Receives on endpoints the peers created (not ours to close) are cancelled instead.
  for (Op* op : live_) {
    if (!op->queued && op->request) ucp_request_cancel(worker_, op->request);
  }
  // Let every close (ours now, and earlier ones still running, e.g. of an
  // endpoint whose peer died) and every cancelled request finish through the
  // normal path: ucp_worker_destroy purging them itself has crashed UCX 1.13
  // (ucp_request_memory_dereg on a purged send). Forced closes complete
  // locally; the deadline only guards against a peer that never answers.
  uint64_t deadline = NowMs() + 1000;
  for (;;) {
    ucp_worker_progress(worker_);
    bool all = true;
    for (void* r : closing) {
      if (r && ucp_request_check_status(r) == UCS_INPROGRESS) all = false;
    }
    for (Op* op : live_) all = all && op->queued;
    if (all || NowMs() > deadline) break;
  }
  for (void* r : closing) {
    if (r && ucp_request_check_status(r) != UCS_INPROGRESS) ucp_request_free(r);
  }
  closed_ = true;
  // Requests UCX still holds will never call back once the worker is gone.
  for (Op* op : live_) {
    if (!op->queued) {
      op->status = UCS_ERR_CANCELED;
      op->queued = true;
      done_.push_back(op);
    }
  }
  for (auto& h : am_handlers_) h.second->fn.Reset();
  // Destroying the worker purges requests still queued on endpoints the
  // peers created, and those may reference our registrations: unmap after.
  Shutdown(true);
  // Settle everything now, closed_ makes Dispatch skip AM events.
  bool was = dispatching_;
  dispatching_ = false;
  {
    Napi::HandleScope hs(env);
    std::vector<Op*> done;
    done.swap(done_);
    for (Op* op : done) {
      live_.erase(op);
      Settle(env, op);
    }
    live_.clear();
    am_events_.clear();
    ep_errors_.clear();
  }
  dispatching_ = was;
  Unref();
  return env.Undefined();
}

void Worker::Shutdown(bool release_regions) {
  closed_ = true;
  if (poll_) {
    uv_poll_stop(poll_);
    uv_close(reinterpret_cast<uv_handle_t*>(poll_), OnCloseHandle);
    poll_ = nullptr;
  }
  if (idle_) {
    uv_idle_stop(idle_);
    uv_close(reinterpret_cast<uv_handle_t*>(idle_), OnCloseHandle);
    idle_ = nullptr;
  }
  if (addr_) {
    ucp_worker_release_address(worker_, addr_);
    addr_ = nullptr;
  }
  if (tainted_) {
    // UCX 1.13 can crash in ucp_worker_destroy when it purges the internal
    // requests of emulated gets (TCP) still queued on an endpoint
    // (ucp_request_memory_dereg on a purged request), on the side issuing
    // them and on the side answering them. A worker that may hold such
    // requests (a get endpoint forced or failed, a get failed, a file
    // mapping still exposed) is left, with its registrations and context,
    // to process exit. Only the get data path ever taints a worker.
    for (Region* r : std::vector<Region*>(regions_.begin(), regions_.end())) r->Forget();
    regions_.clear();
    worker_ = nullptr;
    ctx_ = nullptr;
    return;
  }
  if (worker_) {
    ucp_worker_destroy(worker_);
    worker_ = nullptr;
  }
  if (release_regions) {
    for (Region* r : std::vector<Region*>(regions_.begin(), regions_.end())) r->Release();
    regions_.clear();
  }
  if (ctx_) {
    ucp_cleanup(ctx_);
    ctx_ = nullptr;
  }
}

}  // namespace dyaducx
