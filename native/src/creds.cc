// A daemon that checks permissions itself (mounted without
// default_permissions) lets the storage check them: around each system call
// it makes for a caller, it takes on that caller's file system identity
// (fsuid, fsgid, supplementary groups), so that the storage's own rules
// apply exactly: modes, ACLs, sticky directories, setgid inheritance, who
// may chown.
//
// Only the calling thread changes. glibc's setgroups() and setfsuid()
// wrappers are avoided on purpose: setgroups() in particular is applied to
// every thread of the process (the libuv pool would act as the caller too),
// while the raw system calls change the current thread alone. Dropping the
// fsuid from 0 clears the file system capabilities (CAP_CHOWN,
// CAP_DAC_OVERRIDE, CAP_FOWNER...) from the effective set, and setting it
// back to 0 restores them: the kernel's rule for fsuid changes.
#include "creds.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

// The daemon's own identity, taken once: what ActAsSelf returns to.
struct Self {
  uid_t uid = geteuid();
  gid_t gid = getegid();
  std::vector<gid_t> groups;
  Self() {
    int n = getgroups(0, nullptr);
    if (n > 0) {
      groups.resize(n);
      n = getgroups(n, groups.data());
      groups.resize(n > 0 ? n : 0);
    }
  }
};

Self& self() {
  static Self s;
  return s;
}

// The supplementary groups the thread has now. ActAsSelf leaves a
// caller's in place (see there), so the next request of a caller with the
// same groups, nearly always the same program, spares a setgroups.
std::vector<gid_t>& CurrentGroups() {
  static std::vector<gid_t> current = self().groups;
  return current;
}

int SetGroups(const gid_t* groups, size_t n) {
  std::vector<gid_t>& current = CurrentGroups();
  if (current.size() == n && std::equal(groups, groups + n, current.begin())) return 0;
  if (syscall(SYS_setgroups, n, groups) < 0) return -errno;
  current.assign(groups, groups + n);
  return 0;
}

// setfsuid and setfsgid report no error (they return the previous value
// either way): whether they work at all is checked once, by CanActAs.
int SetIds(uid_t uid, gid_t gid, const gid_t* groups, size_t n) {
  int rc = SetGroups(groups, n);
  if (rc < 0) return rc;
  syscall(SYS_setfsgid, gid);
  syscall(SYS_setfsuid, uid);
  return 0;
}

}  // namespace

// actAs(uid, gid, groups: Uint32Array) -> 0 | -errno
Napi::Value ActAs(const Napi::CallbackInfo& info) {
  self();  // taken before the first change
  uid_t uid = info[0].As<Napi::Number>().Uint32Value();
  gid_t gid = info[1].As<Napi::Number>().Uint32Value();
  Napi::Uint32Array groups = info[2].As<Napi::Uint32Array>();
  int rc = SetIds(uid, gid, reinterpret_cast<const gid_t*>(groups.Data()), groups.ElementLength());
  return Napi::Number::New(info.Env(), rc);
}

// actAsSelf() -> 0: back to the daemon's own fsuid and fsgid. The fsuid
// brings back the file system capabilities (the daemon is root, see
// identity.ts), and with them supplementary groups decide nothing: root
// passes every permission check they could, and a new file takes the fsgid
// (or its directory's group), never one of them. So the caller's groups
// stay until a caller with other groups comes (or the probe below): two
// system calls per request fewer. Only file system checks use this
// thread's groups; it starts no process.
Napi::Value ActAsSelf(const Napi::CallbackInfo& info) {
  Self& s = self();
  syscall(SYS_setfsuid, s.uid);
  syscall(SYS_setfsgid, s.gid);
  return Napi::Number::New(info.Env(), 0);
}

// canActAs() -> 0 | -errno: can this thread take on another identity and
// come back, and check access as it (faccessat2, Linux 5.8)? Tried once,
// with nobody's ids; asking setfsuid/setfsgid for -1 returns the current
// value, which tells whether a change took.
Napi::Value CanActAs(const Napi::CallbackInfo& info) {
  Self& s = self();
  const uid_t nobody = 65534;
  int rc = SetIds(nobody, nobody, nullptr, 0);
  if (rc == 0 && (static_cast<uid_t>(syscall(SYS_setfsuid, -1)) != nobody || static_cast<gid_t>(syscall(SYS_setfsgid, -1)) != nobody)) rc = -EPERM;
  if (rc == 0 && syscall(SYS_faccessat2, AT_FDCWD, "/", F_OK, AT_EACCESS) < 0 && errno == ENOSYS) rc = -ENOSYS;
  syscall(SYS_setfsuid, s.uid);
  SetIds(s.uid, s.gid, s.groups.data(), s.groups.size());
  if (static_cast<uid_t>(syscall(SYS_setfsuid, -1)) != s.uid || static_cast<gid_t>(syscall(SYS_setfsgid, -1)) != s.gid) abort();
  return Napi::Number::New(info.Env(), rc);
}

// accessAs(path, mask) -> 0 | -errno: faccessat2 with AT_EACCESS, which
// checks with the thread's file system identity (access(2) and Node's
// fs.access check with the real uid, which stays root).
Napi::Value AccessAs(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int mask = info[1].As<Napi::Number>().Int32Value();
  int rc = syscall(SYS_faccessat2, AT_FDCWD, path.c_str(), mask, AT_EACCESS | AT_SYMLINK_NOFOLLOW);
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}
