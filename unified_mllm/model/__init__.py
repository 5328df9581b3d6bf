"""The unified model: the LM backbone from transformers, the multimodal embedding merge, heads.

``unified`` holds :class:`~unified_mllm.model.unified.UnifiedModel` (``lm`` + ``lm_head`` + ``vision.tower`` +
``vision.projector``): it scatters projected SigLIP features into their feature slots and returns logits over
the full, unmasked vocabulary. ``export`` writes and reads its Hugging Face-format export (``config.json`` +
``model.safetensors``) and maps published Chameleon / Llama checkpoints onto it. ``backbone`` turns an
:class:`~unified_mllm.config.LMConfig` into the bare transformers decoder and its LM head; ``stats`` counts
parameters, of built modules and of the named presets (whose table is in :mod:`unified_mllm.config`).
"""
