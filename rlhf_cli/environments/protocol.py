"""The protocols a model uses to call a tool mid-response, and how a result is written back: `text`
(TextProtocol, for base models) and `chat` (ChatProtocol, for chat models: tool calling through the chat
template, see its docstring).

The model writes a call between two markers, the tool's name first, then its argument:

    <call>calculator 23*17-9</call>

generation stops at the closing marker, the environment runs the tool and appends its answer as

    <result>382</result>

and the model goes on from there (another call, or its answer and the end-of-text token). The four
markers are configurable (`environment.call_start`, ...), so a model already trained on another
syntax (TRL's `<request><Calculator>...<call>` style, say) keeps it. The name may be followed by a
colon (`<call>calculator: 2+3</call>`). A call the protocol cannot read (no name) is still answered:
with an error the model reads, as for an unknown tool.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rlhf_cli.errors import UserError

_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*:?\s?(.*)", re.DOTALL)


@dataclass(frozen=True)
class TextProtocol:
    call_start: str = "<call>"
    call_end: str = "</call>"
    result_start: str = "<result>"
    result_end: str = "</result>"

    def ends_with_call(self, text: str) -> bool:
        """Whether a turn's text stops at a call's closing marker (the turn asks for a tool)."""
        return self.call_end in text

    def parse_call(self, text: str) -> tuple[str, str]:
        """A turn's text, ending at `call_end` -> (tool name, argument). The call is the text after
        the turn's last `call_start`; without one, or without a name, the name is "" (answered as an
        unknown tool)."""
        body = text[: text.index(self.call_end)] if self.call_end in text else text
        start = body.rfind(self.call_start)
        if start < 0:
            return "", body.strip()
        match = _NAME.fullmatch(body[start + len(self.call_start):])
        if match is None:
            return "", body[start + len(self.call_start):].strip()
        return match.group(1), match.group(2).strip()

    # ---- the interface the rollout uses (shared with ChatProtocol)

    @property
    def stop_strings(self) -> list[str]:
        """Text at which generation stops besides the stop token: the call's closing marker."""
        return [self.call_end]

    @property
    def tools(self) -> None:
        """Tool schemas the prompts are rendered with: none (the text protocol shows no tool list)."""
        return None

    def calls(self, text: str, why: str) -> list[tuple[str, str]]:
        """The calls of a turn that ended for `why` ("call", "eos", "length"): the one it closed, if any."""
        return [self.parse_call(text)] if why == "call" else []

    def inserted_text(self, calls: list[tuple[str, str]], results: list[str]) -> str:
        """What the environment appends after a turn's calls: the (one) result between its markers."""
        return "".join(f"{self.result_start}{result}{self.result_end}" for result in results)


# The conversation a tool block is rendered after (see ChatProtocol): one user turn and the sentinel reply.
STAND_IN = ({"role": "user", "content": "Hi"},)
SENTINEL = "RLHF_ASSISTANT_TURN_SENTINEL"


class ChatProtocol:
    """Tool calling through a chat model's own template (`environment.protocol: chat`).

    The prompt is a conversation rendered with `tools=` (the tools' JSON schemas), so the template shows
    the model its tools. The assistant's turn ends at the stop token (its end-of-turn / eos token). The
    turn's calls are read from its text in the Hermes / Qwen format, any number per turn:

        <tool_call>
        {"name": "calculator", "arguments": {"expression": "2+3"}}
        </tool_call>

    ("parameters" is read for "arguments"; arguments given as a JSON string are decoded). A body that is
    not a JSON object with a name is a call named "" (answered as an unknown tool, for the model to read).
    A turn without a call ends the episode (stop reason eos).

    The results go back as `tool` messages through the template. What the template writes between the
    assistant's turn and the next one is found by rendering a stand-in conversation twice:

        head = render([user, assistant(SENTINEL)])
        full = render([user, assistant(SENTINEL), tool, ...], add_generation_prompt=True)

    `full` must extend `head`; the inserted text is what `head` writes after the sentinel beyond the stop
    token the model sampled (the newline ChatML writes after `<|im_end|>`), then `full[len(head):]`: the
    tool messages and the next assistant turn's opening. It is rendered once per turn and tokenised apart.
    A template that cannot render tool messages, does not write the reply verbatim, or ends the reply with
    something other than the stop token is a UserError when the protocol is made, not mid-run. Limits: the
    block is rendered after a stand-in conversation, so a template whose tool block depends on earlier
    turns (or on ids that tie a result to its call, as Mistral's) is not reproduced exactly.
    """

    stop_strings: tuple[str, ...] = ()  # a turn ends at the stop token only

    def __init__(self, tokenizer, tools: list[dict], stop_id: int | None = None, call_start: str = "<tool_call>",
                 call_end: str = "</tool_call>", model_name: str = "the model"):
        if not call_start or not call_end:
            raise ValueError("the tool-call markers must be non-empty")
        self.tokenizer, self.tools, self.model_name = tokenizer, list(tools), model_name
        self.call_start, self.call_end = call_start, call_end
        self._call = re.compile(f"{re.escape(call_start)}(.*?)(?:{re.escape(call_end)}|\\Z)", re.DOTALL)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"environment.protocol: chat renders tool results through the chat template, and the "
                            f"tokenizer of {model_name} has none; use a chat model's tokenizer or protocol text.")
        stop_id = tokenizer.eos_token_id if stop_id is None else stop_id
        if stop_id is None:
            raise UserError("generation.stop_token: protocol chat ends each assistant turn at the stop token; set it "
                            "(eos, or the template's end-of-turn token).")
        self.stop_text = tokenizer.decode([stop_id])
        self._head = self._render([*STAND_IN, {"role": "assistant", "content": SENTINEL}])
        at = self._head.rfind(SENTINEL)
        if at < 0:
            raise UserError(f"environment.protocol: the chat template of {model_name} does not write an assistant "
                            "message's content as given, so the end of the model's turn cannot be found; use protocol "
                            "text or another template.")
        closing = self._head[at + len(SENTINEL):]
        if not closing.startswith(self.stop_text):
            raise UserError(f"generation.stop_token: the chat template of {model_name} ends an assistant turn with "
                            f"{closing!r}, but generation stops at {self.stop_text!r}; set generation.stop_token to "
                            "the token the template ends the assistant's turn with.")
        self.closing = closing[len(self.stop_text):]  # written after the stop token the model samples
        self.inserted_text([("tool", {})], ["0"])  # a template that cannot render tool messages fails now

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), tools=self.tools or None, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja's TemplateError, raise_exception in the template, a missing variable
            raise UserError(f"environment.protocol: chat renders tool results as `tool` messages through the chat "
                            f"template of {self.model_name}, which fails on such a conversation ({type(err).__name__}: "
                            f"{err}); use a template with tool support, or protocol text.") from None

    def parse_calls(self, text: str) -> list[tuple[str, Any]]:
        """Every call of a turn's text, in order: (name, arguments); ("", the body) for a call that cannot be read."""
        return [self._parse(match.group(1).strip()) for match in self._call.finditer(text)]

    @staticmethod
    def _parse(body: str) -> tuple[str, Any]:
        try:
            call = json.loads(body)
        except ValueError:
            return "", body
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            return "", body
        arguments = call.get("arguments", call.get("parameters"))
        if isinstance(arguments, str):  # OpenAI-style: the arguments as a JSON string
            try:
                decoded = json.loads(arguments)
            except ValueError:
                decoded = None
            arguments = decoded if isinstance(decoded, dict) else arguments
        return call["name"], {} if arguments is None else arguments

    # ---- the interface the rollout uses (shared with TextProtocol)

    def calls(self, text: str, why: str) -> list[tuple[str, Any]]:
        """The calls of a turn that ended for `why`: those of a finished turn (eos; `text` without the stop
        token), none of a turn cut by the length budget."""
        return self.parse_calls(text) if why == "eos" else []

    def inserted_text(self, calls: list[tuple[str, Any]], results: list[str]) -> str:
        """What the template writes after the model's stop token for these results as `tool` messages, up to
        and including the next assistant turn's opening."""
        messages = [{"role": "tool", "content": result, **({"name": name} if name else {})}
                    for (name, _), result in zip(calls, results, strict=True)]
        full = self._render([*STAND_IN, {"role": "assistant", "content": SENTINEL}, *messages],
                            add_generation_prompt=True)
        if not full.startswith(self._head):
            raise UserError(f"environment.protocol: the chat template of {self.model_name} does not render a "
                            "conversation with tool messages as an extension of the conversation before them, so "
                            "the text it inserts for a tool result cannot be found; use protocol text or another "
                            "template.")
        return self.closing + full[len(self._head):]
