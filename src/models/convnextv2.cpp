#include "models/model.h"

namespace vf {
void register_convnextv2_models() {}
}  // namespace vf
