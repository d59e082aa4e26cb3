"""fieldlens tiny package."""
