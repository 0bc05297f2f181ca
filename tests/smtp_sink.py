"""A tiny SMTP server that keeps what it receives, or refuses everything: enough to test
sending mail for real over a socket, without a mail system."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Sink:
    host: str
    port: int
    messages: list[str] = field(default_factory=list)
    refuse: bool = False


@contextmanager
def smtp_sink() -> Iterator[Sink]:
    sink = Sink("127.0.0.1", 0)

    class Handler(socketserver.StreamRequestHandler):
        def reply(self, line: str) -> None:
            self.wfile.write((line + "\r\n").encode())

        def handle(self) -> None:
            self.reply("220 sink ready")
            while True:
                line = self.rfile.readline().decode(errors="replace").strip()
                if not line:
                    return
                verb = line.split(" ")[0].upper()
                if verb in ("EHLO", "HELO"):
                    self.reply("250 sink")
                elif verb == "MAIL" and sink.refuse:
                    self.reply("550 refused by the test")
                elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
                    self.reply("250 ok")
                elif verb == "DATA":
                    self.reply("354 go on")
                    body = []
                    while (data := self.rfile.readline().decode(errors="replace")) != ".\r\n":
                        body.append(data)
                    sink.messages.append("".join(body))
                    self.reply("250 queued")
                elif verb == "QUIT":
                    self.reply("221 bye")
                    return
                else:
                    self.reply("502 not here")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    sink.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
