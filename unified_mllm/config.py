"""One typed config tree for every entry point.

Loading order (later wins): the dataclass defaults below ← the named model preset (``model.preset``) ←
YAML files from ``configs/`` (each may name ``_base_`` files merged first) ← ``key.sub=value`` dotlist
overrides from the command line → :func:`validate`. OmegaConf's structured mode rejects unknown keys and
wrongly typed values; :func:`load_config` re-raises those as :class:`ConfigError` naming the full key.

Every field carries its documentation in ``metadata["doc"]`` so that ``python -m unified_mllm.config``
can print the whole tree with explanations, and a test can check that nothing is left undocumented.
The dataclass defaults are the published UniToken-7B shapes (Chameleon-7B LM, SigLIP-so400m at 384 px,
Chameleon's VQ-GAN); the ``tiny`` preset shrinks them for CPU work. The preset table lives here too
(:func:`get_preset`, :func:`register_preset`), so that loading a config needs nothing above this layer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unified_mllm.io import write_text

BASE_KEY = "_base_"
OUTPUT_ENV = "UMLLM_OUTPUT"
DEFAULT_OUTPUT_ROOT = "~/.cache/unified_mllm"


def default_output_root() -> str:
    """Where artifacts go unless a config says otherwise: never inside the source tree."""
    return os.path.expanduser(os.environ.get(OUTPUT_ENV) or DEFAULT_OUTPUT_ROOT)


OmegaConf.register_resolver("umllm_output_root", default_output_root, replace=True)


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names the key."""


def opt(default: Any, doc: str) -> Any:
    """A documented leaf field; lists and tuples are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def section(cls: type, doc: str) -> Any:
    """A documented nested section."""
    return field(default_factory=cls, metadata={"doc": doc})


# ----------------------------------------------------------------------------------------------- model


@dataclass
class LMConfig:
    arch: Literal["chameleon", "llama"] = opt(
        "chameleon", "ChameleonModel (q/k-norm) or LlamaModel backbone."
    )
    vocab_size: int = opt(65536, "Rows of the embedding and LM head: text + image code + special token ids.")
    hidden_size: int = opt(4096, "Width of the residual stream.")
    intermediate_size: int = opt(11008, "Width of the SwiGLU MLP.")
    num_layers: int = opt(32, "Number of decoder blocks.")
    num_heads: int = opt(32, "Attention heads.")
    num_kv_heads: int = opt(32, "Key/value heads (grouped-query attention when fewer than num_heads).")
    max_position_embeddings: int = opt(4096, "Longest sequence the RoPE tables are built for.")
    rope_theta: float = opt(10000.0, "RoPE base frequency.")
    swin_norm: bool = opt(False, "Chameleon-34B blocks: normalise each branch's output before the residual.")
    rms_norm_eps: float = opt(1e-5, "Epsilon of the RMS/layer norms.")
    residual_dropout: float = opt(0.05, "Dropout on each block's attention and MLP output (UniToken: 0.05).")
    attention_dropout: float = opt(0.0, "Dropout on attention probabilities.")
    tie_word_embeddings: bool = opt(False, "Share the input embedding with the LM head.")
    initializer_range: float = opt(0.02, "Std of the normal init for freshly built weights.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt("sdpa", "Attention kernel.")
    pretrained: str | None = opt(
        None,
        "Hugging Face checkpoint directory of the LM (e.g. Lumina-mGPT-7B) loaded at the start of training "
        "by UnifiedModel.load_pretrained; None: random init (or checkpoint.init_from).",
    )


# UniToken's published AnyRes settings (its `image_grid_pinpoints` [[384, 768], [768, 384], [768, 768], [384, 1152],
# [1152, 384]] as (width, height) in 384 px tiles, written here as [rows, cols]; black padding): what a converted
# UniToken-AnyRes checkpoint sets beside `anyres.layout: unitoken`.
UNITOKEN_ANYRES_GRIDS = [[2, 1], [1, 2], [2, 2], [3, 1], [1, 3]]
UNITOKEN_PAD_COLOR = [0, 0, 0]


@dataclass
class AnyResConfig:
    enabled: bool = opt(False, "Encode a base view plus tiles picked from `grids` (AnyRes).")
    grids: list[list[int]] = opt(
        [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]],
        "Candidate tile layouts as [rows, cols] of image_size tiles; the one that keeps the most of the "
        "image's resolution wins, ties going to the least padded area, then to the earlier entry.",
    )
    pad_color: list[int] = opt(
        [255, 255, 255], "RGB fill around an image in its tile grid (white, as in RGBA compositing)."
    )
    layout: Literal["tiles", "unitoken"] = opt(
        "tiles",
        "Order of the feature slots. tiles: the base view's features, then each tile's, row-major (ours). "
        "unitoken: UniToken's published AnyRes layout: the base view's features, then all tiles merged into "
        "one 2-D feature grid cut back to the image's aspect ratio (the padding removed), with the row-end "
        "token after every feature row; grids are picked and tiles padded as UniToken's mm_utils does "
        "(set grids [[2, 1], [1, 2], [2, 2], [3, 1], [1, 3]] and pad_color [0, 0, 0] to match its checkpoints).",
    )


@dataclass
class VisionConfig:
    enabled: bool = opt(True, "Feed continuous SigLIP features (off for stage 0: discrete tokens only).")
    image_size: int = opt(384, "SigLIP input side in pixels.")
    patch_size: int = opt(14, "SigLIP patch size; (image_size // patch_size)^2 features per view.")
    hidden_size: int = opt(1152, "SigLIP width.")
    intermediate_size: int = opt(4304, "SigLIP MLP width.")
    num_layers: int = opt(27, "SigLIP encoder layers.")
    num_heads: int = opt(16, "SigLIP attention heads.")
    layer_norm_eps: float = opt(1e-6, "SigLIP layer-norm epsilon.")
    feature_layer: int = opt(
        -1,
        "Which hidden state to project: -1 the last, after the post-layernorm; any other value indexes "
        "transformers' hidden_states (0 the patch embeddings, k the output of layer k, -2 the penultimate).",
    )
    pretrained: str | None = opt(None, "Path of a SigLIP checkpoint (from_pretrained); None: random init.")
    lr_scale: float = opt(0.01, "LR multiplier of the SigLIP tower relative to optim.lr (UniToken: 0.01).")
    anyres: AnyResConfig = section(AnyResConfig, "Any-resolution tiling of the continuous branch.")


@dataclass
class ProjectorConfig:
    depth: int = opt(2, "Linear layers in the MLP that maps SigLIP width to LM width.")
    activation: Literal["gelu", "silu", "relu"] = opt("gelu", "Activation between projector layers.")


@dataclass
class ContrastiveConfig:
    output_dir: str = opt(
        "${output_root}/tokenizer/siglip-tiny",
        "Where the contrastively pre-trained SigLIP (vision + text towers) is saved; load the vision tower "
        "with model.vision.pretrained pointing here.",
    )
    text_hidden_size: int = opt(128, "Width of the small SigLIP text tower.")
    text_intermediate_size: int = opt(512, "MLP width of the text tower.")
    text_num_layers: int = opt(2, "Encoder layers of the text tower.")
    text_num_heads: int = opt(4, "Attention heads of the text tower.")
    text_max_length: int = opt(40, "Text ids per caption: longer ones are cut, shorter ones padded.")
    batch_size: int = opt(32, "Image-caption pairs per step (every pair is a negative for the others).")
    max_steps: int = opt(800, "Optimizer steps (tiny preset, batch 32: ~0.1-0.15 s each on 2 CPU cores).")
    lr: float = opt(1e-3, "Peak AdamW learning rate.")
    min_lr_ratio: float = opt(0.05, "Final LR of the cosine as a fraction of the peak.")
    warmup_steps: int = opt(30, "Linear warm-up steps.")
    weight_decay: float = opt(1e-4, "AdamW decoupled weight decay (matrices only, as in SigLIP).")
    grad_clip: float = opt(1.0, "Global gradient-norm clip (0 disables).")
    max_bad_steps: int = opt(
        0, "Steps with a non-finite loss or gradient norm skipped before stopping (0: stop)."
    )
    init_logit_scale: float = opt(2.302585, "Initial log-temperature t' (SigLIP: log 10, so t = 10).")
    init_logit_bias: float = opt(-10.0, "Initial logit bias b (SigLIP: -10).")
    shuffle_buffer: int = opt(2000, "Samples held for streaming shuffling.")
    object_views: float = opt(
        0.0,
        "Fraction of the pairs replaced by one object of the scene drawn alone with its own phrase as caption "
        "(records with the world's objects only; see unified_mllm.data.contrastive_views).",
    )
    hard_negatives: list[str] = opt(
        [],
        "Attributes (shape, color, size) one of which a hard-negative caption changes: every pair with the "
        "world's objects adds its caption with one attribute of one object changed, as a text no image of "
        "the batch matches. Empty: off.",
    )
    seed: int = opt(0, "Seed of the initialisation and the data order.")
    train_split: str = opt("train", "Split of data.root the captions are read from.")
    eval_split: str = opt("test", "Split of data.root the zero-shot accuracy is measured on.")
    probe_train_scenes: int = opt(
        2000,
        "Scenes of train_split (the first ones) the linear probes of the image side are fitted on before they "
        "are scored on eval_split (world records only); 0: no probes.",
    )
    prompt_template: str = opt(
        "a photo of a {color} {shape}",
        "Zero-shot class prompt; {color} and {shape} range over data.world. In the contrastive trainer only, "
        "optional {size} and {cell} are filled in every way (the world's sizes and grid cells) and a class "
        "scores its best variant, so the prompts can have the training captions' form.",
    )
    log_every: int = opt(10, "Steps between metric logs (metrics.jsonl, the bar, wandb).")
    checkpoint_every: int = opt(200, "Steps between training-state checkpoints (output_dir/checkpoints).")
    keep_last: int = opt(2, "Training-state checkpoints kept on disk.")
    resume: bool = opt(True, "Resume from the newest training-state checkpoint in output_dir.")


@dataclass
class UniTokConfig:
    """UniTok (Ma et al. 2025): ViT tokenizer with multi-codebook quantization; defaults are UniTok-Large at
    256 px (ViTamin-L-style encoder and mirrored decoder, 8 x 4096 codes of 8 dims, OpenCLIP-B text tower).
    The codebook size per sub-codebook, latent width, beta and cosine lookup come from ``model.vq``."""

    num_codebooks: int = opt(8, "Sub-codebooks: the latent's channels are split into this many chunks.")
    conv_widths: list[int] = opt(
        [160, 320],
        "Widths of the conv stages between the stride-2 stem and the stride-2 conv into the ViT; each stage "
        "halves the resolution, so the downsampling is 2^(len + 2) (16 for two stages).",
    )
    conv_depths: list[int] = opt([2, 4], "Inverted-bottleneck (MBConv) blocks per conv stage.")
    conv_expansion: int = opt(4, "Channel expansion inside an MBConv block.")
    width: int = opt(1024, "Width of the ViT blocks of encoder and decoder.")
    encoder_layers: int = opt(31, "ViT blocks of the encoder.")
    decoder_layers: int = opt(31, "ViT blocks of the decoder.")
    num_heads: int = opt(16, "Attention heads of the ViT blocks.")
    mlp_ratio: float = opt(2.0, "GeGLU hidden width as a multiple of the block width (ViTamin: 2).")
    projection_heads: int = opt(
        16, "Heads of the attention projections around the quantizer (width -> model.vq.embed_dim -> width)."
    )
    causal_projection: bool = opt(
        False,
        "Causal attention in the projections (UniTok's first checkpoint and its MLLM side); the current "
        "tokenizer uses full attention.",
    )
    clip_dim: int = opt(768, "Width of the shared image-text embedding of the contrastive loss.")
    text_width: int = opt(768, "Width of the text tower (CLIP text transformer).")
    text_layers: int = opt(12, "Layers of the text tower.")
    text_heads: int = opt(12, "Attention heads of the text tower.")
    text_vocab_size: int = opt(
        49408, "Text tower vocabulary (OpenCLIP BPE: 49408); the tiny preset uses the project's tokenizer."
    )
    text_context: int = opt(77, "Text ids per caption (longer ones are cut).")
    text_pad_id: int = opt(
        0,
        "Id that right-pads captions to a fixed length (OpenCLIP's tokenizer pads with 0; set the text "
        "tokenizer's pad id when another one feeds the tower). The text tower masks these ids and pools "
        "the last id that is not padding.",
    )
    init_logit_scale: float = opt(2.6592, "Initial log of the contrastive logit scale (CLIP: ln(1/0.07)).")
    mlp_norm: Literal["hidden", "input"] = opt(
        "hidden",
        "Where every GeGLU MLP (ViT blocks and the two attention projections) puts its LayerNorm: 'hidden' "
        "normalises the gated hidden (mlp_ratio x width channels; this project's original layout), 'input' "
        "normalises the MLP's input before the value/gate projections, as the published UniTok (ViTamin's "
        "GeGluMlp) does. Checkpoints converted from UniTok (python -m unified_mllm.convert unitok) need 'input'.",
    )
    layer_norm_eps: float = opt(
        1e-5,
        "Epsilon of the ViT blocks' LayerNorms, the encoder's and decoder's final LayerNorm, the CLIP head's "
        "LayerNorm and every GeGLU LayerNorm (the projections' own norm1/2/3 keep 1e-5 either way). The "
        "published UniTok uses 1e-6 (timm's ViT default); 1e-5 is this project's original value.",
    )


@dataclass
class DualTokenConfig:
    """DualToken (Song et al. 2025): one SigLIP backbone, its shallow features quantized for pixels and its deep
    features for semantics; defaults are the published SigLIP-so400m/14 at 384 px. The pixel decoder is a
    VQ-GAN decoder built from ``model.vq``'s decoder fields (``z_channels`` in, ``base_channels``,
    ``channel_mult``, ``num_res_blocks``, ``attn_resolutions``); codes come from two residual quantizers of
    ``model.vq.codebook_size`` x ``model.vq.embed_dim`` with ``model.vq.ema_decay`` updates."""

    backbone: VisionConfig = section(VisionConfig, "Shape of the SigLIP backbone (so400m/14 at 384 px).")
    pretrained: str | None = opt(
        None,
        "SigLIP weights the backbone starts from and the frozen semantic teacher copies (a transformers "
        "SiglipModel or SiglipVisionModel directory); None: random (tests only: no teacher worth keeping).",
    )
    pixel_layer: int = opt(6, "Layer whose output feeds the pixel branch (1-based).")
    shortcut_layer: int = opt(4, "Earlier layer added to the pixel branch through its own projection.")
    shortcut_weight: float = opt(0.6, "Scale of the shortcut branch (0 disables it).")
    semantic_layer: int = opt(26, "Layer whose output is quantized for semantics and fed to later layers.")
    pixel_depth: int = opt(8, "Residual quantization depth of the pixel codes.")
    semantic_depth: int = opt(8, "Residual quantization depth of the semantic codes.")
    projection_heads: int = opt(36, "Heads of the attention projections (backbone width <-> embed_dim).")
    decoder_latent_side: int = opt(
        24, "The code grid is resized (bilinear) to this side before the pixel decoder (27 -> 24 at 384 px)."
    )
    semantic_hidden_weight: float = opt(
        5.0, "Weight of the distillation term between the quantized semantic tokens and the teacher's."
    )
    semantic_pooled_weight: float = opt(
        1.0, "Weight of the distillation term between the pooled (MAP head) outputs and the teacher's."
    )
    mlp_norm: Literal["hidden", "input"] = opt(
        "hidden",
        "Where the GeGLU MLPs of the five attention projections put their LayerNorm: 'hidden' (after gating; "
        "this project's original layout) or 'input' (before the value/gate projections, as the published "
        "DualToken's GeGluMlp). Checkpoints converted from DualToken need 'input'.",
    )
    mlp_norm_eps: float = opt(
        1e-5, "Epsilon of those GeGLU LayerNorms (published DualToken: 1e-6; 1e-5 is the original value)."
    )
    post_quant_norm2: bool = opt(
        False,
        "A second GroupNorm (32 groups, eps 1e-6) before the SiLU between the post-quant block's two convs, "
        "as in the published DualToken (its post_quant_conv.norm2); False: SiLU only (the original block).",
    )


@dataclass
class VQConfig:
    kind: Literal["vqgan", "unitok", "dualtoken"] = opt("vqgan", "Which visual tokenizer makes the codes.")
    codebook_size: int = opt(8192, "Number of codes (Chameleon: 8192).")
    trust_pickle: bool = opt(
        False,
        "Unpickle a .ckpt/.pt in full when the restricted reader refuses it: runs whatever code the file names, "
        "so only for a file from a source you trust (Chameleon's vqgan.ckpt loads without it).",
    )
    embed_dim: int = opt(256, "Code vector width (Chameleon: 256).")
    z_channels: int = opt(256, "Encoder output channels before quant_conv.")
    base_channels: int = opt(128, "Width of the first encoder level (taming `ch`).")
    channel_mult: list[int] = opt([1, 1, 2, 2, 4], "Width multipliers per level; levels-1 downsamplings.")
    num_res_blocks: int = opt(2, "Residual blocks per level.")
    attn_resolutions: list[int] = opt([], "Feature-map sides at which self-attention blocks are added.")
    resolution: int = opt(512, "Training image side (codes per side = resolution / 2^(levels-1)).")
    dropout: float = opt(0.0, "Dropout inside the residual blocks.")
    beta: float = opt(0.25, "Commitment loss weight.")
    l2_normalize_codes: bool = opt(False, "Look codes up by cosine similarity (l2-normalised vectors).")
    ema_decay: float | None = opt(
        None,
        "Update the codebook as an exponential moving average of its assigned encoder outputs with this "
        "decay (e.g. 0.99) instead of the codebook loss; None: learn it by gradient (Chameleon/taming).",
    )
    dead_code_steps: int = opt(
        0,
        "Restart codes unused for this many training forward passes from random encoder outputs of the "
        "current batch (the trainer calls restart_dead_codes each step); 0: never.",
    )
    checkpoint: str | None = opt(None, "Path of trained tokenizer weights (e.g. Chameleon's vqgan.ckpt).")
    preprocess: Literal["center_crop", "halving"] = opt(
        "center_crop",
        "How an image becomes the LM's VQ input (pre-tokenization and InferenceSolver). center_crop: one "
        "bicubic resize of the short side to `resolution`, then the centre crop (ours). halving: UniToken's / "
        "Lumina-mGPT's item processor: BOX-halve both sides while both are at least twice the target, then "
        "the bicubic resize and the centre crop (the published training crop is random; inference uses the "
        "centre). Not a property of the tokenizer weights: not written into the tokenizer's config.json.",
    )
    unitok: UniTokConfig = section(UniTokConfig, "UniTok's architecture (used when kind is unitok).")
    dualtoken: DualTokenConfig = section(DualTokenConfig, "DualToken's architecture (kind dualtoken).")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per code along a side."""
        if self.kind == "unitok":
            return 2 ** (len(self.unitok.conv_widths) + 2)
        if self.kind == "dualtoken":
            return self.dualtoken.backbone.patch_size
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def code_depth(self) -> int:
        """Codes per spatial position: 1 (VQ-GAN), the sub-codebooks (UniTok), pixel + semantic depths."""
        if self.kind == "unitok":
            return self.unitok.num_codebooks
        if self.kind == "dualtoken":
            return self.dualtoken.pixel_depth + self.dualtoken.semantic_depth
        return 1


@dataclass
class DepthHeadConfig:
    """The LM's input and output for tokenizers with a stack of codes per position (UniTok, DualToken): the
    stack's embeddings are combined into one LM input, and a small causal transformer per code group on the
    LM's hidden state predicts the stack one code after another (UniTok's / DualToken's MLLMs: 3 layers)."""

    num_layers: int = opt(3, "Transformer blocks of each depth head.")
    width: int = opt(0, "Width of the depth heads; 0: the LM's hidden size.")
    num_heads: int = opt(0, "Attention heads of the depth heads; 0: width / 64 (at least 1).")


@dataclass
class ModelConfig:
    preset: str | None = opt(None, "Named preset (tiny, chameleon-7b, chameleon-34b) under the YAML values.")
    lm: LMConfig = section(LMConfig, "The autoregressive language model.")
    vision: VisionConfig = section(VisionConfig, "The continuous SigLIP branch.")
    projector: ProjectorConfig = section(ProjectorConfig, "SigLIP → LM projector.")
    vq: VQConfig = section(VQConfig, "The discrete visual tokenizer.")
    depth_head: DepthHeadConfig = section(
        DepthHeadConfig, "Code-stack embedding and depth heads (model.vq.kind unitok / dualtoken only)."
    )
    prompt_style: Literal["native", "unitoken"] = opt(
        "native",
        "The prompts the LM was trained on. native: ours (text-to-image = <bos> prompt <eot> <image-start> ..., "
        "the unconditional CFG row the same with an empty prompt). unitoken: UniToken's published solvers: "
        "the text-to-image answer opens with `t2i_answer_prefix` before <image-start>, the unconditional CFG "
        "row starts at <image-start> (no <bos>, no text), and an image without an <|image|> placeholder is "
        "put at the start of the first question followed by a space. Applies to training data and inference.",
    )
    t2i_answer_prefix: str = opt(
        "",
        "Name of the token (looked up in the text tokenizer) that opens a text-to-image answer right before "
        "<image-start> when prompt_style is unitoken; UniToken's solvers append Chameleon id 16853 there "
        "(the converter writes that id's name from the published tokenizer). '': none.",
    )
    grid_positions: int = opt(
        0,
        "Learned 2-D positions of image slots, added to the LM input: row and column embeddings of each code "
        "for code grids up to this side, and one embedding per feature slot of a SigLIP view. 0: off (the "
        "published recipes; the LM then has only its 1-D RoPE positions to tell where a code or a feature is).",
    )


# ------------------------------------------------------------------------------------------ tokenizer


@dataclass
class TextTokenizerConfig:
    kind: Literal["sentencepiece", "chameleon"] = opt(
        "sentencepiece", "A sentencepiece model trained by our CLI, or Chameleon's text_tokenizer.json."
    )
    path: str = opt("${output_root}/tokenizer/text.model", "Path of the tokenizer file.")
    vocab_size: int = opt(
        512, "Pieces of a freshly trained sentencepiece model (incl. 256 byte-fallback pieces and specials)."
    )
    num_size_tokens: int = opt(33, "Resolution tokens <size-0> .. <size-N-1> of a trained sentencepiece.")
    size_unit: int = opt(1, "Code rows/cols per resolution-token step (Chameleon/Lumina: 2 = 32 px).")


# ----------------------------------------------------------------------------------------------- data


@dataclass
class WorldConfig:
    image_size: int = opt(64, "Side of a rendered scene in pixels.")
    grid_size: int = opt(3, "Objects sit in the cells of a grid_size x grid_size grid.")
    min_objects: int = opt(1, "Fewest objects in a scene.")
    max_objects: int = opt(4, "Most objects in a scene.")
    shapes: list[str] = opt(["circle", "square", "triangle"], "Shape vocabulary.")
    colors: list[str] = opt(
        ["red", "green", "blue", "yellow", "purple", "orange"], "Colour vocabulary (names from the palette)."
    )
    sizes: list[str] = opt(["small", "large"], "Size vocabulary.")
    seed: int = opt(0, "Seed of the generator; a scene is a pure function of (seed, split, index).")
    num_train: int = opt(20000, "Scenes in the train split.")
    num_val: int = opt(500, "Scenes in the val split.")
    num_test: int = opt(1000, "Scenes in the test split.")
    samples_per_shard: int = opt(2000, "Samples per webdataset tar shard.")


@dataclass
class DataSourceConfig:
    path: str = opt("", "Directory (or glob) of webdataset tar shards.")
    task: Literal["caption", "vqa", "t2i", "conversation"] = opt("caption", "Samples made from each record.")
    ratio: float = opt(1.0, "Relative sampling weight within the mix.")
    loss_weight: float = opt(
        1.0,
        "Weight of this source's supervised tokens in the loss, a weighted mean over the step: raise it for "
        "sources with few supervised tokens per sample (VQA answers beside whole image spans).",
    )
    name: str = opt("", "Label of the source in logs and drop counts; '' uses `<task>:<index>`.")


@dataclass
class DataConfig:
    root: str = opt("${output_root}/data/shapes", "Where the world's webdataset splits are written.")
    tokenized_root: str = opt(
        "${data.root}/tokenized",
        "Where `python -m unified_mllm.data.pretokenize` writes the pre-tokenized splits (<split>/*.tar).",
    )
    world: WorldConfig = section(WorldConfig, "The embedded synthetic world.")
    sources: list[DataSourceConfig] = opt([], "The data mix: shard sets with their task and ratio.")
    max_seq_len: int = opt(4096, "Longest training sequence; longer samples are dropped with a count.")
    pack: bool = opt(False, "Pack several samples into one sequence instead of right-padding.")
    shuffle_buffer: int = opt(1000, "Samples held for streaming shuffling.")
    num_workers: int = opt(2, "DataLoader worker processes.")
    cfg_dropout: float = opt(
        0.1,
        "Probability that a text-to-image sample loses its condition (classifier-free guidance's "
        "unconditional branch: exactly layout.unconditional_prompt of model.prompt_style).",
    )
    vqa_max_turns: int = opt(0, "Question-answer turns per VQA sample (a seeded subset); 0: all of them.")
    pad_to_multiple_of: int = opt(8, "Round the padded batch length up to a multiple of this (1: off).")
    pretokenize_batch_size: int = opt(64, "Images per VQ-tokenizer forward during pre-tokenization.")


# ------------------------------------------------------------------------------------ optimisation


@dataclass
class ParamGroupConfig:
    match: str = opt("", "Module path prefix (e.g. `vision`, `lm.layers.0`); '' matches everything.")
    lr_scale: float = opt(1.0, "LR multiplier of this group.")
    trainable: bool = opt(True, "False freezes the matched parameters.")
    weight_decay: float | None = opt(None, "Weight decay of this group; None: optim.weight_decay.")
    required: bool = opt(True, "False: a rule for a module some models lack (code_embedder) may match none.")


@dataclass
class OptimConfig:
    lr: float = opt(1e-5, "Peak learning rate (UniToken stage 1: 1e-3, stage 2: 1e-5).")
    min_lr_ratio: float = opt(0.0, "Final LR of the cosine as a fraction of the peak.")
    warmup_steps: int = opt(100, "Linear warm-up steps.")
    schedule: Literal["cosine", "constant"] = opt("cosine", "LR shape after warm-up.")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay.")
    grad_clip: float = opt(4.0, "Global gradient-norm clip (0 disables).")
    z_loss_weight: float = opt(1e-5, "Weight of the z-loss (mean logsumexp^2 on supervised positions).")
    param_groups: list[ParamGroupConfig] = opt(
        [], "Per-module LR scale / freezing; later entries override earlier ones on the same parameter."
    )


@dataclass
class ParallelConfig:
    backend: Literal["fsdp", "deepspeed", "none"] = opt("fsdp", "Data-parallel engine.")
    deepspeed_config: str = opt("configs/deepspeed/zero2.json", "DeepSpeed JSON used when backend=deepspeed.")
    activation_checkpointing: bool = opt(False, "Recompute each block's activations in the backward.")
    compile: bool = opt(False, "torch.compile each block.")
    reshard_after_forward: bool = opt(True, "FSDP2: free gathered params after forward (ZeRO-3 style).")


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = opt("offline", "wandb mode; offline writes locally.")
    project: str = opt("unified_mllm", "wandb project.")


# The LM decoder's linear layers by their leaf names (the same in transformers' Chameleon and Llama blocks).
LORA_LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = opt(
        0,
        "LoRA rank; 0 turns LoRA off. Above 0 every base weight is frozen, only the adapters train (and sit in "
        "the optimizer), and the export holds only the adapter plus the path of checkpoint.init_from.",
    )
    alpha: float = opt(16.0, "LoRA scale numerator: the adapters' update is scaled by alpha / rank.")
    dropout: float = opt(0.0, "Dropout on the adapters' input (training only).")
    target_modules: list[str] = opt(
        list(LORA_LM_TARGETS),
        f"LM decoder linears adapted in every layer, by leaf name: any of {', '.join(LORA_LM_TARGETS)}.",
    )
    projector: bool = opt(False, "Also adapt the projector's linear layers (vision.projector).")


@dataclass
class TrainConfig:
    stage: int = opt(2, "Training stage: 0 discrete-only LM, 1 align SigLIP+projector, 2 all, 3 curated.")
    max_steps: int = opt(1000, "Optimizer steps.")
    micro_batch_size: int = opt(4, "Sequences per rank per forward.")
    grad_accum_steps: int = opt(1, "Micro-batches per optimizer step.")
    precision: Literal["fp32", "bf16", "fp16"] = opt("bf16", "Compute dtype (fp32 master weights).")
    seed: int = opt(0, "Seed of model init, data order and dropout.")
    device: str | None = opt(None, "cpu, cuda, ...; None: this rank's GPU when there is one, else the CPU.")
    log_every: int = opt(
        10, "Steps between metric logs (the loop's host syncs, with one finiteness flag a step)."
    )
    max_bad_steps: int = opt(
        0,
        "Steps with a non-finite loss or gradient norm skipped (no update) before the run stops; 0: stop at the "
        "first. fsdp backend only (DeepSpeed updates inside its engine).",
    )
    parallel: ParallelConfig = section(ParallelConfig, "Distribution.")
    wandb: WandbConfig = section(WandbConfig, "Experiment tracking.")
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters (peft) instead of full fine-tuning.")


@dataclass
class CheckpointConfig:
    dir: str = opt("${output_root}/runs/${run_name}", "Training-state checkpoints and the export go here.")
    every_steps: int = opt(500, "Steps between training-state checkpoints.")
    keep_last: int = opt(2, "Training-state checkpoints kept on disk.")
    resume: bool = opt(True, "Resume from the newest checkpoint in `dir` when there is one.")
    fallback: bool = opt(
        True,
        "When the newest checkpoint fails to load, warn and resume from the next older one (false: stop).",
    )
    trust_metadata: bool = opt(
        False,
        "Skip the check of DCP's pickled metadata (dcp/.metadata) before resuming: only for a run directory "
        "you trust whose metadata names classes the check does not know (a newer torch).",
    )
    init_from: str | None = opt(None, "Export directory of an earlier stage to initialise from.")
    export_dir: str = opt(
        "${checkpoint.dir}/export",
        "Where the final Hugging Face-format export goes (InferenceSolver.from_pretrained reads it).",
    )


@dataclass
class GenerationConfig:
    max_new_tokens: int = opt(512, "Most tokens generated for a text answer.")
    temperature: float = opt(1.0, "Sampling temperature of image codes.")
    text_temperature: float = opt(0.0, "Text temperature; 0 means greedy (used for understanding).")
    image_top_k: int = opt(2000, "Top-k over image codes.")
    text_top_k: int = opt(5, "Top-k over text tokens when sampling.")
    top_p: float = opt(1.0, "Nucleus threshold (1 disables).")
    cfg_scale: float = opt(3.0, "Classifier-free guidance scale for images (UniToken GenEval: 5.5).")
    image_size: int = opt(512, "Side of generated images in pixels.")
    seed: int = opt(0, "Sampling seed.")
    jacobi_window: int = opt(
        0,
        "Speculative Jacobi decoding of images: draft ids checked per forward (0: one id per forward); the "
        "same distribution in fewer forwards (VQ-GAN codes only).",
    )


@dataclass
class VQTrainConfig:
    """Image tokenizer training (python -m unified_mllm.train.tokenizer) for every model.vq.kind;
    defaults: the published-size VQ-GAN recipe (taming-transformers' losses); configs/tokenizer/*-tiny.yaml
    shrink it for CPUs and set the UniTok / DualToken recipes."""

    output_dir: str = opt(
        "${output_root}/tokenizer/vqgan-${run_name}",
        "Run directory: the final tokenizer (VQGAN.from_checkpoint reads it), config.yaml, metrics, plots, "
        "and training-state checkpoints under checkpoints/.",
    )
    train_data: str = opt("${data.root}/train", "Training shards: a directory, glob or .tar file.")
    eval_data: str = opt(
        "${data.root}/val", "Shards of the periodic checks and the final reconstruction grid ('' disables)."
    )
    init_from: str | None = opt(
        None,
        "Tokenizer weights to fine-tune from (Chameleon's vqgan.ckpt, or a save_pretrained directory); "
        "their shapes must match model.vq. None: random init.",
    )
    steps: int = opt(100000, "Optimizer steps of the generator.")
    batch_size: int = opt(8, "Images per rank per step (the global batch is batch_size x ranks).")
    lr: float = opt(1e-4, "Peak AdamW learning rate of the generator (LlamaGen's VQ-GAN: 1e-4).")
    betas: list[float] = opt([0.5, 0.9], "Adam betas of both optimizers (taming: 0.5, 0.9).")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay of the generator.")
    schedule: Literal["cosine", "constant"] = opt(
        "constant", "LR after warm-up (taming, LlamaGen: constant)."
    )
    warmup_steps: int = opt(0, "Linear LR warm-up steps.")
    min_lr_ratio: float = opt(0.0, "Final LR of the cosine as a fraction of the peak.")
    grad_clip: float = opt(0.0, "Global gradient-norm clip of each network (0 disables).")
    max_bad_steps: int = opt(
        0, "Steps with a non-finite loss or gradient norm skipped before stopping (0: stop)."
    )
    l1_weight: float = opt(1.0, "Weight of the mean absolute pixel error (taming's reconstruction loss).")
    l2_weight: float = opt(0.0, "Weight of the mean squared pixel error.")
    perceptual: Literal["lpips-vgg16", "none"] = opt(
        "lpips-vgg16", "Perceptual loss network; it is used only when perceptual_weights names a file."
    )
    perceptual_weights: str | None = opt(
        None,
        "LPIPS-VGG16 weights file (layout: unified_mllm.train.tokenizer_losses.load_lpips); None: no perceptual loss.",
    )
    perceptual_weight: float = opt(1.0, "Weight of the perceptual loss (taming: 1.0).")
    codebook_weight: float = opt(
        1.0, "Weight of the quantizer loss (codebook + model.vq.beta x commitment; commitment only with EMA)."
    )
    gan_weight: float = opt(0.8, "Weight of the generator's GAN loss (taming's disc_weight: 0.8); 0: off.")
    gan_loss: Literal["hinge", "non_saturating"] = opt("hinge", "GAN objective (taming: hinge).")
    disc_start_step: int = opt(20000, "Step at which the discriminator and the GAN term start.")
    disc_lr: float | None = opt(None, "Discriminator learning rate; None: the generator's lr.")
    adaptive_gan_weight: bool = opt(
        True, "Scale the GAN term by |grad NLL| / |grad GAN| at the decoder's last layer (taming)."
    )
    adaptive_weight_max: float = opt(1e4, "Clamp of the adaptive GAN weight (taming: 1e4).")
    discriminator: Literal["patchgan", "dino"] = opt(
        "patchgan",
        "patchgan: taming's convolutional discriminator (VQ-GAN, DualToken); dino: UniTok's heads on the "
        "multi-layer tokens of a frozen DINOv2 (disc_feature_model, or a random one when that is null).",
    )
    disc_feature_model: str | None = opt(
        None,
        "Local transformers DINOv2 directory for discriminator=dino (UniTok: DINOv2 ViT-S/14); None builds a "
        "randomly initialised, frozen ViT-S/14 (tiny runs: no download).",
    )
    disc_feature_layers: list[int] = opt(
        [0, 2, 5, 8, 11], "0-based DINOv2 blocks whose tokens the dino discriminator's heads read (UniTok's)."
    )
    disc_layers: int = opt(3, "Stride-2 layers of the PatchGAN discriminator (taming: 3).")
    disc_channels: int = opt(64, "Width of the discriminator's first layer (taming: 64).")
    disc_norm: Literal["batch", "group"] = opt(
        "batch", "Discriminator normalisation: BatchNorm (taming) or batch-independent GroupNorm."
    )
    contrastive_weight: float = opt(1.0, "UniTok: weight of the image-caption InfoNCE loss (UniTok: 1.0).")
    semantic_weight: float = opt(
        1.0,
        "DualToken: weight of the semantic distillation to the frozen teacher (its hidden/pooled split is "
        "model.vq.dualtoken's).",
    )
    restart_every: int = opt(10, "Steps between dead-code checks if model.vq.dead_code_steps > 0 (a sync).")
    shuffle_buffer: int = opt(1000, "Samples held by the streaming shuffle.")
    hflip: bool = opt(False, "Augmentation: mirror half the training images left-right.")
    seed: int = opt(0, "Seed of the initialisation, data order and dead-code restarts.")
    log_every: int = opt(10, "Steps between metric logs (the loop's only host syncs besides checks).")
    eval_every: int = opt(1000, "Steps between reconstruction checks on eval_data (0: only at the end).")
    eval_images: int = opt(16, "Images of eval_data used by the periodic check and the final grid.")
    checkpoint_every: int = opt(1000, "Steps between training-state checkpoints.")
    keep_last: int = opt(2, "Training-state checkpoints kept on disk.")
    resume: bool = opt(True, "Resume from the newest training-state checkpoint in output_dir.")


@dataclass
class Config:
    output_root: str = opt(
        "${umllm_output_root:}", f"Root of every artifact: env {OUTPUT_ENV}, else {DEFAULT_OUTPUT_ROOT}."
    )
    run_name: str = opt("run", "Name of this run; checkpoints go under output_root/runs/run_name.")
    model: ModelConfig = section(ModelConfig, "Model shapes.")
    tokenizer: TextTokenizerConfig = section(TextTokenizerConfig, "Text tokenizer.")
    contrastive: ContrastiveConfig = section(
        ContrastiveConfig,
        "SigLIP pre-training on the world's captions (python -m unified_mllm.train.contrastive).",
    )
    data: DataConfig = section(DataConfig, "Data.")
    optim: OptimConfig = section(OptimConfig, "Optimiser and schedule.")
    train: TrainConfig = section(TrainConfig, "Training loop.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints and export.")
    generation: GenerationConfig = section(GenerationConfig, "Decoding defaults.")
    vq_train: VQTrainConfig = section(
        VQTrainConfig, "Image tokenizer training (python -m unified_mllm.train.tokenizer)."
    )


# --------------------------------------------------------------------------------------------- presets
# Named model shapes (design convention 3). load_config applies the preset named by `model.preset`
# underneath the YAML files and overrides, so a preset only supplies defaults; their parameter counts are
# printed by `python -m unified_mllm.model.stats` (built on the meta device).

PresetSource = ModelConfig | Callable[[], ModelConfig]

_PRESETS: dict[str, PresetSource] = {}


def register_preset(name: str, preset: PresetSource, *, overwrite: bool = False) -> None:
    """Register ``preset`` (a :class:`ModelConfig`, deep-copied on every :func:`get_preset`, or a zero-argument
    factory returning one) under ``name``; ``overwrite`` must be set to replace one, so that two modules cannot
    silently shadow each other's presets."""
    if not name or name != name.strip():
        raise ValueError(f"preset name must be non-empty without surrounding spaces, got {name!r}")
    if name in _PRESETS and not overwrite:
        raise ValueError(f"preset {name!r} is already registered (pass overwrite=True to replace it)")
    if not (isinstance(preset, ModelConfig) or callable(preset)):
        raise TypeError(f"preset {name!r} must be a ModelConfig or a factory, got {type(preset).__name__}")
    _PRESETS[name] = preset


def list_presets() -> list[str]:
    """The registered preset names, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` for preset ``name``, with its ``preset`` field set to ``name``."""
    source = _PRESETS.get(name)
    if source is None:
        raise ConfigError(
            f"`model.preset`: unknown preset {name!r}; known presets: {', '.join(list_presets())}"
        )
    # Copy factory results too: a factory may hand out a shared object, and `preset` is set below.
    config = copy.deepcopy(source if isinstance(source, ModelConfig) else source())
    if not isinstance(config, ModelConfig):
        raise TypeError(f"preset {name!r} factory returned {type(config).__name__}, not ModelConfig")
    config.preset = name
    return config


def describe_preset(name: str) -> str:
    """The preset factory's docstring on one line ('' for presets registered as plain config objects)."""
    get_preset(name)  # raises the usual ConfigError for unknown names
    source = _PRESETS[name]
    doc = None if isinstance(source, ModelConfig) else getattr(source, "__doc__", None)
    return " ".join((doc or "").split())


def chameleon_7b() -> ModelConfig:
    """UniToken-7B: Chameleon-7B LM + SigLIP-so400m-384 + Chameleon VQ-GAN, as in the published configs."""
    # The config tree's dataclass defaults are exactly these published shapes: the LM from
    # facebook/chameleon-7b config.json (Team Chameleon 2024), the tower from google/siglip-so400m-patch14-384
    # (Zhai et al. 2023, "Getting ViT in shape"), the tokenizer from Chameleon's vqgan.yaml.
    return ModelConfig()


def chameleon_34b() -> ModelConfig:
    """Chameleon-34B LM (facebook/chameleon-30b config.json) with chameleon-7b's SigLIP and VQ-GAN."""
    # swin_norm: Chameleon-34B normalises each branch's output before the residual add.
    lm = LMConfig(
        swin_norm=True, hidden_size=8192, intermediate_size=22016, num_layers=48, num_heads=64, num_kv_heads=8
    )
    return ModelConfig(lm=lm)


def tiny() -> ModelConfig:
    """Toy shapes that train on 2 CPU cores in minutes (tests, CI, quickstart); ours, not published."""
    # Every part keeps the 7B design (Chameleon blocks, SigLIP, 2-layer projector, VQ-GAN) at 64 px images.
    return ModelConfig(
        lm=LMConfig(
            arch="chameleon",
            # 512 sentencepiece pieces (tokenizer.vocab_size) + 512 VQ codes (vq.codebook_size).
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            max_position_embeddings=512,
            residual_dropout=0.05,
        ),
        # 64 px / 8 px patches → 8 x 8 = 64 feature slots per view.
        vision=VisionConfig(
            image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4
        ),
        projector=ProjectorConfig(depth=2),
        # Four levels → 8x downsampling: a 64 px image becomes 8 x 8 codes.
        vq=VQConfig(
            codebook_size=512,
            embed_dim=32,
            z_channels=32,
            base_channels=32,
            channel_mult=[1, 1, 2, 2],
            num_res_blocks=1,
            attn_resolutions=[],
            resolution=64,
        ),
    )


def with_unitoken_layouts(model: ModelConfig, *, anyres: bool, t2i_answer_prefix: str) -> ModelConfig:
    """A copy of ``model`` set up to see exactly what UniToken's published checkpoints were trained on: its
    prompts (``prompt_style`` unitoken with ``t2i_answer_prefix``, the name of the token its solvers put before
    ``<racm3:break>``), its VQ preprocessing (``vq.preprocess`` halving) and, for the AnyRes checkpoints
    (``anyres``), its AnyRes feature layout, candidate grids and black padding. What the ``unitoken``
    converter writes; docs-i15-layout.md explains each key."""
    model = copy.deepcopy(model)
    model.prompt_style = "unitoken"
    model.t2i_answer_prefix = t2i_answer_prefix
    model.vq.preprocess = "halving"
    if anyres:
        model.vision.anyres = AnyResConfig(
            enabled=True,
            grids=copy.deepcopy(UNITOKEN_ANYRES_GRIDS),
            pad_color=list(UNITOKEN_PAD_COLOR),
            layout="unitoken",
        )
    return model


register_preset("chameleon-7b", chameleon_7b)
register_preset("chameleon-34b", chameleon_34b)
register_preset("tiny", tiny)


# --------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read one YAML file with its `_base_` files merged underneath it (paths relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `_base_` cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = node.pop(BASE_KEY, None)
    if bases is None:
        return node
    base_list = [bases] if isinstance(bases, str) else list(bases)
    merged = OmegaConf.create()
    for base in base_list:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(base), (*seen, path)))
    return OmegaConf.merge(merged, node)


def _describe_error(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "not in" in msg or type(exc).__name__ == "ConfigKeyError":
        return ConfigError(f"{origin}: unknown config key `{key}` ({msg})")
    return ConfigError(f"{origin}: bad value for `{key}`: {msg}")


def _merge(base: DictConfig, other: DictConfig | ListConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _describe_error(exc, origin) from exc
    except TypeError as exc:  # e.g. a mapping given where the schema has a list
        raise ConfigError(
            f"{origin}: {exc} (a list entry is set with its index: data.sources.0.ratio=2)"
        ) from exc


def _indexes_a_list(override: str) -> bool:
    """Whether an override's key goes through a list index (``data.sources.0.ratio=2``)."""
    return any(part.isdigit() for part in override.partition("=")[0].split("."))


def _apply_indexed(merged: DictConfig, override: str) -> None:
    """Set one ``key.<index>.sub=value`` override in place (a dotlist layer cannot address list entries)."""
    key, _, raw = override.partition("=")
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            prefix = ".".join(parts[:i])
            entries = OmegaConf.select(merged, prefix, default=None)
            if not isinstance(entries, ListConfig):
                raise ConfigError(f"command line: `{key}`: `{prefix}` is not a list, so `{part}` is no index")
            if int(part) >= len(entries):
                raise ConfigError(
                    f"command line: `{key}`: index {part} is out of range (`{prefix}` has {len(entries)} entries)"
                )
    value = OmegaConf.from_dotlist([f"value={raw}"])["value"]  # parsed like any other override
    try:
        OmegaConf.update(merged, key, value, merge=True)
    except OmegaConfBaseException as exc:
        raise _describe_error(exc, "command line") from exc


def _preset_node(layers: Sequence[tuple[str, DictConfig]]) -> DictConfig | None:
    """The model preset named by the last layer that names one, as a config node."""
    names = [OmegaConf.select(layer, "model.preset", default=None) for _, layer in layers]
    names = [name for name in names if name is not None]
    return OmegaConf.create({"model": dataclasses.asdict(get_preset(names[-1]))}) if names else None


def load_config(
    yaml_paths: Sequence[str | Path] = (), overrides: Sequence[str] = (), *, check: bool = True
) -> Config:
    """Build a validated :class:`Config` from YAML files and ``key.sub=value`` overrides (list entries by
    index: ``data.sources.0.loss_weight=4``)."""
    layers: list[tuple[str, DictConfig]] = [(str(p), _read_yaml(Path(p))) for p in yaml_paths]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
    plain = [o for o in overrides if not _indexes_a_list(o)]
    if plain:
        layers.append(("command line", OmegaConf.from_dotlist(plain)))
    merged = OmegaConf.structured(Config)
    preset = _preset_node(layers)
    if preset is not None:
        merged = _merge(merged, preset, f"preset {preset.model.preset}")
    for origin, layer in layers:
        merged = _merge(merged, layer, origin)
    for override in overrides:
        if _indexes_a_list(override):
            _apply_indexed(merged, override)
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _describe_error(exc, "config") from exc
    assert isinstance(config, Config)
    resolve_relative_paths(config, [Path(p) for p in yaml_paths])
    if check:
        validate(config)
    return config


# Files a config names whose relative paths are looked up beside the YAML files and in the repository, so that
# `configs/model/chameleon-7b.yaml`'s `tokenizers/chameleon/...` works from any working directory.
_FILE_KEYS = ("tokenizer.path", "model.vq.checkpoint", "model.vision.pretrained", "model.lm.pretrained")
REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_relative_paths(config: Config, yaml_paths: Sequence[Path]) -> None:
    """Make each relative path of :data:`_FILE_KEYS` that does not exist from the working directory absolute, when
    it exists beside one of ``yaml_paths`` (the last file first) or below the repository root; others stay."""
    bases = [path.resolve().parent for path in reversed(yaml_paths)] + [REPO_ROOT]
    for key in _FILE_KEYS:
        section, _, field = key.rpartition(".")
        node = _walk(config, section)
        value = getattr(node, field)
        if not value or Path(value).expanduser().is_absolute() or Path(value).exists():
            continue
        found = next((base / value for base in bases if (base / value).exists()), None)
        if found is not None:
            setattr(node, field, str(found))


def _walk(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (written beside every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML to ``path`` atomically."""
    write_text(path, to_yaml(config))


# ------------------------------------------------------------------------------------------ validation


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"`{key}`: {message}")


def _require_min(section: Any, prefix: str, minimum: int, *keys: str, note: str = "") -> None:
    """``section.<key> >= minimum`` for each key, named ``prefix.<key>`` when it fails."""
    for key in keys:
        _require(getattr(section, key) >= minimum, f"{prefix}.{key}", f"must be >= {minimum}{note}")


def validate(config: Config) -> Config:
    """Cross-field checks that types alone cannot express; raises :class:`ConfigError` naming the key."""
    _validate_lm(config.model.lm)
    _validate_vision(config.model.vision)
    _require_min(config.model.projector, "model.projector", 1, "depth")
    _validate_vq(config.model.vq)

    tok = config.tokenizer
    _require_min(tok, "tokenizer", 1, "size_unit", "num_size_tokens")
    largest_grid = (tok.num_size_tokens - 1) * tok.size_unit
    _require_min(config.model, "model", 0, "grid_positions", note=" (0: off)")
    _require(
        config.model.grid_positions == 0 or config.model.grid_positions >= largest_grid,
        "model.grid_positions",
        f"must be 0 (off) or cover the largest code grid the size tokens express ({largest_grid} = "
        f"(tokenizer.num_size_tokens - 1) x tokenizer.size_unit), got {config.model.grid_positions}",
    )

    _validate_data(config.data)

    optim = config.optim
    _require(optim.lr > 0, "optim.lr", "must be positive")
    _require(len(optim.betas) == 2, "optim.betas", "needs exactly two values")
    _require(0.0 <= optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _require_min(optim, "optim", 0, "warmup_steps")

    train = config.train
    _require(train.stage in (0, 1, 2, 3), "train.stage", f"must be 0, 1, 2 or 3, got {train.stage}")
    _require_min(train, "train", 1, "max_steps", "micro_batch_size", "grad_accum_steps", "log_every")
    _require_min(train, "train", 0, "max_bad_steps")
    _require_min(config.contrastive, "contrastive", 0, "max_bad_steps")
    _require(
        train.max_bad_steps == 0 or train.parallel.backend != "deepspeed",
        "train.max_bad_steps",
        "must be 0 with backend deepspeed (its engine applies the update before the norm can be checked)",
    )
    _require_min(config.checkpoint, "checkpoint", 1, "keep_last")
    _validate_lora(config)

    gen = config.generation
    _require(gen.cfg_scale >= 0, "generation.cfg_scale", "must be >= 0")
    _require_min(gen, "generation", 1, "image_top_k", "text_top_k")
    _require(0.0 < gen.top_p <= 1.0, "generation.top_p", "must be in (0, 1]")
    _require_min(gen, "generation", 0, "jacobi_window", note=" (0: sequential decoding)")
    _validate_vq_train(config.vq_train)
    return config


def _validate_lora(config: Config) -> None:
    """Checks of ``train.lora``: a positive rank needs a base export to adapt and known target modules."""
    lora = config.train.lora
    _require_min(lora, "train.lora", 0, "rank", note=" (0: off)")
    if lora.rank == 0:
        return
    _require(lora.alpha > 0, "train.lora.alpha", f"must be positive, got {lora.alpha}")
    _require(0.0 <= lora.dropout < 1.0, "train.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    unknown = [name for name in lora.target_modules if name not in LORA_LM_TARGETS]
    _require(
        not unknown,
        "train.lora.target_modules",
        f"unknown module(s) {', '.join(map(repr, unknown))}; the LM's linear layers are {', '.join(LORA_LM_TARGETS)}",
    )
    _require(
        len(set(lora.target_modules)) == len(lora.target_modules),
        "train.lora.target_modules",
        f"lists a module twice: {list(lora.target_modules)}",
    )
    _require(
        bool(lora.target_modules) or lora.projector,
        "train.lora.target_modules",
        "is empty and train.lora.projector is false: nothing to adapt",
    )
    _require(
        config.checkpoint.init_from is not None,
        "checkpoint.init_from",
        "LoRA (train.lora.rank > 0) adapts an existing export: set checkpoint.init_from (a published "
        "checkpoint becomes one through python -m unified_mllm.convert)",
    )
    for key, value in (("lm", config.model.lm.pretrained), ("vision", config.model.vision.pretrained)):
        _require(
            value is None,
            f"model.{key}.pretrained",
            "must be null with LoRA: the base weights come from checkpoint.init_from alone (the adapter "
            "export points at that one directory)",
        )
    _require(
        config.train.parallel.backend != "deepspeed",
        "train.parallel.backend",
        "LoRA runs on the fsdp (or none) backend; deepspeed is not supported with train.lora.rank > 0",
    )


def _validate_lm(lm: LMConfig) -> None:
    """Checks of ``model.lm``: shapes that fit together."""
    _require(lm.hidden_size % lm.num_heads == 0, "model.lm.hidden_size", "must be divisible by num_heads")
    _require(lm.num_heads % lm.num_kv_heads == 0, "model.lm.num_kv_heads", "must divide num_heads")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_position_embeddings"):
        _require(getattr(lm, key) > 0, f"model.lm.{key}", "must be positive")
    _require(0.0 <= lm.residual_dropout < 1.0, "model.lm.residual_dropout", "must be in [0, 1)")


def _validate_vision(vision: VisionConfig) -> None:
    """Checks of ``model.vision``: patch grid, feature layer, AnyRes settings."""
    # SigLIP's patch embedding is a strided conv: 384 px / 14 px patches gives 27 x 27 (the rest is dropped).
    _require(
        vision.image_size >= vision.patch_size,
        "model.vision.image_size",
        f"must be at least patch_size={vision.patch_size}",
    )
    _require(
        vision.hidden_size % vision.num_heads == 0, "model.vision.hidden_size", "must divide by num_heads"
    )
    hidden_states = vision.num_layers + 1  # the patch embeddings, then each layer's output
    _require(
        -hidden_states <= vision.feature_layer < hidden_states,
        "model.vision.feature_layer",
        f"{vision.feature_layer} is outside -{hidden_states}..{hidden_states - 1} "
        f"(the tower has {vision.num_layers} layers)",
    )
    _require(
        len(vision.anyres.pad_color) == 3 and all(0 <= c <= 255 for c in vision.anyres.pad_color),
        "model.vision.anyres.pad_color",
        f"needs 3 values in 0..255, got {vision.anyres.pad_color}",
    )
    for i, grid in enumerate(vision.anyres.grids):
        _require(
            len(grid) == 2 and min(grid) >= 1,
            f"model.vision.anyres.grids[{i}]",
            f"must be [rows, cols] with both >= 1, got {grid}",
        )


def _validate_vq(vq: VQConfig) -> None:
    """Checks of ``model.vq`` for each tokenizer kind."""
    _require(vq.codebook_size >= 2, "model.vq.codebook_size", "must be >= 2")
    _require(len(vq.channel_mult) >= 1, "model.vq.channel_mult", "needs at least one level")
    if vq.kind == "dualtoken":
        dt = vq.dualtoken
        # SigLIP keeps only whole patches (384 px / 14 = 27 per side): the backbone's size is the one to match.
        _require(
            vq.resolution == dt.backbone.image_size,
            "model.vq.resolution",
            f"must equal model.vq.dualtoken.backbone.image_size ({dt.backbone.image_size})",
        )
        _require(
            1 <= dt.shortcut_layer <= dt.pixel_layer < dt.semantic_layer <= dt.backbone.num_layers,
            "model.vq.dualtoken.semantic_layer",
            f"need 1 <= shortcut_layer <= pixel_layer < semantic_layer <= backbone.num_layers "
            f"({dt.shortcut_layer}, {dt.pixel_layer}, {dt.semantic_layer}, {dt.backbone.num_layers})",
        )
    else:
        _require(
            vq.resolution % vq.downsample_factor == 0,
            "model.vq.resolution",
            f"must be a multiple of the downsampling factor {vq.downsample_factor}",
        )
    if vq.kind == "unitok":
        _require(
            vq.embed_dim % vq.unitok.num_codebooks == 0,
            "model.vq.embed_dim",
            f"must split evenly into model.vq.unitok.num_codebooks ({vq.unitok.num_codebooks}) chunks",
        )
        _require(
            len(vq.unitok.conv_widths) == len(vq.unitok.conv_depths),
            "model.vq.unitok.conv_depths",
            "needs one entry per conv_widths entry",
        )


def _validate_data(data: DataConfig) -> None:
    """Checks of the `data` section: the world's shape and the LM data pipeline."""
    world = data.world
    _require_min(world, "data.world", 1, "grid_size")
    _require(
        1 <= world.min_objects <= world.max_objects <= world.grid_size**2,
        "data.world.max_objects",
        f"need 1 <= min_objects <= max_objects <= grid_size^2 = {world.grid_size**2}",
    )
    _require_min(world, "data.world", 1, "samples_per_shard")
    for i, source in enumerate(data.sources):
        _require(bool(source.path), f"data.sources[{i}].path", "is empty")
        _require(source.ratio > 0, f"data.sources[{i}].ratio", "must be positive")
        _require(source.loss_weight > 0, f"data.sources[{i}].loss_weight", "must be positive")
    _require_min(data, "data", 1, "max_seq_len", "shuffle_buffer")
    _require_min(data, "data", 0, "num_workers")
    _require(0.0 <= data.cfg_dropout <= 1.0, "data.cfg_dropout", "must be in [0, 1]")
    _require_min(data, "data", 0, "vqa_max_turns", note=" (0: every turn)")
    _require_min(data, "data", 1, "pad_to_multiple_of", "pretokenize_batch_size")
    names = [s.name for s in data.sources if s.name]
    _require(len(names) == len(set(names)), "data.sources", f"source names must be unique, got {names}")


def _validate_vq_train(vqt: VQTrainConfig) -> None:
    """Checks of the `vq_train` section (the VQ tokenizer trainer)."""
    _require_min(vqt, "vq_train", 1, "steps", "batch_size", "log_every", "eval_images", "checkpoint_every")
    _require_min(
        vqt, "vq_train", 1, "keep_last", "restart_every", "shuffle_buffer", "disc_layers", "disc_channels"
    )
    _require(vqt.lr > 0, "vq_train.lr", "must be positive")
    _require(vqt.disc_lr is None or vqt.disc_lr > 0, "vq_train.disc_lr", "must be positive or null")
    _require(len(vqt.betas) == 2, "vq_train.betas", "needs exactly two values")
    _require(0.0 <= vqt.min_lr_ratio <= 1.0, "vq_train.min_lr_ratio", "must be in [0, 1]")
    _require_min(
        vqt, "vq_train", 0, "warmup_steps", "disc_start_step", "eval_every", "grad_clip", "weight_decay"
    )
    _require_min(vqt, "vq_train", 0, "max_bad_steps")
    _require_min(
        vqt, "vq_train", 0, "l1_weight", "l2_weight", "perceptual_weight", "codebook_weight", "gan_weight"
    )
    _require(bool(vqt.train_data), "vq_train.train_data", "is empty")


# ----------------------------------------------------------------------------------------------- CLI


def iter_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf field of the tree."""
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(iter_docs(type(value), key + "."))
        else:
            rows.append((key, f.metadata.get("doc", ""), value))
    return rows


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--config FILE ... key=value ...` arguments every entry point shares (entry points with positional
    arguments of their own parse with ``parser.parse_intermixed_args``: overrides may then appear anywhere)."""
    parser.add_argument("--config", action="append", default=[], help="YAML file(s), merged in order")
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides (see python -m unified_mllm.config)"
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def main(argv: Sequence[str] | None = None) -> None:
    from unified_mllm.cli import add_debug_argument, one_line_errors  # only the command line needs it

    parser = argparse.ArgumentParser(description="Print the resolved config, or document every key.")
    add_config_arguments(parser)
    parser.add_argument("--docs", action="store_true", help="list every key with its default and meaning")
    parser.add_argument(
        "--get", metavar="KEY", help="print only this resolved value (e.g. checkpoint.export_dir)"
    )
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.docs:
        for key, doc, default in iter_docs():
            print(f"{key} = {default!r}\n    {doc}")
        return
    with one_line_errors((ConfigError,), debug=args.debug):
        config = config_from_args(args)
        if args.get:
            value: Any = config
            for part in args.get.split("."):
                if not dataclasses.is_dataclass(value) or not hasattr(value, part):
                    raise ConfigError(f"no config key {args.get!r}")
                value = getattr(value, part)
            print(value)
            return
    print(to_yaml(config), end="")


if __name__ == "__main__":
    main()
