// CRC-32C for the content digest of transferred files.
//
// Why native: the consumer of a pull checksums every byte it receives, and
// zlib's CRC-32 was the largest single cost of a pull on the project VM
// (about a third of the consumer's CPU). CRC-32C has an instruction on
// x86-64; three independent streams keep it busy (its latency is three
// cycles, its throughput one), and the three partial CRCs are joined by
// multiplying by x^(8*kLane) modulo the polynomial, done with tables.
// Elsewhere a table-driven loop computes the same values.
#include "crc32c.h"

#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace {

constexpr uint32_t kPoly = 0x82f63b78;  // reflected Castagnoli polynomial
constexpr size_t kLane = 4096;          // bytes per stream in a 3-stream block

struct Tables {
  uint32_t byte[8][256];   // slice-by-8, for the portable path and tails
  uint32_t shift[4][256];  // multiply by x^(8*kLane) mod P, a byte at a time
  bool hw = false;
};

// a * b modulo P, in the reflected bit order (x^0 is the top bit).
uint32_t MulModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return product;
}

Tables Build() {
  Tables t;
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t.byte[0][n] = c;
  }
  for (uint32_t n = 0; n < 256; n++) {
    for (int k = 1; k < 8; k++) t.byte[k][n] = (t.byte[k - 1][n] >> 8) ^ t.byte[0][t.byte[k - 1][n] & 0xff];
  }
  // x^(8*kLane): start from x^0 and multiply by x once per bit.
  uint32_t xpow = 1u << 31;
  for (size_t i = 0; i < 8 * kLane; i++) xpow = (xpow & 1) ? (xpow >> 1) ^ kPoly : xpow >> 1;
  for (int k = 0; k < 4; k++) {
    for (uint32_t n = 0; n < 256; n++) t.shift[k][n] = MulModP(xpow, n << (8 * k));
  }
#if defined(__x86_64__)
  t.hw = __builtin_cpu_supports("sse4.2");
#endif
  return t;
}

const Tables& T() {
  static const Tables t = Build();
  return t;
}

// The CRC register after kLane zero bytes more, i.e. times x^(8*kLane).
inline uint32_t Shift(const Tables& t, uint32_t c) {
  return t.shift[0][c & 0xff] ^ t.shift[1][(c >> 8) & 0xff] ^ t.shift[2][(c >> 16) & 0xff] ^ t.shift[3][c >> 24];
}

// Register-level update (no inversions), portable.
uint32_t Soft(const Tables& t, uint32_t c, const uint8_t* p, size_t n) {
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);  // little-endian hosts only, like the rest of the addon
    v ^= c;
    c = t.byte[7][v & 0xff] ^ t.byte[6][(v >> 8) & 0xff] ^ t.byte[5][(v >> 16) & 0xff] ^ t.byte[4][(v >> 24) & 0xff] ^
        t.byte[3][(v >> 32) & 0xff] ^ t.byte[2][(v >> 40) & 0xff] ^ t.byte[1][(v >> 48) & 0xff] ^ t.byte[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t.byte[0][(c ^ *p++) & 0xff];
  return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t Hard(const Tables& t, uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c0 = crc;
  while (n >= 3 * kLane) {
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < kLane; i += 8) {
      uint64_t a, b, d;
      memcpy(&a, p + i, 8);
      memcpy(&b, p + kLane + i, 8);
      memcpy(&d, p + 2 * kLane + i, 8);
      c0 = _mm_crc32_u64(c0, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, d);
    }
    // The register is linear in its input: A|B|C from c is shift(shift(A)^B)^C.
    c0 = Shift(t, Shift(t, uint32_t(c0)) ^ uint32_t(c1)) ^ uint32_t(c2);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c0 = _mm_crc32_u64(c0, v);
    p += 8;
    n -= 8;
  }
  uint32_t c = uint32_t(c0);
  while (n--) c = _mm_crc32_u8(c, *p++);
  return c;
}
#endif

}  // namespace

uint32_t Crc32c(uint32_t crc, const uint8_t* p, size_t n, bool portable) {
  const Tables& t = T();
  uint32_t c = ~crc;
#if defined(__x86_64__)
  if (t.hw && !portable) return ~Hard(t, c, p, n);
#endif
  return ~Soft(t, c, p, n);
}

// crc32c(data: Uint8Array, crc = 0, portable = false) -> number (unsigned
// 32-bit); `portable` forces the table-driven path, so tests can compare.
Napi::Value Crc32cJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray()) {
    Napi::TypeError::New(env, "crc32c(data: Uint8Array, crc?: number)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Uint8Array data = info[0].As<Napi::Uint8Array>();
  uint32_t crc = info.Length() > 1 && info[1].IsNumber() ? info[1].As<Napi::Number>().Uint32Value() : 0;
  bool portable = info.Length() > 2 && info[2].ToBoolean().Value();
  return Napi::Number::New(env, double(Crc32c(crc, data.Data(), data.ByteLength(), portable)));
}
