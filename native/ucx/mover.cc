// ChunkMover: see mover.h for what and why.
//
// Flow control: a job holds at most `buffers` chunk buffers (being received,
// or written and waiting for the CRC to reach them), and receives only
// chunks inside the window [crc_to, crc_to + buffers * chunk). The chunk at
// crc_to therefore always finds a buffer, so out-of-order arrivals cannot
// starve the CRC. Rendezvous messages outside the window stay with UCX (the
// sender's request stays pending): that is the backpressure to the sender.
//
// Every UCX callback only records what happened; the work (buffers, nbx
// calls, pwrite, CRC) runs after ucp_worker_progress returns, so nothing
// re-enters UCX from inside it.
#include "mover.h"

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <unordered_set>

#include "../src/crc32c.h"
#include "ucx.h"

namespace dyaducx {

namespace {

constexpr size_t kHeaderBytes = 16;       // 8-byte token | u64 BE offset
constexpr size_t kMaxOrphans = 4096;      // chunks waiting for their job
constexpr uint64_t kOrphanMs = 10000;     // ... for at most this long
constexpr size_t kIdleBufBytes = 64u << 20;  // free chunk buffers kept for reuse
constexpr size_t kRecentTokens = 1024;    // ended jobs whose late chunks are dropped at once
constexpr int kPollMs = 200;
constexpr uint64_t kDrainMs = 1000;
constexpr size_t kMaxPeers = 256;  // endpoints kept; idle ones beyond this are closed

uint64_t NowMs() {
  return uint64_t(std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// CRC-32 (zlib's), for records digested by a producer without CRC-32C.
// A byte at a time is slow (~0.5 GB/s), but such records are rare.
uint32_t Crc32(uint32_t crc, const uint8_t* p, size_t n) {
  static const auto table = [] {
    std::vector<uint32_t> t(256);
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

// The 8-byte job token JS passes as a Buffer (compared, never interpreted).
bool TokenOf(const Napi::Value& v, uint64_t* token) {
  if (!v.IsBuffer() || v.As<Napi::Buffer<uint8_t>>().Length() != 8) return false;
  memcpy(token, v.As<Napi::Buffer<uint8_t>>().Data(), 8);
  return true;
}

// A dup of the caller's descriptor (the thread closes it), or -1 with a JS exception pending.
int DupFd(Napi::Env env, const Napi::Value& v) {
  int fd = dup(v.As<Napi::Number>().Int32Value());
  if (fd < 0) {
    Napi::Error e = Napi::Error::New(env, std::string("dup: ") + strerror(errno));
    e.Set("errno", Napi::Number::New(env, errno));
    e.ThrowAsJavaScriptException();
  }
  return fd;
}


uint64_t ReadBe64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
  return v;
}

}  // namespace

struct ChunkMover::Buf {
  uint8_t* data = nullptr;
  size_t size = 0;
  ucp_mem_h memh = nullptr;
};

struct ChunkMover::Job {
  uint64_t token = 0;
  int fd = -1;
  uint64_t size = 0;
  size_t chunk = 0;
  unsigned max_bufs = 0;
  int algo = 1;           // 1: CRC-32C, 2: CRC-32
  uint32_t crc = 0;
  uint64_t crc_to = 0;   // every byte before this is checksummed
  std::map<uint64_t, std::pair<void*, size_t>> pending;  // offset -> rendezvous descriptor, length
  std::map<uint64_t, std::pair<Buf*, size_t>> held;      // written, waiting for the CRC
  std::vector<bool> seen;
  unsigned in_use = 0;    // buffers: receiving + held
  std::unordered_set<Recv*> recvs;
  bool finished = false;  // no more bytes will be written (result posted, or cancelled)
  bool cancelled = false; // JS forgot the job
  std::atomic<uint64_t> received{0};  // written to the file (only the thread adds)
};

struct ChunkMover::Recv {
  std::shared_ptr<Job> job;
  uint64_t offset = 0;
  size_t length = 0;
  size_t got = 0;
  Buf* buf = nullptr;
  void* request = nullptr;
  ucs_status_t status = UCS_OK;
};

struct ChunkMover::Peer {
  std::string address;
  ucp_ep_h ep = nullptr;
  bool failed = false;  // dropped: being closed, or closed
  bool closed = false;  // its close completed: UCX will not name it again
  bool described = false;  // its lanes are in lanes_
  std::unordered_set<SendJob*> jobs;
};

struct ChunkMover::SendJob {
  uint64_t token = 0;
  std::string peer_address;
  int fd = -1;
  uint64_t size = 0;
  size_t chunk = 0;
  unsigned window = 0;
  uint64_t next = 0;       // next offset to read and send
  Peer* peer = nullptr;
  std::unordered_set<Out*> sends;
  bool finished = false;
  bool cancelled = false;
  std::atomic<uint64_t> sent{0};  // sends completed (only the thread adds)
};

struct ChunkMover::Out {
  std::shared_ptr<SendJob> job;
  Buf* buf = nullptr;
  uint64_t offset = 0;
  size_t length = 0;
  uint8_t header[16];  // UCX 1.13 may read the header until completion
  void* request = nullptr;
  ucs_status_t status = UCS_OK;
};

// Per-thread event lists, filled by callbacks inside ucp_worker_progress.
struct AmArrival {
  uint64_t token;
  uint64_t offset;
  size_t length;
  void* desc;                 // rendezvous
  std::vector<uint8_t> data;  // eager, copied
};
static thread_local std::vector<AmArrival>* t_arrivals = nullptr;
static thread_local std::vector<ChunkMover::Recv*>* t_completions = nullptr;
static thread_local std::vector<ChunkMover::Out*>* t_sent = nullptr;
static thread_local std::vector<std::pair<ChunkMover::Peer*, ucs_status_t>>* t_peer_errors = nullptr;

Napi::Function ChunkMover::Init(Napi::Env env) {
  return DefineClass(env, "ChunkMover",
                     {
                         InstanceMethod("address", &ChunkMover::Address),
                         InstanceMethod("start", &ChunkMover::Start),
                         InstanceMethod("cancel", &ChunkMover::Cancel),
                         InstanceMethod("received", &ChunkMover::Received),
                         InstanceMethod("send", &ChunkMover::Send),
                         InstanceMethod("cancelSend", &ChunkMover::CancelSend),
                         InstanceMethod("sent", &ChunkMover::Sent),
                         InstanceMethod("reserve", &ChunkMover::Reserve),
                         InstanceMethod("endpoints", &ChunkMover::Endpoints),
                         InstanceMethod("stats", &ChunkMover::Stats),
                         InstanceMethod("close", &ChunkMover::Close),
                     });
}

// new ChunkMover(config: {[UCX option without "UCX_"]: string}, name,
//                onDone(token, errno, crc, bytes, detail, fileError, send), amId, peerErrors)
ChunkMover::ChunkMover(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ChunkMover>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsObject() || !info[1].IsString() || !info[2].IsFunction()) {
    Napi::TypeError::New(env, "new ChunkMover(config, name, onDone)").ThrowAsJavaScriptException();
    return;
  }
  std::string name = info[1].As<Napi::String>().Utf8Value();
  if (!OpenWorker(env, info[0], name, UCP_FEATURE_AM | UCP_FEATURE_WAKEUP, &ctx_, &worker_)) return;
  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  ucs_status_t st = ucp_worker_get_efd(worker_, &efd_);
  if (st == UCS_OK) st = ucp_worker_get_address(worker_, &addr, &addr_len);
  if (st == UCS_OK) {
    address_.assign(reinterpret_cast<const char*>(addr), addr_len);
    ucp_worker_release_address(worker_, addr);
    ucp_am_handler_param_t hp;
    memset(&hp, 0, sizeof(hp));
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    // The message id JS passes after the callback; default 1.
    am_id_ = info.Length() > 3 && info[3].IsNumber() ? info[3].As<Napi::Number>().Uint32Value() : 1;
    hp.id = am_id_;
    // Shared-memory transports cannot detect a dead peer (UCX 1.13 refuses
    // them in PEER mode): JS says whether endpoints may ask for it.
    peer_errors_ = info.Length() <= 4 || info[4].ToBoolean().Value();
    hp.cb = OnAm;
    hp.arg = this;
    st = ucp_worker_set_am_recv_handler(worker_, &hp);
  }
  if (st != UCS_OK) {
    Shutdown();
    StatusError(env, st, "ChunkMover worker").ThrowAsJavaScriptException();
    return;
  }
  on_done_ = Napi::Persistent(info[2].As<Napi::Function>());
  async_ctx_ = new Napi::AsyncContext(env, "dyad-ucx-chunk-mover");
  async_ = new uv_async_t;
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  uv_async_init(loop, async_, OnAsync);
  async_->data = this;
  // The thread does not keep the process alive by itself: pulls (sockets, timers) do.
  uv_unref(reinterpret_cast<uv_handle_t*>(async_));
  running_ = true;
  thread_ = std::thread([this] { Run(); });
}

ChunkMover::~ChunkMover() { Shutdown(); }

// --- JS side -----------------------------------------------------------------

Napi::Value ChunkMover::Address(const Napi::CallbackInfo& info) {
  return Napi::Buffer<uint8_t>::Copy(info.Env(), reinterpret_cast<const uint8_t*>(address_.data()), address_.size());
}

// start(token: Buffer(8), fd, size, chunkBytes, buffers, algo: 'crc32c' | 'crc32'):
// the receiver writes on a dup of fd, so the caller may close its own.
Napi::Value ChunkMover::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 6 || !info[0].IsBuffer() || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsNumber() ||
      !info[4].IsNumber()) {
    Napi::TypeError::New(env, "start(token, fd, size, chunkBytes, buffers, algo)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Buffer<uint8_t> tok = info[0].As<Napi::Buffer<uint8_t>>();
  double size = info[2].As<Napi::Number>().DoubleValue();
  double chunk = info[3].As<Napi::Number>().DoubleValue();
  uint32_t bufs = info[4].As<Napi::Number>().Uint32Value();
  std::string algo = info[5].IsString() ? info[5].As<Napi::String>().Utf8Value() : "";
  if (tok.Length() != 8 || size <= 0 || chunk <= 0 || chunk > double(1u << 30) || bufs == 0 || bufs > 1024 ||
      (algo != "crc32c" && algo != "crc32")) {
    Napi::RangeError::New(env, "start: bad token, size, chunk size, buffer count or digest algorithm").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!running_) {
    Napi::Error::New(env, "ChunkMover closed").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fd = DupFd(env, info[1]);
  if (fd < 0) return env.Undefined();
  auto job = std::make_shared<Job>();
  memcpy(&job->token, tok.Data(), 8);
  job->fd = fd;
  job->size = uint64_t(size);
  job->chunk = size_t(chunk);
  job->max_bufs = bufs;
  job->algo = algo == "crc32c" ? 1 : 2;
  job->seen.assign(size_t((job->size + job->chunk - 1) / job->chunk), false);
  {
    std::lock_guard<std::mutex> g(jobs_mu_);
    js_jobs_[job->token] = job;
  }
  Enqueue(Command{Command::kStart, job, nullptr, job->token, false});
  return env.Undefined();
}

// Forgets the job named by info[0] in `jobs` and has the thread stop it
// (cancel and cancelSend).
template <typename Jobs>
Napi::Value ChunkMover::Forget(const Napi::CallbackInfo& info, Jobs& jobs, int kind, bool force) {
  Napi::Env env = info.Env();
  uint64_t token;
  if (info.Length() < 1 || !TokenOf(info[0], &token)) return env.Undefined();
  {
    std::lock_guard<std::mutex> g(jobs_mu_);
    jobs.erase(token);
  }
  if (running_) Enqueue(Command{Command::Kind(kind), nullptr, nullptr, token, force});
  return env.Undefined();
}

// The byte count `field` of the job named by info[0] in `jobs`, -1 when
// there is none (received and sent).
template <typename Jobs, typename Field>
Napi::Value ChunkMover::Progress(const Napi::CallbackInfo& info, Jobs& jobs, Field field) {
  Napi::Env env = info.Env();
  uint64_t token;
  if (info.Length() < 1 || !TokenOf(info[0], &token)) return Napi::Number::New(env, -1);
  std::lock_guard<std::mutex> g(jobs_mu_);
  auto it = jobs.find(token);
  return Napi::Number::New(env, it == jobs.end() ? -1.0 : double(((*it->second).*field).load()));
}

// cancel(token): ends the job if it is still running (no callback) and forgets it.
Napi::Value ChunkMover::Cancel(const Napi::CallbackInfo& info) { return Forget(info, js_jobs_, Command::kCancel, false); }

// received(token) -> bytes received and written so far (-1: unknown job)
Napi::Value ChunkMover::Received(const Napi::CallbackInfo& info) { return Progress(info, js_jobs_, &Job::received); }

// send(token: Buffer(8), peer: worker address, fd, size, chunkBytes, window):
// sends the file's chunks to `peer` (a dup of fd is used).
Napi::Value ChunkMover::Send(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 6 || !info[0].IsBuffer() || !info[1].IsBuffer() || !info[2].IsNumber() || !info[3].IsNumber() ||
      !info[4].IsNumber() || !info[5].IsNumber()) {
    Napi::TypeError::New(env, "send(token, peerAddress, fd, size, chunkBytes, window)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Buffer<uint8_t> tok = info[0].As<Napi::Buffer<uint8_t>>();
  Napi::Buffer<uint8_t> peer = info[1].As<Napi::Buffer<uint8_t>>();
  double size = info[3].As<Napi::Number>().DoubleValue();
  double chunk = info[4].As<Napi::Number>().DoubleValue();
  uint32_t window = info[5].As<Napi::Number>().Uint32Value();
  if (tok.Length() != 8 || peer.Length() == 0 || size <= 0 || chunk <= 0 || chunk > double(1u << 30) || window == 0 || window > 1024) {
    Napi::RangeError::New(env, "send: bad token, peer address, size, chunk size or window").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!running_) {
    Napi::Error::New(env, "ChunkMover closed").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fd = DupFd(env, info[2]);
  if (fd < 0) return env.Undefined();
  auto job = std::make_shared<SendJob>();
  memcpy(&job->token, tok.Data(), 8);
  job->peer_address.assign(reinterpret_cast<const char*>(peer.Data()), peer.Length());
  job->fd = fd;
  job->size = uint64_t(size);
  job->chunk = size_t(chunk);
  job->window = window;
  {
    std::lock_guard<std::mutex> g(jobs_mu_);
    js_sends_[job->token] = job;
  }
  Enqueue(Command{Command::kSend, nullptr, job, job->token, false});
  return env.Undefined();
}

// cancelSend(token, force): stops a send job (no callback) and forgets it;
// `force` also closes the endpoint to its peer, failing what is in flight there.
Napi::Value ChunkMover::CancelSend(const Napi::CallbackInfo& info) {
  return Forget(info, js_sends_, Command::kCancelSend, info.Length() > 1 && info[1].ToBoolean().Value());
}

// sent(token) -> bytes whose sends completed (-1: unknown job)
Napi::Value ChunkMover::Sent(const Napi::CallbackInfo& info) { return Progress(info, js_sends_, &SendJob::sent); }

// endpoints() -> ucp_ep_print_info of each peer this mover has sent to
Napi::Value ChunkMover::Endpoints(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::lock_guard<std::mutex> g(jobs_mu_);
  Napi::Array a = Napi::Array::New(env, lanes_.size());
  uint32_t i = 0;
  for (auto& kv : lanes_) a.Set(i++, Napi::String::New(env, kv.second));
  return a;
}

// reserve(bufferBytes, count): has the thread prepare `count` buffers of
// that size now (allocated, touched, registered), so that the first
// transfers find them ready. Idle buffers stay bounded as ever.
Napi::Value ChunkMover::Reserve(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) {
    Napi::TypeError::New(env, "reserve(bufferBytes, count)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  double bytes = info[0].As<Napi::Number>().DoubleValue();
  double count = info[1].As<Napi::Number>().DoubleValue();
  if (!(bytes > 0) || bytes > double(1u << 30) || !(count >= 0) || count > 1024) {
    Napi::RangeError::New(env, "reserve: bad buffer size or count").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!running_) return env.Undefined();
  Command c{Command::kReserve, nullptr, nullptr, 0, false};
  c.bytes = size_t(bytes);
  c.count = unsigned(count);
  Enqueue(std::move(c));
  return env.Undefined();
}

Napi::Value ChunkMover::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("wakeups", Napi::Number::New(env, double(wakeups_.load())));
  o.Set("chunks", Napi::Number::New(env, double(chunks_.load())));
  o.Set("dropped", Napi::Number::New(env, double(dropped_.load())));
  o.Set("buffers", Napi::Number::New(env, double(buffers_.load())));
  o.Set("receiving", Napi::Number::New(env, double(live_recvs_.load())));
  o.Set("sending", Napi::Number::New(env, double(live_sends_.load())));
  std::lock_guard<std::mutex> g(jobs_mu_);
  o.Set("jobs", Napi::Number::New(env, double(js_jobs_.size())));
  o.Set("sends", Napi::Number::New(env, double(js_sends_.size())));
  return o;
}

Napi::Value ChunkMover::Close(const Napi::CallbackInfo& info) {
  Shutdown();
  return info.Env().Undefined();
}

void ChunkMover::Enqueue(Command c) {
  {
    std::lock_guard<std::mutex> g(cmd_mu_);
    commands_.push_back(std::move(c));
  }
  ucp_worker_signal(worker_);
}

void ChunkMover::Post(Result r) {
  {
    std::lock_guard<std::mutex> g(res_mu_);
    results_.push_back(std::move(r));
  }
  uv_async_send(async_);
}

void ChunkMover::OnAsync(uv_async_t* h) { static_cast<ChunkMover*>(h->data)->Deliver(); }

void ChunkMover::Deliver() {
  std::vector<Result> rs;
  {
    std::lock_guard<std::mutex> g(res_mu_);
    rs.swap(results_);
  }
  if (rs.empty() || on_done_.IsEmpty()) return;
  Napi::Env env = on_done_.Env();
  Napi::HandleScope scope(env);
  for (Result& r : rs) {
    {
      // A job JS cancelled meanwhile wants no callback.
      std::lock_guard<std::mutex> g(jobs_mu_);
      if (r.send ? js_sends_.find(r.token) == js_sends_.end() : js_jobs_.find(r.token) == js_jobs_.end()) continue;
    }
    Napi::Buffer<uint8_t> tok = Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<const uint8_t*>(&r.token), 8);
    on_done_.MakeCallback(Value(),
                          {tok, Napi::Number::New(env, r.err), Napi::Number::New(env, r.crc), Napi::Number::New(env, double(r.bytes)),
                           Napi::String::New(env, r.detail), Napi::Boolean::New(env, r.file_error), Napi::Boolean::New(env, r.send)},
                          *async_ctx_);
  }
}

void ChunkMover::Shutdown() {
  if (running_) {
    running_ = false;
    stop_ = true;
    ucp_worker_signal(worker_);
    thread_.join();
  }
  // The thread has drained (Drain): its state is ours now.
  if (stuck_ > 0) {
    // Receives UCX still holds: the worker, their buffers and the context are left to process exit.
    jobs_.clear();
    worker_ = nullptr;
    ctx_ = nullptr;
  }
  jobs_.clear();
  if (worker_) ucp_worker_destroy(worker_);
  worker_ = nullptr;
  for (auto& kv : free_bufs_)
    for (Buf* b : kv.second) {
      if (b->memh && ctx_) ucp_mem_unmap(ctx_, b->memh);
      free(b->data);
      delete b;
    }
  free_bufs_.clear();
  if (ctx_) ucp_cleanup(ctx_);
  ctx_ = nullptr;
  if (async_) {
    uv_close(reinterpret_cast<uv_handle_t*>(async_), [](uv_handle_t* h) { delete reinterpret_cast<uv_async_t*>(h); });
    async_ = nullptr;
  }
  if (!on_done_.IsEmpty()) on_done_.Reset();
  delete async_ctx_;
  async_ctx_ = nullptr;
  {
    std::lock_guard<std::mutex> g(jobs_mu_);
    js_jobs_.clear();
    js_sends_.clear();
  }
}

// --- the thread ----------------------------------------------------------------

ucs_status_t ChunkMover::OnAm(void* arg, const void* header, size_t header_length, void* data, size_t length,
                                 const ucp_am_recv_param_t* param) {
  bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  AmArrival a;
  a.token = 0;
  a.offset = 0;
  a.length = length;
  a.desc = nullptr;
  if (header_length == kHeaderBytes) {
    memcpy(&a.token, header, 8);
    a.offset = ReadBe64(static_cast<const uint8_t*>(header) + 8);
  } else {
    a.token = 0;  // no job has token 0 in practice; it is dropped below
    a.offset = UINT64_MAX;
  }
  if (rndv) {
    a.desc = data;
  } else if (length) {
    a.data.assign(static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + length);
  }
  (void)arg;
  t_arrivals->push_back(std::move(a));
  return rndv ? UCS_INPROGRESS : UCS_OK;
}

void ChunkMover::OnRecv(void* request, ucs_status_t status, size_t length, void* user_data) {
  auto* r = static_cast<Recv*>(user_data);
  r->status = status;
  r->got = length;
  r->request = nullptr;
  ucp_request_free(request);
  t_completions->push_back(r);
}

void ChunkMover::Run() {
  std::vector<AmArrival> arrivals;
  std::vector<Recv*> completions;
  std::vector<Out*> sent;
  std::vector<std::pair<Peer*, ucs_status_t>> peer_errors;
  t_arrivals = &arrivals;
  t_completions = &completions;
  t_sent = &sent;
  t_peer_errors = &peer_errors;
  uint64_t last_expire = NowMs();
  while (!stop_) {
    if (!dead_peers_.empty()) PruneDeadPeers();
    unsigned progressed = ucp_worker_progress(worker_);
    TakeCommands();
    // Arrivals first: a completion may free the window a queued arrival waits for.
    for (AmArrival& a : arrivals) {
      auto it = jobs_.find(a.token);
      if (it != jobs_.end()) {
        Accept(*it->second, a.offset, a.length, a.desc, a.desc ? nullptr : a.data.data());
        continue;
      }
      if (ended_set_.count(a.token) || a.offset == UINT64_MAX) {
        dropped_++;
        if (a.desc) ReleaseLater(a.desc);
        continue;
      }
      if (orphans_.size() >= kMaxOrphans) {
        dropped_++;
        if (orphans_.front().desc) ReleaseLater(orphans_.front().desc);
        orphans_.pop_front();
      }
      orphans_.push_back(Orphan{a.token, a.offset, a.length, a.desc, std::move(a.data), NowMs()});
    }
    bool had = !arrivals.empty() || !completions.empty() || !sent.empty() || !peer_errors.empty();
    arrivals.clear();
    for (size_t i = 0; i < completions.size(); i++) {
      Recv* r = completions[i];
      Completed(r, r->status, r->got);
    }
    completions.clear();
    for (auto& pe : peer_errors) {
      Peer* p = pe.first;
      if (p->failed) continue;
      for (SendJob* j : std::vector<SendJob*>(p->jobs.begin(), p->jobs.end()))
        FinishSend(*j, EIO, std::string("UCX endpoint to the consumer failed: ") + StatusName(pe.second));
      DropPeer(p);
    }
    peer_errors.clear();
    // Completions may come from the calls below (immediate ones are handled in place).
    for (size_t i = 0; i < sent.size(); i++) SendDone(sent[i], sent[i]->status);
    sent.clear();
    for (auto it = sends_.begin(); it != sends_.end();) {
      if (it->second->cancelled && it->second->sends.empty()) it = sends_.erase(it);
      else ++it;
    }
    ReapCloses();
    // Jobs JS forgot and whose receives have all ended go now; late chunks of theirs are dropped.
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      Job& j = *it->second;
      if (j.cancelled && j.recvs.empty()) {
        Ended(j.token);
        it = jobs_.erase(it);
      } else {
        ++it;
      }
    }
    for (void* d : to_release_) ucp_am_data_release(worker_, d);
    to_release_.clear();
    uint64_t now = NowMs();
    if (now - last_expire > 1000) {
      ExpireOrphans(now);
      last_expire = now;
    }
    if (progressed || had) continue;
    ucs_status_t st = ucp_worker_arm(worker_);
    if (st == UCS_ERR_BUSY) continue;
    {
      std::lock_guard<std::mutex> g(cmd_mu_);
      if (!commands_.empty()) continue;
    }
    if (stop_) break;
    struct pollfd p = {efd_, POLLIN, 0};
    poll(&p, 1, kPollMs);
    wakeups_++;
  }
  Drain(arrivals, completions);
  t_arrivals = nullptr;
  t_completions = nullptr;
  t_sent = nullptr;
  t_peer_errors = nullptr;
}

// Stopping: drops every job and message, then gives receives in flight up
// to kDrainMs to end (UCX 1.13 aborts in ucp_worker_destroy while an
// endpoint still has a rendezvous receive). What is left then is counted,
// and Shutdown leaves the worker to process exit.
void ChunkMover::Drain(std::vector<AmArrival>& arrivals, std::vector<Recv*>& completions) {
  for (auto& kv : jobs_) {
    Job& j = *kv.second;
    j.cancelled = true;
    Forget(j);
    for (Recv* r : j.recvs)
      if (r->request) ucp_request_cancel(worker_, r->request);
  }
  for (Orphan& o : orphans_)
    if (o.desc) ReleaseLater(o.desc);
  orphans_.clear();
  for (auto& kv : sends_) {
    SendJob& j = *kv.second;
    j.cancelled = true;
    FinishSend(j, ECANCELED, "closing");
  }
  // Forced closes complete every send still in flight (UCS_ERR_CANCELED).
  for (auto& kv : std::vector<Peer*>([this] {
         std::vector<Peer*> v;
         for (auto& p : peers_) v.push_back(p.second.get());
         return v;
       }()))
    DropPeer(kv);
  auto in_flight = [this] {
    size_t n = closing_.size();
    for (auto& kv : jobs_) n += kv.second->recvs.size();
    for (auto& kv : sends_) n += kv.second->sends.size();
    return n;
  };
  uint64_t deadline = NowMs() + kDrainMs;
  for (;;) {
    for (AmArrival& a : arrivals)
      if (a.desc) ReleaseLater(a.desc);
    arrivals.clear();
    for (Recv* r : completions) Completed(r, r->status, r->got);
    completions.clear();
    for (Out* o : *t_sent) SendDone(o, o->status);
    t_sent->clear();
    t_peer_errors->clear();
    ReapCloses();
    for (void* d : to_release_) ucp_am_data_release(worker_, d);
    to_release_.clear();
    if (in_flight() == 0 || NowMs() > deadline) break;
    if (!ucp_worker_progress(worker_)) usleep(1000);
  }
  stuck_ = in_flight();
}

void ChunkMover::TakeCommands() {
  std::vector<Command> cmds;
  {
    std::lock_guard<std::mutex> g(cmd_mu_);
    if (commands_.empty()) return;
    cmds.swap(commands_);
  }
  for (Command& c : cmds) {
    switch (c.kind) {
      case Command::kStart: StartJob(c.job); break;
      case Command::kCancel: CancelJob(c.token); break;
      case Command::kSend: StartSend(c.sjob); break;
      case Command::kCancelSend: CancelSendJob(c.token, c.force); break;
      case Command::kReserve: ReserveBufs(c.bytes, c.count); break;
    }
  }
}

void ChunkMover::StartJob(const std::shared_ptr<Job>& job) {
  if (jobs_.count(job->token)) {
    close(job->fd);
    job->fd = -1;
    job->finished = true;
    Post(Result{job->token, EEXIST, 0, 0, false, "a job with this token is already running", false});
    return;
  }
  jobs_[job->token] = job;
  // Chunks that overtook the job (they travel apart from the control messages).
  std::deque<Orphan> keep;
  std::vector<Orphan> mine;
  for (Orphan& o : orphans_) {
    if (o.token == job->token) mine.push_back(std::move(o));
    else keep.push_back(std::move(o));
  }
  orphans_.swap(keep);
  for (Orphan& o : mine) Accept(*job, o.offset, o.length, o.desc, o.desc ? nullptr : o.data.data());
}

// Remembers a receive job's token for a while, so its late chunks are dropped at once.
void ChunkMover::Ended(uint64_t token) {
  if (!ended_set_.insert(token).second) return;
  ended_.push_back(token);
  if (ended_.size() > kRecentTokens) {
    ended_set_.erase(ended_.front());
    ended_.pop_front();
  }
}

void ChunkMover::CancelJob(uint64_t token) {
  for (auto it = orphans_.begin(); it != orphans_.end();) {
    if (it->token == token) {
      if (it->desc) ReleaseLater(it->desc);
      it = orphans_.erase(it);
    } else {
      ++it;
    }
  }
  auto it = jobs_.find(token);
  if (it == jobs_.end()) {
    // A pull that failed before its job started: its chunks may still come.
    Ended(token);
    return;
  }
  Job& j = *it->second;
  j.cancelled = true;
  if (!j.finished) Forget(j);
  // Receives in flight end (cancelled or not) before the job goes: their buffers are UCX's until then.
  for (Recv* r : j.recvs)
    if (r->request) ucp_request_cancel(worker_, r->request);
}

// Stops writing: closes the file, releases queued messages and held buffers.
void ChunkMover::Forget(Job& j) {
  j.finished = true;
  if (j.fd >= 0) close(j.fd);
  j.fd = -1;
  for (auto& p : j.pending) ReleaseLater(p.second.first);
  j.pending.clear();
  for (auto& h : j.held) {
    GiveBuf(h.second.first);
    j.in_use--;
  }
  j.held.clear();
}

void ChunkMover::Finish(Job& j, int err, const std::string& detail, bool file_error) {
  if (j.finished) return;
  uint32_t crc = j.crc;
  uint64_t bytes = j.received.load();
  Forget(j);
  Post(Result{j.token, err, crc, bytes, file_error, detail, false});
}

void ChunkMover::Accept(Job& j, uint64_t offset, size_t length, void* desc, const uint8_t* eager) {
  if (j.finished) {
    dropped_++;
    if (desc) ReleaseLater(desc);
    return;
  }
  uint64_t idx = offset / j.chunk;
  size_t want = offset < j.size ? size_t(std::min<uint64_t>(j.chunk, j.size - offset)) : 0;
  if (offset % j.chunk != 0 || offset >= j.size || length != want || j.seen[idx]) {
    if (desc) ReleaseLater(desc);
    Finish(j, EPROTO, "protocol error: bad chunk at offset " + std::to_string(offset) + " of " + std::to_string(length) + " bytes");
    return;
  }
  j.seen[idx] = true;
  chunks_++;
  if (!desc) {
    // Eager data (small chunks): already here, so it needs no window.
    Buf* b = TakeBuf(j.chunk);
    if (!b) return Finish(j, ENOMEM, "no memory for a chunk buffer", true);
    memcpy(b->data, eager, length);
    j.in_use++;
    Landed(j, offset, b, length);
    return;
  }
  j.pending[offset] = {desc, length};
  Pump(j);
}

void ChunkMover::Pump(Job& j) {
  while (!j.finished && !j.pending.empty() && j.in_use < j.max_bufs) {
    auto first = j.pending.begin();
    uint64_t offset = first->first;
    if (offset >= j.crc_to + uint64_t(j.max_bufs) * j.chunk) break;
    Buf* b = TakeBuf(j.chunk);
    if (!b) return Finish(j, ENOMEM, "no memory for a chunk buffer", true);
    void* desc = first->second.first;
    size_t length = first->second.second;
    j.pending.erase(first);
    j.in_use++;
    auto* r = new Recv();
    live_recvs_++;
    r->job = jobs_[j.token];
    r->offset = offset;
    r->length = length;
    r->buf = b;
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_RECV_INFO;
    p.cb.recv_am = OnRecv;
    p.user_data = r;
    p.recv_info.length = &r->got;
    if (b->memh) {
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      p.memh = b->memh;
    }
    j.recvs.insert(r);
    // UCX owns the descriptor from here on, even if the call fails.
    ucs_status_ptr_t sp = ucp_am_recv_data_nbx(worker_, desc, b->data, length, &p);
    if (UCS_PTR_IS_ERR(sp)) {
      Completed(r, UCS_PTR_STATUS(sp), 0);
    } else if (sp == nullptr) {
      Completed(r, UCS_OK, r->got);
    } else {
      r->request = sp;
    }
  }
}

void ChunkMover::Completed(Recv* r, ucs_status_t status, size_t length) {
  std::shared_ptr<Job> job = r->job;
  Job& j = *job;
  j.recvs.erase(r);
  Buf* b = r->buf;
  uint64_t offset = r->offset;
  size_t want = r->length;
  delete r;
  live_recvs_--;
  if (j.finished) {
    GiveBuf(b);
    j.in_use--;
    return;
  }
  if (status != UCS_OK || length != want) {
    GiveBuf(b);
    j.in_use--;
    std::string why = status != UCS_OK ? std::string("UCX receive failed: ") + StatusName(status)
                                       : "chunk at " + std::to_string(offset) + ": " + std::to_string(length) + " of " + std::to_string(want) + " bytes arrived";
    return Finish(j, status == UCS_ERR_CANCELED ? ECANCELED : EIO, why);
  }
  Landed(j, offset, b, length);
  if (!j.finished) Pump(j);
}

void ChunkMover::Landed(Job& j, uint64_t offset, Buf* b, size_t length) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = pwrite(j.fd, b->data + done, length - done, off_t(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int e = n < 0 ? errno : EIO;
      GiveBuf(b);
      j.in_use--;
      return Finish(j, e, strerror(e), true);
    }
    done += size_t(n);
  }
  j.received.fetch_add(length);
  j.held[offset] = {b, length};
  while (!j.held.empty() && j.held.begin()->first == j.crc_to) {
    auto h = j.held.begin();
    const uint8_t* d = h->second.first->data;
    size_t n = h->second.second;
    j.crc = j.algo == 1 ? Crc32c(j.crc, d, n) : Crc32(j.crc, d, n);
    j.crc_to += n;
    GiveBuf(h->second.first);
    j.in_use--;
    j.held.erase(h);
  }
  if (j.received.load() == j.size) Finish(j, 0, "");
}

// --- the send side (the thread) --------------------------------------------------

void ChunkMover::OnSend(void* request, ucs_status_t status, void* user_data) {
  auto* o = static_cast<Out*>(user_data);
  o->status = status;
  o->request = nullptr;
  ucp_request_free(request);
  t_sent->push_back(o);
}

void ChunkMover::OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  t_peer_errors->push_back({static_cast<Peer*>(arg), status});
}

ChunkMover::Peer* ChunkMover::PeerFor(const std::string& address, std::string* why) {
  auto it = peers_.find(address);
  if (it != peers_.end() && !it->second->failed) return it->second.get();
  // Consumers come and go (a restarted daemon has a new address): do not keep them all.
  if (peers_.size() >= kMaxPeers) {
    for (auto& kv : peers_) {
      if (kv.second->jobs.empty()) {
        DropPeer(kv.second.get());
        break;
      }
    }
  }
  auto p = std::make_unique<Peer>();
  p->address = address;
  ucp_ep_params_t ep;
  memset(&ep, 0, sizeof(ep));
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
  ep.err_mode = peer_errors_ ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  ep.err_handler.cb = OnPeerError;
  ep.err_handler.arg = p.get();
  ucs_status_t st = ucp_ep_create(worker_, &ep, &p->ep);
  if (st != UCS_OK) {
    *why = StatusName(st);
    return nullptr;
  }
  Peer* raw = p.get();
  peers_[address] = std::move(p);
  return raw;
}

// Frees the endpoint-close requests that have completed; their peers are then closed.
void ChunkMover::ReapCloses() {
  for (size_t i = 0; i < closing_.size();) {
    if (ucp_request_check_status(closing_[i].first) != UCS_INPROGRESS) {
      ucp_request_free(closing_[i].first);
      closing_[i].second->closed = true;
      closing_[i] = closing_.back();
      closing_.pop_back();
    } else {
      i++;
    }
  }
}

// Frees dropped peers whose close completed. Called before progress, when
// no callback of this pass can still name them.
void ChunkMover::PruneDeadPeers() {
  for (size_t i = 0; i < dead_peers_.size();) {
    if (dead_peers_[i]->closed) {
      dead_peers_[i] = std::move(dead_peers_.back());
      dead_peers_.pop_back();
    } else {
      i++;
    }
  }
}

// Records the lanes UCX chose for a peer (once data has moved, wire-up is done), for JS.
void ChunkMover::Describe(Peer* p) {
  p->described = true;
  char* buf = nullptr;
  size_t len = 0;
  FILE* f = open_memstream(&buf, &len);
  if (!f) return;
  ucp_ep_print_info(p->ep, f);
  fclose(f);
  std::lock_guard<std::mutex> g(jobs_mu_);
  lanes_[p->address] = std::string(buf ? buf : "", len);
  free(buf);
}

// Closes the endpoint with force (its sends complete as cancelled). The Peer
// stays allocated: UCX may still name it in an error callback.
void ChunkMover::DropPeer(Peer* p) {
  if (p->failed) return;
  p->failed = true;
  ucp_request_param_t rp;
  memset(&rp, 0, sizeof(rp));
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  rp.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t sp = ucp_ep_close_nbx(p->ep, &rp);
  if (sp != nullptr && !UCS_PTR_IS_ERR(sp)) closing_.push_back({sp, p});
  else p->closed = true;
  {
    std::lock_guard<std::mutex> g(jobs_mu_);
    lanes_.erase(p->address);
  }
  auto it = peers_.find(p->address);
  if (it != peers_.end() && it->second.get() == p) {
    dead_peers_.push_back(std::move(it->second));
    peers_.erase(it);
  }
}

void ChunkMover::StartSend(const std::shared_ptr<SendJob>& job) {
  if (sends_.count(job->token)) {
    close(job->fd);
    job->fd = -1;
    job->finished = true;
    Post(Result{job->token, EEXIST, 0, 0, false, "a send with this token is already running", true});
    return;
  }
  sends_[job->token] = job;
  std::string why;
  Peer* p = PeerFor(job->peer_address, &why);
  if (!p) return FinishSend(*job, EHOSTUNREACH, "cannot reach the consumer over UCX: " + why);
  job->peer = p;
  p->jobs.insert(job.get());
  PumpSend(*job);
}

void ChunkMover::CancelSendJob(uint64_t token, bool force) {
  auto it = sends_.find(token);
  if (it == sends_.end()) return;
  SendJob& j = *it->second;
  j.cancelled = true;
  Peer* p = j.peer;
  if (!j.finished) {
    j.finished = true;
    if (j.fd >= 0) close(j.fd);
    j.fd = -1;
    if (p) p->jobs.erase(&j);
    j.peer = nullptr;
  }
  // A consumer that stopped taking chunks holds our sends: only closing its endpoint ends them.
  if (force && p && !p->failed) {
    for (SendJob* other : std::vector<SendJob*>(p->jobs.begin(), p->jobs.end()))
      FinishSend(*other, EIO, "UCX endpoint to the consumer closed: another transfer to it timed out");
    DropPeer(p);
  }
}

void ChunkMover::FinishSend(SendJob& j, int err, const std::string& detail, bool file_error) {
  if (j.finished) return;
  j.finished = true;
  if (j.fd >= 0) close(j.fd);
  j.fd = -1;
  if (j.peer) j.peer->jobs.erase(&j);
  j.peer = nullptr;
  Post(Result{j.token, err, 0, j.sent.load(), file_error, detail, true});
}

void ChunkMover::PumpSend(SendJob& j) {
  while (!j.finished && j.sends.size() < j.window && j.next < j.size) {
    if (!j.peer || j.peer->failed) return FinishSend(j, EIO, "UCX endpoint to the consumer closed");
    size_t len = size_t(std::min<uint64_t>(j.chunk, j.size - j.next));
    Buf* b = TakeBuf(j.chunk);
    if (!b) return FinishSend(j, ENOMEM, "no memory for a chunk buffer", true);
    size_t got = 0;
    while (got < len) {
      ssize_t n = pread(j.fd, b->data + got, len - got, off_t(j.next + got));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int e = n < 0 ? errno : 0;
        GiveBuf(b);
        if (e) return FinishSend(j, e, "read error at byte " + std::to_string(j.next + got) + " of " + std::to_string(j.size) + ": " + strerror(e), true);
        return FinishSend(j, EIO, "file shrank while sending (" + std::to_string(j.next + got) + " of " + std::to_string(j.size) + " bytes)", true);
      }
      got += size_t(n);
    }
    auto* o = new Out();
    live_sends_++;
    o->job = sends_[j.token];
    o->buf = b;
    o->offset = j.next;
    o->length = len;
    memcpy(o->header, &j.token, 8);
    for (int i = 0; i < 8; i++) o->header[8 + i] = uint8_t(o->offset >> (56 - 8 * i));
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    p.cb.send = OnSend;
    p.user_data = o;
    p.flags = UCP_AM_SEND_FLAG_RNDV;
    if (b->memh) {
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      p.memh = b->memh;
    }
    j.next += len;
    j.sends.insert(o);
    ucs_status_ptr_t sp = ucp_am_send_nbx(j.peer->ep, am_id_, o->header, sizeof(o->header), b->data, len, &p);
    if (sp == nullptr) {
      SendDone(o, UCS_OK);
    } else if (UCS_PTR_IS_ERR(sp)) {
      SendDone(o, UCS_PTR_STATUS(sp));
    } else {
      o->request = sp;
    }
  }
}

void ChunkMover::SendDone(Out* o, ucs_status_t status) {
  std::shared_ptr<SendJob> job = o->job;
  SendJob& j = *job;
  j.sends.erase(o);
  GiveBuf(o->buf);
  size_t len = o->length;
  delete o;
  live_sends_--;
  if (j.finished) return;
  if (status != UCS_OK) {
    return FinishSend(j, status == UCS_ERR_CANCELED ? ECANCELED : EIO, std::string("UCX send failed: ") + StatusName(status));
  }
  j.sent.fetch_add(len);
  if (j.peer && !j.peer->described) Describe(j.peer);
  if (j.sent.load() == j.size) return FinishSend(j, 0, "");
  PumpSend(j);
}

void ChunkMover::ExpireOrphans(uint64_t now_ms) {
  while (!orphans_.empty() && now_ms - orphans_.front().since_ms > kOrphanMs) {
    dropped_++;
    if (orphans_.front().desc) ReleaseLater(orphans_.front().desc);
    orphans_.pop_front();
  }
}

ChunkMover::Buf* ChunkMover::TakeBuf(size_t size) {
  auto& fl = free_bufs_[size];
  if (!fl.empty()) {
    Buf* b = fl.back();
    fl.pop_back();
    idle_buf_bytes_ -= size;
    return b;
  }
  return NewBuf(size);
}

ChunkMover::Buf* ChunkMover::NewBuf(size_t size) {
  size_t rounded = (size + 4095) & ~size_t(4095);
  void* mem = aligned_alloc(4096, rounded);
  if (!mem) return nullptr;
  auto* b = new Buf();
  b->data = static_cast<uint8_t*>(mem);
  b->size = size;
  // Registration lets RDMA transports receive in place; on tcp it is cheap.
  ucp_mem_map_params_t mp;
  memset(&mp, 0, sizeof(mp));
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  mp.address = mem;
  mp.length = rounded;
  if (ucp_mem_map(ctx_, &mp, &b->memh) != UCS_OK) b->memh = nullptr;
  buffers_++;
  return b;
}

// Allocates and touches `count` buffers of `size` bytes, then keeps them
// for the jobs to come. A fresh buffer costs one page fault per 4 KiB when
// first filled (about 15 us each on the project VM, so 40 ms for a pull's
// 10 x 512 KiB); done ahead, on this thread, the first pull does not pay it.
void ChunkMover::ReserveBufs(size_t size, unsigned count) {
  std::vector<Buf*> fresh;
  while (free_bufs_[size].size() + fresh.size() < count && idle_buf_bytes_ + (fresh.size() + 1) * size <= kIdleBufBytes) {
    Buf* b = NewBuf(size);
    if (!b) break;
    for (size_t i = 0; i < size; i += 4096) b->data[i] = 0;
    fresh.push_back(b);
  }
  for (Buf* b : fresh) GiveBuf(b);
}

void ChunkMover::GiveBuf(Buf* b) {
  if (idle_buf_bytes_ + b->size <= kIdleBufBytes && ctx_) {
    free_bufs_[b->size].push_back(b);
    idle_buf_bytes_ += b->size;
    return;
  }
  if (b->memh && ctx_) ucp_mem_unmap(ctx_, b->memh);
  free(b->data);
  delete b;
  buffers_--;
}

}  // namespace dyaducx
