"""The language-model side: access (text, windows, loading, hooks), ``cache`` and ``evaluate``."""
