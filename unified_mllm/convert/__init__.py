"""Published checkpoints in, our formats out (and back where a format allows it).

    python -m unified_mllm.convert KIND SRC DST [options]        (--help lists the kinds, KIND --help its options)

Every kind is a module of this package with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``;
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
}
