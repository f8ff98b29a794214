"""The agent's control plane: the coordinator, A's race of strategies, the plan it follows, and who
may connect (access policy, live config, pinned keys)."""
