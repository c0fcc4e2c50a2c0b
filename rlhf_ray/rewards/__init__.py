"""Rewards besides the trained reward model: Python functions and remote HTTP servers, checked row by row."""
