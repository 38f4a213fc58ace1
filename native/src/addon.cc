// The native half of dyad-fs: only what JavaScript cannot do by itself on
// /dev/fuse (mount, non-blocking reads on the loop, writev replies, ioctls)
// and what a file server and its clients want: sendfile(2), a receive
// thread, and a fast CRC-32C.
// Nothing here knows about DYAD.
#include <napi.h>

#include "crc32c.h"
#include "creds.h"
#include "device.h"
#include "mount.h"
#include "receiver.h"
#include "sender.h"
#include "sys.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("FuseDevice", FuseDevice::Init(env));
  exports.Set("FileSender", FileSender::Init(env));
  exports.Set("FileReceiver", FileReceiver::Init(env));
  exports.Set("reserveReceiveBuffers", Napi::Function::New(env, ReserveReceiveBuffers));
  exports.Set("openDevice", Napi::Function::New(env, OpenDevice));
  exports.Set("mount", Napi::Function::New(env, Mount));
  exports.Set("umount", Napi::Function::New(env, Umount));
  exports.Set("closeFd", Napi::Function::New(env, CloseFd));
  exports.Set("fusermountMount", Napi::Function::New(env, FusermountMount));
  exports.Set("fallocate", Napi::Function::New(env, Fallocate));
  exports.Set("lseek", Napi::Function::New(env, Lseek));
  exports.Set("readDir", Napi::Function::New(env, ReadDir));
  exports.Set("utimens", Napi::Function::New(env, Utimens));
  exports.Set("fdsLinkingTo", Napi::Function::New(env, FdsLinkingTo));
  exports.Set("fsetxattr", Napi::Function::New(env, Fsetxattr));
  exports.Set("removexattr", Napi::Function::New(env, Removexattr));
  exports.Set("lgetxattr", Napi::Function::New(env, Lgetxattr));
  exports.Set("lsetxattr", Napi::Function::New(env, Lsetxattr));
  exports.Set("actAs", Napi::Function::New(env, ActAs));
  exports.Set("actAsSelf", Napi::Function::New(env, ActAsSelf));
  exports.Set("accessAs", Napi::Function::New(env, AccessAs));
  exports.Set("canActAs", Napi::Function::New(env, CanActAs));
  exports.Set("crc32c", Napi::Function::New(env, Crc32cJs));
  return exports;
}

NODE_API_MODULE(dyadfuse, Init)
