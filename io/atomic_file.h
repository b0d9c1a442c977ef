#pragma once
// Crash-safe file replacement: data goes to a uniquely named temporary file in the target's
// directory, is flushed and fsync'ed, then renamed over the target, and the directory is fsync'ed.
// A reader therefore sees either the old file or the complete new one, never a partial write.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace longtape::io {

// Replaces `path` with the n bytes at `data`. Throws longtape::Error (with the system's reason)
// on failure, in which case the previous file is untouched and no temporary file remains.
void write_file_atomic(const std::string& path, const void* data, size_t n);
inline void write_file_atomic(const std::string& path, const std::vector<uint8_t>& bytes) {
  write_file_atomic(path, bytes.data(), bytes.size());
}

// Same, with the content produced by `writer` into the temporary file. If `writer` throws, the
// temporary file is removed, the target is untouched, and the exception propagates unchanged.
// Write errors reported by the stream (ferror) are detected after `writer` returns.
void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& writer);

// Largest file read_file reads unless told otherwise: 16 GiB.
constexpr uint64_t kDefaultMaxReadBytes = uint64_t{16} << 30;

// Whole content of a regular file of at most `max_bytes` bytes. A directory, FIFO, device or
// socket is refused before anything is read (a FIFO or /dev/zero would hang or never end), and so
// is a larger file, before it is allocated. Throws longtape::Error naming the file and the reason.
std::vector<uint8_t> read_file(const std::string& path, uint64_t max_bytes = kDefaultMaxReadBytes);

}  // namespace longtape::io
