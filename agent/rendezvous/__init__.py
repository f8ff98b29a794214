"""The agent's side of the rendezvous protocol: registration (pure core and shell), the one-shot
requests of A and the answers of B, and `up`'s first signed round trip."""
