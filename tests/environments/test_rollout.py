"""The multi-turn rollout on a scripted policy: the exact token layout, loss mask, turn counts and stop
reasons; tool errors, timeouts, unknown tools and overlong results; and a trainer step on an episode
(log-probs of the padded batch equal a fresh forward over the whole episode, ratio 1 at the first
mini-batch, nothing trained on the inserted tokens)."""

import time

import pytest
import torch

from rlhf_cli.environments.protocol import TextProtocol
from rlhf_cli.environments.rollout import TextEnvironment, episode_stats
from rlhf_cli.environments.tools import Tool
from rlhf_cli.models.loading import load_tokenizer

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-gpt2", padding_side="left")


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


class ScriptedPolicy(torch.nn.Module):
    """A causal "model" whose turns are scripted per prompt: `scripts[prompt]` is the list of texts it
    writes, one per turn (the turn is told by how many results the context holds). Like `generate`,
    it returns the new tokens of each row, padded after the row's stop, at most `max_new_tokens`."""

    def __init__(self, tok, scripts: dict[str, list[str]], protocol: TextProtocol):
        super().__init__()
        self.tok, self.scripts, self.protocol, self.batches = tok, scripts, protocol, []
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device to be on
        self.config = type("Config", (), {"is_encoder_decoder": False})()

    def generate(self, input_ids, attention_mask, max_new_tokens, stop_strings, tokenizer):
        self.batches.append(len(input_ids))
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            context = self.tok.decode(ids[mask.bool()], skip_special_tokens=False)
            prompt = next(p for p in self.scripts if context.startswith(p))
            turn = context.count(self.protocol.result_end)
            text = self.scripts[prompt][min(turn, len(self.scripts[prompt]) - 1)]
            rows.append(enc(self.tok, text)[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def tools(**extra) -> dict[str, Tool]:
    from rlhf_cli.environments.calculator import calculate

    found = {"calculator": Tool("calculator", calculate, "exact arithmetic")}
    found.update({name: Tool(name, fn, name) for name, fn in extra.items()})
    return found


def environment(tok, scripts, **kw) -> tuple[TextEnvironment, ScriptedPolicy]:
    policy = ScriptedPolicy(tok, scripts, kw.get("protocol") or TextProtocol())
    return TextEnvironment(policy, tok, kw.pop("tools", None) or tools(), **kw), policy


def test_a_call_its_result_and_the_answer_laid_out_token_by_token(tok):
    env, policy = environment(tok, {"Q:": [" <call>calculator 2+3</call>", " 5" + EOS]})
    exp = env.run(["Q:"])
    call, result, answer = enc(tok, " <call>calculator 2+3</call>"), enc(tok, "<result>5</result>"), enc(tok, " 5")
    want = call + result + answer + [tok.eos_token_id]
    assert exp.response_ids[0].tolist() == want
    assert exp.loss_mask[0].tolist() == [True] * len(call) + [False] * len(result) + [True] * (len(answer) + 1)
    assert exp.response_mask[0].all() and exp.stopped.tolist() == [True]
    episode = exp.episodes[0]
    assert (episode.turns, episode.stop_reason) == (2, "eos")
    assert [(c.name, c.argument, c.result, c.status) for c in episode.calls] == [("calculator", "2+3", "5", "ok")]
    assert episode.text == " <call>calculator 2+3</call><result>5</result> 5" and episode.answer == " 5"
    assert exp.responses == [episode.text] and exp.prompts == ["Q:"]
    assert policy.batches == [1, 1]


def test_episodes_advance_together_and_leave_the_batch_when_done(tok):
    scripts = {
        "A:": [" 1" + EOS],  # answers at once
        "B:": [" <call>calculator 1+1</call>", " 2" + EOS],
        "C:": [" <call>calculator 2*3</call>", " <call>calculator 6+1</call>", " 7" + EOS],
    }
    env, policy = environment(tok, scripts)
    exp = env.run(list(scripts))
    assert policy.batches == [3, 2, 1]  # one generate call per turn over the episodes still running
    assert [e.turns for e in exp.episodes] == [1, 2, 3]
    assert [len(e.calls) for e in exp.episodes] == [0, 1, 2]
    assert [e.answer for e in exp.episodes] == [" 1", " 2", " 7"]
    lengths = exp.response_mask.sum(1).tolist()
    assert lengths == [len(enc(tok, e.text)) + 1 for e in exp.episodes]  # + the eos
    stats = episode_stats(exp.episodes)
    assert stats["env/turns"] == pytest.approx(2.0) and stats["env/tool_calls"] == pytest.approx(1.0)
    assert stats["env/tool_call_rate"] == pytest.approx(2 / 3) and stats["env/stop_eos"] == 1.0


def test_max_turns_ends_an_episode_that_keeps_calling(tok):
    env, _ = environment(tok, {"Q:": [" <call>calculator 1+1</call>"]}, max_turns=3)
    exp = env.run(["Q:"])
    episode = exp.episodes[0]
    assert (episode.turns, len(episode.calls), episode.stop_reason) == (3, 3, "max_turns")
    assert not exp.stopped[0] and not exp.loss_mask[0, -1]  # it ends with a result the model did not write


def test_the_length_budget_cuts_the_episode_mid_turn(tok):
    env, _ = environment(tok, {"Q:": [" <call>calculator 1+1</call>", " the answer is two" + EOS]}, max_length=28)
    exp = env.run(["Q:"])
    assert exp.response_mask.sum().item() == 28
    assert exp.episodes[0].stop_reason == "length" and not exp.stopped[0]


def test_tool_errors_timeouts_unknown_tools_and_overlong_results_are_answers(tok):
    def slow(argument: str) -> str:
        time.sleep(2.0)
        return "late"

    scripts = {
        "E:": [" <call>calculator 1/0</call>", " no" + EOS],
        "U:": [" <call>search cats</call>", " no" + EOS],
        "S:": [" <call>slow x</call>", " no" + EOS],
        "L:": [" <call>long x</call>", " ok" + EOS],
        "N:": [" <call>2+2</call>", " no" + EOS],
    }
    env, _ = environment(tok, scripts, tools=tools(slow=slow, long=lambda a: "x" * 500), tool_timeout_s=0.3,
                         max_tool_response=30)
    started = time.perf_counter()
    exp = env.run(list(scripts))
    assert time.perf_counter() - started < 1.5  # the hung tool is not waited for
    calls = {e.prompt: e.calls[0] for e in exp.episodes}
    assert (calls["E:"].status, calls["E:"].result) == ("error", "error: division by zero")
    assert calls["U:"].status == "unknown_tool" and "known tools: calculator, slow, long" in calls["U:"].result
    assert calls["S:"].status == "timeout" and "timed out" in calls["S:"].result
    assert (calls["L:"].status, calls["L:"].result) == ("truncated", "x" * 30)
    assert calls["N:"].status == "unknown_tool"  # a call without a tool name
    assert all(e.stop_reason == "eos" for e in exp.episodes)  # every episode went on after its tool's failure
    stats = episode_stats(exp.episodes)
    assert stats["env/tool_error_rate"] == pytest.approx(4 / 5) and stats["env/tool_timeouts"] == 1.0


def test_the_reward_function_receives_every_episode(tok):
    seen = {}

    def reward(prompts, responses, episodes):
        seen["episodes"] = episodes
        return [float(e.answer.strip() == "5") for e in episodes]

    env, _ = environment(tok, {"Q:": [" <call>calculator 2+3</call>", " 5" + EOS], "R:": [" 4" + EOS]},
                         reward_fn=reward)
    exp = env.run(["Q:", "R:"])
    assert exp.scores.tolist() == [1.0, 0.0]
    assert [len(e.calls) for e in seen["episodes"]] == [1, 0]


def test_custom_markers(tok):
    protocol = TextProtocol(call_start="[[", call_end="]]", result_start="=> ", result_end=";")
    env, _ = environment(tok, {"Q:": [" [[calculator: 6*7]]", " 42" + EOS]}, protocol=protocol)
    episode = env.run(["Q:"]).episodes[0]
    assert episode.text == " [[calculator: 6*7]]=> 42; 42" and episode.calls[0].argument == "6*7"


def test_a_trainer_step_on_episodes_trains_only_the_models_tokens(tok, tmp_path):
    """Rows of different prompt and episode lengths, with inserted results: the log-probs the trainer
    computes for the padded batch equal each episode's own unpadded forward, the first mini-batch's
    ratio is 1, and the advantages at the inserted tokens are 0 (GAE carries across them)."""
    from environments.episode_checks import check_first_update
    from ppo.test_performance_equivalence import make_trainer

    scripts = {"Film one:": [" <call>calculator 2+3</call>", " five" + EOS],
               "A much longer film prompt:": [" <call>calculator 7*6</call>", " <call>calculator 42-1</call>", " ok" + EOS],
               "B:": [" great" + EOS]}
    env, _ = environment(tok, scripts)
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2", num_mini_batches=1, num_ppo_epochs=1)
    q, m = trainer.encode(list(scripts))
    exp = env.rollout(q, m)
    check_first_update(trainer, exp)
