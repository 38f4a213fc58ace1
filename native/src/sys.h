// Plain system-call wrappers; see sys.cc.
#pragma once
#include <napi.h>

Napi::Value Fallocate(const Napi::CallbackInfo& info);
Napi::Value Lseek(const Napi::CallbackInfo& info);
Napi::Value ReadDir(const Napi::CallbackInfo& info);
Napi::Value Utimens(const Napi::CallbackInfo& info);
Napi::Value FdsLinkingTo(const Napi::CallbackInfo& info);
Napi::Value Fsetxattr(const Napi::CallbackInfo& info);
Napi::Value Removexattr(const Napi::CallbackInfo& info);
Napi::Value Lgetxattr(const Napi::CallbackInfo& info);
Napi::Value Lsetxattr(const Napi::CallbackInfo& info);
