"""visionformers: Hugging Face vision models (BiT, ConvNeXT, CvT, DeiT, the DETR family) run by a C++ engine.

    import visionformers as vf
    model = vf.Pretrained("facebook-convnext-tiny-224/")
    model.classify("cat.jpg", top_k=3)   # [{'label': ..., 'score': ...}, ...]
"""
from ._core import Error, InputError, ModelError, Pretrained

__all__ = ["Pretrained", "Error", "InputError", "ModelError"]
