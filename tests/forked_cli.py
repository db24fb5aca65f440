"""`python -m rlhf_cli ARGS` in a new process, without paying the interpreter's imports each time.

A CLI test's subprocess spends ~8-10 s importing torch, transformers, datasets, peft, accelerate and
diffusers before it reads its config; most tests then train for a second or two. So each pytest worker
starts one server (this file run as a script) that imports every rlhf_cli module once, then forks a child
per run. The child is a new process as `python -m rlhf_cli` makes one: its own pid, working directory,
environment, argv, stdout and stderr (files, read back as subprocess.run's capture), exit status (an
uncaught exception prints its traceback and exits 1; a signal gives -N), atexit handlers run. What differs
is only what happened at import time: a warning printed while importing appears once in the server's
stderr instead of in each run's. A run whose environment differs from the server's in a variable that
Python or a library reads when it starts or is imported (IMPORT_TIME) is not forked: `start` returns None and
the caller starts a real interpreter. Other variables (RANK, WANDB_MODE, RLHF_*, ...) are read when used: a
child gets them as a new process would.

The ranks of a multi-process launch (`accelerate launch ... -m rlhf_cli`, `torchrun ... -m rlhf_cli`) fork from
the same server: the launcher starts each rank with PYTHON_EXEC, which conftest.py points at this server's
`rank_python`, a script that runs tests/forked_rank.py. That small process asks the server, over a Unix
socket, for a child with its argv, working directory, environment and standard streams (passed as file
descriptors), forwards the signals it gets to it and exits as it does; the server kills the child if the
process dies first. Where the server refuses (see above) or is not running, it becomes a real interpreter.
"""

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Read by the interpreter at start-up or by torch, transformers, datasets, huggingface_hub, tokenizers, peft,
# diffusers and their native libraries when imported: a run that sets one of these differently from the server
# needs its own interpreter. (Not among them: PYTHONPATH, as a child puts its entries on sys.path; accelerate's
# ACCELERATE_*, which its launcher sets for each rank and no module reads on import, only the Accelerator.)
IMPORT_TIME = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DATASETS_", "TOKENIZERS_", "PEFT_", "DIFFUSERS_", "TORCH",
               "PYTORCH_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "LD_", "PYTHONHOME",
               "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS", "PYTHONIOENCODING", "HOME", "XDG_",
               "TMPDIR", "LANG", "LC_")
# ... except these, read when called: `import deepspeed` sets the first, which torch.cuda.is_available() reads;
# torchrun sets the others for each rank, read when the process group or elastic's error handler is made
READ_WHEN_CALLED = ("PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHELASTIC_", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def environment(env: dict[str, str], base_env: dict[str, str], server_env: dict[str, str]) -> tuple[dict, list]:
    """A forked child's environment for a run given `env` (the server started with `base_env` and has
    `server_env` after its imports), and the variables that rule a fork out."""
    # what the imports add (a real process's imports add it too), unless the caller set it
    env = {**{key: value for key, value in server_env.items() if key not in base_env}, **env}
    changed = {key for key in server_env.keys() | env.keys() if server_env.get(key) != env.get(key)}
    return env, sorted(key for key in changed if key.startswith(IMPORT_TIME) and not key.startswith(READ_WHEN_CALLED))


def serve(rank_socket: str) -> None:
    """The server: import everything, then fork a child for each JSON request line on stdin (replying its pid
    at once and its exit status when it ends, a JSON line each on stdout) and for each rank that connects to
    `rank_socket` (replying on its connection). Several children may run at once."""
    import gc
    import importlib
    import pkgutil
    import socket

    import matplotlib.pyplot  # noqa: F401  (the eval stage's plots; imported when drawn)

    import rlhf_cli

    base_env = dict(os.environ)
    for module in pkgutil.walk_packages(rlhf_cli.__path__, "rlhf_cli."):
        if module.name != "rlhf_cli.__main__":  # each child runs it, as `python -m` does
            importlib.import_module(module.name)
    python_path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    # sys.path without this script's folder and the server's PYTHONPATH: a child puts its own before it
    base_path = [entry for entry in sys.path[1:] if entry not in python_path]
    gc.freeze()  # the imported objects out of the collector's sight: a child's collections leave their pages shared
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(rank_socket)
    listener.listen(64)
    server_env = dict(os.environ)  # as the imports left it (torch sets TORCHINDUCTOR_CACHE_DIR)
    reply({"env": server_env})
    requests = b""
    children: dict[int, object] = {}  # pid -> whom to tell its exit status: STDOUT, a rank's connection or None
    ranks: dict[socket.socket, int | None] = {}  # a rank's connection -> its child (None until it asks)

    def fork(args: list[str], cwd: str, env: dict, stdio: list[int]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child never comes back from run_child
            for connection in (listener, *ranks):  # the server's, not the child's
                os.close(connection.detach())
            run_child(args, cwd, env, stdio, base_path)
        for fd in stdio:  # the child's now: held here, a launcher reading them would wait for the server to exit
            os.close(fd)
        return pid

    while True:
        for source in select.select([0, listener, *ranks], [], [], 0.05 if children else None)[0]:
            if source == 0:
                chunk = os.read(0, 65536)
                if not chunk:  # the pytest process has gone
                    return
                requests += chunk
            elif source is listener:
                ranks[listener.accept()[0]] = None
            elif ranks[source] is None:  # a rank's request: its argv, cwd and environment, and its stdio
                message, fds = receive_fds(source)
                request = json.loads(message or "{}")
                env, refused = environment(request.get("env", {}), base_env, server_env)
                if not message or refused:
                    for fd in fds:
                        os.close(fd)
                    source.send(json.dumps({"refused": refused}).encode())
                    del ranks[source]
                    source.close()
                    continue
                ranks[source] = pid = fork(request["args"], request["cwd"], env, fds)
                children[pid] = source
                source.send(json.dumps({"pid": pid}).encode())
            else:  # the rank's process has gone (killed) while its child runs: the child goes too
                pid = ranks.pop(source)
                children[pid] = None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                source.close()
        while b"\n" in requests:
            line, requests = requests.split(b"\n", 1)
            request = json.loads(line)
            stdio = [os.open(os.devnull, os.O_RDONLY), os.open(request["stdout"], os.O_WRONLY),
                     os.open(request["stderr"], os.O_WRONLY)]
            pid = fork(request["args"], request["cwd"], request["env"], stdio)
            children[pid] = STDOUT
            reply({"pid": pid})
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            whom, code = children.pop(pid), os.waitstatus_to_exitcode(status)
            if whom is STDOUT:
                reply({"pid": pid, "returncode": code})
            elif whom is not None:
                with contextlib.suppress(OSError):
                    whom.send(json.dumps({"returncode": code}).encode())
                del ranks[whom]
                whom.close()


STDOUT = "stdout"  # a child's exit status goes to the server's stdout (a request that came on its stdin)


def receive_fds(connection) -> tuple[bytes, list[int]]:
    """One message of a SOCK_SEQPACKET connection and the file descriptors sent with it."""
    import array
    import socket

    fds = array.array("i")
    message, ancillary, _, _ = connection.recvmsg(1 << 20, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return message, list(fds)


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def run_child(args: list[str], cwd: str, env: dict[str, str], stdio: list[int], base_path: list[str]) -> None:
    """In the forked child: become `python -m rlhf_cli ARGS` started in `cwd` with `env` and `stdio` as its
    standard streams, run it, and exit as the interpreter would, but without tearing down its modules: that
    touches every object the server imported and copies all of its ~1 GB of pages (~1.5 s per run)."""
    import atexit
    import runpy
    import traceback

    for fd, stream in enumerate(stdio):
        os.dup2(stream, fd)  # also closes the server's pipes in this process
        os.close(stream)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    python_path = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    sys.path[:] = [cwd, *python_path, *base_path]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv[:] = ["-m", *args]  # alter_sys makes argv[0] __main__.py's path, as `python -m` does
    killed_by = None
    try:
        runpy.run_module("rlhf_cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:  # sys.exit(None | int | message), as the interpreter reads it
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if not isinstance(exit_.code, int | None):
            print(exit_.code, file=sys.stderr)
    except KeyboardInterrupt:  # the interpreter prints it, then dies of SIGINT
        traceback.print_exc()
        code, killed_by = 1, signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads, then atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if killed_by is not None:
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    os._exit(code)


class ForkedCli:
    """One server per pytest process, started at the first run with the environment `base_env`."""

    def __init__(self, base_env: dict[str, str]):
        # the socket ranks ask the server on, and the python a launcher starts them with (PYTHON_EXEC)
        self.folder = Path(tempfile.mkdtemp(prefix="rlhf-cli-server-"))
        self.rank_socket, self.rank_python = self.folder / "ranks.sock", self.folder / "python"
        self.rank_python.write_text(f"#!/bin/sh\nexec '{sys.executable}' -S '{Path(__file__).parent / 'forked_rank.py'}' "
                                    f"'{self.rank_socket}' \"$@\"\n")
        self.rank_python.chmod(0o755)
        self.base_env = {**base_env, "PYTHON_EXEC": str(self.rank_python)}
        self.server: subprocess.Popen | None = None
        self.server_env: dict[str, str] = {}  # the server's after its imports: what a forked child starts from
        self.pending = b""
        self.finished: dict[int, int] = {}  # pid -> exit status, as the server reports them
        self.refused_for: list[str] = []  # the variables that made the last start a real interpreter's

    def start(self, args: list[str], cwd: Path, env: dict[str, str]) -> "ForkedProcess | None":
        """`args` started in a forked child; None where `env` differs from the server's in a variable that a
        library may have read on import."""
        env, self.refused_for = self.child_environment(env)
        if self.refused_for:
            return None
        process = ForkedProcess(self, [sys.executable, "-m", "rlhf_cli", *args])
        request = {"args": list(args), "cwd": str(cwd), "env": env, "stdout": str(process.out),
                   "stderr": str(process.err)}
        self.server.stdin.write((json.dumps(request) + "\n").encode())
        self.server.stdin.flush()
        while True:  # the server answers requests in order; other children's ends may come first
            message = self._receive(None)
            if "returncode" not in message:
                process.pid = message["pid"]
                return process

    def child_environment(self, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
        """A forked child's environment for a run given `env`, and the variables that rule a fork out."""
        self.ensure_server()
        return environment(env, self.base_env, self.server_env)

    def ensure_server(self) -> None:
        """The server started, if it is not running."""
        if self.server is None or self.server.poll() is not None:
            self.rank_socket.unlink(missing_ok=True)
            self.server = subprocess.Popen([sys.executable, "-u", __file__, str(self.rank_socket)],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=self.base_env)
            self.pending, self.finished = b"", {}
            self.server_env = self._receive(None)["env"]

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess | None:
        """`args` run to the end by a forked child (subprocess.run's result); None where `env` rules a fork out."""
        process = self.start(args, cwd, env)
        if process is None:
            return None
        try:
            stdout, stderr = process.communicate(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(process.args, timeout, stdout, stderr) from None
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def exit_status(self, pid: int, timeout: float | None) -> int | None:
        """`pid`'s exit status once the server reports it within `timeout` seconds (0: only what has arrived)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self.finished:
            try:
                message = self._receive(None if deadline is None else max(deadline - time.monotonic(), 0))
            except TimeoutError:
                return None
            self.finished[message["pid"]] = message.get("returncode")
        return self.finished[pid]

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _receive(self, timeout: float | None) -> dict:
        """The server's next reply line; TimeoutError when none comes within `timeout` seconds."""
        fd = self.server.stdout.fileno()
        while b"\n" not in self.pending:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the CLI server exited ({self.server.wait()}); its stderr is the worker's")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)


class ForkedProcess:
    """What tests use of subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True) for a forked run. Its
    output goes to files: `stdout` and `stderr` read what has been written so far."""

    def __init__(self, cli: ForkedCli, args: list[str]):
        self.cli, self.args, self.pid, self.returncode = cli, args, 0, None
        self.folder = tempfile.TemporaryDirectory(prefix="rlhf-cli-")
        self.out, self.err = Path(self.folder.name) / "stdout", Path(self.folder.name) / "stderr"
        self.out.touch()
        self.err.touch()
        self.stdout, self.stderr = self.out.open(), self.err.open()

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.cli.exit_status(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.cli.exit_status(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout.read(), self.stderr.read()

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    serve(sys.argv[1])
