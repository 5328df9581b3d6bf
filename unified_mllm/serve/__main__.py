"""The OpenAI-compatible server: ``python -m unified_mllm.serve --model EXPORT [--host 127.0.0.1 --port 8000]``.

Routes: ``POST /v1/chat/completions`` (images as ``data:`` URLs, streaming), ``POST /v1/images/generations``
(``b64_json``), ``GET /v1/models``, ``GET /health``. Concurrent chat requests are decoded together by one
continuous batch (``--max-batch`` rows; 1 decodes one request at a time). ``--help`` lists the limits.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from unified_mllm.cli import add_debug_argument, one_line_errors
from unified_mllm.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unified_mllm.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export directory (a training run's checkpoint.export_dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--model-name", help="the model id clients send (default: the export's run_name, or its folder)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="LM and SigLIP dtype (default: as stored)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (1: no batching)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond those decoded; then 429"
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request, queueing included; then 408"
    )
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument(
        "--max-prompt-tokens", type=int, help="longest prompt in ids, images included (default: model)"
    )
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest input or output image")
    p.add_argument("--max-body-mb", type=float, default=64, help="largest request body in MiB; then 413")
    p.add_argument("--max-n", type=int, default=8, help="largest n (choices or images) per request")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_debug_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with one_line_errors((ConfigError, ValueError), debug=args.debug):
        for flag in ("max_batch", "max_tokens", "max_n", "max_image_pixels"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.max_queue < 0 or args.timeout <= 0 or args.max_body_mb <= 0:
            raise ValueError("--max-queue must be >= 0, --timeout and --max-body-mb > 0")
        import uvicorn  # the serve extra; imported late so --help works without it

        from unified_mllm.infer.solver import InferenceSolver
        from unified_mllm.serve.app import ServerOptions, create_app
        from unified_mllm.serve.protocol import Limits

        solver = InferenceSolver.from_pretrained(
            args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None
        )
        name = args.model_name or solver.config.run_name or Path(args.model).resolve().name
        options = ServerOptions(
            model_name=name,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            timeout=args.timeout,
            limits=Limits(
                max_image_pixels=args.max_image_pixels,
                max_prompt_tokens=args.max_prompt_tokens,
                max_tokens=args.max_tokens,
                max_n=args.max_n,
                max_body_bytes=int(args.max_body_mb * 2**20),
            ),
        )
        app = create_app(solver, options)
    logging.basicConfig(level=args.log_level.upper())
    print(f"serving {name!r} from {args.model} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
