#include "format.h"

#include <stdexcept>

namespace tandem {

Format parse_format(std::string_view name) {
  std::string known;
  for (int i = 0; i < kFormatCount; ++i) {
    const FormatInfo info = format_info(format_at(i));
    if (name == info.name) return format_at(i);
    known += (i ? ", " : "") + std::string(info.name);
  }
  throw std::invalid_argument("unknown weight format '" + std::string(name) + "'; known formats: " + known);
}

}  // namespace tandem
