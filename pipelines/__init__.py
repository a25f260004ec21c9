"""diffusers entry points, one module per method (they import diffusers)."""
