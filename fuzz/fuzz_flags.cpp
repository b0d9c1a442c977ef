// libFuzzer target: see fuzz/entries.h. Errors meant for bad input are expected; anything else
// (another exception, a crash, a sanitizer report) stops the fuzzer with a reproducer.
#include "cli/numeric_flags.h"
#include "fuzz/entries.h"
#include "tensor/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    longtape::fuzz::flags_entry(data, size);
  } catch (const longtape::Error&) {
  } catch (const longtape::cli::FlagError&) {
  }
  return 0;
}
