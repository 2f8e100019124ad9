"""Pure adaptation math on torch tensors: stream normalization and adaptation policies.

Nothing here knows about HTTP, stores or files.
"""
