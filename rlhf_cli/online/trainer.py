"""One online-RL iteration on whole rollout batches: sample -> evaluate -> advantages -> update,
for any Algorithm (online/algorithm.py). Also the Python API for users who drive the loop:

    trainer = PPOTrainer(config, policy_with_value, tokenizer, accelerator)   # or OnlineTrainer(...)
    exp = trainer.generate(prompts)                     # or trainer.rollout_from(queries, responses)
    scores = my_reward(exp.prompts, exp.responses)      # any function, model or human
    stats = trainer.step(exp, scores)                   # one update; returns the statistics

Shapes: B rollout rows on this process, P query tokens (left-padded), T response tokens
(right-padded), V vocabulary.
"""

from __future__ import annotations

import logging
import time

import torch

from rlhf_cli.lm import shared_prompts
from rlhf_cli.lm.forward import model_inputs, response_slice, supports_logits_to_keep, trim_padding
from rlhf_cli.lm.generation import encode_prompts, install_sampling_config, left_pad, stop_token_id
from rlhf_cli.lm.head import TokenStats, read_tokens
from rlhf_cli.lm.masking import lengths_to_mask, trailing_pad_lengths, truncate_after_stop
from rlhf_cli.lm.sampler import make_sampler
from rlhf_cli.models.policy import reference_mode
from rlhf_cli.models.value_head import PolicyWithValue
from rlhf_cli.online.alarms import AlarmMonitor
from rlhf_cli.online.algorithm import Algorithm
from rlhf_cli.online.experience import Experience
from rlhf_cli.online.updater import NonFiniteBatch, Updater
from rlhf_cli.training.optim import make_optimizer, make_scheduler
from rlhf_cli.training.sharding import agreement, check_shardable, root_gathered

log = logging.getLogger(__name__)


def rollout_rows(training, algorithm: Algorithm) -> int:
    """Rows (responses) per process per iteration: one optimizer step takes per_device_train_batch_size
    x gradient_accumulation_steps of them, and each pass over the rollout makes num_mini_batches steps."""
    return training.per_device_train_batch_size * training.gradient_accumulation_steps * algorithm.num_mini_batches


class OnlineTrainer:
    def __init__(self, config, algorithm: Algorithm, total_episodes: int, model: PolicyWithValue, tokenizer,
                 accelerator, reference=None, rollout_forward_batch_size: int = 64, num_generations: int = 1,
                 alarms: AlarmMonitor | None = None, share_prompts: bool = False):
        self.config, self.algorithm, self.tokenizer, self.accelerator = config, algorithm, tokenizer, accelerator
        self.alarms = alarms  # the run's reward-hacking alarms (online/alarms.py): their state is checkpointed here
        self.temperature = config.generation.temperature
        self.forward_batch_size, self.num_generations = rollout_forward_batch_size, num_generations
        self.batch_size = rollout_rows(config.training, algorithm)
        self.num_iterations = max(1, total_episodes // (self.batch_size * accelerator.num_processes))
        updates = self.num_iterations * algorithm.num_epochs * algorithm.num_mini_batches
        optimizer = make_optimizer(model.parameters(), config.training)
        self.scheduler = make_scheduler(optimizer, config.training, updates)
        check_shardable(accelerator, model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.reference = reference.to(accelerator.device).eval() if reference is not None else None
        self.updater = Updater(self.model, self.optimizer, self.scheduler, accelerator, config.training)
        self.stop_id = stop_token_id(config.generation, tokenizer)
        unwrapped = self.unwrapped
        self.encoder_decoder = unwrapped.is_encoder_decoder
        # causal LMs compute the LM head only where response tokens are predicted (not over the query)
        self.policy_keeps_logits = (not self.encoder_decoder and unwrapped.critic is None
                                    and supports_logits_to_keep(unwrapped.policy))
        self.reference_keeps_logits = not self.encoder_decoder and supports_logits_to_keep(
            self.reference if self.reference is not None else unwrapped.policy)
        self.prompt_sharing = self._prompt_sharing() if share_prompts else None
        install_sampling_config(unwrapped.policy, config.generation, self.stop_id, tokenizer.pad_token_id)
        self.sampler = make_sampler(unwrapped, config.generation, self.stop_id, config.data.max_prompt_length,
                                    accelerator, config.training.seed, self.prompt_sharing)
        self.environment = None  # a TextEnvironment (environments/rollout.py): multi-turn episodes with tools
        self.episode = 0

    def _prompt_sharing(self) -> shared_prompts.PromptSharing | None:
        """Forwards that run each distinct prompt of their rows once (lm/shared_prompts.py), where the
        models and the engine allow it; the log says why not where they do not."""
        unwrapped = self.unwrapped
        if unwrapped.value_head is not None:
            return None  # (algorithms with a critic sample one response per prompt)
        models = [m for m in (unwrapped.policy, self.reference) if m is not None]
        sharing = shared_prompts.PromptSharing(models, agreement(self.accelerator))
        if sharing.why_not:
            log.info("share_prompt_prefix: off (%s); every row runs its prompt", sharing.why_not)
            return None
        return sharing

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    @property
    def nonfinite_skips(self) -> int:
        return self.updater.nonfinite_skips

    @nonfinite_skips.setter
    def nonfinite_skips(self, value: int) -> None:
        self.updater.nonfinite_skips = value

    @property
    def fp16_overflow_skips(self) -> int:
        return self.updater.fp16_overflow_skips

    # ------------------------------------------------------------------ rollout

    def encode(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.config.data
        tools = self.environment.prompt_tools if self.environment is not None else None  # protocol chat's schemas
        ids, _ = encode_prompts(prompts, self.tokenizer, d.max_prompt_length, d.long_prompts, tools)
        q, m = left_pad(ids, self.tokenizer.pad_token_id)
        return q.to(self.accelerator.device), m.to(self.accelerator.device)

    @torch.no_grad()
    def generate(self, prompts: list | None = None, query_ids=None, query_mask=None,
                 num_generations: int | None = None) -> Experience:
        """Sample `num_generations` (default: the trainer's) responses per query (text prompts, or
        already-encoded left-padded ids); a query's responses are consecutive rows, with its index
        in `group_ids`."""
        if query_ids is None:
            query_ids, query_mask = self.encode(prompts)
        group_ids = torch.arange(len(query_ids), device=query_ids.device)
        n = num_generations or self.num_generations
        if n > 1:
            query_ids, query_mask, group_ids = (x.repeat_interleave(n, 0) for x in (query_ids, query_mask, group_ids))
        self.model.eval()
        if self.environment is not None:
            exp = self.environment.rollout(query_ids, query_mask)
        else:
            responses, logprobs, values = self.sampler.sample(query_ids, query_mask, self.forward_batch_size,
                                                              self.tokenizer.pad_token_id)
            exp = self.rollout_from(query_ids, query_mask, responses, logprobs, values)
        exp.group_ids = group_ids
        return exp

    def rollout_from(self, query_ids, query_mask, response_ids, logprobs=None, values=None,
                     response_lengths: torch.Tensor | None = None) -> Experience:
        """An experience from encoded queries (B, P) left-padded and responses (B, T) right-padded:
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
        return Experience(
            query_ids, query_mask, response_ids, mask, stopped,
            prompts=decode(query_ids, skip_special_tokens=True),
            responses=decode(response_ids.masked_fill(~mask, pad), skip_special_tokens=True),
            logprobs=logprobs, values=values,
        )

    def rollout_from_lists(self, queries: list[torch.Tensor], responses: list[torch.Tensor]) -> Experience:
        """An experience from token lists as TRL's `step` took them: 1-D query and response tensors
        of any lengths (no padding, responses as sampled; they are still cut after the stop token)."""
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

    def _inputs(self, r: Experience, idx, keep_logits: bool) -> tuple[dict, tuple[int, int, bool]]:
        """Model inputs for rows `idx`, trimmed to the padding those rows need; (inputs, (P', T', kept)),
        kept: the model returns logits from position P'-1 on (the response's), not for every column."""
        q, qm, resp, rm = trim_padding(r.query_ids[idx], r.query_mask[idx], r.response_ids[idx], r.response_mask[idx])
        inputs = model_inputs(self.unwrapped.policy.config, q, qm, resp, rm)
        P, T = q.shape[1], resp.shape[1]
        shared = None if self.prompt_sharing is None or r.group_ids is None else self.prompt_sharing.plan(
            r.group_ids[idx], P, P + T)
        if shared is not None:  # each distinct prompt once (lm/shared_prompts.py)
            inputs[shared_prompts.SHARED] = shared
            return inputs, (P, T, True)
        if keep_logits:  # logits at positions P'-1 .. P'+T'-1 only: the last T'+1 (the very last is unused)
            inputs["logits_to_keep"] = T + 1
        return inputs, (P, T, keep_logits)

    def _read(self, model, forward, r: Experience, idx, columns: tuple[int, int, bool],
              entropy: str = "none") -> tuple[TokenStats, object]:
        """TokenStats (b, T') of the response tokens of rows `idx` from `forward()` -> (logits, other),
        a forward through the HF model `model` (lm/head.py: log-probs and entropy chunked through its
        LM head, without (b, T', V) logits where the model allows)."""
        P, T, kept = columns

        def response_columns(x: torch.Tensor) -> torch.Tensor:  # (b, k, ...) -> (b, T', ...)
            return x[:, :T] if kept else response_slice(x, P, T, self.encoder_decoder)

        tokens = r.response_ids[idx, :T]
        with self.accelerator.autocast():  # the chunked LM head runs after the (prepared) model's forward
            return read_tokens(model, forward, response_columns, tokens, self.temperature, entropy)

    def _policy_forward(self, r: Experience, idx, entropy: str = "stat") -> tuple[TokenStats, torch.Tensor | None]:
        """TokenStats (b, T') and values (b, T') (None without a critic) in ONE forward of the policy
        with its value head, over rows `idx` trimmed to their longest query and response (T' <= T)."""
        inputs, columns = self._inputs(r, idx, self.policy_keeps_logits)
        stats, values = self._read(self.unwrapped.policy, lambda: self.model(**inputs), r, idx, columns, entropy)
        return stats, None if values is None else response_slice(values, *columns[:2], self.encoder_decoder)

    def reference_logprobs(self, r: Experience, idx) -> torch.Tensor:
        """Reference log-probs (b, T'), trimmed as in `_policy_forward`: a frozen copy, or the LoRA
        policy as its reference (its frozen starting adapter, or its adapter disabled: models/policy.py)."""
        inputs, columns = self._inputs(r, idx, self.reference_keeps_logits)
        model = self.reference if self.reference is not None else self.unwrapped.policy

        def forward():  # (a fresh context each call: read_tokens may run the forward twice)
            if self.reference is not None:
                return shared_prompts.logits(model, inputs), None
            # the policy called past its wrapper: under FSDP the wrapper's own parameters are gathered here
            with reference_mode(model), root_gathered(self.model):
                return shared_prompts.logits(model, inputs), None

        stats, _ = self._read(model, forward, r, idx, columns)
        return stats.logprobs

    @torch.no_grad()
    def evaluate(self, r: Experience) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Old log-probs, values and reference log-probs (each (B, T); values None without a critic,
        reference log-probs None when the algorithm uses no reference), in micro-batches, no grad.
        Old log-probs and values that generation recorded are used as they are."""
        self.model.eval()
        width = r.response_ids.shape[1]
        critic = self.algorithm.uses_critic
        passes, order = self._passes(r)

        def full_width(x: torch.Tensor) -> torch.Tensor:  # (b, T') -> (b, T): zeros past the pass's longest row
            return torch.nn.functional.pad(x, (0, width - x.shape[1]))

        def joined(parts: list[torch.Tensor]) -> torch.Tensor:  # the passes' (b, T) -> (B, T) in the rollout's order
            out = torch.cat(parts)
            if order is None:
                return out
            rows = torch.empty_like(out)
            rows[order] = out
            return rows

        ref_logprobs = None
        if self.algorithm.uses_reference:  # (under the run's autocast: _read)
            ref_logprobs = joined([full_width(self.reference_logprobs(r, idx)) for idx in passes])
        if r.logprobs is not None and (r.values is not None or not critic):
            return r.logprobs, r.values, ref_logprobs

        logprobs, values = [], []
        for idx in passes:
            stats, v = self._policy_forward(r, idx, entropy="none")
            logprobs.append(full_width(stats.logprobs))
            if critic:
                values.append(full_width(v.float()))
        return joined(logprobs), (joined(values) if critic else None), ref_logprobs

    def _passes(self, r: Experience) -> tuple[list, torch.Tensor | None]:
        """The rows of each no-grad pass over rollout `r` (forward_batch_size at a time), and the order they
        take the rollout's rows in (None: as they are). Where it takes more than one pass, longest rows
        first (Experience.longest_first): a pass is trimmed to its longest prompt and response
        (lm/forward.py trim_padding), so fewer of its columns are padding."""
        total, rows = len(r), self.forward_batch_size
        if total <= rows:
            return [slice(0, total)], None
        order = r.longest_first(torch.arange(total, device=r.query_ids.device))
        return list(torch.split(order, rows)), order

    # ------------------------------------------------------------------ the step

    def step(self, rollout: Experience | list[torch.Tensor], *args) -> dict[str, float]:
        """One update; returns the iteration's statistics. Either

            step(experience, scores)            an Experience from `generate` / `rollout_from`, scores (B,)
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

    def _step(self, exp: Experience, scores: torch.Tensor) -> dict[str, float]:
        started = time.perf_counter()
        mask = exp.loss_mask

        # 1. Old log-probs, values, reference log-probs
        exp.old_logprobs, values, exp.ref_logprobs = self.evaluate(exp)
        exp.values = None if values is None else values.masked_fill(~mask, 0.0)

        # 2. Scores -> advantages (and returns), by the algorithm
        exp.scores = scores.to(self.accelerator.device).float()
        stats = self.algorithm.prepare(exp, self)
        self._require_finite(mask, scores=exp.scores, values=exp.values, logprobs=exp.old_logprobs,
                             reference_logprobs=exp.ref_logprobs, advantages=exp.advantages)

        # 3. The update: epochs x mini-batches of micro-batches (online/updater.py)
        update_stats = self.updater.update(exp, self.algorithm, self._policy_forward)
        self.sampler.weights_updated()  # a sampler with its own copy of the weights re-reads them before sampling

        # 4. After the update (adaptive KL), statistics
        self.algorithm.finish(exp, self, stats)
        self.episode += self.episodes(exp)
        stats.update({
            "lr": self.scheduler.get_last_lr()[0],
            "episode": self.episode,
            "time/update_s": time.perf_counter() - started,
            **update_stats,
        })
        return stats

    def _require_finite(self, mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
        """Raise NonFiniteBatch naming what holds NaN/inf (at valid tokens) on any process; one all-reduce."""
        tensors = {k: v for k, v in tensors.items() if v is not None}
        flags = torch.stack([
            (~torch.isfinite(t.float()) & (mask if t.dim() == 2 else True)).any().float() for t in tensors.values()
        ]).to(self.accelerator.device)  # (len(tensors),)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, "sum")
        bad = [name.replace("_", " ") for name, flag in zip(tensors, flags.tolist(), strict=True) if flag > 0]
        if bad:
            hint = " (check the reward model or function)" if bad[0] == "scores" else ""
            raise NonFiniteBatch(f"NaN/inf in the rollout's {', '.join(bad)}{hint}")

    # helpers the algorithms use (their `ctx`)

    def reduced(self, means: dict[str, torch.Tensor], totals: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Statistics of every process in ONE all-reduce and one host sync (not one per statistic):
        `means` -> each tensor's mean over this process's rows, averaged over processes; `totals` ->
        each tensor's sum over every process."""
        totals = totals or {}
        local = torch.stack([v.float().mean() for v in means.values()] + [v.float().sum() for v in totals.values()])
        values = self.accelerator.reduce(local.to(self.accelerator.device), "mean").tolist()
        processes = self.accelerator.num_processes
        return {**dict(zip(means, values[: len(means)], strict=True)),
                **{k: v * processes for k, v in zip(totals, values[len(means):], strict=True)}}

    def episodes(self, exp: Experience) -> int:
        return len(exp) * self.accelerator.num_processes

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        state = {"episode": self.episode, **self.algorithm.state_dict(), "nonfinite_skips": self.nonfinite_skips,
                 "fp16_overflow_skips": self.fp16_overflow_skips}
        if self.alarms is not None:
            state["alarms"] = self.alarms.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.episode = state["episode"]
        self.algorithm.load_state_dict(state)
        self.updater.nonfinite_skips = state.get("nonfinite_skips", 0)
        self.updater.fp16_overflow_skips = state.get("fp16_overflow_skips", 0)
        if self.alarms is not None and "alarms" in state:  # (checkpoints from before the alarms start them afresh)
            self.alarms.load_state_dict(state["alarms"])


__all__ = ["NonFiniteBatch", "OnlineTrainer", "rollout_rows"]
