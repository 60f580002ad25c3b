"""The rollout proxy (tasks/deploy.py) with real HAProxy in front of small HTTP servers standing in for
containers: switching back and forth under clients that keep their connections open fails no request,
and the old slot drains. Docker itself is exercised in tests/flows/test_pipeline_e2e.py."""
import http.client
import json
import shutil
import signal
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.container import base_image_tag
from tasks.deploy import haproxy_pid, served_version, sessions_on, start_proxy, switch_slot
from tests.helpers import free_port

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None and not shutil.os.access("/usr/sbin/haproxy", shutil.os.X_OK),
                                reason="HAProxy is missing: apt-get install -y haproxy (.ci/run does)")


def version_server(version: str, delay: float = 0.0) -> ThreadingHTTPServer:
    """A stand-in for a serving container: /v1/models names its version, after `delay` seconds."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            time.sleep(delay)
            body = json.dumps({"data": [{"id": "m", "version": version}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_switching_slots_under_keep_alive_clients_fails_no_request_and_the_old_slot_drains(tmp_path):
    servers = [version_server(str(v), delay=0.02) for v in (1, 2, 3, 4)]
    proxy = free_port()
    seen, failures, stop = [], [], threading.Event()

    def client():
        # One connection reused for every request, as HTTP clients (httpx, the openai client) do: a proxy
        # that closes idle keep-alive connections on a switch fails the request sent at that moment.
        conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/v1/models")
                seen.append(json.loads(conn.getresponse().read())["data"][0]["version"])
            except Exception as err:  # any failed request fails the test below
                failures.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=10)

    try:
        start_proxy(tmp_path, proxy, servers[0].server_port)
        master = haproxy_pid(tmp_path)
        assert master is not None and served_version(proxy, None) == "1"
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        slots, active = {"blue": servers[0].server_port}, "blue"
        for server in servers[1:]:
            time.sleep(0.7)
            new = switch_slot(tmp_path, proxy, slots, active, server.server_port)
            slots[new] = server.server_port
            deadline = time.monotonic() + 10
            while sessions_on(tmp_path, active) > 0:  # requests in flight on the old slot finish there
                assert time.monotonic() < deadline, "the old slot did not drain in 10 s"
                time.sleep(0.05)
            active = new
        time.sleep(0.7)
        stop.set()
        for t in threads:
            t.join()
        assert failures == [] and len(seen) > 100
        assert seen[0] == "1" and seen[-1] == "4" and set(seen) == {"1", "2", "3", "4"}
        assert served_version(proxy, None) == "4" and haproxy_pid(tmp_path) == master  # switched, never restarted
        assert "bind 127.0.0.1:" in (tmp_path / "haproxy.cfg").read_text()
    finally:
        stop.set()
        if pid := haproxy_pid(tmp_path):
            shutil.os.kill(pid, signal.SIGUSR1)
        for server in servers:
            server.shutdown()


def test_base_image_is_named_by_its_recipe(tmp_path, monkeypatch):
    import tasks.container as container

    tag = base_image_tag()
    assert tag.startswith("smelt-base:") and len(tag.split(":")[1]) == 12
    changed = tmp_path / "base-image.sh"
    changed.write_bytes(container.BASE_SCRIPT.read_bytes() + b"\n# changed\n")
    monkeypatch.setattr(container, "BASE_SCRIPT", changed)
    assert base_image_tag() != tag  # a changed recipe is a new image, never a stale one reused


def test_bento_names_the_local_base_image_and_no_cuda_free_index_when_unreachable(monkeypatch):
    import tasks.container as container
    from tasks.package import bentofile

    container.torch_index.cache_clear()
    monkeypatch.setenv("SMELT_TORCH_INDEX", "http://127.0.0.1:9/unreachable")
    try:
        spec = bentofile("smelt-x:abc")
    finally:
        container.torch_index.cache_clear()
    assert spec["docker"]["base_image"] == base_image_tag()
    assert "extra_index_url" not in spec["python"]  # unreachable: PyPI's torch, said on stdout
    assert any(p.startswith("ninja==") for p in spec["python"]["packages"])  # the int8 kernel builds in the image


def test_the_bento_installs_the_library_that_loads_the_champions_quantization():
    from importlib.metadata import version

    from tasks.package import bento_packages

    assert f"gptqmodel=={version('gptqmodel')}" in bento_packages("gptq-int4")
    assert f"bitsandbytes=={version('bitsandbytes')}" in bento_packages("bnb-nf4")
    assert not any(p.startswith(("gptqmodel", "bitsandbytes")) for p in bento_packages("torchao-int8-wo"))
    assert bento_packages("none") == bento_packages("torchao-int8-wo")  # torchao is always there
