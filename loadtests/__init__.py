"""An open-loop multimodal load generator for any OpenAI-compatible chat server.

Run from a checkout (it is not part of the vlmserve wheel):
    python -m loadtests run --base-url http://127.0.0.1:8000 --model NAME --scenario spike \
        --duration 60 --out runs/spike

Modules: schedule (arrival times), media (synthetic images and videos), workload (request
bodies per scenario), runner (the open-loop sender and its per-request records), scrape
(the server's /metrics during the run), stats, report (report.json + report.md), plots.
"""

REPORT_SCHEMA = "vlmserve.loadtest.report"
REPORT_SCHEMA_VERSION = 1
