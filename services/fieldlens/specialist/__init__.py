"""fieldlens specialist package."""
