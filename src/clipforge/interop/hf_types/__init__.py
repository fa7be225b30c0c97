"""The Hugging Face model types clipforge imports (``hf:FOLDER``) and exports (``clipforge export hf``): one
:class:`~clipforge.interop.hf_types.base.HFModelType` each, in one table keyed by ``config.json``'s ``model_type``.

Converted into the built-in towers (which express them exactly, and keep their speed features): ``clip``,
``metaclip_2``, ``siglip`` (SigLIP 2's fixed-resolution models too). Hosted (transformers' own module behind the
``Tower`` interface, where the built-in towers cannot express the model): ``siglip2``'s NaFlex vision model, and
the BERT / XLM-R text models of ``chinese_clip`` and ``altclip``; their ViTs are converted.
"""

from clipforge.interop.hf_types.base import ExportInputs, HFModelType, ImportContext
from clipforge.interop.hf_types.clip import CLIP, CLIP_LEGACY_EOS_ID, METACLIP_2
from clipforge.interop.hf_types.hosted_text import ALTCLIP, CHINESE_CLIP
from clipforge.interop.hf_types.siglip import SIGLIP, SIGLIP2

HF_MODEL_TYPES: dict[str, HFModelType] = {
    model_type.model_type: model_type for model_type in (CLIP, SIGLIP, SIGLIP2, METACLIP_2, CHINESE_CLIP, ALTCLIP)
}

__all__ = ["CLIP_LEGACY_EOS_ID", "HF_MODEL_TYPES", "ExportInputs", "HFModelType", "ImportContext"]
