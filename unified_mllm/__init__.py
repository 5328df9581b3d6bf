"""unified_mllm: a unified multimodal LLM that understands and generates images.

One autoregressive Llama-style LM (Chameleon lineage) reads an image twice — VQ-GAN codes and projected SigLIP
features — and writes images as VQ codes. See ``DESIGN.md`` in the shared docs and the README for the map:
``config`` (typed config tree), ``layout`` (token layout), ``text`` (text tokenizer), ``data``, ``vision``,
``model``, ``eval``.
"""

__version__ = "0.1.0"
