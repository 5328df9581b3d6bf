"""Evaluation: benchmark tasks behind one driver (``python -m unified_mllm.eval --task NAME --model EXPORT``),
their metrics, the world's programmatic judge, and image metrics for tokenizers.

* :mod:`unified_mllm.eval.tasks` — the task interface and registry; :mod:`unified_mllm.eval.shapesbench` — the
  embedded benchmark (VQA accuracy per question type, POPE-style yes/no, GenEval-style generation under the judge);
* :mod:`unified_mllm.eval.metrics` — answer normalisation, VQA accuracy, POPE metrics, GenEval aggregation;
* :mod:`unified_mllm.eval.judge` — reads an image of the world back into objects and scores GenEval-style specs;
* :mod:`unified_mllm.eval.tokenizer` — reconstruction of a split by an image tokenizer (``python -m
  unified_mllm.eval.tokenizer``); :mod:`unified_mllm.eval.image_metrics`, :mod:`unified_mllm.eval.inception` —
  codebook usage and FID (PSNR and SSIM: :mod:`unified_mllm.metrics`).
"""
