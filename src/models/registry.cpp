#include "models/registry.h"

namespace vf {

// Each family file defines its registration function. Listed here (not via static initialisers)
// so that linking the static library never silently drops a family.
void register_bit_models();
void register_convnext_models();
void register_convnextv2_models();
void register_detr_models();
void register_deit_models();
void register_cvt_models();
void register_deformable_detr_models();
void register_deta_models();
void register_conditional_detr_models();

void register_all_models() {
  register_bit_models();
  register_convnext_models();
  register_convnextv2_models();
  register_detr_models();
  register_deit_models();
  register_cvt_models();
  register_deformable_detr_models();
  register_deta_models();
  register_conditional_detr_models();
}

}  // namespace vf
