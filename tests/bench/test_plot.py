"""Charts from saved benchmark JSON: each kind is recognised and drawn."""

import json

import pytest

from mmrec.bench.__main__ import main
from mmrec.bench.plot import kind_of

MODEL = {"device": "test", "results": [
    {"recipe": r, "length": t, "tokens_per_s": 1000.0 / t, "peak_gib": t / 1024} for r in ("a", "b") for t in (2048, 8192)]}
DECODE = {"results": [
    {"recipe": "a", "mode": "graph", "batch": 1, "context": c, "tokens_per_s": 5.0, "peak_gib": 1.0} for c in (1024, 32768)
] + [{"recipe": "b", "mode": "graph", "batch": 16, "context": 32768, "error": "out of memory"}]}
SCAN = {"results": [{"impl": "op", "pass": p, "length": t, "GBps": 2000.0} for p in ("fwd", "fwd+bwd") for t in (2048, 32768)]}


@pytest.mark.parametrize("payload,kind", [(MODEL, "model"), (DECODE, "decode"), (SCAN, "scan")])
def test_each_kind_is_recognised_and_drawn(tmp_path, payload, kind):
    assert kind_of(payload) == kind
    saved = tmp_path / f"{kind}.json"
    saved.write_text(json.dumps(payload))
    assert main(["plot", str(saved), "--out-dir", str(tmp_path / "charts")]) == 0
    assert (tmp_path / "charts" / f"{kind}.png").read_bytes().startswith(b"\x89PNG")


def test_results_without_lengths_are_refused():
    with pytest.raises(ValueError, match="model.*decode.*scan"):
        kind_of({"results": [{"recurrence": "exact", "tokens_per_s": 1.0}]})
