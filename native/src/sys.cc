// System calls Node's fs module lacks but a faithful mirror needs:
// fallocate(2), lseek(2) with SEEK_DATA/SEEK_HOLE, and utimensat(2) with
// nanoseconds, UTIME_NOW and UTIME_OMIT. Each returns a result or -errno.
#include "sys.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  int mode = info[1].As<Napi::Number>().Int32Value();
  off_t offset = info[2].As<Napi::Number>().Int64Value();
  off_t len = info[3].As<Napi::Number>().Int64Value();
  int rc = fallocate(fd, mode, offset, len);
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}

Napi::Value Lseek(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  off_t offset = info[1].As<Napi::Number>().Int64Value();
  int whence = info[2].As<Napi::Number>().Int32Value();
  off_t rc = lseek(fd, offset, whence);
  return Napi::Number::New(info.Env(), rc < 0 ? double(-errno) : double(rc));
}

// utimens(path, atimeSec, atimeNsec, mtimeSec, mtimeNsec, nofollow)
// Pass nsec = -1 for UTIME_NOW and -2 for UTIME_OMIT.
Napi::Value Utimens(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  timespec ts[2];
  for (int i = 0; i < 2; i++) {
    ts[i].tv_sec = info[1 + 2 * i].As<Napi::Number>().Int64Value();
    long ns = info[2 + 2 * i].As<Napi::Number>().Int64Value();
    ts[i].tv_nsec = ns == -1 ? UTIME_NOW : ns == -2 ? UTIME_OMIT : ns;
  }
  bool nofollow = info[5].As<Napi::Boolean>().Value();
  int rc = utimensat(AT_FDCWD, path.c_str(), ts, nofollow ? AT_SYMLINK_NOFOLLOW : 0);
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}
