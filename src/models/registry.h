// One registration function per family; register_all_models() calls each once.
#pragma once

namespace vf {
void register_all_models();
}  // namespace vf
