"""A small HTTP proxy in front of the local GCS server that injects the faults a real bucket shows.

Clients reach it through STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL set to its URL, so every GCS client of
the project (gcsfs, tensorstore) meets the faults. `fail_fraction` of requests (seeded) get a 503 or lose their
connection before any answer; `refuse_writes` answers every write (POST, PUT, PATCH, DELETE) with 403, as a bucket
without write permission or over its quota does. Counts of what was injected are kept for the tests.
"""

from __future__ import annotations

import http.client
import http.server
import random
import threading
import urllib.parse

_HOP_HEADERS = {'connection', 'keep-alive', 'transfer-encoding', 'proxy-connection', 'upgrade', 'te', 'trailer'}


class FaultProxy:

  def __init__(self, upstream: str, *, fail_fraction: float = 0.0, seed: int = 0, only_reads: bool = False):
    self.upstream = urllib.parse.urlparse(upstream)
    self.fail_fraction, self.only_reads = fail_fraction, only_reads
    self.refuse_writes = False
    self.injected = {'503': 0, 'dropped': 0, 'refused': 0}
    self.requests = 0
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # quiet
        pass

      def _body(self) -> bytes | None:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
          chunks = []
          while True:
            size = int(self.rfile.readline().strip().split(b';')[0], 16)
            if not size:
              self.rfile.readline()
              return b''.join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else None

      def _handle(self):
        body = self._body()
        fault = proxy._fault(self.command)
        if fault == 'dropped':
          self.close_connection = True
          self.connection.close()
          return
        if fault in ('503', 'refused'):
          status, message = (503, 'Service Unavailable') if fault == '503' else (403, 'Forbidden')
          payload = f'{{"error": {{"code": {status}, "message": "{message} (injected)"}}}}'.encode()
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        if body is not None:
          headers['Content-Length'] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
          if key.lower() not in _HOP_HEADERS and key.lower() != 'content-length':
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if self.command != 'HEAD':
          self.wfile.write(data)
        conn.close()

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self._server.daemon_threads = True
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def _fault(self, method: str) -> str | None:
    with self._lock:
      self.requests += 1
      write = method in ('POST', 'PUT', 'PATCH', 'DELETE')
      if self.refuse_writes and write:
        self.injected['refused'] += 1
        return 'refused'
      if self.only_reads and write:
        return None
      if self._rng.random() < self.fail_fraction:
        fault = '503' if self._rng.random() < 0.5 else 'dropped'
        self.injected[fault] += 1
        return fault
      return None

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
