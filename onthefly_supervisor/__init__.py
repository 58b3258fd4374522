"""Supervisor side of OnTheFly: server, session store, worker pool, GPU allocator, CLI, terminal UI."""
