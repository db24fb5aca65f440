"""The floor of bench/ppo.py: only what no PPO can avoid, on the same policy, prompts and sizes.

Per iteration: generate the rollout batch (one `generate` call, KV cache, same sampling settings),
then per PPO epoch one forward and backward of the policy over every row, in the same micro-batches
as the PPO update (a cross-entropy on the response tokens stands in for the PPO loss). No reward,
no reference, no value, no optimizer step. Usage: python floor_ppo.py SPEC.json RESULT.json
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
from rlhf_cli.stages.ppo import prepare_prompts  # noqa: E402

s = spec
torch.manual_seed(s["seed"])
tokenizer = load_tokenizer(s["policy"], padding_side="left")
config = build_stage("ppo", {"reward": {"function": "builtin:sentiment"}, "data": {"dataset_name": "builtin:review-prompts", "max_prompt_length": s["max_prompt_length"]},
                             "generation": {"response_length": s["response_length"], "temperature": s["temperature"],
                                            "top_k": 0, "top_p": 1.0}})
ids, _ = prepare_prompts(load_splits(config.data)[0], tokenizer, config, "train")
random.Random(s["seed"]).shuffle(ids)
policy = load_model(s["policy"], task="causal-lm", is_trainable=True)
install_sampling_config(policy, config.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)
micro = s["batch_size"] // s["num_mini_batches"]

clock = sidekit.Clock()
clock.tick()
for it in range(s["iterations"]):
    q, qm = left_pad(ids[it * s["batch_size"] : (it + 1) * s["batch_size"]], tokenizer.pad_token_id)
    policy.eval()
    raw = sample_responses(policy, q, qm)
    resp, lengths, _ = truncate_after_stop(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
    rmask = lengths_to_mask(lengths, resp.shape[1])
    policy.train()
    P, T = q.shape[1], resp.shape[1]
    for _ in range(s["num_ppo_epochs"]):
        for start in range(0, s["batch_size"], micro):
            sl = slice(start, start + micro)
            logits = policy(**causal_inputs(q[sl], qm[sl], resp[sl], rmask[sl]), use_cache=False).logits
            logits = logits[:, P - 1 : P - 1 + T].float() / s["temperature"]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), resp[sl].reshape(-1),
                                                     reduction="none")
            (loss * rmask[sl].reshape(-1)).sum().backward()
    policy.zero_grad(set_to_none=True)
    clock.tick()
sidekit.finish(result_path, {"times": clock.times()[1:], "cpu_times": clock.cpu_times()[1:]})  # drop the first iteration, as the PPO sides do
