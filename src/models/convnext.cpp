#include "models/model.h"

namespace vf {
void register_convnext_models() {}
}  // namespace vf
