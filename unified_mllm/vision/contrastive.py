"""The contrastive SigLIP: a full ``SiglipModel`` (vision tower with SigLIP's attention-pooling head + a small
text tower) that embeds images and texts into one space, as SigLIP (Zhai et al. 2023) does.

The vision tower is ``model.vision``'s (the pooling head gives one embedding per image); the text tower
(``contrastive.text_*``) reads our text tokenizer's ids, padded to a fixed length like SigLIP's (the text tower
pools the last position; see :func:`text_attention_mask`). Training it is
:mod:`unified_mllm.train.contrastive`; the unified model reads its vision tower with
:func:`unified_mllm.vision.siglip.load_siglip_pretrained`, and tokenizer evaluation uses its text tower for
DualToken's semantic side. Model code only: building does no I/O; :func:`load_contrastive` reads a saved
model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipConfig, SiglipModel, SiglipTextConfig

from unified_mllm.config import ContrastiveConfig, VisionConfig
from unified_mllm.text import TextTokenizer
from unified_mllm.vision.anyres import base_view
from unified_mllm.vision.image import image_to_tensor
from unified_mllm.vision.siglip import siglip_hf_config


def text_hf_config(
    contrastive: ContrastiveConfig, vision: VisionConfig, vocab_size: int, pad_id: int
) -> SiglipTextConfig:
    """The small SigLIP text tower; its head projects to the vision width so the embeddings can be compared."""
    return SiglipTextConfig(
        vocab_size=vocab_size,
        hidden_size=contrastive.text_hidden_size,
        intermediate_size=contrastive.text_intermediate_size,
        num_hidden_layers=contrastive.text_num_layers,
        num_attention_heads=contrastive.text_num_heads,
        max_position_embeddings=contrastive.text_max_length,
        projection_size=vision.hidden_size,
        layer_norm_eps=vision.layer_norm_eps,
        pad_token_id=pad_id,
        # transformers' defaults are the published vocabulary's ids, out of range for ours; unused here.
        bos_token_id=None,
        eos_token_id=None,
    )


def build_contrastive_model(
    vision: VisionConfig,
    contrastive: ContrastiveConfig,
    vocab_size: int,
    pad_id: int,
    device: str | torch.device = "cpu",
) -> SiglipModel:
    """A randomly initialised ``SiglipModel`` (vision tower with pooling head + text tower), no I/O.

    ``logit_scale`` (t') and ``logit_bias`` (b) start at ``contrastive.init_logit_scale`` / ``init_logit_bias``
    (SigLIP: log 10 and -10; transformers would start both at 0).
    """
    config = SiglipConfig(
        text_config=text_hf_config(contrastive, vision, vocab_size, pad_id).to_dict(),
        vision_config=siglip_hf_config(vision, use_head=True).to_dict(),
    )
    with torch.device(device):
        model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(contrastive.init_logit_scale)
        model.logit_bias.fill_(contrastive.init_logit_bias)
    return model


def embed_images(model: SiglipModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``pixel_values (B, 3, S, S)`` in [-1, 1] → L2-normalised pooled embeddings ``(B, D)``."""
    return F.normalize(model.vision_model(pixel_values=pixel_values).pooler_output, dim=-1)


def text_attention_mask(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``(B, L)`` key mask: the text's own ids, plus the last position, which is the one SigLIP pools.

    transformers' SigLIP text tower pools the hidden state of the last position, a padding slot for any
    caption shorter than ``text_max_length``. Masking the other padding keys lets that slot read the caption
    alone instead of ~30 identical padding vectors; on the world this made training markedly more stable
    (colour zero-shot at 100% for every seed tried, against 60-99% without the mask, same budget).
    """
    mask = (input_ids != pad_id).long()
    mask[:, -1] = 1
    return mask


def embed_texts(model: SiglipModel, input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids (B, L)`` padded to the fixed length → L2-normalised pooled embeddings ``(B, D)``."""
    mask = text_attention_mask(input_ids, model.config.text_config.pad_token_id)
    return F.normalize(model.text_model(input_ids=input_ids, attention_mask=mask).pooler_output, dim=-1)


def tokenize(
    tokenizer: TextTokenizer, texts: Sequence[str], max_length: int, pad: int | None = None
) -> torch.Tensor:
    """Ids of each text cut or right-padded to exactly ``max_length``: ``(len(texts), max_length)``.

    Like SigLIP, every text is padded to one fixed length, training captions and zero-shot prompts alike,
    so the pooled last position is always the same slot (see :func:`text_attention_mask`). ``pad``: the
    padding id (default: the tokenizer's own; UniTok's text tower has its own ``text_pad_id``).
    """
    pad = tokenizer.special_tokens().pad if pad is None else pad
    rows = [tokenizer.encode(text)[:max_length] for text in texts]
    return torch.tensor([row + [pad] * (max_length - len(row)) for row in rows], dtype=torch.long)


def image_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """SigLIP's input for whole images (the AnyRes base view): ``(B, 3, size, size)`` in [-1, 1]."""
    return torch.stack([image_to_tensor(base_view(image, size)) for image in images])


def load_contrastive(out_dir: str | Path) -> SiglipModel:
    """The full pre-trained ``SiglipModel`` (both towers) saved by
    :func:`unified_mllm.train.contrastive.save_contrastive`, in fp32."""
    directory = Path(out_dir).expanduser()
    model, info = SiglipModel.from_pretrained(str(directory), dtype=torch.float32, output_loading_info=True)
    # transformers fills a missing tensor with random values and drops an unexpected one, logging both only;
    # an export is written by save_contrastive from exactly this architecture, so either means a wrong file.
    problems = [
        f"{title}: {', '.join(sorted(info[key]))}"
        for title, key in (("missing keys", "missing_keys"), ("unexpected keys", "unexpected_keys"))
        if info[key]
    ]
    if problems:
        raise ValueError(f"SigLIP export {directory} does not match its config.json: " + " | ".join(problems))
    return model
