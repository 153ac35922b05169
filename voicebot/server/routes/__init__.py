"""The HTTP and websocket routes of a mount, one module per area."""
