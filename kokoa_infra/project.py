"""Where the Pulumi project is: `Pulumi.yaml`, the program (`__main__.py`) and `stacks/` (the lab's stack).

The program is run by `pulumi` from the project directory; the tests and `kokoa lab` evaluate
it from there too. In this checkout that is the package's parent directory; an installed
`kokoa` (whose package has no project beside it) uses $KOKOA_PROJECT_DIR, else the current
directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR_ENV = "KOKOA_PROJECT_DIR"


def project_dir() -> Path:
    if os.environ.get(PROJECT_DIR_ENV):
        return Path(os.environ[PROJECT_DIR_ENV])
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "Pulumi.yaml").is_file():
        return checkout
    return Path.cwd()


PROJECT_DIR = project_dir()
