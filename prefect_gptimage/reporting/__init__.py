"""What a run reports: the manifest, the HTML gallery, Prefect artifacts, progress, the summary.

:class:`~prefect_gptimage.reporting.run_report.RunReport` ties them together for the flows.
"""
