"""fieldlens common package."""
