"""fieldlens trainer package."""
