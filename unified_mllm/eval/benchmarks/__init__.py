"""The paper benchmarks, one module each; every module here registers its task(s) on import (the driver
imports them all: :func:`unified_mllm.eval.tasks.task_names`)."""
