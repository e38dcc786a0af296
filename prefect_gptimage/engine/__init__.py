"""The row engine: every flow that runs many rows goes through it.

Window, budget, stop, ledger and report, in one place, for ``batch_to_s3``, the OCR gate and
batch edits. This package sits between the tasks (below) and the flows (above).
"""
