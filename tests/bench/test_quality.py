"""The quality benchmark end to end on CPU at toy size: recipes trained side by side,
each scored on the whole validation split as it finishes."""

import json

from mmrec.bench.__main__ import main
from mmrec.data import default_corpus

TOY = ["train.steps=4", "train.batch_size=2", "train.seq_len=32", "train.eval_every=2", "train.eval_batches=1",
       "train.save_every=2", "train.save_best=true", "train.warmup_steps=1", "model.n_layers=1"]


def test_scores_each_recipe_as_it_finishes_and_keeps_a_failed_one(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(default_corpus().documents)[:20_000])
    out = tmp_path / "quality.json"
    missing = str(tmp_path / "no-such-recipe.json")  # its training exits at once, with an error
    code = main(["quality", "--data", str(data), "--recipes", "tiny", missing, "--runs", str(tmp_path / "runs"),
                 "--device", "cpu", *[x for o in TOY for x in ("--set", o)], "--out", str(out)])
    assert code == 1  # one recipe failed
    payload = json.loads(out.read_text())
    assert payload["complete"] is True
    failed, tiny = payload["results"]  # in the order they finished
    assert failed["recipe"] == missing and failed["exit_code"] != 0
    assert tiny["recipe"] == "tiny" and tiny["exit_code"] == 0 and tiny["step"] == 4
    assert tiny["val_tokens"] > 0 and 0 < tiny["full_val_loss"] < 10 and tiny["best_step"] in (2, 4)
