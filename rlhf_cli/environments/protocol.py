"""The text protocol a base model uses to call a tool mid-response, and how a result is written back.

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

import re
from dataclasses import dataclass

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

    def format_result(self, text: str) -> str:
        return f"{self.result_start}{text}{self.result_end}"

    def final_text(self, episode_text: str) -> str:
        """What the model wrote after the last tool result: its answer."""
        end = episode_text.rfind(self.result_end)
        return episode_text if end < 0 else episode_text[end + len(self.result_end):]
