"""Published checkpoints in, our formats out (and back where a format allows it).

    python -m unified_mllm.convert KIND SRC DST [options]        (--help lists the kinds, KIND --help its options)
    python -m unified_mllm.convert merge-lora --adapter RUN_EXPORT --output DIR     (a LoRA run, merged)

Every kind is a module of this package with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``
(a module with ``OWN_ARGUMENTS = True`` declares all its arguments, without the positional SRC DST);
:data:`KINDS` names them so that the command line imports only the converter it runs. A converter reads the
published directory (or file), maps every tensor onto our names — each key is consumed or dropped by a named
rule, never silently (:mod:`unified_mllm.convert.common`) — and writes what our loaders read: an export for
``InferenceSolver.from_pretrained`` / ``checkpoint.init_from``, or a visual-tokenizer directory for
``model.vq.checkpoint``.
"""

from __future__ import annotations

# kind -> module under unified_mllm.convert (imported on use).
KINDS: dict[str, str] = {
    "unitoken": "unitoken",
    "to-unitoken": "to_unitoken",
    "lumina-mgpt": "chameleon",
    "chameleon": "chameleon",
    "unitok": "unitok",
    "dualtoken": "dualtoken",
    "merge-lora": "merge_lora",
}
