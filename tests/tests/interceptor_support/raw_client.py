"""Sends raw HTTP bytes the way an attacker would and reports what came back, as JSON.

argv[1] is a JSON object:
  host, port           where to connect
  chunks               list of strings (latin-1) sent in order
  delay                seconds between chunks (default 0)
  oob                  index of a chunk sent with MSG_OOB (urgent data), optional
  fastopen             send the first chunk in the SYN (MSG_FASTOPEN)
  src_port             bind to this source port (SO_REUSEADDR), optional
  timeout              seconds to wait for the answer (default 3)
Prints {"reset": bool, "timeout": bool, "data": str, "elapsed": float}.
"""
import json
import socket
import sys
import time

req = json.loads(sys.argv[1])
family = socket.AF_INET6 if ":" in req["host"] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(req.get("timeout", 3))
if "src_port" in req:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", req["src_port"]))
chunks = [c.encode("latin-1") for c in req["chunks"]]
addr = (req["host"], req["port"])
start = time.monotonic()
out = {"reset": False, "timeout": False, "data": ""}
data = b""
try:
    if req.get("fastopen"):
        s.sendto(chunks[0], socket.MSG_FASTOPEN, addr)
        chunks = chunks[1:]
    else:
        s.connect(addr)
    for i, c in enumerate(chunks):
        if req.get("delay"):
            time.sleep(req["delay"])
        if req.get("oob") == i:
            s.send(c, socket.MSG_OOB)
        else:
            s.sendall(c)
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
except ConnectionResetError:
    out["reset"] = True
except BrokenPipeError:
    out["reset"] = True
except socket.timeout:
    out["timeout"] = True
out["data"] = data.decode("latin-1")
out["elapsed"] = time.monotonic() - start
print(json.dumps(out))
