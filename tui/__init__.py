"""The Textual chat (installed as kvside.tui)."""
