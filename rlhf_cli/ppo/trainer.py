"""The PPO iteration on whole rollout batches: evaluate -> advantages -> clipped updates.

`PPOTrainer` is also the Python API for users who drive the loop themselves:

    trainer = PPOTrainer(config, policy_with_value, tokenizer, accelerator)
    rollout = trainer.generate(prompts)                 # or trainer.rollout_from(queries, responses)
    scores = my_reward(rollout.prompts, rollout.responses)   # any function, model or human
    stats = trainer.step(rollout, scores)               # one PPO update; returns the statistics

Shapes: B rollout rows on this process, P query tokens (left-padded), T response tokens
(right-padded), V vocabulary.
"""

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from rlhf_cli.config.schema import PPOConfig
from rlhf_cli.models.policy import reference_mode
from rlhf_cli.models.value_head import PolicyWithValue
from rlhf_cli.ppo.advantages import gae, whiten_advantages
from rlhf_cli.ppo.forward import model_inputs, response_slice, supports_logits_to_keep, trim_padding
from rlhf_cli.ppo.generation import (
    encode_prompts,
    install_sampling_config,
    left_pad,
    sample_responses,
    sample_with_logprobs,
    stop_token_id,
)
from rlhf_cli.ppo.kl import kl_per_token, make_kl_controller
from rlhf_cli.ppo.logprobs import entropy_from_logits, logprobs_from_logits
from rlhf_cli.ppo.losses import policy_loss, value_loss
from rlhf_cli.ppo.masking import (
    lengths_to_mask,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    trailing_pad_lengths,
    truncate_after_stop,
)
from rlhf_cli.ppo.rewards import apply_missing_eos_penalty, clip_scores, per_token_rewards
from rlhf_cli.training.optim import make_optimizer, make_scheduler
from rlhf_cli.training.optimizer_step import optimizer_step

log = logging.getLogger(__name__)


class NonFiniteBatch(Exception):
    """NaN/inf found in a rollout's scores, values, log-probs or advantages, before any update
    (the weights are untouched), or in a gradient with `training.skip_nonfinite_batches` off."""


@dataclass
class Rollout:
    """One batch of (query, response) pairs on this process, with their texts."""

    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) pad after the stop token
    response_mask: torch.Tensor  # (B, T) bool: tokens up to and including the stop token
    stopped: torch.Tensor  # (B,) bool: the response produced the stop token
    prompts: list[str]
    responses: list[str]
    # what the sampling policy's forward passes gave while generating (causal policies with a value
    # head on the policy); None: `evaluate` computes them with a forward over the rollout
    logprobs: torch.Tensor | None = None  # (B, T) float32, log-probs of the response tokens at the temperature
    values: torch.Tensor | None = None  # (B, T) float32


def iterations_of(config: PPOConfig, num_processes: int) -> tuple[int, int]:
    """(rollout rows per process per iteration, number of iterations)."""
    t, ppo = config.training, config.ppo
    local = t.per_device_train_batch_size * t.gradient_accumulation_steps * ppo.num_mini_batches
    return local, max(1, ppo.total_episodes // (local * num_processes))


class PPOTrainer:
    def __init__(self, config: PPOConfig, model: PolicyWithValue, tokenizer, accelerator, reference=None):
        self.config, self.ppo, self.tokenizer, self.accelerator = config, config.ppo, tokenizer, accelerator
        self.temperature = config.generation.temperature
        self.batch_size, self.num_iterations = iterations_of(config, accelerator.num_processes)
        updates = self.num_iterations * self.ppo.num_ppo_epochs * self.ppo.num_mini_batches
        optimizer = make_optimizer(model.parameters(), config.training)
        self.scheduler = make_scheduler(optimizer, config.training, updates)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.reference = reference.to(accelerator.device).eval() if reference is not None else None
        self.kl_ctl = make_kl_controller(self.ppo.kl_coef, self.ppo.adaptive_kl, self.ppo.target_kl, self.ppo.kl_horizon)
        self.stop_id = stop_token_id(config.generation, tokenizer)
        self.encoder_decoder = self.unwrapped.is_encoder_decoder
        # causal LMs compute the LM head only where response tokens are predicted (not over the query)
        self.policy_keeps_logits = (not self.encoder_decoder and self.unwrapped.critic is None
                                    and supports_logits_to_keep(self.unwrapped.policy))
        # the rollout's log-probs and values come from generate's own forward passes (no extra forward)
        self.stats_from_generation = not self.encoder_decoder and self.unwrapped.critic is None
        self.reference_keeps_logits = not self.encoder_decoder and supports_logits_to_keep(
            self.reference if self.reference is not None else self.unwrapped.policy)
        install_sampling_config(self.unwrapped.policy, config.generation, self.stop_id, tokenizer.pad_token_id)
        self.episode = 0
        self.nonfinite_skips = 0  # rollouts and optimizer steps skipped for NaN/inf (skip_nonfinite_batches)
        self.fp16_overflow_skips = 0  # optimizer steps the fp16 gradient scaler skipped (not faults)

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ rollout

    def encode(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.config.data
        ids, _ = encode_prompts(prompts, self.tokenizer, d.max_prompt_length, d.long_prompts)
        q, m = left_pad(ids, self.tokenizer.pad_token_id)
        return q.to(self.accelerator.device), m.to(self.accelerator.device)

    @torch.no_grad()
    def generate(self, prompts: list | None = None, query_ids=None, query_mask=None) -> Rollout:
        """Sample one response per query (text prompts, or already-encoded left-padded ids).

        Causal policies: the sampling forward passes also give the response tokens' log-probs and
        values (`Rollout.logprobs` / `.values`), so `step` needs no second forward of the policy."""
        if query_ids is None:
            query_ids, query_mask = self.encode(prompts)
        self.model.eval()
        chunk = self.ppo.local_rollout_forward_batch_size
        policy, pieces = self.unwrapped.policy, []
        for i in range(0, len(query_ids), chunk):
            q, m = query_ids[i : i + chunk], query_mask[i : i + chunk]
            with self.accelerator.autocast():  # the precision of the update's forward (docs/ppo.md, Precision)
                if self.stats_from_generation:
                    pieces.append(sample_with_logprobs(policy, self.unwrapped.value_head, q, m, self.temperature))
                else:
                    pieces.append((sample_responses(policy, q, m), None, None))
        width = max(p[0].shape[1] for p in pieces)

        def joined(k: int, value) -> torch.Tensor | None:
            parts = [p[k] for p in pieces]
            if any(x is None for x in parts):
                return None
            return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value) for x in parts])

        responses = joined(0, self.tokenizer.pad_token_id)
        return self.rollout_from(query_ids, query_mask, responses, joined(1, 0.0), joined(2, 0.0))

    def rollout_from(self, query_ids, query_mask, response_ids, logprobs=None, values=None,
                     response_lengths: torch.Tensor | None = None) -> Rollout:
        """A rollout from encoded queries (B, P) left-padded and responses (B, T) right-padded:
        responses are cut after the stop token, and right padding is masked -- the first
        `response_lengths` tokens of each row are the response when given; else, when the pad token
        is not the stop token, everything before a row's trailing pad tokens."""
        pad = self.tokenizer.pad_token_id
        if response_lengths is None and pad != self.stop_id:
            response_lengths = trailing_pad_lengths(response_ids, pad)
        response_ids, lengths, stopped = truncate_after_stop(response_ids, self.stop_id, pad, response_lengths)
        if not bool((lengths > 0).all()):
            empty = int((lengths == 0).nonzero()[0])
            raise ValueError(f"response row {empty} is empty (only padding); every response needs a token to score")
        mask = lengths_to_mask(lengths, response_ids.shape[1])
        decode = self.tokenizer.batch_decode
        return Rollout(
            query_ids, query_mask, response_ids, mask, stopped,
            prompts=decode(query_ids, skip_special_tokens=True),
            responses=decode(response_ids.masked_fill(~mask, pad), skip_special_tokens=True),
            logprobs=logprobs, values=values,
        )

    def rollout_from_lists(self, queries: list[torch.Tensor], responses: list[torch.Tensor]) -> Rollout:
        """A rollout from token lists as TRL's `step` took them: 1-D query and response tensors of
        any lengths (no padding, responses as sampled; they are still cut after the stop token)."""
        if len(queries) != len(responses) or not queries:
            raise ValueError(f"got {len(queries)} queries and {len(responses)} responses; give the same number, >= 1")
        device = self.accelerator.device
        query_ids, query_mask = left_pad([q.tolist() for q in queries], self.tokenizer.pad_token_id)
        lengths = torch.tensor([len(x) for x in responses])
        response_ids = torch.nn.utils.rnn.pad_sequence([x.long().cpu() for x in responses], batch_first=True,
                                                       padding_value=self.tokenizer.pad_token_id)
        return self.rollout_from(query_ids.to(device), query_mask.to(device), response_ids.to(device),
                                 response_lengths=lengths.to(device))

    # ------------------------------------------------------------------ forward passes

    def _inputs(self, r: Rollout, idx, keep_logits: bool) -> tuple[dict, int, int]:
        """Model inputs for rows `idx`, trimmed to the padding those rows need; (inputs, P', T')."""
        q, qm, resp, rm = trim_padding(r.query_ids[idx], r.query_mask[idx], r.response_ids[idx], r.response_mask[idx])
        inputs = model_inputs(self.unwrapped.policy.config, q, qm, resp, rm)
        if keep_logits:  # logits at positions P'-1 .. P'+T'-1 only: the last T'+1 (the very last is unused)
            inputs["logits_to_keep"] = resp.shape[1] + 1
        return inputs, q.shape[1], resp.shape[1]

    def _response_logits(self, logits: torch.Tensor, P: int, T: int, kept: bool) -> torch.Tensor:
        return logits[:, :T] if kept else response_slice(logits, P, T, self.encoder_decoder)

    def _policy_forward(self, r: Rollout, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Response logits (b, T', V) and values (b, T') in ONE forward of the policy with its value
        head, over rows `idx` trimmed to their longest query and longest response (T' <= T)."""
        inputs, P, T = self._inputs(r, idx, self.policy_keeps_logits)
        logits, values = self.model(**inputs)
        return (self._response_logits(logits, P, T, self.policy_keeps_logits),
                response_slice(values, P, T, self.encoder_decoder))

    def policy_forward(self, r: Rollout, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Response logits (b, T, V) and values (b, T): the update's forward, padded back to the
        rollout's response width T (positions past the rows' responses hold zeros)."""
        logits, values = self._policy_forward(r, idx)
        T = r.response_ids.shape[1]
        pad = T - logits.shape[1]
        return torch.nn.functional.pad(logits, (0, 0, 0, pad)), torch.nn.functional.pad(values, (0, pad))

    def reference_logits(self, r: Rollout, idx) -> torch.Tensor:
        """Reference logits (b, T', V), trimmed as in `_policy_forward`: a frozen copy, or the LoRA
        policy as its reference (its frozen starting adapter, or its adapter disabled: models/policy.py)."""
        inputs, P, T = self._inputs(r, idx, self.reference_keeps_logits)
        if self.reference is not None:
            logits = self.reference(**inputs, use_cache=False).logits
        else:
            policy = self.unwrapped.policy
            with reference_mode(policy):
                logits = policy(**inputs, use_cache=False).logits
        return self._response_logits(logits, P, T, self.reference_keeps_logits)

    @torch.no_grad()
    def evaluate(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Old log-probs, values and reference log-probs (each (B, T)), in micro-batches, no grad.
        Old log-probs and values that generation recorded are used as they are."""
        self.model.eval()
        width = r.response_ids.shape[1]

        def full_width(x: torch.Tensor) -> torch.Tensor:  # (b, T') -> (b, T): zeros past every row's end
            return torch.nn.functional.pad(x, (0, width - x.shape[1]))

        def passes(rows: int):
            return (slice(start, start + rows) for start in range(0, len(r.query_ids), rows))

        ref_logprobs = []
        for idx in passes(self.ppo.local_rollout_forward_batch_size):
            with self.accelerator.autocast():  # the policy's forward runs under it too (prepared model)
                ref = self.reference_logits(r, idx)
            tokens = r.response_ids[idx, : ref.shape[1]]
            ref_logprobs.append(full_width(logprobs_from_logits(ref, tokens, self.temperature)))
        if r.logprobs is not None and r.values is not None:
            return r.logprobs, r.values, torch.cat(ref_logprobs)

        logprobs, values = [], []
        for idx in passes(self.ppo.local_rollout_forward_batch_size):
            logits, v = self._policy_forward(r, idx)
            tokens = r.response_ids[idx, : logits.shape[1]]
            logprobs.append(full_width(logprobs_from_logits(logits, tokens, self.temperature)))
            values.append(full_width(v.float()))
            del logits
        return torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs)

    # ------------------------------------------------------------------ the PPO step

    def step(self, rollout: Rollout | list[torch.Tensor], *args) -> dict[str, float]:
        """One PPO update; returns the iteration's statistics. Either

            step(rollout, scores)               a Rollout from `generate` / `rollout_from`, scores (B,)
            step(queries, responses, scores)    TRL's form: lists of 1-D token tensors, scores a list
                                                of floats or 0-d tensors, or a (B,) tensor

        Any number of rows B >= 1 works (the mini-batches are sized from the rollout)."""
        if len(args) == 2:
            rollout, scores = self.rollout_from_lists(rollout, args[0]), args[1]
        elif len(args) == 1:
            (scores,) = args
        else:
            raise TypeError("step(rollout, scores) or step(queries, responses, scores)")
        if not torch.is_tensor(scores):
            scores = torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in scores])
        if scores.shape != (len(rollout.query_ids),):
            raise ValueError(f"scores has shape {tuple(scores.shape)}; expected ({len(rollout.query_ids)},), one per row")
        return self._step(rollout, scores)

    def _step(self, r: Rollout, scores: torch.Tensor) -> dict[str, float]:
        device, ppo = self.accelerator.device, self.ppo
        mask = r.response_mask
        started = time.perf_counter()
        kl_coef = self.kl_ctl.value  # the coefficient this iteration's rewards use (logged as used)

        # 1. Old log-probs, values, reference log-probs
        logprobs, values, ref_logprobs = self.evaluate(r)
        values = values.masked_fill(~mask, 0.0)

        # 2. Scores -> per-token rewards (KL penalty on every token, the score on the last)
        raw_scores = scores.to(device).float()
        scores = clip_scores(apply_missing_eos_penalty(raw_scores, r.stopped, ppo.missing_eos_penalty), ppo.reward_clip)
        kl = kl_per_token(logprobs, ref_logprobs, ppo.kl_estimator).masked_fill(~mask, 0.0)
        rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef)
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)

        # 3. Advantages (GAE over valid tokens), whitened over valid tokens
        advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
        advantages = whiten_advantages(advantages, mask)
        self._require_finite(mask, scores=raw_scores, values=values, logprobs=logprobs,
                             reference_logprobs=ref_logprobs, advantages=advantages)

        # 4. num_ppo_epochs x num_mini_batches clipped updates
        update_stats = self._update(r, logprobs, values, advantages, returns)

        # 5. Adaptive KL, statistics
        mean_kl = self._mean(kl.sum(1))
        self.kl_ctl.update(mean_kl, len(r.query_ids) * self.accelerator.num_processes)
        self.episode += len(r.query_ids) * self.accelerator.num_processes
        stats = {
            "objective/kl": mean_kl,
            "objective/entropy": self._mean((-logprobs).masked_fill(~mask, 0.0).sum(1)),
            "objective/non_score_reward": self._mean(non_score.sum(1)),
            "objective/rlhf_reward": self._mean(non_score.sum(1) + scores),
            "objective/scores": self._mean(raw_scores),
            "objective/kl_coef": kl_coef,
            "val/num_eos_tokens": float(self.accelerator.reduce(r.stopped.sum().float(), "sum").item()),
            "val/response_length": self._mean(mask.sum(1).float()),
            "lr": self.scheduler.get_last_lr()[0],
            "episode": self.episode,
            "time/update_s": time.perf_counter() - started,
            **update_stats,
        }
        return stats

    def _require_finite(self, mask: torch.Tensor, **tensors: torch.Tensor) -> None:
        """Raise NonFiniteBatch naming what holds NaN/inf (at valid tokens) on any process; one all-reduce."""
        flags = torch.stack([
            (~torch.isfinite(t.float()) & (mask if t.dim() == 2 else True)).any().float() for t in tensors.values()
        ]).to(self.accelerator.device)  # (len(tensors),)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, "sum")
        bad = [name.replace("_", " ") for name, flag in zip(tensors, flags.tolist(), strict=True) if flag > 0]
        if bad:
            hint = " (check the reward model or function)" if bad[0] == "scores" else ""
            raise NonFiniteBatch(f"NaN/inf in the rollout's {', '.join(bad)}{hint}")

    def _mean(self, x: torch.Tensor) -> float:
        return self.accelerator.reduce(x.float().mean(), "mean").item()

    def _update(self, r: Rollout, old_logprobs, old_values, advantages, returns) -> dict[str, float]:
        """num_ppo_epochs passes over the rollout, each in num_mini_batches optimizer steps.

        Sized from the rollout, so any B >= 1 works: each epoch the shuffled rows split into
        min(num_mini_batches, B) near-equal mini-batches, each into micro-batches of at most
        per_device_train_batch_size rows. A mini-batch's loss is the mean over its valid tokens (on
        every process): each micro-batch's summed loss is divided by the mini-batch's token count,
        so a long micro-batch weighs more than a short one, token for token. Statistics are
        per-token means over the whole update."""
        ppo, training, accelerator = self.ppo, self.config.training, self.accelerator
        rows = len(r.query_ids)
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), device=old_logprobs.device)
        self.model.train()
        for _ in range(ppo.num_ppo_epochs):
            order = torch.randperm(rows, device=old_logprobs.device)
            for mini_idx in torch.tensor_split(order, min(ppo.num_mini_batches, rows)):
                micro_batches = torch.split(mini_idx, training.per_device_train_batch_size)
                # DDP averages gradients over processes: dividing each process's sum by (all tokens /
                # processes) makes the averaged gradient that of the mean over all tokens
                all_tokens = accelerator.reduce(r.response_mask[mini_idx].sum().float(), "sum")
                loss_tokens = all_tokens.clamp_min(1) / accelerator.num_processes
                for a, idx in enumerate(micro_batches):
                    sync = contextlib.nullcontext() if a == len(micro_batches) - 1 else accelerator.no_sync(self.model)
                    with sync, accelerator.autocast():
                        stats, n = self._micro_step(r, idx, old_logprobs, old_values, advantages, returns, loss_tokens)
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value * n
                    tokens = tokens + n
                self._optimizer_step(params)
        means = torch.stack([v / tokens.clamp_min(1) for v in sums.values()])
        means = accelerator.reduce(means, "mean")
        return dict(zip(sums, means.tolist(), strict=True))

    def _optimizer_step(self, params) -> None:
        """Clip, step (unless the gradient is NaN/inf), advance the schedule (training/optimizer_step.py)."""
        outcome = optimizer_step(self.accelerator, self.optimizer, params, self.config.training.max_grad_norm)
        if outcome.fault:  # the same answer on every process: the gradients are all-reduced
            if not self.config.training.skip_nonfinite_batches:
                raise NonFiniteBatch("the gradient is NaN/inf")
            log.warning("a NaN/inf gradient: skipping this optimizer step (training.skip_nonfinite_batches)")
            self.nonfinite_skips += 1
        elif outcome.overflow:
            log.debug("fp16 gradient overflow: the scaler skipped this step and lowered its scale")
            self.fp16_overflow_skips += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _micro_step(self, r: Rollout, idx, old_logprobs, old_values, advantages, returns,
                    loss_tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward, losses and backward of one micro-batch, its summed loss divided by `loss_tokens`;
        returns detached per-token-mean statistics and the micro-batch's valid-token count."""
        logits, values = self._policy_forward(r, idx)  # trimmed to T' columns: the rest is masked in every row
        cols = slice(0, logits.shape[1])
        mask = r.response_mask[idx, cols]
        old_logprobs, old_values = old_logprobs[idx, cols], old_values[idx, cols]
        logprobs = logprobs_from_logits(logits, r.response_ids[idx, cols], self.temperature)
        pg_loss, pg = policy_loss(logprobs, old_logprobs, advantages[idx, cols], mask, self.ppo.cliprange, loss_tokens)
        vf_loss, vf = value_loss(values.float(), old_values, returns[idx, cols], mask, self.ppo.cliprange_value,
                                 loss_tokens)
        loss = pg_loss + self.ppo.vf_coef * vf_loss
        if self.ppo.entropy_coef:
            per_token = entropy_from_logits(logits, self.temperature)
            loss = loss - self.ppo.entropy_coef * masked_sum(per_token, mask) / loss_tokens
            entropy = masked_mean(per_token.detach(), mask)
        else:  # only a statistic: no autograd graph (and no backward) through a (b, T, V) softmax
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits.detach(), self.temperature), mask)
        self.accelerator.backward(loss)
        ratio_var = masked_var(torch.exp(logprobs - old_logprobs).detach(), mask)
        stats = {
            "policy/approxkl_avg": pg["approxkl"],
            "policy/clipfrac_avg": pg["clipfrac"],
            "loss/policy_avg": pg["loss"],
            "loss/value_avg": vf["loss"],
            "val/clipfrac_avg": vf["clipfrac"],
            "policy/entropy_avg": entropy,
            "val/ratio": pg["ratio"],
            "val/ratio_var": ratio_var,
        }
        return stats, mask.sum().float()

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        return {"episode": self.episode, "kl_controller": self.kl_ctl.state_dict(), "nonfinite_skips": self.nonfinite_skips,
                "fp16_overflow_skips": self.fp16_overflow_skips}

    def load_state_dict(self, state: dict) -> None:
        self.episode = state["episode"]
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.nonfinite_skips = state.get("nonfinite_skips", 0)
        self.fp16_overflow_skips = state.get("fp16_overflow_skips", 0)
