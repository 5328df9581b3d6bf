"""Training: the LM stages (``python -m unified_mllm.train``), the image tokenizers (``tokenizer``, with their
GAN and perceptual losses in ``tokenizer_losses``) and contrastive SigLIP pre-training (``contrastive``), all
three small step functions on one run harness (``harness``: run directory, resume, checkpoints, the step loop,
logging, reuse of a finished run).
"""
