"""An lmms-eval model over an export: ``--model unified_mllm --model_args pretrained=EXPORT,device=cpu,batch_size=4``.

Install lmms-eval with ``scripts/install_lmms_eval.sh`` (a plain ``pip install lmms-eval`` replaces the CPU torch
with a CUDA build and pulls gigabytes of optional dependencies). Then, with unified_mllm installed (its
``lmms_eval.models`` entry point names this class)::

    python -m lmms_eval --model unified_mllm --model_args pretrained=runs/x/export,device=cuda,batch_size=8 \\
        --tasks mme,pope --output_path results/

Where the entry point is not installed (a source checkout on ``PYTHONPATH``), the same arguments go to this
module, which registers the model and runs lmms-eval's own command line::

    python -m unified_mllm.eval.adapters.lmms_eval --model unified_mllm --model_args pretrained=... --tasks mme

In Python, pass the name (after importing this module) or an instance to ``lmms_eval.evaluator.simple_evaluate``.

**model_args**: ``pretrained`` (the export directory), ``device`` (default cpu), ``batch_size`` (requests per
solver call, default 1; given here it wins over lmms-eval's ``--batch_size``), ``dtype`` (float32, bfloat16,
float16; default: as stored), ``max_new_tokens`` (the default answer budget when a task sets none: the export's
``generation.max_new_tokens``), ``seed`` (sampling; default the export's ``generation.seed``),
``loglikelihood`` (what ``loglikelihood`` requests return: ``loss``, the default, ``nll`` or ``logprob``; below).

**Requests** (every call goes through :class:`~unified_mllm.infer.solver.InferenceSolver`, greedy unless asked):

* ``generate_until``: the task's context is the question of a one-turn conversation, its ``doc_to_visual``
  images go where the context's ``<image>`` placeholders stand (one per image) or else first, as training put
  them. ``gen_kwargs``: ``max_new_tokens``, ``temperature`` (0: greedy), ``do_sample`` (False: greedy),
  ``top_k``; ``until`` strings cut the decoded answer (it also ends at ``<end-of-turn>``). ``top_p`` and
  ``num_beams`` are not offered by the solver: top-p comes from the export's ``generation.top_p``, beam
  search is replaced by greedy decoding (a warning says so once). Requests are batched by equal ``gen_kwargs``.
* ``loglikelihood`` (and the ``multiple_choice`` tasks built on it): :meth:`InferenceSolver.loglikelihood` of
  the continuation as the start of the answer, returned as ``(value, is_greedy)``. lmms-eval's own models return
  the *loss* there (the mean negative log-likelihood per continuation token), and its ``multiple_choice`` scoring
  picks the choice with the smallest value (``argmin``), so that is the default; ``loglikelihood=nll`` gives
  the summed negative log-likelihood instead (``argmin`` is then the most likely choice, as in lm-eval), and
  ``loglikelihood=logprob`` the sum of log-probabilities itself (for tasks whose own ``process_results``
  expect it; lmms-eval's ``multiple_choice`` would then pick the least likely choice). lmms-eval prefixes
  continuations with the task's ``target_delimiter`` (a space); an answer in our template starts its own turn,
  so leading whitespace is dropped before encoding. Each pair comes wrapped in lmms-eval's
  ``GenerationResult`` (``.text`` is the pair): lmms-eval 0.7.3's evaluator passes every response through
  ``unwrap_generation_output``, which turns a bare ``(float, bool)`` tuple into its string (and the
  ``multiple_choice`` scoring then fails to unpack it), while a ``GenerationResult`` passes through as it is.
* ``generate_until_multi_round``: round 0 answers the context; each later round asks the task's
  ``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)`` for the next round's
  ``(visuals, context, terminal, round_results, round_info)``, as lmms-eval's Qwen and LLaVA-OneVision models
  do, and stops when it says ``terminal``. Each round is a fresh one-turn conversation (the task's context
  carries whatever history it wants). The result per request is the list of the rounds' answers.

Only images: a ``doc_to_visual`` that returns a video or audio raises ValueError. A request whose prompt does not
fit the model (or whose image does not decode) is answered ``""`` (``loglikelihood``: ``-inf``, not greedy) with a
warning, and the run goes on.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from lmms_eval.utils import simple_parse_args_string
from PIL import Image

from unified_mllm.eval.adapters import (
    LMMS_EVAL_CLASS,
    LMMS_EVAL_MODEL,
    cut_at_stop,
    load_solver,
    place_images,
)
from unified_mllm.progress import progress

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v")
# Arguments lmms-eval hands every model that this one has no use for.
IGNORED_ARGS = ("max_batch_size",)
# What a loglikelihood request returns, from (sum of log-probabilities, number of continuation ids).
SCORES: dict[str, Callable[[float, int], float]] = {
    "loss": lambda logprob, count: -logprob / count if count else 0.0,
    "nll": lambda logprob, count: -logprob,
    "logprob": lambda logprob, count: logprob,
}

Rounds = list[str]


@register_model(LMMS_EVAL_MODEL)
class UnifiedMLLM(lmms):
    """The lmms-eval model of an export (see the module docstring for the arguments and requests)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        batch_size: int | str = 1,
        dtype: str | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        loglikelihood: str = "loss",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in IGNORED_ARGS)
        if unknown:
            raise ValueError(
                f"unknown model_args {unknown} for {LMMS_EVAL_MODEL}: pretrained, device, batch_size, dtype, "
                "max_new_tokens, seed, loglikelihood"
            )
        if loglikelihood not in SCORES:
            raise ValueError(f"loglikelihood must be one of {sorted(SCORES)}, got {loglikelihood!r}")
        self.score_kind = loglikelihood
        if str(batch_size) == "auto" or int(batch_size) < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.solver = load_solver(str(pretrained), str(device or "cpu"), dtype)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens or self.solver.config.generation.max_new_tokens)
        self.seed = self.solver.config.generation.seed if seed is None else int(seed)
        # UniToken's converted checkpoints place images without placeholders themselves (model.prompt_style).
        self.implicit = self.solver.config.model.prompt_style == "unitoken"
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> UnifiedMLLM:
        """lmms-eval's constructor from ``--model_args``; its own ``--batch_size`` / ``--device`` fill only what
        the model_args leave out (lmms-eval passes both always, so the base class would refuse a
        ``batch_size`` given in the model_args)."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ------------------------------------------------------------------------------------- requests

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = [""] * len(requests)
        bar = progress(total=len(requests), desc="unified_mllm generate_until", disable=self.rank != 0)
        for group in _groups(requests, lambda r: _key(r.args[1])):
            until, settings = self._decoding(requests[group[0]].args[1])
            for chunk in _chunks(group, self.batch_size):
                asked = [requests[i].args for i in chunk]
                images = [self._visuals(a[2], a[4], a[5], a[3]) for a in asked]
                prompts = [place_images(a[0], len(i), implicit=self.implicit) for a, i in zip(asked, images)]
                for i, args, text in zip(chunk, asked, self._generate(images, prompts, settings)):
                    answers[i] = cut_at_stop(text, until)
                    self.cache_hook.add_partial("generate_until", (args[0], args[1]), answers[i])
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        scores: list[GenerationResult] = []
        bar = progress(total=len(requests), desc="unified_mllm loglikelihood", disable=self.rank != 0)
        for chunk in _chunks(list(range(len(requests))), self.batch_size):
            images, prompts, conts = [], [], []
            for i in chunk:
                context, target, *where = requests[i].args
                pictures = self._visuals(where[0], where[2], where[3], where[1]) if where else []
                if callable(target):  # the loglikelihood output type: the target of the document
                    target = target(self.task_dict[where[2]][where[3]][where[1]])
                target = target[0] if isinstance(target, list) else target
                images.append(pictures)
                prompts.append(place_images(context, len(pictures), implicit=self.implicit))
                conts.append(str(target).lstrip())
            for i, cont, (logprob, greedy) in zip(chunk, conts, self._score(images, prompts, conts)):
                count = len(self.solver.tokenizer.encode(cont))
                pair = (SCORES[self.score_kind](logprob, count), greedy)
                scores.append(GenerationResult(text=pair))  # type: ignore[arg-type]  # see the module docstring
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], pair)
            bar.update(len(chunk))
        bar.close()
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Rounds]:
        results: list[Rounds] = [[] for _ in requests]
        bar = progress(total=len(requests), desc="unified_mllm multi-round", disable=self.rank != 0)
        for group in _groups(requests, lambda r: _key(r.args[1])):
            until, settings = self._decoding(requests[group[0]].args[1])
            for chunk in _chunks(group, self.batch_size):
                for i, rounds in zip(chunk, self._rounds([requests[i].args for i in chunk], until, settings)):
                    results[i] = rounds
                bar.update(len(chunk))
        bar.close()
        return results

    def _rounds(self, asked: list[tuple], until: list[str], settings: dict[str, Any]) -> list[Rounds]:
        """The rounds of a batch of multi-round requests, the rows still going answered together."""
        docs = [self.task_dict[a[5]][a[6]][a[4]] for a in asked]
        outputs: list[Rounds] = [[] for _ in asked]
        info: list[Any] = [None] * len(asked)
        images = [self._visuals(a[2], a[5], a[6], a[4]) for a in asked]
        contexts = [a[0] for a in asked]
        going = list(range(len(asked)))
        round_idx = 0
        while going:
            if round_idx:
                still = []
                for row in going:
                    visuals, context, terminal, done, info[row] = asked[row][3](
                        docs[row],
                        previous_output=list(outputs[row]),
                        round_idx=round_idx,
                        previous_round_info=info[row],
                    )
                    outputs[row] = list(done)  # the task's record of the rounds so far
                    if not terminal:
                        images[row], contexts[row] = _images(visuals), context
                        still.append(row)
                going = still
                if not going:
                    break
            prompts = [place_images(contexts[r], len(images[r]), implicit=self.implicit) for r in going]
            for row, text in zip(going, self._generate([images[r] for r in going], prompts, settings)):
                outputs[row].append(cut_at_stop(text, until))
            round_idx += 1
        return outputs

    # ---------------------------------------------------------------------------------- the solver

    def _generate(
        self, images: list[list[Image.Image]], prompts: list[str], settings: dict[str, Any]
    ) -> list[str]:
        """Answers of a batch; when the batch fails on a bad prompt, each is asked alone (a failing one: "")."""
        try:
            return self.solver.generate(images, [[[p, None]] for p in prompts], **settings)
        except ValueError:
            if len(prompts) == 1:
                return [self._failed(prompts[0], "")]
        answers = []
        for pictures, prompt in zip(images, prompts):
            try:
                answers.append(self.solver.generate(pictures, [[prompt, None]], **settings))
            except ValueError as exc:
                answers.append(self._failed(prompt, "", exc))
        return answers

    def _score(self, images: list[list[Image.Image]], prompts: list[str], conts: list[str]) -> list[Any]:
        """Log-likelihoods of a batch; a failing row alone scores ``(-inf, False)``."""
        conversations = [[[p, None]] for p in prompts]
        try:
            return self.solver.loglikelihood(images, conversations, conts)
        except ValueError:
            pass
        scores = []
        for pictures, prompt, cont in zip(images, prompts, conts):
            try:
                scores.append(self.solver.loglikelihood(pictures, [[prompt, None]], cont))
            except ValueError as exc:
                scores.append(self._failed(prompt, (float("-inf"), False), exc))
        return scores

    def _failed(self, prompt: str, value: Any, exc: Exception | None = None) -> Any:
        log.warning("unified_mllm: request skipped (%s): %.80r", exc or "the prompt does not fit", prompt)
        return value

    def _decoding(self, gen_kwargs: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
        """``(until, solver.generate settings)`` of a request's ``gen_kwargs``."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.get("temperature") or 0.0)
        if kwargs.get("do_sample") is False:
            temperature = 0.0
        elif kwargs.get("do_sample") and temperature == 0.0:
            temperature = 1.0  # transformers' default temperature when sampling is asked without one
        top_p, beams = kwargs.get("top_p"), kwargs.get("num_beams")
        if top_p not in (None, 1, 1.0) and temperature > 0:
            self._warn_once("top_p", f"top_p={top_p} ignored: top-p comes from the export's generation.top_p")
        if beams not in (None, 1):
            self._warn_once("num_beams", f"num_beams={beams} ignored: answers are decoded greedily")
        settings = {
            "max_gen_len": int(kwargs.get("max_new_tokens") or self.max_new_tokens),
            "temperature": temperature,
            "top_k": int(kwargs["top_k"]) if kwargs.get("top_k") else None,
            "seed": self.seed,
        }
        return until, settings

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("unified_mllm: %s", message)

    def _visuals(
        self, doc_to_visual: Callable[[Any], Any] | None, task: str, split: str, doc_id: int
    ) -> list[Image.Image]:
        """The images of a request's document (``doc_to_visual`` may return None, one image, or a list)."""
        if doc_to_visual is None:
            return []
        return _images(doc_to_visual(self.task_dict[task][split][doc_id]))


def _images(visuals: Any) -> list[Image.Image | str]:
    """The images of a ``doc_to_visual`` result: PIL images or image files; videos and audio are refused."""
    if visuals is None:
        return []
    items = visuals if isinstance(visuals, list | tuple) else [visuals]
    out: list[Image.Image | str] = []
    for item in items:
        if isinstance(item, list | tuple):
            out += _images(item)
        elif isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, str | Path) and not str(item).lower().endswith(VIDEO_SUFFIXES):
            out.append(str(item))
        else:
            kind = "a video" if isinstance(item, str | Path) else type(item).__name__
            raise ValueError(
                f"{LMMS_EVAL_MODEL} reads images only; doc_to_visual gave {kind}: {str(item)[:80]}"
            )
    return out


def _key(gen_kwargs: Any) -> str:
    """Requests with equal generation settings share a batch."""
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


def _groups(requests: Sequence[Instance], key: Callable[[Instance], str]) -> list[list[int]]:
    """Indices of the requests, grouped by ``key`` in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(key(request), []).append(i)
    return list(groups.values())


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def register() -> None:
    """Name the model in lmms-eval's registry (the one ``--model`` resolves), as the entry point does."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    manifest = ModelManifest(model_id=LMMS_EVAL_MODEL, simple_class_path=LMMS_EVAL_CLASS)
    MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


register()


def main(argv: Sequence[str] | None = None) -> None:
    """lmms-eval's command line with the model registered (for a checkout without the entry point)."""
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    lmms_eval_main()


if __name__ == "__main__":
    main()
