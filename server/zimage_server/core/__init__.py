"""The ground floor: settings and what they are checked against, errors in the OpenAI shape,
metrics, the server's phase and termination log, child processes, the connection table, and
image encoding (PNG, base64).

May import: no other layer. Importing ``core.config`` (or parsing settings) does not import
torch: the lists the settings are checked against live here
(``choices``, ``sources``, ``adapters``, ``keys``, ``vram_limit``), not in the layers that implement them.
"""
