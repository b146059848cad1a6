"""What every parser needs besides the element: the pseudonymiser and the caller's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from ledger.ingest.pseudonym import Pseudonymizer


@dataclass
class ParseContext:
    pseud: Pseudonymizer
    project: str | None = None  # default project id (selects one project of a multi-project export)
    checkpoint_seq: int | None = None  # the model checkpoint entry that produced suggestions, if known
    model_version: str | None = None  # for suggestion files that do not name the model
    annotators: set[str] = field(default_factory=set)

    def person(self, identity: str | None) -> str | None:
        """Pseudonym for an identity (e-mail, or a platform-namespaced user id)."""
        if identity is None or identity == "":
            return None
        return self.pseud.pseudonym(identity)

    def annotator(self, identity: str | None) -> str | None:
        p = self.person(identity)
        if p is not None:
            self.annotators.add(p)
        return p
