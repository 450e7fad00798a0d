"""Output of lufreplay simulate: the results document (results.py), text tables (text.py), the command."""
