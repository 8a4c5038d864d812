#include "models/model.h"

namespace vf {
void register_bit_models() {}
}  // namespace vf
