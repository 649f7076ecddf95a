"""The queue between requests and the GPU: jobs, batching, admission and the cost model that
says how much GPU time is pending; and the start-up that loads and warms up its workers.

May import: ``core``, ``pipeline``.
"""
