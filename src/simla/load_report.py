"""`LoadReport`: what one import of weights did with every key, for every kind of import.

One type serves the checkpoint loader (`simla.checkpoint`), the ViT initialisation from DeiT/timm weights
(`simla.models.vision.load_vision_weights`) and the shared encoder's initialisation from a Hugging Face BERT
(`simla.models.bert.load_hf_bert_state`). Each fills the lists that apply to it; the others stay empty.
This module is low-level on purpose: it imports nothing from simla.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadReport"]

# The key lists of a report, in the order they are shown. `loaded` is shown as a count only.
_SHOWN = ("missing", "unexpected", "mismatched", "resampled", "zero_filled", "ignored", "rebuilt", "new_head")
_MOST_KEYS_SHOWN = 20


@dataclass
class LoadReport:
    """What an import of weights did. `ok` is False when anything is missing, unexpected or mismatched.

    Attributes:
        source: Where the weights came from (a path, URL, hub or model name, or a label the caller chose).
        loaded: Source keys copied into the model (filled by imports that list them).
        missing: Model keys the source did not provide (they keep the model's current values).
        unexpected: Source keys the model has no tensor for (not loaded).
        mismatched: "key: checkpoint (shape) vs model (shape)" for tensors whose shape differs from the
            model's; a non-strict load keeps the model's own (fresh) tensor for each.
        resampled: Source keys resized to the model's geometry (ViT position embeddings).
        zero_filled: Model keys the source lacks by design, filled with zeros (the token-type table).
        ignored: Source keys dropped on purpose (another task's heads, a classifier head, a mask token the
            model lacks, BERT's pooler).
        rebuilt: Training state absent from the source and rebuilt instead: momentum teachers copied from
            the online weights, queues freshly initialised.
        new_head: A task's new head (e.g. the NLVR2/SNLI-VE classifier) absent from a checkpoint of another
            task: it keeps its fresh initialisation, as fine-tuning from such a checkpoint expects.
        notes: Free-form remarks an import adds (e.g. which missing tensors are expected to be missing).
    """

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    zero_filled: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    new_head: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing missing, unexpected or of another shape."""
        return not self.missing and not self.unexpected and not self.mismatched

    def summary(self) -> str:
        """One line: how many keys went into each list."""
        parts = [f"loaded {len(self.loaded)}"] if self.loaded else []
        parts += [f"{name} {len(keys)}" for name in _SHOWN if (keys := getattr(self, name))]
        return f"{self.source or 'weights'}: " + (", ".join(parts) if parts else "every key matched")

    def __str__(self) -> str:
        lines = [f"import of {self.source or 'weights'}:"]
        if self.loaded:
            lines.append(f"  loaded: {len(self.loaded)} tensors")
        for name in _SHOWN:
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:_MOST_KEYS_SHOWN])
                if len(keys) > _MOST_KEYS_SHOWN:
                    shown += f", ... ({len(keys)} in all)"
                lines.append(f"  {name}: {shown}")
        if len(lines) == 1:
            lines.append("  every key matched")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)
