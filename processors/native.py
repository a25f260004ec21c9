"""Training resolutions that depend on the model's size, not only its family (framework-free)."""

from __future__ import annotations

#: Wan 2.1/2.2 hidden width of the 14B models (40 heads × 128); the 1.3B model is 1536 wide
WAN_14B_WIDTH = 5120


def wan_native_size(width: int) -> tuple[int, int, int]:
    """(frames, height, width) pixels Wan was trained at: 720×1280 for the 14B models (their official
    instructions), 480×832 for the 1.3B model."""
    return (81, 720, 1280) if int(width) >= WAN_14B_WIDTH else (81, 480, 832)
