"""The config slot of a registered variant (a recurrence or a memory).

A block's ``Config`` declares such slots as ``Variant`` fields and names their registry
group in ``variant_groups``; :mod:`mmrec.recipes` narrows each slot to the discriminated
union (on ``kind``) of every installed variant's own ``Config``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Variant(BaseModel):
    """Placeholder for a registered variant's config: only ``kind`` is known here."""

    model_config = ConfigDict(extra="allow")

    kind: str
