"""The queue between requests and the GPU: jobs, batching, admission and the cost model that
says how much GPU time is pending.

May import: ``core``, ``pipeline``.
"""
