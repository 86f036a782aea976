"""Database I/O: tables, engine, and the repository functions that hold every query."""
