"""The laptop side of the agent: its API client, the wheel and user-data that make a machine an agent."""
