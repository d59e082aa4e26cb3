"""fieldlens backends package."""
