"""``python -m mmrec.recipes.generate``: bad options, state files and prompts end in one
``error:`` line (exit status 2), checked before any work where possible; nothing the user
had is overwritten without ``--overwrite``."""

import pytest
import torch

import mmrec
from mmrec.recipes import generate as cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mmrec.recipes import train

    out = tmp_path_factory.mktemp("generate-cli") / "run"
    assert train.main(["--out", str(out), "--set", "model.n_layers=1", "--set", "train.steps=1",
                       "--set", "train.batch_size=2", "--set", "train.seq_len=16", "--set", "train.sample_tokens=0"]) == 0
    return out


def fails(capsys, argv, message):
    """The command exits with status 2 and one ``error:`` line matching ``message``."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    return err


@pytest.mark.parametrize("option,message", [
    (["--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0, got -1"),
    (["--top-k", "0"], "top_k must be None (no limit) or an integer >= 1, got 0"),
    (["--top-p", "0"], "top_p must be None (no limit) or a number in (0, 1], got 0.0"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--overwrite"], "--overwrite applies to --save-state"),
])
def test_bad_options_fail_before_the_checkpoint_is_read(tmp_path, capsys, option, message):
    err = fails(capsys, ["--checkpoint", str(tmp_path / "missing"), "--prompt", "x", *option], message)
    assert "missing" not in err  # refused before looking at the checkpoint


def test_save_state_into_a_missing_folder_fails_up_front(tmp_path, capsys):
    target = tmp_path / "no" / "such" / "doc.state"
    err = fails(capsys, ["--checkpoint", str(tmp_path / "missing"), "--prompt", "x", "--save-state", str(target)],
                "does not exist; create it first")
    assert str(target) in err and not (tmp_path / "no").exists()
    fails(capsys, ["--checkpoint", str(tmp_path / "missing"), "--prompt", "x", "--save-state", str(tmp_path)], "is a folder")


def test_missing_inputs_fail_up_front(tmp_path, capsys):
    fails(capsys, ["--checkpoint", str(tmp_path / "missing"), "--prompt", "x", "--load-state", str(tmp_path / "nope.state")],
          "nope.state' does not exist")
    fails(capsys, ["--checkpoint", str(tmp_path / "missing"), "--prompt-file", str(tmp_path / "nope.txt")],
          "nope.txt' does not exist")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    fails(capsys, ["--checkpoint", str(tmp_path / "missing"), "--prompt-file", str(tmp_path / "latin1.txt")],
          "latin1.txt' is not UTF-8 text")


def test_an_existing_state_file_is_replaced_only_with_overwrite(run, tmp_path, capsys):
    state = tmp_path / "doc.state"
    state.write_bytes(b"the user's file")
    fails(capsys, ["--checkpoint", str(run), "--prompt", "The ", "--max-new-tokens", "1", "--save-state", str(state)],
          "already exists; pass --overwrite")
    assert state.read_bytes() == b"the user's file"
    assert cli.main(["--checkpoint", str(run), "--prompt", "The ", "--max-new-tokens", "1", "--save-state", str(state),
                     "--overwrite"]) == 0
    assert "replacing the file that was there" in capsys.readouterr().err
    assert mmrec.State.load(state).position == 4
    # continuing a state and saving the result under the same name
    assert cli.main(["--checkpoint", str(run), "--prompt", "xy", "--max-new-tokens", "1", "--load-state", str(state),
                     "--save-state", str(state), "--overwrite"]) == 0
    assert mmrec.State.load(state).position == 6


def test_bad_state_files_give_one_line(run, tmp_path, capsys):
    from mmrec.checkpoint import load_checkpoint

    args = ["--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "1", "--load-state"]
    good = tmp_path / "good.state"
    assert cli.main(["--checkpoint", str(run), "--prompt", "The ", "--max-new-tokens", "1", "--save-state", str(good)]) == 0
    raw = bytearray(good.read_bytes())
    raw[-3] ^= 0x10
    (tmp_path / "flipped.state").write_bytes(bytes(raw))
    fails(capsys, [*args, str(tmp_path / "flipped.state")], "flipped.state' is corrupted: checksum mismatch")
    (tmp_path / "cut.state").write_bytes(good.read_bytes()[:-50])
    fails(capsys, [*args, str(tmp_path / "cut.state")], "cannot read state file")
    (tmp_path / "text.state").write_text("hello")
    fails(capsys, [*args, str(tmp_path / "text.state")], "cannot read state file")
    other = mmrec.build("tiny", ["model.n_layers=2"])
    with torch.no_grad():
        other(torch.tensor([[1, 2]])).state.save(tmp_path / "other.state")
    fails(capsys, [*args, str(tmp_path / "other.state")], "another config (n_layers: state 2 vs model 1)")
    same = mmrec.build(str(load_checkpoint(run).recipe_file))
    with torch.no_grad():
        same(torch.tensor([[1, 2], [3, 4]])).state.save(tmp_path / "batch2.state")
    fails(capsys, [*args, str(tmp_path / "batch2.state")], "state has batch size 2")
