"""The attnlab Gradio demo (`attnlab demo`, `python -m attnlab.demo`). Gradio is imported only when the app is built."""

from .app import build_app, main

__all__ = ["build_app", "main"]
