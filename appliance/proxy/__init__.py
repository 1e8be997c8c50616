"""asyncio proxy: listeners, sessions, upstream connections and the relay."""
