"""Published scale on one GPU: the UniToken-7B shapes (``chameleon-7b`` preset) with random bf16 weights.

Builds the model on ``meta`` and materialises it on the device (no host copy of 7B weights), then runs what a user
runs: one text-to-image generation with batched classifier-free guidance and one understanding answer through
:class:`InferenceSolver`, and prints tokens/s and peak memory. Random weights need no download; the text tokenizer
is a synthetic vocabulary laid out like Chameleon's (65 536 ids, 8 192 image codes named ``IMGIMG…``).

    python scripts/gpu_check.py                                      # cuda, chameleon-7b, one 512 px image
    python scripts/gpu_check.py --device cpu --preset tiny --size 64 # the same path at toy scale (tests run it)

On an 80 GB-class GPU the default run takes a few minutes (most of it the ~1 100 image tokens of a 512 px image,
each a forward of the two CFG rows); it exits 1 when an output is malformed.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from unified_mllm.config import load_config
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import (
    CHAMELEON_MAX_SIZE_STEPS,
    CHAMELEON_SPECIAL_NAMES,
    TextTokenizer,
    chameleon_name_of_code,
    chameleon_size_token_name,
)
from unified_mllm.vision.vqgan import VQGAN


def synthetic_chameleon_vocab(path: Path, vocab_size: int, num_codes: int) -> Path:
    """A WordLevel tokenizer JSON with Chameleon's special and image-token names, filled up to ``vocab_size``."""
    # Imported here: ruff would sort Hugging Face's `tokenizers` as first-party (the repo's tokenizers/ folder).
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<unk>", *dict.fromkeys(CHAMELEON_SPECIAL_NAMES.values())]
    names += [chameleon_size_token_name(step) for step in range(CHAMELEON_MAX_SIZE_STEPS)]
    names += [chameleon_name_of_code(code) for code in range(num_codes)]
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tokenizer = Tokenizer(
        models.WordLevel(vocab={name: i for i, name in enumerate(names)}, unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def build(args: argparse.Namespace, workdir: Path) -> InferenceSolver:
    config = load_config(
        [], [f"model.preset={args.preset}", "tokenizer.kind=chameleon", "tokenizer.size_unit=2"]
    )
    config.tokenizer.path = str(
        synthetic_chameleon_vocab(
            workdir / "text_tokenizer.json", config.model.lm.vocab_size, config.model.vq.codebook_size
        )
    )
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with torch.device("meta"):
        model = UnifiedModel(config.model)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.init_non_persistent_buffers()
    model = model.to(dtype).eval()
    vq = VQGAN(config.model.vq).to(device).eval()
    tokenizer = TextTokenizer.from_config(config.tokenizer, num_image_codes=config.model.vq.codebook_size)
    return InferenceSolver(config, model, tokenizer, vq)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--preset", default="chameleon-7b")
    parser.add_argument("--size", type=int, default=512, help="generated image side in pixels")
    parser.add_argument("--answer-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (pass --device cpu for the toy-scale run)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        solver = build(args, Path(workdir))
        synchronize(args.device)
        params = sum(p.numel() for p in solver.model.parameters())
        print(
            f"built {args.preset}: {params / 1e6:,.1f} M parameters, {args.dtype}, in {time.perf_counter() - start:.1f} s"
        )

        height, width = solver.grid_size(args.size)
        start = time.perf_counter()
        (image,) = solver.generate_img(
            ["a photo of a red circle"], cfg=3.0, image_top_k=4000, size=args.size, seed=0
        )
        synchronize(args.device)
        seconds = time.perf_counter() - start
        tokens = height * (width + 1)
        print(
            f"text-to-image {args.size} px (CFG 3.0, batched): {tokens} image tokens in {seconds:.1f} s, {tokens / seconds:.1f} tokens/s"
        )
        if not isinstance(image, Image.Image) or image.size != (args.size, args.size):
            print(f"error: expected a {args.size} px image, got {image!r}", file=sys.stderr)
            return 1

        start = time.perf_counter()
        answer = solver.generate(
            [image], [["<|image|>Describe the image.", None]], max_gen_len=args.answer_tokens
        )
        synchronize(args.device)
        seconds = time.perf_counter() - start
        count = len(solver.tokenizer.encode(answer)) if answer else 0
        print(
            f"understanding: {count} answer tokens in {seconds:.1f} s (prefill included), {count / seconds:.1f} tokens/s"
        )
        print(peak_memory(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
