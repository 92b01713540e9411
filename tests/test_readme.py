"""README.md: its quickstart commands are the ones CI runs, and its Python examples run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def quickstart(marker: str) -> str:
    """The one-line ```bash block under ``<!-- marker -->``, as ``.ci/run`` reads it."""
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", README, re.S)
    assert match, f"README.md has no bash block under <!-- {marker} -->"
    command = match.group(1)
    assert "\n" not in command, "a quickstart command is one line"
    return command


def test_ci_runs_the_readme_quickstart_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "quickstart-train" in ci and "quickstart-test" in ci  # CI reads both commands from README.md
    assert quickstart("quickstart-train").endswith("python -m mmrec.recipes.train")
    assert quickstart("quickstart-test").endswith("&& pytest")


def test_the_test_command_installs_every_package_the_tests_collect():
    """pytest collects plugins/ (pyproject's testpaths): the command must install each plugin."""
    command = quickstart("quickstart-test")
    plugins = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))
    assert plugins
    for plugin in plugins:
        assert f"-e plugins/{plugin}" in command, f"the README's test command does not install plugins/{plugin}"
    assert '".[test]"' in command


def test_both_commands_pin_the_torch_that_ci_tests():
    assert quickstart("quickstart-train").startswith("pip install torch==")
    assert quickstart("quickstart-test").startswith("pip install torch==")


@pytest.mark.slow
def test_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block, in order, in one namespace (as a reader would paste them)."""
    monkeypatch.chdir(tmp_path)  # the examples write a state file
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    assert namespace["out"].logits.shape == (2, 412, 256)  # the second piece of the streamed pass
    assert isinstance(namespace["text"], str) and namespace["text"].startswith("The ")
    assert (tmp_path / "doc.state").is_file()
