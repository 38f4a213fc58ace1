// System calls Node's fs module lacks but a faithful mirror needs:
// fallocate(2), lseek(2) with SEEK_DATA/SEEK_HOLE, utimensat(2) with
// nanoseconds, UTIME_NOW and UTIME_OMIT, extended attributes, a directory
// listing with inode numbers, and a scan of a process's open descriptors.
// Each returns a result or -errno.
#include "sys.h"

#include <dirent.h>  // struct dirent64
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

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

// fsetxattr(fd, name, value: Buffer) -> 0 | -errno
Napi::Value Fsetxattr(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  std::string name = info[1].As<Napi::String>().Utf8Value();
  Napi::Buffer<uint8_t> value = info[2].As<Napi::Buffer<uint8_t>>();
  int rc = fsetxattr(fd, name.c_str(), value.Data(), value.Length(), 0);
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}

// removexattr(fd | path, name) -> 0 | -errno; a path's symlink is not followed.
Napi::Value Removexattr(const Napi::CallbackInfo& info) {
  std::string name = info[1].As<Napi::String>().Utf8Value();
  int rc = info[0].IsNumber() ? fremovexattr(info[0].As<Napi::Number>().Int32Value(), name.c_str())
                              : lremovexattr(info[0].As<Napi::String>().Utf8Value().c_str(), name.c_str());
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}

// lgetxattr(path, name) -> the value as a string (up to 255 bytes) | -errno
// (-ENODATA: not set); a symlink is not followed.
Napi::Value Lgetxattr(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  std::string name = info[1].As<Napi::String>().Utf8Value();
  char value[256];
  ssize_t n = lgetxattr(path.c_str(), name.c_str(), value, sizeof value - 1);
  if (n < 0) return Napi::Number::New(info.Env(), -errno);
  return Napi::String::New(info.Env(), value, size_t(n));
}

// lsetxattr(path, name, value: Buffer) -> 0 | -errno; a symlink is not followed.
Napi::Value Lsetxattr(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  std::string name = info[1].As<Napi::String>().Utf8Value();
  Napi::Buffer<uint8_t> value = info[2].As<Napi::Buffer<uint8_t>>();
  int rc = lsetxattr(path.c_str(), name.c_str(), value.Data(), value.Length(), 0);
  return Napi::Number::New(info.Env(), rc < 0 ? -errno : 0);
}

// Calls fn(entry) for each entry of an open directory but "." and "..".
// Returns 0 or -errno. `lastWhenShort`: procfs fills a getdents buffer
// until the directory ends or the buffer is full, so a buffer returned with
// room to spare was the last one; that saves the empty call that would say
// so (system calls cost several microseconds on the project VM, and the
// /proc scan runs on every close() of a file written on a mount). Other
// file systems may return less than fits before the end.
template <typename Fn>
static int ForEachDirent(int dfd, bool lastWhenShort, Fn fn) {
  alignas(8) char ents[32768];
  for (;;) {
    long n = syscall(SYS_getdents64, dfd, ents, sizeof ents);
    if (n < 0) return -errno;
    for (long off = 0; off < n;) {
      auto* d = reinterpret_cast<struct dirent64*>(ents + off);
      off += d->d_reclen;
      const char* name = d->d_name;
      if (name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0))) continue;
      fn(d);
    }
    if (n == 0 || (lastWhenShort && n < long(sizeof ents) - 512)) return 0;
  }
}

// Calls fn(dirfd, name) for each entry of an open /proc directory (whose
// entries never start with '.').
template <typename Fn>
static int ForEachProcEntry(int dfd, Fn fn) {
  return ForEachDirent(dfd, true, [&](const struct dirent64* d) { fn(dfd, d->d_name); });
}

// readDir(path): the entries of a directory but "." and "..", as
// { names, types, inos } (types: the S_IFMT bits >> 12), or -errno. Node's
// readdir drops getdents' inode numbers, and a listing must give the ones
// the storage has (ls -i, find -inum). An entry whose type the file system
// does not say is asked with fstatat; one gone meanwhile is left out.
Napi::Value ReadDir(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int dfd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Napi::Number::New(env, -errno);
  std::vector<std::string> names;
  std::vector<uint8_t> types;
  std::vector<double> inos;
  int rc = ForEachDirent(dfd, false, [&](const struct dirent64* d) {
    uint8_t type = d->d_type;
    uint64_t ino = d->d_ino;
    if (type == DT_UNKNOWN) {
      struct stat st;
      if (fstatat(dfd, d->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) return;
      type = uint8_t((st.st_mode & S_IFMT) >> 12);
      ino = st.st_ino;
    }
    names.emplace_back(d->d_name);
    types.push_back(type);
    inos.push_back(double(ino));
  });
  close(dfd);
  if (rc < 0) return Napi::Number::New(env, rc);
  Napi::Object out = Napi::Object::New(env);
  Napi::Array jsNames = Napi::Array::New(env, names.size());
  Napi::Uint8Array jsTypes = Napi::Uint8Array::New(env, types.size());
  Napi::Float64Array jsInos = Napi::Float64Array::New(env, inos.size());
  for (size_t i = 0; i < names.size(); i++) {
    jsNames.Set(uint32_t(i), Napi::String::New(env, names[i]));
    jsTypes[i] = types[i];
    jsInos[i] = inos[i];
  }
  out.Set("names", jsNames);
  out.Set("types", jsTypes);
  out.Set("inos", jsInos);
  return out;
}

// The /proc descriptors of the last few processes asked about, kept open.
// A producer closes file after file, each close asks about the same
// process, and opening /proc/<pid>/fd and its children file again each time
// costs a path walk and two system calls apiece. procfs describes the
// process anew on every read from offset 0. A descriptor outliving its
// process fails its next read, and is then opened afresh (a new process
// with the same pid gets new ones). Only the JS thread calls in here.
struct ProcFds {
  int pid;
  int fd_dir;    // /proc/<pid>/fd
  int children;  // /proc/<pid>/task/<pid>/children, -1 until needed
};
static std::vector<ProcFds> g_procs;  // most recently used last
constexpr size_t kMaxProcs = 16;

static void CloseProc(ProcFds& p) {
  if (p.fd_dir >= 0) close(p.fd_dir);
  if (p.children >= 0) close(p.children);
}

static void ForgetProc(int pid) {
  for (size_t i = 0; i < g_procs.size(); i++) {
    if (g_procs[i].pid != pid) continue;
    CloseProc(g_procs[i]);
    g_procs.erase(g_procs.begin() + long(i));
    return;
  }
}

// The cached entry of `pid`, opening its fd directory when there is none;
// nullptr (errno set) when it cannot be opened.
static ProcFds* ProcOf(int pid) {
  for (size_t i = 0; i < g_procs.size(); i++) {
    if (g_procs[i].pid != pid) continue;
    ProcFds p = g_procs[i];
    g_procs.erase(g_procs.begin() + long(i));
    g_procs.push_back(p);
    return &g_procs.back();
  }
  std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return nullptr;
  if (g_procs.size() >= kMaxProcs) {
    CloseProc(g_procs.front());
    g_procs.erase(g_procs.begin());
  }
  g_procs.push_back({pid, dfd, -1});
  return &g_procs.back();
}

// Counts the entries of an open /proc/<pid>/fd directory linking to `target`.
static int CountIn(int dfd, const std::string& target) {
  char link[4096];
  int count = 0;
  int rc = ForEachProcEntry(dfd, [&](int at, const char* name) {
    ssize_t len = readlinkat(at, name, link, sizeof link);
    // A descriptor closed meanwhile (ENOENT) simply no longer counts.
    if (len == ssize_t(target.size()) && memcmp(link, target.data(), len) == 0) count++;
  });
  return rc < 0 ? rc : count;
}

// Descriptors of one process whose /proc/<pid>/fd/N link is exactly
// `target`, or -errno when the directory cannot be read. `cached`: through
// the kept descriptor (the process asked about), else opened for this call.
static int CountLinks(int pid, const std::string& target, bool cached) {
  if (!cached) {
    std::string dir = "/proc/" + std::to_string(pid) + "/fd";
    int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return -errno;
    int rc = CountIn(dfd, target);
    close(dfd);
    return rc;
  }
  for (int attempt = 0; attempt < 2; attempt++) {
    ProcFds* p = ProcOf(pid);
    if (p == nullptr) return -errno;
    int rc = lseek(p->fd_dir, 0, SEEK_SET) < 0 ? -errno : CountIn(p->fd_dir, target);
    if (rc >= 0) return rc;
    ForgetProc(pid);  // gone, or a stale descriptor: once more from the path
  }
  return -ESRCH;
}

// Appends the pids in a children file's text.
static void ParseChildren(char* buf, ssize_t n, std::vector<int>& out) {
  if (n <= 0) return;
  buf[n] = 0;
  for (char* p = buf; *p;) {
    char* end;
    long child = strtol(p, &end, 10);
    if (end == p) break;
    out.push_back(int(child));
    p = end;
  }
}

// Appends the pids listed in a /proc/<pid>/task/<tid>/children file.
static void ReadChildren(int at, const char* file, std::vector<int>& out) {
  int fd = openat(at, file, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  char buf[4096];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  ParseChildren(buf, n, out);
}

// Appends the children of every thread of `pid` (/proc/<pid>/task/<tid>/children).
// `cached`: the process asked about, whose children file is kept open.
static void ChildrenOf(int pid, std::vector<int>& out, bool cached) {
  std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  // The task directory's link count is 2 plus its threads. Most programs
  // have one, whose file is named by the pid: that spares listing the
  // directory (two system calls of the six, on every close of a new file).
  struct stat st;
  if (stat(tasks.c_str(), &st) == 0 && st.st_nlink == 3) {
    std::string file = tasks + "/" + std::to_string(pid) + "/children";
    ProcFds* p = cached ? ProcOf(pid) : nullptr;
    if (p == nullptr) return ReadChildren(AT_FDCWD, file.c_str(), out);
    if (p->children < 0) p->children = open(file.c_str(), O_RDONLY | O_CLOEXEC);
    char buf[4096];
    ssize_t n = p->children < 0 ? -1 : pread(p->children, buf, sizeof buf - 1, 0);
    if (n < 0) {
      // A stale descriptor (the process is gone): the path says what is true now.
      if (p->children >= 0) close(p->children);
      p->children = -1;
      return ReadChildren(AT_FDCWD, file.c_str(), out);
    }
    return ParseChildren(buf, n, out);
  }
  int dfd = open(tasks.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return;
  ForEachProcEntry(dfd, [&](int at, const char* name) {
    std::string f = std::string(name) + "/children";
    ReadChildren(at, f.c_str(), out);
  });
  close(dfd);
}

// fdsLinkingTo(pid, target, withDescendants): how many descriptors of the
// process (and, if asked, of its descendants, which may have inherited
// them) link to exactly `target`; -errno when the process's own table
// cannot be read. Done here because from JavaScript the readdir and one
// readlink per descriptor cost several times the system calls themselves,
// and it runs on every close() of a file open for writing. readlink, never
// stat: a stat of a descriptor on a FUSE mount would call back into the
// daemon asking. Descendants are visited breadth first, at most 256.
Napi::Value FdsLinkingTo(const Napi::CallbackInfo& info) {
  int pid = info[0].As<Napi::Number>().Int32Value();
  std::string target = info[1].As<Napi::String>().Utf8Value();
  bool descendants = info.Length() > 2 && info[2].As<Napi::Boolean>().Value();
  int count = CountLinks(pid, target, true);
  if (count < 0 || !descendants) return Napi::Number::New(info.Env(), count);
  std::vector<int> queue;
  ChildrenOf(pid, queue, true);
  for (size_t i = 0; i < queue.size() && i < 256; i++) {
    int n = CountLinks(queue[i], target, false);
    if (n > 0) count += n;
    ChildrenOf(queue[i], queue, false);
  }
  return Napi::Number::New(info.Env(), count);
}
