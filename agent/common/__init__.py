"""Helpers that know neither the agent nor the servers: private files, key files, drop counters, per-IP
caps, small socket helpers, the local control protocol and where state lives. They may use
`agent.wire` (addresses); nothing above."""
