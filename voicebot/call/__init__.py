"""The call: turn-taking policy, replies and playout, independent of the transport."""
