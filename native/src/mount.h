// Mount helpers exported to JavaScript; see mount.cc.
#pragma once
#include <napi.h>

Napi::Value OpenDevice(const Napi::CallbackInfo& info);
Napi::Value Mount(const Napi::CallbackInfo& info);
Napi::Value Umount(const Napi::CallbackInfo& info);
Napi::Value CloseFd(const Napi::CallbackInfo& info);
Napi::Value FusermountMount(const Napi::CallbackInfo& info);
