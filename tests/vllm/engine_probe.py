"""Start one vLLM engine from JSON kwargs, generate greedily, print one JSON line (run in a subprocess)."""

import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    from turboquant_vllm.eval.dummy_model import write_llama_config

    model = spec.pop("model", None)
    if model is None:
        model = str(write_llama_config(Path(tempfile.mkdtemp()) / "m", **spec.pop("shape", {})))
        spec.setdefault("load_format", "dummy")
        spec.setdefault("skip_tokenizer_init", True)
    prompts = spec.pop("prompts", [[1 + (i * 37 + j * 11) % 500 for j in range(40 + 23 * i)] for i in range(4)])
    max_tokens = spec.pop("max_tokens", 24)
    try:
        llm = LLM(model=model, seed=0, gpu_memory_utilization=spec.pop("gpu_memory_utilization", 0.3), **spec)
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            use_tqdm=False,
        )
        cache = llm.llm_engine.vllm_config.cache_config
        result = {
            "ok": True,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "num_gpu_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size,
        }
    except Exception as err:  # report the start-up error to the test
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print("PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
