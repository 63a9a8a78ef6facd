"""launch/ holds scripts, not a package: tests load one as a module to call its functions."""

import importlib.util
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def load_launch_script(name: str):
    """launch/<name>.py as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"kvforge_launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
