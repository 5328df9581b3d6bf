"""unified_mllm: a unified multimodal LLM that understands and generates images.

One autoregressive Llama-style LM (Chameleon lineage) reads an image twice — VQ-GAN codes and projected SigLIP
features — and writes images as VQ codes. See ``DESIGN.md`` in the shared docs and the README for the map:
``config`` (typed config tree), ``layout`` (token layout), ``text`` (text tokenizer), ``data``, ``vision``,
``model``, ``eval``.
"""

__version__ = "0.1.0"


def _quiet_torchao_import() -> None:
    """transformers imports torchao whenever it is installed (the `adapt` extra), and that import logs, on every
    command: one "Failed to load …" warning per prebuilt CUDA kernel library on a machine without CUDA (kernels
    it could never run), and torch's deprecation notice for each Enum torchao registers with the pytree
    registry (a torchao / torch version mismatch, nothing the user can act on). Drop exactly those records; on a
    CUDA machine a kernel library that fails to load is news, and is still shown."""
    import logging

    def keep_kernel_record(record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Failed to load"):
            return True
        import torch  # already imported: torchao imports it first

        return torch.cuda.is_available()

    def keep_pytree_record(record: logging.LogRecord) -> bool:
        return "register_constant() on Enum subclasses is deprecated" not in record.getMessage()

    logging.getLogger("torchao").addFilter(keep_kernel_record)
    logging.getLogger("torch.utils._pytree").addFilter(keep_pytree_record)


_quiet_torchao_import()
