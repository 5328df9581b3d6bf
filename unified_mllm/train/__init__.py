"""Training: the LM stages (``python -m unified_mllm.train``), the image tokenizers
(:mod:`unified_mllm.train.tokenizer`, with their GAN and perceptual losses in
:mod:`unified_mllm.train.tokenizer_losses`) and contrastive SigLIP pre-training
(:mod:`unified_mllm.train.contrastive`), with what they share: process groups (``distributed``), atomic
training-state checkpoints with RNG capture (``checkpoint``) and learning-rate schedules (``schedule``).
"""
