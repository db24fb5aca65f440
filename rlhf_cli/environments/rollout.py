"""Multi-turn episodes with tools in the loop: the model writes, calls a tool, reads its result, goes on.

Every episode of the batch advances turn by turn together. A turn is ONE `generate` call over the
episodes still running (left-padded: prompt + everything so far), stopping each row at the stop
token (eos) or, with the text protocol, at its call marker. The turn's calls (the protocol reads them:
protocol.py, TextProtocol or ChatProtocol) are run (ToolRunner: concurrently, each under a timeout,
errors as text); what the protocol writes back for them is appended as tokens. An episode ends when it
stops (eos, without a call under the chat protocol), when it has used `max_turns` turns, or when its
response reaches `max_length` tokens.

Tokens in, tokens out: what the model wrote is kept as the ids it sampled, never re-tokenised from
text; a result (under the chat protocol: the chat template's tool block) is tokenised on its own and
appended. The Experience's `loss_mask` is True only at
the model's tokens, so the policy loss, KL, entropy, value loss and length statistics cover them
alone, and GAE carries across the inserted spans without rewarding them (ppo/advantages.py). Log-probs
are not recorded while sampling (turns are separate generate calls); the trainer takes them, and the
values, from one forward over each whole episode, so the ratio of the first update is exactly 1.

Shapes: B episodes, P prompt tokens (left-padded), T response tokens (right-padded).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rlhf_cli.environments.protocol import ChatProtocol, TextProtocol
from rlhf_cli.environments.tools import Tool, ToolRunner, load_tools
from rlhf_cli.errors import UserError
from rlhf_cli.lm.generation import encode_prompts, left_pad
from rlhf_cli.online.experience import Experience

STOP_REASONS = ("eos", "length", "max_turns")
FAILED = ("error", "timeout", "unknown_tool")  # tool statuses counted as errors (a truncated answer is an answer)


@dataclass
class ToolCall:
    name: str
    argument: str | dict  # the text protocol's argument string, or the chat protocol's arguments
    result: str  # what the model read back (inside the result markers, or as a tool message)
    status: str  # ok, error, timeout, truncated, unknown_tool (environments/tools.py)
    seconds: float


@dataclass
class Episode:
    """One episode, as reward functions receive it (the `episodes` keyword, one per response)."""

    prompt: str
    text: str = ""  # everything after the prompt: the model's text and the inserted results
    answer: str = ""  # what the model wrote after the last result (chat: the last assistant turn's content)
    calls: list[ToolCall] = field(default_factory=list)
    turns: int = 0
    stop_reason: str = ""  # one of STOP_REASONS


class TextEnvironment:
    """`TextEnvironment(model, tokenizer, tools, reward_fn).run(prompts)` -> Experience (with `episodes`
    and, given a reward function, `scores`) for `OnlineTrainer.step` / `PPOTrainer.step`.

    `model` is a causal LM whose generation config holds the sampling settings (the trainer
    installs them: lm/generation.py `install_sampling_config`); `tools` a dict name -> Tool
    (environments/tools.py `load_tools`) or a ToolRunner; `protocol` a TextProtocol (the default) or a
    ChatProtocol; `reward_fn(prompts, responses, episodes=...)` returns one float per episode.
    `response_length`: the most tokens the model writes in one turn; `max_length`: the most response
    tokens of an episode, results included."""

    def __init__(self, model, tokenizer, tools: dict[str, Tool] | ToolRunner, reward_fn: Callable | None = None,
                 protocol: TextProtocol | ChatProtocol | None = None, max_turns: int = 4, max_length: int = 256,
                 response_length: int = 64, tool_timeout_s: float = 5.0, max_tool_response: int = 200,
                 tool_workers: int = 16, stop_id: int | None = None, autocast: Callable = contextlib.nullcontext):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("text environments need a causal LM: an encoder-decoder cannot append tool results "
                             "to the sequence it decodes")
        self.model, self.tokenizer, self.reward_fn = model, tokenizer, reward_fn
        self.runner = (tools if isinstance(tools, ToolRunner) else
                       ToolRunner(tools, tool_timeout_s, max_tool_response, max_workers=tool_workers))
        self.protocol = protocol or TextProtocol()
        self.max_turns, self.max_length, self.response_length = max_turns, max_length, response_length
        self.stop_id = tokenizer.eos_token_id if stop_id is None else stop_id
        self.autocast = autocast
        self.timings = {"generate_s": 0.0, "tools_s": 0.0}  # of the last run

    @property
    def prompt_tools(self) -> list[dict] | None:
        """The tool schemas prompts are rendered with (`apply_chat_template(tools=...)`): the chat protocol's."""
        return self.protocol.tools

    def run(self, prompts: Sequence) -> Experience:
        """Episodes for prompts as the online stages encode them: text without special tokens, or lists of
        messages through the chat template (with the tool schemas under the chat protocol)."""
        ids, _ = encode_prompts(list(prompts), self.tokenizer, sys.maxsize, "reject", tools=self.prompt_tools)
        query_ids, query_mask = left_pad(ids, self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        exp = self.rollout(query_ids.to(device), query_mask.to(device))
        if self.reward_fn is not None:
            scores = self.reward_fn(exp.prompts, exp.responses, episodes=exp.episodes)
            exp.scores = torch.as_tensor([float(s) for s in scores], dtype=torch.float32)
        return exp

    @torch.no_grad()
    def rollout(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> Experience:
        """(B, P) left-padded queries -> the Experience of B episodes."""
        self.timings = {"generate_s": 0.0, "tools_s": 0.0}
        prompts = [row[mask.bool()].tolist() for row, mask in zip(query_ids, query_mask, strict=True)]
        responses: list[list[int]] = [[] for _ in prompts]
        written: list[list[bool]] = [[] for _ in prompts]  # True at the tokens the model sampled
        answered = [0] * len(prompts)  # where each response's last inserted span ends
        episodes = [Episode(prompt=text) for text in self.tokenizer.batch_decode(query_ids, skip_special_tokens=True)]
        active = list(range(len(prompts)))
        while active:
            # 1. One generate call for every running episode
            rooms = [self.max_length - len(responses[i]) for i in active]
            started = time.perf_counter()
            new = self._generate([prompts[i] + responses[i] for i in active], min(self.response_length, max(rooms)))
            self.timings["generate_s"] += time.perf_counter() - started
            # 2. Keep each row's tokens up to its stop; collect the turn's calls
            calls, callers, still = [], [], []  # callers[k]: (episode, its calls) of this turn
            for i, tokens, room in zip(active, new, rooms, strict=True):
                keep, why = self._turn_end(tokens)
                if keep > room:
                    keep, why = room, "length"
                responses[i] += tokens[:keep]
                written[i] += [True] * keep
                episodes[i].turns += 1
                found = []
                if why != "length":  # read the turn's text, without its stop token
                    found = self.protocol.calls(self.tokenizer.decode(tokens[: keep - 1 if why == "eos" else keep]), why)
                if found and len(responses[i]) < self.max_length:
                    callers.append((i, len(found)))
                    calls += found
                else:
                    episodes[i].stop_reason = "eos" if why == "eos" and not found else "length"
            # 3. Run the calls; append what the protocol writes back for them (not the model's tokens:
            #    loss mask False)
            started = time.perf_counter()
            results = self.runner.run(calls) if calls else []
            self.timings["tools_s"] += time.perf_counter() - started
            at = 0
            for i, count in callers:
                mine, answers, at = calls[at : at + count], results[at : at + count], at + count
                for (name, argument), result in zip(mine, answers, strict=True):
                    episodes[i].calls.append(ToolCall(name, argument, result.text, result.status, result.seconds))
                text = self.protocol.inserted_text(mine, [result.text for result in answers])
                inserted = self.tokenizer.encode(text, add_special_tokens=False)
                room = self.max_length - len(responses[i])
                responses[i] += inserted[:room]
                written[i] += [False] * min(len(inserted), room)
                answered[i] = len(responses[i])
                if len(inserted) >= room:
                    episodes[i].stop_reason = "length"
                elif episodes[i].turns >= self.max_turns:
                    episodes[i].stop_reason = "max_turns"
                else:
                    still.append(i)
            active = still
        return self._experience(query_ids, query_mask, responses, written, episodes, answered)

    def _generate(self, contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Left-padded contexts -> each row's new tokens (a row that stopped early is padded after its
        stop; `_turn_end` finds where each turn really ends)."""
        ids, mask = left_pad(contexts, self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        with self.autocast():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=max_new_tokens, stop_strings=list(self.protocol.stop_strings) or None,
                                      tokenizer=self.tokenizer)
        return out[:, ids.shape[1]:].tolist()

    def _turn_end(self, tokens: list[int]) -> tuple[int, str]:
        """(tokens the turn keeps, why it ended): through the stop token ("eos"), through the token that
        completes the call marker ("call", text protocol), or all of them ("length": the turn's budget ran out)."""
        if not self.protocol.stop_strings:  # the chat protocol: the stop token alone ends a turn
            return (tokens.index(self.stop_id) + 1, "eos") if self.stop_id in tokens else (len(tokens), "length")
        text = ""
        for k, (token, piece) in enumerate(zip(tokens, self.tokenizer.batch_decode([[t] for t in tokens]), strict=True)):
            if token == self.stop_id:
                return k + 1, "eos"
            text += piece
            if self.protocol.ends_with_call(text):
                return k + 1, "call"
        return len(tokens), "length"

    def _experience(self, query_ids, query_mask, responses, written, episodes, answered) -> Experience:
        pad, device = self.tokenizer.pad_token_id, query_ids.device
        width = max(len(r) for r in responses)
        response_ids = torch.full((len(responses), width), pad, dtype=torch.long)
        response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
        loss_mask = torch.zeros((len(responses), width), dtype=torch.bool)
        for i, (tokens, mine) in enumerate(zip(responses, written, strict=True)):
            response_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            response_mask[i, : len(tokens)] = True
            loss_mask[i, : len(tokens)] = torch.tensor(mine, dtype=torch.bool)
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in responses]
        # the answer: what the model wrote after the last inserted span (the whole text without one)
        answers = self.tokenizer.batch_decode([r[at:] for r, at in zip(responses, answered, strict=True)],
                                              skip_special_tokens=True)
        for episode, text, answer in zip(episodes, texts, answers, strict=True):
            episode.text, episode.answer = text, answer
        stopped = torch.tensor([e.stop_reason == "eos" for e in episodes], dtype=torch.bool)
        exp = Experience(query_ids, query_mask, response_ids.to(device), response_mask.to(device), stopped.to(device),
                         prompts=[e.prompt for e in episodes], responses=texts, loss_mask=loss_mask.to(device))
        exp.episodes = episodes
        return exp


def episode_stats(episodes: Sequence[Episode]) -> dict[str, float]:
    """Per-batch figures of the environment (means over this process's episodes): turns, tool calls per
    episode, the share of episodes that called a tool, the share of calls that failed, why episodes ended."""
    calls = [call for e in episodes for call in e.calls]
    n = max(len(episodes), 1)
    stats = {
        "env/turns": sum(e.turns for e in episodes) / n,
        "env/tool_calls": len(calls) / n,
        "env/tool_call_rate": sum(bool(e.calls) for e in episodes) / n,
        "env/tool_error_rate": sum(c.status in FAILED for c in calls) / max(len(calls), 1),
        "env/tool_timeouts": float(sum(c.status == "timeout" for c in calls)),
    }
    stats.update({f"env/stop_{reason}": sum(e.stop_reason == reason for e in episodes) / n for reason in STOP_REASONS})
    return stats


def environment_tools(env) -> dict[str, Tool]:
    """The tools of an `environment` section, loaded now (a bad spec, or under protocol chat a tool without
    type hints or an `Args:` docstring, is a UserError naming `environment.tools[i]`)."""
    specs = [{k: v for k, v in vars(tool).items() if v is not None} for tool in env.tools]
    return load_tools(specs, schemas=env.protocol == "chat")


def prompt_tools(env, tools: dict[str, Tool] | None) -> list[dict] | None:
    """The tool schemas prompts are rendered with: those of `tools` under protocol chat, else None."""
    if tools is None or env.protocol != "chat":
        return None
    return [tool.schema for tool in tools.values()]


def environment_from_config(env, generation, model, tokenizer, stop_id: int | None, model_name: str,
                            autocast: Callable = contextlib.nullcontext,
                            tools: dict[str, Tool] | None = None) -> TextEnvironment:
    """The TextEnvironment of an `environment` section (its tools loaded now unless given: a bad spec is a
    UserError naming `environment.tools[i]`); `generation.response_length` bounds a turn."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError(f"environment.tools: {model_name} is an encoder-decoder; a text environment appends tool "
                        "results to the sequence the model writes, which needs a causal LM.")
    tools = environment_tools(env) if tools is None else tools
    if env.protocol == "chat":
        protocol = ChatProtocol(tokenizer, prompt_tools(env, tools), stop_id, env.tool_call_start, env.tool_call_end,
                                model_name)
    else:
        protocol = TextProtocol(env.call_start, env.call_end, env.result_start, env.result_end)
    return TextEnvironment(model, tokenizer, tools, protocol=protocol, max_turns=env.max_turns,
                           max_length=env.max_length, response_length=generation.response_length,
                           tool_timeout_s=env.tool_timeout_s, max_tool_response=env.max_tool_response,
                           tool_workers=env.tool_workers, stop_id=stop_id, autocast=autocast)
