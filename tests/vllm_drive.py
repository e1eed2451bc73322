"""Run an exported folder on vLLM (offline ``LLM``) and print what the tests compare, as JSON.

Run by the vLLM venv's Python (``scripts/setup_vllm.sh``): ``vllm_drive.py FOLDER REQUEST.json``
where the request holds ``prompts`` (lists of token ids) or ``texts`` (tokenized by vLLM with the
folder's tokenizer), ``max_tokens`` and ``dtype``. Prints one JSON line: the prompt ids, the greedy
tokens, the attention backend, and the KV cache vLLM allocated per token.
"""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")      # the engine in this process: its cache is readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")              # GiB; the default takes a large share of RAM


def cache_per_token(llm) -> dict:
    """The KV cache spec vLLM built from the model: bytes per token over all layers, head size."""
    core = llm.llm_engine.engine_core.engine_core
    config = core.vllm_config.cache_config
    specs = core.model_executor.driver_worker.worker.model_runner.get_kv_cache_spec()
    per_token = sum(spec.page_size_bytes // spec.block_size for spec in specs.values())
    first = next(iter(specs.values()))
    return {"bytes_per_token": per_token, "layers": len(specs), "head_size": first.head_size,
            "num_kv_heads": first.num_kv_heads, "block_size": first.block_size, "spec": type(first).__name__,
            "num_gpu_blocks": config.num_gpu_blocks}


def main(folder: str, request_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(open(request_path).read())
    texts = request.get("texts")
    llm = LLM(model=folder, dtype=request.get("dtype", "float32"), skip_tokenizer_init=texts is None,
              max_model_len=request.get("max_model_len", 256), enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    prompts = texts if texts is not None else [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    backend = None
    try:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        backend = sorted({g.backend.get_name() for groups in runner.attn_groups for g in groups})
    except Exception as e:        # the backend name is a diagnostic only
        backend = f"unknown ({type(e).__name__})"
    print("RESULT " + json.dumps({"prompts": [list(o.prompt_token_ids) for o in outs],
                                  "tokens": [list(o.outputs[0].token_ids) for o in outs], "backend": backend,
                                  "cache": cache_per_token(llm)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
