"""Read a stack's outputs: from `pulumi stack output --json` or from a JSON file of the same shape."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence


class OutputsError(Exception):
    """The stack outputs could not be read; the message says why and what to do."""


def load_outputs(stack: str | None = None, outputs_file: str | Path | None = None,
                 show_secrets: bool = False, names: Sequence[str] = ()) -> dict[str, Any]:
    """Return the stack outputs as a dict.

    `outputs_file` wins when given ("-" is not special: pass a path). Otherwise the
    Pulumi CLI is asked, for `stack` or the currently selected stack: for `names` alone
    when given (one `pulumi stack output NAME` each: a reader of secret addresses need not
    receive the bundles' keys too), else for every output.
    """
    if outputs_file is not None:
        path = Path(outputs_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise OutputsError(f"cannot read outputs file {path}: {exc.strerror}") from exc
        return _parse(text, f"outputs file {path}")
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise OutputsError(
            "the `pulumi` CLI is not on PATH: install it (https://www.pulumi.com/docs/install/) "
            "or pass --outputs FILE with the JSON of `pulumi stack output --json`")
    if names:
        return {name: _ask(pulumi, [name], stack, show_secrets) for name in names}
    outputs = _ask(pulumi, [], stack, show_secrets)
    if not isinstance(outputs, dict):
        raise OutputsError("`pulumi stack output --json` must hold a JSON object of stack outputs")
    return outputs


def _ask(pulumi: str, name: list[str], stack: str | None, show_secrets: bool) -> Any:
    cmd = [pulumi, "stack", "output", *name, "--json"]
    if show_secrets:
        cmd.append("--show-secrets")
    if stack:
        cmd += ["--stack", stack]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1:] or ["no error text"]
        raise OutputsError(f"`{' '.join(cmd[1:])}` failed: {detail[0]}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise OutputsError(f"`{' '.join(cmd[1:])}` is not valid JSON: {exc}") from exc


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputsError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OutputsError(f"{source} must hold a JSON object of stack outputs")
    return data
