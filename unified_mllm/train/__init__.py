"""Training infrastructure shared by every trainer: process groups (``distributed``), atomic training-state
checkpoints with RNG capture (``checkpoint``) and learning-rate schedules (``schedule``).

The modules here are small and model-agnostic: the VQ tokenizer trainer
(:mod:`unified_mllm.vision.train_tokenizer`) uses them as they are, the LM trainer extends them.
"""
