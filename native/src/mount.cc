// Mounting and unmounting a FUSE file system, without libfuse.
//
// As root the kernel is asked directly: open /dev/fuse, then mount(2) with
// "fd=N" in the options.  A non-root user cannot call mount(2), so the setuid
// fusermount3 helper mounts for us and passes the /dev/fuse fd back over a
// unix socket (SCM_RIGHTS) named by the _FUSE_COMMFD environment variable:
// the protocol libfuse speaks with it.
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

extern char** environ;

namespace {

std::string Str(const Napi::Value& v) { return v.As<Napi::String>().Utf8Value(); }

// Receives one fd sent with SCM_RIGHTS; -errno on failure.
int ReceiveFd(int sock) {
  char byte;
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  if (n == 0) return -ECONNRESET;  // helper exited without sending an fd
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int fd;
      memcpy(&fd, CMSG_DATA(c), sizeof fd);
      return fd;
    }
  }
  return -EPROTO;
}

}  // namespace

// openDevice(path) -> fd | -errno
Napi::Value OpenDevice(const Napi::CallbackInfo& info) {
  std::string path = info.Length() > 0 ? Str(info[0]) : "/dev/fuse";
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  return Napi::Number::New(info.Env(), fd < 0 ? -errno : fd);
}

// mount(source, target, fstype, flags, data) -> 0 | -errno
Napi::Value Mount(const Napi::CallbackInfo& info) {
  std::string source = Str(info[0]), target = Str(info[1]), type = Str(info[2]);
  unsigned long flags = info[3].As<Napi::Number>().Uint32Value();
  std::string data = Str(info[4]);
  int rc = mount(source.c_str(), target.c_str(), type.c_str(), flags, data.c_str());
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}

// umount(target, flags) -> 0 | -errno   (flags: MNT_DETACH = 2 for lazy)
Napi::Value Umount(const Napi::CallbackInfo& info) {
  std::string target = Str(info[0]);
  int flags = info.Length() > 1 ? info[1].As<Napi::Number>().Int32Value() : 0;
  int rc = umount2(target.c_str(), flags);
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}

// closeFd(fd) -> 0 | -errno
Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int rc = close(info[0].As<Napi::Number>().Int32Value());
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}

// fusermountMount(helperPath, mountpoint, options) -> fd | -errno
// Runs "fusermount3 -o OPTIONS -- MOUNTPOINT" with _FUSE_COMMFD set and
// receives the mounted /dev/fuse fd from it.
Napi::Value FusermountMount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string helper = Str(info[0]), mountpoint = Str(info[1]), options = Str(info[2]);
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) return Napi::Number::New(env, -errno);
  fcntl(sv[0], F_SETFD, FD_CLOEXEC);  // only the helper's end is inherited

  std::vector<std::string> envs;
  for (char** e = environ; *e; e++) {
    if (strncmp(*e, "_FUSE_COMMFD=", 13) != 0) envs.emplace_back(*e);
  }
  envs.push_back("_FUSE_COMMFD=" + std::to_string(sv[1]));
  std::vector<char*> envp;
  for (auto& s : envs) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string o = "-o", dd = "--";
  std::vector<char*> argv = {helper.data(), o.data(), options.data(), dd.data(), mountpoint.data(), nullptr};

  pid_t pid;
  int rc = posix_spawnp(&pid, helper.c_str(), nullptr, nullptr, argv.data(), envp.data());
  close(sv[1]);
  if (rc != 0) {
    close(sv[0]);
    return Napi::Number::New(env, -rc);
  }
  int fd = ReceiveFd(sv[0]);
  close(sv[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (fd < 0 && WIFEXITED(status) && WEXITSTATUS(status) != 0) return Napi::Number::New(env, -EPERM);
  return Napi::Number::New(env, fd);
}
