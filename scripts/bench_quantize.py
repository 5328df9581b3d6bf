"""Weight quantization for inference: memory, greedy tokens/s and agreement with the unquantized model.

One run, one model, the same prompts and the same greedy decoding (:class:`unified_mllm.infer.engine.Engine`,
no stop ids, ``--tokens`` new ids per prompt) for every row: the model in float32 and bfloat16, each as stored
and with its LM's linear layers quantized by :func:`unified_mllm.infer.quantize.quantize_model` (int8, int4 and
int4-unpacked). Columns:

* ``LM linears`` / ``model``: bytes of the quantized layers' weights (values + scales + zero points) and of
  every parameter and buffer of the model, with the ratio to the float32 model;
* ``tok/s``: new ids per second over the whole batch (prefill included; after a warm-up, the median of
  ``--repeats`` rounds, each of which times every row once in turn), with the ratio to float32;
* ``same ids``: the share of new ids equal to float32's at the same position (free-running greedy decoding,
  so one early difference changes everything after it); ``prefix``: the mean share of each row's ids before its
  first difference; ``top-1``: teacher-forced agreement, the share of positions where the row's arg-max over
  float32's own sequence (prompt + float32's new ids, one forward) is float32's next id.

Default subject: the ``tiny`` preset with its LM widened to ~300M parameters (hidden 1024, MLP 2816,
18 layers, 32768 rows), random weights, prompts of text-to-image form (``<bos> caption <end-of-turn>
<image-start> <size> <size>``) from the embedded world's captions and a sentencepiece tokenizer trained on
them in a temporary directory; ``--lm tiny`` keeps the tiny preset's LM; ``--export DIR`` measures a trained
export. A mode a device cannot run (int4 off CUDA) is listed under the table with the reason.

    python scripts/bench_quantize.py                               # ~300M random LM, CPU
    python scripts/bench_quantize.py --export runs/quickstart-stage2/export --tokens 72
    python scripts/bench_quantize.py --device cuda --dtypes bfloat16   # CUDA: int4 runs (tinygemm)

Measured on the shared 2-core CPU box (default command, one thread; ~2 CPU-minutes, 9 minutes of wall time
under the other jobs' load): int8 holds the LM linears in 0.25x float32's bytes (the whole model 0.42x, 0.31x
with bfloat16) at 0.95x float32's tokens/s (bfloat16 + int8: 1.32x float32, 0.82x bfloat16: torchao's eager
int8 weight-only matmul converts the weight to the activation dtype at every call); teacher-forced top-1
agreement with float32 0.906 (bfloat16 alone: 0.953; a random model's logits are nearly tied), int4-unpacked
0.25. On the quickstart's trained export (``--export ... --tokens 72 --prompts 4``): int8 0.993 top-1 and 0.969
same ids, int4-unpacked 0.983 / 0.802, bfloat16 0.990 / 0.962. int4 itself needs CUDA (listed as not run).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from unified_mllm.config import WorldConfig, load_config
from unified_mllm.data.shapes import caption, make_scene
from unified_mllm.infer.engine import Engine
from unified_mllm.infer.quantize import (
    QUANT_MODES,
    QUANTIZED_PART,
    QuantizationUnsupported,
    quantize_model,
    tensor_bytes,
    weight_bytes,
)
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.layout import SpecialTokens, generation_prompt
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer, train_sentencepiece

# The ~300M LM: 18 blocks of 12.6M (attention 4 x 1024^2, MLP 3 x 1024 x 2816) + 2 x 32768 x 1024 embeddings.
LM_300M = [
    "model.lm.hidden_size=1024",
    "model.lm.intermediate_size=2816",
    "model.lm.num_layers=18",
    "model.lm.num_heads=16",
    "model.lm.num_kv_heads=16",
    "model.lm.vocab_size=32768",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    label: str
    linear_bytes: int = 0
    model_bytes: int = 0
    tokens_per_s: float = 0.0
    ids: list[list[int]] | None = None
    same: float = 0.0
    prefix: float = 0.0
    top1: float = 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="a training export directory (default: a random model)")
    parser.add_argument("--lm", choices=["300m", "tiny"], default="300m", help="the random model's LM size")
    parser.add_argument("overrides", nargs="*", help="config overrides of the random model (after --lm's)")
    parser.add_argument("--tokens", type=int, default=32, help="new ids per prompt (default 32)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts decoded together (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median per row; default 3)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", choices=QUANT_MODES, default=list(QUANT_MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_intermixed_args(argv)
    if args.export and (args.overrides or args.lm != "300m"):
        parser.error("--lm and config overrides apply to the random model only, not to --export")
    if min(args.tokens, args.prompts, args.repeats) < 1:
        parser.error("--tokens, --prompts and --repeats must be at least 1")
    return args


def load_subject(args: argparse.Namespace, workdir: Path) -> tuple[UnifiedModel, TextTokenizer, str]:
    """The float32 model on the CPU, its tokenizer and a description of it."""
    if args.export:
        solver = InferenceSolver.from_pretrained(args.export, dtype=torch.float32)
        return solver.model, solver.tokenizer, args.export
    overrides = ["model.preset=tiny", *(LM_300M if args.lm == "300m" else []), *args.overrides]
    config = load_config(overrides=overrides).model
    lines = [caption(make_scene(WorldConfig(), "train", i)) for i in range(400)]
    path = train_sentencepiece(lines, workdir / "text.model", vocab_size=512, num_size_tokens=33)
    tokenizer = TextTokenizer.load_sentencepiece(path, num_image_codes=config.vq.codebook_size)
    if tokenizer.vocab_size > config.lm.vocab_size:
        raise SystemExit(f"model.lm.vocab_size={config.lm.vocab_size} < {tokenizer.vocab_size} tokenizer ids")
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    lm_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("lm.", "lm_head.")))
    return model, tokenizer, f"tiny preset, LM {lm_params / 1e6:.0f}M parameters, random weights"


def lm_linear_bytes(model: nn.Module) -> int:
    """Bytes of the weights of every linear layer in the quantized part (quantized or not)."""
    part = getattr(model, QUANTIZED_PART)
    return sum(tensor_bytes(m.weight) for m in part.modules() if isinstance(m, nn.Linear))


def decode(
    model: UnifiedModel, tokens: SpecialTokens, prompts: list[list[int]], budget: int
) -> list[list[int]]:
    return Engine(model, tokens).generate(prompts, max_new_tokens=budget, stop_ids=()).ids


@torch.inference_mode()
def teacher_forced_top1(model: UnifiedModel, prompts: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions where the model's arg-max, reading the reference sequence, is the reference's id."""
    device = next(model.parameters()).device
    hits = total = 0
    for prompt, new in zip(prompts, reference):
        ids = torch.tensor([prompt + new[:-1]], device=device)
        picked = model(ids).logits[0, len(prompt) - 1 :].argmax(-1).tolist()
        hits += sum(a == b for a, b in zip(picked, new))
        total += len(new)
    return hits / total


def time_rounds(
    models: dict[str, UnifiedModel],
    tokens: SpecialTokens,
    prompts: list[list[int]],
    args: argparse.Namespace,
) -> dict[str, Row]:
    """A row per model: its bytes, its new ids and its median tokens/s.

    One warm-up decode per model first (first-call allocations, kernel selection); then each round times every
    model once, in turn, so a load that comes and goes on a shared machine weighs on all rows alike.
    """
    rows = {label: Row(label, lm_linear_bytes(m), weight_bytes(m)) for label, m in models.items()}
    for model in models.values():
        decode(model, tokens, prompts, 2)
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in tqdm(range(args.repeats), desc="timed rounds", unit="round"):
        for label, model in models.items():
            start = time.perf_counter()
            rows[label].ids = decode(model, tokens, prompts, args.tokens)
            times[label].append(time.perf_counter() - start)
    for label, row in rows.items():
        row.tokens_per_s = len(prompts) * args.tokens / statistics.median(times[label])
    return rows


def compare(row: Row, reference: Row, model: UnifiedModel, prompts: list[list[int]]) -> None:
    """Fill ``row``'s agreement columns against ``reference`` (the float32 model)."""
    assert row.ids is not None and reference.ids is not None
    pairs = [(a, b) for mine, ref in zip(row.ids, reference.ids) for a, b in zip(mine, ref)]
    row.same = sum(a == b for a, b in pairs) / len(pairs)
    prefixes = []
    for mine, ref in zip(row.ids, reference.ids):
        first = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), len(ref))
        prefixes.append(first / len(ref))
    row.prefix = statistics.mean(prefixes)
    row.top1 = teacher_forced_top1(model, prompts, reference.ids)


def print_table(rows: list[Row]) -> None:
    base = rows[0]
    mib = 2**20
    print(
        f"{'weights':<24}{'LM linears MiB':>15}{'x':>7}{'model MiB':>11}{'x':>7}{'tok/s':>9}{'x':>7}"
        f"{'same ids':>10}{'prefix':>8}{'top-1':>8}"
    )
    for r in rows:
        print(
            f"{r.label:<24}{r.linear_bytes / mib:>15.1f}{r.linear_bytes / base.linear_bytes:>6.2f}x"
            f"{r.model_bytes / mib:>11.1f}{r.model_bytes / base.model_bytes:>6.2f}x"
            f"{r.tokens_per_s:>9.2f}{r.tokens_per_s / base.tokens_per_s:>6.2f}x"
            f"{r.same:>10.3f}{r.prefix:>8.3f}{r.top1:>8.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base, tokenizer, subject = load_subject(args, Path(tmp))
    tokens = tokenizer.special_tokens()
    captions = [caption(make_scene(WorldConfig(), "test", i)) for i in range(args.prompts)]
    prompts = [generation_prompt(tokenizer.encode(c), tokens, 8, 8) for c in captions]
    print(
        f"model: {subject}; {args.prompts} prompts x {args.tokens} new ids, greedy; device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    plan = [(dtype, mode) for dtype in args.dtypes for mode in (None, *args.modes)]
    if ("float32", None) in plan:  # float32 as stored is the reference: measured first
        plan.remove(("float32", None))
    plan.insert(0, ("float32", None))
    models: dict[str, UnifiedModel] = {}
    skipped: list[str] = []
    for dtype, mode in tqdm(plan, desc="quantizing", unit="model"):
        label = dtype if mode is None else f"{dtype} + {mode}"
        model = copy.deepcopy(base).to(DTYPES[dtype])
        try:
            if mode is not None:
                quantize_model(model, mode, device=args.device)
            models[label] = model.to(args.device)
        except QuantizationUnsupported as error:
            skipped.append(f"{label}: {error}")
    del base
    by_label = time_rounds(models, tokens, prompts, args)
    rows = list(by_label.values())
    for row in rows:
        compare(row, rows[0], models[row.label], prompts)
    print_table(rows)
    for line in skipped:
        print(f"not run: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
