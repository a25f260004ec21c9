"""What every attnlab pipeline wrapper shares: it wraps a stock pipeline, delegates every attribute it does
not define to it, and counts the extra guidance forwards of its last call."""

from __future__ import annotations


class PipelineWrapper:
    hooks: list = []

    @classmethod
    def from_pipe(cls, pipe, **options):
        """Wrap an existing pipeline (shares its components; nothing is copied or loaded)."""
        return cls(pipe, **options)

    def __getattr__(self, name):
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    @property
    def extra_passes(self) -> int:
        """Extra forwards run by the last call (one per step where guidance was active, per denoiser)."""
        return sum(h.passes for h in self.hooks)
