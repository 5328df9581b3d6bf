"""Training: the LM stages (``python -m unified_mllm.train``), the image tokenizers
(:mod:`unified_mllm.train.tokenizer`, with their GAN and perceptual losses in
:mod:`unified_mllm.train.tokenizer_losses`) and contrastive SigLIP pre-training
(:mod:`unified_mllm.train.contrastive`), all three small step functions on one run harness (``harness``: run
directory, resume, checkpoints, the step loop, logging, reuse of a finished run), with what else they share:
process groups (``distributed``), atomic training-state checkpoints with RNG capture (``checkpoint``), the
metrics file and plots (``run_log``) and learning-rate schedules (``schedule``).
"""
