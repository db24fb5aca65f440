"""The floor of bench/ppo.py (and of bench/grpo.py, bench/rloo.py): only what no PPO (GRPO, RLOO)
can avoid, on the same policy, prompts and sizes.

Per iteration: generate the rollout batch (one `generate` call, KV cache, same sampling settings),
then per PPO epoch one forward and backward of the policy over every row, in the same micro-batches
as the PPO update (a cross-entropy on the response tokens stands in for the PPO loss). No reward,
no reference, no value, no optimizer step. Optional spec keys for the group algorithms:
`num_generations` (default 1; each of batch_size / num_generations prompts is sampled that many
times, in one `generate` call as theirs) and `min_response_length` (default 0; = response_length
forces every response to full length, as the group benchmarks do on every side), `logits_to_keep`
(default false; true computes the LM head over the response positions only, as our trainer and
TRL's GRPO/RLOO do).
Usage: python floor_ppo.py SPEC.json RESULT.json
"""

import random

import sidekit

spec, result_path = sidekit.start()

import torch  # noqa: E402

from rlhf_cli.config.loader import build_stage  # noqa: E402
from rlhf_cli.data.loading import load_splits  # noqa: E402
from rlhf_cli.lm.forward import causal_inputs  # noqa: E402
from rlhf_cli.lm.generation import install_sampling_config, left_pad, sample_responses  # noqa: E402
from rlhf_cli.lm.masking import lengths_to_mask, truncate_after_stop  # noqa: E402
from rlhf_cli.models.loading import load_model, load_tokenizer  # noqa: E402
from rlhf_cli.stages.online import prepare_prompts  # noqa: E402

s = spec
torch.manual_seed(s["seed"])
tokenizer = load_tokenizer(s["policy"], padding_side="left")
config = build_stage("ppo", {"reward": {"function": "builtin:sentiment"}, "data": {"dataset_name": s.get("dataset_name", "builtin:review-prompts"), "max_prompt_length": s["max_prompt_length"]},
                             "generation": {"response_length": s["response_length"], "temperature": s["temperature"],
                                            "min_response_length": s.get("min_response_length", 0),
                                            "top_k": 0, "top_p": 1.0}})
ids, _ = prepare_prompts(load_splits(config.data)[0], tokenizer, config, "train")
random.Random(s["seed"]).shuffle(ids)
policy = load_model(s["policy"], task="causal-lm", is_trainable=True)
install_sampling_config(policy, config.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)
micro = s["batch_size"] // s["num_mini_batches"]
G = s.get("num_generations", 1)
prompts = s["batch_size"] // G

clock = sidekit.Clock()
clock.tick()
for it in range(s["iterations"]):
    q, qm = left_pad(ids[it * prompts : (it + 1) * prompts], tokenizer.pad_token_id)
    if G > 1:
        q, qm = q.repeat_interleave(G, 0), qm.repeat_interleave(G, 0)
    policy.eval()
    raw = sample_responses(policy, q, qm)
    resp, lengths, _ = truncate_after_stop(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
    rmask = lengths_to_mask(lengths, resp.shape[1])
    policy.train()
    P, T = q.shape[1], resp.shape[1]
    for _ in range(s["num_ppo_epochs"]):
        for start in range(0, s["batch_size"], micro):
            sl = slice(start, start + micro)
            inputs = causal_inputs(q[sl], qm[sl], resp[sl], rmask[sl])
            if s.get("logits_to_keep"):
                logits = policy(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :T]
            else:
                logits = policy(**inputs, use_cache=False).logits[:, P - 1 : P - 1 + T]
            logits = logits.float() / s["temperature"]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), resp[sl].reshape(-1),
                                                     reduction="none")
            (loss * rmask[sl].reshape(-1)).sum().backward()
    policy.zero_grad(set_to_none=True)
    clock.tick()
sidekit.finish(result_path, {"times": clock.times()[1:], "cpu_times": clock.cpu_times()[1:]})  # drop the first iteration, as the PPO sides do
