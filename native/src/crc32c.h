// CRC-32C (Castagnoli), the checksum with an instruction of its own on
// x86-64 (SSE4.2); see crc32c.cc.
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>

// Extends `crc` (0 to start; the finished value of earlier bytes to chain)
// with n bytes, with the usual pre- and post-inversion. `portable` skips
// the instruction (tests compare both paths).
uint32_t Crc32c(uint32_t crc, const uint8_t* p, size_t n, bool portable = false);

Napi::Value Crc32cJs(const Napi::CallbackInfo& info);
