"""fieldlens router package."""
