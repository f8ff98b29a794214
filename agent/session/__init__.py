"""Sessions: the session owner (handshake on every transport a strategy hands over, then the pump),
the encrypted stream itself, and what `punchthrough-ops sessions` and `peers` show of them."""
