#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>

#include "io/regular_file.h"
#include "tensor/error.h"

namespace longtape::io {
namespace {

std::string errno_text(int err) { return std::strerror(err); }

std::string directory_of(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string basename_of(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Creates a new file next to `path` with a name no other writer (thread or process) uses.
// open(O_EXCL) with mode 0666 lets the process umask decide the final permissions, as a plain
// fopen would.
int create_temp_file(const std::string& path, std::string& temp_path) {
  static std::atomic<uint64_t> counter{0};
  thread_local std::mt19937_64 rng{std::random_device{}()};
  const std::string prefix = directory_of(path) + "/." + basename_of(path) + ".tmp-" +
                             std::to_string(::getpid()) + "-";
  for (int attempt = 0; attempt < 100; ++attempt) {
    temp_path = prefix + std::to_string(counter.fetch_add(1)) + "-" + std::to_string(rng() % 1000000007u);
    int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) return fd;
    if (errno != EEXIST) {
      int err = errno;
      LT_CHECK(false, "cannot write '", path, "': creating temporary file '", temp_path,
               "' failed: ", errno_text(err));
    }
  }
  LT_CHECK(false, "cannot write '", path, "': no unused temporary file name found");
  return -1;
}

// Makes the rename durable. Some file systems cannot fsync a directory (EINVAL); the rename
// itself has already happened then, so that is not an error.
void sync_directory(const std::string& path) {
  const std::string dir = directory_of(path);
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  LT_CHECK(fd >= 0, "wrote '", path, "' but cannot open its directory '", dir,
           "' to sync it: ", errno_text(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  LT_CHECK(rc == 0 || err == EINVAL || err == EROFS, "wrote '", path, "' but syncing directory '",
           dir, "' failed: ", errno_text(err));
}

}  // namespace

void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& writer) {
  LT_CHECK(!path.empty(), "write_file_atomic: expected a file path, got an empty string");
  LT_CHECK(path.back() != '/', "write_file_atomic: expected a file path, got directory '", path, "'");
  std::string temp_path;
  int fd = create_temp_file(path, temp_path);
  std::FILE* file = ::fdopen(fd, "wb");
  if (!file) {
    int err = errno;
    ::close(fd);
    ::unlink(temp_path.c_str());
    LT_CHECK(false, "cannot write '", path, "': fdopen failed: ", errno_text(err));
  }
  try {
    writer(file);
    LT_CHECK(!std::ferror(file), "cannot write '", path, "': write to temporary file '", temp_path,
             "' failed: ", errno_text(errno));
    LT_CHECK(std::fflush(file) == 0, "cannot write '", path, "': flushing temporary file '",
             temp_path, "' failed: ", errno_text(errno));
    LT_CHECK(::fsync(::fileno(file)) == 0, "cannot write '", path, "': fsync of temporary file '",
             temp_path, "' failed: ", errno_text(errno));
  } catch (...) {
    std::fclose(file);
    ::unlink(temp_path.c_str());
    throw;
  }
  // fclose may still report a deferred write error (e.g. on network file systems).
  if (std::fclose(file) != 0) {
    int err = errno;
    ::unlink(temp_path.c_str());
    LT_CHECK(false, "cannot write '", path, "': closing temporary file '", temp_path,
             "' failed: ", errno_text(err));
  }
  if (::rename(temp_path.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(temp_path.c_str());
    LT_CHECK(false, "cannot write '", path, "': renaming temporary file '", temp_path,
             "' over it failed: ", errno_text(err));
  }
  sync_directory(path);
}

void write_file_atomic(const std::string& path, const void* data, size_t n) {
  write_file_atomic(path, [&](std::FILE* file) {
    if (n == 0) return;
    size_t written = std::fwrite(data, 1, n, file);
    LT_CHECK(written == n, "cannot write '", path, "': wrote ", written, " of ", n,
             " bytes: ", errno_text(errno));
  });
}

std::vector<uint8_t> read_file(const std::string& path, uint64_t max_bytes) {
  RegularFile file(path, "file");
  LT_CHECK(file.size() <= max_bytes, "cannot read '", path, "': the file has ", file.size(),
           " bytes, over the limit of ", max_bytes, " bytes");
  return file.read_all();
}

}  // namespace longtape::io
