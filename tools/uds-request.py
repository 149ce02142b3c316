#!/usr/bin/env python3
"""Sends one HTTP/1.1 request over a Unix socket and prints the status code, then the body.

Tests run it as another uid (an unprivileged caller the daemons must refuse or allow by their
[[principal]] rules), so it deliberately uses nothing but the standard library.

Usage: uds-request.py SOCKET METHOD PATH [JSON-BODY]
"""
import socket
import sys

path, method, route = sys.argv[1], sys.argv[2], sys.argv[3]
body = sys.argv[4].encode() if len(sys.argv) > 4 else b""
connection = socket.socket(socket.AF_UNIX)
connection.connect(path)
head = f"{method} {route} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
if body:
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
connection.sendall(head.encode() + b"\r\n" + body)
data = b""
while True:
    chunk = connection.recv(65536)
    if not chunk:
        break
    data += chunk
status_line, _, rest = data.partition(b"\r\n")
headers, _, response_body = rest.partition(b"\r\n\r\n")
print(status_line.split(b" ")[1].decode(), flush=True)
# As bytes: a body need not be text (support bundles, framed logs).
sys.stdout.buffer.write(response_body + b"\n")
