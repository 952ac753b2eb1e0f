"""Other libraries' APIs as layers at the edge: each translates into plans and calls the core."""
