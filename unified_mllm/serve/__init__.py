"""Putting an export in front of people: an OpenAI-compatible HTTP server (`python -m unified_mllm.serve`) and a
browser demo (`python -m unified_mllm.serve.demo`), both on top of `unified_mllm.infer`."""
