"""docs/plugins.md, followed step by step: write its files, install, list, build, train."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import mmrec

DOC = Path(__file__).parents[1] / "docs" / "plugins.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks():
    return [(lang, info.strip(), body) for lang, info, body in BLOCK.findall(DOC.read_text())]


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_plugin_walkthrough(tmp_path):
    files = [(info.removeprefix("file="), body) for _, info, body in blocks() if info.startswith("file=")]
    assert {"mmrec-retention/pyproject.toml", "mmrec-retention/mmrec_retention/__init__.py", "retention-tiny.json"} <= {f for f, _ in files}
    for name, body in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)

    # Without the package, the recipe names the missing variant.
    with pytest.raises(mmrec.recipes.RecipeError, match="unknown recurrence 'retention'"):
        mmrec.recipes.load(str(tmp_path / "retention-tiny.json"))

    site = tmp_path / "site"  # install beside, not into, the test environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    commands = [line for lang, _, body in blocks() if lang == "bash" for line in body.splitlines() if line.strip()]
    for command in commands:
        args = shlex.split(command)
        if args[:2] == ["pip", "install"]:
            args = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(site), *args[2:]]
        elif args[0] == "python":
            args = [sys.executable, *args[1:]]
        out = run(args, tmp_path, env)
        if args[1:3] == ["-m", "mmrec"] and args[3] == "list":
            assert re.search(r"retention\s+mmrec-retention\s+mmrec_retention:Retention", out)
        if "mmrec.recipes.train" in args:
            assert (tmp_path / "runs" / "retention").is_dir()

    snippets = [body for lang, info, body in blocks() if lang == "python" and not info]
    assert len(snippets) == 1
    assert run([sys.executable, "-c", snippets[0]], tmp_path, env).strip() == "Retention"

    # The errors the page promises.
    check = (
        "import json, mmrec\n"
        "data = json.load(open('retention-tiny.json'))\n"
        "for kind, field, expected in (('retention', 'decya', 'model.recurrence.decya: unknown field'),"
        " ('retnetion', None, \"did you mean 'retention'?\")):\n"
        "    recurrence = {'kind': kind, **({field: 0.9} if field else {})}\n"
        "    try:\n"
        "        mmrec.recipes.parse({**data, 'model': {**data['model'], 'recurrence': recurrence}})\n"
        "    except mmrec.recipes.RecipeError as error:\n"
        "        assert expected in str(error), str(error)\n"
        "    else:\n"
        "        raise SystemExit('no error for ' + kind)\n"
    )
    run([sys.executable, "-c", check], tmp_path, env)
