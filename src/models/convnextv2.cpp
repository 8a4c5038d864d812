// ConvNeXT V2 (modeling_convnextv2.py): the ConvNeXT network of convnext.cpp with a global
// response norm after the activation and no layer scale; tensors live under "convnextv2.".
#include "models/convnext.h"

namespace vf {

void register_convnextv2_models() {
  register_model({"convnextv2",
                  {"ConvNextV2Model", "ConvNextV2ForImageClassification", "ConvNextV2Backbone"},
                  [](const json& config, const std::string& arch, const Weights& w) {
                    return build_convnext_model(config, arch, w, true);
                  }});
}

}  // namespace vf
