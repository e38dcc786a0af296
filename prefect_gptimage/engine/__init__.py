"""The row engine: every flow that runs many rows goes through it.

Window, budget, stop, ledger and report, in one place, for ``batch_to_s3`` and the OCR gate.
This package sits between the tasks (below) and the flows (above):

* :mod:`~prefect_gptimage.engine.options`: :class:`RunOptions`, the run's options in one object;
* :mod:`~prefect_gptimage.engine.plan`: what each row will cost (cached, at fal, unknown, paid);
* :mod:`~prefect_gptimage.engine.budget`: ``max_cost`` before and during the run;
* :mod:`~prefect_gptimage.engine.stop`: :class:`Stop`, a stop request passed in as an object;
* :mod:`~prefect_gptimage.engine.settle`: how rows are settled on a stop;
* :mod:`~prefect_gptimage.engine.run`: :class:`RowEngine`, the engine proper.
"""
