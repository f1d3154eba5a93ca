"""The arena: methods side by side against full attention on one model and data."""
