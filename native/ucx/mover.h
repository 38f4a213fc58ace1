// A UCX worker of its own, driven by a thread of its own, that moves files
// as chunked active messages: it sends a file's chunks (pread, send) and
// receives them straight into files (receive, pwrite, CRC), all off the JS
// thread.
//
// Why: with the JS-driven Worker (worker.cc) a consumer's event loop ran
// UCX progress, a completion Promise, a write and a CRC for every 512 KiB
// chunk, about 0.5 CPU-s per GiB (1 s with 16 pulls in flight), and the
// same thread serves FUSE; the owner's loop did the reads and sends. A pull
// then ran at 0.6-1.3 GB/s where UCX alone moves 4-5 GB/s between the same
// processes. TCP pulls had the same limit until native/src/receiver.cc and
// sender.cc; this is the UCX counterpart.
//
// Each chunk is an active message whose 16-byte header is an 8-byte job
// token and a big-endian u64 file offset. JS registers a job per token,
// receive (file descriptor, size, chunk size, buffer budget, digest) or
// send (peer worker address, file descriptor, size, chunk size, window),
// and gets one callback when the job ends: every byte written and
// checksummed (or sent), or the first error. Chunks that arrive before
// their receive job is registered wait (a bounded number, for a bounded
// time); chunks of a job that ended are dropped, which completes their sends.
//
// Threading: the UCX worker (UCS_THREAD_MODE_SINGLE) is touched only by the
// thread after construction. JS talks to the thread through a mutex-guarded
// command queue and ucp_worker_signal; the thread reports through a second
// queue and a uv_async handle. Nothing here knows what a file is for.
#pragma once

#include <napi.h>
#include <ucp/api/ucp.h>
#include <uv.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace dyaducx {

struct AmArrival;  // a chunk message seen inside ucp_worker_progress (mover.cc)

class ChunkMover : public Napi::ObjectWrap<ChunkMover> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit ChunkMover(const Napi::CallbackInfo& info);
  ~ChunkMover() override;

  struct Buf;
  struct Job;
  struct Recv;
  struct SendJob;
  struct Out;  // one chunk being sent
  struct Peer;

 private:
  struct Orphan {
    uint64_t token;
    uint64_t offset;
    size_t length;
    void* desc;      // rendezvous descriptor, or null for eager data
    std::vector<uint8_t> data;
    uint64_t since_ms;
  };
  struct Result {
    uint64_t token;
    int err;
    uint32_t crc;
    uint64_t bytes;
    bool file_error;  // errno came from the file, not from the peer
    std::string detail;
    bool send;        // a send job's result
  };
  struct Command {
    enum Kind { kStart, kCancel, kSend, kCancelSend, kReserve } kind;
    std::shared_ptr<Job> job;       // kStart
    std::shared_ptr<SendJob> sjob;  // kSend
    uint64_t token;
    bool force;  // kCancelSend: also close the peer's endpoint (it stopped taking chunks)
    size_t bytes = 0;     // kReserve: buffer size
    unsigned count = 0;   // kReserve: how many
  };

  // JS API
  Napi::Value Address(const Napi::CallbackInfo& info);
  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Received(const Napi::CallbackInfo& info);
  Napi::Value Send(const Napi::CallbackInfo& info);
  Napi::Value CancelSend(const Napi::CallbackInfo& info);
  Napi::Value Sent(const Napi::CallbackInfo& info);
  Napi::Value Reserve(const Napi::CallbackInfo& info);
  template <typename Jobs>
  Napi::Value Forget(const Napi::CallbackInfo& info, Jobs& jobs, int kind, bool force);
  template <typename Jobs, typename Field>
  Napi::Value Progress(const Napi::CallbackInfo& info, Jobs& jobs, Field field);
  Napi::Value Endpoints(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  // The thread
  void Run();
  void Drain(std::vector<AmArrival>& arrivals, std::vector<Recv*>& completions);
  void TakeCommands();
  void StartJob(const std::shared_ptr<Job>& job);
  void CancelJob(uint64_t token);
  void Accept(Job& job, uint64_t offset, size_t length, void* desc, const uint8_t* eager);
  void Pump(Job& job);
  void Completed(Recv* r, ucs_status_t status, size_t length);
  void Landed(Job& job, uint64_t offset, Buf* buf, size_t length);
  void Finish(Job& job, int err, const std::string& detail, bool file_error = false);
  void Forget(Job& job);
  void ExpireOrphans(uint64_t now_ms);
  void Ended(uint64_t token);
  // Send side (the thread)
  void StartSend(const std::shared_ptr<SendJob>& job);
  void CancelSendJob(uint64_t token, bool force);
  void PumpSend(SendJob& job);
  void SendDone(Out* o, ucs_status_t status);
  void FinishSend(SendJob& job, int err, const std::string& detail, bool file_error = false);
  Peer* PeerFor(const std::string& address, std::string* why);
  void DropPeer(Peer* p);
  void Describe(Peer* p);
  void ReapCloses();
  void PruneDeadPeers();
  static void OnSend(void* request, ucs_status_t status, void* user_data);
  static void OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t status);
  void ReleaseLater(void* desc) { to_release_.push_back(desc); }
  Buf* TakeBuf(size_t size);
  Buf* NewBuf(size_t size);
  void ReserveBufs(size_t size, unsigned count);
  void GiveBuf(Buf* b);
  void Post(Result r);
  void Enqueue(Command c);  // JS -> thread

  static ucs_status_t OnAm(void* arg, const void* header, size_t header_length, void* data, size_t length,
                           const ucp_am_recv_param_t* param);
  static void OnRecv(void* request, ucs_status_t status, size_t length, void* user_data);
  static void OnAsync(uv_async_t* h);
  void Deliver();
  void Shutdown();

  ucp_context_h ctx_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string address_;
  int efd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  size_t stuck_ = 0;  // receives still in flight after Drain
  bool running_ = false;

  // JS -> thread
  std::mutex cmd_mu_;
  std::vector<Command> commands_;
  // thread -> JS
  std::mutex res_mu_;
  std::vector<Result> results_;
  uv_async_t* async_ = nullptr;
  Napi::FunctionReference on_done_;
  Napi::AsyncContext* async_ctx_ = nullptr;

  // Shared: the jobs JS knows about, for Received(); the Job's counters are atomic.
  std::mutex jobs_mu_;
  std::unordered_map<uint64_t, std::shared_ptr<Job>> js_jobs_;
  std::unordered_map<uint64_t, std::shared_ptr<SendJob>> js_sends_;
  std::map<std::string, std::string> lanes_;  // peer address -> ucp_ep_print_info

  // Thread-only state
  std::unordered_map<uint64_t, std::shared_ptr<Job>> jobs_;
  std::unordered_map<uint64_t, std::shared_ptr<SendJob>> sends_;
  std::unordered_map<std::string, std::unique_ptr<Peer>> peers_;
  std::vector<std::pair<void*, Peer*>> closing_;  // endpoint close requests in flight
  std::vector<std::unique_ptr<Peer>> dead_peers_;  // dropped, freed once closed
  bool peer_errors_ = true;
  unsigned am_id_ = 1;
  std::deque<Orphan> orphans_;
  std::deque<uint64_t> ended_;  // tokens of receive jobs that ended, oldest first
  std::unordered_set<uint64_t> ended_set_;
  std::vector<void*> to_release_;
  std::map<size_t, std::vector<Buf*>> free_bufs_;
  size_t idle_buf_bytes_ = 0;

  // Statistics (written by the thread, read by JS)
  std::atomic<uint64_t> wakeups_{0};
  std::atomic<uint64_t> chunks_{0};
  std::atomic<uint64_t> dropped_{0};
  std::atomic<uint64_t> buffers_{0};
  std::atomic<uint64_t> live_recvs_{0};  // chunk receives UCX holds
  std::atomic<uint64_t> live_sends_{0};  // chunk sends UCX holds
};

}  // namespace dyaducx
