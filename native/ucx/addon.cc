// The optional UCX half of dyad-fs's native code: a generic libucp binding
// (contexts, workers, endpoints, active messages, RMA get, registration),
// and a worker on a thread of its own that receives chunked messages into files.
// Built only where libucx-dev is installed; see binding.gyp.
#include <napi.h>
#include <ucp/api/ucp.h>

#include "mover.h"
#include "ucx.h"

namespace {

Napi::Value Version(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), ucp_get_version_string()); }

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* ctors = new dyaducx::Ctors();
  ctors->endpoint = Napi::Persistent(dyaducx::Endpoint::Init(env));
  ctors->region = Napi::Persistent(dyaducx::Region::Init(env));
  ctors->rkey = Napi::Persistent(dyaducx::RemoteKey::Init(env));
  env.SetInstanceData<dyaducx::Ctors>(ctors);
  exports.Set("Worker", dyaducx::Worker::Init(env));
  exports.Set("ChunkMover", dyaducx::ChunkMover::Init(env));
  exports.Set("version", Napi::Function::New(env, Version));
  Napi::Object flags = Napi::Object::New(env);
  flags.Set("reply", Napi::Number::New(env, UCP_AM_SEND_FLAG_REPLY));
  flags.Set("eager", Napi::Number::New(env, UCP_AM_SEND_FLAG_EAGER));
  flags.Set("rndv", Napi::Number::New(env, UCP_AM_SEND_FLAG_RNDV));
  exports.Set("amFlags", flags);
  return exports;
}

}  // namespace

NODE_API_MODULE(dyaducx, Init)
