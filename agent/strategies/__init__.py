"""Connection strategies: each gets a connected transport socket to the peer and hands it on."""
