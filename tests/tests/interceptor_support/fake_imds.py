"""A fake instance-metadata server for the interceptor tests.

Logs every request line it receives (one line each, flushed, before answering) to the file
given as argv[2], serves IMDSv2 tokens (PUT /latest/api/token) and credentials under iam/.
It resolves paths as permissively as a server could (percent-decoding, backslashes as slashes,
dot segments, fragments and queries cut), so any request that slips past the agent with a
disguised path is served the credentials, and the tests would see it.
"""
import http.server
import posixpath
import secrets
import socket
import sys
import threading
import urllib.parse

PORT = int(sys.argv[1])
LOG = open(sys.argv[2], "a", buffering=1)
LOCK = threading.Lock()
TOKENS = set()

INSTANCE_ID = "i-0123456789abcdef0"
ROLE = "hoshino-test-role"
DOCS = {
    "/latest": "meta-data/\nuser-data\napi/\n",
    "/latest/meta-data": "instance-id\nplacement/\niam/\n",
    "/latest/meta-data/instance-id": INSTANCE_ID,
    "/latest/meta-data/placement/availability-zone": "eu-test-1a",
    "/latest/meta-data/iam/security-credentials": ROLE,
    "/latest/meta-data/iam/security-credentials/" + ROLE:
        '{"Code":"Success","AccessKeyId":"ASIATEST","SecretAccessKey":"' + ROLE + '-secret"}',
    "/latest/meta-data/iam/info": '{"Code":"Success","InstanceProfileArn":"' + ROLE + '"}',
    "/latest/user-data": "#!/bin/sh\necho user-data\n",
}


def resolve(raw):
    path = raw.split("#", 1)[0].split("?", 1)[0]
    path = urllib.parse.unquote(urllib.parse.unquote(path)).replace("\\", "/")
    path = posixpath.normpath("/" + path.lstrip("/"))
    return path.rstrip("/") or "/"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, code, body, headers=()):
        data = body.encode()
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def logged(self):
        with LOCK:
            LOG.write(self.requestline + "\n")

    def do_PUT(self):
        self.logged()
        if resolve(self.path) != "/latest/api/token":
            return self.answer(404, "not found")
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        if not ttl or not ttl.isdigit():
            return self.answer(400, "missing ttl")
        token = "TOKEN-" + secrets.token_hex(8)
        TOKENS.add(token)
        return self.answer(200, token, [("X-aws-ec2-metadata-token-ttl-seconds", ttl)])

    def do_GET(self):
        self.logged()
        token = self.headers.get("X-aws-ec2-metadata-token")
        if token is not None and token not in TOKENS:
            return self.answer(401, "bad token")
        body = DOCS.get(resolve(self.path))
        if body is None:
            return self.answer(404, "not found")
        return self.answer(200, body)

    do_HEAD = do_GET

    def do_POST(self):
        self.logged()
        self.answer(405, "no")


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


Server(("::", PORT), Handler).serve_forever()
