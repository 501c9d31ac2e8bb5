"""Running the teacher app with uvicorn: on a pre-bound socket, in the foreground or in a thread."""
from __future__ import annotations

import socket
import threading

import uvicorn


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
  """A listening TCP socket; port 0 picks a free port (read it back with `sock.getsockname()`)."""
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


def base_url(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  host = f"[{host}]" if ":" in host else host
  return f"http://{host}:{port}/v1"


def make_server(app, log_level: str = "warning") -> uvicorn.Server:
  # One worker, one event loop: handlers are async, so concurrent requests overlap their waits.
  return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30,
                                       lifespan="off"))


class BackgroundServer:
  """`with BackgroundServer(app) as url:` serves `app` on a free loopback port in a daemon thread."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    self.sock = bind(host, port)
    self.url = base_url(self.sock)
    self.server = make_server(app, log_level)
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

  def __enter__(self) -> str:
    self.thread.start()
    while not self.server.started:
      if not self.thread.is_alive():
        raise RuntimeError("the teacher server thread exited during start-up")
      self.thread.join(0.01)
    return self.url

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self.thread.join(10)
    self.sock.close()
