"""A local stand-in for the Hugging Face Hub's file endpoint, for tests that download "released" checkpoints.

huggingface_hub 2.4 (file_download.py) sends HEAD then GET to `{HF_ENDPOINT}/{repo}/resolve/{revision}/{filename}`.
From the HEAD it needs X-Repo-Commit (else FileMetadataError), an etag (X-Linked-Etag, else ETag; for LFS files the
content's sha256) and a size (X-Linked-Size, else Content-Length); the GET's body must have that many bytes, and
a resumed GET sends `Range: bytes=N-` and expects 206 with Content-Range. A missing file is a 404 with
X-Error-Code: EntryNotFound. Every request is counted, so a test can tell that a call never reached the server.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import threading

COMMIT = 'c0ffee' + '0' * 34


class HubServer:
  """`with HubServer() as hub: hub.add(repo, filename, data)`; `hub.url` goes into HF_ENDPOINT."""

  def __init__(self):
    self.files: dict[tuple[str, str], bytes] = {}
    self.corrupt: set[tuple[str, str]] = set()  # served with flipped bytes (same length) under the true sha256
    self.requests: list[tuple[str, str]] = []
    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self._server.server_address[1]}'

  @property
  def file_requests(self) -> list[tuple[str, str]]:
    """The requests for files (huggingface_hub may also ask /api/... endpoints of its own, answered 404)."""
    return [r for r in self.requests if '/resolve/' in r[1]]

  def add(self, repo: str, filename: str, data: bytes) -> None:
    self.files[(repo, filename)] = data

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()

  def _handler(self):
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):  # keep pytest's output clean
        pass

      def _lookup(self):
        hub.requests.append((self.command, self.path))
        match = re.fullmatch(r'/(.+?/[^/]+)/resolve/([^/]+)/(.+)', self.path.split('?')[0])
        if not match or (match[1], match[3]) not in hub.files:
          self.send_response(404)
          self.send_header('X-Error-Code', 'EntryNotFound')
          self.send_header('X-Repo-Commit', COMMIT)
          self.send_header('Content-Length', '0')
          self.end_headers()
          return None
        key = (match[1], match[3])
        data = hub.files[key]
        served = bytes(b ^ 0xFF for b in data) if key in hub.corrupt else data
        return data, served

      def _headers(self, data: bytes, status: int = 200, extra: dict | None = None, length: int | None = None):
        self.send_response(status)
        sha = hashlib.sha256(data).hexdigest()
        headers = {'X-Repo-Commit': COMMIT, 'X-Linked-Etag': f'"{sha}"', 'ETag': f'"{sha}"',
                   'X-Linked-Size': str(len(data)), 'Accept-Ranges': 'bytes',
                   'Content-Length': str(len(data) if length is None else length), **(extra or {})}
        for key, value in headers.items():
          self.send_header(key, value)
        self.end_headers()

      def do_HEAD(self):  # pylint: disable=invalid-name
        found = self._lookup()
        if found:
          self._headers(found[0])

      def do_GET(self):  # pylint: disable=invalid-name
        found = self._lookup()
        if not found:
          return
        data, served = found
        start = 0
        ranged = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range', ''))
        if ranged:
          start = int(ranged[1])
          self._headers(data, 206, {'Content-Range': f'bytes {start}-{len(data) - 1}/{len(data)}'},
                        length=len(data) - start)
        else:
          self._headers(data)
        self.wfile.write(served[start:])

    return Handler
