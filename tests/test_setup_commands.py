"""README's two set-up commands and .ci/run stay in step."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"## Set up a fresh machine\s+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no set-up block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_an_install_and_run_command_and_a_test_command():
    install, tests = readme_commands()
    assert "pip install torch==2.13.0" in install and install.endswith("expertmix quickstart")
    assert tests.endswith("pytest -q")


def test_ci_installs_exactly_as_readme_says_and_runs_its_test_command():
    install, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    pip_step = re.search(r"(pip install .*?) &&", install).group(1)
    assert pip_step in ci.splitlines()
    assert tests.split("&&")[-1].strip() in ci.splitlines()
