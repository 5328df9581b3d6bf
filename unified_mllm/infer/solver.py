"""The class researchers call: :class:`InferenceSolver` loads a training export and answers or draws.

    solver = InferenceSolver.from_pretrained("runs/quickstart-stage2/export")
    solver.generate([image], [["<|image|>How many objects are there?", None]])          # -> "two"
    solver.generate_img(["a red circle above a blue square"], cfg=3.0, seed=0)           # -> [PIL.Image]

**Understanding** follows the seed projects' solvers: ``qas`` is the conversation as ``[[question, answer], ...]``
whose last answer is ``None`` (the one to generate); every image goes where its ``<|image|>`` placeholder stands
(training put it first, ``"<|image|>" + question``). Prompts are rendered by the training template
(:func:`~unified_mllm.data.conversation.tokenize_conversation`); each image span carries the VQ codes and, when
the export's vision branch is on, the SigLIP feature slots (AnyRes views as in training). The answer is decoded
greedily by default and ends at ``<end-of-turn>``.

**Scoring.** :meth:`InferenceSolver.loglikelihood` gives the log-probability of a continuation as the start of
the answer (the prompt rendered exactly as :meth:`InferenceSolver.generate` renders it) and whether greedy
decoding would write it: what lmms-eval's ``loglikelihood`` requests need.

**Interleaved answers.** When the model opens an image inside an answer, the grid constraint keeps it well formed
(size tokens fixed to ``generation.image_size``); once its last row is complete the engine stops that row, the
solver decodes the codes into a picture, closes the span the way training wrote it (``<sep>`` + feature slots of
that picture + ``<image-end>``, or ``<image-end>`` alone without the vision branch) and resumes decoding from the
whole sequence. :meth:`InferenceSolver.generate_interleaved` returns the pieces; :meth:`InferenceSolver.generate`
returns the text with ``<|image|>`` where a picture was drawn. Guidance is not applied inside answers.

**Generation** prompts are ``<bos> prompt <end-of-turn> <image-start> <size-h> <size-w>`` (the training form of
text-to-image samples); the engine runs conditional and unconditional rows in one batch (CFG), and the VQ decoder
turns the codes into images of exactly the requested size.

**Published prompts** (``model.prompt_style: unitoken``, a converted UniToken checkpoint): the text-to-image
prompt has ``model.t2i_answer_prefix`` between ``<end-of-turn>`` and ``<image-start>``, the unconditional row is
``<image-start> <size-h> <size-w>`` alone, and images without a ``<|image|>`` go before the first question
followed by a space, as UniToken's solvers and item processor do. The VQ input follows ``model.vq.preprocess``
and the feature slots ``model.vision.anyres.layout``.

Defaults for every knob come from the export's ``config.generation``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessorList

from unified_mllm.config import Config, load_config
from unified_mllm.data.conversation import (
    place_images_implicitly,
    t2i_answer_prefix_ids,
    tokenize_conversation,
    turns_from_qas,
)
from unified_mllm.infer.decoding import CacheKind
from unified_mllm.infer.engine import Engine, Progress, StackChoice, guided_stack_choice
from unified_mllm.infer.processors import (
    GridConstraint,
    check_non_negative,
    check_top_k,
    create_logits_processor,
    sampling_processors,
)
from unified_mllm.infer.quantize import check_mode, quantize_model
from unified_mllm.layout import (
    IMAGE_PLACEHOLDER,
    SpecialTokens,
    build_image_span,
    parse_image_span,
)
from unified_mllm.model import lora
from unified_mllm.model.export import CONFIG_YAML
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer
from unified_mllm.vision.anyres import anyres_views, feature_index, image_feature_block
from unified_mllm.vision.image import ImageSource, load_image
from unified_mllm.vision.tokenizer_registry import load_visual_tokenizer
from unified_mllm.vision.visual_tokenizer import VisualTokenizer

Pair = Sequence[str | None]
ABLATIONS = ("none", "features", "codes")
Piece = str | Image.Image


def _resolve(export_dir: Path, path: str | None, what: str) -> Path:
    """A path from the export's config.yaml: relative ones are relative to the export directory."""
    if not path:
        raise FileNotFoundError(f"{export_dir / CONFIG_YAML} names no {what}")
    resolved = Path(path).expanduser()
    resolved = resolved if resolved.is_absolute() else export_dir / resolved
    if not resolved.exists():
        raise FileNotFoundError(f"{what} not found: {resolved} (named by {export_dir / CONFIG_YAML})")
    return resolved


@dataclass
class Answer:
    """One conversation being answered: its ids so far, the SigLIP views of its images, what was decoded."""

    ids: list[int]
    views: list[torch.Tensor]
    budget: int
    indices: list[np.ndarray | None] = field(default_factory=list)
    """Per image of ``views``: its ``anyres.feature_index`` (None: every feature in order)."""
    pieces: list[Piece] = field(default_factory=list)
    done: bool = False
    stacks: list[np.ndarray] = field(default_factory=list)
    """Code-stack tokenizers: ``[n, D]`` per image of the prompt, in order."""


class InferenceSolver:
    """Understanding, text-to-image and interleaved generation over one export (see the module docstring).

    Build it with :meth:`from_pretrained`; the constructor only wires objects that are already loaded.
    """

    def __init__(
        self,
        config: Config,
        model: UnifiedModel,
        tokenizer: TextTokenizer,
        vq: VisualTokenizer,
        *,
        cache: CacheKind = "auto",
    ) -> None:
        vocab = model.config.lm.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids (text + image codes) but the model's vocabulary "
                f"has {vocab} rows"
            )
        if tokenizer.num_image_codes != vq.config.codebook_size:
            raise ValueError(
                f"the tokenizer maps {tokenizer.num_image_codes} image codes but the VQ codebook has "
                f"{vq.config.codebook_size}"
            )
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.tokens: SpecialTokens = tokenizer.special_tokens()
        self.vq = vq
        self.engine = Engine(model, self.tokens, cache=cache)
        # model.prompt_style unitoken: the ids UniToken's solvers put before <image-start> (by name).
        self.t2i_answer_prefix = t2i_answer_prefix_ids(config.model, tokenizer.token_to_id)
        self._random_codes: np.random.Generator | None = None  # set by ablation("codes")

    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
    ) -> InferenceSolver:
        """Load an export written by the trainer (``config.yaml``, ``config.json`` + ``model.safetensors``,
        ``text.model``, ``vq/``). ``dtype`` applies to the LM and SigLIP (default: as stored); the VQ-GAN keeps
        its own. ``quantize`` (``"int8"``, ``"int4"``, ``"int4-unpacked"``; needs torchao) quantizes the LM's
        linear layers (:mod:`unified_mllm.infer.quantize`). A LoRA run's adapter export loads as its base export
        with the adapter merged in (:func:`unified_mllm.model.lora.load_model`), before any quantization. A
        missing file raises FileNotFoundError naming it."""
        export = Path(export_dir).expanduser()
        if not export.is_dir():
            raise FileNotFoundError(f"export directory not found: {export}")
        weights, export = export, lora.base_export(export)  # an adapter's tokenizers and config: its base's
        if not (export / CONFIG_YAML).is_file():
            raise FileNotFoundError(f"{CONFIG_YAML} not found in export directory {export}")
        config = load_config([export / CONFIG_YAML])
        config.tokenizer.path = str(
            _resolve(export, config.tokenizer.path, "text tokenizer (tokenizer.path)")
        )
        vq_path = _resolve(export, config.model.vq.checkpoint, "VQ tokenizer (model.vq.checkpoint)")
        config.model.vq.checkpoint = str(vq_path)
        if quantize is None:
            model = lora.load_model(weights, device=device, dtype=dtype)
        else:
            check_mode(quantize)  # before the weights load
            # Loaded on the CPU, each layer moved to `device` as it is quantized: the device never holds the
            # full-precision LM.
            model = lora.load_model(weights, device="cpu", dtype=dtype)
            quantize_model(model, quantize, device=device)
        tokenizer = TextTokenizer.from_config(config.tokenizer, num_image_codes=config.model.vq.codebook_size)
        vq = load_visual_tokenizer(vq_path, config=config.model.vq, device=device).eval()
        return cls(config, model, tokenizer, vq)

    # --------------------------------------------------------------------------------------- ablation

    @contextlib.contextmanager
    def ablation(self, kind: str, seed: int = 0) -> Iterator[None]:
        """Understanding with one branch of the image span removed, for the block (UniToken's comparison of
        discrete-only, continuous-only and both, on any export):

        * ``"features"``: the projected SigLIP features are zeros (the slots stay, so every position is as in
          training and only the continuous information is gone);
        * ``"codes"``: every VQ code of the prompt's images is a uniformly random code (drawn from a generator
          seeded with ``seed``; code stacks too);
        * ``"none"``: nothing changes.

        Drawn images inside answers are not affected (their codes are the model's own)."""
        if kind not in ABLATIONS:
            raise ValueError(f"unknown ablation {kind!r}; choose from {', '.join(ABLATIONS)}")
        hook = None
        if kind == "features":
            hook = self.model.vision.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
        if kind == "codes":
            self._random_codes = np.random.default_rng(seed)
        try:
            yield
        finally:
            if hook is not None:
                hook.remove()
            self._random_codes = None

    def _ablate_codes(self, grid: np.ndarray) -> np.ndarray:
        """``grid`` itself, or random codes of its shape under ``ablation("codes")``."""
        if self._random_codes is None:
            return grid
        return self._random_codes.integers(0, self.vq.config.codebook_size, size=grid.shape).astype(
            grid.dtype
        )

    # --------------------------------------------------------------------------------------- settings

    @property
    def with_features(self) -> bool:
        """Whether image spans carry SigLIP feature slots (the export's vision branch is on)."""
        return self.config.model.vision.enabled

    def grid_size(self, size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """``(rows, cols)`` of codes for an image of ``size`` pixels (a side, or ``(height, width)``).

        Raises ValueError when the VQ grid cannot produce it: not a positive multiple of the downsampling factor
        (times the tokenizer's size unit), or beyond the largest resolution token.
        """
        size = self.config.generation.image_size if size is None else size
        sides = (
            (size, size)
            if isinstance(size, (int, float))
            else tuple(size)
            if isinstance(size, Sequence)
            else ()
        )
        if len(sides) != 2 or any(isinstance(side, bool) or not isinstance(side, int) for side in sides):
            raise ValueError(
                f"image size must be a side or (height, width) in whole pixels (int), got {size!r}"
            )
        height, width = sides
        factor = self.config.model.vq.downsample_factor
        step = factor * self.tokens.size_unit
        largest = self.tokens.max_grid * factor
        for side in (height, width):
            if isinstance(side, bool) or not isinstance(side, int) or side < step or side % step:
                raise ValueError(
                    f"image size {height}x{width} px: each side must be a positive multiple of {step} px "
                    f"(the VQ downsampling factor {factor} x resolution step {self.tokens.size_unit})"
                )
            if side > largest:
                raise ValueError(
                    f"image size {height}x{width} px: a side exceeds {largest} px, the largest the resolution "
                    f"tokens express ({self.tokens.max_grid} codes x {factor} px)"
                )
        return height // factor, width // factor

    def seeded_generator(self, seed: int | None) -> torch.Generator:
        """A generator on the engine's device seeded with ``seed`` (None: the export's ``generation.seed``)."""
        seed = self.config.generation.seed if seed is None else seed
        return torch.Generator(device=self.engine.device).manual_seed(int(seed))

    def create_logits_processor(
        self,
        cfg: float | None = None,
        image_top_k: int | None = None,
        text_top_k: int | None = None,
        *,
        temperature: float | None = None,
        text_temperature: float | None = None,
        size: int | tuple[int, int] | None = None,
    ) -> LogitsProcessorList:
        """The seeds' style processor list (CFG, grid constraint, temperature, top-k, top-p) for callers that
        drive transformers' ``generate`` themselves; with guidance the batch must be ``[cond; uncond]``. (A
        model with ``model.grid_positions`` needs its code cells at every step, which ``generate`` does not
        pass: decode it with :meth:`generate_img` / :meth:`generate`.)"""
        gen = self.config.generation
        return create_logits_processor(
            self.tokens,
            cfg=check_non_negative("cfg", gen.cfg_scale if cfg is None else cfg),
            image_top_k=check_top_k("image_top_k", gen.image_top_k if image_top_k is None else image_top_k),
            text_top_k=check_top_k("text_top_k", gen.text_top_k if text_top_k is None else text_top_k),
            image_temperature=gen.temperature if temperature is None else temperature,
            text_temperature=gen.text_temperature if text_temperature is None else text_temperature,
            top_p=gen.top_p,
            size=self.grid_size(size),
            with_features=self.with_features,
        )

    # ------------------------------------------------------------------------------------- generation

    def generate_img(
        self,
        prompts: str | Sequence[str],
        *,
        cfg: float | None = None,
        image_top_k: int | None = None,
        temperature: float | None = None,
        size: int | tuple[int, int] | None = None,
        seed: int | None = None,
        jacobi_window: int | None = None,
        progress: Progress | None = None,
    ) -> list[Image.Image]:
        """One image per prompt, ``size`` pixels (a side or ``(height, width)``), all prompts in one batch.

        ``cfg`` is the guidance scale (1: none), ``temperature`` 0 decodes greedily, ``jacobi_window > 0``
        decodes with speculative Jacobi decoding (the same distribution in fewer forwards; VQ-GAN codes only);
        ``None`` takes the export's ``config.generation`` value. The same seed gives the same images.
        ``progress(done, total)`` hears how many ids of the code grid are decoded (a UI's progress bar).
        """
        gen = self.config.generation
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("generate_img needs a prompt string or a non-empty list of them")
        cfg = check_non_negative("cfg", gen.cfg_scale if cfg is None else cfg)
        top_k = check_top_k("image_top_k", gen.image_top_k if image_top_k is None else image_top_k)
        temperature = check_non_negative(
            "temperature", gen.temperature if temperature is None else temperature
        )
        height, width = self.grid_size(size)
        warpers = sampling_processors(
            self.tokens,
            image_temperature=temperature,
            text_temperature=temperature,
            image_top_k=top_k,
            text_top_k=None,
            top_p=gen.top_p,
        )
        generator, greedy = self.seeded_generator(seed), temperature == 0
        # Code-stack tokenizers: guidance, temperature and top-k apply to each code of a stack as well.
        stack_choice = guided_stack_choice(
            len(prompts), cfg, top_k=top_k or 0, temperature=temperature, greedy=greedy, generator=generator
        )
        codes = self.engine.generate_images(
            [self.tokenizer.encode(p) for p in prompts],
            height=height,
            width=width,
            cfg_scale=cfg,
            processors=warpers,
            greedy=greedy,
            generator=generator,
            stack_choice=stack_choice if self.model.code_heads is not None else None,
            jacobi_window=gen.jacobi_window if jacobi_window is None else jacobi_window,
            prompt_style=self.config.model.prompt_style,
            answer_prefix=self.t2i_answer_prefix,
            progress=progress,
        )
        return self.vq.codes_to_images(codes)

    # ---------------------------------------------------------------------------------- understanding

    def generate(
        self,
        images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]],
        qas: Sequence[Pair] | Sequence[Sequence[Pair]],
        max_gen_len: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> str | list[str]:
        """The answer to the last question of one conversation (``qas = [[q, a], ..., [q, None]]``), or of each
        conversation of a batch (``qas`` a list of those, ``images`` a list of image lists).

        ``temperature`` 0 is greedy; ``top_k`` (text) applies when sampling. ``max_gen_len`` (default
        ``generation.max_new_tokens``) is cut to what the model's positions leave. A picture drawn inside an
        answer shows as ``<|image|>`` (use :meth:`generate_interleaved` to get it).
        """
        answers, single = self._answer(images, qas, max_gen_len, temperature, top_k, seed)
        texts = ["".join(IMAGE_PLACEHOLDER if isinstance(p, Image.Image) else p for p in a) for a in answers]
        return texts[0] if single else texts

    def generate_interleaved(
        self,
        images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]],
        qas: Sequence[Pair] | Sequence[Sequence[Pair]],
        max_gen_len: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[Piece] | list[list[Piece]]:
        """Like :meth:`generate`, but each answer is a list of pieces: text strings and PIL images in order."""
        answers, single = self._answer(images, qas, max_gen_len, temperature, top_k, seed)
        return answers[0] if single else answers

    def loglikelihood(
        self,
        images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]],
        qas: Sequence[Pair] | Sequence[Sequence[Pair]],
        continuations: str | Sequence[int] | Sequence[str | Sequence[int]],
    ) -> tuple[float, bool] | list[tuple[float, bool]]:
        """``(log-probability, is_greedy)`` of a continuation as the start of the answer to the last question of
        one conversation, or of each conversation of a batch (``continuations``: one per conversation).

        The prompt is exactly :meth:`generate`'s (the training template, images where their ``<|image|>``
        stand); the continuation is a string (encoded as training encodes an answer, no ``<end-of-turn>``
        added) or its ids. The log-probability is the sum over the continuation's ids of ``log_softmax`` of
        the model's logits; ``is_greedy`` says whether every id is the arg-max there, i.e. whether greedy
        decoding (:meth:`generate` at temperature 0) writes these ids first. An empty continuation scores
        ``(0.0, True)``. This is what lmms-eval's ``loglikelihood`` requests ask.

        The batch runs as :meth:`generate` runs it: the prompts left-padded in one prefill (feature slots
        filled from the images), then the continuations' ids, right-padded, in one forward over the KV cache.
        A code-stack tokenizer's model (UniTok, DualToken) scores text continuations only.
        """
        image_lists, conversations, single = _as_batch(images, qas)
        if not single and isinstance(continuations, str):
            raise ValueError("a batch of conversations takes a list of continuations, one per conversation")
        wanted = [continuations] if single else list(continuations)
        if single and not isinstance(continuations, str) and not _is_id_list(continuations):
            raise ValueError("one conversation takes one continuation: a string or a list of ids")
        if len(wanted) != len(conversations):
            raise ValueError(
                f"{len(conversations)} conversation(s) need as many continuations, got {len(wanted)}"
            )
        conts = [self._continuation_ids(c) for c in wanted]
        answers = self.prepare_answers(image_lists, conversations, 1)
        for row, (answer, ids) in enumerate(zip(answers, conts)):
            if len(ids) > self.room_after(answer.ids):
                raise ValueError(
                    f"conversation {row}: the prompt ({len(answer.ids)} ids) and the continuation ({len(ids)}) "
                    f"need more than the model's {self.model.config.lm.max_position_embeddings} positions"
                )
        scores: list[tuple[float, bool]] = [(0.0, True)] * len(conts)
        rows = [i for i, ids in enumerate(conts) if ids]
        if rows:
            for i, score in zip(rows, self._score([answers[i] for i in rows], [conts[i] for i in rows])):
                scores[i] = score
        return scores[0] if single else scores

    def _continuation_ids(self, continuation: str | Sequence[int]) -> list[int]:
        if isinstance(continuation, str):
            return self.tokenizer.encode(continuation)
        if not _is_id_list(continuation):
            raise ValueError(f"a continuation is a string or a list of ids, got {continuation!r}")
        ids = [int(i) for i in continuation]
        vocab = self.model.config.lm.vocab_size
        if any(i < 0 or i >= vocab for i in ids):
            raise ValueError(f"continuation ids must lie in [0, {vocab}), got {ids}")
        return ids

    @torch.inference_mode()
    def _score(self, answers: Sequence[Answer], conts: Sequence[list[int]]) -> list[tuple[float, bool]]:
        """Log-probability and greediness of each non-empty continuation after its prompt (one batch)."""
        engine, longest = self.engine, max(len(c) for c in conts)
        if self.model.training:
            raise ValueError("the model is in training mode (dropout on): call model.eval() before scoring")
        if self.model.code_heads is not None and any(
            engine.spans.is_code(torch.tensor(c)).any() for c in conts
        ):
            raise ValueError(
                "continuations with image codes cannot be scored for a code-stack tokenizer's model"
            )
        views = [v for a in answers for v in a.views]
        stacks = [s for a in answers for s in a.stacks]
        batch = engine.new_batch([a.ids for a in answers], longest)
        cache = engine.new_cache(batch.capacity, fixed_length=False)
        first = engine.prefill(
            batch,
            cache,
            torch.cat(views) if views else None,
            torch.from_numpy(np.concatenate(stacks)) if stacks else None,
            answers_feature_index(answers, self.model.features_per_view),
        ).logits  # [R, 1, V]: predicts each continuation's first id
        # Right-padded continuations: padding comes after a row's last id, so causal attention never reads it.
        targets = torch.full((len(conts), longest), self.tokens.pad, dtype=torch.long)
        for row, ids in enumerate(conts):
            targets[row, : len(ids)] = torch.tensor(ids)
        targets = targets.to(first.device)
        logits = first
        if longest > 1:  # feed every id but the last: the logits after id j predict id j + 1
            batch.extend(targets[:, :-1])
            logits = torch.cat([first, engine.step(batch, cache, count=longest - 1).logits], dim=1)
        logprobs = logits.log_softmax(dim=-1).gather(-1, targets[..., None])[..., 0]  # [R, longest]
        greedy = logits.argmax(dim=-1) == targets
        return [
            (float(logprobs[row, : len(ids)].sum()), bool(greedy[row, : len(ids)].all()))
            for row, ids in enumerate(conts)
        ]

    def _answer(
        self,
        images: Sequence[Any],
        qas: Sequence[Any],
        max_gen_len: int | None,
        temperature: float,
        top_k: int | None,
        seed: int | None,
    ) -> tuple[list[list[Piece]], bool]:
        """The pieces of every answer of the batch, and whether the call was for one conversation."""
        image_lists, conversations, single = _as_batch(images, qas)
        gen = self.config.generation
        budget = gen.max_new_tokens if max_gen_len is None else max_gen_len
        if isinstance(budget, bool) or int(budget) != budget or budget < 1:
            raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
        temperature = check_non_negative("temperature", temperature)
        top_k = check_top_k("top_k", gen.text_top_k if top_k is None else top_k)
        answers = self.prepare_answers(image_lists, conversations, int(budget))
        processors = [
            GridConstraint(self.tokens, size=self.grid_size(), with_features=self.with_features),
            *sampling_processors(
                self.tokens,
                image_temperature=gen.temperature,
                text_temperature=temperature,
                image_top_k=gen.image_top_k,
                text_top_k=top_k,
                top_p=gen.top_p,
            ),
        ]
        generator = self.seeded_generator(seed)
        greedy = temperature == 0 and gen.temperature == 0
        while pending := [a for a in answers if not a.done]:
            # Code-stack tokenizers: a drawn image's stacks follow the image sampling settings, code by code.
            stack_choice = guided_stack_choice(
                len(pending),
                top_k=gen.image_top_k or 0,
                temperature=gen.temperature,
                greedy=greedy,
                generator=generator,
            )
            self._continue(pending, processors, greedy, generator, stack_choice)
        return [a.pieces for a in answers], single

    def prepare_answers(
        self,
        image_lists: Sequence[Sequence[ImageSource]],
        conversations: Sequence[Sequence[Pair]],
        budget: int,
    ) -> list[Answer]:
        """The prompt of every conversation of a batch (:meth:`_prompt`), read and VQ-encoded, ready to decode:
        the solver's own methods and :class:`~unified_mllm.infer.batching.ContinuousBatcher` start from these."""
        pictures = [[load_image(i) for i in images] for images in image_lists]
        flat = [p for row in pictures for p in row]
        # One VQ pass for the whole batch, with the LM's VQ preprocessing (model.vq.preprocess).
        codes = iter(
            self.vq.images_to_codes(flat, preprocess=self.config.model.vq.preprocess) if flat else []
        )
        return [
            self._prompt(row, [self._ablate_codes(next(codes)) for _ in row], conv, budget)
            for row, conv in zip(pictures, conversations)
        ]

    def _prompt(
        self, pictures: Sequence[Image.Image], codes: Sequence[np.ndarray], qas: Sequence[Pair], budget: int
    ) -> Answer:
        """The prompt ids and SigLIP views of one conversation (its images and their ``[h, w]`` VQ codes); the
        budget cut to the model's positions."""
        turns = turns_from_qas(qas)
        if turns[-1].role != "user":
            raise ValueError("the last qas pair must be [question, None]: its answer is the one generated")
        if self.config.model.prompt_style == "unitoken":
            turns = place_images_implicitly(turns, len(pictures))
        spans, views, stacks, indices = [], [], [], []
        vision = self.config.model.vision
        for picture, grid in zip(pictures, codes):
            features = image_feature_block(vision, (picture.height, picture.width))
            if grid.ndim == 3:  # [h, w, D]: the span holds each stack's first code, the stacks ride along
                stacks.append(grid.reshape(-1, grid.shape[-1]))
                grid = grid[..., 0]
            spans.append(build_image_span(grid, self.tokens, features))
            if features:
                views.append(anyres_views(picture, vision)[0])
                indices.append(feature_index(vision, (picture.height, picture.width)))
        ids = tokenize_conversation(turns, spans, self.tokenizer.encode, self.tokens).ids.tolist()
        if self.room_after(ids) < 1:
            raise ValueError(
                f"the prompt has {len(ids)} ids; the model reads at most "
                f"{self.model.config.lm.max_position_embeddings} positions"
            )
        return Answer(
            ids=ids, views=views, budget=min(budget, self.room_after(ids)), stacks=stacks, indices=indices
        )

    def room_after(self, ids: Sequence[int]) -> int:
        """How many ids may still follow ``ids`` within the model's positions."""
        return self.model.config.lm.max_position_embeddings - len(ids)

    def _continue(
        self,
        answers: list[Answer],
        processors: list[Any],
        greedy: bool,
        generator: torch.Generator,
        stack_choice: StackChoice,
    ) -> None:
        """One engine run over the unfinished answers; each ends, or pauses after a drawn image's grid."""
        views = [v for a in answers for v in a.views]
        stacks = [s for a in answers for s in a.stacks]
        # Left padding puts every row's new ids after the longest prompt: no row may run past that one's room.
        room = self.room_after(max((a.ids for a in answers), key=len))
        result = self.engine.generate(
            [a.ids for a in answers],
            max_new_tokens=[min(a.budget, room) for a in answers],
            processors=processors,
            greedy=greedy,
            generator=generator,
            pixel_values=torch.cat(views) if views else None,
            code_stacks=torch.from_numpy(np.concatenate(stacks)) if stacks else None,
            feature_index=answers_feature_index(answers, self.model.features_per_view),
            stop_at_image_grid=True,
            stack_choice=stack_choice if self.model.code_heads is not None else None,
        )
        for row, (answer, new, reason) in enumerate(zip(answers, result.ids, result.finish)):
            answer.ids += new
            answer.budget -= len(new)
            written = None
            if result.stacks is not None:
                # The stacks of every code id just written, in order: the next run's prompt embeds them.
                written = result.stacks[row][result.stacks[row][:, 0] >= 0]
                answer.stacks.append(written)
            if reason == "image":
                self.close_image(answer, new, written)
                # the span's closing ids take positions too
                answer.budget = min(answer.budget, self.room_after(answer.ids))
                answer.done = answer.budget < 1
                continue
            self._add_text(answer, new[:-1] if reason == "stop" else new)  # without the stop id
            answer.done = True

    def _add_text(self, answer: Answer, ids: Sequence[int]) -> None:
        text = self.tokenizer.decode(ids)
        if text:
            answer.pieces.append(text)

    def close_image(self, answer: Answer, new: list[int], stacks: np.ndarray | None = None) -> None:
        """Decode the image whose grid ``new`` just completed (``stacks``: the code stacks written with ``new``,
        code-stack tokenizers) and append the rest of its span to the ids."""
        start = len(new) - 1 - new[::-1].index(self.tokens.image_start)
        self._add_text(answer, new[:start])
        grid = new[start:]
        parsed = parse_image_span([*grid, self.tokens.image_end], self.tokens)
        codes = parsed.codes
        if stacks is not None:  # the grid's positions are the last codes written
            codes = stacks[len(stacks) - codes.size :].reshape(*codes.shape, -1)
        picture = self.vq.codes_to_images([codes])[0]
        answer.pieces.append(picture)
        vision = self.config.model.vision
        features = image_feature_block(vision, (picture.height, picture.width))
        # The full span of this picture as training lays it out; what follows the grid closes it.
        span = build_image_span(parsed.codes, self.tokens, features)
        answer.ids += span[len(grid) :]
        if features:
            answer.views.append(anyres_views(picture, vision)[0])
            answer.indices.append(feature_index(vision, (picture.height, picture.width)))


def answers_feature_index(answers: Sequence[Answer], per_view: int) -> torch.Tensor | None:
    """The ``feature_index`` ``[N_slots, 2]`` of the answers' images in row order (views counted over the
    batch), or None when every image takes its features in order (our layout); ``per_view``: features a view."""
    if all(index is None for a in answers for index in a.indices):
        return None
    rows, views_before = [], 0
    for answer in answers:
        for pixels, index in zip(answer.views, answer.indices):
            if index is None:  # every feature of this image, in order
                index = np.stack(np.divmod(np.arange(pixels.shape[0] * per_view), per_view), axis=1)
            rows.append(index + np.array([views_before, 0]))
            views_before += pixels.shape[0]
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


def _is_id_list(value: Any) -> bool:
    """Whether ``value`` is a sequence of integer ids (a continuation given as ids)."""
    return (
        isinstance(value, Sequence | np.ndarray | torch.Tensor)
        and not isinstance(value, str)
        and all(
            isinstance(i, int | np.integer) or (isinstance(i, torch.Tensor) and i.ndim == 0) for i in value
        )
    )


def _as_batch(
    images: Sequence[Any], qas: Sequence[Any]
) -> tuple[list[list[ImageSource]], list[list[Pair]], bool]:
    """``(image lists, conversations, single)`` from one conversation or a batch of them."""
    if not qas:
        raise ValueError("qas is empty: pass [[question, None]] (or a list of such conversations)")
    first = qas[0]
    single = (
        isinstance(first, Sequence)
        and not isinstance(first, str)
        and (not first or isinstance(first[0], str))
    )
    if single:
        if any(isinstance(i, list | tuple) for i in images):
            raise ValueError(
                "one conversation takes a flat list of images; a batch takes one list per conversation"
            )
        return [list(images)], [list(qas)], True
    if len(images) not in (0, len(qas)):
        raise ValueError(
            f"a batch of {len(qas)} conversations needs {len(qas)} image lists, got {len(images)}"
        )
    image_lists = [list(i) for i in images] if images else [[] for _ in qas]
    return image_lists, [list(c) for c in qas], False
