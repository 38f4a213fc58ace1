// A thin UCX (libucp) binding for Node, driven entirely from the JS thread.
//
// One Worker owns one ucp context and one ucp worker. The worker's event fd
// is watched with uv_poll on the main loop: on wake-up we progress until the
// worker is idle, then ucp_worker_arm (UCS_ERR_BUSY means progress again), so
// nothing ever busy-waits. UCX callbacks (request completion, incoming active
// messages, endpoint failures) only record what happened; JS is called after
// ucp_worker_progress has returned, never from inside it, so JS may post new
// operations from any callback without re-entering UCX.
//
// Every operation returns a Promise. A request that never completes cannot
// hang JS forever: the caller owns timeouts and may close the endpoint with
// force, which completes its requests with UCS_ERR_CANCELED.
//
// The consumer side of chunked transfers can instead run on a worker and a
// thread of their own: see mover.h.
//
// Nothing here knows what is being transferred or why.
#pragma once

#include <napi.h>
#include <ucp/api/ucp.h>
#include <uv.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace dyaducx {

class Worker;
class Endpoint;
class Region;
class RemoteKey;

// Constructors of the wrapped classes, so C++ can create their instances.
struct Ctors {
  Napi::FunctionReference endpoint;
  Napi::FunctionReference region;
  Napi::FunctionReference rkey;
};

// A UCX status as a JS Error with a stable code ("UCS_ERR_CANCELED") and
// the numeric status in `ucsStatus`.
Napi::Error StatusError(Napi::Env env, ucs_status_t status, const std::string& what);

// A UCP context with `features` and one single-threaded worker, configured
// by a JS object of UCX options (context.cc). False: a JS exception is pending.
bool OpenWorker(Napi::Env env, Napi::Value config, const std::string& name, uint64_t features, ucp_context_h* ctx,
                ucp_worker_h* worker);
const char* StatusName(ucs_status_t status);

// An operation in flight: the promise to settle and the JS objects (buffers,
// endpoint, keys) that must outlive it because UCX holds raw pointers into them.
struct Op {
  Op(Napi::Env env, Worker* w) : deferred(Napi::Promise::Deferred::New(env)), worker(w) {}
  Napi::Promise::Deferred deferred;
  std::vector<Napi::ObjectReference> keep;
  // UCX 1.13 may reference an active-message header until completion.
  std::string header;
  ucs_status_t status = UCS_OK;
  size_t length = 0;
  bool resolve_length = false;
  const char* what = "";
  Worker* worker;
  // Set by the completion callback, which UCX may invoke inside the nbx call itself.
  bool queued = false;
  bool is_get = false;
  // The UCX request while in flight (not queued), for cancellation at close.
  void* request = nullptr;
  void Keep(Napi::Value v) {
    if (v.IsObject()) keep.push_back(Napi::Persistent(v.As<Napi::Object>()));
  }
};

struct AmEvent {
  unsigned id = 0;
  std::string header;
  size_t length = 0;
  uint64_t desc = 0;           // rendezvous or persistent data to fetch with amRecv
  std::vector<uint8_t> data;   // eager data, copied out of UCX's buffer
};

struct EpErrorEvent {
  Endpoint* ep;
  ucs_status_t status;
};

class Worker : public Napi::ObjectWrap<Worker> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit Worker(const Napi::CallbackInfo& info);
  ~Worker() override;

  ucp_worker_h handle() const { return worker_; }
  ucp_context_h context() const { return ctx_; }
  bool closed() const { return closed_; }

  // Registers `op` as in flight and settles it at once if UCX completed or
  // failed it immediately. Returns the op's promise.
  Napi::Value Track(Op* op, ucs_status_ptr_t sp);
  // From UCX callbacks: the request is done; settle it after progress returns.
  void Completed(Op* op, void* request, ucs_status_t status);
  void SchedulePump();
  void EndpointFailed(Endpoint* ep, ucs_status_t status);
  // An endpoint that issued gets failed: see Close for why that matters.
  void Taint() { tainted_ = true; }
  void Forget(Endpoint* ep);
  void Forget(Region* r);
  Ctors* ctors() const { return ctors_; }

 private:
  static void OnPoll(uv_poll_t* h, int status, int events);
  static void OnIdle(uv_idle_t* h);
  static ucs_status_t OnAm(void* arg, const void* header, size_t header_length, void* data, size_t length,
                           const ucp_am_recv_param_t* param);

  void Pump();
  void Dispatch();
  void Settle(Napi::Env env, Op* op);
  void UpdateRef();
  void Shutdown(bool release_regions);

  Napi::Value Address(const Napi::CallbackInfo& info);
  Napi::Value Connect(const Napi::CallbackInfo& info);
  Napi::Value SetAmHandler(const Napi::CallbackInfo& info);
  Napi::Value AmRecv(const Napi::CallbackInfo& info);
  Napi::Value AmRelease(const Napi::CallbackInfo& info);
  Napi::Value Register(const Napi::CallbackInfo& info);
  Napi::Value MapFile(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value SetSpin(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  struct AmHandler {
    Worker* worker;
    unsigned id;
    Napi::FunctionReference fn;
  };

  ucp_context_h ctx_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_address_t* addr_ = nullptr;
  size_t addr_len_ = 0;
  int efd_ = -1;
  uv_poll_t* poll_ = nullptr;
  uv_idle_t* idle_ = nullptr;
  bool idle_on_ = false;
  bool pumping_ = false;
  bool dispatching_ = false;
  bool closed_ = false;
  bool referenced_ = false;
  uint64_t spin_ns_ = 0;
  bool tainted_ = false;
  uint64_t wakeups_ = 0;
  uint64_t pumps_ = 0;
  uint64_t pump_ns_ = 0;
  Napi::AsyncContext* async_ = nullptr;
  Ctors* ctors_ = nullptr;

  std::unordered_set<Op*> live_;
  std::vector<Op*> done_;
  std::vector<AmEvent> am_events_;
  std::vector<EpErrorEvent> ep_errors_;
  std::unordered_map<uint64_t, void*> descs_;
  uint64_t next_desc_ = 0;
  std::unordered_map<unsigned, std::unique_ptr<AmHandler>> am_handlers_;
  std::unordered_set<Endpoint*> eps_;
  std::unordered_set<Region*> regions_;
};

class Endpoint : public Napi::ObjectWrap<Endpoint> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit Endpoint(const Napi::CallbackInfo& info);
  ~Endpoint() override;

  // Called once from Worker::Connect after construction.
  ucs_status_t Open(Worker* w, Napi::Object worker_obj, const void* address, Napi::Function on_error, bool peer_errors);
  void Failed(ucs_status_t status);
  void NotifyError(Napi::Env env, ucs_status_t status);
  // Destroys keys and requests a close; used when the worker closes.
  void* CloseForShutdown(bool force);
  bool used_get() const { return used_get_; }
  bool failed() const { return failed_ != UCS_OK; }
  void Forget(RemoteKey* k);
  ucp_ep_h handle() const { return ep_; }
  bool usable() const { return ep_ != nullptr && !closing_; }

 private:
  static void OnError(void* arg, ucp_ep_h ep, ucs_status_t status);
  void DestroyKeys();
  void Detach();

  Napi::Value AmSend(const Napi::CallbackInfo& info);
  Napi::Value Get(const Napi::CallbackInfo& info);
  Napi::Value UnpackRkey(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value State(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  Worker* w_ = nullptr;
  Napi::ObjectReference worker_ref_;
  Napi::FunctionReference on_error_;
  ucp_ep_h ep_ = nullptr;
  bool closing_ = false;
  ucs_status_t failed_ = UCS_OK;
  bool used_get_ = false;
  std::unordered_set<RemoteKey*> keys_;
};

class RemoteKey : public Napi::ObjectWrap<RemoteKey> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit RemoteKey(const Napi::CallbackInfo& info);
  ~RemoteKey() override;
  void Attach(Endpoint* ep, ucp_rkey_h key) {
    ep_ = ep;
    key_ = key;
  }
  ucp_rkey_h handle() const { return key_; }
  // Frees the key; called by its endpoint before the endpoint goes away.
  void Destroy();

 private:
  Napi::Value JsDestroy(const Napi::CallbackInfo& info);
  Endpoint* ep_ = nullptr;
  ucp_rkey_h key_ = nullptr;
};

class Region : public Napi::ObjectWrap<Region> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit Region(const Napi::CallbackInfo& info);
  ~Region() override;

  ucs_status_t MapBuffer(Worker* w, Napi::Object buffer, void* data, size_t length);
  ucs_status_t MapFile(Worker* w, int fd, size_t length, int* err);
  // The memory handle if [p, p+n) lies inside this region, else null.
  ucp_mem_h MemhFor(const void* p, size_t n) const;
  void Release();
  // Drops the handle without unmapping (its context is being abandoned).
  void Forget();
  bool file_mapping() const { return mmapped_ && memh_ != nullptr; }

 private:
  Napi::Value Rkey(const Napi::CallbackInfo& info);
  Napi::Value Address(const Napi::CallbackInfo& info);
  Napi::Value Length(const Napi::CallbackInfo& info);
  Napi::Value JsRelease(const Napi::CallbackInfo& info);

  Worker* w_ = nullptr;
  ucp_mem_h memh_ = nullptr;
  void* addr_ = nullptr;
  size_t len_ = 0;
  bool mmapped_ = false;
  Napi::ObjectReference buffer_;
};

// The memory handle to pass with an operation on `p`, if `region` (a JS
// Region or null/undefined) covers it.
ucp_mem_h MemhOf(Napi::Value region, const void* p, size_t n);

}  // namespace dyaducx
