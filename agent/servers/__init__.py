"""The rendezvous server (hbbs role) and the relay server (hbbr role): pure cores, SQLite registry and
asyncio shells. They import the wire protocol and `agent.common`, never the agent, and never Ray
(`actors.relay_pool` wraps the relay for replicas)."""
