"""Document boundaries in packed sequences.

Pretraining packs documents end to end, each closed by an end-of-document token, and cuts
the stream into fixed windows, so a window holds the end of one document and the start of
the next. With ``train.reset_at_documents`` the model is told where documents start
(``resets`` ``[B, T]`` bool, :mod:`mmrec.contracts`) and lets nothing cross a start: the
recurrence's state begins again, a memory forgets, attention is masked to the document.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["document_ids", "document_starts"]


def document_starts(input_ids: Tensor, end_of_document: int) -> Tensor:
    """``[B, T]`` bool: ``True`` at each token that follows an ``end_of_document`` token (the
    first token of the next document). A window's first token is never marked: the state
    before it is the caller's (none, in training)."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == end_of_document
    return starts


def document_ids(resets: Tensor) -> Tensor:
    """``[B, T]`` int64: the number of document starts at or before each token, so the tokens
    of one document share an id (0: the document the call's state continues)."""
    return resets.long().cumsum(1)
