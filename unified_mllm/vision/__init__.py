"""Visual tokenizers and encoders: the VQ-GAN (and UniTok / DualToken) codes and the SigLIP feature branch."""
