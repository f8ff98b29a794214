"""The wire protocol, pure: RustDesk's frames, AddrMangle, rendezvous messages, the peer handshake and its
secretbox channel, and punchthrough's signatures and key-named peer IDs. Imports nothing of this
project but `agent.proto`: the servers and the agent both speak it."""
