"""What this host's network looks like: the NAT measured against the rendezvous server, and noticing
that the network changed (each a pure core and its I/O half)."""
