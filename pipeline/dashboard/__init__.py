"""The run dashboard (`poso ui`) and the per-day report: data.py reads a pipeline home (run
summaries, ML Metadata, the serving directory), pages.py and charts.py render HTML with inline SVG,
server.py serves the pages on 127.0.0.1. pipeline/report.py writes a day's page as report.html."""
