"""Sans-IO IMAP and POP3 parsing: bytes in, events out, no sockets and no asyncio."""
