"""The relay core: sessions, calls, presence and timeouts. It knows no HTTP, frames or SQL."""
