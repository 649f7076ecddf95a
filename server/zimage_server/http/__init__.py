"""What clients see: the FastAPI app and its routes (the OpenAI images API, streamed previews,
the playground), the request and response shapes (``protocol``), the service that turns a
request into engine jobs, API keys, request limits, the OpenAPI document, and the HTTP
protocol's own bounds (``http_server``).

May import: every layer below (``core``, ``pipeline``, ``engine``, ``health``). Only the CLI
(``zimage_server.cli``) is above it.
"""
