"""Command-line tools (synthetic data, conversion helpers)."""
