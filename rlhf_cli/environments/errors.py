"""ToolError: a tool's answer that says what went wrong, for the model to read and recover from.

A tool raises it for a bad argument (``1/0``, an unbalanced parenthesis); the ToolRunner turns it into
``"error: <message>"`` with no exception type, since the message is written for the model. It lives in
its own module so that the built-in tools and the runner can both import it without a cycle. It is not
a UserError: nothing the user must fix, just a turn of the episode.
"""


class ToolError(Exception):
    """A short, one-line message a model can read ("division by zero")."""
