"""What a static KV cache and torch.compile change for the online stages' two costs, on this machine: one
`generate` of a rollout (transformers' own static-cache compile path) and one forward + backward of an
update micro-batch, each eager and compiled, with the first (compiling) call timed apart.

    python bench/compile.py                      # builtin:small-gpt2 from bench/.work (or built), 1 thread
    python bench/compile.py --rows 32 --prompt 7 --response 32 --micro-batch 16

Prints one JSON line: seconds per call after the first (median of --calls), the first call, and the ratios.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import CompileConfig, GenerationConfig

from rlhf_cli.models.loading import load_model


def timed(fn, calls: int) -> tuple[float, float]:
    """(first call's seconds, median of the later calls)."""
    times = []
    for _ in range(calls + 1):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(times[0], 3), round(statistics.median(times[1:]), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small-gpt2")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=7)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model, task="causal-lm")
    vocab = model.config.vocab_size
    query = torch.randint(10, vocab, (args.rows, args.prompt))
    mask = torch.ones_like(query)
    mask[: args.rows // 4, :2] = 0  # some left padding, as in a real rollout

    def generate(**settings):
        config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=args.response,
                                  min_new_tokens=args.response, pad_token_id=0, eos_token_id=1, **settings)
        model.eval()
        return lambda: model.generate(input_ids=query, attention_mask=mask, generation_config=config)

    compile_anywhere = CompileConfig(mode="default")
    compile_anywhere._compile_all_devices = True  # transformers compiles on accelerators only unless told
    result = {"model": args.model, "device": "cpu", "threads": args.threads}
    with torch.no_grad():
        result["generate_dynamic_cache"] = timed(generate(), args.calls)
        result["generate_static_cache"] = timed(generate(cache_implementation="static", disable_compile=True), args.calls)
        result["generate_static_compiled"] = timed(generate(cache_implementation="static", compile_config=compile_anywhere),
                                                   args.calls)

    ids = torch.randint(10, vocab, (args.micro_batch, args.prompt + args.response))

    def train_step(forward):
        def step():
            logits = forward(input_ids=ids, use_cache=False, logits_to_keep=args.response + 1).logits[:, :-1]
            torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids[:, args.prompt :].reshape(-1)).backward()
        return step

    model.train()
    result["train_eager"] = timed(train_step(model), args.calls)
    result["train_compiled"] = timed(train_step(torch.compile(model, dynamic=False)), args.calls)
    result["generate_compiled_over_dynamic"] = round(result["generate_static_compiled"][1] / result["generate_dynamic_cache"][1], 3)
    result["train_compiled_over_eager"] = round(result["train_compiled"][1] / result["train_eager"][1], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
