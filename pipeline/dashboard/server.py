"""The run dashboard: a web page over a pipeline home (runs by day, what serves, blessing
decisions, metric trends, lineage), served on 127.0.0.1 and only reading the home.

The standard library's threading HTTP server, GET and HEAD only. Routes: /  (runs by day, what serves, trends); /runs/DATE (a day: blessing decision, plots, its
pipeline runs); /runs/DATE.json (its summary); /versions/N and /models/ID (lineage). Every
request reads the home afresh, so the page follows the runs as they land; nothing is written.
"""

from __future__ import annotations

import argparse
import http.server
import json
import re
import sys
from typing import Callable, Tuple

from pipeline import argtypes
from pipeline import config as config_lib
from pipeline.dashboard import data as data_lib
from pipeline.dashboard import pages

_DATE = r"(\d{4}-\d{2}-\d{2})"


class _Pages:
    """Route -> (status, content type, body) over one home."""

    def __init__(self, reader: data_lib.HomeReader):
        self.reader = reader
        self.routes: Tuple[Tuple[re.Pattern, Callable[..., Tuple[int, str, str]]], ...] = (
            (re.compile(r"/"), self.overview),
            (re.compile(rf"/runs/{_DATE}"), self.day),
            (re.compile(rf"/runs/{_DATE}\.json"), self.summary),
            (re.compile(r"/versions/(\d+)"), self.version),
            (re.compile(r"/models/(\d+)"), self.model),
        )

    def answer(self, path: str) -> Tuple[int, str, str]:
        for pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match:
                return handler(*match.groups())
        return self._missing(f"No page at {path}.")

    @staticmethod
    def _html(body: str) -> Tuple[int, str, str]:
        return 200, "text/html; charset=utf-8", body

    @staticmethod
    def _missing(what: str) -> Tuple[int, str, str]:
        return 404, "text/html; charset=utf-8", pages.not_found_page(what)

    def overview(self):
        return self._html(pages.overview_page(self.reader.home, self.reader.days(), self.reader.serving(),
                                              self.reader.summaries()))

    def day(self, date: str):
        day, summary = self.reader.day(date), self.reader.summary(date)
        if day is None and summary is None:
            return self._missing(f"No run for {date} in this home.")
        return self._html(pages.day_page(date, summary, day, self.reader.gate_means(date),
                                         self.reader.model_id_of(summary)))

    def summary(self, date: str):
        summary = self.reader.summary(date)
        if summary is None:
            return self._missing(f"No run summary for {date}.")
        return 200, "application/json", json.dumps(summary, indent=2)

    def version(self, version: str):
        lineage = self.reader.lineage_of_version(int(version))
        if lineage is None:
            return self._missing(f"Version {version} was not pushed by a run recorded in this home's metadata.")
        return self._html(pages.lineage_page(f"Served version {version}: lineage", lineage))

    def model(self, model_id: str):
        lineage = self.reader.lineage_of_model(int(model_id))
        if lineage is None:
            return self._missing(f"No model {model_id} in this home's metadata.")
        return self._html(pages.lineage_page(f"Model {model_id}: lineage", lineage))


def make_server(home: str, host: str, port: int) -> http.server.ThreadingHTTPServer:
    routes = _Pages(data_lib.HomeReader(home))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            self._reply(with_body=True)

        def do_HEAD(self):  # noqa: N802
            self._reply(with_body=False)

        def _reply(self, with_body: bool) -> None:
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            try:
                status, content_type, body = routes.answer(path)
            except Exception as error:  # pylint: disable=broad-except  (a half-written store, a bad file)
                self.log_error("%s failed: %r", path, error)
                status, content_type = 500, "text/html; charset=utf-8"
                body = pages.layout("Error", f"<h1>Error</h1><p>{pages._e(type(error).__name__)}: {pages._e(error)}</p>")
            encoded = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(encoded)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if with_body:
                self.wfile.write(encoded)

        def log_message(self, format, *args):  # one short line per request on stderr
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    argtypes.add_home_argument(parser, "the pipeline home to show")
    parser.add_argument("--port", type=argtypes.non_negative_int, default=config_lib.DASHBOARD_PORT,
                        help="port to listen on; 0 picks a free one")
    parser.add_argument("--host", default=config_lib.SERVING_HOST,
                        help="address to listen on (the default serves this machine only)")


def run(args) -> int:
    """The `ui` subcommand: serves until interrupted. Exit 2 when the home or port is unusable."""
    reader = data_lib.HomeReader(args.home)
    if not reader.exists():
        print(f"poso ui: {reader.home} is not a pipeline home: it has neither metadata.sqlite nor runs/ "
              f"(pass the --home of `poso run`)", file=sys.stderr)
        return 2
    try:
        server = make_server(args.home, args.host, args.port)
    except OSError as error:
        print(f"poso ui: cannot listen on {args.host}:{args.port}: {error.strerror}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"Dashboard of {reader.home} at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

