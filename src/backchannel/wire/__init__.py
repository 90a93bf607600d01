"""Sans-I/O wire protocols: bytes in, events out. No asyncio, no sockets, no clocks."""
