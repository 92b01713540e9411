"""mmrec.documents: where documents start in a packed window, and their ids."""

import torch

from mmrec.documents import document_ids, document_starts


def test_a_document_starts_after_each_end_of_document_token():
    ids = torch.tensor([[0, 5, 7, 0, 0, 3], [4, 4, 4, 4, 4, 0]])
    starts = document_starts(ids, end_of_document=0)
    assert starts.tolist() == [[False, True, False, False, True, True], [False] * 6]
    assert document_ids(starts).tolist() == [[0, 1, 1, 1, 2, 3], [0] * 6]
