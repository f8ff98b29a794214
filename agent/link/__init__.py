"""Peer links (issue 12): one authenticated link per peer, many streams over it."""
