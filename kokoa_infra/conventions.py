"""What every kokoa command does alike: exit codes, the stack option, environment variables in
--help, and progress on stderr with no silent wait longer than a few seconds."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import click

EXIT_OK, EXIT_FAILED, EXIT_COULD_NOT_RUN = 0, 1, 2
STACK_ENV = "KOKOA_STACK"
STACK_DEFAULT = f"${STACK_ENV}, else the stack `pulumi stack select` chose"
CONTEXT = {"help_option_names": ["-h", "--help"]}
# The longest a command may run without printing (on stderr) what it is waiting for.
HEARTBEAT_S = 4.0
HELP_WIDTH = 76


class Failed(click.ClickException):
    """The command ran and did not do what was asked (exit 1)."""

    exit_code = EXIT_FAILED


class CouldNotRun(click.ClickException):
    """The command could not run: its input, the environment or a tool is missing (exit 2)."""

    exit_code = EXIT_COULD_NOT_RUN


def epilog(failed: str, could_not_run: str, environment: Mapping[str, str] | None = None,
           done: str = "done") -> str:
    """The --help epilog of a command: the environment variables it reads and its exit codes."""
    text = ""
    if environment:
        width = max(map(len, environment)) + 2
        lines = []
        for name, what in environment.items():
            wrapped = textwrap.wrap(what, HELP_WIDTH - 2 - width) or [""]
            lines += [f"  {name.ljust(width)}{wrapped[0]}"] + [" " * (2 + width) + more for more in wrapped[1:]]
        text += "\b\nEnvironment:\n" + "\n".join(lines) + "\n\n"
    codes = textwrap.wrap(f"Exit codes: 0 {done}; 1 {failed}; 2 usage error or could not run ({could_not_run}).",
                          HELP_WIDTH)
    return text + "\b\n" + "\n".join(codes) + "\n"


STACK_ENVIRONMENT = {STACK_ENV: "the stack when -s/--stack is not given"}


def stack_option(what: str) -> Callable:
    """-s/--stack NAME, the same for every command: default $KOKOA_STACK, else Pulumi's selected stack."""
    return click.option("-s", "--stack", metavar="NAME", envvar=STACK_ENV,
                        help=f"{what} (default: {STACK_DEFAULT}).")


def selected_stack() -> str | None:
    """The stack `pulumi stack select` chose for the project in this directory, or None."""
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        return None
    try:
        proc = subprocess.run([pulumi, "stack", "--show-name"], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def progress(message: str) -> None:
    """A progress line: stderr, so that stdout carries only the result."""
    click.echo(message, err=True)


@contextmanager
def heartbeat(echo: Callable[[str], None] = progress, every_s: float = HEARTBEAT_S,
              ) -> Iterator[Callable[[str], None]]:
    """An echo that, whenever nothing was printed for `every_s` seconds, says it is still at
    its last line ("  ... still: hosts (12 s)"); stopped when the block ends."""
    lock = threading.Lock()
    state = {"last": time.monotonic(), "line": "", "since": time.monotonic()}
    done = threading.Event()

    def say(message: str) -> None:
        with lock:
            echo(message)
            now = time.monotonic()
            state.update(last=now, since=now, line=message.strip())

    def beat() -> None:
        while not done.wait(0.5):
            with lock:
                now = time.monotonic()
                if now - state["last"] >= every_s:
                    echo(f"  ... still: {state['line'] or 'starting'} ({now - state['since']:.0f} s)")
                    state["last"] = now

    thread = threading.Thread(target=beat, name="kokoa-heartbeat", daemon=True)
    thread.start()
    try:
        yield say
    finally:
        done.set()
        thread.join(timeout=2)

