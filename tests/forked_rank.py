"""A rank of a multi-process launch in the tests, forked from the CLI server (tests/forked_cli.py).

torchrun (also under `accelerate launch`) starts each rank as `$PYTHON_EXEC -u -m rlhf_cli ARGS`; conftest.py
points PYTHON_EXEC at a script that runs this file (`python -S`: the standard library only, started in
~20 ms) as `forked_rank.py SOCKET -u -m rlhf_cli ARGS`. It sends the server its argv, working directory,
environment and standard streams; the server forks a child that runs `python -m rlhf_cli ARGS` with them.
This process stays what the launcher sees: it passes on the signals the launcher (or a test) sends it, and
exits as the child did (the same code, or killed by the same signal). If it is killed itself, the server
kills the child. Any other command, or a run the server refuses (a variable read on import differs) or a
server that is not running: this process becomes the real interpreter (exec).
"""

import array
import contextlib
import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main(server: str, args: list[str]) -> None:
    if args[:3] == ["-u", "-m", "rlhf_cli"]:
        request = {"args": args[3:], "cwd": os.getcwd(), "env": dict(os.environ)}
        try:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            connection.connect(server)
            connection.sendmsg([json.dumps(request).encode()],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
            answer = json.loads(connection.recv(1 << 16) or "{}")
        except OSError:  # no server
            answer = {}
        if "pid" in answer:
            follow(connection, answer["pid"])
    os.execv(sys.executable, [sys.executable, *args])


def follow(connection: socket.socket, pid: int) -> None:
    """Pass signals on to the child until the server reports its end, then end the same way."""

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):  # it has just ended: its exit status is on its way
            os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    message = connection.recv(1 << 16)
    code = json.loads(message)["returncode"] if message else -signal.SIGKILL  # no answer: the server has gone
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
