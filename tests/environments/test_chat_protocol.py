"""The chat protocol (`environment.protocol: chat`): calls parsed from the assistant's turn, results
inserted through the chat template (the built-in one and a Qwen 2.5-style ChatML one, chat_templates.py), the
multi-turn rollout on a scripted policy (token layout, loss mask, turns, stop reasons, tool errors the
model reads), a trainer step on chat episodes, typed tools and their JSON schemas, and the errors a
template or a tool that cannot serve the protocol raises when the environment is made."""

import json

import pytest
import torch
from chat_templates import MISTRAL, PHI3, QWEN_TOOLS, with_chat_tokens

from rlhf_cli.environments.calculator import calculate
from rlhf_cli.environments.protocol import ChatProtocol
from rlhf_cli.environments.rollout import TextEnvironment, episode_stats
from rlhf_cli.environments.tools import Tool, ToolRunner, load_tools, tool_schema
from rlhf_cli.errors import UserError
from rlhf_cli.lm.generation import encode_prompts, left_pad
from rlhf_cli.models.loading import load_tokenizer

EOS = "<|endoftext|>"
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
QUESTION = "What is 2+3?"


@pytest.fixture(scope="module")
def builtin_tok():
    return load_tokenizer("builtin:tiny-gpt2", padding_side="left")


@pytest.fixture(scope="module")
def qwen_tok():
    tok = with_chat_tokens(load_tokenizer("builtin:tiny-gpt2", padding_side="left"))
    tok.chat_template = QWEN_TOOLS
    return tok


@pytest.fixture(scope="module")
def schema():
    return tool_schema(Tool("calculator", calculate))


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def call(expression: str, name: str = "calculator") -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'


def tool_call_message(expression: str) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]}


# ---------------------------------------------------------------- parsing


@pytest.fixture(scope="module")
def protocol(builtin_tok, schema):
    return ChatProtocol(builtin_tok, [schema])


def test_one_call(protocol):
    assert protocol.parse_calls("Let me compute.\n" + CALL) == [("calculator", {"expression": "2+3"})]
    assert protocol.calls(CALL, "eos") == [("calculator", {"expression": "2+3"})]


def test_two_calls_in_one_turn_in_order(protocol):
    text = call("2+3") + "\n" + call("4*5", name="other")
    assert protocol.parse_calls(text) == [("calculator", {"expression": "2+3"}), ("other", {"expression": "4*5"})]


def test_parameters_for_arguments_and_arguments_as_a_json_string(protocol):
    assert protocol.parse_calls('<tool_call>{"name": "calculator", "parameters": {"expression": "1+1"}}</tool_call>') == [
        ("calculator", {"expression": "1+1"})]
    as_string = json.dumps({"name": "calculator", "arguments": json.dumps({"expression": "7"})})
    assert protocol.parse_calls(f"<tool_call>{as_string}</tool_call>") == [("calculator", {"expression": "7"})]
    assert protocol.parse_calls('<tool_call>{"name": "calculator"}</tool_call>') == [("calculator", {})]


@pytest.mark.parametrize("body", ['{"name": "calculator", "arguments": {"expression": "2+3"}',  # unclosed brace
                                  "calculator 2+3", '["calculator"]'])
def test_malformed_json_is_a_call_without_a_name(protocol, body):
    assert protocol.parse_calls(f"<tool_call>\n{body}\n</tool_call>") == [("", body)]


@pytest.mark.parametrize("body", ['{"arguments": {"expression": "2+3"}}', '{"name": "", "arguments": {}}',
                                  '{"name": 7, "arguments": {}}'])
def test_a_call_without_a_name_is_a_call_named_empty(protocol, body):
    assert protocol.parse_calls(f"<tool_call>{body}</tool_call>") == [("", body)]


def test_no_call_and_a_turn_cut_by_the_length_budget(protocol):
    assert protocol.calls("The answer is 5.", "eos") == []
    assert protocol.calls(CALL, "length") == []  # a turn cut short asks for nothing
    # a call the model did not close before its stop token is still read
    assert protocol.parse_calls(CALL.removesuffix("\n</tool_call>")) == [("calculator", {"expression": "2+3"})]


def test_custom_markers(builtin_tok, schema):
    protocol = ChatProtocol(builtin_tok, [schema], call_start="<call>", call_end="</call>")
    assert protocol.parse_calls('<call>{"name": "calculator", "arguments": {"expression": "1"}}</call>') == [
        ("calculator", {"expression": "1"})]
    assert protocol.parse_calls(CALL) == []


# ---------------------------------------------------------------- the template's tool block


def test_builtin_template_block_is_a_user_turn_of_tool_responses_then_the_assistant_opening(protocol):
    assert protocol.closing == ""  # the template writes nothing after the eos the model samples
    assert protocol.inserted_text([("calculator", {})], ["5"]) == (
        "<|user|>\n<tool_response>\n5\n</tool_response>\n<|assistant|>\n")
    assert protocol.inserted_text([("calculator", {}), ("", "x")], ["5", "error: unknown tool ''"]) == (
        "<|user|>\n<tool_response>\n5\n</tool_response>\n"
        "<|user|>\n<tool_response>\nerror: unknown tool ''\n</tool_response>\n<|assistant|>\n")


def test_chatml_block_adds_the_newline_after_the_sampled_end_of_turn(qwen_tok, schema):
    protocol = ChatProtocol(qwen_tok, [schema], stop_id=qwen_tok.convert_tokens_to_ids("<|im_end|>"))
    assert protocol.closing == "\n"  # the template writes <|im_end|>\n; the model sampled <|im_end|>
    assert protocol.inserted_text([("calculator", {})], ["5"]) == (
        "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert protocol.inserted_text([("calculator", {}), ("calculator", {})], ["5", "9"]) == (
        "\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------- the rollout on a scripted policy


class ScriptedChatPolicy(torch.nn.Module):
    """A causal "model" whose assistant turns are scripted per question: `scripts[question]` lists the
    texts it writes, one per turn (the turn is told by how many `<tool_response>` blocks the context
    holds). Like `generate`, it returns each row's new tokens, padded after the row's stop."""

    def __init__(self, tok, scripts: dict[str, list[str]]):
        super().__init__()
        self.tok, self.scripts, self.batches, self.contexts = tok, scripts, [], []
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"is_encoder_decoder": False})()

    def generate(self, input_ids, attention_mask, max_new_tokens, stop_strings, tokenizer):
        assert stop_strings is None  # the chat protocol stops at the stop token only
        self.batches.append(len(input_ids))
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            context = self.tok.decode(ids[mask.bool()], skip_special_tokens=False)
            self.contexts.append(context)
            question = next(q for q in self.scripts if q in context)
            turns = self.scripts[question]
            rows.append(enc(self.tok, turns[min(context.count("<tool_response>"), len(turns) - 1)])[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def tools(**extra) -> dict[str, Tool]:
    found = {"calculator": Tool("calculator", calculate)}
    found.update({name: Tool(name, fn) for name, fn in extra.items()})
    return found


def chat_environment(tok, scripts, schema, stop_token=EOS, **kw) -> tuple[TextEnvironment, ScriptedChatPolicy]:
    stop_id = tok.convert_tokens_to_ids(stop_token)
    protocol = ChatProtocol(tok, [schema], stop_id=stop_id)
    policy = ScriptedChatPolicy(tok, scripts)
    return TextEnvironment(policy, tok, kw.pop("tools", None) or tools(), protocol=protocol, stop_id=stop_id, **kw), policy


def conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_a_call_its_tool_block_and_the_answer_laid_out_token_by_token(builtin_tok, schema):
    tok = builtin_tok
    env, policy = chat_environment(tok, {QUESTION: [CALL + EOS, "The answer is 5." + EOS]}, schema)
    exp = env.run([conversation(QUESTION)])
    first = enc(tok, CALL) + [tok.eos_token_id]
    block = enc(tok, "<|user|>\n<tool_response>\n5\n</tool_response>\n<|assistant|>\n")
    answer = enc(tok, "The answer is 5.") + [tok.eos_token_id]
    assert exp.response_ids[0].tolist() == first + block + answer
    assert exp.loss_mask[0].tolist() == [True] * len(first) + [False] * len(block) + [True] * len(answer)
    assert exp.response_mask[0].all() and exp.stopped.tolist() == [True]
    episode = exp.episodes[0]
    assert (episode.turns, episode.stop_reason) == (2, "eos")
    assert [(c.name, c.argument, c.result, c.status) for c in episode.calls] == [
        ("calculator", {"expression": "2+3"}, "5", "ok")]
    assert episode.answer == "The answer is 5."
    assert episode.text == CALL + "\n<tool_response>\n5\n</tool_response>\n\nThe answer is 5."  # role tokens left out
    assert policy.batches == [1, 1]
    # the prompt the model saw lists the tool (rendered with tools=)
    assert '"name": "calculator"' in policy.contexts[0] and policy.contexts[0].endswith("<|assistant|>\n")


@pytest.mark.parametrize("style", ["builtin", "qwen"])
def test_the_episode_is_the_conversation_sft_renders(style, builtin_tok, qwen_tok, schema):
    """What the model sees at RL time (prompt + episode tokens, as text) is apply_chat_template of the
    whole conversation -- prompt, assistant turns with their tool calls, the tool results, the final
    answer -- up to the final turn's end-of-turn token: what SFT on that conversation trains."""
    tok, stop = (builtin_tok, EOS) if style == "builtin" else (qwen_tok, "<|im_end|>")
    turns = [CALL + stop, call("7*6") + "\n" + call("1/0") + stop, "The answer is 42." + stop]
    env, _ = chat_environment(tok, {QUESTION: turns}, schema, stop_token=stop, response_length=200,
                              max_length=500)
    exp = env.run([conversation(QUESTION)])
    seen = tok.decode(exp.query_ids[0][exp.query_mask[0].bool()].tolist() + exp.response_ids[0].tolist())
    both = {"role": "assistant", "content": "",
            "tool_calls": tool_call_message("7*6")["tool_calls"] + tool_call_message("1/0")["tool_calls"]}
    messages = [*conversation(QUESTION), tool_call_message("2+3"), {"role": "tool", "content": "5"},
                both, {"role": "tool", "content": "42"}, {"role": "tool", "content": "error: division by zero"},
                {"role": "assistant", "content": "The answer is 42."}]
    full = tok.apply_chat_template(messages, tools=[schema], tokenize=False)
    assert seen + env.protocol.closing == full
    assert exp.episodes[0].answer == "The answer is 42." and exp.episodes[0].turns == 3
    # the SFT side: the tokens the built-in template trains are the model's own tokens here
    if style == "builtin":
        out = tok.apply_chat_template(messages, tools=[schema], return_dict=True, return_assistant_tokens_mask=True)
        trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
        mine = exp.response_ids[0][exp.loss_mask[0]].tolist()
        assert tok.decode(trained) == tok.decode(mine)


def test_episodes_advance_together_and_stop_for_their_own_reasons(builtin_tok, schema):
    scripts = {
        "Say hi.": ["Hi!" + EOS],  # no call: done at once
        "Add.": [CALL + EOS, "5" + EOS],
        "Loop.": [CALL + EOS],  # keeps calling
    }
    env, policy = chat_environment(builtin_tok, scripts, schema, max_turns=3, max_length=400)
    exp = env.run([conversation(q) for q in scripts])
    assert policy.batches == [3, 2, 1]
    assert [e.turns for e in exp.episodes] == [1, 2, 3]
    assert [e.stop_reason for e in exp.episodes] == ["eos", "eos", "max_turns"]
    assert [len(e.calls) for e in exp.episodes] == [0, 1, 3]
    assert exp.stopped.tolist() == [True, True, False]
    assert exp.episodes[0].answer == "Hi!" and exp.episodes[2].answer == ""  # it ended with a tool block
    last = exp.response_mask[2].sum() - 1
    assert not exp.loss_mask[2, last]  # the max_turns episode ends on inserted tokens
    stats = episode_stats(exp.episodes)
    assert stats["env/turns"] == pytest.approx(2.0) and stats["env/stop_max_turns"] == pytest.approx(1 / 3)


def test_the_length_budget_cuts_an_episode_and_a_turn_without_stop_asks_nothing(builtin_tok, schema):
    first = enc(builtin_tok, CALL + EOS)
    block = enc(builtin_tok, "<|user|>\n<tool_response>\n5\n</tool_response>\n<|assistant|>\n")
    budget = len(first) + len(block) + 3  # three tokens of the answer
    env, _ = chat_environment(builtin_tok, {QUESTION: [CALL + EOS, "The answer is five, as the tool said." + EOS]},
                              schema, max_length=budget)
    exp = env.run([conversation(QUESTION)])
    assert exp.response_mask.sum().item() == budget and exp.episodes[0].stop_reason == "length"
    assert exp.loss_mask[0].tolist() == [True] * len(first) + [False] * len(block) + [True] * 3
    env, _ = chat_environment(builtin_tok, {QUESTION: [CALL + EOS]}, schema, response_length=10)
    episode = env.run([conversation(QUESTION)]).episodes[0]  # the call is cut at 10 tokens, before its stop
    assert (episode.turns, episode.calls, episode.stop_reason) == (1, [], "length")


def test_tool_errors_are_read_back_by_the_model(builtin_tok, schema):
    scripts = {
        "Bad argument.": ['<tool_call>{"name": "calculator", "arguments": {"expr": "2+3"}}</tool_call>' + EOS, "no" + EOS],
        "Missing argument.": ['<tool_call>{"name": "calculator", "arguments": {}}</tool_call>' + EOS, "no" + EOS],
        "Unknown tool.": [call("x", name="search") + EOS, "no" + EOS],
        "Malformed.": ["<tool_call>{calculator: 2+3}</tool_call>" + EOS, "no" + EOS],
        "Division.": [call("1/0") + EOS, "no" + EOS],
    }
    env, policy = chat_environment(builtin_tok, scripts, schema)
    exp = env.run([conversation(q) for q in scripts])
    calls = {question: e.calls[0] for question, e in zip(scripts, exp.episodes, strict=True)}
    assert calls["Bad argument."].status == "error"
    assert calls["Bad argument."].result == "error: TypeError: calculate() got an unexpected keyword argument 'expr'"
    assert calls["Missing argument."].status == "error" and "missing 1 required positional argument" in calls[
        "Missing argument."].result
    assert calls["Unknown tool."].status == "unknown_tool" and "known tools: calculator" in calls["Unknown tool."].result
    assert (calls["Malformed."].name, calls["Malformed."].status) == ("", "unknown_tool")
    assert (calls["Division."].status, calls["Division."].result) == ("error", "error: division by zero")
    assert all(e.stop_reason == "eos" and e.turns == 2 for e in exp.episodes)  # every episode went on
    for result in (c.result for c in calls.values()):  # and the model read each error in its next turn
        assert any(f"<tool_response>\n{result}\n</tool_response>" in context for context in policy.contexts)
    assert episode_stats(exp.episodes)["env/tool_error_rate"] == 1.0


def test_a_trainer_step_on_chat_episodes_trains_only_the_models_tokens(builtin_tok, schema, tmp_path):
    """Log-probs of the padded batch equal each episode's own unpadded forward, the first ratio is 1, and
    the inserted template tokens get no advantage."""
    from environments.episode_checks import check_first_update
    from ppo.test_performance_equivalence import make_trainer

    scripts = {"What is 2+3?": [CALL + EOS, "It is 5." + EOS],
               "A much longer question about 7*6 and then 42-1?": [call("7*6") + EOS, call("42-1") + EOS, "41" + EOS],
               "Hello.": ["Hello!" + EOS]}
    env, _ = chat_environment(builtin_tok, scripts, schema)
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2", num_mini_batches=1, num_ppo_epochs=1)
    ids, _ = encode_prompts([conversation(q) for q in scripts], builtin_tok, 512, "reject", tools=[schema])
    q, m = left_pad(ids, builtin_tok.pad_token_id)
    exp = env.rollout(q, m)
    check_first_update(trainer, exp)


# ---------------------------------------------------------------- tools with JSON schemas


def test_builtin_tools_have_schemas_and_still_take_one_string(tmp_path):
    corpus = tmp_path / "facts.txt"
    corpus.write_text("Paris is the capital of France.\nBerlin is the capital of Germany.\n")
    found = load_tools(["builtin:calculator", {"function": "builtin:lookup", "corpus": str(corpus), "name": "facts"}],
                       schemas=True)
    calculator, facts = found["calculator"].schema["function"], found["facts"].schema["function"]
    assert calculator["name"] == "calculator" and facts["name"] == "facts"  # the tool's name, not the function's
    assert calculator["parameters"]["properties"]["expression"]["type"] == "string"
    assert calculator["parameters"]["required"] == ["expression"] and facts["parameters"]["required"] == ["query"]
    assert found["calculator"].fn("6*7") == "42" and found["facts"].fn("capital of germany").startswith("Berlin")
    runner = ToolRunner(found, timeout_s=5, max_response_chars=200)
    results = runner.run([("calculator", {"expression": "6*7"}), ("facts", {"query": "france"}), ("calculator", "1+1"),
                          ("calculator", {"expression": "1", "extra": 2})])
    assert [r.text for r in results[:3]] == ["42", "Paris is the capital of France.", "2"]
    assert results[3].status == "error" and "unexpected keyword argument 'extra'" in results[3].text


@pytest.mark.parametrize(("module", "source", "missing"), [
    ("chat_tool_no_hints", "def tool(text):\n    '''Count.\n\n    Args:\n        text: words\n    '''\n    return text\n",
     "missing a type hint"),
    ("chat_tool_no_doc", "def tool(text: str) -> str:\n    return text\n", "no docstring"),
    ("chat_tool_no_args", "def tool(text: str) -> str:\n    '''Count the words.'''\n    return text\n",
     "no description for the argument 'text'"),
])
def test_a_tool_without_hints_or_args_docstring_is_refused_for_chat(module, source, missing, tmp_path, monkeypatch):
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_tools([f"{module}:tool"])["tool"].fn("a") == "a"  # fine for the text protocol
    with pytest.raises(UserError, match=rf"environment.tools\[1\]: .*{missing}"):
        load_tools(["builtin:calculator", f"{module}:tool"], schemas=True)


# ---------------------------------------------------------------- templates that cannot serve the protocol


def test_templates_that_cannot_render_the_protocol_fail_when_it_is_made(builtin_tok, schema):
    tok = with_chat_tokens(load_tokenizer("builtin:tiny-gpt2"))
    tok.chat_template = MISTRAL  # raises on a `tool` message
    with pytest.raises(UserError, match="fails on such a conversation"):
        ChatProtocol(tok, [schema])
    tok.chat_template = PHI3  # closes a conversation with an eos it does not write mid-way: no extension
    with pytest.raises(UserError, match="extension"):
        ChatProtocol(tok, [schema], stop_id=tok.convert_tokens_to_ids("<|end|>"))
    tok.chat_template = QWEN_TOOLS  # ends a turn with <|im_end|>, while generation stops at eos
    with pytest.raises(UserError, match=r"generation.stop_token: .*'<\|im_end\|>\\n'"):
        ChatProtocol(tok, [schema])
    tok.chat_template = None
    with pytest.raises(UserError, match="has none"):
        ChatProtocol(tok, [schema])


def test_prompts_must_be_conversations_under_the_chat_protocol(builtin_tok, schema):
    with pytest.raises(UserError, match="data row 1: environment.protocol is chat.*data.prompt_column"):
        encode_prompts([conversation("Hi"), "plain text"], builtin_tok, 512, "reject", tools=[schema])
    with_tools, _ = encode_prompts([conversation("Hi")], builtin_tok, 512, "reject", tools=[schema])
    without, _ = encode_prompts([conversation("Hi")], builtin_tok, 512, "reject")
    assert builtin_tok.decode(with_tools[0]).startswith("<|system|>\nYou can call these tools:\n{\"name\": \"calculator\"")
    assert builtin_tok.decode(with_tools[0]).endswith(builtin_tok.decode(without[0]))


def test_a_chat_prompt_too_long_for_its_tool_list_is_refused_not_cut(builtin_tok, schema):
    """Keeping a long prompt's last tokens would silently drop the tool list at its start."""
    (ids,), _ = encode_prompts([conversation("Hi")], builtin_tok, 512, "truncate_left", tools=[schema])
    with pytest.raises(UserError, match="data row 0: the prompt rendered with the tools' schemas.*raise data.max_prompt_length"):
        encode_prompts([conversation("Hi")], builtin_tok, len(ids) - 1, "truncate_left", tools=[schema])
    (cut,), count = encode_prompts([conversation("Hi")], builtin_tok, len(ids) - 1, "truncate_left")
    assert count == 0 and len(cut) < len(ids) - 1  # without tools it fits: nothing to refuse
