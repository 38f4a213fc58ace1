// Acting for a caller: the file system credentials of the calling thread.
#pragma once
#include <napi.h>

Napi::Value ActAs(const Napi::CallbackInfo& info);
Napi::Value ActAsSelf(const Napi::CallbackInfo& info);
Napi::Value AccessAs(const Napi::CallbackInfo& info);
Napi::Value CanActAs(const Napi::CallbackInfo& info);
