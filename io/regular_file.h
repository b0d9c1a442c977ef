#pragma once
// Read-only access to a regular file for the format readers. Anything else (a directory, a FIFO,
// a device such as /dev/zero, a socket) is refused before a single byte is read, so a hostile
// path can neither hang the reader nor make it read forever; the file's size is known up front,
// so readers compare it with what their header claims before allocating the data.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "tensor/error.h"

namespace longtape::io {

class RegularFile {
 public:
  // `what` says what the file was meant to be ("npy file") in errors.
  RegularFile(const std::string& path, const char* what) : path_(path), what_(what) {
    // lstat-free stat first: opening a FIFO for reading would block until a writer appears.
    struct stat info {};
    if (::stat(path.c_str(), &info) != 0) {
      const int err = errno;
      LT_CHECK(false, "cannot open ", what, " '", path, "' for reading: ", std::strerror(err));
    }
    check_kind(info);
    // O_NONBLOCK: should the path be swapped for a FIFO after the stat, open still returns at once.
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd_ < 0) {
      const int err = errno;
      LT_CHECK(false, "cannot open ", what, " '", path, "' for reading: ", std::strerror(err));
    }
    if (::fstat(fd_, &info) != 0) {
      const int err = errno;
      ::close(fd_);
      LT_CHECK(false, "cannot stat ", what, " '", path, "': ", std::strerror(err));
    }
    try {
      check_kind(info);
    } catch (...) {
      ::close(fd_);
      throw;
    }
    size_ = static_cast<uint64_t>(info.st_size);
  }
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  ~RegularFile() { ::close(fd_); }

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Exactly n bytes at `offset` into dst; throws naming the file when fewer can be read (the
  // file shrank since it was opened) or the system reports an error.
  void read_at(uint64_t offset, void* dst, size_t n) const {
    auto* p = static_cast<uint8_t*>(dst);
    size_t done = 0;
    while (done < n) {
      const size_t want = std::min<size_t>(n - done, size_t{1} << 30);
      const ssize_t got = ::pread(fd_, p + done, want, static_cast<off_t>(offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) {
        const int err = errno;
        LT_CHECK(false, "cannot read ", what_, " '", path_, "': ", std::strerror(err));
      }
      LT_CHECK(got > 0, "cannot read ", what_, " '", path_, "': the file ended after ", offset + done,
               " bytes, expected ", offset + n, " (was it truncated while being read?)");
      done += static_cast<size_t>(got);
    }
  }
  std::vector<uint8_t> read_at(uint64_t offset, size_t n) const {
    std::vector<uint8_t> bytes(n);
    read_at(offset, bytes.data(), n);
    return bytes;
  }
  // The whole file (its size as of opening).
  std::vector<uint8_t> read_all() const { return read_at(0, static_cast<size_t>(size_)); }

 private:
  void check_kind(const struct stat& info) const {
    const mode_t mode = info.st_mode;
    const char* kind = S_ISDIR(mode)    ? "a directory"
                       : S_ISFIFO(mode) ? "a FIFO (named pipe)"
                       : S_ISCHR(mode)  ? "a character device"
                       : S_ISBLK(mode)  ? "a block device"
                       : S_ISSOCK(mode) ? "a socket"
                                        : "not a regular file";
    LT_CHECK(S_ISREG(mode), "cannot read ", what_, " '", path_, "': expected a regular file, got ", kind);
    LT_CHECK(info.st_size >= 0, "cannot read ", what_, " '", path_, "': negative file size ", info.st_size);
  }

  std::string path_;
  const char* what_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

}  // namespace longtape::io
