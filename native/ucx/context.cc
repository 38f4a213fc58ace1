// Opening a UCP context and one single-threaded worker from a JS options
// object: shared by Worker (driven from the JS thread) and ChunkMover
// (driven by a thread of its own), which differ only in features.
#include <cstring>

#include "ucx.h"

namespace dyaducx {

// Applies `config` (UCX option names without "UCX_") over the environment,
// then creates the context and worker. On failure nothing is left open and
// a JS exception is pending; returns false.
bool OpenWorker(Napi::Env env, Napi::Value config, const std::string& name, uint64_t features, ucp_context_h* ctx,
                ucp_worker_h* worker) {
  *ctx = nullptr;
  *worker = nullptr;
  ucp_config_t* cfg = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &cfg);
  if (st != UCS_OK) {
    StatusError(env, st, "ucp_config_read").ThrowAsJavaScriptException();
    return false;
  }
  if (config.IsObject()) {
    Napi::Object o = config.As<Napi::Object>();
    Napi::Array keys = o.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); i++) {
      std::string k = keys.Get(i).ToString().Utf8Value();
      std::string v = o.Get(k).ToString().Utf8Value();
      st = ucp_config_modify(cfg, k.c_str(), v.c_str());
      if (st != UCS_OK) {
        ucp_config_release(cfg);
        StatusError(env, st, "UCX option " + k + "=" + v).ThrowAsJavaScriptException();
        return false;
      }
    }
  }
  ucp_params_t params;
  memset(&params, 0, sizeof(params));
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
  params.features = features;
  params.mt_workers_shared = 0;
  params.name = name.c_str();
  st = ucp_init(&params, cfg, ctx);
  ucp_config_release(cfg);
  if (st != UCS_OK) {
    *ctx = nullptr;
    StatusError(env, st, "ucp_init").ThrowAsJavaScriptException();
    return false;
  }
  ucp_worker_params_t wp;
  memset(&wp, 0, sizeof(wp));
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE | UCP_WORKER_PARAM_FIELD_NAME;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  wp.name = name.c_str();
  st = ucp_worker_create(*ctx, &wp, worker);
  if (st != UCS_OK) {
    *worker = nullptr;
    ucp_cleanup(*ctx);
    *ctx = nullptr;
    StatusError(env, st, "ucp_worker_create").ThrowAsJavaScriptException();
    return false;
  }
  return true;
}

}  // namespace dyaducx
