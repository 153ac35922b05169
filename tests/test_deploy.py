"""The deploy kit validates: Kubernetes manifests (kubernetes-validate, strict), YAML style
(yamllint), the compose file (the Compose Specification schema, offline), the HAProxy config
(``haproxy -c``), the coturn config (a real ``turnserver`` answering STUN and TURN on
loopback), the Dockerfiles; and ``VOICEBOT_RTC_CONFIGURATION`` reaches the page and the
offer route. Each validator is also shown to reject a broken copy."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from voicebot.settings import RtcConfiguration, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
COMPOSE = DEPLOY / "docker-compose.yml"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
TURN_CONF = DEPLOY / "coturn" / "turnserver.conf"
DRAIN_TIMEOUT_S = 60  # VOICEBOT_DRAIN_TIMEOUT_S's default
BIN = Path(sys.executable).parent


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for path in K8S for d in documents(path) if d["kind"] == kind]


# -- Kubernetes ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_strictly(path: Path) -> None:
    import kubernetes_validate

    for document in documents(path):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_validation_rejects_a_misspelt_field() -> None:
    import kubernetes_validate

    (deployment,) = by_kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_deployment_probes_and_drain() -> None:
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env["VOICEBOT_DRAIN_TIMEOUT_S"])
    assert drain == DRAIN_TIMEOUT_S
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Kubernetes counts preStop inside the grace period: it must cover both, plus the goodbye.
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 15
    # A liveness probe must not kill a pod that is busy draining or loading models.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30
    assert "startupProbe" in container
    assert env["VOICEBOT_HOST"] == "0.0.0.0"
    secrets = {e["name"] for e in container["env"] if "valueFrom" in e}
    assert "VOICEBOT_API_TOKEN" in secrets  # check_exposure refuses 0.0.0.0 without one


def test_services_hpa_and_budget_select_the_deployment() -> None:
    (deployment,) = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
    assert services["voicebot"]["spec"]["sessionAffinity"] == "ClientIP"
    assert services["voicebot-pods"]["spec"]["publishNotReadyAddresses"] is True
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "voicebot_calls_active"
    lines = int(
        next(
            e["value"]
            for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"] == "VOICEBOT_CONCURRENCY_LIMIT"
        )
    )
    assert float(metrics["Pods"]["pods"]["target"]["averageValue"]) < lines
    (budget,) = by_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- YAML style ----------------------------------------------------------------------------


def yamllint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_yamllint_passes_on_every_yaml_file() -> None:
    result = yamllint(DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(COMPOSE.read_text(encoding="utf-8").replace("  voicebot-2:", "  voicebot-1:"))
    result = yamllint(broken)
    assert result.returncode != 0
    assert "duplication of key" in result.stdout


# -- docker compose ------------------------------------------------------------------------


def compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_compose_file_matches_the_compose_specification() -> None:
    result = compose_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE.read_text(encoding="utf-8")
    broken.write_text(text.replace("stop_grace_period:", "stop_grace_periods:"))
    result = compose_check(broken)
    assert result.returncode != 0
    assert "stop_grace_periods" in result.stdout


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:?msg} and ${VAR:-default}, with made-up values."""
    return re.sub(r"\$\{([A-Z_]+)(?::[?-][^}]*)?\}", lambda m: f"x{m.group(1).lower()}", value)


def test_compose_runs_two_draining_replicas_behind_haproxy() -> None:
    compose = documents(COMPOSE)[0]
    services = compose["services"]
    assert {"voicebot-1", "voicebot-2", "haproxy", "postgres", "ollama", "coturn"} <= set(services)
    ports = []
    for name in ("voicebot-1", "voicebot-2"):
        service = services[name]
        env = service["environment"]
        ports.append(env["VOICEBOT_PORT"])
        assert service["stop_signal"] == "SIGTERM"
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace >= int(env["VOICEBOT_DRAIN_TIMEOUT_S"]) + 15
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        # The ICE servers parse as the setting does.
        rtc = RtcConfiguration.model_validate_json(interpolate(env["VOICEBOT_RTC_CONFIGURATION"]))
        assert {u.split(":")[0] for s in rtc.iceServers for u in _urls(s.urls)} == {"stun", "turn"}
        assert "postgres" in env["VOICEBOT_DATABASE_URL"] or "5432" in env["VOICEBOT_DATABASE_URL"]
    assert len(set(ports)) == 2
    haproxy_env = services["haproxy"]["environment"]
    replicas = {haproxy_env["VOICEBOT_REPLICA_1"], haproxy_env["VOICEBOT_REPLICA_2"]}
    assert replicas == {f"127.0.0.1:{p}" for p in ports}
    assert any("haproxy.cfg" in v for v in services["haproxy"]["volumes"])
    assert any("turnserver.conf" in v for v in services["coturn"]["volumes"])


def _urls(urls: str | list[str]) -> list[str]:
    return [urls] if isinstance(urls, str) else urls


# -- HAProxy -------------------------------------------------------------------------------

HAPROXY_ENV = {
    "VOICEBOT_LB_BIND": "127.0.0.1:18080",
    "HAPROXY_STATS_BIND": "127.0.0.1:18404",
    "VOICEBOT_REPLICA_1": "127.0.0.1:18001",
    "VOICEBOT_REPLICA_2": "127.0.0.1:18002",
}


def haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: apt-get install haproxy (.ci/run does)")
    return subprocess.run(
        ["haproxy", "-c", "-dW", "-f", str(path)],  # -dW: warnings are errors too
        env={**os.environ, **HAPROXY_ENV},
        capture_output=True,
        text=True,
        check=False,
    )


def test_haproxy_config_is_valid_without_warnings() -> None:
    result = haproxy_check(HAPROXY_CFG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_check_rejects_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "haproxy.cfg"
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    broken.write_text(text.replace("http-check expect status 200", "http-check expect stat 200"))
    result = haproxy_check(broken)
    assert result.returncode != 0
    assert "expect" in result.stdout + result.stderr


def test_haproxy_routes_on_readiness_and_keeps_offers_sticky() -> None:
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    assert "http-check send meth GET uri /readyz" in text
    assert re.search(r"stick match var\(txn\.webrtc_id\)", text)
    assert "force-persist if ice_candidate || call_feed" in text
    assert "retry-on conn-failure empty-response 503" in text
    # HAProxy's own 503 is the same busy answer a replica gives.
    assert '\\"error\\": \\"concurrency_limit_reached\\"' in text


# -- coturn --------------------------------------------------------------------------------

MAGIC = 0x2112A442


def stun(sock: socket.socket, kind: int, attributes: bytes = b"") -> tuple[int, dict[int, bytes]]:
    """Send one STUN message; the response's type and attributes."""
    transaction = os.urandom(12)
    sock.send(struct.pack("!HHI", kind, len(attributes), MAGIC) + transaction + attributes)
    data = sock.recv(2048)
    response_type, length = struct.unpack("!HH", data[:4])
    assert data[8:20] == transaction
    attrs: dict[int, bytes] = {}
    offset = 20
    while offset < 20 + length:
        attr_type, attr_len = struct.unpack("!HH", data[offset : offset + 4])
        attrs[attr_type] = data[offset + 4 : offset + 4 + attr_len]
        offset += 4 + attr_len + (-attr_len % 4)
    return response_type, attrs


def run_turnserver(conf: Path, tmp: Path) -> tuple[subprocess.Popen[str], int]:
    if shutil.which("turnserver") is None:
        pytest.fail("coturn is not installed: apt-get install coturn (.ci/run does)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    process = subprocess.Popen(
        [
            "turnserver",
            "-c",
            str(conf),
            # Loopback instead of the public addresses the file names.
            "--listening-ip",
            "127.0.0.1",
            "--listening-port",
            str(port),
            "--relay-ip",
            "127.0.0.1",
            "--pidfile",
            str(tmp / "turnserver.pid"),
            "--user",
            "voicebot:test-password",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp,
    )
    return process, port


def check_turn_config(conf: Path, tmp: Path) -> tuple[str, dict[int, bytes], str]:
    """Start coturn with ``conf`` on loopback and ask it a STUN binding and a TURN allocate
    without credentials; (binding response, allocate attributes, coturn's output)."""
    process, port = run_turnserver(conf, tmp)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.connect(("127.0.0.1", port))
            deadline = time.monotonic() + 10
            while True:
                try:
                    binding, _ = stun(sock, 0x0001)
                    break
                except (TimeoutError, ConnectionRefusedError):
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
            udp = struct.pack("!HHI", 0x0019, 4, 17 << 24)  # REQUESTED-TRANSPORT: UDP
            allocate, attrs = stun(sock, 0x0003, udp)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    return f"{binding:#06x}/{allocate:#06x}", attrs, output


def test_coturn_config_serves_stun_and_demands_turn_credentials(tmp_path: Path) -> None:
    responses, attrs, output = check_turn_config(TURN_CONF, tmp_path)
    assert "Bad configuration format" not in output, output
    # Binding success; Allocate error: 401 with our realm (long-term credentials on).
    assert responses == "0x0101/0x0113", output
    error = attrs[0x0009]
    assert error[2] * 100 + error[3] == 401
    conf = TURN_CONF.read_text(encoding="utf-8")
    (realm,) = re.findall(r"^realm=(.+)$", conf, re.MULTILINE)
    assert attrs[0x0014].decode() == realm
    # Never a relay into private networks, except the replicas.
    for private in ("10.0.0.0-", "172.16.0.0-", "192.168.0.0-", "127.0.0.0-"):
        assert f"denied-peer-ip={private}" in conf
    assert "allowed-peer-ip=" in conf
    low, high = (
        int(re.findall(rf"^{k}-port=(\d+)$", conf, re.MULTILINE)[0]) for k in ("min", "max")
    )
    assert 0 < low < high


def test_coturn_check_catches_a_bad_option(tmp_path: Path) -> None:
    broken = tmp_path / "turnserver.conf"
    broken.write_text(TURN_CONF.read_text(encoding="utf-8") + "\nlistenin-port=3478\n")
    _, _, output = check_turn_config(broken, tmp_path)
    assert "Bad configuration format: listenin-port" in output


def test_coturn_without_long_term_credentials_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "turnserver.conf"
    text = TURN_CONF.read_text(encoding="utf-8").replace("lt-cred-mech\n", "no-auth\n")
    broken.write_text(text)
    responses, _, _ = check_turn_config(broken, tmp_path)
    assert responses != "0x0101/0x0113"  # an open relay allocates for anyone


# -- Dockerfiles ---------------------------------------------------------------------------


def extras_installed(dockerfile: Path) -> set[str]:
    (spec,) = re.findall(r'pip install "\.\[([a-z,]+)\]"', dockerfile.read_text(encoding="utf-8"))
    return set(spec.split(","))


def test_dockerfiles_install_existing_extras_and_drain_on_sigterm() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = set(project["optional-dependencies"])
    cpu, cuda = DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"
    assert "gpu" not in extras_installed(cpu)
    assert "gpu" in extras_installed(cuda)
    for dockerfile in (cpu, cuda):
        text = dockerfile.read_text(encoding="utf-8")
        assert extras_installed(dockerfile) <= extras, f"{dockerfile.name} names a missing extra"
        assert "STOPSIGNAL SIGTERM" in text
        assert "/healthz" in text
        assert re.search(r"^USER (?!root)", text, re.MULTILINE)
        assert 'CMD ["voicebot", "serve"' in text
        # Every COPY source exists in the build context (the repository root).
        for source in re.findall(r"^COPY ([^\n]+) \S+$", text, re.MULTILINE):
            for name in source.split():
                assert (ROOT / name).exists(), f"{dockerfile.name}: COPY {name}"


# -- VOICEBOT_RTC_CONFIGURATION ------------------------------------------------------------

ICE = (
    '{"iceServers": [{"urls": "stun:turn.example.com:3478"}, {"urls": '
    '["turn:turn.example.com:3478?transport=udp"], "username": "u", "credential": "p"}]}'
)


def test_rtc_configuration_setting_parses_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VOICEBOT_RTC_CONFIGURATION", ICE)
    settings = Settings(data_dir=tmp_path)
    assert settings.rtc_configuration is not None
    assert settings.rtc_configuration.as_dict() == {
        "iceServers": [
            {"urls": "stun:turn.example.com:3478"},
            {
                "urls": ["turn:turn.example.com:3478?transport=udp"],
                "username": "u",
                "credential": "p",
            },
        ]
    }
    assert Settings(data_dir=tmp_path, _env_file=None).rtc_configuration is not None
    monkeypatch.delenv("VOICEBOT_RTC_CONFIGURATION")
    assert Settings(data_dir=tmp_path).rtc_configuration is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"iceServers": [{"urls": "http://x"}]}', "must start with stun:, turn: or turns:"),
        ('{"iceServers": [{"url": "stun:x"}]}', "urls"),
        ('{"ice_servers": []}', "iceServers"),
        ("not json", "rtc_configuration"),
    ],
)
def test_rtc_configuration_rejects_bad_values(monkeypatch, tmp_path, value, message) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("VOICEBOT_RTC_CONFIGURATION", value)
    with pytest.raises(ValidationError, match=message):
        Settings(data_dir=tmp_path)


def test_rtc_configuration_reaches_the_offer_route_and_the_page(tmp_path) -> None:
    from fastapi import FastAPI
    from fastrtc import StreamHandler

    from voicebot.server import mount
    from voicebot.ui import build_call_stream

    class Silent(StreamHandler):
        def receive(self, frame: Any) -> None: ...

        def emit(self) -> None: ...

        def copy(self) -> Silent:
            return Silent()

    settings = Settings(
        data_dir=tmp_path, rtc_configuration=RtcConfiguration.model_validate_json(ICE)
    )
    service = mount(FastAPI(), "", settings=settings)
    # The page (`voicebot ui` and /ui both build it with build_call_stream).
    page = build_call_stream(
        Silent(),
        [("Assistant", "assistant-en")],
        "assistant-en",
        concurrency_limit=1,
        time_limit=None,
        rtc_configuration=settings.rtc_configuration.as_dict(),
    )
    for stream in (service.stream, page):
        # The browser's RTCPeerConnection (the page) ...
        assert stream.rtc_configuration == settings.rtc_configuration.as_dict()
        # ... and the server's side of each call, which handles the offer.
        servers = stream.server_rtc_configuration.iceServers
        assert [s.urls for s in servers] == [
            "stun:turn.example.com:3478",
            ["turn:turn.example.com:3478?transport=udp"],
        ]
        assert servers[1].username == "u" and servers[1].credential == "p"


def test_no_rtc_configuration_keeps_host_candidates_only(tmp_path) -> None:
    from fastapi import FastAPI

    from voicebot.server import mount

    service = mount(FastAPI(), "", settings=Settings(data_dir=tmp_path))
    assert service.stream.rtc_configuration is None
    assert service.stream.server_rtc_configuration is None


# -- HAProxy's routing rules, against two stand-in replicas ----------------------------------


class StandIn:
    """A stand-in replica: /readyz as told, offers answered 200 (or 503 busy) with its name."""

    def __init__(self, name: str) -> None:
        import http.server
        import threading

        outer = self
        self.name = name
        self.ready = True
        self.busy = False

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None: ...

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200 if outer.ready or self.path != "/readyz" else 503, b"{}")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(503 if outer.busy else 200, b'{"replica": "%s"}' % name.encode())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_haproxy_rules_keep_candidates_on_a_full_replica_and_retry_busy_offers(
    tmp_path: Path,
) -> None:
    import httpx

    from tests.support_voice import free_port
    from tests.test_haproxy import server_states

    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: apt-get install haproxy (.ci/run does)")
    one, two = StandIn("one"), StandIn("two")
    lb, stats = free_port(), free_port()
    env = {
        **os.environ,
        "VOICEBOT_LB_BIND": f"127.0.0.1:{lb}",
        "HAPROXY_STATS_BIND": f"127.0.0.1:{stats}",
        "VOICEBOT_REPLICA_1": f"127.0.0.1:{one.port}",
        "VOICEBOT_REPLICA_2": f"127.0.0.1:{two.port}",
    }
    haproxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(HAPROXY_CFG)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stats_url, lb_url = f"http://127.0.0.1:{stats}", f"http://127.0.0.1:{lb}"

    def states_are(expected: dict[str, str]) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if server_states(stats_url) == expected:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def post(kind: str, webrtc_id: str) -> httpx.Response:
        body = {"type": kind, "webrtc_id": webrtc_id, "sdp": "v=0", "candidate": {}}
        return httpx.post(f"{lb_url}/webrtc/offer", json=body, timeout=5)

    try:
        assert states_are({"replica1": "UP", "replica2": "UP"})
        first = post("offer", "call-a")
        holder = first.headers["x-served-by"]
        full, other = (one, two) if holder == "replica1" else (two, one)
        other_name = "replica2" if holder == "replica1" else "replica1"
        # Its lines all taken, the holder leaves rotation...
        full.ready = False
        assert states_are({holder: "DOWN", other_name: "UP"})
        # ... but its call's trickled ICE candidates still reach it,
        for _ in range(3):
            reply = post("ice-candidate", "call-a")
            assert (reply.status_code, reply.headers["x-served-by"]) == (200, holder)
        # and so does its live call feed,
        feed = httpx.get(f"{lb_url}/api/calls/call-a/events", timeout=5)
        assert feed.headers["x-served-by"] == holder
        # new offers and other requests go to the other replica,
        for n in range(3):
            assert post("offer", f"call-{n}").headers["x-served-by"] == other_name
        # and with none ready, HAProxy itself gives the busy answer.
        other.ready = False
        assert states_are({holder: "DOWN", other_name: "DOWN"})
        busy = post("offer", "call-z")
        assert busy.status_code == 503
        assert busy.json()["meta"]["error"] == "concurrency_limit_reached"

        # A replica that says busy before its health check does: the offer is retried on
        # the other, and the call's candidates follow the replica that accepted it.
        full.ready = other.ready = True
        assert states_are({holder: "UP", other_name: "UP"})
        one.busy = True
        for n in range(4):
            accepted = post("offer", f"retry-{n}")
            assert (accepted.status_code, accepted.json()["replica"]) == (200, "two")
            assert post("ice-candidate", f"retry-{n}").json()["replica"] == "two"
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        one.close()
        two.close()
