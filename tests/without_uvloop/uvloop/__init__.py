"""First on a served process's PYTHONPATH (tests/served.py ``loop="asyncio"``), this makes
``import uvloop`` fail as it does where uvloop is not installed: ``meshlib serve`` then runs
on asyncio's own loop, the way a user without ``meshlib[fast]`` runs it."""

raise ImportError("uvloop is hidden from this process by tests/without_uvloop")
