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

// Whole file content. Throws longtape::Error naming the file and the system's reason.
std::vector<uint8_t> read_file(const std::string& path);

}  // namespace longtape::io
