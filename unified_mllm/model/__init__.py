"""The unified model: the LM backbone from transformers, the multimodal embedding merge, and named presets.

``presets`` holds the registry of named :class:`~unified_mllm.config.ModelConfig` shapes (``tiny`` and the
published Chameleon sizes); ``backbone`` turns an :class:`~unified_mllm.config.LMConfig` into the bare
transformers decoder and its LM head; ``stats`` counts parameters.
"""
