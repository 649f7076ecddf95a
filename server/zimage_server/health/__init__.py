"""Whether the server should get traffic or be restarted: the probes and the small process that
answers them (``health_server`` reading the ``health_board``), the VRAM guard, and the drain
on SIGTERM.

May import: ``core``, ``pipeline``, ``engine``.
"""
